"""restore() end to end with a tiny random prior: seeds per image, patch fusion, small images,
shapes, ranges, NFE and measurement consistency."""

from __future__ import annotations

import pytest
import torch

from gdp.guidance import Guidance
from gdp.operators import make_operator
from gdp.restore import default_guidance, plan_tiling, restore
from gdp.sampling import FusedDenoiser

from conftest import photo

# A batch of differently sized images blurs float rounding (conv blocking depends on the batch
# size): eps differs by ~3e-7, amplified by 1 / sqrt(alpha_bar) ~ 160 at t = 999 into x0_hat;
# measured image differences are <= 7e-6 in [0, 1].
BATCH_ROUNDING = 5e-5


def _photos(h: int, w: int, n: int = 3) -> torch.Tensor:
    return torch.cat([photo(h, w, top=30 * k, left=40 * k + 20) for k in range(n)])


@pytest.mark.parametrize("size, mode, patches", [((32, 32), "single", 1), ((48, 40), "fused", 4)])
def test_batch_results_equal_single_image_results(tiny_prior, size, mode, patches):
    """Image k of a batch restored with seed s equals image k alone with seed s + k."""
    y = make_operator("sr", factor=2).A(_photos(*size))
    batch = restore(y, "sr", tiny_prior, steps=2, seed=5, factor=2)
    assert batch.tiling["mode"] == mode and batch.tiling["n_patches"] == patches
    assert batch.image.shape == (3, 3, *size) and batch.nfe == 2 * patches
    for k in range(3):
        alone = restore(y[k:k + 1], "sr", tiny_prior, steps=2, seed=5 + k, factor=2)
        assert torch.allclose(alone.image, batch.image[k:k + 1], rtol=0, atol=BATCH_ROUNDING)
        assert alone.consistency_psnr.item() == pytest.approx(batch.consistency_psnr[k].item(), abs=1e-2)
    # an image never depends on its batch-mates: same batch size, other neighbours, bit for bit
    other = y.clone()
    other[0], other[2] = y[2].flip(-1), y[0].flip(-2)
    mates = restore(other, "sr", tiny_prior, steps=2, seed=[9, 6, 1], factor=2)
    assert torch.equal(mates.image[1], batch.image[1])
    assert not torch.allclose(mates.image[0], batch.image[0], atol=1e-3)


def test_seed_list_must_match_batch(tiny_prior):
    y = make_operator("sr", factor=2).A(_photos(32, 32, 2))
    with pytest.raises(ValueError, match="got 3 seeds for 2 images"):
        restore(y, "sr", tiny_prior, steps=1, seed=[1, 2, 3], factor=2)


def test_fused_denoiser_over_one_patch_is_the_plain_denoiser(tiny_prior):
    den = tiny_prior.denoiser()
    fused = FusedDenoiser(den, 32, 32, 32, 24)
    assert fused.nfe_per_call == 1
    chain = den.chain(10)
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for i in (9, 4, 0):
        a, b = den.predict(x_t, i, chain), fused.predict(x_t, i, chain)
        for name in ("eps", "x0_hat", "mean"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6), name
        assert torch.allclose(a.log_variance.expand_as(b.log_variance), b.log_variance, rtol=0, atol=1e-6)
        assert a.eps.abs().mean() > 0.05  # the random prior predicts non-trivial noise


def test_fused_restore_on_one_patch_equals_single(tiny_prior):
    y = make_operator("sr", factor=2).A(_photos(32, 32, 1))
    single = restore(y, "sr", tiny_prior, steps=3, seed=2, factor=2, tiling="single")
    fused = restore(y, "sr", tiny_prior, steps=3, seed=2, factor=2, tiling="fused", blend="uniform")
    smooth = restore(y, "sr", tiny_prior, steps=3, seed=2, factor=2, tiling="fused", blend="smooth")
    assert fused.tiling == {"mode": "fused", "patch": 32, "stride": 24, "n_patches": 1}
    assert torch.equal(fused.image, single.image)
    torch.testing.assert_close(smooth.image, single.image, rtol=0, atol=1e-5)  # w * v / w: rounding only
    assert fused.nfe == single.nfe == 3


def test_overlapping_patches_are_averaged(tiny_prior):
    """48x40 with 32-px patches at stride 24: pixels covered by k windows get the mean of k predictions."""
    den = tiny_prior.denoiser()
    fused = FusedDenoiser(den, 48, 40, 32, 24, blend="uniform")
    chain = den.chain(5)
    x_t = torch.randn(1, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    out = fused.predict(x_t, 2, chain)
    per_window = [den.predict(x_t[w.index], 2, chain).x0_hat for w in fused.windows]
    # pixel (20, 12) lies in all four windows (tops 0, 16; lefts 0, 8)
    expected = sum(p[..., 20 - w.top, 12 - w.left] for p, w in zip(per_window, fused.windows)) / 4
    assert torch.allclose(out.x0_hat[..., 20, 12], expected, atol=1e-6)
    assert torch.allclose(out.x0_hat[..., 0, 0], per_window[0][..., 0, 0], atol=1e-6)  # one window only


@pytest.mark.parametrize("task, options, obs_size", [
    ("inpaint", {"ratio": 0.25, "seed": 3}, (20, 24)),
    ("inpaint", {"mask": (torch.rand(20, 24, generator=torch.Generator().manual_seed(0)) > 0.3).float()}, (20, 24)),
    ("sr", {"factor": 2}, (10, 12)),
])
def test_images_smaller_than_a_patch(tiny_prior, task, options, obs_size):
    op = make_operator(task, **options)
    x = photo(20, 24, top=80, left=80)
    y = op.A(x)
    assert tuple(y.shape[-2:]) == obs_size
    result = restore(y, task, tiny_prior, operator=op, steps=3, seed=0)
    assert result.image.shape == (1, 3, 20, 24)
    assert result.tiling["n_patches"] == 1 and result.nfe == 3
    assert 0.0 <= result.image.min() and result.image.max() <= 1.0
    # the data step solves the observed area at the last step (the random-weight prior's x0_hat is
    # far from the photo, so clipping to [0, 1] is what is left of the residual)
    assert result.consistency_psnr.item() > 27.0
    # the paper's capped gradient step corrects the observed area fully at the last step too
    paper = restore(y, task, tiny_prior, operator=op, steps=3, seed=0,
                    guidance=default_guidance(task, data_step="gradient"))
    assert paper.consistency_psnr.item() > 28.0


def test_sr_end_to_end_shapes_range_consistency_and_nfe(tiny_prior):
    x = photo(32, 32, top=60, left=60)
    y = make_operator("sr", factor=2).A(x)
    weak = restore(y, "sr", tiny_prior, steps=4, seed=0, factor=2, guidance=Guidance(scale=10.0))
    strong = restore(y, "sr", tiny_prior, steps=4, seed=0, factor=2, guidance=Guidance(scale=1e5))
    assert strong.image.shape == (1, 3, 32, 32) and strong.task == "sr" and strong.steps == 4
    assert 0.0 <= strong.image.min() and strong.image.max() <= 1.0
    assert strong.consistency_psnr.item() >= 25.0
    assert weak.consistency_psnr.item() < strong.consistency_psnr.item() - 5.0
    assert strong.nfe == 4 and strong.seconds > 0

    big = make_operator("sr", factor=2).A(photo(48, 40, top=60, left=60))
    one = restore(big, "sr", tiny_prior, steps=3, seed=0, factor=2)
    two = restore(big, "sr", tiny_prior, steps=3, seed=0, factor=2, samples=2)
    assert one.tiling["n_patches"] == 4 and one.nfe == 3 * 4 and two.nfe == 2 * 3 * 4
    assert two.image.shape == (1, 3, 48, 40)
    assert not torch.equal(one.image, two.image)  # a second, different sample was averaged in


def test_restore_progress_callback_counts_all_samples(tiny_prior):
    y = make_operator("sr", factor=2).A(photo(32, 32))
    seen = []
    restore(y, "sr", tiny_prior, steps=2, samples=2, factor=2, callback=lambda n, m: seen.append((n, m)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_plan_tiling_rules():
    assert plan_tiling(32, 32, 32)["mode"] == "single"
    assert plan_tiling(48, 40, 32) == {"mode": "fused", "patch": 32, "stride": 24, "n_patches": 4}
    with pytest.raises(ValueError, match="divisible by 4"):
        plan_tiling(30, 32, 32, "single")
    with pytest.raises(ValueError, match="unknown tiling 'tiles'"):
        plan_tiling(32, 32, 32, "tiles")


def test_step_rule_keeps_consistency_across_step_counts(tiny_prior):
    """s is quoted at 1000 steps: with s * 1000 / K per step the observation is met at any K, while the
    paper's per-step s loses consistency as the chain gets shorter."""
    from gdp.restore import default_guidance
    y = make_operator("sr", factor=2).A(_photos(32, 32, 1))
    ours, paper = {}, {}
    for steps in (5, 25, 100):
        g = default_guidance("sr")
        ours[steps] = restore(y, "sr", tiny_prior, factor=2, steps=steps, guidance=g).consistency_psnr.item()
        p = default_guidance("sr", step_rule="paper", size_rule="paper")
        paper[steps] = restore(y, "sr", tiny_prior, factor=2, steps=steps, guidance=p).consistency_psnr.item()
    assert min(ours.values()) > 28  # dB at every step count (measured 30.2, 40.8, 37.8)
    assert paper[5] < paper[100] and paper[5] < ours[5] - 10  # measured 17.0, 24.8, 35.0
