"""Image-quality metrics in pure torch, per image: inputs `[B, C, H, W]`, outputs `[B]`.

`psnr` and `ssim` match `skimage.metrics.peak_signal_noise_ratio` and
`skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, channel_axis=...)` applied to each image of the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gdp.operators.base import Operator

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = int(3.5 * _SSIM_SIGMA + 0.5)  # skimage: truncate=3.5 -> an 11x11 window
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"expected two [B, C, H, W] tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image `[B]`; `inf` where the images are equal."""
    _check_pair(x, y)
    mse = (x - y).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(like: Tensor) -> Tensor:
    """Normalised 1-D Gaussian `[11]` (sigma 1.5), as `scipy.ndimage.gaussian_filter` samples it."""
    t = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, device=like.device, dtype=like.dtype)
    g = torch.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return g / g.sum()


def _filter_valid(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter of every channel of `x` `[N, C, H, W]`, valid part only.

    skimage filters with reflected borders and then crops the window radius from every side,
    which leaves exactly the valid part: no border rule is needed.
    """
    n, c, h, w = x.shape
    x = x.reshape(n * c, 1, h, w)
    x = F.conv2d(x, g.view(1, 1, -1, 1))
    x = F.conv2d(x, g.view(1, 1, 1, -1))
    return x.view(n, c, *x.shape[-2:])


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity per image `[B]` (Wang et al. 2004), averaged over channels.

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances; the
    mean runs over the pixels at least 5 px from the border (skimage's crop). H, W >= 11.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < 2 * _SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    g = _gaussian_window(x)
    # One filtering pass over the five moment images, stacked along the batch axis.
    moments = _filter_valid(torch.cat([x, y, x * x, y * y, x * y]), g)
    ux, uy, uxx, uyy, uxy = moments.chunk(5)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1)


def consistency_psnr(op: Operator, x_hat: Tensor, y: Tensor) -> Tensor:
    """Measurement consistency `psnr(op.A(x_hat), y)` per image `[B]` (data range 1)."""
    return psnr(op.A(x_hat), y)


def noise_sigma(y: Tensor) -> Tensor:
    """Robust estimate of white Gaussian noise std per image `[B]` (Donoho & Johnstone 1994): the
    median absolute finest diagonal Haar detail over 0.6745, on y `[B, C, H, W]` (H, W >= 2).
    Texture leaks in a little (about 0.003 on sharp 8-bit photos); noise of 0.01 and more reads
    within about 15%."""
    h, w = y.shape[-2] // 2 * 2, y.shape[-1] // 2 * 2
    a, b = y[..., 0:h:2, 0:w:2], y[..., 0:h:2, 1:w:2]
    c, d = y[..., 1:h:2, 0:w:2], y[..., 1:h:2, 1:w:2]
    detail = (a - b - c + d) / 2  # orthonormal: white noise of std s gives detail of std s
    return detail.abs().flatten(1).median(dim=1).values / 0.6745


__all__ = ["consistency_psnr", "noise_sigma", "psnr", "ssim"]


def seam_ratio(x: torch.Tensor, windows, band: int = 1) -> float:
    """Mean gradient magnitude on interior patch borders / elsewhere, for x `[1, C, H, W]`.

    A restoration with visible seams has a ratio above the ground truth's; `windows` are the
    patch windows used (gdp.tiling.plan_windows).
    """
    from gdp.tiling import border_mask
    g = x.mean(dim=1)[0]
    dx, dy = torch.zeros_like(g), torch.zeros_like(g)
    dx[:, :-1] = g[:, 1:] - g[:, :-1]
    dy[:-1] = g[1:] - g[:-1]
    grad = torch.sqrt(dx ** 2 + dy ** 2)
    mask = border_mask(g.shape[0], g.shape[1], windows, band=band)
    return float(grad[mask].mean() / grad[~mask].mean())
