"""Cost at equal quality: our defaults against the paper's patch scheme, both with the default prior.

    python bench/cost.py [--images coffee-cup.png] [--paper-steps 1000] [--steps 20]

The paper's scheme (GDP_REFERENCE sec. 4.1) transposed to our prior: windows of the prior's native
size at half-patch stride (64 px, stride 32), uniform averaging, 1000 ancestral steps, the
authors' scale applied per step on the mean (`--paper-scale`). Ours: stride 48 (3/4 patch),
smooth blending, --steps steps, our default scale rules. SR x4 on the held-out sample crops.
Reports PSNR and NFE per megapixel of each, and the NFE ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gdp.io import read_image
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator
from gdp.prior.checkpoint import load_prior
from gdp.restore import default_guidance, restore

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", nargs="+", default=["coffee-cup.png"])
    ap.add_argument("--paper-steps", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    prior = load_prior("default")
    op = make_operator("sr", factor=4)
    schemes = {
        "paper (stride 32, uniform, 1000 steps, paper scale)": dict(
            steps=args.paper_steps, stride=32, blend="uniform",
            guidance=default_guidance("sr", step_rule="paper", size_rule="paper")),
        f"ours (stride 48, smooth, {args.steps} steps)": dict(steps=args.steps, guidance=default_guidance("sr")),
    }
    print("| image | scheme | PSNR dB | NFE / MP | seconds |")
    print("|---|---|---|---|---|")
    for name in args.images:
        x = read_image(str(ROOT / "examples/reference" / name)).pixels
        y = degrade(x, op)
        megapixels = x.shape[-1] * x.shape[-2] / 1e6
        for label, kw in schemes.items():
            t0 = time.perf_counter()
            r = restore(y, "sr", prior, operator=op, **kw)
            print(f"| {name} | {label} | {psnr(r.image, x).item():.2f} | {r.nfe / megapixels:.0f} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
