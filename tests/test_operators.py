"""Operator battery (deepinv-style) on the odd size (3, 37, 31), plus per-operator checks."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gdp.operators import (
    OPERATORS,
    TRUNCATION_TOLERANCE,
    Deblur,
    Inpaint,
    Operator,
    SuperResolution,
    degrade,
    make_operator,
    paper_blur_kernel,
)

SIZE = (3, 37, 31)  # odd, non-square: catches stride and padding bugs


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _asymmetric_kernel(kh: int, kw: int) -> torch.Tensor:
    return torch.rand(kh, kw, generator=_seeded(7), dtype=torch.float64)


def _explicit_mask(h: int, w: int) -> torch.Tensor:
    return (torch.rand(h, w, generator=_seeded(3)) > 0.4).float()


# name -> (factory, image size (C, H, W)). avgpool needs multiples of the factor: the nearest
# valid size below SIZE is used; every other operator runs on SIZE itself.
CASES: dict[str, tuple[Callable[[], Operator], tuple[int, int, int]]] = {
    "sr-avgpool-x2": (lambda: make_operator("sr", factor=2), (3, 36, 30)),
    "sr-avgpool-x4": (lambda: make_operator("sr", factor=4), (3, 36, 28)),
    "sr-bicubic-x2": (lambda: make_operator("sr", factor=2, filter="bicubic"), SIZE),
    "sr-bicubic-x3": (lambda: make_operator("sr", factor=3, filter="bicubic"), SIZE),
    "sr-bicubic-x4": (lambda: make_operator("sr", factor=4, filter="bicubic"), SIZE),
    "sr-bicubic-x4-multiple": (
        lambda: make_operator("sr", factor=4, filter="bicubic"), (3, 36, 28)),
    "deblur-paper-same": (lambda: make_operator("deblur"), SIZE),
    "deblur-paper-valid": (lambda: make_operator("deblur", mode="valid"), SIZE),
    "deblur-asym-same": (lambda: make_operator("deblur", kernel=_asymmetric_kernel(5, 7)), SIZE),
    "deblur-asym-valid": (
        lambda: make_operator("deblur", kernel=_asymmetric_kernel(5, 7), mode="valid"), SIZE),
    "deblur-even-same": (lambda: make_operator("deblur", kernel=_asymmetric_kernel(4, 6)), SIZE),
    "deblur-gauss-same": (lambda: make_operator("deblur", sigma=1.2, kernel_size=7), SIZE),
    "inpaint-ratio": (lambda: make_operator("inpaint", ratio=0.25, seed=1), SIZE),
    "inpaint-box": (lambda: make_operator("inpaint", box=(5, 8, 12, 10)), SIZE),
    "inpaint-mask": (lambda: make_operator("inpaint", mask=_explicit_mask(37, 31)), SIZE),
    "colorize-mean": (lambda: make_operator("colorize"), SIZE),
    "colorize-ddrm": (lambda: make_operator("colorize", weights=(0.3333, 0.3334, 0.3333)), SIZE),
}
# Operators whose A_dagger is the exact Moore-Penrose pseudo-inverse.
PINV_CASES = [name for name in CASES if name.startswith(("sr", "inpaint", "colorize"))]


def _build(case: str, dtype: torch.dtype = torch.float64, batch: int = 2):
    make, size = CASES[case]
    x = torch.rand(batch, *size, generator=_seeded(0), dtype=torch.float64).to(dtype)
    return make(), x


def _random_like(y: torch.Tensor, seed: int = 1) -> torch.Tensor:
    return torch.randn(y.shape, generator=_seeded(seed), dtype=y.dtype)


def _invertible_shape(op: Operator, x: torch.Tensor) -> bool:
    """False only for bicubic SR on a size that is not a multiple of the factor (ceil)."""
    if isinstance(op, SuperResolution) and op.filter == "bicubic":
        return x.shape[-2] % op.factor == 0 and x.shape[-1] % op.factor == 0
    return True


# ----------------------------------------------------------------------------------- battery


def test_battery_covers_every_registered_operator():
    """Every linear operator is in this battery; the blind ones are tested in test_blind.py."""
    linear = {name for name, cls in OPERATORS.items() if cls.linear}
    assert {make().name for make, _ in CASES.values()} == linear
    assert set(OPERATORS) - linear == {"lowlight", "hdr", "blind-deblur"}
    assert all(issubclass(cls, Operator) and getattr(cls, "blind", False) != cls.linear for cls in OPERATORS.values())


@pytest.mark.parametrize("case", CASES)
def test_adjointness(case):
    op, x = _build(case)
    y = _random_like(op.A(x))
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_adjoint(y, x_shape=x.shape)).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-6
    assert abs(lhs - rhs) / abs(lhs) < 1e-12  # float64: it is exact up to rounding


@pytest.mark.parametrize("case", CASES)
def test_adjoint_equals_autograd_vjp(case):
    op, x = _build(case)
    v = _random_like(op.A(x))
    _, vjp = torch.autograd.functional.vjp(op.A, x, v)
    torch.testing.assert_close(op.A_adjoint(v, x_shape=x.shape), vjp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_shapes_consistent(case):
    op, x = _build(case)
    y = op.A(x)
    assert tuple(y.shape) == op.y_shape(tuple(x.shape))
    assert op.A_adjoint(y, x_shape=x.shape).shape == x.shape
    assert op.A_dagger(y, x_shape=x.shape).shape == x.shape
    assert tuple(op.A_dagger(y).shape) == op.x_shape(tuple(y.shape))
    assert tuple(op.A_adjoint(y).shape) == op.x_shape(tuple(y.shape))
    if _invertible_shape(op, x):
        assert op.x_shape(tuple(y.shape)) == tuple(x.shape)


@pytest.mark.parametrize("case", CASES)
def test_wrong_x_shape_for_observation_raises(case):
    op, x = _build(case)
    y = op.A(x)
    with pytest.raises(ValueError, match="observation|mask"):
        op.A_adjoint(y, x_shape=(2, 3, 80, 80))


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device"))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_dtype_and_device_preserved(case, dtype, device):
    op, x64 = _build(case)
    x = x64.to(device=device, dtype=dtype)
    y = op.A(x)
    for out in (y, op.A_adjoint(y, x_shape=x.shape), op.A_dagger(y, x_shape=x.shape)):
        assert out.dtype == dtype and out.device.type == device
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y.cpu().double(), op.A(x64), atol=tol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_gradients_flow_through_A(case):
    op, x = _build(case, dtype=torch.float32)
    x.requires_grad_(True)
    op(x).square().sum().backward()  # forward is A
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES)
def test_forward_is_A_and_module_state(case):
    op, x = _build(case)
    assert isinstance(op, torch.nn.Module)
    torch.testing.assert_close(op(x), op.A(x), atol=0, rtol=0)
    op.load_state_dict(op.state_dict())  # fully defined by its options


@pytest.mark.parametrize("case", PINV_CASES)
def test_A_dagger_is_pseudo_inverse(case):
    op, x = _build(case)
    y = op.A(x)
    x_dagger = op.A_dagger(y, x_shape=x.shape)
    torch.testing.assert_close(op.A(x_dagger), y, atol=1e-10, rtol=0)
    # Moore-Penrose: the pseudo-inverse solution is the one orthogonal to A's null space, so
    # applying A_dagger A to it changes nothing.
    torch.testing.assert_close(op.A_dagger(op.A(x_dagger), x_shape=x.shape), x_dagger,
                               atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_degrade_truncates_on_the_255_scale(case):
    op, x = _build(case)
    y = degrade(x, op)
    levels = y * 255
    torch.testing.assert_close(levels, levels.round(), atol=1e-9, rtol=0)
    expected = torch.floor((255 * op.A(x)).clamp(0, 255) + TRUNCATION_TOLERANCE).clamp(max=255)
    torch.testing.assert_close(y, expected / 255, atol=1e-12, rtol=0)
    assert y.min() >= 0 and y.max() <= 1


# --------------------------------------------------------------------------------- degrade


def test_degrade_matches_plain_floor_away_from_integers():
    op, x = make_operator("deblur"), torch.rand(1, *SIZE, generator=_seeded(0), dtype=torch.float64)
    v = 255 * op.A(x)
    away = (v - v.floor()) < 1 - TRUNCATION_TOLERANCE
    assert away.float().mean() > 0.99
    torch.testing.assert_close((degrade(x, op) * 255)[away], v.floor()[away])


@pytest.mark.parametrize("kernel", [torch.ones(9, 9), None], ids=["box", "paper"])
def test_degrade_keeps_exact_grey_levels(kernel):
    """A flat k/255 image stays k/255 under a blur in float32 (a plain floor drops ~40% of the
    levels by one here: that is why `degrade` has TRUNCATION_TOLERANCE)."""
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16).repeat(1, 3, 1, 1) / 255
    flat = levels.repeat_interleave(9, -2).repeat_interleave(9, -1)  # 9x9 flat blocks
    op = make_operator("deblur", mode="valid", kernel=kernel)
    y = degrade(flat, op)
    torch.testing.assert_close(y[..., ::9, ::9], levels, atol=0, rtol=0)


def test_degrade_noise_is_seeded_and_scaled():
    x = torch.full((1, 3, 64, 64), 0.5)
    op = make_operator("colorize")
    a = degrade(x, op, noise_sigma=0.05, generator=_seeded(5))
    b = degrade(x, op, noise_sigma=0.05, generator=_seeded(5))
    c = degrade(x, op, noise_sigma=0.05, generator=_seeded(6))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    assert abs((a - 0.5).std().item() - 0.05) < 0.005
    torch.testing.assert_close(a * 255, (a * 255).round(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="noise_sigma"):
        degrade(x, op, noise_sigma=-1.0)


def test_degrade_clamps_overshoot():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 8:, :] = 1.0  # a step edge: bicubic rings below 0 and above 1
    op = make_operator("sr", factor=2, filter="bicubic")
    assert op.A(x).min() < 0 and op.A(x).max() > 1
    y = degrade(x, op)
    assert y.min() == 0 and y.max() == 1


# ------------------------------------------------------------------------------ factory


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("denoise", {}, "unknown task 'denoise'; choose one of: blind-deblur, colorize, deblur, hdr, inpaint, lowlight, sr"),
        ("sr", {"factr": 2}, "unknown option"),
        ("sr", {"filter": "bilinear"}, "avgpool"),
        ("sr", {"factor": 2.5}, "integer"),
        ("sr", {"factor": 0}, "integer"),
        ("deblur", {"mode": "full"}, "same"),
        ("deblur", {"kernel": torch.ones(3, 3), "sigma": 1.0}, "one of"),
        ("deblur", {"kernel_size": 5}, "sigma"),
        ("deblur", {"kernel": torch.ones(3)}, "2-D"),
        ("deblur", {"kernel": torch.tensor([[1.0, -1.0]])}, "sums to 0"),
        ("inpaint", {}, "exactly one"),
        ("inpaint", {"ratio": 0.2, "box": (0, 0, 1, 1)}, "exactly one"),
        ("inpaint", {"ratio": 1.5}, "ratio"),
        ("inpaint", {"box": (0, 0, 1, 1), "seed": 3}, "seed"),
        ("inpaint", {"mask": torch.full((4, 4), 0.5)}, "binary"),
        ("colorize", {"weights": (0.0, 0.0, 0.0)}, "weights"),
    ],
)
def test_make_operator_rejects_bad_input(task, options, message):
    with pytest.raises(ValueError, match=message):
        make_operator(task, **options)


def test_make_operator_builds_the_registered_class():
    assert isinstance(make_operator("deblur", sigma=2.0), Deblur)
    assert make_operator("sr").factor == 4 and make_operator("sr").filter == "avgpool"


# ---------------------------------------------------------------------- super-resolution


def test_avgpool_is_block_mean_and_rejects_non_multiples():
    x = torch.rand(2, 3, 8, 12, generator=_seeded(0), dtype=torch.float64)
    op = make_operator("sr", factor=4)
    expected = x.view(2, 3, 2, 4, 3, 4).mean(dim=(3, 5))
    torch.testing.assert_close(op.A(x), expected, atol=1e-15, rtol=0)
    torch.testing.assert_close(op.A_dagger(op.A(x)), expected.repeat_interleave(4, -2)
                               .repeat_interleave(4, -1))
    with pytest.raises(ValueError, match=r"divisible by the factor 4, got 37x31.*36x28"):
        op.A(torch.rand(1, *SIZE))


@pytest.mark.parametrize("factor", [2, 3, 4])
def test_bicubic_interior_matches_torch_antialias(factor):
    """torch's antialiased bicubic uses the same a=-0.5 stretched cubic; borders differ
    (torch renormalises truncated weights, we mirror symmetrically like MATLAB)."""
    x = torch.rand(1, 3, 12 * factor, 10 * factor, generator=_seeded(0), dtype=torch.float64)
    op = make_operator("sr", factor=factor, filter="bicubic")
    reference = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True)
    torch.testing.assert_close(op.A(x)[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2],
                               atol=1e-12, rtol=0)


def test_bicubic_odd_sizes_use_ceil_and_keep_constants():
    op = make_operator("sr", factor=4, filter="bicubic")
    assert op.y_shape((1, 3, 37, 31)) == (1, 3, 10, 8)
    assert op.x_shape((1, 3, 10, 8)) == (1, 3, 40, 32)
    y = op.A(torch.full((1, 3, 37, 31), 0.3, dtype=torch.float64))
    torch.testing.assert_close(y, torch.full_like(y, 0.3), atol=1e-14, rtol=0)


def test_factor_one_is_identity():
    x = torch.rand(1, *SIZE, generator=_seeded(0), dtype=torch.float64)
    for flt in ("avgpool", "bicubic"):
        torch.testing.assert_close(make_operator("sr", factor=1, filter=flt).A(x), x)


# ----------------------------------------------------------------------------- deblurring


def test_paper_kernel_numbers():
    k = paper_blur_kernel()
    assert k.shape == (9, 9)
    assert abs(k[4, 4].item() - 0.02515) < 5e-6
    assert abs(k[0, 0].item() - 0.00338) < 5e-6
    assert abs(k.sum().item() - 1) < 1e-14
    torch.testing.assert_close(k, k.T)
    torch.testing.assert_close(make_operator("deblur").kernel, k)


@pytest.mark.parametrize("mode", ["same", "valid"])
def test_deblur_matches_padded_conv2d_reference(mode):
    kernel = _asymmetric_kernel(5, 7)
    op = make_operator("deblur", kernel=kernel, mode=mode)
    x = torch.rand(2, *SIZE, generator=_seeded(0), dtype=torch.float64)
    k = (kernel / kernel.sum()).flip(0, 1)[None, None].repeat(3, 1, 1, 1)
    padded = F.pad(x, (3, 3, 2, 2), mode="reflect") if mode == "same" else x
    torch.testing.assert_close(op.A(x), F.conv2d(padded, k, groups=3), atol=1e-14, rtol=0)


def test_deblur_is_a_true_convolution():
    """The image of a centred impulse is the kernel itself, not its mirror image."""
    kernel = _asymmetric_kernel(5, 7)
    x = torch.zeros(1, 1, 37, 31, dtype=torch.float64)
    x[..., 18, 15] = 1.0
    y = make_operator("deblur", kernel=kernel).A(x)
    torch.testing.assert_close(y[0, 0, 16:21, 12:19], kernel / kernel.sum())


def test_deblur_valid_shape_and_dagger():
    op = make_operator("deblur", mode="valid")
    assert op.y_shape((1, 3, 256, 256)) == (1, 3, 248, 248)  # the paper's 248x248
    y = torch.rand(1, 3, 29, 23, generator=_seeded(0))
    x0 = op.A_dagger(y)
    assert x0.shape == (1, 3, 37, 31)
    torch.testing.assert_close(x0[..., 4:-4, 4:-4], y, atol=0, rtol=0)
    with pytest.raises(ValueError, match="at least"):
        op.A(torch.rand(1, 3, 8, 40))


def test_kernel_files(tmp_path):
    kernel = _asymmetric_kernel(5, 7)
    np.save(tmp_path / "k.npy", kernel.numpy())
    from_npy = make_operator("deblur", kernel_file=str(tmp_path / "k.npy"))
    torch.testing.assert_close(from_npy.kernel, kernel / kernel.sum())
    grey = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "k.png")
    from_png = make_operator("deblur", kernel_file=str(tmp_path / "k.png"))
    torch.testing.assert_close(from_png.kernel, torch.tensor(grey / grey.sum()))


# ----------------------------------------------------------------------------- inpainting


def test_random_masks_are_deterministic_and_have_the_ratio():
    a = make_operator("inpaint", ratio=0.25, seed=0).mask_for(256, 256)
    b = make_operator("inpaint", ratio=0.25, seed=0).mask_for(256, 256)
    c = make_operator("inpaint", ratio=0.25, seed=1).mask_for(256, 256)
    assert a.shape == (1, 1, 256, 256)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs((1 - a.mean().item()) - 0.25) < 0.01


def test_inpaint_mask_is_shared_by_channels_and_built_per_size():
    op = make_operator("inpaint", ratio=0.5, seed=2)
    y = op.A(torch.ones(2, 3, 20, 24))
    assert torch.equal(y[:, :1].expand_as(y), y)
    torch.testing.assert_close(y[:1, :1], op.mask_for(20, 24))
    assert op.A(torch.ones(1, 3, 9, 11)).shape == (1, 3, 9, 11)


def test_box_mask():
    mask = make_operator("inpaint", box=(5, 8, 12, 10)).mask_for(37, 31)[0, 0]
    assert mask[8:18, 5:17].sum() == 0 and mask.sum() == 37 * 31 - 120
    with pytest.raises(ValueError, match="does not fit"):
        make_operator("inpaint", box=(25, 0, 12, 10)).A(torch.rand(1, *SIZE))


def test_explicit_mask_must_match_the_image():
    mask = _explicit_mask(37, 31)
    op = make_operator("inpaint", mask=mask[None, None])
    torch.testing.assert_close(op.mask_for(37, 31)[0, 0], mask)
    with pytest.raises(ValueError, match="mask is 37x31 but image is 36x31"):
        op.A(torch.rand(1, 3, 36, 31))


def test_mask_file_thresholds_at_128(tmp_path):
    grey = np.array([[0, 127, 128], [255, 200, 10]], dtype=np.uint8)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "mask.png")
    op = make_operator("inpaint", mask_file=str(tmp_path / "mask.png"))
    expected = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    torch.testing.assert_close(op.mask_for(2, 3)[0, 0], expected)
    assert isinstance(op, Inpaint)


# ---------------------------------------------------------------------------- colorization


def test_colorize_weights_and_pinv():
    op = make_operator("colorize", weights=(0.2, 0.3, 0.5))
    x = torch.rand(2, *SIZE, generator=_seeded(0), dtype=torch.float64)
    expected = 0.2 * x[:, :1] + 0.3 * x[:, 1:2] + 0.5 * x[:, 2:]
    torch.testing.assert_close(op.A(x), expected)
    grey = torch.full((1, 1, 4, 4), 0.6, dtype=torch.float64)
    torch.testing.assert_close(op.A_dagger(grey)[0, :, 0, 0],
                               torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64) * 0.6 / 0.38)
    with pytest.raises(ValueError, match="3 weights but the image has 4 channels"):
        op.A(torch.rand(1, 4, 8, 8))
