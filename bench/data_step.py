"""Sweep of GDP's data step (gdp.guidance: gradient / cg / project, re-noising, proximal weight).

Each case is (task, data step options) on one crop of a held-out photo, observed as
`gdp.evaluate.observe` does (the paper's protocol, optional observation noise sigma_y), restored
with `gdp.restore` at a fixed seed and scored (PSNR after rounding to 8 bits, consistency), next
to the classical baselines of `gdp.baselines`. One JSON row per run on stdout or --out.

    python bench/data_step.py --crops astronaut:0:160:64 coffee:100:200:64 --tasks deblur \
        --steps 20 --grid data_step=gradient,cg cg_iters=2,5 zeta=none,0.5,1 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdp.baselines import BASELINES  # noqa: E402
from gdp.evaluate import observe, quantise  # noqa: E402
from gdp.metrics import consistency_psnr, psnr, ssim  # noqa: E402
from gdp.prior.checkpoint import load_prior  # noqa: E402
from gdp.restore import default_guidance, restore  # noqa: E402


def load_crop(spec: str) -> tuple[str, torch.Tensor]:
    """NAME:TOP:LEFT:SIZE, NAME a scikit-image photo or a path to an image file."""
    name, top, left, size = spec.rsplit(":", 3)
    top, left, size = int(top), int(left), int(size)
    if Path(name).exists():
        pixels = np.asarray(Image.open(name).convert("RGB"))
    else:
        import skimage.data
        pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    crop = pixels[top:top + size, left:left + size, :3]
    if crop.shape[:2] != (size, size):
        raise ValueError(f"{spec}: crop outside the image of {pixels.shape[1]}x{pixels.shape[0]}")
    return f"{Path(name).stem}:{top}:{left}:{size}", torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255


def parse_grid(items: list[str]) -> list[dict]:
    """key=v1,v2 ... -> every combination as a dict of Guidance fields."""
    axes = []
    for item in items:
        key, values = item.split("=", 1)
        axes.append([(key, _value(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def _value(text: str):
    if text == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(args) -> list[dict]:
    """Every row, each also appended to --out as soon as it is measured (long runs keep their rows)."""
    prior = load_prior(args.prior)
    if args.precision != "fp32":
        prior.set_precision(args.precision, channels_last=True)
    crops = [load_crop(c) for c in args.crops]
    rows = []
    for (name, x), task in itertools.product(crops, args.tasks):
        case = observe(x, task, noise_sigma=args.sigma_y, seed=args.noise_seed)
        base = {"image": name, "task": task, "sigma_y": args.sigma_y, "prior_id": prior.prior_id}
        if args.baselines:
            for method, baseline in BASELINES[task].items():
                t0 = time.perf_counter()
                image = quantise(baseline.fn(case))
                rows.append(_row(base, method, image, case, time.perf_counter() - t0, {}))
                _emit(rows[-1], args.out)
        for options in parse_grid(args.grid):
            guidance = dataclasses.replace(default_guidance(task), **options)
            t0 = time.perf_counter()
            result = restore(case.y, task, prior, operator=case.op, steps=args.steps, seed=args.seed,
                             guidance=guidance, samples=args.samples, stride=args.stride)
            rows.append(_row(base, "gdp", quantise(result.image), case, time.perf_counter() - t0,
                             {**options, "steps": args.steps, "samples": args.samples, "stride": args.stride,
                              "precision": args.precision,
                              "nfe": result.nfe}))
            _emit(rows[-1], args.out)
    return rows


def _emit(row: dict, out: str | None) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def _row(base: dict, method: str, image: torch.Tensor, case, seconds: float, options: dict) -> dict:
    return {**base, "method": method, **options, "psnr": round(float(psnr(image, case.reference)[0]), 3),
            "ssim": round(float(ssim(image, case.reference)[0]), 4),
            "consistency_psnr": round(float(consistency_psnr(case.op, image, case.y)[0]), 2),
            "seconds": round(seconds, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", nargs="+", required=True, help="NAME:TOP:LEFT:SIZE (scikit-image name or a file)")
    p.add_argument("--tasks", nargs="+", default=["sr", "deblur", "inpaint"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", nargs="*", default=[], help="Guidance field=v1,v2 (every combination is run)")
    p.add_argument("--sigma-y", type=float, default=0.0, help="observation noise added by the protocol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="posterior samples averaged per image")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the network's autocast")
    p.add_argument("--stride", type=int, help="window stride of fused tiling (default 3/4 of the patch)")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--prior", default="default")
    p.add_argument("--no-baselines", dest="baselines", action="store_false")
    p.add_argument("--out", help="append the rows as JSON lines to this file")
    args = p.parse_args(argv)
    rows = run(args)
    if not args.out:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
