"""Pipeline overhead: the restore-collection flow against a plain library loop, same images and settings.

    PREFECT_API_URL=http://127.0.0.1:4200/api python bench/pipeline.py [--images 8] [--steps 10] [--repeats 3]

Makes N observations (x4 average-pooled crops of a held-out photo, 32x32 -> 128x128 outputs,
9 patches of the default prior each), then alternates, per repeat: (a) a plain loop of
read_image -> restore -> write_image, (b) the flow over the same folder (overwrite=True). Reports
the median wall times, their ratio, and the share of the flow's wall time spent in UNet forwards.
`--rss-megapixels 16` instead runs the flow once on one image of that many output megapixels
(1 step) and reports the process's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import UNetTimer  # noqa: E402

from gdp import collection as col  # noqa: E402
from gdp.io import read_image, write_image  # noqa: E402
from gdp.operators import degrade, make_operator  # noqa: E402
from gdp.restore import restore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ref = read_image(str(ROOT / "examples/reference/astronaut-face.png")).pixels
    op = make_operator("sr", factor=4)
    big = torch.nn.functional.interpolate(ref, size=(size, size), mode="bilinear") if size != 128 else ref
    for k in range(n):
        write_image(str(folder / f"img{k:02d}.png"), degrade(big.roll(k * 7, dims=-1), op))


def plain_loop(folder: Path, out: Path, steps: int) -> float:
    t0 = time.perf_counter()
    prior = col.cached_prior("default", None, "cpu")
    for f in sorted(folder.glob("*.png")):
        y = read_image(str(f)).pixels
        r = restore(y, "sr", prior, factor=4, steps=steps, seed=[0])
        write_image(str(out / f.name), r.image)
    return time.perf_counter() - t0


def flow_run(folder: Path, out: Path, steps: int, tiling: str = "auto") -> float:
    from flows.restore_collection import restore_collection
    t0 = time.perf_counter()
    state = restore_collection(input_uri=str(folder), output_uri=str(out), task="sr", options={"factor": 4},
                               steps=steps, overwrite=True, tiling={"mode": tiling}, return_state=True)
    assert state.is_completed(), state.message
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-megapixels", type=float)
    ap.add_argument("--tiling", default="auto", help="with --rss-megapixels: auto, fused or hierarchical")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.rss_megapixels:
        side = int((args.rss_megapixels * 1e6) ** 0.5) // 4 * 4
        make_inputs(tmp / "in", 1, side)
        seconds = flow_run(tmp / "in", tmp / "out", 1, args.tiling)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
        print(f"| {side}x{side} ({side * side / 1e6:.1f} MP output) | tiling {args.tiling} | 1 step | {seconds:.0f} s "
              f"| peak RSS {peak:.2f} GiB |")
        return
    make_inputs(tmp / "in", args.images, 128)
    timer = UNetTimer(col.cached_prior("default", None, "cpu").unet)
    flow_run(tmp / "in", tmp / "warm", 1)  # warm-up: imports, first API calls, model load
    plain, flows, shares = [], [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(tmp / "in", tmp / "plain", args.steps))
        timer.reset()
        flows.append(flow_run(tmp / "in", tmp / "flow", args.steps))
        shares.append(timer.seconds / flows[-1])
    ratio = [f / p for f, p in zip(flows, plain)]
    print(f"images {args.images}, steps {args.steps}, repeats {args.repeats}, threads {torch.get_num_threads()}, "
          f"API {os.environ.get('PREFECT_API_URL', 'ephemeral')}")
    print("| plain loop (median) | flow (median) | flow / plain (median of per-repeat ratios) | UNet share of flow wall time |")
    print("|---|---|---|---|")
    print(f"| {statistics.median(plain):.1f} s | {statistics.median(flows):.1f} s | {statistics.median(ratio):.3f} "
          f"(runs: {', '.join(f'{r:.3f}' for r in ratio)}) | {statistics.median(shares):.3f} |")


if __name__ == "__main__":
    main()
