"""How much colour a prior puts into colorized photos (issue 3's colorization bar).

    python bench/colour.py [--steps 20 ...] [--scale-x 1 ...] [--samples 16] [--device cpu] PRIOR [PRIOR ...]

For each prior (default, a file or URL), step count and guidance-scale multiplier: colorize the
three 128x128 held-out crops in examples/reference (default guidance otherwise), report mean
chroma (|Cb| + |Cr|, BT.601, on [0, 1] pixels) against the ground truth's, PSNR and consistency
PSNR; and per prior the mean chroma of `--samples` unconditional samples (50 steps). One JSON line
per run.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import torch

from gdp.io import read_image
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator
from gdp.prior.checkpoint import load_prior
from gdp.restore import default_guidance, restore

ROOT = Path(__file__).resolve().parent.parent


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Mean |Cb| + |Cr| (BT.601) per image of `[B, 3, H, W]` in [0, 1]."""
    r, g, b = x.clamp(0, 1).unbind(1)
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    return (cb.abs() + cr.abs()).flatten(1).mean(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("priors", nargs="+")
    ap.add_argument("--steps", type=int, nargs="+", default=[20])
    ap.add_argument("--scale-x", type=float, nargs="+", default=[1.0], help="multipliers of the default scale")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="append the JSON lines to this file too")
    args = ap.parse_args()
    refs = torch.cat([read_image(f).pixels for f in sorted(glob.glob(str(ROOT / "examples/reference/*.png")))])
    op = make_operator("colorize")
    y = degrade(refs, op)
    truth = [round(float(v), 4) for v in chroma(refs)]
    for source in args.priors:
        prior = load_prior(source, device=args.device)
        rows = []
        if args.samples:
            from gdp.sampling import make_generators, sample_prior
            size = prior.image_size
            s = sample_prior(prior.denoiser(), (3, size, size), 50, make_generators(0, args.samples), args.device)
            rows.append({"prior": source, "unconditional_chroma": round(float(chroma((s.cpu() + 1) / 2).mean()), 4)})
        for steps in args.steps:
            for sx in args.scale_x:
                g = default_guidance("colorize", scale=default_guidance("colorize").scale * sx)
                r = restore(y, "colorize", prior, operator=op, steps=steps, guidance=g)
                img = r.image.cpu()
                rows.append({"prior": source, "prior_id": prior.prior_id, "steps": steps, "scale_x": sx,
                             "chroma": [round(float(v), 4) for v in chroma(img)], "truth_chroma": truth,
                             "mean_chroma": round(float(chroma(img).mean()), 4),
                             "psnr": [round(float(v), 2) for v in psnr(img.clamp(0, 1), refs)],
                             "consistency_psnr": [round(float(v), 1) for v in r.consistency_psnr]})
        for row in rows:
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
