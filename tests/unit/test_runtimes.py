"""The node's runtimes: what this host runs, how one is chosen, and that each gives rembg's masks.

The equivalence test runs every runtime and precision this host offers on
real photos with the real IS-Net model and compares each mask with rembg's
own (ONNX Runtime, fp32, rembg's pre- and post-processing): mean |alpha
difference| <= 1/255 and IoU of (alpha >= 128) >= 0.995 per photo. On a CPU
with AMX or AVX512_BF16 that includes OpenVINO bf16; elsewhere
test_bf16_is_offered_exactly_where_the_cpu_has_it says why it is not.

CUDA and TensorRT cannot run on a CPU-only host; what they would be
configured with, and that asking for them here fails loudly, is tested.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from services.common.config import SettingsError
from services.inference import metrics, pipeline
from services.inference.backends import BACKENDS
from services.inference.masking import ISNET, MaskSession
from services.inference.models import ModelCatalog, ModelError
from services.inference.runtimes import (
    BF16_FLAGS,
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    Host,
    LoadConfig,
    OrtCudaRuntime,
    OrtTensorRTRuntime,
    RuntimeUnavailable,
    ort_providers,
    read_cpuinfo,
)
from services.inference.selection import Candidate, RuntimeSelector, available, plan
from services.inference.server import runtime_selector
from services.inference.service import InferenceServicer
from services.inference.settings import NodeSettings
from services.internal.v1 import inference_service_pb2 as pb

MODEL = "isnet-general-use"
MAX_MAE = 1.0  # mean |alpha difference|, in 1/255
MIN_IOU = 0.995  # of alpha >= 128

HERE = Host.detect()

# Hosts as /proc/cpuinfo, onnxruntime and OpenVINO describe them (no model involved).
AMX_CPU = Host(
    "Intel(R) Xeon(R) Platinum 8480+",
    frozenset({"avx512f", "amx_bf16", "amx_int8", "amx_tile", "avx512_bf16"}),
    ("CPUExecutionProvider",),
    ("BF16", "FP32", "FP16", "INT8"),
)
EPYC = Host(
    "AMD EPYC 7B13 64-Core Processor",
    frozenset({"avx2", "fma"}),
    ("AzureExecutionProvider", "CPUExecutionProvider"),
    ("FP32", "FP16", "INT8"),
)
GPU_BOX = Host(
    "AMD EPYC 7B13 64-Core Processor",
    frozenset({"avx2"}),
    (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER),
    ("FP32", "INT8"),
)
NO_OPENVINO = Host(
    "Intel(R) Xeon(R) Platinum 8480+",
    AMX_CPU.cpu_flags,
    ("CPUExecutionProvider",),
    None,
    "ModuleNotFoundError: No module named 'openvino'",
)


@pytest.fixture(scope="module")
def photos_decoded() -> dict[str, Image.Image]:
    """skimage's real photos, as the node decodes them from JPEG uploads.

    All five are smaller than the model's 1024 x 1024 input; coffee x3
    (1800 x 1200) takes the downscaling path large uploads take.
    """
    import skimage.data

    arrays = {
        name: getattr(skimage.data, name)()
        for name in ("astronaut", "chelsea", "coffee", "rocket", "camera")
    }
    coffee = Image.fromarray(arrays["coffee"])
    arrays["coffee x3"] = np.asarray(coffee.resize((1800, 1200), Image.Resampling.LANCZOS))
    out = {}
    for name, array in arrays.items():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "JPEG", quality=92)
        out[name] = pipeline.decode(buf.getvalue(), 40_000_000)
    return out


@pytest.fixture(scope="module")
def rembg_masks(
    real_model_dir: Path, photos_decoded: dict[str, Image.Image]
) -> dict[str, np.ndarray]:
    """rembg's own masks: its session (ONNX Runtime fp32) with its pre- and post-processing.

    rembg asks ONNX Runtime for all twelve of IS-Net's outputs and uses the
    first. Asked for the first alone, ONNX Runtime gives the same tensor,
    bit for bit, in less than half the time: checked on the first photo, then
    relied on for the others.
    """
    os.environ["U2NET_HOME"] = str(real_model_dir)
    from rembg import new_session

    session = new_session(MODEL)
    full = session.inner_session
    first_output = [full.get_outputs()[0].name]

    class FirstOutputOnly:
        def get_inputs(self) -> list[object]:
            return full.get_inputs()  # type: ignore[no-any-return]

        def run(self, names: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return full.run(first_output, feed)  # type: ignore[no-any-return]

    masks = {}
    for i, (name, img) in enumerate(photos_decoded.items()):
        if i == 0:
            feed = session.normalize(img, ISNET.mean, ISNET.std, ISNET.size)
            assert np.array_equal(full.run(None, feed)[0], full.run(first_output, feed)[0])
            session.inner_session = FirstOutputOnly()
        masks[name] = np.asarray(session.predict(img)[0])
    return masks


def compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(mean |alpha difference| in 1/255, IoU of alpha >= 128)."""
    mae = float(np.abs(ours.astype(np.float64) - theirs).mean())
    a, b = ours >= 128, theirs >= 128
    return mae, float((a & b).sum() / max((a | b).sum(), 1))


# --- equivalence --------------------------------------------------------------------------------


@pytest.mark.parametrize("candidate", available(HERE), ids=str)
def test_every_runtime_here_gives_rembgs_masks(
    candidate: Candidate,
    real_model_dir: Path,
    photos_decoded: dict[str, Image.Image],
    rembg_masks: dict[str, np.ndarray],
) -> None:
    runtime = BACKENDS[candidate.runtime].load(
        real_model_dir / f"{MODEL}.onnx", candidate.precision, LoadConfig(threads=2)
    )
    info = runtime.describe()
    assert (info.runtime, info.precision, info.device) == (
        candidate.runtime,
        candidate.precision,
        "cpu",
    )
    masks = MaskSession(runtime, ISNET)
    rows = []
    for name, img in photos_decoded.items():
        started = time.perf_counter()
        ours = np.asarray(masks.predict(img)[0])
        assert ours.shape == rembg_masks[name].shape
        mae, iou = compare(ours, rembg_masks[name])
        rows.append(
            f"{name}: MAE {mae:.3f}/255 IoU {iou:.4f} ({time.perf_counter() - started:.1f} s)"
        )
        assert mae <= MAX_MAE and iou >= MIN_IOU, f"{candidate} {rows[-1]}"
        # Not a trivial mask: some subject kept, some background removed.
        assert 0.02 < (ours >= 128).mean() < 0.98, name
    print(f"\n{candidate}: " + "; ".join(rows))


# --- what this host offers ----------------------------------------------------------------------


def test_openvino_and_onnxruntime_run_here() -> None:
    """openvino is a server dependency: a host where it cannot load fails here, not quietly."""
    assert HERE.openvino_caps is not None, HERE.openvino_error
    offered = available(HERE)
    assert Candidate("onnxruntime", "fp32") in offered
    assert Candidate("openvino", "fp32") in offered


def test_bf16_is_offered_exactly_where_the_cpu_has_it() -> None:
    model, flags = read_cpuinfo()
    native = bool(flags & BF16_FLAGS) or not flags
    offered = Candidate("openvino", "bf16") in available(HERE)
    assert offered == (native and "BF16" in (HERE.openvino_caps or ())), (model, sorted(flags))


def test_read_cpuinfo_finds_model_and_flags(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
        "flags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\nflags\t: x\n"
    )
    assert read_cpuinfo(cpuinfo) == ("AMD EPYC 7B13", frozenset({"fpu", "avx2", "fma"}))


def test_bf16_needs_the_cpu_flags_and_openvino() -> None:
    assert AMX_CPU.cpu_bf16
    assert not EPYC.cpu_bf16
    assert not NO_OPENVINO.cpu_bf16
    # OpenVINO lists BF16 on CPUs that only emulate it: the flags decide where they are known.
    assert not Host("x", frozenset({"avx512f"}), (CPU_PROVIDER,), ("BF16", "FP32")).cpu_bf16
    assert Host("x", frozenset(), (CPU_PROVIDER,), ("BF16", "FP32")).cpu_bf16  # not Linux


# --- selection ----------------------------------------------------------------------------------


def test_auto_plans_each_runtimes_fastest_precision_gpu_first() -> None:
    assert plan(AMX_CPU) == [Candidate("openvino", "bf16"), Candidate("onnxruntime", "fp32")]
    assert plan(EPYC) == [Candidate("openvino", "fp32"), Candidate("onnxruntime", "fp32")]
    assert plan(NO_OPENVINO) == [Candidate("onnxruntime", "fp32")]
    assert plan(GPU_BOX) == [Candidate("tensorrt", "fp16"), Candidate("cuda", "fp32")]
    assert plan(GPU_BOX, "tensorrt", "fp32") == [Candidate("tensorrt", "fp32")]
    assert plan(GPU_BOX, "onnxruntime") == [Candidate("onnxruntime", "fp32")]
    assert plan(AMX_CPU, precision="fp32") == [
        Candidate("openvino", "fp32"),
        Candidate("onnxruntime", "fp32"),
    ]
    assert plan(AMX_CPU, "openvino") == [Candidate("openvino", "bf16")]


@pytest.mark.parametrize(
    ("host", "runtime", "precision", "words"),
    [
        (EPYC, "auto", "bf16", ["bf16 needs", "AMD EPYC 7B13", "openvino fp32, onnxruntime fp32"]),
        (EPYC, "cuda", "auto", ["no CUDAExecutionProvider", "openvino fp32, onnxruntime fp32"]),
        (AMX_CPU, "tensorrt", "fp16", ["no TensorrtExecutionProvider", "openvino bf16"]),
        (AMX_CPU, "onnxruntime", "fp16", ["CUTOUT_RUNTIME=onnxruntime", "onnxruntime fp32"]),
        (NO_OPENVINO, "openvino", "auto", ["No module named 'openvino'", "onnxruntime fp32"]),
        (GPU_BOX, "cuda", "bf16", ["CUTOUT_PRECISION=bf16", "tensorrt fp16, tensorrt fp32"]),
    ],
)
def test_asking_for_what_the_host_lacks_names_what_it_has(
    host: Host, runtime: str, precision: str, words: list[str]
) -> None:
    with pytest.raises(RuntimeUnavailable) as err:
        plan(host, runtime, precision)
    for word in words:
        assert word in str(err.value)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="CUTOUT_RUNTIME='gpu'"):
        plan(EPYC, "gpu")
    with pytest.raises(ValueError, match="CUTOUT_PRECISION='int8'"):
        plan(EPYC, precision="int8")


def test_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", "t" * 32)
    monkeypatch.setenv("CUTOUT_RUNTIME", "gpu")
    with pytest.raises(SettingsError, match="CUTOUT_RUNTIME='gpu'"):
        NodeSettings.from_env()
    monkeypatch.setenv("CUTOUT_RUNTIME", "openvino")
    monkeypatch.setenv("CUTOUT_PRECISION", "bf16")
    monkeypatch.setenv("CUTOUT_TRT_CACHE_DIR", "/var/cache/trt")
    s = NodeSettings.from_env()
    assert (s.runtime, s.precision, s.trt_cache_dir) == ("openvino", "bf16", Path("/var/cache/trt"))
    # CUTOUT_PROVIDERS is ONNX Runtime's own knob: with a runtime beside it, the node refuses.
    monkeypatch.setenv("CUTOUT_PROVIDERS", "CPUExecutionProvider")
    with pytest.raises(ModelError, match="CUTOUT_PROVIDERS"):
        runtime_selector(NodeSettings.from_env())


def test_unavailable_runtime_fails_the_node_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", "t" * 32)
    for runtime in ("cuda", "tensorrt"):
        monkeypatch.setenv("CUTOUT_RUNTIME", runtime)
        with pytest.raises(RuntimeUnavailable, match=r"This host runs: .*onnxruntime fp32"):
            runtime_selector(NodeSettings.from_env())


def test_auto_times_the_candidates_and_remembers_the_choice(tiny_model_dir: Path) -> None:
    selector = RuntimeSelector()
    first = ModelCatalog.load(tiny_model_dir, ["tiny"], [], 1, 1, selector)
    probes = selector.probes["tiny"]
    assert [p.candidate for p in probes] == plan(HERE)
    chosen = [p for p in probes if p.outcome == "chosen"]
    assert len(chosen) == 1
    timed = [p for p in probes if p.runs]
    assert chosen[0].run_s == min(p.run_s for p in timed)
    info = first.runtime
    assert (info.runtime, info.precision) == (
        chosen[0].candidate.runtime,
        chosen[0].candidate.precision,
    )
    # A reload (session recycling) loads the same runtime without timing again.
    again = ModelCatalog.load(tiny_model_dir, ["tiny"], [], 1, 1, selector)
    assert again.runtime == info
    assert selector.probes["tiny"] is probes


@pytest.mark.parametrize("candidate", available(HERE), ids=str)
async def test_getload_and_metrics_report_the_runtime(
    candidate: Candidate, tiny_model_dir: Path
) -> None:
    selector = RuntimeSelector(candidate.runtime, candidate.precision)
    catalog = ModelCatalog.load(tiny_model_dir, ["tiny"], [], 1, 1, selector)
    info = catalog.runtime
    assert (info.runtime, info.device, info.precision, info.threads) == (
        candidate.runtime,
        "cpu",
        candidate.precision,
        1,
    )
    servicer = InferenceServicer(catalog, "node-x", 1, 1000)
    try:
        load = await servicer.GetLoad(pb.GetLoadRequest(), None)  # type: ignore[arg-type]
    finally:
        servicer.shutdown()
    model = load.models[0]
    assert (model.runtime, model.device, model.precision, model.threads) == (
        candidate.runtime,
        "cpu",
        candidate.precision,
        1,
    )
    on_ort = candidate.runtime == "onnxruntime"
    assert model.execution_provider == (CPU_PROVIDER if on_ort else "")
    metrics.describe_models(catalog)
    labels = {
        "model": "tiny",
        "runtime": candidate.runtime,
        "device": "cpu",
        "precision": candidate.precision,
        "threads": "1",
    }
    assert REGISTRY.get_sample_value("cutout_model_runtime", labels) == 1


# --- GPU runtimes: their configuration, and that they refuse to run here ---------------------


def test_cuda_and_tensorrt_provider_options(tmp_path: Path) -> None:
    config = LoadConfig(threads=4, device_id=1, trt_cache_dir=tmp_path / "trt")
    cuda = ort_providers("cuda", "fp32", config)
    assert cuda[-1] == CPU_PROVIDER
    name, opts = cuda[0]  # type: ignore[misc]
    assert name == CUDA_PROVIDER
    assert opts["device_id"] == "1"
    assert opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert opts["arena_extend_strategy"] == "kSameAsRequested"
    trt = ort_providers("tensorrt", "fp16", config)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [
        TENSORRT_PROVIDER,
        CUDA_PROVIDER,
        CPU_PROVIDER,
    ]
    trt_opts = trt[0][1]  # type: ignore[index]
    assert trt_opts["trt_fp16_enable"] == "True"
    assert trt_opts["trt_engine_cache_enable"] == "True"
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path / "trt")
    fp32 = ort_providers("tensorrt", "fp32", config)[0][1]  # type: ignore[index]
    assert fp32["trt_fp16_enable"] == "False"
    assert ort_providers("onnxruntime", "fp32", config) == [CPU_PROVIDER]
    # The selector hands the configured cache dir to TensorRT.
    selector = RuntimeSelector("tensorrt", host=GPU_BOX, trt_cache_dir=tmp_path / "cache")
    picked = selector.providers(LoadConfig())[0][1]  # type: ignore[index]
    assert picked["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert selector.on_gpu and not RuntimeSelector(host=AMX_CPU).on_gpu


@pytest.mark.parametrize("backend", [OrtCudaRuntime, OrtTensorRTRuntime], ids=lambda b: b.name)
def test_gpu_runtimes_refuse_to_load_where_onnxruntime_lacks_them(
    backend: type[OrtCudaRuntime], real_model_dir: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    if backend.provider in ort.get_available_providers():
        # A GPU build: the runtime must then really run on it (or fail, never fall back).
        runtime = backend.load(
            real_model_dir / f"{MODEL}.onnx", "fp32", LoadConfig(trt_cache_dir=tmp_path)
        )
        assert runtime.describe().device.startswith("cuda")
        return
    with pytest.raises(RuntimeUnavailable, match=backend.provider):
        backend.load(real_model_dir / f"{MODEL}.onnx", "fp32", LoadConfig(trt_cache_dir=tmp_path))


@pytest.fixture(autouse=True)
def _runtime_env_cleared(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("CUTOUT_RUNTIME", "CUTOUT_PRECISION", "CUTOUT_PROVIDERS", "CUTOUT_TRT_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    yield
