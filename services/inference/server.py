"""Wires an inference node together: models, servicer, gRPC server, draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import asdict

import grpc

from services.common import serving
from services.common.interceptors import ErrorMapping
from services.common.internal_auth import InternalAuth
from services.common.metrics import RpcMetrics
from services.common.metrics import serve as serve_metrics
from services.inference import metrics
from services.inference.models import ModelCatalog, ModelError, requested_providers
from services.inference.recycling import RecyclePolicy, rss_bytes
from services.inference.runtimes import CPU_PROVIDER, CUDA_PROVIDER
from services.inference.selection import RuntimeSelector
from services.inference.service import InferenceServicer
from services.inference.settings import NodeSettings
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "cutout.internal.v1.InferenceService"


def session_runs(configured: int, providers: list[str], capacity: int) -> int:
    """Session runs at once per model: on the CPU one, on an accelerator one per job slot.

    On CPU cores one run with every core beats concurrent runs splitting them
    (measured on the 2-core box: 0.376-0.385 against 0.311-0.360 images/s),
    and the node's other jobs still decode and encode beside it. On an
    accelerator the runs do not split CPU cores, so each slot runs its own
    (not measured here: no GPU was available to this project).
    """
    if configured:
        return configured
    on_cpu = not providers or providers[0] == "CPUExecutionProvider"
    return 1 if on_cpu else capacity


def cpu_threads_per_run(runs: int) -> int:
    """Intra-op threads per session run so that `runs` concurrent runs share the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // runs)


def runtime_selector(s: NodeSettings) -> tuple[RuntimeSelector | None, list[str]]:
    """The runtime selector, or none where CUTOUT_PROVIDERS names ONNX Runtime providers.

    The providers returned decide session runs at once (a GPU's first, or the CPU's).
    Raises RuntimeUnavailable (naming what the host runs) for a runtime it cannot run.
    """
    if s.providers != "auto":
        if s.runtime != "auto" or s.precision != "auto":
            raise ModelError(
                "CUTOUT_PROVIDERS lists ONNX Runtime providers; it cannot be combined with "
                "CUTOUT_RUNTIME or CUTOUT_PRECISION: set one or the other"
            )
        return None, requested_providers(s.providers)
    selector = RuntimeSelector(
        s.runtime, s.precision, s.runtime_probe_s, trt_cache_dir=s.trt_cache_dir
    )
    return selector, [CUDA_PROVIDER if selector.on_gpu else CPU_PROVIDER]


class NodeServer:
    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.server = grpc.aio.server(
            options=serving.server_options(settings.max_message_bytes),
            # Only the scheduler (holding the internal token) may run jobs here.
            interceptors=[RpcMetrics(), ErrorMapping(), InternalAuth(settings.internal_token)],
        )
        self.health = serving.add_health_and_reflection(self.server, [SERVICE_NAME])
        self.servicer: InferenceServicer | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        s = self.settings
        selector, providers = runtime_selector(s)
        runs = session_runs(s.session_runs, providers, s.capacity)
        threads = s.ort_threads or cpu_threads_per_run(runs)
        # Loading (and timing the runtimes) takes seconds; keep the event loop free meanwhile.
        catalog = await asyncio.to_thread(
            ModelCatalog.load, s.model_dir, s.models, providers, threads, runs, selector
        )
        if s.require_gpu:
            on_cpu = [m.name for m in catalog.models.values() if m.runtime.device == "cpu"]
            if on_cpu:
                raise ModelError(f"CUTOUT_REQUIRE_GPU is on but {on_cpu} run on the CPU")
        self.servicer = InferenceServicer(
            catalog,
            s.node_id,
            s.capacity,
            s.max_pixels,
            light_capacity=s.light_capacity,
            prefetch=s.prefetch,
            recycle=RecyclePolicy(s.max_rss_mb * 2**20),
            # The selector remembers each model's runtime: a reload does not time them again.
            reload=lambda: ModelCatalog.load(
                s.model_dir, s.models, providers, threads, runs, selector
            ),
            progress_hold_s=s.progress_hold_ms / 1000,
        )
        metrics.describe_models(catalog)
        metrics.CAPACITY.set(s.capacity)
        metrics.LIGHT_CAPACITY.set(s.light_capacity)
        metrics.RSS.set_function(rss_bytes)
        self.metrics_port = serve_metrics(s.metrics_listen)
        pb_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        self.port = serving.bind(self.server, s.listen)
        await self.server.start()
        await serving.set_serving(self.health, [SERVICE_NAME], True)
        serving.write_ready_file(s.ready_file, self.port)
        log.info(
            "node serving",
            extra={
                "port": self.port,
                "metrics_port": self.metrics_port,
                "node": s.node_id,
                "models": list(catalog.models),
                "runtimes": {m.name: asdict(m.runtime) for m in catalog.models.values()},
            },
        )

    async def stop(self) -> None:
        """Drain: take nothing new, finish what is running, then stop."""
        await serving.set_serving(self.health, [SERVICE_NAME], False)
        if self.servicer is not None:
            self.servicer.draining = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.servicer.wait_idle(), self.settings.grace_s)
        await self.server.stop(grace=2.0)
        if self.servicer is not None:
            self.servicer.shutdown()
