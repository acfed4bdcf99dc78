"""Operator contract, registry, factory and the observation protocol (`degrade`).

Images are `[B, C, H, W]` float tensors in `[0, 1]` ("pixel space"). The only conversion to the
`[0, 255]` scale happens in `degrade`, which reproduces how GDP stored its observations.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]

OPERATORS: dict[str, type["Operator"]] = {}

# `degrade` truncates like a uint8 cast, but values within this many grey levels *below* an
# integer count as that integer: floating point turns an exact 200 into 199.99998 (for example a
# flat region under a kernel summing to 1 - 1e-8), and a plain floor would then drop a level.
TRUNCATION_TOLERANCE = 1e-3

_O = TypeVar("_O", bound=type["Operator"])


def register(cls: _O) -> _O:
    """Class decorator: add an operator class to `OPERATORS` under its `name`."""
    if not cls.name or cls.name in OPERATORS:
        raise ValueError(f"operator name {cls.name!r} is empty or already registered")
    OPERATORS[cls.name] = cls
    return cls


class Operator(nn.Module):
    """Degradation operator D on `[B, C, H, W]` images in `[0, 1]` (deepinv-style physics).

    Subclasses implement `A`, `y_shape`, `x_shape`, `A_dagger` and, when `linear`, a closed-form
    `A_adjoint`. Internal tensors (kernels, masks) are built on the input's device and dtype at
    call time, so one instance serves every device and float dtype; an operator is fully defined
    by its constructor options (its `state_dict` is empty).

    `A_adjoint` and `A_dagger` take an optional `x_shape`: the size of the image the observation
    came from. It is only needed where `y_shape` cannot be inverted (bicubic SR on a size that is
    not a multiple of the factor); by default it is `self.x_shape(y.shape)`.
    """

    name: ClassVar[str] = ""
    linear: ClassVar[bool] = True

    def A(self, x: Tensor) -> Tensor:
        """Forward operator: `[B, C, H, W]` -> `self.y_shape(x.shape)`."""
        raise NotImplementedError

    def A_adjoint(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        """Closed-form adjoint (transpose) of `A`: observation -> image of shape `x_shape`."""
        raise NotImplementedError(f"operator {self.name!r} is not linear: it has no adjoint")

    def A_dagger(self, y: Tensor, *, x_shape: Shape | None = None) -> Tensor:
        """Cheap pseudo-inverse / initialisation: observation -> image of shape `x_shape`."""
        raise NotImplementedError

    def gram_scalar(self) -> float | None:
        """c where `A A^T = c I` on the observations (row-orthogonal A), else None. Such an
        operator's regularised data step has a closed form (`gdp.guidance.project`):
        argmin_x |A x - y|^2 + rho |x - x0|^2 = x0 + A^T (y - A x0) / (c + rho)."""
        return None

    def y_shape(self, x_shape: Shape) -> Shape:
        """Shape of `A(x)` for an `x` of shape `(B, C, H, W)`; raises ValueError if impossible."""
        raise NotImplementedError

    def x_shape(self, y_shape: Shape) -> Shape:
        """Shape of the image to restore from an observation of shape `y_shape`."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.A(x)

    def _target_shape(self, y: Tensor, x_shape: Shape | None) -> Shape:
        """`x_shape` (checked against `y`) or, when None, the default `self.x_shape(y.shape)`."""
        _check_image(y, "observation")
        if x_shape is None:
            return self.x_shape(tuple(y.shape))
        x_shape = tuple(int(s) for s in x_shape)
        if len(x_shape) != 4 or self.y_shape(x_shape) != tuple(y.shape):
            raise ValueError(
                f"{self.name}: an image of shape {x_shape} gives observations of shape "
                f"{self.y_shape(x_shape) if len(x_shape) == 4 else '?'}, not {tuple(y.shape)}; "
                "pass the shape of the image the observation came from"
            )
        return x_shape


def _check_image(x: Tensor, what: str = "image") -> None:
    """Raise unless `x` is a 4-D floating-point tensor `[B, C, H, W]`."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected a 4-D {what} tensor [B, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point {what} tensor, got {x.dtype}; use x.float()")


class TensorCache:
    """Per-(key, device, dtype) cache of derived tensors, so device copies are made once."""

    def __init__(self) -> None:
        self._store: dict[tuple[Any, ...], Tensor] = {}

    def get(self, key: Any, like: Tensor, build: Callable[[], Tensor]) -> Tensor:
        """`build()` (a float64 or bool CPU tensor) converted to `like`'s device/dtype, cached."""
        full_key = (key, like.device, like.dtype)
        if full_key not in self._store:
            self._store[full_key] = build().to(device=like.device, dtype=like.dtype)
        return self._store[full_key]


def make_operator(task: str, **options: Any) -> Operator:
    """Build the registered operator for `task` ("sr", "deblur", "inpaint", "colorize")."""
    if task not in OPERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(sorted(OPERATORS))}")
    cls = OPERATORS[task]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for task {task!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return cls(**options)


def degrade(
    x: Tensor,
    op: Operator,
    *,
    noise_sigma: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Observation y of clean images `x` `[B, C, H, W]` in `[0, 1]`, as GDP stored them (§3.0).

    1. apply `op.A` in float on the `[0, 255]` scale;
    2. add Gaussian noise of std `noise_sigma` (given in `[0, 1]` units, i.e. `255 * noise_sigma`
       grey levels) when `noise_sigma > 0`, drawn from `generator`;
    3. clamp to `[0, 255]`;
    4. truncate (floor) to integers, like the paper's uint8 cast (it does not round). Values less
       than `TRUNCATION_TOLERANCE` grey levels below an integer are taken as that integer, so
       floating-point error cannot drop an exact value by one level.

    Returns float in `[0, 1]` of shape `op.y_shape(x.shape)`, holding values `k / 255`.
    """
    if noise_sigma < 0:
        raise ValueError(f"noise_sigma must be >= 0 (in [0, 1] units), got {noise_sigma}")
    y = op.A(x * 255.0)
    if noise_sigma > 0:
        device = generator.device if generator is not None else y.device
        noise = torch.randn(y.shape, generator=generator, device=device, dtype=y.dtype)
        y = y + (255.0 * noise_sigma) * noise.to(y.device)
    y = torch.floor(y.clamp(0.0, 255.0) + TRUNCATION_TOLERANCE).clamp(max=255.0)
    return y / 255.0
