"""Border rules as index maps, so that padding is a gather and its adjoint a scatter-add.

Padding one axis of length `n` by `before` / `after` samples is `x.index_select(dim, idx)` with
`idx = border_indices(n, before, after, mode)`. Its exact adjoint sums every padded sample back
onto the pixel it copied: `zeros(n).index_add(dim, idx, z)`. Negative `after` crops instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

BorderMode = Literal["reflect", "symmetric", "replicate"]


def fold_index(j: Tensor, n: int, mode: BorderMode) -> Tensor:
    """Map integer positions `j` (any range) into `[0, n)` with the border rule `mode`.

    reflect: mirror about the edge pixel (d c b | a b c d | c b a), like `F.pad(mode="reflect")`.
    symmetric: mirror about the edge (b a | a b c d | d c), like MATLAB `imresize`.
    replicate: repeat the edge pixel (a a | a b c d | d d).
    Reflections repeat, so any pad width works, even wider than the image.
    """
    if mode == "replicate":
        return j.clamp(0, n - 1)
    if mode == "symmetric":
        r = j.remainder(2 * n)
        return torch.where(r >= n, 2 * n - 1 - r, r)
    if mode == "reflect":
        if n == 1:
            return torch.zeros_like(j)
        r = j.remainder(2 * n - 2)
        return torch.where(r >= n, 2 * n - 2 - r, r)
    raise ValueError(f"unknown border mode {mode!r}; use 'reflect', 'symmetric' or 'replicate'")


def border_indices(
    n: int, before: int, after: int, mode: BorderMode, device: torch.device | None = None
) -> Tensor:
    """Source index of every sample of an axis of length `n` padded by `before` and `after`."""
    j = torch.arange(-before, n + after, device=device)
    return fold_index(j, n, mode)


def pad_axis(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Pad (gather) axis `dim` of `x` with the index map `idx`."""
    return x.index_select(dim, idx.to(x.device))


def pad_axis_adjoint(z: Tensor, idx: Tensor, dim: int, n: int) -> Tensor:
    """Adjoint of `pad_axis`: scatter-add axis `dim` of `z` back onto an axis of length `n`."""
    shape = list(z.shape)
    shape[dim] = n
    return z.new_zeros(shape).index_add(dim, idx.to(z.device), z)
