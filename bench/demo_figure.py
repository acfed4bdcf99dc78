"""The README figure from `make demo`'s outputs: observation (nearest) | bicubic | GDP | ground truth.

    python bench/demo_figure.py [--demo out/demo] [--out docs/img/demo_sr_x4.png]

Rows: the bundled samples (examples/sr-x4, 32x32 x4 observations of held-out crops); ground
truth from examples/reference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from gdp.io import read_image, write_image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=ROOT / "out/demo")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/img/demo_sr_x4.png")
    args = ap.parse_args()
    names = sorted(p.name for p in (ROOT / "examples/sr-x4").glob("*.png"))
    rows = []
    for name in names:
        y = read_image(ROOT / "examples/sr-x4" / name).pixels
        truth = read_image(ROOT / "examples/reference" / name).pixels
        size = truth.shape[-2:]
        cols = [F.interpolate(y, size=size, mode="nearest"),
                F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(0, 1),
                read_image(args.demo / name).pixels, truth]
        rows.append(torch.cat([F.pad(c, (2, 2, 2, 2), value=1.0) for c in cols], dim=3))
    write_image(args.out, torch.cat(rows, dim=2))
    print(args.out)


if __name__ == "__main__":
    main()
