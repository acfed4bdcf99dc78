"""psnr / ssim against skimage.metrics on real photographs; consistency_psnr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from gdp.metrics import consistency_psnr, psnr, ssim
from gdp.operators import make_operator


def _photo(name: str, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """A crop of a skimage sample photograph as float64 `[1, C, h, w]` in [0, 1]."""
    image = getattr(data, name)()[top : top + h, left : left + w]
    if image.ndim == 2:
        image = image[..., None]
    return torch.from_numpy(image.astype(np.float64) / 255).permute(2, 0, 1)[None]


def _noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (x + sigma * noise).clamp(0, 1)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    return make_operator("deblur", sigma=1.5).A(x)


# (clean, degraded) batches of two photographs each; odd sizes on purpose
def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    rgb = torch.cat([_photo("astronaut", 40, 180, 97, 131), _photo("chelsea", 60, 120, 97, 131)])
    grey = torch.cat([_photo("camera", 100, 200, 64, 80), _photo("camera", 300, 50, 64, 80)])
    return {
        "rgb-noisy": (rgb, _noisy(rgb, 0.08, 0)),
        "rgb-blurred": (rgb, _blurred(rgb)),
        "grey-noisy": (grey, _noisy(grey, 0.03, 1)),
    }


PAIRS = _pairs()


def _skimage_per_image(metric, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    to_hwc = lambda t: t.permute(1, 2, 0).numpy()  # noqa: E731
    return torch.tensor([metric(to_hwc(a), to_hwc(b)) for a, b in zip(x, y)], dtype=torch.float64)


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1, channel_axis=2)


def _sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return peak_signal_noise_ratio(a, b, data_range=1)


@pytest.mark.parametrize("pair", PAIRS)
def test_psnr_matches_skimage(pair):
    x, y = PAIRS[pair]
    ours = psnr(x, y)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, _skimage_per_image(_sk_psnr, x, y), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pair", PAIRS)
def test_ssim_matches_skimage(pair):
    x, y = PAIRS[pair]
    expected = _skimage_per_image(_sk_ssim, x, y)
    assert expected.min() < 0.95  # the degradation is visible: a meaningful comparison
    torch.testing.assert_close(ssim(x, y), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(ssim(x, y), expected, atol=1e-10, rtol=0)  # float64: exact
    torch.testing.assert_close(ssim(x.float(), y.float()).double(), expected, atol=1e-4, rtol=0)


def test_metrics_scale_with_data_range():
    x, y = PAIRS["rgb-noisy"]
    torch.testing.assert_close(psnr(255 * x, 255 * y, data_range=255), psnr(x, y))
    torch.testing.assert_close(ssim(255 * x, 255 * y, data_range=255), ssim(x, y))


def test_identical_images():
    x, _ = PAIRS["rgb-noisy"]
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="11x11"):
        ssim(torch.rand(1, 3, 10, 16), torch.rand(1, 3, 10, 16))


def test_consistency_psnr():
    x, _ = PAIRS["rgb-noisy"]
    op = make_operator("sr", factor=2, filter="bicubic")
    y = _noisy(op.A(x), 0.02, 3)
    x_hat = _blurred(x)
    torch.testing.assert_close(consistency_psnr(op, x_hat, y), psnr(op.A(x_hat), y))
    assert torch.isinf(consistency_psnr(op, x, op.A(x))).all()


def test_noise_sigma_reads_white_noise_and_little_of_the_picture():
    from gdp.metrics import noise_sigma
    from gdp.operators import degrade, make_operator
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    blur = make_operator("deblur")
    for sigma in (0.01, 0.02, 0.05):
        y = degrade(x, blur, noise_sigma=sigma, generator=torch.Generator().manual_seed(0))
        assert abs(float(noise_sigma(y)[0]) - sigma) < 0.15 * sigma + 0.003
    assert float(noise_sigma(degrade(x, blur))[0]) < 0.003  # blurred and quantised: no noise read
    assert float(noise_sigma(degrade(x, make_operator("sr", factor=4)))[0]) < 0.015  # below the CLI's NOISY
