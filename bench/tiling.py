"""Seams, tiled-vs-whole quality and cost of the any-size modes (issue: any size).

    python bench/tiling.py [--size 256] [--steps 20] [--scale 16000]

Real photos (held-out skimage astronaut and coffee, centre crops of --size px) are degraded by x4
average pooling and restored to --size (4x the default prior's 64 px) in three modes: single (the
whole image in one network call: the "whole-image restoration" reference), fused and
hierarchical. Reports PSNR against the ground truth, the seam ratio r(O) = mean gradient
magnitude on interior patch borders / elsewhere, next to r(ground truth), and NFE per megapixel.
"""

from __future__ import annotations

import argparse
import os
import time

import skimage
import torch

from gdp.guidance import Guidance
from gdp.io import read_image
from gdp import metrics
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator
from gdp.prior.checkpoint import load_prior
from gdp.restore import restore
from gdp.tiling import plan_windows

DATA = os.path.join(os.path.dirname(skimage.__file__), "data")


def seam_ratio(x: torch.Tensor, patch: int, stride: int) -> float:
    h, w = x.shape[-2:]
    return metrics.seam_ratio(x, plan_windows(h, w, patch, stride))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scale", type=float, default=16000)
    args = ap.parse_args()
    prior = load_prior("default")
    op = make_operator("sr", factor=4)
    guidance = Guidance(scale=args.scale)
    print("| image | mode | PSNR dB | r(O) | r(GT) | NFE/MP | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in ("astronaut.png", "coffee.png"):
        full = read_image(f"{DATA}/{name}").pixels
        h, w = full.shape[-2:]
        top, left = (h - args.size) // 2, (w - args.size) // 2
        x = full[..., top:top + args.size, left:left + args.size]
        y = degrade(x, op)
        for mode in ("single", "fused", "hierarchical"):
            t0 = time.perf_counter()
            r = restore(y, "sr", prior, operator=op, steps=args.steps, tiling=mode, guidance=guidance)
            seconds = time.perf_counter() - t0
            patch, stride = r.tiling.get("patch") or 64, r.tiling.get("stride") or 48
            print(f"| {name} | {mode} | {psnr(r.image, x).item():.2f} | {seam_ratio(r.image, patch, stride):.3f} | "
                  f"{seam_ratio(x, patch, stride):.3f} | {r.nfe / (args.size ** 2 / 1e6):.0f} | {seconds:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
