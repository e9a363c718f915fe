"""The model catalogue: models loaded once at start, with the runtime each really got."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from PIL import Image

from services.inference.backends import wrap
from services.inference.masking import KNOWN, MaskSession, Preprocessing, custom_preprocessing
from services.inference.runtimes import (
    LoadConfig,
    ProviderList,
    Runtime,
    RuntimeInfo,
    ort_providers,
    ort_session_options,
)
from services.inference.selection import RuntimeSelector

log = logging.getLogger(__name__)


class MaskModel(Protocol):
    """What the pipeline needs from a model: a mask the size of the image."""

    def predict(self, img: Image.Image) -> list[Image.Image]: ...


class GatedModel:
    """A rembg session of which at most `runs` predictions run at once."""

    def __init__(self, inner: MaskModel, runs: int) -> None:
        self._inner = inner
        self._gate = threading.BoundedSemaphore(runs)

    def predict(self, img: Image.Image) -> list[Image.Image]:
        with self._gate:
            return self._inner.predict(img)


@dataclass
class LoadedModel:
    """A loaded model and what it runs on.

    Attributes:
        execution_provider: the ONNX Runtime execution provider in use; "" on OpenVINO.
        requested_providers: the providers its ONNX Runtime session was asked for.
        runtime: runtime, device, precision and threads (start-up log, /metrics, GetLoad).
    """

    name: str
    session: MaskModel
    execution_provider: str
    requested_providers: list[str]
    runtime: RuntimeInfo


class ModelError(RuntimeError):
    """A configured model cannot be loaded."""


def requested_providers(choice: str) -> list[str]:
    """ "auto": CUDA when this onnxruntime has it, else CPU; or an explicit comma list."""
    if choice != "auto":
        return [p.strip() for p in choice.split(",") if p.strip()]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def discover(model_dir: Path) -> list[str]:
    """Every `<name>.onnx` in the model directory is a model called `<name>`."""
    return sorted(p.stem for p in model_dir.glob("*.onnx"))


def _names(providers: ProviderList) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def _warm_up(session: MaskModel) -> None:
    # The first run allocates buffers and picks kernels. A gradient, because rembg
    # normalises the mask by its range (a flat image divides by 0).
    session.predict(Image.linear_gradient("L").convert("RGB").resize((64, 64)))


def _probe_batch(name: str, runtime: Runtime) -> np.ndarray:
    """The input the selector times runtimes on: the warm-up's gradient, preprocessed."""
    masks = MaskSession(runtime, _prep(name, runtime))
    return masks.preprocess(Image.linear_gradient("L").convert("RGB").resize((64, 64)))


def _prep(name: str, runtime: Runtime) -> Preprocessing:
    return KNOWN.get(name) or custom_preprocessing(runtime.input_shape())


def load_model(
    model_dir: Path,
    name: str,
    providers: list[str],
    threads: int,
    runs: int = 0,
    selector: RuntimeSelector | None = None,
) -> LoadedModel:
    """Load one model.

    A custom file, or one named after a rembg session whose preprocessing
    masking.KNOWN reproduces, runs in Cutout's own MaskSession (same steps as
    rembg, vectorised) on the runtime `selector` picks (services/inference/
    selection.py), or, without a selector, in an ONNX Runtime session with
    exactly `providers`. Any other rembg session name (sam, birefnet-*, ...)
    runs through rembg itself, on ONNX Runtime. `runs` caps this model's
    session runs at once (0: no cap); around a rembg session the cap covers
    rembg's own pre- and post-processing too.
    """
    path = model_dir / f"{name}.onnx"
    if not path.is_file():
        raise ModelError(f"model {name!r}: no file {path} (set CUTOUT_MODEL_DIR or CUTOUT_MODELS)")
    config = LoadConfig(threads=threads, runs=max(runs, 1))
    from rembg.sessions import sessions_names

    session: MaskModel
    asked: list[str] = providers
    if name in KNOWN or name not in sessions_names:
        if selector is None:
            opts = ort_session_options(threads)
            runtime = wrap(ort.InferenceSession(str(path), sess_options=opts, providers=providers))
            mask_session = MaskSession(runtime, _prep(name, runtime), runs)
            _warm_up(mask_session)
        else:
            runtime = selector.load(name, path, config, lambda rt: _probe_batch(name, rt))
            mask_session = MaskSession(runtime, _prep(name, runtime), runs)
            info = runtime.describe()
            ort_based = info.runtime != "openvino"
            asked = _names(ort_providers(info.runtime, info.precision, config)) if ort_based else []
        session = mask_session
    else:
        if selector is not None:
            ort_list = selector.providers(config)
            asked = _names(ort_list)
        else:
            ort_list = list(providers)
        # rembg finds model files only under its home directory.
        os.environ["U2NET_HOME"] = str(model_dir)
        from rembg import new_session

        rembg_session = new_session(
            name, sess_opts=ort_session_options(threads), providers=ort_list
        )
        runtime = wrap(rembg_session.inner_session)
        session = GatedModel(rembg_session, runs) if runs > 0 else rembg_session
        _warm_up(session)
    info = runtime.describe()
    if asked and info.provider and info.provider != asked[0]:
        # Asked for an accelerator and quietly given the CPU: say so loudly.
        log.error(
            "model runs on a different execution provider than requested",
            extra={"model": name, "requested": asked, "active": info.provider},
        )
    log.info(
        "model loaded",
        extra={
            "model": name,
            "provider": info.provider,
            "runtime": info.runtime,
            "device": info.device,
            "precision": info.precision,
            "threads": info.threads,
        },
    )
    return LoadedModel(name, session, info.provider, asked, info)


class ModelCatalog:
    def __init__(self, models: list[LoadedModel]) -> None:
        if not models:
            raise ModelError("no models configured")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name or self.default)

    @property
    def runtime(self) -> RuntimeInfo:
        """What the default model runs on: the node's runtime, device, precision and threads."""
        return self.models[self.default].runtime

    @classmethod
    def load(
        cls,
        model_dir: Path,
        names: list[str],
        providers: list[str],
        threads: int,
        runs: int = 0,
        selector: RuntimeSelector | None = None,
    ) -> ModelCatalog:
        """Load every model; with a selector each on the runtime it picks, else on `providers`."""
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} does not exist (set CUTOUT_MODEL_DIR)")
        wanted = names or discover(model_dir)
        if not wanted:
            raise ModelError(f"no *.onnx model in {model_dir}")
        return cls([load_model(model_dir, n, providers, threads, runs, selector) for n in wanted])
