"""The model repository: finds models and versions on disk, loads them, and keeps their states for Health.

A broken model never takes the others down: its failure is logged with file, field and reason, kept for
Health, and returned to callers as UNAVAILABLE. The reason callers see names files relative to the repository
(`digits/1/model.onnx`); the log line next to it names the directory in full.

Runtimes are plugins found through their entry points, `onnx` included: the repository gives them neutral
facts (`PluginContext`: the inference threads and how many sessions share them) and tells them, through
`LoadedModel.tune`, whether the model runs on the event loop; how they use threads is theirs to decide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sluice.server.config import ConfigError, ModelConfig, load_config
from sluice.server.errors import clip, not_found, unavailable
from sluice.server.metrics import Metrics
from sluice.server.model import load_model
from sluice.server.pipeline import Servable
from sluice.server.plugins import LoadError, PluginContext, Postprocessor, Preprocessor, build, public_text
from sluice.server.scheduling import LoopLoad, ModelRunner, make_scheduler, measure_thread_hop
from sluice.v1 import inference_pb2 as pb

log = logging.getLogger("sluice.server")

CONFIG_FILE = "config.toml"


@dataclass
class VersionEntry:
    """One version directory and what became of it."""

    version: int
    path: Path
    state: int = pb.MODEL_STATE_LOADING
    reason: str = ""
    servable: Servable | None = None


@dataclass
class ModelEntry:
    """One model directory: its config (when valid) and its versions, highest first."""

    name: str
    path: Path
    config: ModelConfig | None = None
    reason: str = ""
    versions: list[VersionEntry] = field(default_factory=list)

    @property
    def default(self) -> VersionEntry | None:
        """The version that answers when a request pins none: the highest that is ready."""
        for entry in self.versions:
            if entry.state == pb.MODEL_STATE_READY:
                return entry
        return None

    @property
    def state(self) -> int:
        if self.config is None or self.reason:
            return pb.MODEL_STATE_FAILED
        if self.default is not None:
            return pb.MODEL_STATE_READY
        if any(v.state == pb.MODEL_STATE_LOADING for v in self.versions):
            return pb.MODEL_STATE_LOADING
        return pb.MODEL_STATE_FAILED

    @property
    def failure(self) -> str:
        if self.reason:
            return self.reason
        failed = [
            f"version {v.version}: {v.reason}" for v in self.versions if v.state == pb.MODEL_STATE_FAILED
        ]
        return "; ".join(failed)


class ModelRepository:
    """All models of one repository directory, their loading and their lookup on the request path."""

    def __init__(self, root: Path, metrics: Metrics, *, max_bytes: int, inference_threads: int) -> None:
        self.root = root
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.inference_threads = inference_threads
        self.models: dict[str, ModelEntry] = {}
        # Request-path lookups: (name) -> default servable, (name, version) -> servable.
        self._default: dict[str, Servable] = {}
        self._pinned: dict[tuple[str, int], Servable] = {}
        self.loaded = False
        self.thread_hop = 0.0
        self.loop_load = LoopLoad()

    def scan(self) -> None:
        """Finds model directories and versions and validates configs; loads nothing yet."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        for path in sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
        ):
            entry = ModelEntry(path.name, path)
            self.models[entry.name] = entry
            try:
                entry.config = load_config(path / CONFIG_FILE, shown=f"{path.name}/{CONFIG_FILE}")
            except ConfigError as exc:
                self._fail(entry, str(exc))
                continue
            versions = []
            for child in path.iterdir():
                if child.is_dir() and child.name.isdigit():
                    versions.append(int(child.name))
                elif child.is_dir():
                    log.warning(
                        "model %s: ignoring %s: version directories are named by integers", entry.name, child
                    )
            if entry.config.versions is not None:
                missing = sorted(set(entry.config.versions) - set(versions))
                if missing:
                    self._fail(
                        entry,
                        f"{path.name}/{CONFIG_FILE}: field 'versions': no directory for version(s) {missing} "
                        f"(found: {sorted(versions) or 'none'})",
                    )
                    continue
                versions = list(entry.config.versions)
            if not versions:
                self._fail(entry, f"{path.name}/: no version directory (<model>/<integer>/) found")
                continue
            entry.versions = [VersionEntry(v, path / str(v)) for v in sorted(set(versions), reverse=True)]

    def _fail(self, entry: ModelEntry, reason: str) -> None:
        """Keeps a model's failure for callers, without the server's directories; the log has them."""
        entry.reason = public_text(reason, self.root)
        log.error("model %s (%s) failed: %s", entry.name, entry.path, reason)

    async def load(self) -> None:
        """Loads every version in worker threads, so Health answers while big models load."""
        sessions = sum(
            e.config.execution.instances * len(e.versions)
            for e in self.models.values()
            if e.config is not None
        )
        self.thread_hop = await measure_thread_hop()
        log.info("thread hand-off costs %.0f µs here: batches predicted faster run on the event loop",
                 self.thread_hop * 1e6)  # fmt: skip
        jobs = [
            self._load_version(entry, version, sessions)
            for entry in self.models.values()
            if entry.config is not None and not entry.reason
            for version in entry.versions
        ]
        await asyncio.gather(*jobs)
        self.loaded = True

    async def _load_version(self, entry: ModelEntry, version: VersionEntry, sessions: int) -> None:
        assert entry.config is not None
        context = PluginContext(
            model=entry.name,
            version=version.version,
            model_dir=version.path.parent,
            version_dir=version.path,
            config=entry.config,
            inference_threads=self.inference_threads,
            sessions=sessions,
        )
        started = time.monotonic()
        try:
            servable = await asyncio.to_thread(self._build, context)
        except LoadError as exc:
            version.state, version.reason = pb.MODEL_STATE_FAILED, context.public(str(exc))
            # The cause (a model's load() or warm-up raising, say) keeps its traceback in the log.
            log.error("model %s version %d (%s) failed to load: %s", entry.name, version.version,
                      version.path, exc, exc_info=exc.__cause__)  # fmt: skip
            return
        except Exception as exc:
            version.state = pb.MODEL_STATE_FAILED
            version.reason = f"unexpected {type(exc).__name__} while loading; the server log has the details"
            log.exception(
                "model %s version %d (%s) failed to load", entry.name, version.version, version.path
            )
            return
        servable.scheduler.start()
        self.metrics.model(entry.name).schedulers.append(servable.scheduler)
        version.servable = servable
        version.state = pb.MODEL_STATE_READY
        self._pinned[(entry.name, version.version)] = servable
        default = entry.default
        if default is not None and default.servable is not None:
            self._default[entry.name] = default.servable
        model = servable.model
        log.info(
            "model loaded name=%s version=%d providers=%s instances=%d threads=%d spinning=%s "
            "max_batch_size=%d %s load_ms=%.0f",
            entry.name, version.version, ",".join(model.providers), model.instances, model.threads,
            model.spinning, model.max_batch_size, model.describe(), (time.monotonic() - started) * 1000,
        )  # fmt: skip

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
        runner = ModelRunner(model, self.thread_hop if inline is None else inline / 1e6)
        scheduler = make_scheduler(runner, self.metrics.model(name), self.loop_load)
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
            if model.tune(runner.inline_at_one_row()):
                servable.warm_up(context)
        except LoadError:
            servable.close()
            raise
        except Exception as exc:
            servable.close()
            raise LoadError(f"warm-up failed: {type(exc).__name__}: {exc}") from exc
        return servable

    def resolve(self, name: str, version: int | None) -> Servable:
        """The servable a request names; NOT_FOUND or UNAVAILABLE (with the reason) otherwise."""
        servable = self._default.get(name) if version is None else self._pinned.get((name, version))
        if servable is not None:
            return servable
        entry = self.models.get(name)
        if entry is None:
            known = ", ".join(f"'{n}'" for n in self.models) or "none"
            raise not_found(f"no model named '{clip(name)}'; the repository has {known}")
        if entry.config is None or entry.reason:
            raise unavailable(f"model '{name}' failed to load: {entry.reason}")
        if version is None:
            if entry.state == pb.MODEL_STATE_LOADING:
                raise unavailable(f"model '{name}' is still loading")
            raise unavailable(f"model '{name}' has no version ready: {entry.failure}")
        found = next((v for v in entry.versions if v.version == version), None)
        if found is None:
            have = ", ".join(str(v.version) for v in entry.versions)
            raise not_found(f"model '{name}' has no version {version}; it has {have}")
        if found.state == pb.MODEL_STATE_LOADING:
            raise unavailable(f"model '{name}' version {version} is still loading")
        raise unavailable(f"model '{name}' version {version} failed to load: {found.reason}")

    def servables(self) -> list[Servable]:
        return list(self._pinned.values())

    def status(self, name: str | None = None) -> list[pb.ModelStatus]:
        """Health's view of every model (or one)."""
        if name:
            if name not in self.models:
                raise not_found(f"no model named '{clip(name)}'")
            entries = [self.models[name]]
        else:
            entries = list(self.models.values())
        out = []
        for entry in entries:
            versions = [
                v.servable.status()
                if v.servable is not None
                else pb.ModelVersionStatus(version=v.version, state=v.state, reason=v.reason)  # type: ignore[arg-type]
                for v in entry.versions
            ]
            state = entry.state
            reason = entry.failure if state == pb.MODEL_STATE_FAILED else ""
            out.append(pb.ModelStatus(name=entry.name, state=state, reason=reason, versions=versions))  # type: ignore[arg-type]
        return out
