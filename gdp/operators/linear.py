"""The four linear degradations of GDP (§3.1-3.4): super-resolution, deblurring, inpainting and
colorization. Each ships a closed-form adjoint; all act on `[B, C, H, W]` images in `[0, 1]`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._padding import border_indices, pad_axis, pad_axis_adjoint
from .base import Operator, Shape, TensorCache, _check_image, register
from .kernels import (
    bicubic_taps,
    gaussian_kernel,
    load_kernel,
    normalise_kernel,
    paper_blur_kernel,
)
from .masks import as_mask, box_mask, load_mask, random_pixel_mask


def _depthwise(x: Tensor, weight: Tensor, stride: tuple[int, int] = (1, 1)) -> Tensor:
    """Correlate every channel of `x` `[B, C, H, W]` with one `[1, 1, kh, kw]` filter."""
    b, c = x.shape[:2]
    y = F.conv2d(x.reshape(b * c, 1, *x.shape[-2:]), weight, stride=stride)
    return y.view(b, c, *y.shape[-2:])


def _depthwise_adjoint(y: Tensor, weight: Tensor, stride: tuple[int, int] = (1, 1)) -> Tensor:
    """Adjoint of `_depthwise` (transposed convolution); output is the full padded input size."""
    b, c = y.shape[:2]
    y = y.reshape(b * c, 1, *y.shape[-2:])
    if stride == (1, 1):
        # Same result as conv_transpose2d (a full correlation with the flipped filter), but
        # several times faster on CPU.
        kh, kw = weight.shape[-2:]
        x = F.conv2d(F.pad(y, (kw - 1, kw - 1, kh - 1, kh - 1)), weight.flip(-2, -1))
    else:
        x = F.conv_transpose2d(y, weight, stride=stride)
    return x.view(b, c, *x.shape[-2:])


# ----------------------------------------------------------------------------- super-resolution


@register
class SuperResolution(Operator):
    """Downsampling by an integer `factor` (§3.1): `[B, C, H, W]` -> `[B, C, H', W']`.

    filter="avgpool" (the paper's operator): `factor x factor` block averaging; H and W must be
    multiples of `factor`. Its pseudo-inverse is exact: nearest-neighbour replication.

    filter="bicubic": antialiased bicubic downsampling as MATLAB `imresize(x, 1/factor)`: Keys
    cubic (a = -0.5) stretched by `factor`, symmetric (half-sample mirror) borders, applied as a
    strided 1-D convolution per axis. Works on any size: `H' = ceil(H / factor)` (as MATLAB), so
    `x_shape` (which returns `H' * factor`) cannot recover a size that is not a multiple: pass
    `x_shape=` to `A_adjoint` / `A_dagger` there. `A_dagger` is the exact Moore-Penrose
    pseudo-inverse, built per axis from small `[H', H]` matrices (cached); like any
    band-limited inverse it may ring slightly outside `[0, 1]` near edges.
    """

    name = "sr"

    def __init__(self, *, factor: int = 4, filter: Literal["avgpool", "bicubic"] = "avgpool"):
        super().__init__()
        if isinstance(factor, bool) or not float(factor).is_integer() or factor < 1:
            raise ValueError(f"sr factor must be an integer >= 1, got {factor!r}")
        if filter not in ("avgpool", "bicubic"):
            raise ValueError(f"unknown sr filter {filter!r}; use 'avgpool' or 'bicubic'")
        self.factor = int(factor)
        self.filter = filter
        self._taps, self._offset = bicubic_taps(self.factor)
        self._cache = TensorCache()

    def extra_repr(self) -> str:
        return f"factor={self.factor}, filter={self.filter!r}"

    def y_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        f = self.factor
        if self.filter == "bicubic":
            return (b, c, math.ceil(h / f), math.ceil(w / f))
        if f > min(h, w):
            raise ValueError(f"sr factor {f} is larger than the image ({w}x{h}): a x{f} observation of it "
                             "would have no pixels; choose a factor of at most " + str(min(h, w)))
        if h % f or w % f:
            raise ValueError(
                f"sr avgpool needs H and W divisible by the factor {f}, got {h}x{w}; crop the "
                f"image to {h // f * f}x{w // f * f} or pad it, or use filter='bicubic'"
            )
        return (b, c, h // f, w // f)

    def x_shape(self, y_shape: Shape) -> Shape:
        b, c, h, w = y_shape
        return (b, c, h * self.factor, w * self.factor)

    def A(self, x: Tensor) -> Tensor:
        _check_image(x)
        self.y_shape(tuple(x.shape))
        if self.filter == "avgpool":
            return F.avg_pool2d(x, self.factor)
        return self._bicubic_axis(self._bicubic_axis(x, 2), 3)

    def A_adjoint(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        _, _, h, w = self._target_shape(y, x_shape)
        if self.filter == "avgpool":
            return self._replicate(y) / self.factor**2
        return self._bicubic_axis_adjoint(self._bicubic_axis_adjoint(y, 3, w), 2, h)

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        _, _, h, w = self._target_shape(y, x_shape)
        if self.filter == "avgpool":
            return self._replicate(y)
        return self._pinv_matrix(h, y) @ y @ self._pinv_matrix(w, y).transpose(0, 1)

    def gram_scalar(self) -> float | None:
        return 1.0 / self.factor**2 if self.filter == "avgpool" else None

    def _replicate(self, y: Tensor) -> Tensor:
        """Nearest-neighbour upsampling: each pixel becomes a `factor x factor` block."""
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def _axis_index(self, n: int, device: torch.device) -> Tensor:
        """Source pixel of every tap position along an axis of length `n` (symmetric borders)."""
        m, length = math.ceil(n / self.factor), len(self._taps)
        before = -self._offset
        after = (m - 1) * self.factor + length - n - before
        return border_indices(n, before, after, "symmetric", device=device)

    def _axis_weight(self, like: Tensor, dim: int) -> tuple[Tensor, tuple[int, int]]:
        """Taps as a `[1, 1, L, 1]` (dim 2) or `[1, 1, 1, L]` (dim 3) filter, and its stride."""
        taps = self._cache.get("taps", like, lambda: self._taps)
        if dim == 2:
            return taps.view(1, 1, -1, 1), (self.factor, 1)
        return taps.view(1, 1, 1, -1), (1, self.factor)

    def _bicubic_axis(self, x: Tensor, dim: int) -> Tensor:
        """Filter and subsample axis `dim` (2 = rows, 3 = columns) of `x`."""
        padded = pad_axis(x, self._axis_index(x.shape[dim], x.device), dim)
        weight, stride = self._axis_weight(x, dim)
        return _depthwise(padded, weight, stride)

    def _bicubic_axis_adjoint(self, y: Tensor, dim: int, n: int) -> Tensor:
        """Adjoint of `_bicubic_axis` for an input axis of length `n`."""
        weight, stride = self._axis_weight(y, dim)
        padded = _depthwise_adjoint(y, weight, stride)
        return pad_axis_adjoint(padded, self._axis_index(n, y.device), dim, n)

    def _axis_matrix(self, n: int) -> Tensor:
        """The 1-D bicubic downsampler of an axis of length `n` as a dense float64 `[m, n]`."""
        m, length = math.ceil(n / self.factor), len(self._taps)
        index = self._axis_index(n, torch.device("cpu"))
        starts = torch.arange(m) * self.factor
        cols = index[starts[:, None] + torch.arange(length)[None, :]].flatten()
        rows = torch.arange(m).repeat_interleave(length)
        matrix = torch.zeros(m, n, dtype=torch.float64)
        return matrix.index_put_((rows, cols), self._taps.repeat(m), accumulate=True)

    def _pinv_matrix(self, n: int, like: Tensor) -> Tensor:
        """Moore-Penrose pseudo-inverse `[n, m]` of `_axis_matrix(n)`, on `like`'s device."""
        return self._cache.get(("pinv", n), like, lambda: torch.linalg.pinv(self._axis_matrix(n)))


# ----------------------------------------------------------------------------------- deblurring


def _choose_kernel(
    kernel: Any, sigma: float | None, kernel_size: int | None, kernel_file: str | None
) -> Tensor:
    """The one blur kernel the options describe (float64 `[kh, kw]`, sum 1); paper's by default."""
    options = {"kernel": kernel, "sigma": sigma, "kernel_file": kernel_file}
    given = [name for name, value in options.items() if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"deblur takes one of kernel, sigma (+ kernel_size), kernel_file; got {given}"
        )
    if kernel_size is not None and sigma is None:
        raise ValueError("deblur kernel_size goes with sigma (a Gaussian kernel); give sigma too")
    if kernel is not None:
        return normalise_kernel(kernel)
    if sigma is not None:
        return gaussian_kernel(float(sigma), kernel_size)
    if kernel_file is not None:
        return load_kernel(kernel_file)
    return paper_blur_kernel(9, 2.0)


@register
class Deblur(Operator):
    """Convolution of every channel with one kernel (§3.2): `[B, C, H, W]` -> same or valid size.

    The kernel is `kernel` (2-D tensor/ndarray), a Gaussian (`sigma`, `kernel_size`, which
    defaults to `2 ceil(3 sigma) + 1`), or read from `kernel_file` (`.npy`, or a grayscale image);
    it is normalised to sum 1. Default: the paper's 9x9 `gkern(9, nsig=2)`. This is a true
    convolution (the kernel is flipped), which matters only for asymmetric kernels.

    mode="valid" (the paper's): no padding, the output is smaller by `kh - 1`, `kw - 1`.
    mode="same": reflect padding (`(k - 1) // 2` before, the rest after), output of the same size;
    the adjoint folds the padded border back exactly.

    `A_dagger` is a cheap initialisation, not a deconvolution: the observation itself in "same"
    mode, reflect-padded back to the image size in "valid" mode.
    """

    name = "deblur"

    def __init__(
        self,
        *,
        kernel: Any = None,
        sigma: float | None = None,
        kernel_size: int | None = None,
        kernel_file: str | None = None,
        mode: Literal["same", "valid"] = "same",
    ):
        super().__init__()
        if mode not in ("same", "valid"):
            raise ValueError(f"unknown deblur mode {mode!r}; use 'same' or 'valid'")
        self.kernel = _choose_kernel(kernel, sigma, kernel_size, kernel_file)
        self.mode = mode
        self._cache = TensorCache()

    def extra_repr(self) -> str:
        return f"kernel_size={tuple(self.kernel.shape)}, mode={self.mode!r}"

    def y_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        kh, kw = self.kernel.shape
        if self.mode == "same":
            return (b, c, h, w)
        if h < kh or w < kw:
            raise ValueError(f"a valid {kh}x{kw} convolution needs an image of at least that size, "
                             f"got {h}x{w}; use mode='same' or a larger image")
        return (b, c, h - kh + 1, w - kw + 1)

    def x_shape(self, y_shape: Shape) -> Shape:
        b, c, h, w = y_shape
        if self.mode == "same":
            return (b, c, h, w)
        kh, kw = self.kernel.shape
        return (b, c, h + kh - 1, w + kw - 1)

    def A(self, x: Tensor) -> Tensor:
        _check_image(x)
        self.y_shape(tuple(x.shape))
        if self.mode == "same":
            x = self._pad(x, *self._pad_indices(x.shape[-2:], x.device))
        return _depthwise(x, self._weight(x))

    def A_adjoint(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        _, _, h, w = self._target_shape(y, x_shape)
        x = _depthwise_adjoint(y, self._weight(y))
        if self.mode == "valid":
            return x
        rows, cols = self._pad_indices((h, w), y.device)
        return pad_axis_adjoint(pad_axis_adjoint(x, cols, 3, w), rows, 2, h)

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        self._target_shape(y, x_shape)
        if self.mode == "same":
            return y.clone()
        return self._pad(y, *self._pad_indices(y.shape[-2:], y.device))

    def _weight(self, like: Tensor) -> Tensor:
        """Flipped kernel `[1, 1, kh, kw]` on `like`'s device/dtype (conv2d correlates)."""
        return self._cache.get("weight", like, lambda: self.kernel.flip(0, 1)[None, None])

    def _pad_indices(
        self, hw: tuple[int, int] | torch.Size, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """Reflect-padding index maps of rows and columns for an `[h, w]` image."""
        (h, w), (kh, kw) = hw, self.kernel.shape
        rows = border_indices(h, (kh - 1) // 2, kh // 2, "reflect", device=device)
        cols = border_indices(w, (kw - 1) // 2, kw // 2, "reflect", device=device)
        return rows, cols

    @staticmethod
    def _pad(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        return pad_axis(pad_axis(x, rows, 2), cols, 3)


# ----------------------------------------------------------------------------------- inpainting


@register
class Inpaint(Operator):
    """Pixel masking (§3.3): `A(x) = mask * x`, `[B, C, H, W]` -> same; 1 = known, 0 = missing.

    Exactly one of:
    - `mask`: explicit `[H, W]` or `[1, 1, H, W]` binary tensor/ndarray (images must match);
    - `mask_file`: an image (any mode, converted to L; >= 128 = known), read via fsspec;
    - `ratio` (+ `seed`, default 0): that fraction of pixels missing, the same in every channel,
      from a seeded `torch.Generator` (GDP's task: ratio=0.25);
    - `box`: `(x, y, w, h)` missing, x/y being the column/row of its top-left corner.
    Random and box masks are built for the size of the input at call time and cached per size.
    The operator is an orthogonal projection: adjoint and pseudo-inverse are `A` itself.
    """

    name = "inpaint"

    def __init__(
        self,
        *,
        mask: Any = None,
        mask_file: str | None = None,
        ratio: float | None = None,
        seed: int | None = None,
        box: tuple[int, int, int, int] | None = None,
    ):
        super().__init__()
        sources = {"mask": mask, "mask_file": mask_file, "ratio": ratio, "box": box}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise ValueError(
                f"inpaint takes exactly one of mask, mask_file, ratio, box; got {given}"
            )
        if seed is not None and ratio is None:
            raise ValueError("inpaint seed only applies to a random mask; give ratio too")
        if box is not None and len(box) != 4:
            raise ValueError(f"inpaint box is (x, y, w, h), got {box!r}")
        self.ratio, self.seed, self.box = ratio, (0 if seed is None else int(seed)), box
        self._fixed = as_mask(mask) if mask is not None else None
        if mask_file is not None:
            self._fixed = load_mask(mask_file)
        if ratio is not None and not 0.0 <= ratio <= 1.0:
            raise ValueError(f"inpaint ratio (missing fraction) must be in [0, 1], got {ratio}")
        self._masks: dict[tuple[int, int], Tensor] = {}
        self._cache = TensorCache()

    def extra_repr(self) -> str:
        if self._fixed is not None:
            return f"mask={tuple(self._fixed.shape)}"
        if self.ratio is not None:
            return f"ratio={self.ratio}, seed={self.seed}"
        return f"box={self.box}"

    def mask_for(self, h: int, w: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
        """The mask `[1, 1, h, w]` (1 = known) for an `h x w` image."""
        return self._mask_hw(h, w).to(device=device, dtype=dtype)[None, None]

    def y_shape(self, x_shape: Shape) -> Shape:
        self._mask_hw(*x_shape[-2:])  # validates the size against an explicit mask
        return tuple(x_shape)

    def x_shape(self, y_shape: Shape) -> Shape:
        return self.y_shape(y_shape)

    def A(self, x: Tensor) -> Tensor:
        _check_image(x)
        h, w = x.shape[-2:]
        return x * self._cache.get((h, w), x, lambda: self._mask_hw(h, w))

    def A_adjoint(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        self._target_shape(y, x_shape)
        return self.A(y)

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        self._target_shape(y, x_shape)
        return self.A(y)

    def gram_scalar(self) -> float | None:
        """A A^T = diag(mask): the identity on every observation A can produce (zero where missing)."""
        return 1.0

    def _mask_hw(self, h: int, w: int) -> Tensor:
        """float64 CPU `[h, w]` mask, built once per size."""
        h, w = int(h), int(w)
        if self._fixed is not None:
            mh, mw = self._fixed.shape
            if (mh, mw) != (h, w):
                raise ValueError(f"mask is {mh}x{mw} but image is {h}x{w} (HxW); give a mask of "
                                 "the image's size, or resize/crop the image to the mask")
            return self._fixed
        if (h, w) not in self._masks:
            if self.ratio is not None:
                self._masks[h, w] = random_pixel_mask(h, w, self.ratio, self.seed)
            else:
                self._masks[h, w] = box_mask(h, w, self.box)
        return self._masks[h, w]


# --------------------------------------------------------------------------------- colorization


@register
class Colorize(Operator):
    """Weighted channel sum (§3.4): `[B, C, H, W]` -> `[B, 1, H, W]`, `C = len(weights)`.

    Default weights are the plain channel mean that GDP's guidance uses. The pseudo-inverse is
    exact: `w y / |w|^2` (a grey image spread over channels in proportion to the weights).
    """

    name = "colorize"

    def __init__(self, *, weights: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)):
        super().__init__()
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() == 0 or not torch.isfinite(w).all() or not w.abs().sum() > 0:
            raise ValueError(f"colorize weights must be finite and not all 0, got {weights!r}")
        self.weights = w
        self._cache = TensorCache()

    def extra_repr(self) -> str:
        return f"weights={tuple(round(v, 4) for v in self.weights.tolist())}"

    def y_shape(self, x_shape: Shape) -> Shape:
        b, c, h, w = x_shape
        if c != len(self.weights):
            raise ValueError(f"colorize has {len(self.weights)} weights but the image has {c} "
                             "channels; pass one weight per channel")
        return (b, 1, h, w)

    def x_shape(self, y_shape: Shape) -> Shape:
        b, c, h, w = y_shape
        if c != 1:
            raise ValueError(f"a colorize observation has 1 channel, got {c}; pass [B, 1, H, W]")
        return (b, len(self.weights), h, w)

    def A(self, x: Tensor) -> Tensor:
        _check_image(x)
        self.y_shape(tuple(x.shape))
        return (x * self._w(x)).sum(dim=1, keepdim=True)

    def A_adjoint(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        self._target_shape(y, x_shape)
        return y * self._w(y)

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        return self.A_adjoint(y, x_shape=x_shape) / float(self.weights.square().sum())

    def gram_scalar(self) -> float | None:
        return float(self.weights.square().sum())

    def _w(self, like: Tensor) -> Tensor:
        """Weights `[1, C, 1, 1]` on `like`'s device/dtype."""
        return self._cache.get("w", like, lambda: self.weights.view(1, -1, 1, 1))
