"""Sweep the sampler's choices for the blind tasks (blind deblurring, low light) with the default prior.

    python bench/blind_sweep.py --device cuda --out sweep.json [--tasks blind-deblur lowlight]

Tuning set: the three 128x128 held-out crops in examples/reference; the best configurations (by
mean PSNR there) are then re-run on the 256x256 held-out crops in examples/eval, which the sweep
never chose on. Observations as in bench/blind.py (same seeds). Each configuration restores the
three images as one batch (parameters stay per image). Rows are written to --out after every
configuration. Meant for a GPU session (minutes there, hours on this CPU).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from gdp.baselines import EvalCase, clahe, gain_to_mean, histogram_equalisation
from gdp.io import read_image
from gdp.metrics import psnr
from gdp.operators import Deblur, low_light, make_operator, motion_kernel
from gdp.operators.blind import kernel_error
from gdp.prior.checkpoint import load_prior
from gdp.restore import default_guidance, restore

ROOT = Path(__file__).resolve().parent.parent


def load(folder: str) -> torch.Tensor:
    return torch.cat([read_image(f).pixels for f in sorted(glob.glob(str(ROOT / folder / "*.png")))])


def per_image_db(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in psnr(a.clamp(0, 1).cpu(), b.cpu())]


def deblur_case(x: torch.Tensor):
    kernels = [motion_kernel(15, seed=1 + k) for k in range(x.shape[0])]
    ys = []
    for k, kern in enumerate(kernels):
        y = Deblur(kernel=kern, mode="same").A(x[k:k + 1])
        ys.append(torch.floor(y * 255 + 1e-3).clamp(0, 255) / 255)
    return torch.cat(ys), kernels


def lowlight_case(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([low_light(x[k:k + 1], gain=0.15, noise=0.01, generator=torch.Generator().manual_seed(k))
                      for k in range(x.shape[0])])


def run_deblur(x, prior, cfg: dict) -> dict:
    y, kernels = deblur_case(x)
    op = make_operator("blind-deblur", kernel_size=15, lr=cfg["lr"], update_from=cfg["update_from"],
                       iters=cfg.get("iters", 1), passes=cfg.get("passes", 1),
                       later_update_from=cfg.get("later_update_from", 0.0), sparsity=cfg.get("sparsity", 0.0))
    g = default_guidance("blind-deblur", scale=default_guidance("blind-deblur").scale * cfg.get("scale_x", 1.0))
    r = restore(y, "blind-deblur", prior, operator=op, steps=cfg["steps"], guidance=g, batch_size=64)
    est = op.kernels().detach().cpu()
    errs = [kernel_error(est[k], kernels[k]) for k in range(len(kernels))]
    return {"psnr": per_image_db(r.image, x), "kernel_error": errs, "seconds": r.seconds}


def nonblind_deblur(x, prior, steps: int) -> list[float]:
    y, kernels = deblur_case(x)
    out = []
    for k, kern in enumerate(kernels):
        r = restore(y[k:k + 1], "deblur", prior, operator=Deblur(kernel=kern, mode="same"), steps=steps, seed=k,
                    batch_size=64)
        out += per_image_db(r.image, x[k:k + 1])
    return out


def run_lowlight(x, prior, cfg: dict) -> dict:
    y = lowlight_case(x)
    op = make_operator("lowlight", target_mean=cfg["target_mean"], lr_f=cfg["lr_f"], lr_mask=cfg["lr_mask"],
                       tv_weight=cfg.get("tv_weight", 0.0))
    g = default_guidance("lowlight", scale=default_guidance("lowlight").scale * cfg.get("scale_x", 1.0),
                         exposure_weight=cfg.get("exposure_weight", 0.0))
    r = restore(y, "lowlight", prior, operator=op, steps=cfg["steps"], guidance=g, batch_size=64)
    img = r.image.clamp(0, 1).cpu()
    gain = x.mean(dim=(1, 2, 3), keepdim=True) / img.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return {"psnr": per_image_db(img, x), "psnr_brightness_matched": per_image_db(img * gain, x),
            "f": [d["f"][0] if isinstance(d["f"], list) else d["f"] for d in r.params["per_image"]],
            "seconds": r.seconds}


def lowlight_baselines(x) -> dict:
    """Per-image PSNR of the low-light baselines of `gdp.baselines`."""
    y = lowlight_case(x)
    methods = {"gain to mean 0.45": gain_to_mean, "histogram equalisation": histogram_equalisation, "CLAHE": clahe}
    rows = {name: [] for name in methods}
    for k in range(x.shape[0]):
        case = EvalCase(make_operator("lowlight"), y[k:k + 1], tuple(x[k:k + 1].shape), x[k:k + 1])
        for name, method in methods.items():
            rows[name] += per_image_db(method(case), x[k:k + 1])
    return rows


GRIDS = {
    "blind-deblur": {"steps": [50, 100], "iters": [1, 4, 16], "lr": [0.05, 0.2], "update_from": [0.3, 0.5, 0.7],
                     "scale_x": [1.0, 4.0]},
    "lowlight": {"steps": [50, 100], "target_mean": [0.4, 0.45, 0.5], "lr_f": [0.03, 0.1, 0.3],
                 "lr_mask": [0.01, 0.05, 0.2], "tv_weight": [0.0], "exposure_weight": [0.0, 10.0], "scale_x": [1.0]},
}
RUN = {"blind-deblur": run_deblur, "lowlight": run_lowlight}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", nargs="+", default=list(GRIDS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--top", type=int, default=3, help="configurations re-run on the 256x256 set")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds for each task's grid; the rest is skipped")
    ap.add_argument("--grid", type=json.loads, help='JSON {option: [values]} replacing the task\'s grid')
    args = ap.parse_args()
    if args.grid:
        if len(args.tasks) != 1:
            raise SystemExit("--grid needs exactly one --tasks")
        GRIDS[args.tasks[0]] = args.grid
    prior = load_prior("default", device=args.device)
    tune, val = load("examples/reference"), load("examples/eval")
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "prior": prior.prior_id, "tasks": {}}
    for task in args.tasks:
        res = data["tasks"][task] = {"grid": [], "validation": []}
        if task == "lowlight":
            res["baselines_tune"], res["baselines_val"] = lowlight_baselines(tune), lowlight_baselines(val)
        else:
            res["nonblind_tune"] = {s: nonblind_deblur(tune, prior, s) for s in sorted(set(GRIDS[task]["steps"]))}
        keys = list(GRIDS[task])
        t0, seen = time.time(), set()
        for values in itertools.product(*GRIDS[task].values()):
            if time.time() - t0 > args.budget:
                break
            cfg = dict(zip(keys, values))
            if cfg.get("passes", 1) == 1:
                cfg.pop("later_update_from", None)  # meaningless with one chain
            if json.dumps(cfg, sort_keys=True) in seen:
                continue
            seen.add(json.dumps(cfg, sort_keys=True))
            row = {"config": cfg, **RUN[task](tune, prior, cfg)}
            row["mean_psnr"] = statistics.mean(row["psnr"])
            res["grid"].append(row)
            print(task, json.dumps(row), flush=True)
            args.out.write_text(json.dumps(data, indent=1))
        best = sorted(res["grid"], key=lambda r: -r["mean_psnr"])[:args.top]
        for row in best:
            v = {"config": row["config"], **RUN[task](val, prior, row["config"])}
            v["mean_psnr"] = statistics.mean(v["psnr"])
            if task == "blind-deblur":
                v["nonblind"] = nonblind_deblur(val, prior, row["config"]["steps"])
            res["validation"].append(v)
            print(task, "validation", json.dumps(v), flush=True)
            args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
