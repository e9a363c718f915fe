"""Which runtime a node runs its models on: the fastest this host has, or the one configured.

`plan` lists the candidates (runtime, precision) for CUTOUT_RUNTIME and
CUTOUT_PRECISION on this host, fastest expected first. With "auto" each
runtime offers its fastest precision only (bf16 where the CPU runs it
natively, fp16 on TensorRT), and on a host with a usable GPU only the GPU
runtimes are candidates: IS-Net on a GPU is tens of times faster than on any
CPU, and timing both would cost a node's start a CPU run for nothing.

`RuntimeSelector.load` then loads each candidate, runs it once (the warm-up
every model needs anyway) and times further runs, and keeps the fastest. The
probe is bounded: a candidate whose warm-up alone took more than
SKIP_FACTOR x the best time so far (and more than MIN_TIMED_S: first runs of
a tiny model are all overhead) is not timed further, and once
CUTOUT_RUNTIME_PROBE_S has passed no further candidate is tried. A choice is
remembered per model, so rebuilding the sessions (services/inference/recycling.py)
loads the same runtime without probing again.

Asking for something this host cannot run fails at start, naming what it can;
nothing falls back silently. Only under "auto" is a candidate that fails to
load (CUDA listed, cuDNN missing) passed over, and that is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.inference.backends import BACKENDS
from services.inference.runtimes import (
    PRECISIONS,
    RUNTIMES,
    Host,
    LoadConfig,
    ProviderList,
    Runtime,
    RuntimeUnavailable,
    ort_providers,
)

log = logging.getLogger(__name__)

GPU_RUNTIMES = ("tensorrt", "cuda")
# A first run is at most ~1.3x a steady one (measured: ORT, OpenVINO); one slower than
# twice the best steady run cannot win.
SKIP_FACTOR = 2.0
# Timed runs per candidate: at least one, more while they add up to less than this
# (a tiny model's runs take microseconds and one of them says nothing).
MIN_TIMED_S = 0.25
MAX_TIMED_RUNS = 20


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str

    def __str__(self) -> str:
        return f"{self.runtime} {self.precision}"


def available(host: Host) -> list[Candidate]:
    """Every runtime and precision this host can run, fastest expected first."""
    return [
        Candidate(name, p) for name, backend in BACKENDS.items() for p in backend.precisions(host)
    ]


def _describe(candidates: list[Candidate]) -> str:
    return ", ".join(map(str, candidates)) or "nothing"


def plan(host: Host, runtime: str = "auto", precision: str = "auto") -> list[Candidate]:
    """The candidates to try for these settings, fastest expected first.

    Raises:
        ValueError: an unknown runtime or precision name.
        RuntimeUnavailable: the host runs nothing that matches; the message names what it runs.
    """
    if runtime != "auto" and runtime not in RUNTIMES:
        raise ValueError(f"CUTOUT_RUNTIME={runtime!r}: use auto or one of {', '.join(RUNTIMES)}")
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(
            f"CUTOUT_PRECISION={precision!r}: use auto or one of {', '.join(PRECISIONS)}"
        )
    offered = available(host)
    if runtime == "auto":
        gpu = [c for c in offered if c.runtime in GPU_RUNTIMES]
        picked = gpu or offered
    else:
        picked = [c for c in offered if c.runtime == runtime]
        if not picked:
            raise RuntimeUnavailable(
                f"CUTOUT_RUNTIME={runtime} cannot run here: {BACKENDS[runtime].unavailable(host)}. "
                f"This host runs: {_describe(offered)}"
            )
    if precision == "auto":
        # Each runtime's fastest precision only.
        firsts: dict[str, Candidate] = {}
        for c in picked:
            firsts.setdefault(c.runtime, c)
        return list(firsts.values())
    matching = [c for c in picked if c.precision == precision]
    if not matching:
        what = f"CUTOUT_RUNTIME={runtime} with " if runtime != "auto" else ""
        hint = ""
        if precision == "bf16" and not host.cpu_bf16:
            hint = (
                f" (bf16 needs a CPU with amx_bf16 or avx512_bf16 and OpenVINO; this is "
                f"{host.cpu_model or 'an unknown CPU'})"
            )
        raise RuntimeUnavailable(
            f"{what}CUTOUT_PRECISION={precision} cannot run here{hint}. "
            f"This host runs: {_describe(offered)}"
        )
    return matching


@dataclass
class Probe:
    """What loading and timing one candidate gave (logged at start)."""

    candidate: Candidate
    load_s: float = 0.0
    first_run_s: float = 0.0
    run_s: float = math.inf  # best timed run
    runs: int = 0
    outcome: str = ""  # chosen, slower, skipped (with why), failed: <error>

    def as_log(self) -> dict[str, object]:
        return {
            "candidate": str(self.candidate),
            "load_ms": round(self.load_s * 1000, 1),
            "first_run_ms": round(self.first_run_s * 1000, 3),
            "run_ms": round(self.run_s * 1000, 3) if self.runs else None,
            "timed_runs": self.runs,
            "outcome": self.outcome,
        }


BatchFor = Callable[[Runtime], np.ndarray]


@dataclass
class RuntimeSelector:
    """Picks and loads each model's runtime; remembers the choice for reloads.

    Attributes:
        runtime: CUTOUT_RUNTIME (auto, onnxruntime, openvino, cuda, tensorrt).
        precision: CUTOUT_PRECISION (auto, fp32, bf16, fp16).
        probe_budget_s: CUTOUT_RUNTIME_PROBE_S, how long probing one model may take.
        trt_cache_dir: CUTOUT_TRT_CACHE_DIR, TensorRT's engine and timing cache.
        host: what the machine offers (detected when not given).
    """

    runtime: str = "auto"
    precision: str = "auto"
    probe_budget_s: float = 60.0
    trt_cache_dir: Path = LoadConfig.trt_cache_dir
    host: Host = field(default_factory=Host.detect)
    chosen: dict[str, Candidate] = field(default_factory=dict)
    probes: dict[str, list[Probe]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def candidates(self) -> list[Candidate]:
        return plan(self.host, self.runtime, self.precision)

    @property
    def on_gpu(self) -> bool:
        """The models will run on a GPU (decides session runs at once, see server.py)."""
        return any(c.runtime in GPU_RUNTIMES for c in self.candidates())

    def providers(self, config: LoadConfig) -> ProviderList:
        """Providers for a model that runs in rembg's own ONNX Runtime session.

        OpenVINO and bf16 cannot run there: asking for them fails rather than
        quietly giving that model something else.
        """
        ort_based = [c for c in self.candidates() if c.runtime != "openvino"]
        if not ort_based:
            raise RuntimeUnavailable(
                f"CUTOUT_RUNTIME={self.runtime} CUTOUT_PRECISION={self.precision}: models that "
                "run through rembg's own session run on ONNX Runtime only "
                f"(onnxruntime, cuda, tensorrt); this host runs {_describe(available(self.host))}"
            )
        best = ort_based[0]
        return ort_providers(best.runtime, best.precision, self._config(config))

    def _config(self, config: LoadConfig) -> LoadConfig:
        return dataclasses.replace(config, trt_cache_dir=self.trt_cache_dir)

    def load(self, model: str, path: Path, config: LoadConfig, batch_for: BatchFor) -> Runtime:
        """Load `model` on its runtime, run it at least once, and return it."""
        with self._lock:
            remembered = self.chosen.get(model)
        candidates = [remembered] if remembered else self.candidates()
        runtime, probes = probe(
            candidates, path, self._config(config), batch_for, self.probe_budget_s
        )
        chosen = next(p.candidate for p in probes if p.outcome == "chosen")
        with self._lock:
            self.chosen[model] = chosen
            if remembered is None:
                self.probes[model] = probes
        if len(probes) > 1:
            log.info(
                "runtime probe",
                extra={"model": model, "probes": [p.as_log() for p in probes]},
            )
        return runtime


def _finite(out: np.ndarray) -> bool:
    return bool(np.isfinite(out).all())


def _time_runs(runtime: Runtime, batch: np.ndarray, probe: Probe) -> None:
    started = time.perf_counter()
    while probe.runs < 1 or (
        time.perf_counter() - started < MIN_TIMED_S and probe.runs < MAX_TIMED_RUNS
    ):
        t = time.perf_counter()
        runtime.run(batch)
        probe.run_s = min(probe.run_s, time.perf_counter() - t)
        probe.runs += 1


def probe(
    candidates: list[Candidate],
    path: Path,
    config: LoadConfig,
    batch_for: BatchFor,
    budget_s: float,
) -> tuple[Runtime, list[Probe]]:
    """Load and time the candidates in order; return the fastest and what each gave.

    With one candidate there is nothing to compare: it is loaded and warmed
    up, and any failure is raised. With several, a failure is logged and the
    next one tried; RuntimeUnavailable is raised only when none loads.
    """
    only = len(candidates) == 1
    probes: list[Probe] = []
    best: tuple[Runtime, Probe] | None = None
    started = time.monotonic()
    for candidate in candidates:
        p = Probe(candidate)
        probes.append(p)
        if best is not None and time.monotonic() - started > budget_s:
            p.outcome = f"skipped: probe budget of {budget_s:g} s spent"
            continue
        try:
            t = time.perf_counter()
            runtime = BACKENDS[candidate.runtime].load(path, candidate.precision, config)
            p.load_s = time.perf_counter() - t
            batch = batch_for(runtime)
            t = time.perf_counter()
            out = runtime.run(batch)
            p.first_run_s = time.perf_counter() - t
            if not _finite(out):
                raise RuntimeUnavailable(f"{candidate} gives non-finite outputs for this model")
        except Exception as exc:
            if only:
                raise
            p.outcome = f"failed: {exc}"
            log.warning(
                "runtime candidate failed", extra={"candidate": str(candidate), "error": str(exc)}
            )
            continue
        if only:
            p.outcome = "chosen"
            return runtime, probes
        slow = p.first_run_s > max(SKIP_FACTOR * best[1].run_s, MIN_TIMED_S) if best else False
        if slow:
            p.outcome = f"slower: first run over {SKIP_FACTOR:g}x the best"
            continue
        _time_runs(runtime, batch, p)
        if best is None or p.run_s < best[1].run_s:
            if best is not None:
                best[1].outcome = "slower"
            best = (runtime, p)
        else:
            p.outcome = "slower"
    if best is None:
        failures = "; ".join(f"{p.candidate}: {p.outcome}" for p in probes)
        raise RuntimeUnavailable(f"no runtime could load the model ({failures})")
    best[1].outcome = "chosen"
    return best[0], probes
