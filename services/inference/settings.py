"""Inference node settings, all from environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from services.common.config import (
    default_model_dir,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
)
from services.common.internal_auth import InternalToken
from services.common.serving import MiB
from services.inference.runtimes import PRECISIONS, RUNTIMES


@dataclass(frozen=True)
class NodeSettings:
    """
    Attributes:
        listen: CUTOUT_NODE_LISTEN, host:port to serve on (port 0 picks one).
        node_id: CUTOUT_NODE_ID, name in logs and GetLoad; hostname:pid by default.
        model_dir: CUTOUT_MODEL_DIR, folder of *.onnx models (default ../shared/models).
        models: CUTOUT_MODELS, comma-separated model names to load; every *.onnx when empty.
            The first is the default model.
        providers: CUTOUT_PROVIDERS, "auto" (CUDA if available, else CPU) or a comma list.
        require_gpu: CUTOUT_REQUIRE_GPU, on (1/true/yes/on) refuses to start unless models
            run on CUDA.
        runtime: CUTOUT_RUNTIME, "auto" (the fastest this host has, timed at start) or one
            of onnxruntime, openvino, cuda, tensorrt (services/inference/runtimes.py).
        precision: CUTOUT_PRECISION, "auto" (each runtime's fastest) or fp32, bf16, fp16.
        runtime_probe_s: CUTOUT_RUNTIME_PROBE_S, seconds the start-up timing of runtimes
            may take per model before the remaining candidates are passed over.
        trt_cache_dir: CUTOUT_TRT_CACHE_DIR, where TensorRT keeps built engines.
        capacity: CUTOUT_NODE_CAPACITY, inference jobs processed at once.
        light_capacity: CUTOUT_LIGHT_CAPACITY, light jobs (transforms, ID-card and square
            face crops) processed at once beside them, in their own threads.
        prefetch: CUTOUT_NODE_PREFETCH, jobs per lane that may wait on the node for a slot
            (sent ahead on a Work stream), so a freed slot starts the next job at once
            instead of after a round trip to the scheduler; the scheduler refills them in
            halves. Default: the capacity (0 = none).
        max_rss_mb: CUTOUT_MAX_RSS_MB, resident memory past which the node rebuilds its
            model sessions (0 = never).
        session_runs: CUTOUT_SESSION_RUNS, session runs at once per model (0 = one when
            the model runs on the CPU, the capacity on an accelerator). The other jobs
            decode, pre- and post-process and encode meanwhile.
        ort_threads: CUTOUT_ORT_THREADS, threads per session run, for every runtime (ONNX
            Runtime intra-op threads, OpenVINO inference threads; 0 = the node's cores divided
            by its session runs, so concurrent runs share them).
        progress_hold_ms: CUTOUT_PROGRESS_HOLD_MS, how long progress is held back before
            it is sent; a job done by then sends its stages with its output in one message.
        max_pixels: CUTOUT_MAX_PIXELS, largest input decoded, in pixels.
        max_message_bytes: CUTOUT_MAX_MESSAGE_BYTES, gRPC message limit.
        grace_s: CUTOUT_GRACE_S, how long a draining node waits for its jobs.
        metrics_listen: CUTOUT_METRICS_LISTEN, host:port of the Prometheus /metrics endpoint
            (empty: off).
        ready_file: CUTOUT_READY_FILE, file to write the bound port to once serving.
        log_level: CUTOUT_LOG_LEVEL.
        internal_token: CUTOUT_INTERNAL_TOKEN (required) and CUTOUT_INTERNAL_TOKENS_ACCEPTED:
            the shared secret of calls between the services (services/common/internal_auth.py).
    """

    listen: str
    node_id: str
    model_dir: Path
    models: list[str]
    providers: str
    require_gpu: bool
    runtime: str
    precision: str
    runtime_probe_s: float
    trt_cache_dir: Path
    capacity: int
    light_capacity: int
    prefetch: int
    max_rss_mb: int
    session_runs: int
    ort_threads: int
    progress_hold_ms: int
    max_pixels: int
    max_message_bytes: int
    grace_s: float
    metrics_listen: str
    ready_file: str
    internal_token: InternalToken
    log_level: str

    @classmethod
    def from_env(cls) -> NodeSettings:
        capacity = env_int("CUTOUT_NODE_CAPACITY", 2, minimum=1)
        return cls(
            listen=env_str("CUTOUT_NODE_LISTEN", "127.0.0.1:50061"),
            node_id=env_str("CUTOUT_NODE_ID", f"{socket.gethostname()}:{os.getpid()}"),
            model_dir=default_model_dir(),
            models=env_list("CUTOUT_MODELS"),
            providers=env_str("CUTOUT_PROVIDERS", "auto"),
            require_gpu=env_bool("CUTOUT_REQUIRE_GPU", False),
            runtime=env_choice("CUTOUT_RUNTIME", "auto", ("auto", *RUNTIMES)),
            precision=env_choice("CUTOUT_PRECISION", "auto", ("auto", *PRECISIONS)),
            runtime_probe_s=env_float("CUTOUT_RUNTIME_PROBE_S", 60.0),
            trt_cache_dir=Path(env_str("CUTOUT_TRT_CACHE_DIR", "/tmp/cutout-trt-cache")),
            capacity=capacity,
            light_capacity=env_int("CUTOUT_LIGHT_CAPACITY", 2, minimum=1),
            prefetch=env_int("CUTOUT_NODE_PREFETCH", capacity, minimum=0),
            max_rss_mb=env_int("CUTOUT_MAX_RSS_MB", 6144, minimum=0),
            session_runs=env_int("CUTOUT_SESSION_RUNS", 0, minimum=0),
            ort_threads=env_int("CUTOUT_ORT_THREADS", 0, minimum=0),
            progress_hold_ms=env_int("CUTOUT_PROGRESS_HOLD_MS", 50, minimum=0),
            max_pixels=env_int("CUTOUT_MAX_PIXELS", 40_000_000, minimum=1),
            max_message_bytes=env_int("CUTOUT_MAX_MESSAGE_BYTES", 32 * MiB, minimum=MiB),
            grace_s=env_float("CUTOUT_GRACE_S", 30.0),
            metrics_listen=env_str("CUTOUT_METRICS_LISTEN", "0.0.0.0:9103"),
            ready_file=env_str("CUTOUT_READY_FILE", ""),
            log_level=env_str("CUTOUT_LOG_LEVEL", "INFO"),
            internal_token=InternalToken.from_env(),
        )
