"""Degradation operators of GDP (Fei et al., CVPR 2023) on `[B, C, H, W]` images in `[0, 1]`.

`make_operator(task, **options)` builds one of the registered tasks in `OPERATORS`
("sr", "deblur", "inpaint", "colorize", and the blind "lowlight", "hdr", "blind-deblur" whose
parameters are estimated during sampling); `degrade(x, op)` makes an observation the way the paper
stored them (A on the [0, 255] scale, optional noise, clamp, truncation to integers).
"""

from .base import OPERATORS, TRUNCATION_TOLERANCE, Operator, degrade, make_operator, register
from .blind import HDR, BlindDeblur, BlindOperator, LowLight, exposure_bracket, low_light, motion_kernel
from .kernels import gaussian_kernel, load_kernel, paper_blur_kernel
from .linear import Colorize, Deblur, Inpaint, SuperResolution

__all__ = [
    "HDR",
    "OPERATORS",
    "BlindDeblur",
    "BlindOperator",
    "LowLight",
    "exposure_bracket",
    "low_light",
    "motion_kernel",
    "TRUNCATION_TOLERANCE",
    "Colorize",
    "Deblur",
    "Inpaint",
    "Operator",
    "SuperResolution",
    "degrade",
    "gaussian_kernel",
    "load_kernel",
    "make_operator",
    "paper_blur_kernel",
    "register",
]
