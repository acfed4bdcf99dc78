"""Restoration quality of the default prior on the held-out sample crops, against simple baselines.

    python bench/quality.py TASK STEPS '[{"scale": 16000}, {"scale": 16000, "samples": 3}]'
    python bench/quality.py TASK STEPS CONFIGS [PRIOR]   (PRIOR: default, a file or URL)

TASK: sr (x4 avgpool; baseline bicubic upsampling), deblur (the paper's 9x9 kernel, same size;
baseline the blurred observation), inpaint (25% random pixels, seed 0; baseline the observation,
see docs/BENCHMARKS.md for biharmonic), colorize (baseline the gray image). Each configuration is
a JSON object of `scale`, `samples`, `stride`, `tiling`. Images: examples/reference/*.png (128x128
crops of the held-out astronaut and coffee photos). Prints PSNR and consistency per image.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gdp.io import read_image
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator
from gdp.prior.checkpoint import load_prior
from gdp.restore import default_guidance, restore

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"sr": {"factor": 4}, "deblur": {}, "inpaint": {"ratio": 0.25, "seed": 0}, "colorize": {}}


def baseline(task: str, op, y: torch.Tensor) -> torch.Tensor:
    if task == "sr":
        return F.interpolate(y, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    if task == "colorize":
        return y.expand(-1, 3, -1, -1)
    return op.A_dagger(y)


def main() -> None:
    task, steps, configs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    prior = load_prior(sys.argv[4] if len(sys.argv) > 4 else "default")
    refs = [read_image(f).pixels for f in sorted(glob.glob(str(ROOT / "examples/reference/*.png")))]
    op = make_operator(task, **OPTIONS[task])
    ys = [degrade(x, op) for x in refs]
    base = [round(psnr(baseline(task, op, y), x).item(), 2) for x, y in zip(refs, ys)]
    print(task, "baseline", base, "mean", round(sum(base) / len(base), 2), flush=True)
    for c in configs:
        guidance = default_guidance(task, scale=c.get("scale"))
        t0, res = time.time(), []
        for x, y in zip(refs, ys):
            r = restore(y, task, prior, operator=op, steps=steps, guidance=guidance, samples=c.get("samples", 1),
                        stride=c.get("stride"), tiling=c.get("tiling", "auto"))
            res.append((round(psnr(r.image, x).item(), 2), round(r.consistency_psnr.item(), 1)))
        mean = sum(p for p, _ in res) / len(res)
        print(task, steps, c, res, "mean", round(mean, 2), round(time.time() - t0), "s", flush=True)


if __name__ == "__main__":
    main()
