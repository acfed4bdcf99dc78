"""Evaluation of GDP against classical baselines on clean reference images (no Prefect here).

Protocol (the paper's, GDP_REFERENCE sec. 3.0-3.4): each reference image `[1, 3, H, W]` in [0, 1]
is degraded by `degrade` with the task's operator in `PROTOCOL` (x4 average pooling; the 9x9
kernel with a valid convolution; 25% of the pixels missing, mask seed 0; the channel mean),
then restored by GDP (`gdp.restore`, fixed seed) and by every baseline of `gdp.baselines`.
Every output is rounded to 8 bits (what the saved PNG holds) before it is scored: PSNR and SSIM
against the reference, consistency PSNR of A(output) against y, and LPIPS where its weights
are on this machine (`lpips_scorer`; nothing is ever downloaded).
"""

from __future__ import annotations

import importlib.util
import math
import posixpath
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

from gdp.baselines import BASELINES, Baseline, EvalCase
from gdp.metrics import consistency_psnr, psnr, ssim
from gdp.operators import degrade, make_operator

# Operator options per task (the observation is `degrade(x, make_operator(task, **options))`), or
# a function (x, generator) -> EvalCase for tasks synthesised otherwise (e.g. a low-light shot:
# gain + noise; an exposure bracket for HDR). A new task is one line here plus its BASELINES entry.
LOWLIGHT_GAIN, LOWLIGHT_NOISE = 0.15, 0.01  # as bench/blind.py
HDR_GAINS, HDR_NOISE = (0.3, 3.0), 0.02


def _lowlight(x: torch.Tensor, generator: torch.Generator) -> EvalCase:
    """A dark shot: gain 0.15 and noise sigma 0.01 (`gdp.operators.low_light`)."""
    from gdp.operators import low_light
    return EvalCase(make_operator("lowlight"), low_light(x, gain=LOWLIGHT_GAIN, noise=LOWLIGHT_NOISE,
                                                         generator=generator), tuple(x.shape), x)


def _hdr(x: torch.Tensor, generator: torch.Generator) -> EvalCase:
    """Two exposures at gains 0.3 and 3.0, clipped at white, noise sigma 0.02, stacked on channels."""
    from gdp.operators import exposure_bracket
    shots = exposure_bracket(x, HDR_GAINS, noise=HDR_NOISE, generator=generator)
    return EvalCase(make_operator("hdr", exposures=len(shots)), torch.cat(shots, dim=1), tuple(x.shape), x)


PROTOCOL: dict[str, dict | Callable[[torch.Tensor, torch.Generator], EvalCase]] = {
    "sr": {"factor": 4},
    "deblur": {"mode": "valid"},
    "inpaint": {"ratio": 0.25, "seed": 0},
    "colorize": {},
    "lowlight": _lowlight,
    "hdr": _hdr,
}
ALIGN = 4  # references are cropped to a multiple of the SR factor
COLUMNS = ["image", "task", "method", "steps", "psnr", "ssim", "consistency_psnr", "lpips", "seconds", "nfe",
           "prior_id", "output"]
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MethodOutput:
    method: str
    image: torch.Tensor  # [1, C, H, W] in [0, 1], rounded to 8 bits
    seconds: float
    nfe: int = 0
    steps: int | None = None


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] pixels to 8-bit levels, as `gdp.io.write_image` stores them."""
    return (x.clamp(0, 1) * 255).round() / 255


def fit_reference(x: torch.Tensor) -> torch.Tensor:
    """RGB `[1, 3, H', W']`, cropped to multiples of ALIGN (gray references are repeated over RGB)."""
    h, w = x.shape[-2] // ALIGN * ALIGN, x.shape[-1] // ALIGN * ALIGN
    return x[..., :h, :w].expand(-1, 3, -1, -1).contiguous()


def observe(x: torch.Tensor, task: str, *, noise_sigma: float = 0.0, seed: int = 0) -> EvalCase:
    """The task's observation of the reference x `[1, 3, H, W]`, made with `degrade` (PROTOCOL)."""
    if task not in PROTOCOL:
        raise ValueError(f"no evaluation protocol for task {task!r}; choose from {', '.join(PROTOCOL)}")
    generator = torch.Generator().manual_seed(seed)
    if callable(PROTOCOL[task]):
        return PROTOCOL[task](x, generator)
    op = make_operator(task, **PROTOCOL[task])
    return EvalCase(op, degrade(x, op, noise_sigma=noise_sigma, generator=generator), tuple(x.shape), x)


def run_baseline(case: EvalCase, name: str, baseline: Baseline) -> MethodOutput:
    t0 = time.perf_counter()
    image = baseline.fn(case)
    return MethodOutput(name, quantise(image), time.perf_counter() - t0)


def run_gdp(case: EvalCase, task: str, prior, *, mode: str, steps: int, seed: int, **restore_options) -> MethodOutput:
    """GDP-x0 or GDP-xt (`mode`) with the task's default guidance scale."""
    from gdp.restore import default_guidance, restore
    result = restore(case.y, task, prior, operator=case.op, steps=steps, seed=seed,
                     guidance=default_guidance(task, mode=mode), **restore_options)
    return MethodOutput(f"gdp-{mode}", quantise(result.image.cpu()), result.seconds, result.nfe, steps)


def score(case: EvalCase, image: torch.Tensor, lpips: Scorer | None = None) -> dict:
    """PSNR, SSIM and LPIPS against the reference, consistency PSNR against y (floats, dB). Blind
    operators: consistency with the parameters bound to `case.op` (GDP's own estimate, right after
    its restore); NaN when none are bound (a baseline estimates none)."""
    x = case.reference
    unbound = getattr(case.op, "blind", False) and case.op.params is None
    return {"psnr": float(psnr(image, x)[0]), "ssim": float(ssim(image, x)[0]),
            "consistency_psnr": math.nan if unbound else float(consistency_psnr(case.op, image, case.y)[0]),
            "lpips": float(lpips(image, x)[0]) if lpips else math.nan}


def evaluate_image(x: torch.Tensor, name: str, prior, *, tasks: Sequence[str], steps: int,
                   guidance: Sequence[str] = ("x0",), seed: int = 0, baselines: bool = True,
                   out_uri: str | None = None, lpips: Scorer | None = None,
                   log: Callable[[str], None] | None = None, **restore_options) -> list[dict]:
    """Rows (COLUMNS) for one reference x `[1, C, H, W]`: every task x (GDP modes + baselines).

    With `out_uri`, each output is written to OUT/images/NAME/TASK/METHOD.png (and the
    observation to observation.png). `restore_options` go to `gdp.restore` (tiling, stride, ...).
    """
    x = fit_reference(x.float().cpu())
    rows = []
    for task in tasks:
        case = observe(x, task, seed=seed)
        folder = posixpath.join(out_uri.rstrip("/"), "images", name, task) if out_uri else None
        if folder:
            shots = case.y.split(3, dim=1) if case.y.shape[1] > 3 else (case.y,)  # HDR: one PNG per exposure
            for k, shot in enumerate(shots):
                _write_png(posixpath.join(folder, "observation.png" if len(shots) == 1 else
                                          f"observation-{k + 1}.png"), shot)
        first = len(rows)
        for out in _outputs(case, task, prior, baselines, guidance, steps, seed, restore_options):
            # scored as it comes: a blind operator holds the estimate of the last restore
            uri = _write_png(posixpath.join(folder, f"{out.method}.png"), out.image) if folder else None
            rows.append({"image": name, "task": task, "method": out.method, "steps": out.steps,
                         **score(case, out.image, lpips), "seconds": out.seconds, "nfe": out.nfe,
                         "prior_id": prior.prior_id, "output": uri})
        if log:
            log(f"{name} {task}: " + ", ".join(f"{r['method']} {r['psnr']:.2f} dB" for r in rows[first:]))
    return rows


def _outputs(case: EvalCase, task: str, prior, baselines: bool, guidance: Sequence[str], steps: int, seed: int,
             restore_options: dict) -> Iterator[MethodOutput]:
    """Every baseline of the task (if `baselines`), then GDP per guidance mode, one at a time."""
    if baselines:
        for name, baseline in BASELINES.get(task, {}).items():
            yield run_baseline(case, name, baseline)
    for mode in guidance:
        yield run_gdp(case, task, prior, mode=mode, steps=steps, seed=seed, **restore_options)


def _write_png(uri: str, image: torch.Tensor) -> str:
    from gdp.io import write_image
    write_image(uri, image.cpu())
    return uri


# ----------------------------------------------------------------------------------- results


def results_frame(rows: Iterable[dict]):
    """A pandas DataFrame with COLUMNS (steps and nfe as nullable integers)."""
    import pandas as pd
    df = pd.DataFrame(list(rows), columns=COLUMNS)
    return df.astype({"steps": "Int64", "nfe": "Int64"})


def summary(rows: Iterable[dict]):
    """Mean per task and method (tasks and methods in first-seen order), with the image count."""
    df = results_frame(rows)
    return df.groupby(["task", "method"], sort=False).agg(
        images=("image", "nunique"), steps=("steps", "max"), psnr=("psnr", "mean"), ssim=("ssim", "mean"),
        consistency_psnr=("consistency_psnr", "mean"), lpips=("lpips", "mean"), seconds=("seconds", "mean"),
        nfe=("nfe", "mean")).reset_index()


def comparisons(rows: Iterable[dict]) -> list[dict]:
    """GDP (each mode) against each baseline of the same task: mean differences, win or lose."""
    means = summary(rows)
    out = []
    for task, group in means.groupby("task", sort=False):
        gdp = group[group.method.str.startswith("gdp-")]
        base = group[~group.method.str.startswith("gdp-")]
        for _, g in gdp.iterrows():
            for _, b in base.iterrows():
                d_psnr, d_ssim = g.psnr - b.psnr, g.ssim - b.ssim
                out.append({"task": task, "gdp": g.method, "baseline": b.method, "d_psnr": d_psnr,
                            "d_ssim": d_ssim, "psnr": _verdict(d_psnr), "ssim": _verdict(d_ssim)})
    return out


def _verdict(delta: float) -> str:
    return "win" if delta > 0 else "lose" if delta < 0 else "tie"


def markdown_report(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """Mean per task and method, then GDP against every baseline (win or lose)."""
    means = summary(rows)
    images = means.images.max() if len(means) else 0
    intro = f"{images} image(s); outputs rounded to 8 bits before scoring; consistency = PSNR of A(output) " \
            "against the observation."
    lines = ["# GDP evaluation", "", intro, ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    lines += ["| task | method | images | steps | PSNR dB | SSIM | consistency dB | LPIPS | seconds | NFE |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in means.itertuples():
        lines.append(f"| {r.task} | {r.method} | {r.images} | {'-' if _missing(r.steps) else int(r.steps)} | "
                     f"{r.psnr:.2f} | {r.ssim:.4f} | {r.consistency_psnr:.2f} | "
                     f"{'-' if _missing(r.lpips) else format(r.lpips, '.4f')} | {r.seconds:.2f} | {r.nfe:.0f} |")
    lines += ["", "## GDP against each baseline (difference of the means)", "",
              "| task | GDP | baseline | ΔPSNR dB | ΔSSIM | PSNR | SSIM |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['task']} | {c['gdp']} | {c['baseline']} | {c['d_psnr']:+.2f} | {c['d_ssim']:+.4f} | "
              f"{c['psnr']} | {c['ssim']} |" for c in comparisons(rows)]
    return "\n".join(lines) + "\n"


def _missing(value) -> bool:
    import pandas as pd
    return value is None or bool(pd.isna(value))


def write_results(rows: Sequence[dict], out_uri: str, notes: Sequence[str] = (),
                  storage_options: dict | None = None) -> tuple[str, str]:
    """OUT/results.parquet (one row per image x task x method) and OUT/summary.md: their URIs."""
    parquet, report = (posixpath.join(out_uri.rstrip("/"), name) for name in ("results.parquet", "summary.md"))
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    with fsspec.open(parquet, "wb", **(storage_options or {})) as f:
        results_frame(rows).to_parquet(f, index=False)
    with fsspec.open(report, "w", **(storage_options or {})) as f:
        f.write(markdown_report(rows, notes))
    return parquet, report


# ------------------------------------------------------------------------------------- LPIPS

ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's file name in the torch hub cache


def lpips_scorer() -> tuple[Scorer | None, str]:
    """(LPIPS-AlexNet v0.1 per image `[B]`, note), or (None, why it is skipped). Never downloads:
    the `lpips` package and torchvision's AlexNet weights must already be on this machine."""
    if importlib.util.find_spec("lpips") is None:
        return None, "LPIPS skipped: the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not weights.exists():
        return None, f"LPIPS skipped: AlexNet weights not found at {weights} (nothing is downloaded)"
    import lpips
    model = lpips.LPIPS(net="alex", verbose=False).eval()

    def scorer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(a * 2 - 1, b * 2 - 1).flatten()
    return scorer, "LPIPS: AlexNet, v0.1 (lpips package)"
