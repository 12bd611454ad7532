"""What the KServe v2 and Triton RPCs say about a model: metadata, configuration, statistics, index.

Everything is read from what Sluice already keeps: the servable's signature, the model's config.toml, and
the metrics the batcher and the servicers record. Statistics are per model version and exact; `docs/kserve.md`
says what each step of a request's time covers.
"""

from __future__ import annotations

import math

from sluice.kserve.v2 import grpc_service_pb2 as kpb
from sluice.kserve.v2 import model_config_pb2 as mc
from sluice.server.config import LatestVersions
from sluice.server.kserve_tensors import tensor_metadata, triton_type
from sluice.server.metrics import Metrics
from sluice.server.pipeline import Servable
from sluice.server.plugins import TensorSpec
from sluice.server.repository import ModelEntry, State

# Triton's names for the runtimes it shares with Sluice: (platform, backend).
_PLATFORMS = {"onnx": ("onnxruntime_onnx", "onnxruntime")}
# Triton's words for a version's state in RepositoryIndex; a failed or unloaded one is UNAVAILABLE.
_STATES = {State.READY: "READY", State.LOADING: "LOADING", State.UNLOADING: "UNLOADING"}
_NS = 1e9


def platform(servable: Servable) -> tuple[str, str]:
    """Triton's platform and backend names for a servable's runtime; other runtimes go by their own name."""
    runtime = servable.model.config.runtime.name
    return _PLATFORMS.get(runtime, (runtime, runtime))


def metadata(servable: Servable, entry: ModelEntry) -> kpb.ModelMetadataResponse:
    """Versions ready to answer, the platform, and the callers' signature with the batch dimension as -1."""
    return kpb.ModelMetadataResponse(
        name=servable.name,
        versions=[str(v.version) for v in entry.versions if v.state == State.READY],
        platform=platform(servable)[0],
        inputs=[tensor_metadata(spec) for spec in servable.inputs],
        outputs=[tensor_metadata(spec) for spec in servable.outputs],
    )


def config(servable: Servable) -> mc.ModelConfig:
    """The configuration in Triton's terms: with max_batch_size > 0, dims leave the batch dimension out."""
    model = servable.model
    settings = model.config
    batches = model.max_batch_size > 0
    name, backend = platform(servable)
    out = mc.ModelConfig(
        name=servable.name,
        platform=name,
        backend=backend,
        max_batch_size=model.max_batch_size,
        input=[
            mc.ModelInput(name=s.name, data_type=triton_type(s.datatype), dims=_dims(s, batches))
            for s in servable.inputs
        ],
        output=[
            mc.ModelOutput(
                name=s.name,
                data_type=triton_type(s.datatype),
                dims=_dims(s, batches),
                label_filename=_label_file(servable, s),
            )
            for s in servable.outputs
        ],
    )
    policy = settings.versions
    if isinstance(policy, LatestVersions):
        out.version_policy.latest.num_versions = policy.latest
    elif isinstance(policy, list):
        out.version_policy.specific.versions.extend(policy)
    else:
        out.version_policy.all.SetInParent()
    if batches and settings.batching.policy != "none":
        out.dynamic_batching.max_queue_delay_microseconds = round(settings.batching.max_delay_ms * 1000)
    gpu = any(p.startswith("CUDA") for p in model.providers)
    out.instance_group.append(
        mc.ModelInstanceGroup(
            name=servable.name,
            kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
            count=model.instances,
            gpus=[settings.execution.cuda_device] if gpu else [],
        )
    )
    return out


def _dims(spec: TensorSpec, batches: bool) -> tuple[int, ...]:
    return spec.shape[1:] if batches else spec.shape


def statistics(
    servable: Servable, version: str, metrics: Metrics, last_inference_ms: int
) -> kpb.ModelStatistics:
    """Cumulative statistics of one model version, exact: every figure is summed as it happens.

    Each request answered OK counts once in success, queue, compute_input, compute_infer and
    compute_output, with its own times; each batch size's runs count once per run (see docs/kserve.md).
    """
    stats = kpb.ModelStatistics(name=servable.name, version=version, last_inference=last_inference_ms)
    outcome = metrics.outcomes.get((servable.name, str(servable.version)))
    if outcome is None:
        return stats
    infer = stats.inference_stats
    ok = outcome.ok
    infer.success.CopyFrom(_duration(ok, outcome.ok_s))
    infer.fail.CopyFrom(_duration(outcome.failed, outcome.failed_s))
    infer.queue.CopyFrom(_duration(ok, outcome.queue_s))
    infer.compute_input.CopyFrom(_duration(ok, outcome.assemble))
    infer.compute_infer.CopyFrom(_duration(ok, outcome.run_s))
    infer.compute_output.CopyFrom(_duration(ok, outcome.split_s))
    # A request no batcher ran is one run of one inference (a model without a batch dimension).
    stats.inference_count = outcome.rows + outcome.unbatched
    measured = metrics.models.get((servable.name, servable.version))
    runs = {} if measured is None else dict(measured.runs)
    stats.execution_count = outcome.unbatched + sum(size.count for size in runs.values())
    if outcome.unbatched:
        stats.batch_stats.append(
            kpb.InferBatchStatistics(
                batch_size=1,
                compute_input=_duration(outcome.unbatched, 0.0),
                compute_infer=_duration(outcome.unbatched, 0.0),
                compute_output=_duration(outcome.unbatched, 0.0),
            )
        )
    for rows in sorted(runs):
        size = runs[rows]
        stats.batch_stats.append(
            kpb.InferBatchStatistics(
                batch_size=rows,
                compute_input=_duration(size.count, size.assemble),
                compute_infer=_duration(size.count, size.run),
                compute_output=_duration(size.count, size.split),
            )
        )
    return stats


def _duration(count: int, seconds: float) -> kpb.StatisticDuration:
    return kpb.StatisticDuration(count=count, ns=max(0, math.floor(seconds * _NS)))


def index(entries: list[ModelEntry], ready_only: bool) -> kpb.RepositoryIndexResponse:
    """Every model version with its state; a model whose directory or config failed has one entry, and so
    has a model unloaded before any version loaded."""
    out = kpb.RepositoryIndexResponse()
    for entry in entries:
        if not entry.versions and not ready_only:
            reason = (entry.reason or "unloaded") if entry.unloaded else entry.failure
            out.models.add(name=entry.name, state="UNAVAILABLE", reason=reason)
        for v in entry.versions:
            state = _STATES.get(v.state, "UNAVAILABLE")
            if ready_only and state != "READY":
                continue
            out.models.add(name=entry.name, version=str(v.version), state=state, reason=v.reason)
    return out


def _label_file(servable: Servable, spec: TensorSpec) -> str:
    """The output's labels file as config.toml names it (Triton's label_filename), or "" (none, or an
    output a postprocessor gives, which the model's labels do not name)."""
    if spec.name not in servable.labels:
        return ""
    override = servable.model.config.outputs.get(spec.graph_name)
    return override.labels if override is not None and override.labels is not None else ""
