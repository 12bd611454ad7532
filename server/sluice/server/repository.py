"""The model repository: finds models and versions on disk, loads, reloads and unloads them while serving, and
keeps their states for Health.

Every model version goes LOADING -> READY -> UNLOADING -> UNLOADED, or FAILED with its reason. A version is
built and warmed off the event loop while the versions it replaces keep serving; only when it is READY do the
lookups move to it, in one step of the event loop, so a request resolves a servable once and keeps it. The
versions it replaces take no new requests, answer what they hold (`hold`/`release` count the requests between
lookup and answer; the scheduler's `drain` the queue), and only then are their runtime sessions freed.

A broken model never takes the others down, and a broken change never replaces a working model: its failure
is logged with file, field and reason, kept for Health, and returned to callers. The reason callers see names
files relative to the repository (`digits/1/model.onnx`); the log line next to it names the directory in full.

Runtimes are plugins found through their entry points, `onnx` included: the repository gives them neutral
facts (`PluginContext`: the inference threads and how many sessions share them) and tells them, through
`LoadedModel.tune`, whether the model runs on the event loop; how they use threads is theirs to decide.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sluice.server.config import ConfigError, ModelConfig, choose_versions, load_config
from sluice.server.errors import Code, SluiceError, clip, not_found, unavailable
from sluice.server.metrics import Metrics
from sluice.server.model import load_model
from sluice.server.pipeline import Servable
from sluice.server.plugins import LoadError, PluginContext, Postprocessor, Preprocessor, build, public_text
from sluice.server.scheduling import LoopLoad, ModelRunner, make_scheduler, measure_thread_hop
from sluice.v1 import inference_pb2 as pb

log = logging.getLogger("sluice.server")

CONFIG_FILE = "config.toml"
_MODEL_NAME = re.compile(r"[^./\\_][^/\\]*")
"""A model directory's name: no path separators, not hidden or private (`.x`, `_x`)."""

Control = Literal["none", "explicit", "poll"]


class State(enum.IntEnum):
    """A model version's place in its lifecycle, numbered as sluice.v1's ModelState."""

    LOADING = pb.MODEL_STATE_LOADING
    READY = pb.MODEL_STATE_READY
    FAILED = pb.MODEL_STATE_FAILED
    UNLOADING = pb.MODEL_STATE_UNLOADING
    """Takes no new requests; answers what it holds, then frees its sessions."""
    UNLOADED = pb.MODEL_STATE_UNLOADED


Fingerprint = tuple[tuple[str, int, int], ...]
"""Files as (path, size, mtime in ns): what a poll compares to tell that something changed."""


@dataclass
class VersionEntry:
    """One version directory and what became of it."""

    version: int
    path: Path
    state: State = State.LOADING
    reason: str = ""
    servable: Servable | None = None
    fingerprint: Fingerprint = ()


@dataclass
class Plan:
    """What a model directory asks for now: its config, the versions its policy serves, and their files."""

    config: ModelConfig
    versions: dict[int, Path]
    config_print: Fingerprint
    version_prints: dict[int, Fingerprint]


@dataclass
class ModelEntry:
    """One model directory: its config (when valid) and its versions, highest first."""

    name: str
    path: Path
    config: ModelConfig | None = None
    reason: str = ""
    """Why the model serves nothing (its config or directories); empty while it serves or loads."""
    warning: str = ""
    """Why the last change was not applied while the previous versions keep serving."""
    versions: list[VersionEntry] = field(default_factory=list)
    unloaded: bool = False
    override: ModelConfig | None = None
    """A config sent with a load request, used instead of config.toml until the next load."""
    config_print: Fingerprint = ()
    snapshot: Fingerprint | None = None
    """The directory's files as the last load or poll saw them, so a poll acts only on a change."""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def default(self) -> VersionEntry | None:
        """The version that answers when a request pins none: the highest that is ready."""
        for entry in self.versions:
            if entry.state == State.READY:
                return entry
        return None

    @property
    def state(self) -> State:
        if self.unloaded:
            return State.UNLOADED
        if self.default is not None:
            return State.READY
        if any(v.state == State.LOADING for v in self.versions):
            return State.LOADING
        if not self.reason and any(v.state == State.UNLOADING for v in self.versions):
            return State.UNLOADING
        return State.FAILED

    @property
    def failure(self) -> str:
        if self.reason:
            return self.reason
        failed = [f"version {v.version}: {v.reason}" for v in self.versions if v.state == State.FAILED]
        if self.warning:
            failed.append(self.warning)
        return "; ".join(failed)

    def serving(self) -> str:
        """The versions ready, for messages: "2, 1" or "none"."""
        return ", ".join(str(v.version) for v in self.versions if v.state == State.READY) or "none"


class ModelRepository:
    """All models of one repository directory: their loading, changes, and lookup on the request path."""

    def __init__(
        self,
        root: Path,
        metrics: Metrics,
        *,
        max_bytes: int,
        inference_threads: int,
        control: Control = "none",
        grace: float = 10.0,
        loop_load: LoopLoad | None = None,
    ) -> None:
        """`loop_load` measures how busy the event loop is, for the adaptive batchers (the server's own,
        which leaves the loop's spinning out; by default a new one)."""
        self.root = root
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.inference_threads = inference_threads
        self.control: Control = control
        self.grace = grace
        """Seconds a version being unloaded gets to answer what it holds."""
        self.models: dict[str, ModelEntry] = {}
        # Request-path lookups: (name) -> default servable, (name, version) -> servable.
        self._default: dict[str, Servable] = {}
        self._pinned: dict[tuple[str, int], Servable] = {}
        self._held: dict[Servable, int] = {}
        self._retiring: dict[Servable, asyncio.Event] = {}
        self._plans: dict[str, Plan] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._closing = False
        self.on_change: Callable[[], Awaitable[None]] | None = None
        """Called after any model changed state once loading is over (grpc.health.v1 follows it)."""
        metrics.model_states = self._state_samples
        self.loaded = False
        self.thread_hop = 0.0
        self.loop_load = loop_load if loop_load is not None else LoopLoad()

    # -- start-up ---------------------------------------------------------------------------------------

    def scan(self) -> None:
        """Finds model directories and versions and validates configs; loads nothing yet."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        for path in self._model_dirs():
            entry = ModelEntry(path.name, path)
            self.models[entry.name] = entry
            try:
                plan = self._plan(path, None, warn=True)
            except ConfigError as exc:
                self._fail(entry, str(exc))
                continue
            entry.config = plan.config
            entry.snapshot = _files(path)
            entry.versions = [VersionEntry(v, p) for v, p in sorted(plan.versions.items(), reverse=True)]
            self._plans[entry.name] = plan

    def _model_dirs(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir() and _MODEL_NAME.fullmatch(p.name))

    def _fail(self, entry: ModelEntry, reason: str) -> None:
        """Keeps a model's failure for callers, without the server's directories; the log has them."""
        entry.reason = public_text(reason, self.root)
        log.error("model %s (%s) failed: %s", entry.name, entry.path, reason)

    async def load(self) -> None:
        """Loads every version in worker threads, so Health answers while big models load."""
        self.thread_hop = await measure_thread_hop()
        log.info("thread hand-off costs %.0f µs here: batches predicted faster run on the event loop",
                 self.thread_hop * 1e6)  # fmt: skip
        plans, self._plans = self._plans, {}
        await asyncio.gather(*(self._first(self.models[n], plan) for n, plan in plans.items()))
        self.loaded = True

    async def _first(self, entry: ModelEntry, plan: Plan) -> None:
        async with entry.lock:  # a load call may come in while the repository is still loading
            await self._apply(entry, plan, retry=True)

    # -- building versions ------------------------------------------------------------------------------

    def _plan(self, path: Path, override: ModelConfig | None, *, warn: bool = False) -> Plan:
        """Reads a model directory: its config (or the override) and the versions its policy serves."""
        config_file = path / CONFIG_FILE
        if override is not None:
            shown = "parameter 'config'"  # as the load request named it
            config = override
            config_print: Fingerprint = (("<override>", hash(override.model_dump_json()), 0),)
        else:
            shown = f"{path.name}/{CONFIG_FILE}"
            config = load_config(config_file, shown=shown)
            config_print = _files(config_file) if config_file.exists() else ()
        found: dict[int, Path] = {}
        try:
            children = list(path.iterdir())
        except OSError as exc:
            raise ConfigError(f"{path.name}/: cannot read: {exc.strerror or type(exc).__name__}") from None
        for child in children:
            if child.is_dir() and child.name.isdigit():
                found[int(child.name)] = child
            elif child.is_dir():
                config_print += _files(child)
                if warn:
                    log.warning(
                        "model %s: ignoring %s: version directories are named by integers", path.name, child
                    )
            elif child != config_file:
                config_print += _files(child)  # shared files (a tokenizer, say) belong to every version
        if isinstance(config.versions, list):
            missing = sorted(set(config.versions) - set(found))
            if missing:
                raise ConfigError(
                    f"{shown}: field 'versions': no directory for version(s) {missing} "
                    f"(found: {sorted(found) or 'none'})"
                )
        wanted = choose_versions(config.versions, list(found))
        if not wanted:
            raise ConfigError(f"{path.name}/: no version directory (<model>/<integer>/) found")
        return Plan(
            config,
            {v: found[v] for v in wanted},
            config_print,
            {v: _files(found[v]) for v in wanted},
        )

    def _sessions(self) -> int:
        """Sessions that share the server's inference threads, counting every version a policy serves."""
        return sum(
            e.config.execution.instances * max(1, sum(v.state != State.UNLOADED for v in e.versions))
            for e in self.models.values()
            if e.config is not None and not e.unloaded
        )

    async def _build_version(
        self, name: str, config: ModelConfig, version: int, path: Path
    ) -> tuple[Servable | None, str]:
        """A ready servable (its scheduler started), or None and why it could not be built."""
        context = PluginContext(
            model=name,
            version=version,
            model_dir=path.parent,
            version_dir=path,
            config=config,
            inference_threads=self.inference_threads,
            sessions=self._sessions(),
        )
        started = time.monotonic()
        try:
            servable = await self._build_in_thread(context)
        except LoadError as exc:
            # The cause (a model's load() or warm-up raising, say) keeps its traceback in the log.
            log.error("model %s version %d (%s) failed to load: %s", name, version, path, exc,
                      exc_info=exc.__cause__)  # fmt: skip
            return None, context.public(str(exc))
        except Exception:
            log.exception("model %s version %d (%s) failed to load", name, version, path)
            return None, "unexpected error while loading; the server log has the details"
        servable.scheduler.start()
        self.metrics.model(name, version).schedulers.append(servable.scheduler)
        model = servable.model
        # "runs": the pool threads spin within runs only (execution.spin).
        spinning = "runs" if model.spinning and config.execution.spin == "runs" else model.spinning
        log.info(
            "model loaded name=%s version=%d providers=%s instances=%d threads=%d spinning=%s "
            "max_batch_size=%d %s load_ms=%.0f",
            name, version, ",".join(model.providers), model.instances, model.threads,
            spinning, model.max_batch_size, model.describe(), (time.monotonic() - started) * 1000,
        )  # fmt: skip
        return servable, ""

    async def _build_in_thread(self, context: PluginContext) -> Servable:
        """`_build` in a worker thread. The event loop does not spin beside it (a model loading, warming up
        and being timed needs the cores): the hold ends when the thread is done, or when the build is
        cancelled before its thread started.

        A thread cannot be stopped: if the build is cancelled (the server stops while the model loads), the
        servable it still makes is closed as soon as it exists, so the model's `close()` runs and its
        sessions and threads are let go."""
        spin = self.loop_load.spin
        loading = object()
        started = False
        lock = threading.Lock()
        abandoned = False
        made: Servable | None = None

        def build() -> Servable:
            nonlocal started, made
            started = True
            try:
                servable = self._build(context)
            finally:
                if spin is not None:
                    spin.release(loading)
            with lock:
                if not abandoned:
                    made = servable
                    return servable
            _close_unused(servable, context)  # nobody waits for it any more
            return servable

        if spin is not None:
            spin.hold(loading)
        try:
            return await asyncio.to_thread(build)
        except asyncio.CancelledError:
            if not started and spin is not None:
                spin.release(loading)
            with lock:
                abandoned = True
                built = made  # made just before the cancellation: its result is never read
            if built is not None:
                _close_unused(built, context)
            raise

    def _build(self, context: PluginContext) -> Servable:
        config = context.config
        pre: list[tuple[str, Preprocessor]] = [
            (f"preprocess[{i}] ('{ref.name}')", build("preprocessors", ref, f"preprocess[{i}]", context))
            for i, ref in enumerate(config.preprocess)
        ]
        post: list[tuple[str, Postprocessor]] = [
            (f"postprocess[{i}] ('{ref.name}')", build("postprocessors", ref, f"postprocess[{i}]", context))
            for i, ref in enumerate(config.postprocess)
        ]
        return self._servable(context, pre, post)

    def _servable(
        self,
        context: PluginContext,
        pre: list[tuple[str, Preprocessor]],
        post: list[tuple[str, Postprocessor]],
    ) -> Servable:
        name, config = context.model, context.config
        model = load_model(context)
        inline = config.execution.inline_max_us
        runner = ModelRunner(
            model,
            self.thread_hop if inline is None else inline / 1e6,
            self.loop_load.spin,
            self.loop_load.lone,
            config.execution.lone_on_loop_max_ms / 1e3,
            self.metrics.model(name, context.version).places,
        )
        scheduler = make_scheduler(runner, self.metrics.model(name, context.version), self.loop_load)
        try:
            servable = Servable(model, runner, scheduler, self.max_bytes, pre, post)
        except Exception:
            runner.close()
            model.close()
            raise
        try:
            servable.warm_up(context)
            # The runtime learns whether the model runs on the event loop (the onnx runtime then stops
            # spinning); a runtime that changed how it runs is warmed and measured again.
            instances = model.instances
            if model.tune(runner.inline_at_one_row()):
                if model.instances == instances:
                    servable.warm_up(context)
                else:
                    # More instances (the onnx runtime's elastic threads): instance 0 still runs on the
                    # session just measured, so the inline decision stands; a second measurement near the
                    # limit could otherwise put a one-thread run of instance 1 on the event loop.
                    runner.resize()
                    servable.scheduler = make_scheduler(
                        runner, self.metrics.model(name, context.version), self.loop_load
                    )
                    servable.warm_up(context, calibrate=False)
        except LoadError:
            servable.close()
            raise
        except Exception as exc:
            servable.close()
            raise LoadError(f"warm-up failed: {type(exc).__name__}: {exc}") from exc
        return servable

    # -- changing what serves ---------------------------------------------------------------------------

    async def _discard(self, servable: Servable) -> None:
        """Stops and closes a version that was built but never served."""
        await servable.scheduler.drain(0.0)
        servable.close()
        self._forget(servable)

    def _forget(self, servable: Servable) -> None:
        """The metrics stop reading the scheduler of a version that is gone (and stop holding it)."""
        schedulers = self.metrics.model(servable.name, servable.version).schedulers
        if servable.scheduler in schedulers:
            schedulers.remove(servable.scheduler)

    async def _apply(self, entry: ModelEntry, plan: Plan, *, retry: bool) -> list[str]:
        """Builds what `plan` asks for while the current versions serve, then moves traffic in one step.

        Versions whose config and files are unchanged keep serving as they are (and, unless `retry`, failed
        ones are not tried again). If nothing the plan asks for is ready and something served before, the
        change is refused: the old versions keep serving. Returns the failures, for the caller's message.
        """
        config_changed = plan.config_print != entry.config_print
        current = {v.version: v for v in entry.versions}
        builds: dict[int, Path] = {}
        for version, path in plan.versions.items():
            now = current.get(version)
            unchanged = (
                now is not None and not config_changed and now.fingerprint == plan.version_prints[version]
            )
            if (
                unchanged
                and now is not None
                and (now.state == State.READY or (now.state == State.FAILED and not retry))
            ):
                continue
            builds[version] = path
            if now is None or now.state != State.READY:
                current[version] = VersionEntry(version, path)  # LOADING, shown by Health meanwhile
        entry.versions = sorted(current.values(), key=lambda v: v.version, reverse=True)
        entry.unloaded = False
        tasks = [
            asyncio.ensure_future(self._build_version(entry.name, plan.config, v, p))
            for v, p in builds.items()
        ]
        try:
            results = await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            # Stopped while loading: gather cancelled the builds still going (each closes what its thread
            # goes on to make); the versions that had finished are closed here, never served.
            await asyncio.wait(tasks)
            for task in tasks:
                if not task.cancelled() and task.exception() is None:
                    servable, _ = task.result()
                    if servable is not None:
                        await self._discard(servable)
            raise
        built = {v: s for v, (s, _) in zip(builds, results, strict=True) if s is not None}
        if self._closing:
            for servable in built.values():  # the server stopped while they loaded: never served
                await self._discard(servable)
            return []
        failed = {v: r for v, (s, r) in zip(builds, results, strict=True) if s is None}
        failures = [f"version {v}: {r}" for v, r in sorted(failed.items(), reverse=True)]
        ready_after = set(built) | {
            v for v in plan.versions if v not in builds and current[v].state == State.READY
        }
        serving = {v for v, e in current.items() if e.state == State.READY}
        if not ready_after and serving:
            # A broken change never replaces a working model: what served keeps serving.
            for version, reason in failed.items():
                now = current[version]
                if now.state != State.READY:
                    now.state, now.reason = State.FAILED, reason
            entry.warning = "not changed, still serving version(s) " + ", ".join(
                str(v) for v in sorted(serving, reverse=True)
            )
            entry.versions = sorted(current.values(), key=lambda v: v.version, reverse=True)
            log.error("model %s: the change failed (%s); %s", entry.name, "; ".join(failures), entry.warning)
            await self._changed()
            return failures
        retire: list[tuple[VersionEntry | None, Servable]] = []
        versions: dict[int, VersionEntry] = {}
        for version, path in plan.versions.items():
            now = current[version]
            if version in built:
                if now.servable is not None:
                    retire.append((None, now.servable))  # the same version, rebuilt: the old one drains
                versions[version] = VersionEntry(
                    version, path, State.READY, servable=built[version],
                    fingerprint=plan.version_prints[version],
                )  # fmt: skip
            elif version in failed and now.state == State.READY:
                versions[version] = now  # its rebuild failed: the working one keeps serving
            elif version in failed:
                versions[version] = VersionEntry(
                    version, path, State.FAILED, failed[version], fingerprint=plan.version_prints[version]
                )
            else:
                versions[version] = now
        for version, now in current.items():
            if version not in plan.versions and now.servable is not None and now.state == State.READY:
                now.state = State.UNLOADING
                versions[version] = now
                retire.append((now, now.servable))
        entry.config = plan.config
        entry.config_print = plan.config_print
        entry.reason = ""
        entry.warning = "; ".join(
            f"version {v}: rebuild failed, the previous build serves" for v in failed if v in serving
        )
        entry.versions = sorted(versions.values(), key=lambda v: v.version, reverse=True)
        self._publish(entry)
        for version_entry, servable in retire:
            self._spawn(self._retire(entry, version_entry, servable))
        await self._changed()
        return failures

    def _publish(self, entry: ModelEntry) -> None:
        """Points the request path's lookups at the model's ready versions, in one step of the event loop."""
        name = entry.name
        for key in [key for key in self._pinned if key[0] == name]:
            del self._pinned[key]
        ready = [v for v in entry.versions if v.state == State.READY and v.servable is not None]
        for v in ready:
            assert v.servable is not None
            self._pinned[(name, v.version)] = v.servable
        if ready and ready[0].servable is not None:
            self._default[name] = ready[0].servable
        else:
            self._default.pop(name, None)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, entry: ModelEntry, version: VersionEntry | None, servable: Servable) -> None:
        """Frees a servable no lookup returns any more, once the requests that hold it are answered."""
        deadline = time.monotonic() + self.grace
        if servable in self._held:
            done = self._retiring[servable] = asyncio.Event()
            try:
                async with asyncio.timeout(self.grace):
                    await done.wait()
            except TimeoutError:
                log.warning(
                    "model %s version %d: %d requests unanswered after %.1fs of unloading",
                    servable.name, servable.version, self._held.get(servable, 0), self.grace,
                )  # fmt: skip
            finally:
                self._retiring.pop(servable, None)
        await servable.scheduler.drain(max(0.0, deadline - time.monotonic()))
        servable.close()
        self._forget(servable)
        if version is not None:
            version.state, version.reason, version.servable = State.UNLOADED, "unloaded", None
        log.info("model unloaded name=%s version=%d", servable.name, servable.version)
        await self._changed()

    async def _changed(self) -> None:
        if self.loaded and self.on_change is not None:
            await self.on_change()

    async def load_model(self, name: str, override: ModelConfig | None = None) -> None:
        """Loads a model, or reloads what changed in it; returns once what it asks for is ready.

        Raises NOT_FOUND for a name with no directory, FAILED_PRECONDITION when the model (or part of it)
        could not be loaded: what served before keeps serving.
        """
        path = self.root / name
        if not _MODEL_NAME.fullmatch(name) or not path.is_dir():
            have = ", ".join(f"'{p.name}'" for p in self._model_dirs()) or "none"
            raise not_found(f"the repository has no model directory '{clip(name)}'; it has {have}")
        await self._refresh(self.models.get(name) or self._add(name, path), override, retry=True)

    def _add(self, name: str, path: Path) -> ModelEntry:
        entry = self.models[name] = ModelEntry(name, path)
        return entry

    async def _refresh(self, entry: ModelEntry, override: ModelConfig | None, *, retry: bool) -> None:
        async with entry.lock:
            entry.override = override
            entry.snapshot = _files(entry.path)
            try:
                plan = self._plan(entry.path, override)
            except ConfigError as exc:
                reason = public_text(str(exc), self.root)
                log.error("model %s (%s): %s", entry.name, entry.path, exc)
                if entry.state == State.READY:
                    entry.warning = f"not changed: {reason}; still serving version(s) {entry.serving()}"
                else:
                    entry.reason, entry.unloaded = reason, False
                await self._changed()
                # An override is the caller's own mistake; a broken repository is a state the caller can fix.
                code = Code.INVALID_ARGUMENT if override is not None else Code.FAILED_PRECONDITION
                raise SluiceError(code, f"model '{entry.name}': {reason}") from None
            failures = await self._apply(entry, plan, retry=retry)
        if failures:
            raise SluiceError(
                Code.FAILED_PRECONDITION,
                f"model '{entry.name}' failed to load {'; '.join(failures)}; serving version(s) "
                f"{entry.serving()}",
            )

    async def unload_model(self, name: str) -> None:
        """Unloads every version of a model: none takes new requests; returns once the sessions are freed."""
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(f"'{n}'" for n in self.models) or "none"
            raise not_found(f"no model named '{clip(name)}'; the repository has {known}")
        async with entry.lock:
            await self._unload(entry)

    async def _unload(self, entry: ModelEntry) -> None:
        live = [v for v in entry.versions if v.state == State.READY and v.servable is not None]
        for v in live:
            v.state = State.UNLOADING
        self._publish(entry)
        await asyncio.gather(*(self._retire(entry, v, v.servable) for v in live if v.servable is not None))
        for v in entry.versions:
            v.state, v.reason, v.servable = State.UNLOADED, "unloaded", None
        entry.unloaded, entry.warning, entry.config_print = True, "", ()
        await self._changed()

    # -- polling ----------------------------------------------------------------------------------------

    def start_polling(self, interval: float) -> None:
        """Re-scans the repository every `interval` seconds until `close()`."""
        self._poller = asyncio.create_task(self._poll_forever(interval))

    async def _poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:
                log.exception("polling the model repository %s failed", self.root)

    async def poll(self) -> None:
        """One scan: new models and versions load, removed ones unload, changed ones reload."""
        if not self.root.is_dir():
            log.error("model repository %s is not a directory any more; nothing changed", self.root)
            return
        on_disk = {p.name: p for p in self._model_dirs()}
        jobs = []
        for name, path in on_disk.items():
            entry = self.models.get(name)
            if entry is None:
                entry = self._add(name, path)
            jobs.append(self._poll_one(entry))
        for name, entry in self.models.items():
            if name not in on_disk and not entry.unloaded:
                jobs.append(self._remove(entry))
        await asyncio.gather(*jobs)

    async def _poll_one(self, entry: ModelEntry) -> None:
        if not entry.unloaded and _files(entry.path) == entry.snapshot:
            return  # nothing changed: a broken model is reported once, not at every poll
        try:
            await self._refresh(entry, None, retry=False)
        except SluiceError as exc:
            log.error("poll: %s", exc.message)

    async def _remove(self, entry: ModelEntry) -> None:
        async with entry.lock:
            await self._unload(entry)
            entry.reason = "removed from the repository"
        log.info("model %s removed from the repository: unloaded", entry.name)

    async def close(self) -> None:
        """Stops polling and waits for the versions being unloaded to be freed; nothing changes after."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- the request path -------------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None) -> Servable:
        """The servable a request names; NOT_FOUND or UNAVAILABLE (with the reason) otherwise."""
        servable = self._default.get(name) if version is None else self._pinned.get((name, version))
        if servable is not None:
            return servable
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(f"'{n}'" for n in self.models) or "none"
            raise not_found(f"no model named '{clip(name)}'; the repository has {known}")
        state = entry.state
        if state in (State.UNLOADED, State.UNLOADING):
            why = entry.reason if entry.reason and state == State.UNLOADED else "it was unloaded"
            raise not_found(f"model '{name}' is not loaded: {why}")
        if entry.reason:
            raise unavailable(f"model '{name}' failed to load: {entry.reason}")
        if version is None:
            if state == State.LOADING:
                raise unavailable(f"model '{name}' is still loading")
            raise unavailable(f"model '{name}' has no version ready: {entry.failure}")
        found = next((v for v in entry.versions if v.version == version), None)
        if found is None or found.state in (State.UNLOADING, State.UNLOADED):
            raise not_found(f"model '{name}' has no version {version}; it has {entry.serving()}")
        if found.state == State.LOADING:
            raise unavailable(f"model '{name}' version {version} is still loading")
        raise unavailable(f"model '{name}' version {version} failed to load: {found.reason}")

    def hold(self, servable: Servable) -> None:
        """Counts a request that resolved `servable` and has not been answered: unloading waits for it."""
        self._held[servable] = self._held.get(servable, 0) + 1

    def release(self, servable: Servable) -> None:
        left = self._held[servable] - 1
        if left:
            self._held[servable] = left
            return
        del self._held[servable]
        done = self._retiring.get(servable)
        if done is not None:
            done.set()

    def servables(self) -> list[Servable]:
        """Every servable that takes requests now."""
        return list(self._pinned.values())

    def _state_samples(self) -> list[tuple[str, str, str]]:
        """Every version's state for /metrics; a model with no version (a broken config) as version ""."""
        samples = []
        for entry in list(self.models.values()):
            versions = list(entry.versions)
            if not versions:
                samples.append((entry.name, "", entry.state.name))
            samples += [(entry.name, str(v.version), v.state.name) for v in versions]
        return samples

    def states(self) -> dict[str, State]:
        return {name: entry.state for name, entry in self.models.items()}

    def status(self, name: str | None = None) -> list[pb.ModelStatus]:
        """Health's view of every model (or one); models unloaded on purpose are left out of the list."""
        if name:
            if name not in self.models:
                raise not_found(f"no model named '{clip(name)}'")
            entries = [self.models[name]]
        else:
            entries = [e for e in self.models.values() if not e.unloaded]
        out = []
        for entry in entries:
            versions = [
                v.servable.status()
                if v.servable is not None and v.state == State.READY
                else pb.ModelVersionStatus(
                    version=v.version,
                    state=v.state.value,  # type: ignore[arg-type]
                    reason=v.reason,
                )
                for v in entry.versions
                if v.state != State.UNLOADED
            ]
            state = entry.state
            reason = entry.failure if state == State.FAILED else entry.warning
            if state == State.UNLOADED:
                reason = entry.reason or "unloaded"
            out.append(pb.ModelStatus(name=entry.name, state=state.value, reason=reason, versions=versions))
        return out


def _files(path: Path) -> Fingerprint:
    """A file, or every file under a directory, as (path, size, mtime in ns)."""
    try:
        if path.is_file():
            stat = path.stat()
            return ((str(path), stat.st_size, stat.st_mtime_ns),)
        found = []
        for item in sorted(path.rglob("*")):
            if item.is_file():
                stat = item.stat()
                found.append((str(item), stat.st_size, stat.st_mtime_ns))
        return tuple(found)
    except OSError:
        return ()  # gone while being read: the next poll sees what is left


def _close_unused(servable: Servable, context: PluginContext) -> None:
    """Closes a servable built for nobody (its load was cancelled); a failure is logged, not raised, so that
    it cannot replace the cancellation."""
    try:
        servable.close()
    except Exception:
        log.exception("model %s version %d: closing it after a cancelled load failed", context.model,
                      context.version)  # fmt: skip
