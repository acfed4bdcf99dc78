"""Blind operators (lowlight, hdr, blind deblur): parameter gradients, estimation during sampling
with a prior that knows the image, per-image independence in a batch, synthesis and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from gdp.cli import main
from gdp.guidance import Guidance, normaliser
from gdp.io import read_image, write_image
from gdp.operators import Deblur, exposure_bracket, low_light, make_operator, motion_kernel
from gdp.operators.blind import kernel_error, upsample_grid
from gdp.prior.denoiser import Denoiser
from gdp.prior.schedule import Schedule, linear_betas
from gdp.restore import restore
from gdp.sampling import gdp_sample, make_generators

from conftest import photo

TRAIN = Schedule.from_betas(linear_betas(1000))


class KnownImagePrior:
    """Exact eps for data x0 ~ N(m, s^2) per pixel, m `[C, H, W]` in [-1, 1]: a prior that knows the
    image up to s, so that what is left to estimate is the degradation's parameters."""

    def __init__(self, m: torch.Tensor, s: float):
        self.m, self.s = m, s

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = TRAIN.alpha_bar[t].view(-1, 1, 1, 1).to(x_t)
        mean = self.m + ab.sqrt() * self.s ** 2 / (ab * self.s ** 2 + 1 - ab) * (x_t - ab.sqrt() * self.m)
        return (x_t - ab.sqrt() * mean) / (1 - ab).sqrt()


def _truth(n: int = 1, size: int = 32) -> torch.Tensor:
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    return torch.cat([photo(size, size, name=names[k % 4], top=8 * k, left=8 * k) for k in range(n)])


def _smooth_mask(b: int, k: int, grid: int, amplitude: float) -> torch.Tensor:
    ramp = torch.linspace(0, amplitude, grid)
    return (ramp[None, :] + ramp[:, None]).expand(b, k, grid, grid).clone() / 2


# ---------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("task,options", [("lowlight", {"grid": 4}), ("hdr", {"grid": 3, "exposures": 2, "clip": False}),
                                          ("hdr", {"grid": 3, "exposures": 3, "share": True, "clip": False}),
                                          ("blind-deblur", {"kernel_size": 5})])
def test_parameter_gradients_match_finite_differences(task, options):
    op = make_operator(task, **options)
    x = _truth(2, size=8).double()
    y = torch.rand(op.y_shape(tuple(x.shape)), dtype=torch.float64)
    params = {k: (v + 0.1 * torch.randn_like(v)).requires_grad_(True) for k, v in op.init_params(y, x.shape).items()}
    names = list(params)
    assert torch.autograd.gradcheck(lambda *p: op.apply(x, dict(zip(names, p))), tuple(params.values()))
    # and through the image, which is what the guidance differentiates
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: op.apply(z, {k: v.detach() for k, v in params.items()}), (xr,))


def test_blind_kernel_is_a_normalised_non_negative_convolution():
    op = make_operator("blind-deblur", kernel_size=7)
    x = _truth(2)
    logits = torch.randn(2, 49)
    k = op.kernels({"logits": logits})
    assert (k >= 0).all() and torch.allclose(k.sum(dim=(1, 2)), torch.ones(2))
    # equals the non-blind operator (same reflect padding) with the same kernel, image by image
    out = op.apply(x, {"logits": logits})
    for b in range(2):
        assert torch.allclose(out[b:b + 1], Deblur(kernel=k[b], mode="same").A(x[b:b + 1]), atol=1e-6)


def test_kernel_sparsity_prior_is_the_kernels_entropy():
    op = make_operator("blind-deblur", kernel_size=5, sparsity=0.5)
    flat, spike = torch.zeros(1, 25), torch.full((1, 25), -40.0)
    spike[0, 12] = 0.0
    pen = op.penalty({"logits": torch.cat([flat, spike])})
    assert abs(pen[0].item() - 0.5 * math.log(25)) < 1e-6 and abs(pen[1].item()) < 1e-6
    assert make_operator("blind-deblur", kernel_size=5).penalty({"logits": flat}).item() == 0.0
    logits = torch.randn(2, 25, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: op.penalty({"logits": v}), (logits,))
    with pytest.raises(ValueError, match="sparsity"):
        make_operator("blind-deblur", sparsity=-1)


# --------------------------------------------------------------------------------- estimation


def _estimate(op, x, y, steps=40, s=0.05, scale=20000.0):
    prior = KnownImagePrior(2 * x - 1, s)
    den = Denoiser(prior, TRAIN, variance="fixed_small", clip=True)
    return gdp_sample(den, op, y, steps, guidance=Guidance(scale=scale), generators=make_generators(0, x.shape[0]),
                      x_shape=tuple(x.shape))


def test_lowlight_gain_and_mask_converge_to_the_truth():
    x = _truth(1)
    op = make_operator("lowlight", grid=4, lr_f=1.0, lr_mask=0.5)
    true_mask = _smooth_mask(1, 1, 4, 0.06)
    y = 0.2 * x + upsample_grid(true_mask, 32, 32)
    start = op.init_params(y, x.shape)["f"].item()
    result = _estimate(op, x, y, steps=150)
    f = result.params["f"].item()
    assert abs(start - 0.2) / 0.2 > 0.15  # it had somewhere to go
    assert abs(f - 0.2) / 0.2 < 0.1
    m = upsample_grid(result.params["mask"], 32, 32)
    assert (m - upsample_grid(true_mask, 32, 32)).abs().mean() < 0.01
    assert result.mse.item() < 1e-4


def test_hdr_gains_converge_per_exposure_and_clipping_is_modelled():
    x = _truth(1)
    gains = (0.3, 1.0, 3.0)
    y = torch.cat([(g * x).clamp(0, 1) for g in gains], dim=1)
    op = make_operator("hdr", exposures=3, grid=2, lr_f=1.0, lr_mask=0.0)
    result = _estimate(op, x, y, steps=150)
    f = result.params["f"][0]
    ratios = f / f[1]  # the scene's brightness is a free choice: the gains are known up to one factor
    for got, want in zip(ratios.tolist(), gains):
        assert abs(got - want) / want < 0.1
    assert abs(f[1].item() - 1.0) < 0.1  # and that factor is the truth here (the prior knows the image)
    # N is one exposure's size: the image receives the sum of the guidances
    assert normaliser(op, y, tuple(x.shape), "per-pixel") == 3 * 256 * 256


def test_blind_deblur_kernel_approaches_the_true_kernel():
    x = torch.cat([photo(48, 48, name="astronaut", top=40, left=120, step=2)])
    truth = motion_kernel(9, seed=1)
    y = Deblur(kernel=truth, mode="same").A(x)
    op = make_operator("blind-deblur", kernel_size=9, lr=0.05, update_from=0.5, passes=1)
    before = kernel_error(op.kernels(op.init_params(y, x.shape))[0], truth)["relative_l2"]
    result = _estimate(op, x, y, steps=60)
    after = kernel_error(op.kernels(result.params)[0], truth)["relative_l2"]
    assert after < 0.5 * before, (before, after)


def test_later_passes_restore_with_the_first_estimate_fixed():
    x = photo(32, 32, name="astronaut", top=40, left=120, step=2)
    truth = motion_kernel(7, seed=2)
    y = Deblur(kernel=truth, mode="same").A(x)
    one = _estimate(make_operator("blind-deblur", kernel_size=7, passes=1), x, y, steps=20)
    op = make_operator("blind-deblur", kernel_size=7, passes=3, later_update_from=1.0)  # kernel fixed
    three = _estimate(op, x, y, steps=20)
    assert three.nfe == 3 * one.nfe == 60
    # chain 1 is the same computation (same seeds), and chains 2 and 3 leave the kernel where it was
    assert torch.equal(three.params["logits"], one.params["logits"])
    # chain 3 is non-blind GDP with that kernel: its image fits y with the estimate
    assert not torch.equal(three.x0, one.x0)
    k = op.kernels(three.params)[0]
    fit = (Deblur(kernel=k, mode="same").A((three.x0 + 1) / 2) - y).square().mean()
    assert fit < 1e-3, fit
    # a later chain that keeps updating moves the estimate
    moving = _estimate(make_operator("blind-deblur", kernel_size=7, passes=2, later_update_from=0.0), x, y, steps=20)
    assert not torch.equal(moving.params["logits"], one.params["logits"])


def test_several_kernel_steps_per_diffusion_step():
    x = photo(32, 32, name="coffee", top=40, left=120, step=2)
    y = Deblur(kernel=motion_kernel(7, seed=3), mode="same").A(x)
    runs = {n: _estimate(make_operator("blind-deblur", kernel_size=7, passes=1, iters=n), x, y, steps=10)
            for n in (1, 4)}
    assert runs[4].nfe == runs[1].nfe == 10  # the extra steps cost no network evaluation
    k1, k4 = (make_operator("blind-deblur", kernel_size=7).kernels(r.params) for r in runs.values())
    assert (k1 - k4).abs().max() > 1e-4  # four Adam steps per step move the kernel further
    assert torch.allclose(k4.sum(dim=(1, 2)), torch.ones(1)) and (k4 >= 0).all()
    with pytest.raises(ValueError, match="iters >= 1"):
        make_operator("blind-deblur", iters=0)


# ----------------------------------------------------------------------------- independence


def test_parameters_are_per_image_in_a_batch_of_8(tiny_prior):
    x = _truth(8)
    gains = torch.linspace(0.1, 0.45, 8)
    y = torch.cat([low_light(x[k:k + 1], gain=float(gains[k])) for k in range(8)])
    op = make_operator("lowlight")
    batch = restore(y, "lowlight", tiny_prior, operator=op, steps=3, seed=11)
    fb = torch.tensor([p["f"][0] for p in batch.params["per_image"]])
    assert fb.std() > 0.05  # every image has its own estimate
    for k in (0, 5):
        alone = restore(y[k:k + 1], "lowlight", tiny_prior, operator=make_operator("lowlight"), steps=3, seed=11 + k)
        assert alone.params["per_image"][0]["f"][0] == pytest.approx(fb[k].item(), abs=1e-4)
        assert torch.allclose(alone.image, batch.image[k:k + 1], atol=2e-3)
    # same batch size, other batch-mates: image 1 is identical bit for bit
    other = y.clone()
    other[0] = low_light(x[3:4], gain=0.9)[0]
    mates = restore(other, "lowlight", tiny_prior, operator=make_operator("lowlight"), steps=3, seed=11)
    assert torch.equal(mates.image[1], batch.image[1])
    assert mates.params["per_image"][1] == batch.params["per_image"][1]


def test_hierarchical_uses_the_global_estimate_in_every_window(tiny_prior):
    x = photo(96, 96, name="coffee", step=2)
    y = low_light(x, gain=0.3)
    op = make_operator("lowlight")
    r = restore(y, "lowlight", tiny_prior, operator=op, steps=2, tiling="hierarchical")
    assert r.tiling["mode"] == "hierarchical" and r.image.shape == x.shape
    f = r.params["per_image"][0]["f"][0]
    assert 0.05 < f < 1.0
    local, crops = op.localize(y, [__import__("gdp.tiling", fromlist=["plan_windows"]).plan_windows(96, 96, 32, 24)[0]])
    assert torch.allclose(local.f, torch.tensor([[f]]), atol=1e-5) and crops.shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------- synthesis


def test_synthetic_observations():
    x = _truth(1)
    y = low_light(x, gain=0.2, gamma=1.5)
    assert torch.allclose(y, (0.2 * x ** 1.5), atol=1 / 255 + 1e-6) and (y * 255 % 1 == 0).all()
    shots = exposure_bracket(x, (0.5, 2.0))
    assert len(shots) == 2 and shots[1].max() == 1.0 and (shots[1] == 1).float().mean() > 0.1
    k = motion_kernel(15, seed=3)
    assert k.shape == (15, 15) and abs(float(k.sum()) - 1) < 1e-12 and (k >= 0).all()
    assert not torch.equal(k, motion_kernel(15, seed=4)) and torch.equal(k, motion_kernel(15, seed=3))
    with pytest.raises(ValueError, match="gain"):
        low_light(x, gain=0.0)
    with pytest.raises(ValueError, match="2 positive gains"):
        exposure_bracket(x, (1.0,))
    with pytest.raises(ValueError, match="odd kernel size"):
        make_operator("blind-deblur", kernel_size=4)
    with pytest.raises(ValueError, match="at least 2 exposures"):
        make_operator("hdr", exposures=1)


def test_kernel_error_is_shift_invariant_and_zero_for_the_truth():
    k = motion_kernel(9, seed=0)
    assert kernel_error(k, k)["relative_l2"] == 0
    shifted = torch.roll(torch.nn.functional.pad(k, (2, 2, 2, 2)), (1, -1), (0, 1))
    assert kernel_error(shifted, k)["relative_l2"] < 1e-9


# ------------------------------------------------------------------------------------- CLI


def test_cli_lowlight_hdr_and_blind_deblur(tmp_path, tiny_prior_file, capsys):
    gt = tmp_path / "gt.png"
    write_image(str(gt), photo(32, 32, name="coffee", step=4))
    d = tmp_path
    assert main(["degrade", str(gt), str(d / "ll.png"), "--task", "lowlight", "--gain", "0.2"]) == 0
    assert main(["degrade", str(gt), str(d / "ex.png"), "--task", "hdr", "--gains", "0.3", "1", "3"]) == 0
    assert main(["degrade", str(gt), str(d / "mb.png"), "--task", "deblur", "--motion-kernel", "7"]) == 0
    capsys.readouterr()
    common = ["--prior", str(tiny_prior_file), "--steps", "2"]
    assert main(["restore", str(d / "ll.png"), str(d / "ll-out.png"), "--task", "lowlight",
                 "--save-params", str(d / "p"), *common]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["estimated"]["f"][0] > 0 and rep["saved_params"] == [str(d / "p" / "mask.png")]
    assert read_image(str(d / "p" / "mask.png")).pixels.shape == (1, 1, 32, 32)
    exposures = [str(d / f"ex-{k}.png") for k in (1, 2, 3)]
    assert main(["restore", *exposures, str(d / "hdr.png"), "--task", "hdr", *common]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["input"] == exposures and len(rep["estimated"]["f"]) == 3
    assert read_image(str(d / "hdr.png")).pixels.shape == (1, 3, 32, 32)
    assert main(["restore", str(d / "mb.png"), str(d / "mb-out.png"), "--task", "deblur", "--blind",
                 "--kernel-size", "7", "--save-params", str(d / "k"), *common]) == 0
    rep = json.loads(capsys.readouterr().out)
    k = np.array(rep["estimated"]["kernel"])
    assert rep["task"] == "blind-deblur" and k.shape == (7, 7) and abs(k.sum() - 1) < 1e-4
    assert np.allclose(np.load(d / "k" / "kernel.npy"), k, atol=1e-5)
    assert np.load(d / "mb.kernel.npy").shape == (7, 7)


@pytest.mark.parametrize("args,message", [
    (["ex-1.png", "out.png", "--task", "hdr"], "at least 2 exposures"),
    (["ex-1.png", "ex-2.png", "out.png", "--task", "lowlight"], "takes one observation"),
    (["ex-1.png", "out.png", "--task", "sr", "--blind"], "--blind applies to --task deblur only"),
    (["ex-1.png", "small.png", "out.png", "--task", "hdr"], "does not match"),
])
def test_cli_blind_errors_are_one_line(tmp_path, tiny_prior_file, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_image("ex-1.png", photo(32, 32))
    write_image("ex-2.png", photo(32, 32, name="coffee"))
    write_image("small.png", photo(16, 16))
    assert main(["restore", *args, "--prior", str(tiny_prior_file), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out.png").exists()


def test_flows_cli_maps_blind_deblur_and_refuses_hdr():
    from flows.__main__ import build_parser, restore_parameters
    from gdp.cli import UsageError
    args = build_parser().parse_args(["restore", "in", "out", "--task", "deblur", "--blind", "--kernel-size", "9"])
    p = restore_parameters(args)
    assert p["task"] == "blind-deblur" and p["options"]["kernel_size"] == 9
    with pytest.raises(UsageError, match="several exposures"):
        restore_parameters(build_parser().parse_args(["restore", "in", "out", "--task", "hdr"]))
    with pytest.raises(UsageError, match="--blind applies to --task deblur only"):
        restore_parameters(build_parser().parse_args(["restore", "in", "out", "--task", "sr", "--blind"]))


def test_flows_cli_passes_scale_out_options():
    from flows.__main__ import build_parser, restore_parameters
    p = restore_parameters(build_parser().parse_args(["restore", "in", "out", "--task", "sr", "--shards", "3",
                                                      "--task-runner", "dask", "--dask-workers", "4"]))
    assert (p["shards"], p["task_runner"], p["dask_workers"], p["dask_address"]) == (3, "dask", 4, None)
