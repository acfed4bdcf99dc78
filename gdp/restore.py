"""One call restores one (or a batch of) observation(s): `restore(y, task, prior, ...) -> Restoration`.

Ranges: observations and restored images are `[B, C, H, W]` in [0, 1]; the sampler works in
model space [-1, 1] (conversion happens in `gdp.sampling`/`gdp.guidance` only through u(z)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from gdp.guidance import PAPER_COLOR_WEIGHT, PAPER_SCALES, Guidance
from gdp.metrics import consistency_psnr
from gdp.operators import Operator, make_operator
from gdp.prior.checkpoint import Prior
from gdp.sampling import Callback, gdp_sample, make_generators

LINEAR_TASKS = ("sr", "deblur", "inpaint", "colorize")


@dataclass(frozen=True)
class Restoration:
    image: torch.Tensor  # [B, C, H, W] in [0, 1]
    task: str
    steps: int
    nfe: int  # network evaluations per image
    seconds: float
    consistency_psnr: torch.Tensor  # [B] dB, PSNR of A(image) against y
    tiling: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def default_guidance(task: str, *, scale: float | None = None, mode: Literal["x0", "xt"] = "x0",
                     step_rule: str = "constant-total", size_rule: str = "per-pixel") -> Guidance:
    """The paper's scale and extra terms for `task`, overridable."""
    if task not in PAPER_SCALES:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(PAPER_SCALES)}")
    return Guidance(scale=PAPER_SCALES[task] if scale is None else scale, mode=mode,
                    color_weight=PAPER_COLOR_WEIGHT if task == "colorize" else 0.0,
                    step_rule=step_rule, size_rule=size_rule)


def restore(y: torch.Tensor, task: str, prior: Prior, *, operator: Operator | None = None, steps: int = 100,
            seed: int = 0, guidance: Guidance | None = None, samples: int = 1, callback: Callback | None = None,
            **operator_options) -> Restoration:
    """Restore observation(s) y `[B, C', h, w]` in [0, 1] with GDP; image b uses seed + b.

    `samples` > 1 averages that many posterior samples per image (an MMSE estimate).
    """
    op = operator or make_operator(task, **operator_options)
    guidance = guidance or default_guidance(task)
    device = prior.device
    y = y.to(device=device, dtype=torch.float32)
    x_shape = tuple(op.x_shape(tuple(y.shape)))
    x_shape = (x_shape[0], prior.spec.unet.in_channels, *x_shape[2:])
    denoiser = prior.denoiser()
    total = torch.zeros(x_shape, device=device)
    nfe, seconds = 0, 0.0
    for k in range(samples):
        gens = make_generators(seed + 1_000_003 * k, y.shape[0])
        step_cb = None if callback is None else (lambda n, m, k=k: callback(k * m + n, samples * m))
        result = gdp_sample(denoiser, op, y, steps, guidance=guidance, generators=gens, x_shape=x_shape,
                            callback=step_cb)
        total += (result.x0 + 1) / 2
        nfe, seconds = nfe + result.nfe, seconds + result.seconds
    image = (total / samples).clamp(0, 1)
    return Restoration(image, task, steps, nfe, seconds, consistency_psnr(op, image, y))
