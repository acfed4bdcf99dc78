"""Hierarchical guidance for any image size (GDP paper sec. on arbitrary sizes; GDP_REFERENCE sec. 4.3).

1. Global pass: the image is restored at a coarse scale s (short side near the patch size),
   fused over its patches, guided through A(up_s(x_c)) against the full observation.
2. Local pass: every full-resolution window runs its own chain, guided by its local observation
   (the operator restricted to the window) and by the coarse result: a low-frequency term
   w * |G(u(x0_hat)) - G(coarse)|^2 with G a Gaussian blur of width ~s. Windows are independent
   (seeded by their index), so any subset can run in another process and be merged later.
3. Merge with a smooth blending window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gdp.operators.base import Operator
from gdp.operators.linear import Colorize, Deblur, Inpaint, SuperResolution
from gdp.tiling import Window, blend_window, merge, plan_windows


@dataclass(frozen=True)
class HierarchicalPlan:
    height: int
    width: int
    patch: int
    stride: int
    scale: int  # coarse scale s: the global pass restores ceil(H/s) x ceil(W/s)
    windows: tuple[Window, ...]

    @property
    def coarse_size(self) -> tuple[int, int]:
        return max(self.patch, math.ceil(self.height / self.scale)), max(self.patch, math.ceil(self.width / self.scale))


def plan_hierarchical(height: int, width: int, patch: int, stride: int | None = None, align: int = 1) -> HierarchicalPlan:
    """Windows of `patch` (offsets multiples of `align`, e.g. the SR factor) and the coarse scale."""
    stride = stride or (3 * patch) // 4
    if align > patch:
        raise ValueError(f"hierarchical tiling aligns its {patch}-pixel windows to whole low-resolution pixels, so "
                         f"the sr factor must be at most {patch}, got {align}; restore in two steps of a smaller factor")
    if patch % align or stride % align:
        stride = max(align, stride // align * align)
        patch = patch // align * align
    windows = tuple(plan_windows(height, width, patch, stride))
    if any(w.top % align or w.left % align for w in windows):
        raise ValueError(f"hierarchical tiling needs sizes that are multiples of {align}, got {height}x{width}")
    scale = max(1, round(min(height, width) / patch))
    return HierarchicalPlan(height, width, patch, stride, scale, windows)


class Upsampled(torch.nn.Module):
    """A(up_s(x_c)): the global pass sees the observation through a bilinear upsampling."""

    def __init__(self, inner, scale: int, height: int, width: int):
        super().__init__()
        self.inner, self.scale, self.height, self.width = inner, scale, height, width

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.A(self.upsample(x))

    def y_shape(self, x_shape: tuple) -> tuple:
        return self.inner.y_shape(x_shape)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)[..., :self.height, :self.width]

    def norm_factor(self, x_shape: tuple, device) -> float:
        """||up_s||^2 (for the per-step cap of a blind operator inside, gdp.sampling.wrapper_norm_sq)."""
        from gdp.guidance import operator_norm_sq

        class Up:
            A = self.upsample
        return operator_norm_sq(Up(), (1, *x_shape[1:]), device)


class Masked(torch.nn.Module):
    """Per-patch masks `[N, 1, P, P]` (inpainting restricted to windows)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x)

    def y_shape(self, x_shape: tuple) -> tuple:
        return x_shape


class WithCoarse(torch.nn.Module):
    """Stacks the local operator and the low-frequency coarse term into one flat observation."""

    def __init__(self, local, sigma: float, weight: float):
        super().__init__()
        self.local, self.sigma, self.weight = local, sigma, weight

    def lowpass(self, x: torch.Tensor) -> torch.Tensor:
        radius = max(1, int(math.ceil(2 * self.sigma)))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        k = k / k.sum()

        def blur(v: torch.Tensor, pad: tuple) -> torch.Tensor:
            v = F.conv2d(v, k.view(1, 1, 1, -1).expand(v.shape[1], 1, 1, -1), padding=pad[0], groups=v.shape[1])
            return F.conv2d(v, k.view(1, 1, -1, 1).expand(v.shape[1], 1, -1, 1), padding=pad[1], groups=v.shape[1])

        if radius < min(x.shape[-2:]):
            return blur(F.pad(x, (radius, radius, radius, radius), mode="reflect"), (0, 0))
        # reflect padding needs radius < side; at 64 MP the coarse scale makes sigma about a window's
        # size: normalised convolution instead (zero padding, divided by the blur of ones)
        ones = torch.ones_like(x[:1, :1])
        return blur(x, ((0, radius), (radius, 0))) / blur(ones, ((0, radius), (radius, 0)))

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.local.A(x).flatten(1), math.sqrt(self.weight) * self.lowpass(x).flatten(1)], dim=1)

    def y_shape(self, x_shape: tuple) -> tuple:
        """The local observation's shape: the guidance scale keeps its meaning (gdp.guidance.normaliser)."""
        return self.local.y_shape(x_shape)


def localize(op: Operator, y: torch.Tensor, windows: list[Window]) -> tuple[torch.nn.Module, torch.Tensor]:
    """(operator on a batch of windows, their observations `[N, ...]`): exact restrictions of A.
    A blind operator is restricted with the parameters it holds (estimated by the global pass)."""
    if getattr(op, "blind", False):
        return op.localize(y, windows)
    if isinstance(op, SuperResolution):
        f = op.factor
        crops = [y[0, :, w.top // f:w.bottom // f, w.left // f:w.right // f] for w in windows]
        return op, torch.stack(crops)
    if isinstance(op, Deblur):
        kh, kw = op.kernel.shape
        valid = Deblur(kernel=op.kernel, mode="valid")
        oh, ow = ((kh - 1) // 2, (kw - 1) // 2) if op.mode == "same" else (0, 0)
        crops = [y[0, :, w.top + oh:w.top + oh + w.size - kh + 1, w.left + ow:w.left + ow + w.size - kw + 1]
                 for w in windows]
        return valid, torch.stack(crops)
    if isinstance(op, Inpaint):
        mask = op.mask_for(*y.shape[-2:], device=y.device)
        masks = torch.stack([mask[0][w.index] for w in windows])
        return Masked(masks), torch.stack([y[0][w.index] for w in windows])
    if isinstance(op, Colorize):
        return op, torch.stack([y[0][w.index] for w in windows])
    raise ValueError(f"hierarchical tiling does not support the {getattr(op, 'name', type(op).__name__)} "
                     f"operator yet; use --tiling fused")


def global_pass(y: torch.Tensor, op: Operator, prior, plan: HierarchicalPlan, steps: int, seed: int, guidance,
                batch_size: int = 8, callback=None) -> tuple[torch.Tensor, int]:
    """Coarse restoration `[1, C, Hc, Wc]` in [0, 1] (fused over its own patches) and its NFE.
    `callback(step, steps)` after each step."""
    from gdp.sampling import FusedDenoiser, gdp_sample
    hc, wc = plan.coarse_size
    c = prior.spec.unet.in_channels
    denoiser = prior.denoiser()
    if (hc, wc) != (plan.patch, plan.patch):
        denoiser = FusedDenoiser(denoiser, hc, wc, plan.patch, plan.stride, batch_size=batch_size)
    guide = Upsampled(op, plan.scale, plan.height, plan.width)
    result = gdp_sample(denoiser, guide, y, steps, guidance=guidance, generators=[torch.Generator().manual_seed(seed)],
                        x_shape=(1, c, hc, wc), callback=callback)
    return (result.x0 + 1) / 2, result.nfe


def coarse_window(coarse: torch.Tensor, plan: HierarchicalPlan, window: Window) -> torch.Tensor:
    """The window `[C, P, P]` of the coarse result upsampled as the global pass sees it
    (`Upsampled.upsample`), without upsampling the whole image: the coarse pixels under the window
    plus one on each side (bilinear reads two neighbours; the sampling positions of an integer
    scale are the same in the crop), upsampled and cropped."""
    s, (n_rows, n_cols) = plan.scale, coarse.shape[-2:]
    r0, c0 = max(0, window.top // s - 1), max(0, window.left // s - 1)
    r1 = min(n_rows, (window.bottom - 1) // s + 2)
    c1 = min(n_cols, (window.right - 1) // s + 2)
    up = F.interpolate(coarse[..., r0:r1, c0:c1], scale_factor=s, mode="bilinear", align_corners=False)
    top, left = window.top - r0 * s, window.left - c0 * s
    return up[0, :, top:top + window.size, left:left + window.size]


def restore_windows(y: torch.Tensor, op: Operator, prior, plan: HierarchicalPlan, coarse: torch.Tensor,
                    indices: list[int], steps: int, seed: int, guidance, batch_size: int = 8,
                    coarse_weight: float | None = None, local_norm: float | None = None) -> tuple[torch.Tensor, int]:
    """Restore windows `indices` of the plan independently: `[len(indices), C, P, P]` in [0, 1], NFE.

    Window k always uses the generator seeded with (seed, k), so the result of a window does not
    depend on which other windows run with it, nor on the process that runs it. The coarse term's
    weight defaults to a quarter of ||A_local||^2, so the observation leads and the coarse image
    only steers what the observation leaves open.
    """
    from gdp.sampling import gdp_sample
    coarse = coarse.to(y.device)
    c = prior.spec.unet.in_channels
    # norms from one window, so that a window's result never depends on its batch-mates
    if local_norm is None:
        local_norm = window_norm_sq(op, y, plan, c)
    if coarse_weight is None:
        coarse_weight = 0.25 * local_norm
    out, nfe = [], 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        windows = [plan.windows[k] for k in chunk]
        local, y_local = localize(op, y, windows)
        guide = WithCoarse(local, sigma=max(1.0, plan.scale / 2), weight=coarse_weight)
        target = torch.cat([y_local.flatten(1),
                            math.sqrt(coarse_weight) * guide.lowpass(torch.stack([coarse_window(coarse, plan, w) for w in windows])).flatten(1)], 1)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (k + 1)) for k in chunk]
        result = gdp_sample(prior.denoiser(), guide, target, steps, guidance=guidance, generators=gens,
                            x_shape=(len(chunk), c, plan.patch, plan.patch), norm_sq=local_norm + coarse_weight)
        out.append((result.x0 + 1) / 2)
        nfe += result.nfe * len(chunk)
    return torch.cat(out), nfe


def window_norm_sq(op: Operator, y: torch.Tensor, plan: HierarchicalPlan, channels: int) -> float:
    """||A_local||^2 of one window: the same for every window, computed once per image."""
    from gdp.guidance import operator_norm_sq
    return operator_norm_sq(localize(op, y, [plan.windows[0]])[0], (1, channels, plan.patch, plan.patch), y.device)


def merge_windows(patches: torch.Tensor, plan: HierarchicalPlan, blend: str = "smooth") -> torch.Tensor:
    """Blend all windows' results `[N, C, P, P]` into `[1, C, H, W]`."""
    weight = blend_window(plan.patch, blend, device=patches.device, dtype=patches.dtype)
    return merge(patches, list(plan.windows), plan.height, plan.width, weight)
