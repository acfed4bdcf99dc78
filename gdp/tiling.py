"""Square windows for patch-based sampling: plan, split, blend, merge (whole or streamed).

Windows sit at offsets 0, stride, 2 * stride, ... along each axis, plus one window flush with the
far border, in row-major order. Overlaps are averaged with a blending weight: "uniform" (all
ones, as in the GDP authors' code) or "smooth" (a separable, symmetric, strictly positive
raised-cosine window that hides seams). Merging is a weighted average, sum(w * patch) / sum(w),
so splitting and merging an image gives it back for either weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

BlendKind = Literal["uniform", "smooth"]
SMOOTH_FLOOR = 1e-3  # smallest smooth weight, relative to the centre's 1


@dataclass(frozen=True)
class Window:
    """A square patch [top : top + size, left : left + size] of an image."""

    top: int
    left: int
    size: int

    @property
    def bottom(self) -> int:
        return self.top + self.size

    @property
    def right(self) -> int:
        return self.left + self.size

    @property
    def rows(self) -> slice:
        return slice(self.top, self.bottom)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.right)

    @property
    def index(self) -> tuple:
        """Index for the last two axes: `x[window.index]` is [..., size, size]."""
        return (Ellipsis, self.rows, self.cols)


def plan_windows(height: int, width: int, patch: int, stride: int) -> list[Window]:
    """Row-major windows covering a height x width image; the last row/column is flush with the border.

    Requires 1 <= stride <= patch <= min(height, width): pad small images with `pad_to_min`.
    """
    if patch < 1 or not 1 <= stride <= patch:
        raise ValueError(f"need 1 <= stride <= patch, got patch={patch}, stride={stride}")
    if patch > min(height, width):
        raise ValueError(f"patch {patch} is larger than the {height}x{width} image; "
                         f"pad it first with pad_to_min(x, {patch}) and unpad the result")
    return [Window(top, left, patch)
            for top in _offsets(height, patch, stride) for left in _offsets(width, patch, stride)]


def _offsets(length: int, patch: int, stride: int) -> list[int]:
    """0, stride, 2 * stride, ... and length - patch, without duplicates."""
    offsets = list(range(0, length - patch + 1, stride))
    if offsets[-1] != length - patch:
        offsets.append(length - patch)
    return offsets


def pad_to_min(x: torch.Tensor, patch: int, mode: str = "reflect") -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad [..., H, W] at the bottom and right to at least patch x patch.

    Returns the padded tensor and (pad_bottom, pad_right) for `unpad`. `mode` is a
    torch.nn.functional.pad mode ("reflect", "replicate", "constant", "circular"); "reflect"
    repeats itself (mirror tiling) when the image is smaller than half the patch.
    """
    height, width = x.shape[-2:]
    pads = (max(0, patch - height), max(0, patch - width))
    if pads == (0, 0):
        return x, pads
    y = x.reshape(1, -1, height, width)
    while y.shape[-2] < patch or y.shape[-1] < patch:
        y = _pad_step(y, patch, mode)
    return y.reshape(*x.shape[:-2], *y.shape[-2:]), pads


def _pad_step(y: torch.Tensor, patch: int, mode: str) -> torch.Tensor:
    """One F.pad call towards patch x patch (reflection can add at most size - 1 per call)."""
    height, width = y.shape[-2:]
    bottom, right = max(0, patch - height), max(0, patch - width)
    if mode == "reflect":
        bottom = min(bottom, height - 1) if height > 1 else 0
        right = min(right, width - 1) if width > 1 else 0
        if bottom == right == 0:  # a single row or column cannot be reflected
            return F.pad(y, (0, max(0, patch - width), 0, max(0, patch - height)), mode="replicate")
    return F.pad(y, (0, right, 0, bottom), mode=mode)


def unpad(x: torch.Tensor, pads: tuple[int, int]) -> torch.Tensor:
    """Undo `pad_to_min`: drop (pad_bottom, pad_right) rows and columns from [..., H, W]."""
    bottom, right = pads
    return x[..., : x.shape[-2] - bottom, : x.shape[-1] - right]


def blend_window(patch: int, kind: BlendKind = "uniform", device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Blending weight [patch, patch], values in (0, 1].

    "uniform": ones. "smooth": outer(w, w) with w = floor + (1 - floor) * cos^2(pi * d / patch),
    d the distance from the centre; symmetric under flips and transposition, positive everywhere.
    """
    if kind == "uniform":
        return torch.ones(patch, patch, device=device, dtype=dtype)
    if kind != "smooth":
        raise ValueError(f"unknown blend kind {kind!r}; use 'uniform' or 'smooth'")
    # d is a multiple of 0.5, exact in floating point, so w[i] == w[patch - 1 - i] bit for bit
    distance = (torch.arange(patch, dtype=torch.float64) - (patch - 1) / 2).abs()
    w = SMOOTH_FLOOR + (1 - SMOOTH_FLOOR) * torch.cos(math.pi * distance / patch) ** 2
    return torch.outer(w, w).to(device=device, dtype=dtype)


def split(x: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """[B, C, H, W] -> patches [B * N, C, p, p], image-major: patch b * N + n is window n of image b."""
    patches = torch.stack([x[w.index] for w in windows], dim=1)  # [B, N, C, p, p]
    return patches.reshape(-1, *patches.shape[2:])


def merge(patches: torch.Tensor, windows: list[Window], height: int, width: int,
          weight: torch.Tensor) -> torch.Tensor:
    """Patches [B * N, C, p, p] (layout of `split`) -> [B, C, H, W], weighted average of overlaps.

    `weight` is [p, p] and positive (see `blend_window`); every pixel must be covered.
    """
    count, channels, size = len(windows), patches.shape[1], patches.shape[-1]
    if patches.ndim != 4 or patches.shape[0] % count or weight.shape != (size, size):
        raise ValueError(f"need patches [B*{count}, C, p, p] and weight [p, p], "
                         f"got {tuple(patches.shape)} and {tuple(weight.shape)}")
    grouped = patches.reshape(-1, count, channels, size, size)
    out = patches.new_zeros(grouped.shape[0], channels, height, width)
    norm = patches.new_zeros(height, width)
    for n, window in enumerate(windows):
        out[window.index] += grouped[:, n] * weight
        norm[window.index] += weight
    if not bool((norm > 0).all()):
        raise ValueError("the windows do not cover every pixel; plan them with plan_windows")
    return out / norm


class StreamingMerger:
    """Merge patches into one [C, H, W] image as they arrive, holding only the output.

    Add every window of `self.windows` (row-major order gives results bitwise equal to `merge`).
    Pixel rows become final as soon as every window touching them has been added; they are
    normalised then and passed to `on_rows(first_row, rows [C, n, W])` if given, so a writer can
    stream them out before the image is done.
    """

    def __init__(self, height: int, width: int, channels: int, patch: int, stride: int,
                 kind: BlendKind = "uniform", *,
                 on_rows: Callable[[int, torch.Tensor], None] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.windows = plan_windows(height, width, patch, stride)
        self.weight = blend_window(patch, kind, device, dtype)
        self.height, self.channels, self.patch = height, channels, patch
        self._out = torch.zeros(channels, height, width, device=device, dtype=dtype)
        self._norm = torch.zeros(height, width, device=device, dtype=dtype)
        self._pending = set(self.windows)
        self._missing_per_top: dict[int, int] = {}
        for window in self.windows:
            self._missing_per_top[window.top] = self._missing_per_top.get(window.top, 0) + 1
        self._on_rows = on_rows
        self._done = 0  # rows [0, _done) are normalised

    def add(self, window: Window, patch: torch.Tensor) -> None:
        """Accumulate one patch [C, p, p] for `window` (each planned window exactly once)."""
        if window not in self._pending:
            problem = "was already added" if window in set(self.windows) else "is not in the plan"
            raise ValueError(f"{window} {problem}; add each window of StreamingMerger.windows once")
        if patch.shape != (self.channels, self.patch, self.patch):
            raise ValueError(f"patch must be [{self.channels}, {self.patch}, {self.patch}], "
                             f"got {tuple(patch.shape)}")
        self._out[window.index] += patch * self.weight
        self._norm[window.index] += self.weight
        self._pending.discard(window)
        self._missing_per_top[window.top] -= 1
        self._release()

    def rows_ready(self) -> int:
        """Number of leading pixel rows that are final."""
        incomplete = [top for top, missing in self._missing_per_top.items() if missing]
        return min(incomplete, default=self.height)

    def finish(self) -> torch.Tensor:
        """The merged image [C, H, W]; raises if windows are missing."""
        if self._pending:
            raise ValueError(f"{len(self._pending)} of {len(self.windows)} windows were never added")
        return self._out

    def _release(self) -> None:
        ready = self.rows_ready()
        if ready <= self._done:
            return
        rows = slice(self._done, ready)
        self._out[:, rows] /= self._norm[rows]
        if self._on_rows is not None:
            self._on_rows(self._done, self._out[:, rows])
        self._done = ready


def border_mask(height: int, width: int, windows: list[Window], band: int = 1) -> torch.Tensor:
    """bool [H, W]: True within `band` pixels (either side) of a window edge inside the image.

    Edges on the image border are not seams and are ignored.
    """
    mask = torch.zeros(height, width, dtype=torch.bool)
    for w in windows:
        for line in (w.top, w.bottom):
            if 0 < line < height:
                mask[max(0, line - band): line + band, w.cols] = True
        for line in (w.left, w.right):
            if 0 < line < width:
                mask[w.rows, max(0, line - band): line + band] = True
    return mask
