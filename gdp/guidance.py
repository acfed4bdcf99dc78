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
# The data step per task (docs/BENCHMARKS.md, "The data step"): solved where the operator is
# linear, the paper's gradient step for the blind tasks, whose parameters are estimated with it.
DEFAULT_DATA_STEPS = {"sr": "project", "deblur": "cg", "inpaint": "project", "colorize": "project",
                      "lowlight": "gradient", "hdr": "gradient", "blind-deblur": "gradient"}
# Settings of the solved steps, measured on held-out crops (bench/data_step.py): fresh re-noising
# (zeta 1) beat the posterior and partial re-noising on every task; 40 CG iterations for deblurring.
SOLVED_DEFAULTS = {"cg_iters": 40, "zeta": 1.0, "prox": 1.0}
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
    # The data step (see `consistent_x0`): the paper's capped gradient step on x0_hat ("gradient"),
    # `cg_iters` conjugate-gradient iterations on the regularised data term from x0_hat ("cg"), or
    # its closed form for row-orthogonal operators ("project": range/null-space split; others: cg).
    data_step: Literal["gradient", "cg", "project"] = "gradient"
    cg_iters: int = 5
    sigma_y: float = 0.0  # std of the observation's noise, [0, 1] units
    prox: float = 1.0  # lambda of the proximal weight rho_t = lambda (2 sigma_eff)^2 / sigma_bar_t^2
    # Re-noising after a solved data step: None keeps the prior's posterior q(x_{t-1} | x_t, x0~)
    # (as GDP); zeta in [0, 1] is DiffPIR's mix of the implied noise (0, DDIM) and fresh noise (1).
    zeta: float | None = None

    def __post_init__(self):
        if self.mode not in ("x0", "xt"):
            raise ValueError(f"unknown guidance mode {self.mode!r}: use 'x0' or 'xt'")
        if self.scale < 0:
            raise ValueError("guidance scale must be >= 0")
        if self.data_step not in ("gradient", "cg", "project"):
            raise ValueError(f"unknown data step {self.data_step!r}: use 'gradient', 'cg' or 'project'")
        if self.data_step != "gradient" and self.mode != "x0":
            raise ValueError(f"the {self.data_step!r} data step works on x0_hat: use mode 'x0'")
        if not (0 <= self.sigma_y <= 1) or self.prox < 0 or self.cg_iters < 1:
            raise ValueError(f"need 0 <= sigma_y <= 1, prox >= 0 and cg_iters >= 1, got sigma_y={self.sigma_y}, "
                             f"prox={self.prox}, cg_iters={self.cg_iters}")
        if self.zeta is not None and not 0 <= self.zeta <= 1:
            raise ValueError(f"zeta must be in [0, 1] (or None for the posterior), got {self.zeta}")

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


# ---------------------------------------------------------------------------- solved data steps

# Quantisation to 8 bits is noise of std 1/(255 sqrt(12)) even in a "noiseless" observation: it
# keeps the proximal weight positive, so a solve never amplifies it without bound.
QUANTISATION_SIGMA = 1.0 / (255.0 * 12 ** 0.5)


def adjoint(operator, r: torch.Tensor, x_shape: tuple[int, ...]) -> torch.Tensor:
    """A^T r `[B, C, H, W]`: the operator's closed-form adjoint, else autograd's vector-Jacobian
    product through `operator.A` (exact for the linear wrappers: crops, upsampling, window masks)."""
    if getattr(operator, "linear", False) and hasattr(operator, "A_adjoint"):
        return operator.A_adjoint(r, x_shape=x_shape)
    with torch.enable_grad():
        x = torch.zeros(x_shape, device=r.device, dtype=r.dtype, requires_grad=True)
        (g,) = torch.autograd.grad(operator.A(x), x, grad_outputs=r)
    return g


def proximal_weight(guidance: Guidance, sigma_bar_sq: float) -> float:
    """rho_t of DiffPIR (Zhu et al. 2023, eq. 13) in [0, 1] units: lambda (2 sigma_y)^2 / sigma_bar_t^2,
    sigma_bar_t^2 = (1 - alpha_bar_t) / alpha_bar_t the variance of x0_hat's error in [-1, 1] units."""
    sigma_eff_sq = guidance.sigma_y ** 2 + QUANTISATION_SIGMA ** 2
    return guidance.prox * 4 * sigma_eff_sq / sigma_bar_sq


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image inner product `[B, 1, 1, 1]`."""
    return (a * b).flatten(1).sum(dim=1).view(-1, 1, 1, 1)


def conjugate_gradient(operator, x0: torch.Tensor, y: torch.Tensor, rho: float, iters: int) -> torch.Tensor:
    """`iters` CG iterations on (A^T A + rho I) x = A^T y + rho x0 from x = x0, per image (all in [0, 1]).
    The system is the normal equation of argmin_x |A x - y|^2 + rho |x - x0|^2; a few iterations
    fit the well-conditioned part first, so stopping early regularises as well (DDS, Chung et al. 2024)."""
    x_shape = tuple(x0.shape)
    x = x0
    r = adjoint(operator, y - operator.A(x0), x_shape)  # b - M x0: the rho terms cancel at x0
    p, rs = r, _dot(r, r)
    for _ in range(iters):
        mp = adjoint(operator, operator.A(p), x_shape) + rho * p
        alpha = rs / _dot(p, mp).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * mp
        rs_next = _dot(r, r)
        p = r + (rs_next / rs.clamp_min(1e-30)) * p
        rs = rs_next
    return x


def project(operator, x0: torch.Tensor, y: torch.Tensor, rho: float, c: float) -> torch.Tensor:
    """Closed-form argmin_x |A x - y|^2 + rho |x - x0|^2 for A A^T = c I (`Operator.gram_scalar`):
    x0 + A^T (y - A x0) / (c + rho). At rho = 0 it is DDNM's range/null-space split, A^+ y + (I - A^+ A) x0."""
    return x0 + adjoint(operator, y - operator.A(x0), tuple(x0.shape)) / (c + rho)


def consistent_x0(operator, x0_hat: torch.Tensor, y: torch.Tensor, guidance: Guidance, sigma_bar_sq: float) -> torch.Tensor:
    """x0~ in [-1, 1]: x0_hat moved to (near) agreement with y by the solved data step."""
    rho = proximal_weight(guidance, sigma_bar_sq)
    x0 = (x0_hat + 1) / 2
    c = operator.gram_scalar() if guidance.data_step == "project" and hasattr(operator, "gram_scalar") else None
    if c is not None:
        x = project(operator, x0, y, rho, c)
    else:
        x = conjugate_gradient(operator, x0, y, rho, guidance.cg_iters)
    return (2 * x - 1).clamp(-1, 1)
