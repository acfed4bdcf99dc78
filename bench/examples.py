"""Restored examples for the docs: observation | GDP | ground truth, one row per held-out crop.

    python bench/examples.py TASK [--steps 100] [--out docs/img/TASK_examples.png]

Images: the three 128x128 held-out crops in examples/reference; observations synthesised with
`gdp.degrade` and the task's default options (seeded); the default prior and guidance.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import torch

from gdp.io import read_image, write_image
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator
from gdp.prior.checkpoint import load_prior
from gdp.restore import restore

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"sr": {"factor": 4}, "deblur": {}, "inpaint": {"ratio": 0.25, "seed": 0}, "colorize": {}}


def show(y: torch.Tensor, size: int) -> torch.Tensor:
    """An observation as a viewable RGB image of the output's size (nearest upsampling, gray to RGB)."""
    y = torch.nn.functional.interpolate(y, size=(size, size), mode="nearest")
    return y.expand(-1, 3, -1, -1) if y.shape[1] == 1 else y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=sorted(OPTIONS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    refs = torch.cat([read_image(f).pixels for f in sorted(glob.glob(str(ROOT / "examples/reference/*.png")))])
    op = make_operator(args.task, **OPTIONS[args.task])
    y = degrade(refs, op)
    r = restore(y, args.task, load_prior("default"), operator=op, steps=args.steps)
    size, pad = refs.shape[-1], 4
    sheet = torch.ones(3, len(refs) * (size + pad) - pad, 3 * (size + pad) - pad)
    for k in range(len(refs)):
        for col, img in enumerate((show(y[k:k + 1], size)[0], r.image[k].clamp(0, 1), refs[k])):
            sheet[:, k * (size + pad):k * (size + pad) + size, col * (size + pad):col * (size + pad) + size] = img
    out = args.out or ROOT / f"docs/img/{args.task}_examples.png"
    write_image(str(out), sheet[None])
    print(out, "PSNR", [round(float(v), 2) for v in psnr(r.image.clamp(0, 1), refs)],
          "consistency", [round(float(v), 1) for v in r.consistency_psnr])


if __name__ == "__main__":
    main()
