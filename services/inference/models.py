"""The model catalogue: rembg sessions loaded once at start, with the provider each really got."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import onnxruntime as ort
from PIL import Image

from services.inference.masking import KNOWN, MaskSession, custom_preprocessing

log = logging.getLogger(__name__)


class MaskModel(Protocol):
    """What the pipeline needs from a model: a mask the size of the image."""

    inner_session: ort.InferenceSession

    def predict(self, img: Image.Image) -> list[Image.Image]: ...


class GatedModel:
    """A rembg session of which at most `runs` predictions run at once."""

    def __init__(self, inner: MaskModel, runs: int) -> None:
        self._inner = inner
        self.inner_session = inner.inner_session
        self._gate = threading.BoundedSemaphore(runs)

    def predict(self, img: Image.Image) -> list[Image.Image]:
        with self._gate:
            return self._inner.predict(img)


@dataclass
class LoadedModel:
    name: str
    session: MaskModel
    execution_provider: str
    requested_providers: list[str]


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


def load_model(
    model_dir: Path, name: str, providers: list[str], threads: int, runs: int = 0
) -> LoadedModel:
    """Load one model.

    A custom file, or one named after a rembg session whose preprocessing
    masking.KNOWN reproduces, runs in Cutout's own MaskSession (same steps as
    rembg, vectorised). Any other rembg session name (sam, birefnet-*, ...)
    runs through rembg itself. `runs` caps this model's session runs at once
    (0: no cap); around a rembg session the cap covers rembg's own pre- and
    post-processing too.
    """
    path = model_dir / f"{name}.onnx"
    if not path.is_file():
        raise ModelError(f"model {name!r}: no file {path} (set CUTOUT_MODEL_DIR or CUTOUT_MODELS)")
    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    from rembg.sessions import sessions_names

    session: MaskModel
    if name in KNOWN or name not in sessions_names:
        inner = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        prep = KNOWN.get(name) or custom_preprocessing(inner)
        session = MaskSession(inner, prep, runs)
    else:
        # rembg finds model files only under its home directory.
        os.environ["U2NET_HOME"] = str(model_dir)
        from rembg import new_session

        session = new_session(name, sess_opts=opts, providers=providers)
        if runs > 0:
            session = GatedModel(session, runs)
    active = session.inner_session.get_providers()[0]
    if providers and active != providers[0]:
        # Asked for an accelerator and quietly given the CPU: say so loudly.
        log.error(
            "model runs on a different execution provider than requested",
            extra={"model": name, "requested": providers, "active": active},
        )
    # Warm up: the first run allocates buffers and picks kernels. A gradient,
    # because rembg normalises the mask by its range (a flat image divides by 0).
    session.predict(Image.linear_gradient("L").convert("RGB").resize((64, 64)))
    log.info("model loaded", extra={"model": name, "provider": active})
    return LoadedModel(name, session, active, providers)


class ModelCatalog:
    def __init__(self, models: list[LoadedModel]) -> None:
        if not models:
            raise ModelError("no models configured")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name or self.default)

    @classmethod
    def load(
        cls, model_dir: Path, names: list[str], providers: list[str], threads: int, runs: int = 0
    ) -> ModelCatalog:
        if not model_dir.is_dir():
            raise ModelError(f"model directory {model_dir} does not exist (set CUTOUT_MODEL_DIR)")
        wanted = names or discover(model_dir)
        if not wanted:
            raise ModelError(f"no *.onnx model in {model_dir}")
        return cls([load_model(model_dir, n, providers, threads, runs) for n in wanted])
