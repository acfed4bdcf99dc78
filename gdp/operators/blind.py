"""Blind degradations: low-light enhancement and HDR (GDP eq. 10, GDP_REFERENCE sec. 3.5-3.7), and
blind deblurring (beyond the paper).

A blind operator has unknown parameters phi, **one set per image** (the authors' code shares them
across a batch, which breaks beyond 4 images: GDP_REFERENCE sec. 7.11). The sampler estimates
them jointly with the image (gdp.sampling.gdp_sample): at every reverse step, at the same x0_hat
and the same pre-step phi as the image guidance,

    phi <- project(phi - lr * d/dphi [ mean_b((A_phi u(x0_hat) - y)^2) + penalty(phi) ])

one step per diffusion step, as in the reference (plain gradient descent, lr 1 for the gain f).
The image guidance does not see `penalty`; the quality losses on the image (exposure, colour) are
part of `gdp.guidance.Guidance`. Parameters whose name is in `adam` take an Adam step (element-wise,
so still per image) instead of a plain one. `bind(params)` sets phi; `A(x)` then uses it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._padding import border_indices, pad_axis
from .base import Operator, Shape, _check_image, register

Params = dict[str, Tensor]


class BlindOperator(Operator):
    """An operator with per-image parameters estimated during sampling (see the module docstring)."""

    linear: ClassVar[bool] = False
    blind: ClassVar[bool] = True
    guides: int = 1  # observations stacked in y, each guiding the image (HDR: the exposures)
    update_from: float = 0.0  # fraction of the chain during which phi stays at its start
    iters: int = 1  # updates of phi per diffusion step, all at the same x0_hat (the reference: 1)
    passes: int = 1  # sampling chains; each later chain starts from the previous chain's estimate
    later_update_from: float = 0.0  # update_from of the later chains (1.0: phi fixed there)

    def __init__(self) -> None:
        super().__init__()
        self.params: Params | None = None
        self.lr: dict[str, float] = {}
        self.adam: frozenset[str] = frozenset()

    def init_params(self, y: Tensor, x_shape: Shape) -> Params:
        """Initial phi for observations y `[B, ...]` (one set per image)."""
        raise NotImplementedError

    def apply(self, x: Tensor, params: Params) -> Tensor:
        """A_phi(x) for images x `[B, C, H, W]` in [0, 1]."""
        raise NotImplementedError

    def A(self, x: Tensor) -> Tensor:
        if self.params is None:
            raise ValueError(f"{self.name}: parameters not set (bind() or init_params() first)")
        return self.apply(x, self.params)

    def bind(self, params: Params) -> "BlindOperator":
        self.params = params
        return self

    def penalty(self, params: Params) -> Tensor:
        """Regulariser of phi per image `[B]` (enters the phi update only)."""
        return torch.zeros(next(iter(params.values())).shape[0], device=next(iter(params.values())).device)

    def project(self, params: Params) -> Params:
        """Constraints after an update (default: none)."""
        return params

    def param_loss(self, sq: Tensor, y: Tensor) -> Tensor:
        """Data term of the phi update per image from the summed squared residual `sq` `[B]`:
        the mean squared residual of each guiding observation (summed over the guides)."""
        return sq * self.guides / y[0].numel()

    def norm_sq(self, params: Params) -> Tensor:
        """||A_phi||^2 per image `[B]` (for the per-step guidance cap)."""
        raise NotImplementedError

    def guide_norm_sq(self, params: Params) -> Tensor:
        """||A_phi||^2 per image and guide `[B, guides]` (default: one guide)."""
        return self.norm_sq(params)[:, None]

    def describe(self, params: Params | None = None) -> list[dict]:
        """The estimated parameters per image, JSON-ready."""
        raise NotImplementedError

    def localize(self, y: Tensor, windows: list) -> tuple[torch.nn.Module, Tensor]:
        """(the operator restricted to `windows` of image 0 with phi fixed, their observations)."""
        raise NotImplementedError(f"hierarchical tiling does not support {self.name} yet; use --tiling fused")

    def y_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        return (b, c * self.guides, h, w)

    def x_shape(self, y_shape: Shape) -> Shape:
        b, c, h, w = y_shape
        if c % self.guides:
            raise ValueError(f"{self.name}: expected {self.guides} stacked observations, got {c} channels")
        return (b, c // self.guides, h, w)

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        raise NotImplementedError(f"{self.name} has no pseudo-inverse: its parameters are unknown")


def upsample_grid(grid: Tensor, height: int, width: int) -> Tensor:
    """A smooth map `[B, K, H, W]` from control values `[B, K, G, G]` (bilinear)."""
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)


def tv(grid: Tensor) -> Tensor:
    """The reference's L_TV per image (sec. 3.7) on `[B, K, h, w]`, averaged over K."""
    h, w = grid.shape[-2:]
    dv = (grid[..., 1:, :] - grid[..., :-1, :]).square().sum(dim=(-2, -1)) / max((h - 1) * w, 1)
    dh = (grid[..., :, 1:] - grid[..., :, :-1]).square().sum(dim=(-2, -1)) / max(h * (w - 1), 1)
    return (2 * (dv + dh)).mean(dim=1)


class Affine(torch.nn.Module):
    """Fixed y_k = [clip](f_k x + M_k) on a batch of windows: f `[N, K]`, M `[N, K, P, P]`."""

    def __init__(self, f: Tensor, mask: Tensor, clip: bool):
        super().__init__()
        self.f, self.mask, self.clip = f, mask, clip

    def A(self, x: Tensor) -> Tensor:
        return affine(x, self.f, self.mask, self.clip)

    def y_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        return (b, c * self.f.shape[1], h, w)


def affine(x: Tensor, f: Tensor, mask: Tensor, clip: bool) -> Tensor:
    """[f_k x + M_k for k] stacked on channels; x `[B, C, H, W]`, f `[B, K]`, mask `[B, K, H, W]`."""
    out = f[:, :, None, None, None] * x[:, None] + mask[:, :, None]  # [B, K, C, H, W]
    if clip:
        out = out.clamp(0, 1)
    return out.flatten(1, 2)


class _Exposure(BlindOperator):
    """Shared machinery of lowlight (K = 1) and hdr: y_k = [clip](f_k x + M_k), M_k smooth.

    M_k is a single-channel map (broadcast over RGB, as in the reference) parameterised by a grid
    of `grid` x `grid` control values and bilinear upsampling: smooth by construction and the same
    number of unknowns at any image size. The step on a control value is scaled (lr_mask * G^2 / 2)
    so that a persistent mean residual r in its cell moves M by about -lr_mask * r per step.
    init "mean": f = mean(y) / target_mean, M = 0 (a well-exposed output; no sign flips); with
    several exposures, the best-exposed one sets that level and the others their gain ratios to it;
    init "reference": the authors' f ~ N(0, 1) / 100, M ~ U(0, 1) / 1e4 (seeded per image).
    """

    clip: bool = False

    def __init__(self, grid: int, target_mean: float, lr_f: float, lr_mask: float, tv_weight: float, init: str,
                 share: bool = False, seed: int = 0):
        super().__init__()
        if grid < 1 or not 0 < target_mean < 1 or lr_f < 0 or lr_mask < 0 or tv_weight < 0:
            raise ValueError(f"{self.name}: need grid >= 1, 0 < target_mean < 1 and non-negative rates/weights")
        if init not in ("mean", "reference"):
            raise ValueError(f"{self.name}: unknown init {init!r}; use 'mean' or 'reference'")
        self.grid, self.target_mean, self.tv_weight, self.init, self.share, self.seed = (
            grid, target_mean, tv_weight, init, share, seed)
        self.lr = {"f": lr_f, "mask": lr_mask * grid * grid / 2}

    def _k(self) -> int:
        return 1 if self.share else self.guides

    def init_params(self, y: Tensor, x_shape: Shape) -> Params:
        _check_image(y, "observation")
        b, k = y.shape[0], self._k()
        if self.init == "reference":
            gens = [torch.Generator().manual_seed(self.seed + n) for n in range(b)]
            f = torch.stack([torch.randn(k, generator=g) / 100 for g in gens])
            mask = torch.stack([torch.rand(k, self.grid, self.grid, generator=g) / 1e4 for g in gens])
            return {"f": f.to(y), "mask": mask.to(y)}
        if self.guides > 1 and not self.share:
            f = self._relative_gains(y)
        else:
            means = y.unflatten(1, (self.guides, -1)).mean(dim=(2, 3, 4))  # [B, guides]
            f = means.mean(dim=1, keepdim=True).clamp_min(1e-3) / self.target_mean
        return {"f": f, "mask": torch.zeros(b, k, self.grid, self.grid, device=y.device, dtype=y.dtype)}

    def _relative_gains(self, y: Tensor, low: float = 0.02, high: float = 0.98) -> Tensor:
        """Initial gains `[B, K]` of K exposures: the best-exposed one (fewest pixels near black or
        white) gets mean(y)/target_mean; each other one that times its least-squares ratio to it
        over the pixels well exposed in both (a saturated exposure's mean says little)."""
        shots = y.unflatten(1, (self.guides, -1)).flatten(2)  # [B, K, 3HW]
        good = (shots > low) & (shots < high)
        f = torch.empty(shots.shape[:2], device=y.device, dtype=y.dtype)
        for b in range(shots.shape[0]):
            ref = int(good[b].float().mean(dim=1).argmax())
            base = shots[b, ref].mean().clamp_min(1e-3) / self.target_mean
            for k in range(self.guides):
                both = good[b, k] & good[b, ref]
                a, r = (shots[b, k][both], shots[b, ref][both]) if both.sum() >= 16 else (shots[b, k], shots[b, ref])
                f[b, k] = base * (a * r).sum() / r.square().sum().clamp_min(1e-12)
        return f.clamp_min(1e-3)

    def _expand(self, params: Params, height: int, width: int) -> tuple[Tensor, Tensor]:
        f, mask = params["f"], upsample_grid(params["mask"], height, width)
        if self.share and self.guides > 1:
            f, mask = f.expand(-1, self.guides), mask.expand(-1, self.guides, -1, -1)
        return f, mask

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_image(x)
        f, mask = self._expand(params, *x.shape[-2:])
        return affine(x, f, mask, self.clip)

    def penalty(self, params: Params) -> Tensor:
        return self.tv_weight * tv(params["mask"])

    def project(self, params: Params) -> Params:
        return {"f": params["f"].clamp_min(1e-3), "mask": params["mask"].clamp(-1, 1)}

    def param_loss(self, sq: Tensor, y: Tensor) -> Tensor:
        per_guide = sq * self.guides / y[0].numel()  # sum over the guides of their mean squared residual
        return per_guide / self.guides if self.share else per_guide  # shared: the authors' average

    def norm_sq(self, params: Params) -> Tensor:
        return self.guide_norm_sq(params).sum(dim=1)

    def guide_norm_sq(self, params: Params) -> Tensor:
        f = params["f"].expand(-1, self.guides) if self.share else params["f"]
        return f.square()

    def describe(self, params: Params | None = None) -> list[dict]:
        params = params or self.params
        out = []
        for b in range(params["f"].shape[0]):
            m = params["mask"][b]
            out.append({"f": [round(float(v), 5) for v in params["f"][b]],
                        "mask_mean": round(float(m.mean()), 5), "mask_min": round(float(m.min()), 5),
                        "mask_max": round(float(m.max()), 5), "mask_grid": self.grid})
        return out

    def mask_image(self, height: int, width: int, params: Params | None = None) -> Tensor:
        """The estimated maps M `[B, K, H, W]` at full size."""
        return upsample_grid((params or self.params)["mask"], height, width)

    def localize(self, y: Tensor, windows: list) -> tuple[torch.nn.Module, Tensor]:
        f, mask = self._expand(self.params, *y.shape[-2:])
        masks = torch.stack([mask[0][w.index] for w in windows])
        crops = torch.stack([y[0][w.index] for w in windows])
        return Affine(f[:1].expand(len(windows), -1), masks, self.clip), crops


@register
class LowLight(_Exposure):
    """Low light (GDP eq. 10): y = f x + M, f one gain per image, M a smooth map per image.

    Defaults: plain steps on the unscaled mean squared residual as in the reference, but lr 0.1
    for f (the reference's lr 1 lets f and the image's brightness drift together: 16.5 dB against
    27.0 dB on a held-out photo at 20 steps, docs/BENCHMARKS.md), lr_mask 0.01 and a start at
    mean brightness 0.4 (bench/blind_sweep.py on the 128x128 held-out crops: +1.3 dB over
    0.05 / 0.45; a larger lr_mask lets M absorb the image's structure), no TV on M (tv_weight > 0
    adds the reference's L_TV to the phi update).
    """

    name = "lowlight"
    guides = 1

    def __init__(self, grid: int = 8, target_mean: float = 0.4, lr_f: float = 0.1, lr_mask: float = 0.01,
                 tv_weight: float = 0.0, init: str = "mean", seed: int = 0):
        super().__init__(grid, target_mean, lr_f, lr_mask, tv_weight, init, seed=seed)


@register
class HDR(_Exposure):
    """HDR from K >= 2 exposures of one scene stacked on channels, y = [y_1 .. y_K] `[B, 3K, H, W]`:
    y_k = clip(f_k x + M_k, 0, 1). Each exposure has its own (f_k, M_k) (share=True: one pair, the
    authors' choice); the image receives the sum of the K guidances. Clipping (beyond the
    reference) makes saturated pixels of an exposure give no guidance instead of a wrong one.
    """

    name = "hdr"

    def __init__(self, exposures: int = 3, grid: int = 8, target_mean: float = 0.45, share: bool = False,
                 clip: bool = True, lr_f: float = 0.1, lr_mask: float = 0.05, tv_weight: float = 0.0,
                 init: str = "mean", seed: int = 0):
        if exposures < 2:
            raise ValueError(f"hdr needs at least 2 exposures, got {exposures}")
        self.guides = exposures
        super().__init__(grid, target_mean, lr_f, lr_mask, tv_weight, init, share=share, seed=seed)
        self.clip = clip


# ------------------------------------------------------------------------------- blind deblurring


def motion_kernel(size: int, seed: int = 0, length: float | None = None) -> Tensor:
    """A random motion-like blur kernel `[size, size]` (float64, sum 1): a smooth random walk of
    about `length` pixels (default 0.6 * size) with a wobbling direction, rasterised with bilinear
    splats and widened by a small Gaussian."""
    g = torch.Generator().manual_seed(seed)
    length = length or 0.6 * size
    n = 64
    angle = torch.rand((), generator=g) * 2 * math.pi
    turn = torch.cumsum(torch.randn(n, generator=g) * 0.15, 0)
    step = length / n
    pts = torch.cumsum(torch.stack([torch.cos(angle + turn), torch.sin(angle + turn)], 1) * step, 0)
    pts = pts - pts.mean(0) + (size - 1) / 2
    k = torch.zeros(size, size, dtype=torch.float64)
    for x, y in pts.double().clamp(0, size - 1.001):
        x0, y0 = int(x), int(y)
        dx, dy = float(x - x0), float(y - y0)
        for (yy, xx, w) in ((y0, x0, (1 - dx) * (1 - dy)), (y0, x0 + 1, dx * (1 - dy)),
                            (y0 + 1, x0, (1 - dx) * dy), (y0 + 1, x0 + 1, dx * dy)):
            k[yy, xx] += w
    t = torch.arange(-1, 2, dtype=torch.float64)
    gauss = torch.exp(-0.5 * (t / 0.5) ** 2)
    gauss = (gauss[:, None] * gauss[None]) / gauss.sum() ** 2
    k = F.conv2d(k[None, None], gauss[None, None], padding=1)[0, 0]
    return k / k.sum()


@register
class BlindDeblur(BlindOperator):
    """Blurring by an unknown kernel of `kernel_size` x `kernel_size` per image, kept non-negative
    and summing to 1 by a softmax over logits. "same" size with reflect padding, like `deblur`.

    Init: a Gaussian of width `init_sigma` (default kernel_size / 8). The kernel stays there for
    the first `update_from` of the chain (default 0.7: early x0_hat are blurry and would pull the
    kernel towards one that explains a blurry image), then the logits take `iters` Adam steps (lr
    `lr`, default 0.1; default 1 step) per diffusion step on the mean squared residual, all at that
    step's x0_hat. `passes` (default 4) chains are run: each later one starts from fresh noise with
    the last estimate, holds it for `later_update_from` of the chain (default 0.8) and refines it
    in the rest (1.0: fixed, i.e. non-blind GDP with the estimate). Each chain's image is sharper
    than the last one's, so each refinement starts from a better kernel. Defaults from
    bench/blind_sweep.py (GPU sweeps, docs/BENCHMARKS.md): chosen on the 128x128 held-out crops,
    then checked on the 256x256 ones: 4 chains with the last 20% refining gain 1.1 dB there over
    2 chains with the kernel fixed after the first; several steps per diffusion step gained nothing.

    `sparsity` (default 0) weights a sparsity prior on the kernel in its update: the entropy
    -sum k log k (in nats), which is smallest for a single spike and largest for a flat kernel
    (motion blur is a thin path; the data term alone leaves a diffuse halo around it). Measured to
    hurt at every weight from 1e-4 (the kernel collapses towards a spike), neutral at 3e-5: off.
    """

    name = "blind-deblur"

    def __init__(self, kernel_size: int = 15, init_sigma: float | None = None, lr: float = 0.1,
                 update_from: float = 0.7, iters: int = 1, passes: int = 4, later_update_from: float = 0.8,
                 sparsity: float = 0.0):
        super().__init__()
        if sparsity < 0:
            raise ValueError(f"blind deblur needs sparsity >= 0, got {sparsity}")
        self.sparsity = sparsity
        if iters < 1 or passes < 1:
            raise ValueError(f"blind deblur needs iters >= 1 and passes >= 1, got {iters} and {passes}")
        self.update_from, self.iters, self.passes, self.later_update_from = update_from, iters, passes, later_update_from
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"blind deblur needs an odd kernel size >= 3, got {kernel_size}")
        self.kernel_size, self.init_sigma = kernel_size, init_sigma or kernel_size / 8
        self.lr, self.adam = {"logits": lr}, frozenset({"logits"})

    def init_params(self, y: Tensor, x_shape: Shape) -> Params:
        r = (self.kernel_size - 1) / 2
        t = torch.arange(self.kernel_size, dtype=y.dtype, device=y.device) - r
        logits = -(t[:, None] ** 2 + t[None] ** 2) / (2 * self.init_sigma ** 2)
        return {"logits": logits.flatten().expand(y.shape[0], -1).clone()}

    def kernels(self, params: Params | None = None) -> Tensor:
        logits = (params or self.params)["logits"]
        return logits.softmax(dim=1).view(-1, self.kernel_size, self.kernel_size)

    def apply(self, x: Tensor, params: Params) -> Tensor:
        _check_image(x)
        b, c, h, w = x.shape
        k = self.kernels(params)
        before, after = (self.kernel_size - 1) // 2, self.kernel_size // 2
        rows = border_indices(h, before, after, "reflect", device=x.device)
        cols = border_indices(w, before, after, "reflect", device=x.device)
        padded = pad_axis(pad_axis(x, rows, 2), cols, 3)
        weight = k.flip(1, 2)[:, None].repeat_interleave(c, dim=0)  # [B*C, 1, k, k], convolution
        out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
        return out.view(b, c, h, w)

    def penalty(self, params: Params) -> Tensor:
        """sparsity x the entropy of each kernel `[B]` (0 when sparsity is 0)."""
        if not self.sparsity:
            return super().penalty(params)
        log_k = params["logits"].log_softmax(dim=1)
        return -self.sparsity * (log_k.exp() * log_k).sum(dim=1)

    def norm_sq(self, params: Params) -> Tensor:
        return torch.ones(params["logits"].shape[0], device=params["logits"].device)  # a blur: ||A|| <= 1

    def describe(self, params: Params | None = None) -> list[dict]:
        k = self.kernels(params)
        return [{"kernel_size": self.kernel_size, "kernel": [[round(float(v), 6) for v in row] for row in kb]}
                for kb in k]

    def localize(self, y: Tensor, windows: list) -> tuple[torch.nn.Module, Tensor]:
        from .linear import Deblur
        kernel = self.kernels()[0].detach()
        valid = Deblur(kernel=kernel, mode="valid")
        o, s = (self.kernel_size - 1) // 2, self.kernel_size - 1
        crops = [y[0, :, w.top + o:w.top + o + w.size - s, w.left + o:w.left + o + w.size - s] for w in windows]
        return valid, torch.stack(crops)


def kernel_error(estimate: Tensor, truth: Tensor) -> dict:
    """Estimated vs true kernel (both sum 1; the smaller is zero-padded to the larger), after the
    best integer shift within 3 px (a blind estimate is defined up to a shift of the image):
    relative L2 error and the PSNR of the kernels scaled to a peak of 1."""
    size = max(estimate.shape[-1], truth.shape[-1])

    def pad(k):
        p = (size - k.shape[-1]) // 2
        return F.pad(k.double(), (p, size - k.shape[-1] - p, p, size - k.shape[-1] - p))

    e, t = pad(estimate), pad(truth)
    best = None
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            err = float((torch.roll(e, (dy, dx), (0, 1)) - t).norm() / t.norm())
            if best is None or err < best[0]:
                best = (err, dy, dx)
    err, dy, dx = best
    mse = float((torch.roll(e, (dy, dx), (0, 1)) - t).square().mean())
    return {"relative_l2": round(err, 4), "shift": [dy, dx],
            "psnr_db": round(10 * math.log10(float(t.max()) ** 2 / max(mse, 1e-20)), 2)}


# --------------------------------------------------------------------------- synthetic observations


def _quantise(y: Tensor, noise: float, generator: torch.Generator | None) -> Tensor:
    """Noise (std in [0, 1] units), clamp and truncation to 8 bits, as `degrade` does."""
    from .base import TRUNCATION_TOLERANCE
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=generator).to(y)
    return torch.floor(y.clamp(0, 1) * 255 + TRUNCATION_TOLERANCE).clamp(max=255) / 255


def low_light(x: Tensor, *, gain: float = 0.15, gamma: float = 1.0, noise: float = 0.0,
              generator: torch.Generator | None = None) -> Tensor:
    """A low-light observation of x `[B, C, H, W]` in [0, 1]: gain * x ** gamma + noise, 8 bits."""
    if not 0 < gain <= 1 or gamma <= 0:
        raise ValueError(f"low light needs 0 < gain <= 1 and gamma > 0, got gain {gain}, gamma {gamma}")
    return _quantise(gain * x.clamp(0, 1) ** gamma, noise, generator)


def exposure_bracket(x: Tensor, gains: tuple[float, ...] = (0.25, 1.0, 4.0), *, noise: float = 0.0,
                     generator: torch.Generator | None = None) -> list[Tensor]:
    """Exposures of x `[B, C, H, W]` in [0, 1]: clip(gain_k * x + noise) at 8 bits, one per gain."""
    if len(gains) < 2 or min(gains) <= 0:
        raise ValueError(f"an exposure bracket needs >= 2 positive gains, got {list(gains)}")
    return [_quantise(g * x.clamp(0, 1), noise, generator) for g in gains]
