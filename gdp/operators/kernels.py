"""Filter kernels: the paper's blur kernel, Gaussians, kernel files, the Keys cubic.

All kernels are returned as float64 CPU tensors; operators move them to the input's device.
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import fsspec
import numpy as np
import torch
from torch import Tensor


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def paper_blur_kernel(size: int = 9, nsig: float = 2.0) -> Tensor:
    """GDP's deblurring kernel `gkern(size, nsig)` (GDP_REFERENCE §3.2), `[size, size]`, sum 1.

    1. discretise the standard-normal CDF on `size + 1` equally spaced points over
       `±(nsig + interval / 2)` with `interval = (2 nsig + 1) / size` (±(2 + 5/18) for 9, 2);
    2. differences give the 1-D weights k1;
    3. K = sqrt(k1 k1^T), normalised to sum 1 (an effective Gaussian of sigma ~2.79 px).
    """
    interval = (2 * nsig + 1.0) / size
    edges = torch.linspace(-nsig - interval / 2, nsig + interval / 2, size + 1, dtype=torch.float64)
    k1 = _normal_cdf(edges).diff()
    kernel = torch.sqrt(torch.outer(k1, k1))
    return kernel / kernel.sum()


def gaussian_kernel(sigma: float, size: int | None = None) -> Tensor:
    """Isotropic Gaussian `[size, size]` sampled at integer offsets, sum 1.

    `size` defaults to `2 * ceil(3 sigma) + 1`; even sizes are centred between two pixels.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    if size is None:
        size = 2 * math.ceil(3 * sigma) + 1
    if size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {size}")
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return normalise_kernel(torch.outer(g, g))


def normalise_kernel(kernel: Any) -> Tensor:
    """A 2-D kernel (tensor, ndarray or nested list) as float64 CPU `[kh, kw]`, scaled to sum 1."""
    if isinstance(kernel, Tensor):
        k = kernel.detach().to(device="cpu", dtype=torch.float64)
    else:
        k = torch.as_tensor(np.asarray(kernel, dtype=np.float64))
    if k.dim() != 2 or k.numel() == 0:
        raise ValueError(f"a blur kernel must be a non-empty 2-D array, got shape {tuple(k.shape)}")
    if not torch.isfinite(k).all():
        raise ValueError("the blur kernel holds NaN or infinite values")
    total = k.sum()
    if abs(total.item()) < 1e-12:
        raise ValueError("the blur kernel sums to 0 and cannot be normalised to sum 1")
    return k / total


def load_kernel(path: str) -> Tensor:
    """Kernel from a `.npy` array or a grayscale image (decoded by gdp.io), via fsspec; sum 1.
    A missing or unreadable file raises a ValueError naming it (gdp.io.ImageError for images)."""
    if PurePath(path).suffix.lower() != ".npy":
        from gdp.io import read_image
        image = read_image(path)
        levels = image.pixels.double().mean(dim=1)[0] * (65535 if image.bit_depth == 16 else 255)
        return normalise_kernel(levels.round())
    try:
        with fsspec.open(path, "rb") as f:
            array = np.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such kernel file") from None
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a kernel array (.npy): {' '.join(str(e).split())}") from None
    return normalise_kernel(array)


def keys_cubic(t: Tensor, a: float = -0.5) -> Tensor:
    """Keys cubic convolution kernel (a = -0.5 as in MATLAB/PIL), support `|t| < 2`."""
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def bicubic_taps(factor: int) -> tuple[Tensor, int]:
    """1-D antialiased bicubic taps for downsampling by an integer `factor`, like MATLAB imresize.

    Output sample i sits at input position `i * factor + (factor - 1) / 2`; the cubic is stretched
    by `factor`. Returns (weights `[L]` float64 summing to 1, offset of the first tap relative to
    `i * factor`).
    """
    centre = (factor - 1) / 2
    t = torch.arange(math.floor(centre - 2 * factor), math.ceil(centre + 2 * factor) + 1)
    w = keys_cubic((t.to(torch.float64) - centre) / factor)
    nonzero = torch.nonzero(w.abs() > 1e-12).flatten()
    first, last = int(nonzero[0]), int(nonzero[-1])
    w = w[first : last + 1]
    return w / w.sum(), int(t[first])
