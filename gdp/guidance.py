"""Guidance losses of GDP (Fei et al., CVPR 2023, Alg. 1-2; GDP_REFERENCE sec. 2 and 3.7).

The data loss is evaluated in [0, 1] space on u(z) = (z + 1) / 2, z being x0_hat (GDP-x0) or
x_t (GDP-xt):  L_b = s_eff * sum((A u(z_b) - y_b)^2) / N  [+ w_col * L_col(z_b)], summed over the
batch so that every image gets the gradient of its own loss only.

Two rules make one scale `s` mean the same thing everywhere (GDP_REFERENCE sec. 7.14):
- size: N is the number of observation elements the operator gives for a 256x256 image (the
  paper's size), not for the image at hand, so the pull on each pixel does not weaken as images
  grow; at 256x256 this is exactly the paper's mean. `size_rule="paper"` uses the actual mean.
- steps: `s` is quoted for the paper's 1000 steps; with K steps each step applies
  s * 1000 / K, keeping the total pull over the chain constant. `step_rule="paper"` keeps s.
  One step moves A u(z) by -(s/2N) A A^T r, so a per-step scale above 2N / ||A||^2 would
  overshoot the observation (and diverge above twice that): the per-step scale is capped at
  `max_correction` * 2N / ||A||^2, ||A||^2 found by power iteration (this only binds below
  about 50 steps with the paper's scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# The paper's default scales (GDP_REFERENCE sec. 2.5), quoted at 1000 steps.
PAPER_SCALES = {"sr": 2000.0, "deblur": 6000.0, "inpaint": 4000.0, "colorize": 6000.0,
                "lowlight": 80000.0, "hdr": 80000.0, "blind-deblur": 6000.0}
# Our defaults, measured with the shipped 64-px prior on held-out photos (docs/BENCHMARKS.md):
# a small prior needs a firmer pull towards the observation than ImageNet ADM (SR x4 at 50 steps:
# 25.82 dB at 2000, 27.55 dB at 16000; deblur 26.03 -> 26.32 dB at 48000; inpaint 34.99 -> 37.10 dB).
DEFAULT_SCALES = {"sr": 16000.0, "deblur": 48000.0, "inpaint": 48000.0, "colorize": 6000.0,
                  "lowlight": 80000.0, "hdr": 80000.0, "blind-deblur": 48000.0}
PAPER_COLOR_WEIGHT = 500.0
REFERENCE_SIZE = 256
REFERENCE_STEPS = 1000


@dataclass(frozen=True)
class Guidance:
    """How the observation steers sampling."""

    scale: float = 2000.0  # s, quoted at 1000 steps and a 256x256 image
    mode: Literal["x0", "xt"] = "x0"  # gradient w.r.t. x0_hat (GDP-x0) or x_t (GDP-xt)
    color_weight: float = 0.0  # weight of the colour-constancy loss L_col (colorization: 500)
    exposure_weight: float = 0.0  # weight of the exposure-control loss L_exp (low light, HDR: optional)
    step_rule: Literal["constant-total", "paper"] = "constant-total"
    size_rule: Literal["per-pixel", "paper"] = "per-pixel"
    max_correction: float | None = 1.0  # cap on the per-step pull (fraction of a full correction)

    def __post_init__(self):
        if self.mode not in ("x0", "xt"):
            raise ValueError(f"unknown guidance mode {self.mode!r}: use 'x0' or 'xt'")
        if self.scale < 0:
            raise ValueError("guidance scale must be >= 0")

    def step_scale(self, steps: int) -> float:
        """s applied at each of `steps` steps."""
        return self.scale * (REFERENCE_STEPS / steps if self.step_rule == "constant-total" else 1.0)


def operator_norm_sq(operator, x_shape: tuple[int, ...], device: torch.device | str = "cpu",
                     iterations: int = 30) -> float:
    """||A||^2, the largest eigenvalue of A^T A (power iteration through autograd) on x_shape.

    A batch is treated as one block-diagonal operator, so this is the largest over the images.
    Computed on a 128x128 canvas when the operator accepts one (the operators are convolutional
    or pointwise, so the norm does not grow with size), else on x_shape itself.
    """
    if x_shape[-1] > 128 or x_shape[-2] > 128:
        try:
            return operator_norm_sq(operator, (*x_shape[:-2], 128, 128), device, iterations)
        except (ValueError, RuntimeError):  # e.g. an explicit mask of the full size
            pass
    g = torch.Generator().manual_seed(0)
    v = torch.randn(tuple(x_shape), generator=g).to(device)
    v = v / v.norm()
    value = 0.0
    for _ in range(iterations):
        with torch.enable_grad():
            x = v.detach().requires_grad_(True)
            ax = operator.A(x)
            (ata_v,) = torch.autograd.grad(ax, x, grad_outputs=ax.detach())
        value = float((v * ata_v).sum())
        v = ata_v / ata_v.norm().clamp_min(1e-30)
    return value


def color_constancy(z: torch.Tensor) -> torch.Tensor:
    """Zero-DCE colour-constancy loss per image, `[B]`, on z `[B, 3, H, W]` (any range)."""
    m = z.mean(dim=(2, 3))
    d_rg, d_rb, d_gb = (m[:, 0] - m[:, 1]) ** 2, (m[:, 0] - m[:, 2]) ** 2, (m[:, 2] - m[:, 1]) ** 2
    return torch.sqrt(d_rg ** 2 + d_rb ** 2 + d_gb ** 2 + 1e-12)


def exposure_control(z: torch.Tensor, patch: int = 8, level: float = 0.3) -> torch.Tensor:
    """Zero-DCE exposure loss per image `[B]` as in the reference (sec. 3.7): the gray mean of
    `patch` x `patch` blocks against `level`, on z in [-1, 1] (0.3 there is 0.65 in [0, 1])."""
    pooled = F.avg_pool2d(z.mean(dim=1, keepdim=True), patch, ceil_mode=True)
    return (pooled - level).square().flatten(1).mean(dim=1)


def blind_part(operator):
    """The blind operator inside `operator` (through wrappers holding it as `.inner`), or None."""
    while operator is not None:
        if getattr(operator, "blind", False):
            return operator
        operator = getattr(operator, "inner", None)
    return None


def normaliser(operator, y: torch.Tensor, x_shape: tuple[int, ...], size_rule: str) -> int:
    """N of the data loss: observation elements per image at 256x256 (per-pixel) or actual (paper).
    With several guiding observations stacked in y (HDR), N is that of one: the image receives the
    sum of their guidances."""
    guides = getattr(blind_part(operator), "guides", 1)
    if size_rule == "paper":
        return y[0].numel() // guides
    c = x_shape[1]
    try:
        return int(torch.Size(operator.y_shape((1, c, REFERENCE_SIZE, REFERENCE_SIZE))).numel()) // guides
    except ValueError:  # bound to one size (an explicit inpainting mask): a same-size operator
        return y.shape[1] * REFERENCE_SIZE * REFERENCE_SIZE // guides


def residual_sq(operator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image sum of squared residuals `[B]` of A u(z) against y (all in [0, 1] space)."""
    r = operator.A((z + 1) / 2) - y
    return r.square().flatten(1).sum(dim=1)


def guidance_gradient(operator, z: torch.Tensor, y: torch.Tensor, scale: float | torch.Tensor, n: int,
                      color_weight: float = 0.0, exposure_weight: float = 0.0,
                      blind=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(g = -dL/dz, per-image mean squared residual `[B]`, gradients of the blind operator's
    parameters); autograd on detached leaf copies of z (and of the parameters). `scale`: a float
    or one value per image `[B]`, or per image and stacked guide `[B, K]`. The parameters' loss is the blind operator's own (`param_loss`
    of the unscaled residual plus `penalty`), at the same z and the same (pre-step) parameters."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        params = {}
        if blind is not None:
            params = {k: v.detach().requires_grad_(True) for k, v in blind.params.items()}
            blind.bind(params)
        if torch.is_tensor(scale) and scale.dim() == 2:  # one scale per image and guide [B, K] (HDR)
            r = operator.A((z + 1) / 2) - y
            sq_guides = r.square().flatten(1).unflatten(1, (scale.shape[1], -1)).sum(dim=2)
            sq = sq_guides.sum(dim=1)
            loss = (scale * sq_guides).sum(dim=1) / n
        else:
            sq = residual_sq(operator, z, y)
            loss = scale * sq / n
        if color_weight:
            loss = loss + color_weight * color_constancy(z)
        if exposure_weight:
            loss = loss + exposure_weight * exposure_control(z)
        (grad,) = torch.autograd.grad(loss.sum(), z, retain_graph=blind is not None)
        param_grads = {}
        if blind is not None:
            param_loss = blind.param_loss(sq, y) + blind.penalty(params)
            grads = torch.autograd.grad(param_loss.sum(), list(params.values()), allow_unused=True)
            param_grads = {k: torch.zeros_like(v) if gk is None else gk for (k, v), gk in zip(params.items(), grads)}
            blind.bind({k: v.detach() for k, v in params.items()})
    return -grad, sq.detach() / y[0].numel(), param_grads
