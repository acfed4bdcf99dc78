"""Classical baselines that `gdp.evaluate` scores next to GDP, in one registry: task -> method.

A baseline maps an `EvalCase` (the operator, the observation y `[B, C', h, w]` in [0, 1], the
shape `[B, C, H, W]` of the image to restore, and the ground truth for oracle baselines) to an
image of that shape in [0, 1]. A new task's baselines are one entry in `BASELINES`, e.g.

    BASELINES["lowlight"] = {"gain": Baseline(gain), "histeq": Baseline(histogram_equalisation),
                             "clahe": Baseline(clahe, requires=("skimage",))}
    BASELINES["hdr"] = {"best-exposure (oracle)": Baseline(best_exposure)}  # reads case.reference

`requires` names modules a baseline imports at run time: scikit-image is the optional `eval`
extra (`pip install 'gdp[eval]'`), and `missing_requirements` says what is missing before a run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gdp.operators import Operator

RL_ITERATIONS = 50  # scikit-image's default for richardson_lucy
EXTRA_HINT = "pip install 'gdp[eval]'"


@dataclass(frozen=True)
class EvalCase:
    """One observation to restore: `op`, `y` in [0, 1], `x_shape` [B, C, H, W], ground truth."""

    op: Operator
    y: torch.Tensor
    x_shape: tuple[int, ...]
    reference: torch.Tensor | None = None  # only oracle baselines may read it


@dataclass(frozen=True)
class Baseline:
    fn: Callable[[EvalCase], torch.Tensor]
    requires: tuple[str, ...] = ()  # modules imported at run time (see missing_requirements)


def bicubic(case: EvalCase) -> torch.Tensor:
    """Bicubic upsampling of the low-resolution observation to the image size (a = -0.75, torch)."""
    return F.interpolate(case.y, size=case.x_shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def richardson_lucy(case: EvalCase, iterations: int = RL_ITERATIONS, eps: float = 1e-12) -> torch.Tensor:
    """Richardson-Lucy deconvolution (Richardson 1972; Lucy 1974) with the true operator A:
    x <- x * A^T(y / A x) / A^T 1, from a flat 0.5 (as scikit-image); A^T 1 makes it exact at
    the borders of a 'valid' or padded convolution, where scikit-image assumes a zero outside."""
    op, y = case.op, case.y.float()  # float64 gives the same PSNR to 1e-5 dB, 7x slower on CPU
    norm = op.A_adjoint(torch.ones_like(y), x_shape=case.x_shape).clamp_min(eps)
    x = torch.full(case.x_shape, 0.5, dtype=y.dtype, device=y.device)
    for _ in range(iterations):
        x = x * op.A_adjoint(y / op.A(x).clamp_min(eps), x_shape=case.x_shape) / norm
    return x.clamp(0, 1)


def biharmonic(case: EvalCase) -> torch.Tensor:
    """Biharmonic inpainting of the missing pixels (scikit-image `inpaint_biharmonic`)."""
    from skimage.restoration import inpaint_biharmonic
    h, w = case.x_shape[-2:]
    missing = (case.op.mask_for(h, w)[0, 0] == 0).numpy()
    images = case.y.permute(0, 2, 3, 1).double().cpu().numpy()
    filled = [inpaint_biharmonic(image, missing, channel_axis=-1) for image in images]
    return torch.from_numpy(np.stack(filled)).permute(0, 3, 1, 2).float().clamp(0, 1)


def gray(case: EvalCase) -> torch.Tensor:
    """The gray observation in every channel (colorization's do-nothing answer)."""
    return case.y.expand(-1, case.x_shape[1], -1, -1).clone()


def gain_to_mean(case: EvalCase, target: float = 0.45) -> torch.Tensor:
    """Low light: one global gain that brings the observation's mean to `target`."""
    return (case.y * (target / case.y.mean().clamp_min(1e-6))).clamp(0, 1)


def _skimage_exposure(case: EvalCase, name: str, **options) -> torch.Tensor:
    from skimage import exposure
    img = case.y[0].permute(1, 2, 0).double().numpy()
    out = getattr(exposure, name)(img, **options)
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].float().clamp(0, 1)


def histogram_equalisation(case: EvalCase) -> torch.Tensor:
    """Low light: scikit-image `equalize_hist` on all channels together (one histogram)."""
    return _skimage_exposure(case, "equalize_hist")


def clahe(case: EvalCase) -> torch.Tensor:
    """Low light: scikit-image `equalize_adapthist` (CLAHE), clip limit 0.01."""
    return _skimage_exposure(case, "equalize_adapthist", clip_limit=0.01)


def exposure(k: int) -> Callable[[EvalCase], torch.Tensor]:
    """HDR: exposure k of the bracket (stacked on channels) as shot."""
    return lambda case: case.y[:, 3 * k:3 * k + 3]


BASELINES: dict[str, dict[str, Baseline]] = {
    "sr": {"bicubic": Baseline(bicubic)},
    "deblur": {"richardson-lucy": Baseline(richardson_lucy)},
    "inpaint": {"biharmonic": Baseline(biharmonic, requires=("skimage",))},
    "colorize": {"gray": Baseline(gray)},
    "lowlight": {"gain": Baseline(gain_to_mean), "histeq": Baseline(histogram_equalisation, requires=("skimage",)),
                 "clahe": Baseline(clahe, requires=("skimage",))},
    "hdr": {"exposure-1": Baseline(exposure(0)), "exposure-2": Baseline(exposure(1))},
}


def missing_requirements(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """One line per baseline of `tasks` whose run-time modules are not installed (empty: all fine)."""
    return [f"the {task} baseline {name!r} needs the module {module!r}: {EXTRA_HINT}"
            for task in tasks for name, baseline in BASELINES.get(task, {}).items()
            for module in baseline.requires if importlib.util.find_spec(module) is None]
