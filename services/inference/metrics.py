"""An inference node's Prometheus metrics (RPC counts come from services.common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.inference.models import ModelCatalog

NODE_JOBS = Counter(
    "cutout_node_jobs_total",
    "Attempts this node ran, by operation and outcome: succeeded, invalid, error, cancelled",
    ["operation", "outcome"],
)
PROCESS_SECONDS = Histogram(
    "cutout_node_process_seconds",
    "Decode, inference and encode of one attempt on this node",
    ["operation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge("cutout_node_jobs_in_flight", "Attempts running on this node now")
CAPACITY = Gauge("cutout_node_jobs_capacity", "Attempts this node takes at once")
LIGHT_CAPACITY = Gauge(
    "cutout_node_light_jobs_capacity", "Light jobs (transforms, ID/square crops) taken at once"
)
RSS = Gauge("cutout_node_resident_memory_bytes", "Resident memory of the node process")
RECYCLES = Counter(
    "cutout_node_session_recycles_total",
    "Times the node rebuilt its model sessions because RSS passed CUTOUT_MAX_RSS_MB",
)
EXECUTION_PROVIDER = Gauge(
    "cutout_model_execution_provider",
    "1 for the ONNX Runtime execution provider each model really runs on (none on OpenVINO)",
    ["model", "provider"],
)
MODEL_RUNTIME = Gauge(
    "cutout_model_runtime",
    "1 for what each model runs on: runtime (onnxruntime, openvino, cuda, tensorrt), "
    "device (cpu, cuda:N), precision (fp32, bf16, fp16) and host threads per run",
    ["model", "runtime", "device", "precision", "threads"],
)
PROVIDER_FALLBACK = Gauge(
    "cutout_model_provider_fallback",
    "1 when a model runs on another provider than the first one requested (GPU asked, CPU given)",
    ["model"],
)


def describe_models(catalog: ModelCatalog) -> None:
    for m in catalog.models.values():
        r = m.runtime
        MODEL_RUNTIME.labels(m.name, r.runtime, r.device, r.precision, str(r.threads)).set(1)
        if m.execution_provider:
            EXECUTION_PROVIDER.labels(m.name, m.execution_provider).set(1)
        fell_back = bool(m.requested_providers) and m.execution_provider != m.requested_providers[0]
        PROVIDER_FALLBACK.labels(m.name).set(1 if fell_back else 0)
