"""The engines a node can run a model on, behind one interface (`Runtime`).

  onnxruntime  ONNX Runtime, CPU execution provider, fp32.
  openvino     OpenVINO on the CPU: fp32, and bf16 where the CPU has AMX or AVX512_BF16.
  cuda         ONNX Runtime, CUDA execution provider, fp32; input and output through IOBinding.
  tensorrt     ONNX Runtime, TensorRT execution provider, fp16 (or fp32); engines cached on disk.

Every runtime returns only the model's first output, the mask. IS-Net has
twelve full-size side outputs that only training uses. OpenVINO compiles the
graph without them: per image on 2 cores (AMX Xeon, 4 alternating rounds,
medians) bf16 0.67 s instead of 0.91 s, fp32 1.81 s instead of 2.26 s.
ONNX Runtime computes every graph output whichever it is asked for (2.17 s
against 2.22 s), so there only the copies are saved: on a GPU the eleven
unused 4 MB outputs are never bound and never leave the device.

What a host offers is read once (`Host.detect`); OpenVINO's runtime and the table of
all four are in backends.py; which one a node uses is decided in selection.py.
"""

from __future__ import annotations

import functools
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import onnxruntime as ort

RUNTIMES = ("onnxruntime", "openvino", "cuda", "tensorrt")
PRECISIONS = ("fp32", "bf16", "fp16")
# CPU flags (as /proc/cpuinfo spells them) under which bf16 runs natively: AMX tiles or
# AVX512_BF16 dot products. Without either, OpenVINO's bf16 is emulated and slower than fp32.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


class RuntimeUnavailable(RuntimeError):
    """A runtime or precision that was asked for cannot run on this host."""


@dataclass(frozen=True)
class RuntimeInfo:
    """What a loaded model runs on, as the node reports it (log, metrics, GetLoad).

    Attributes:
        runtime: one of RUNTIMES, the CUTOUT_RUNTIME value that selects it.
        device: "cpu" or "cuda:<id>".
        precision: one of PRECISIONS, the precision the runtime computes in.
        threads: host threads one run uses (intra-op threads; 0 when the runtime chose).
        provider: the ONNX Runtime execution provider really in use; "" for OpenVINO.
    """

    runtime: str
    device: str
    precision: str
    threads: int
    provider: str = ""

    def label(self) -> str:
        return f"{self.runtime} {self.precision} on {self.device}, {self.threads} threads"


@dataclass(frozen=True)
class Host:
    """What this machine offers the runtimes, read once at start.

    Attributes:
        cpu_model: the CPU's model name.
        cpu_flags: its feature flags (Linux /proc/cpuinfo; empty elsewhere).
        ort_providers: onnxruntime.get_available_providers().
        openvino_caps: OpenVINO's CPU OPTIMIZATION_CAPABILITIES (FP32, BF16, ...);
            None when OpenVINO cannot be imported (openvino_error says why).
    """

    cpu_model: str
    cpu_flags: frozenset[str]
    ort_providers: tuple[str, ...]
    openvino_caps: tuple[str, ...] | None
    openvino_error: str = ""

    @classmethod
    def detect(cls) -> Host:
        """This machine (read once per process: the answer does not change)."""
        return _detect()

    @property
    def cpu_bf16(self) -> bool:
        """bf16 runs natively on this CPU: it says so, and so does OpenVINO where it is loaded.

        Where /proc/cpuinfo is unreadable (not Linux), OpenVINO's word alone decides.
        """
        ov_says = self.openvino_caps is not None and "BF16" in self.openvino_caps
        return ov_says and (not self.cpu_flags or bool(self.cpu_flags & BF16_FLAGS))


def openvino() -> Any:
    """The openvino module, imported with its telemetry off.

    `import openvino` imports its model converter, which starts Google
    Analytics telemetry unless the user has opted out in ~/intel: each event
    forks a process that sends to the network. A node sends nothing anywhere,
    and a fork beside gRPC's threads is unsafe (gRPC logs "skipping fork()
    handlers"). With openvino_telemetry hidden, OpenVINO uses its own stub.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino as ov

    return ov


@functools.cache
def _detect() -> Host:
    model, flags = read_cpuinfo()
    caps: tuple[str, ...] | None = None
    error = ""
    try:
        caps = tuple(openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception as exc:  # ImportError, or a plugin that cannot start
        error = f"{type(exc).__name__}: {exc}"
    return Host(model, flags, tuple(ort.get_available_providers()), caps, error)


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first CPU; (platform's processor, empty) when unreadable."""
    model, flags = "", ""
    try:
        with path.open() as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor(), frozenset(flags.split())


@dataclass(frozen=True)
class LoadConfig:
    """How to load: host threads per run, runs at once, GPU device, TensorRT engine cache."""

    threads: int = 0
    runs: int = 1
    device_id: int = 0
    trt_cache_dir: Path = Path("/tmp/cutout-trt-cache")


class Runtime(Protocol):
    """One model loaded on one runtime, device and precision. `run` is thread-safe.

    The class side says what the runtime can do on a host and loads a model;
    the instance side runs preprocessed batches and describes itself.
    """

    name: ClassVar[str]

    @classmethod
    def precisions(cls, host: Host) -> tuple[str, ...]:
        """Precisions this runtime can run on the host, fastest first; () when none."""
        ...

    @classmethod
    def unavailable(cls, host: Host) -> str:
        """Why this runtime cannot run on the host; "" when it can."""
        ...

    @classmethod
    def load(cls, path: Path, precision: str, config: LoadConfig) -> Runtime:
        """Load the model file; raises RuntimeUnavailable when the host cannot run it so."""
        ...

    def input_shape(self) -> tuple[int | None, ...]:
        """The model input's shape; None for a dimension that is not fixed."""
        ...

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The model's first output (the mask) for a preprocessed NCHW float32 batch."""
        ...

    def describe(self) -> RuntimeInfo: ...


# --- ONNX Runtime -------------------------------------------------------------------------------

ProviderList = list[str | tuple[str, dict[str, str]]]


def cuda_provider_options(device_id: int) -> dict[str, str]:
    """CUDA execution provider options for a fixed-shape convolutional model."""
    return {
        "device_id": str(device_id),
        # The input shape never changes, so an exhaustive search for each convolution's
        # fastest cuDNN algorithm is paid once, in the warm-up run, and kept.
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        # Let those algorithms use as much workspace as they want (the arena reuses it).
        "cudnn_conv_use_max_workspace": "1",
        # Grow the arena by what a run asks for, not by doubling: same-size runs then
        # reuse one set of blocks and the node's GPU memory stays near what it needs.
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }


def tensorrt_provider_options(device_id: int, precision: str, cache_dir: Path) -> dict[str, str]:
    """TensorRT execution provider options: fp16 kernels, engines and timings cached on disk.

    Building an engine for IS-Net takes minutes; with the cache a restarted node (same
    model, GPU and TensorRT version) loads it in seconds. Mount a volume at the cache dir.
    """
    return {
        "device_id": str(device_id),
        "trt_fp16_enable": "True" if precision == "fp16" else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_max_workspace_size": str(4 << 30),
    }


def ort_providers(runtime: str, precision: str, config: LoadConfig) -> ProviderList:
    """The provider list (with options) an ONNX Runtime session of this runtime is made with.

    Every list ends in the CPU provider, which takes any operator the others lack.
    """
    if runtime == "onnxruntime":
        return [CPU_PROVIDER]
    cuda = (CUDA_PROVIDER, cuda_provider_options(config.device_id))
    if runtime == "cuda":
        return [cuda, CPU_PROVIDER]
    if runtime == "tensorrt":
        trt = tensorrt_provider_options(config.device_id, precision, config.trt_cache_dir)
        return [(TENSORRT_PROVIDER, trt), cuda, CPU_PROVIDER]
    raise ValueError(f"{runtime!r} is not an ONNX Runtime runtime")


def ort_session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def device_of(provider: str, device_id: int = 0) -> str:
    return f"cuda:{device_id}" if provider in (CUDA_PROVIDER, TENSORRT_PROVIDER) else "cpu"


def _shape(dims: Sequence[object]) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in dims)


class OrtRuntime:
    """A model in an ONNX Runtime session on the CPU (and base of the GPU runtimes)."""

    name: ClassVar[str] = "onnxruntime"
    provider: ClassVar[str] = CPU_PROVIDER

    def __init__(
        self, session: ort.InferenceSession, precision: str = "fp32", threads: int = 0
    ) -> None:
        self.session = session
        self.precision = precision
        self.threads = threads
        self._input = session.get_inputs()[0].name
        # Only the first output is fetched (and, on a GPU, bound): see the module docstring.
        self._fetch = [session.get_outputs()[0].name] if hasattr(session, "get_outputs") else None

    @classmethod
    def precisions(cls, host: Host) -> tuple[str, ...]:
        return () if cls.unavailable(host) else ("fp32",)

    @classmethod
    def unavailable(cls, host: Host) -> str:
        if cls.provider in host.ort_providers:
            return ""
        return f"onnxruntime has no {cls.provider} (it has: {', '.join(host.ort_providers)})"

    @classmethod
    def load(cls, path: Path, precision: str, config: LoadConfig) -> Runtime:
        host = Host.detect()
        if precision not in cls.precisions(host):
            why = cls.unavailable(host) or f"it runs {', '.join(cls.precisions(host))}"
            raise RuntimeUnavailable(f"{cls.name} does not run {precision} here: {why}")
        session = ort.InferenceSession(
            str(path),
            sess_options=ort_session_options(config.threads),
            providers=ort_providers(cls.name, precision, config),
        )
        active = session.get_providers()[0]
        if active != cls.provider:
            # ONNX Runtime quietly falls back to the CPU when, say, cuDNN is missing.
            raise RuntimeUnavailable(
                f"{cls.name}: onnxruntime lists {cls.provider} but the session got {active} "
                "(are the CUDA/cuDNN/TensorRT libraries it needs installed?)"
            )
        return cls.prepared(session, precision, config)

    @classmethod
    def prepared(cls, session: ort.InferenceSession, precision: str, config: LoadConfig) -> Runtime:
        return cls(session, precision, config.threads)

    def input_shape(self) -> tuple[int | None, ...]:
        return _shape(self.session.get_inputs()[0].shape)

    def run(self, batch: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.session.run(self._fetch, {self._input: batch})[0]
        return out

    def describe(self) -> RuntimeInfo:
        providers = getattr(self.session, "get_providers", lambda: [self.provider])()
        provider = providers[0] if providers else self.provider
        return RuntimeInfo(
            self.name, device_of(provider), self.precision, self.threads, provider=provider
        )


class OrtCudaRuntime(OrtRuntime):
    """ONNX Runtime on an NVIDIA GPU, input copied in and mask copied out through IOBinding.

    The output is bound on the device and copied out once, instead of ONNX
    Runtime allocating host memory per output per run.
    """

    name: ClassVar[str] = "cuda"
    provider: ClassVar[str] = CUDA_PROVIDER

    def __init__(
        self,
        session: ort.InferenceSession,
        precision: str = "fp32",
        threads: int = 0,
        device_id: int = 0,
    ) -> None:
        super().__init__(session, precision, threads)
        self.device_id = device_id

    @classmethod
    def prepared(cls, session: ort.InferenceSession, precision: str, config: LoadConfig) -> Runtime:
        return cls(session, precision, config.threads, config.device_id)

    def run(self, batch: np.ndarray) -> np.ndarray:
        # One binding per run: a binding is not safe to share between threads.
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input, np.ascontiguousarray(batch))
        binding.bind_output(self._fetch[0] if self._fetch else "output", "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        out: np.ndarray = binding.copy_outputs_to_cpu()[0]
        return out

    def describe(self) -> RuntimeInfo:
        provider = self.session.get_providers()[0]
        return RuntimeInfo(
            self.name, device_of(provider, self.device_id), self.precision, self.threads, provider
        )


class OrtTensorRTRuntime(OrtCudaRuntime):
    name: ClassVar[str] = "tensorrt"
    provider: ClassVar[str] = TENSORRT_PROVIDER

    @classmethod
    def precisions(cls, host: Host) -> tuple[str, ...]:
        return () if cls.unavailable(host) else ("fp16", "fp32")

    @classmethod
    def load(cls, path: Path, precision: str, config: LoadConfig) -> Runtime:
        config.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        return super().load(path, precision, config)
