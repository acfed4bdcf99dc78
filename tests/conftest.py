"""Fixtures shared by the sampler, restore, CLI and training tests: a tiny random prior and real
photo crops (skimage.data). Kept free of Prefect: flow fixtures live in tests/flows/conftest.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import skimage.data
import torch

from gdp.prior.checkpoint import Prior, PriorSpec, build_prior, save_prior

TINY_PRESET = "adm-tiny-32"

# Two shared cores and a background job: one intra-op thread is several times faster than two
# fighting threads for these tiny networks (and the results do not depend on it).
torch.set_num_threads(1)


def randomise_(prior: Prior, seed: int = 0, std: float = 0.1) -> Prior:
    """Redraw every weight as std * randn: the real init zeroes the output convs, so eps and v
    would be exactly 0 and hide wiring bugs (with std 0.1, eps has a std of about 0.17)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return prior


@pytest.fixture(scope="session")
def tiny_prior() -> Prior:
    """adm-tiny-32 (32-px native, learned sigma) with random non-zero weights. Do not modify."""
    return randomise_(build_prior(PriorSpec.from_preset(TINY_PRESET)))


@pytest.fixture(scope="session")
def tiny_prior_file(tiny_prior: Prior, tmp_path_factory) -> Path:
    """`tiny_prior` saved with `save_prior` (spec in the metadata)."""
    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    save_prior(str(path), tiny_prior, tiny_prior.spec)
    return path


def photo(height: int, width: int, *, name: str = "astronaut", top: int = 0, left: int = 0,
          step: int = 4) -> torch.Tensor:
    """A real photo crop `[1, C, height, width]` in [0, 1] (C = 3, or 1 for gray images), taken
    every `step` pixels so that small crops still hold edges and texture."""
    array = np.asarray(getattr(skimage.data, name)())
    crop = array[top:top + height * step:step, left:left + width * step:step]
    if crop.shape[:2] != (height, width):
        raise ValueError(f"{name} is too small for a {height}x{width} crop at step {step}")
    x = torch.from_numpy(crop.astype(np.float32) / 255.0)
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    return x.contiguous()


@pytest.fixture
def photo_crop() -> Callable[..., torch.Tensor]:
    return photo


@pytest.fixture
def photo_png(tmp_path: Path) -> Path:
    """A 40x40 RGB crop of skimage's astronaut written as an 8-bit PNG."""
    from gdp.io import write_image
    path = tmp_path / "photo.png"
    write_image(str(path), photo(40, 40, top=40, left=120))
    return path
