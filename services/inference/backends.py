"""OpenVINO on the CPU (fp32, and bf16 where the CPU has AMX or AVX512_BF16), the table of
every runtime by name, and `wrap` for a session made elsewhere. The ONNX Runtime runtimes,
the `Runtime` interface and what a host offers are in services/inference/runtimes.py."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from services.inference.runtimes import (
    BF16_FLAGS,
    CPU_PROVIDER,
    Host,
    LoadConfig,
    OrtCudaRuntime,
    OrtRuntime,
    OrtTensorRTRuntime,
    Runtime,
    RuntimeInfo,
    RuntimeUnavailable,
    openvino,
)

# --- OpenVINO -----------------------------------------------------------------------------------

# Our precision names -> OpenVINO's INFERENCE_PRECISION_HINT.
OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoRuntime:
    """A model compiled by OpenVINO for the CPU.

    The precision is always set: on a CPU with AMX, OpenVINO's default is bf16,
    so "fp32" has to be asked for. One stream per concurrent run, each with
    `threads` threads; infer requests are pooled (one is not thread-safe).
    """

    name: ClassVar[str] = "openvino"

    def __init__(self, compiled: Any, precision: str, threads: int) -> None:
        self.compiled = compiled
        self.precision = precision
        self.threads = threads
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()

    @classmethod
    def precisions(cls, host: Host) -> tuple[str, ...]:
        if cls.unavailable(host):
            return ()
        return ("bf16", "fp32") if host.cpu_bf16 else ("fp32",)

    @classmethod
    def unavailable(cls, host: Host) -> str:
        if host.openvino_caps is None:
            return f"openvino cannot be loaded ({host.openvino_error or 'not installed'})"
        return ""

    @classmethod
    def load(cls, path: Path, precision: str, config: LoadConfig) -> Runtime:
        host = Host.detect()
        if precision not in cls.precisions(host):
            flags = ", ".join(sorted(host.cpu_flags & BF16_FLAGS)) or "none of " + ", ".join(
                sorted(BF16_FLAGS)
            )
            raise RuntimeUnavailable(
                f"openvino does not run {precision} on this CPU ({host.cpu_model}; "
                f"bf16 flags: {flags}; OpenVINO capabilities: {host.openvino_caps})"
            )
        ov = openvino()
        core = ov.Core()
        model = core.read_model(str(path))
        if len(model.outputs) > 1:
            # Keep the first output only: the side outputs' heads are pruned away.
            model = ov.Model([model.outputs[0].get_node()], model.get_parameters(), model.name)
        runs = max(1, config.runs)
        props: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": runs,
        }
        if config.threads > 0:
            props["INFERENCE_NUM_THREADS"] = config.threads * runs
        compiled = core.compile_model(model, "CPU", props)
        threads = int(compiled.get_property("INFERENCE_NUM_THREADS")) // runs
        return cls(compiled, precision, threads)

    def input_shape(self) -> tuple[int | None, ...]:
        shape = self.compiled.inputs[0].get_partial_shape()
        return tuple(d.get_length() if d.is_static else None for d in shape)

    def run(self, batch: np.ndarray) -> np.ndarray:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            with self._lock:
                request = self.compiled.create_infer_request()
        try:
            request.infer({0: batch})
            # The output tensor is the request's own buffer, reused by its next run.
            out: np.ndarray = request.get_output_tensor(0).data.copy()
        finally:
            self._requests.put(request)
        return out

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo(self.name, "cpu", self.precision, self.threads)


BACKENDS: dict[str, type[Runtime]] = {
    "tensorrt": OrtTensorRTRuntime,
    "cuda": OrtCudaRuntime,
    "openvino": OpenVinoRuntime,
    "onnxruntime": OrtRuntime,
}


def wrap(session: Runtime | ort.InferenceSession) -> Runtime:
    """A Runtime as it is, or an ONNX Runtime session (anything with run/get_inputs) wrapped."""
    if hasattr(session, "describe"):
        runtime: Runtime = session
        return runtime
    providers = getattr(session, "get_providers", lambda: [CPU_PROVIDER])()
    backend = next(
        (b for b in (OrtTensorRTRuntime, OrtCudaRuntime) if providers[0] == b.provider),
        OrtRuntime,
    )
    return backend(session, "fp32", _threads_of(session))


def _threads_of(session: ort.InferenceSession) -> int:
    try:
        threads = int(session.get_session_options().intra_op_num_threads)
    except Exception:  # a stand-in without options
        return 0
    return threads or (os.cpu_count() or 0)
