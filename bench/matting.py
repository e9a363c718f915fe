"""Alpha matting memory: peak RSS of matting one 7.8 MP photo, unbounded against bounded.

    python bench/matting.py [--work-pixels 2000000,1000000] [--size 3400x2300]

Each measurement runs in a fresh process, as a node would: it loads the real
IS-Net model (CUTOUT_MODEL_DIR), makes the photo (skimage's astronaut scaled
up to --size), runs the model for the mask, then resets its peak RSS
(/proc/self/clear_refs) and mattes: `rembg` is rembg's alpha_matting_cutout
on the whole photo (what the node did before), `bounded N` is
services/inference/matting.py solving on N pixels, and `bounded N x2` two
such jobs at once on one node. Reports the RSS before matting, the peak
while matting (VmHWM) and what matting added, its time, and the mean alpha
difference from the unbounded matte (0-255) over the whole photo and over the
trimap's unknown band. Prints a table and writes bench/results/matting.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(mode: str, work_pixels: int, jobs: int, size: tuple[int, int], out: Path) -> None:
    import gc

    import skimage.data
    from PIL import Image

    from services.common.config import default_model_dir
    from services.inference import matting, pipeline
    from services.inference.models import ModelCatalog

    catalog = ModelCatalog.load(
        default_model_dir(), ["isnet-general-use"], ["CPUExecutionProvider"], 2
    )
    img = Image.fromarray(skimage.data.astronaut()).resize(size, Image.Resampling.LANCZOS)
    mask = pipeline._mask(img, "", catalog)
    gc.collect()
    before = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    results: list[np.ndarray] = []

    def one() -> None:
        if mode == "rembg":
            from rembg.bg import alpha_matting_cutout

            cut = alpha_matting_cutout(img, mask, 240, 10, 10)
        else:
            cut = matting.cutout(img, mask, work_pixels)
        results.append(np.asarray(cut.getchannel("A")))

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    peak = status_mb("VmHWM")
    np.save(out / "alpha.npy", results[0])
    fg, bg = matting.trimap_masks(np.asarray(mask), matting.ERODE_SIZE)
    np.save(out / "band.npy", ~(fg | bg))
    (out / "result.json").write_text(
        json.dumps({"rss_before_mb": before, "peak_mb": peak, "seconds": seconds})
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work-pixels", default="2000000,1000000")
    parser.add_argument("--size", default="3400x2300")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    if args.child:
        mode, work, jobs, out = args.child
        child(mode, int(work), int(jobs), (width, height), Path(out))
        return 0
    runs = [("rembg", 0, 1)]
    for work in (int(v) for v in args.work_pixels.split(",")):
        runs += [("bounded", work, 1), ("bounded", work, 2)]
    rows = []
    reference: np.ndarray | None = None
    for mode, work, jobs in runs:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--size", args.size]
            subprocess.run([*cmd, "--child", mode, str(work), str(jobs), tmp], check=True)
            result = json.loads((Path(tmp) / "result.json").read_text())
            alpha = np.load(Path(tmp) / "alpha.npy").astype(np.float64)
            band = np.load(Path(tmp) / "band.npy")
        if reference is None:
            reference = alpha
        diff = np.abs(alpha - reference)
        name = "rembg (unbounded)" if mode == "rembg" else f"bounded {work / 1e6:g} MP"
        rows.append(
            {
                "mode": name + (f" x{jobs}" if jobs > 1 else ""),
                "work_pixels": work or width * height,
                "jobs_at_once": jobs,
                "rss_before_mb": round(result["rss_before_mb"]),
                "peak_mb": round(result["peak_mb"]),
                "added_mb": round(result["peak_mb"] - result["rss_before_mb"]),
                "seconds": round(result["seconds"], 1),
                "alpha_diff_mean": round(float(diff.mean()), 3),
                "alpha_diff_band_mean": round(float(diff[band].mean()), 2),
            }
        )
        print(rows[-1], flush=True)
    header = f"{'mode':<24}{'before MB':>10}{'peak MB':>9}{'added MB':>10}{'s':>7}"
    header += f"{'alpha diff':>11}{'in band':>9}"
    print(f"\n{width}x{height} ({width * height / 1e6:.1f} MP)\n{header}")
    for r in rows:
        print(
            f"{r['mode']:<24}{r['rss_before_mb']:>10}{r['peak_mb']:>9}{r['added_mb']:>10}"
            f"{r['seconds']:>7}{r['alpha_diff_mean']:>11}{r['alpha_diff_band_mean']:>9}"
        )
    out = ROOT / "bench" / "results" / "matting.json"
    out.write_text(json.dumps({"size": [width, height], "runs": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
