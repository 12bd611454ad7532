"""LoneRuns' rules on their own: settle, probe, and back off from callers whose runs rarely overlap."""

from __future__ import annotations

from sluice.server.spin import LoneRuns


def _lone_run(lone: LoneRuns, crowd: bool = False) -> str:
    """One lone run as ModelRunner makes it: on the loop, or in a thread during which a crowd may come."""
    if lone.on_loop():
        return "loop"
    crowds = lone.crowds
    if crowd:
        lone.crowded()
    lone.ended(crowds)
    return "thread"


def test_settles_then_probes_every_probe_th_run() -> None:
    lone = LoneRuns()
    places = [_lone_run(lone) for _ in range(LoneRuns.SETTLE + 2 * LoneRuns.PROBE)]
    cycle = ["loop"] * (LoneRuns.PROBE - 1) + ["thread"]
    assert places == ["thread"] * LoneRuns.SETTLE + cycle * 2


def test_a_crowd_between_runs_starts_the_settling_again() -> None:
    lone = LoneRuns()
    for _ in range(LoneRuns.SETTLE):
        _lone_run(lone)
    lone.crowded()
    assert [_lone_run(lone) for _ in range(LoneRuns.SETTLE)] == ["thread"] * LoneRuns.SETTLE
    assert _lone_run(lone) == "loop"


def _runs_until_probe(lone: LoneRuns) -> None:
    while _lone_run(lone) == "loop":
        pass


def test_a_crowded_probe_doubles_the_calm_asked_for_and_a_calm_one_halves_it() -> None:
    lone = LoneRuns()
    need = LoneRuns.SETTLE
    for _ in range(need):
        _lone_run(lone)
    for _ in range(3):  # each probe sees a crowd: twice the calm runs before the loop again
        for _ in range(LoneRuns.PROBE - 1):
            assert _lone_run(lone) == "loop"
        assert _lone_run(lone, crowd=True) == "thread"
        need *= 2
        assert [_lone_run(lone) for _ in range(need)] == ["thread"] * need
    _runs_until_probe(lone)  # a calm probe: half as many next time
    lone.crowded()
    assert [_lone_run(lone) for _ in range(need // 2)] == ["thread"] * (need // 2)
    assert _lone_run(lone) == "loop"
