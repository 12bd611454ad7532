"""The adaptive policy's wait for company when the model is the bottleneck, driven without clocks.

Closed-loop callers (each sends its next request once answered) are what an inference server mostly sees,
and the mean arrival rate misleads about them: callers answered by one batch send their next requests
together, so rows the mean rate says cannot come within max_delay do; and a lone caller's next request
never comes while it waits.
"""

from __future__ import annotations

from sluice.batcher import BatcherConfig
from sluice.batcher.policy import AdaptivePolicy, LoadModel

MAX_DELAY = 2e-3


def policy() -> AdaptivePolicy:
    config = BatcherConfig(policy="adaptive", max_delay=MAX_DELAY, max_batch_size=64)
    return AdaptivePolicy(config, LoadModel(), lambda: 0.0)  # an idle event loop: only the model counts


def test_a_lone_caller_that_keeps_the_model_busy_waits_in_vain_only_a_few_times() -> None:
    # A 10 ms model and one caller that sends again 1 ms after each answer: the model is busy 90% of the
    # time, over the 80% target, so a second row would be worth waiting for, but it never comes.
    lone = policy()
    now, waits = 0.0, 0
    for _ in range(500):
        lone.load.on_arrival(1, now)
        wait, _ = lone.plan(1, 0.0, now)
        if wait > 0:
            lone.wait_began(1)
            waits += 1
            now += wait  # nobody joins: the batch is this request alone
        lone.dispatched(1, 1, wait, now)
        lone.on_run(1, 64, 0.010)
        now += 0.011
    assert lone.target_rows(now) > 1  # the model stays over its target utilisation throughout
    assert waits <= 11  # 1, 2, 4, ... batches pass without a wait after each fruitless one


def test_closed_loop_callers_are_waited_for_though_the_mean_rate_says_they_are_late() -> None:
    # 8 callers in two groups of 4 take turns on a model that runs 4 rows in 12 ms and 8 in 16 ms. When
    # a batch ends, 4 requests are queued and the 4 callers just answered send theirs within a millisecond;
    # at the mean rate (400 rows/s) the 4 rows the target needs would take 10 ms, longer than max_delay.
    crowd = policy()
    for rows, seconds in ((4, 0.012), (8, 0.016)) * 10:
        crowd.on_run(rows, 64 * rows, seconds)
    now = 0.0
    for _ in range(50):  # a second of it, for the arrival rate
        crowd.load.on_arrival(8, now)
        now += 0.02
    for _ in range(50):
        crowd.load.on_arrival(8, now)
        target = crowd.target_rows(now)
        assert target > 4
        assert (target - 4) / crowd.load.rate(now) > MAX_DELAY
        wait, enough = crowd.plan(4, 0.0, now)
        assert 0 < wait <= MAX_DELAY
        assert enough > 4  # it waits for the others
        crowd.wait_began(4)
        now += 1e-3
        crowd.dispatched(8, 8, 1e-3, now)  # the others came: one batch of 8, every time
        crowd.on_run(8, 64 * 8, 0.016)
        now += 0.019


def loop_bound() -> AdaptivePolicy:
    config = BatcherConfig(policy="adaptive", max_delay=MAX_DELAY, max_batch_size=64)
    return AdaptivePolicy(config, LoadModel(), lambda: 1.0)  # a saturated loop: every head waits


def test_company_is_counted_in_rows_that_joined_not_in_rows_that_left() -> None:
    # A wait began with 1 row queued and 2 joined, but the batch that left took only 1 (a limit, a probe,
    # a priority lane): the wait brought company, so the next head waits too.
    policy = loop_bound()
    assert policy.plan(1, 0.0, 0.0)[0] > 0
    policy.wait_began(1)
    policy.dispatched(1, 3, MAX_DELAY, MAX_DELAY)
    assert policy.plan(1, 0.0, 0.01)[0] > 0


def test_a_wait_whose_rows_left_does_not_judge_the_next_batch() -> None:
    policy = loop_bound()
    assert policy.plan(3, 0.0, 0.0)[0] > 0
    policy.wait_began(3)
    policy.wait_abandoned()  # its callers gave up: the queue emptied
    policy.dispatched(1, 1, 0.0, 0.01)  # a later request that ran at once, without waiting
    assert policy.plan(1, 0.0, 0.02)[0] > 0  # no back-off: no wait of this batch was fruitless


def saturated(crowded: list[bool]) -> AdaptivePolicy:
    """A policy on a saturated loop whose callers crowd the server while `crowded[0]`, after a second of
    this model's requests at 1,000 a second."""
    config = BatcherConfig(policy="adaptive", max_delay=MAX_DELAY, max_batch_size=64)
    policy = AdaptivePolicy(config, LoadModel(), lambda: 1.0, crowded=lambda: crowded[0])
    for step in range(1000):
        policy.load.on_arrival(1, -1.0 + step * 1e-3)
    return policy


def _waits(policy: AdaptivePolicy, requests: int, gap: float = 1e-4, joined: int = 0) -> int:
    """`requests` requests `gap` s apart, each waited for by `joined` more rows if it waits; returns how
    many of them waited."""
    now, waits = policy.load._last, 0
    for _ in range(requests):
        now += gap
        policy.load.on_arrival(1, now)
        wait, _ = policy.plan(1, 0.0, now)
        if wait > 0:
            policy.wait_began(1)
            waits += 1
            now += wait
        policy.dispatched(1 + joined if wait > 0 else 1, 1 + joined if wait > 0 else 1, wait, now)
        policy.on_run(1, 64, 20e-6)
    return waits


def test_a_lone_caller_on_a_saturated_loop_still_backs_off() -> None:
    # Nobody else calls: however long it waits, nobody joins, so the waits back off as at an idle loop.
    assert _waits(saturated([False]), 500) <= 11


def test_a_crowd_on_a_saturated_loop_keeps_waiting_after_waits_that_gathered_nobody() -> None:
    # Many callers whose next requests are still in gRPC, not yet read by the busy loop: a short wait that
    # gathered none of them was too short, not in vain. Backing off here (up to 1,024 batches without a
    # wait) left 64 digits callers unbatched for seconds at a time, the wait cap stuck at its floor.
    assert _waits(saturated([True]), 500) == 500


def test_a_sparse_caller_beside_another_models_crowd_still_backs_off() -> None:
    # The crowd is the server's; this model's requests come 50 ms apart, so nobody joins within max_delay.
    policy = saturated([True])
    for step in range(200):  # its rate falls to 20 a second
        policy.load.on_arrival(1, step * 0.05)
    assert _waits(policy, 300, gap=0.05) <= 11


def test_waits_that_bring_company_in_a_crowd_reset_the_back_off() -> None:
    crowded = [False]
    policy = saturated(crowded)
    _waits(policy, 3000)  # a lone caller's fruitless waits: the back-off has grown to its maximum
    crowded[0] = True
    assert _waits(policy, 50, joined=3) == 50  # a crowd: every wait brings company
    crowded[0] = False
    _waits(policy, 1)  # one fruitless wait of a lone caller again
    assert _waits(policy, 2) == 1  # backs off for one batch, not for the 1,024 left from before
