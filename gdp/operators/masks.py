"""Inpainting masks as float64 CPU `[H, W]` tensors: 1 = known pixel, 0 = missing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def random_pixel_mask(h: int, w: int, ratio: float, seed: int) -> Tensor:
    """Mask with exactly `round(ratio * h * w)` missing pixels, chosen by a seeded permutation.

    Like GDP's DDRM mask (a random permutation whose first 25% are missing), but drawn from a
    `torch.Generator` seeded with `seed`: deterministic for a given (h, w, ratio, seed).
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio is the fraction of missing pixels, in [0, 1]; got {ratio}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(h * w, generator=generator)
    mask = torch.ones(h * w, dtype=torch.float64)
    mask[order[: round(ratio * h * w)]] = 0.0
    return mask.view(h, w)


def box_mask(h: int, w: int, box: tuple[int, int, int, int]) -> Tensor:
    """Mask whose box `(x, y, width, height)` (column, row of the top-left corner) is missing."""
    x0, y0, bw, bh = (int(v) for v in box)
    if bw < 0 or bh < 0 or x0 < 0 or y0 < 0 or x0 + bw > w or y0 + bh > h:
        raise ValueError(
            f"box (x={x0}, y={y0}, w={bw}, h={bh}) does not fit in a {h}x{w} (HxW) image; "
            "give a box inside the image"
        )
    mask = torch.ones(h, w, dtype=torch.float64)
    mask[y0 : y0 + bh, x0 : x0 + bw] = 0.0
    return mask


def as_mask(mask: Any) -> Tensor:
    """An explicit binary mask `[H, W]` or `[1, 1, H, W]` (tensor/ndarray) as float64 `[H, W]`."""
    if isinstance(mask, Tensor):
        m = mask.detach().to(device="cpu", dtype=torch.float64)
    else:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float64))
    if m.dim() == 4 and m.shape[:2] == (1, 1):
        m = m[0, 0]
    if m.dim() != 2:
        raise ValueError(f"mask must be [H, W] or [1, 1, H, W], got shape {tuple(m.shape)}")
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("mask must be binary (1 = known, 0 = missing); threshold it first")
    return m


def load_mask(path: str) -> Tensor:
    """Mask from an image file (via fsspec, decoded by gdp.io), gray: >= 128 (white) = known.
    A missing or unreadable file raises gdp.io.ImageError naming it."""
    from gdp.io import read_image
    pixels = read_image(path).pixels.mean(dim=1)[0]  # [H, W] in [0, 1]; a colour mask by its mean
    return ((pixels * 255).round() >= 128).to(torch.float64)
