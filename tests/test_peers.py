"""bench/peers.py, the peer benchmark against deepinv: our prior as a deepinv denoiser must be
deepinv's own DiffUNet conversion (sigma -> DDPM timestep, [0, 1] -> [-1, 1], eps from the first
3 channels), and the physics the peers get must be our operators. Skipped without deepinv
(`pip install 'gdp[bench]'`)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

dinv = pytest.importorskip("deepinv")

from gdp.guidance import conjugate_gradient  # noqa: E402
from gdp.operators import make_operator  # noqa: E402
from gdp.prior.schedule import Schedule, linear_betas  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
peers = sys.modules.setdefault("bench_peers", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(peers)


def diffunet_running(network) -> tuple[torch.nn.Module, list]:
    """deepinv's DiffUNet with its own forward / forward_denoise / timestep table, but `network` in
    place of its UNet (forward_diffusion); also returns the list of timesteps it asked for."""
    from deepinv.models import DiffUNet
    model = DiffUNet.__new__(DiffUNet)
    torch.nn.Module.__init__(model)
    sqrt_1m, sqrt_ab = DiffUNet.get_alpha_prod(model)[-2:]  # deepinv's own table (linear betas, float32)
    model.register_buffer("sqrt_1m_alphas_cumprod", sqrt_1m)
    model.register_buffer("sqrt_alphas_cumprod", sqrt_ab)
    seen = []

    def forward_diffusion(x, t, y=None):
        seen.append(t.clone())
        return network(x, t)
    model.forward_diffusion = forward_diffusion
    return model, seen


@pytest.mark.parametrize("size", [(32, 32), (20, 44)])  # (20, 44): deepinv's circular padding to 32 x 64
def test_denoiser_is_deepinvs_diffunet_conversion(tiny_prior, size):
    ours = peers.PriorDenoiser.from_prior(tiny_prior)
    theirs, seen = diffunet_running(tiny_prior.unet)
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.03, 0.2, 1.0, 60.0])
    x = torch.rand(5, 3, *size, generator=g) + sigma.view(-1, 1, 1, 1) * torch.randn(5, 3, *size, generator=g)
    with torch.no_grad():
        expected, got = theirs(x, sigma), ours(x, sigma)
        single = ours(x[:1], 0.03)  # a float sigma for the whole batch, as DDRM and DiffPIR pass it
    assert torch.equal(seen[0], ours.timestep(sigma, x))
    assert seen[0].tolist() == sorted(seen[0].tolist()) and len(set(seen[0].tolist())) == 5
    assert got.shape == x.shape and (got - expected).abs().max() < 1e-5
    assert (single - theirs(x[:1], 0.03)).abs().max() < 1e-5
    assert ours.calls == 2
    # our table (the prior's float64 schedule) and deepinv's hard-coded float32 one agree
    assert (ours.sqrt_1m_alphas_cumprod - theirs.sqrt_1m_alphas_cumprod).abs().max() < 2e-6


@pytest.mark.parametrize("t", [0, 7, 250, 999])
def test_denoiser_at_a_timesteps_own_noise_level_is_the_ddpm_x0_formula(tiny_prior, t):
    """At sigma = sqrt((1 - a_t) / a_t) / 2 ([0, 1] units) the timestep is t and the output is
    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) with x_t = sqrt(a_t) (2 x - 1), mapped to [0, 1]."""
    ours = peers.PriorDenoiser.from_prior(tiny_prior)
    a = tiny_prior.schedule.alpha_bar[t]
    sigma = float(((1 - a) / a).sqrt() / 2)
    g = torch.Generator().manual_seed(t)
    x = torch.rand(2, 3, 32, 32, generator=g) + sigma * torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        got = ours(x, sigma)
        x_t = a.sqrt().float() * (2 * x - 1)
        eps = tiny_prior.unet(x_t, torch.full((2,), t))[:, :3]  # the variance channels are dropped
        x0 = (x_t - (1 - a).sqrt().float() * eps) / a.sqrt().float()
    assert ours.timestep(sigma, x).tolist() == [t, t]
    # float32 rounding of x_t is amplified by 1 / sqrt(a_t) (157 at t = 999): 1e-5 on that scale
    assert (got - (x0.clamp(-1, 1) + 1) / 2).abs().max() < 1e-5 * max(1.0, float(1 / a.sqrt()))


@pytest.mark.slow
def test_our_unet_with_diffunets_weights_is_diffunet():
    """deepinv's DiffUNet (FFHQ architecture, random weights) and our UNet with the same weights
    and our wrapper give the same denoised image: same keys, same network, same conversion."""
    from deepinv.models import DiffUNet

    from gdp.prior.unet import UNet, UNetConfig
    torch.manual_seed(0)
    theirs = DiffUNet(pretrained=None).eval()
    with torch.no_grad():  # the output conv starts at zero: draw it (and every bias) so eps is not 0
        for p in theirs.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.05)
    config = UNetConfig(image_size=256, model_channels=128, num_res_blocks=1, attention_resolutions=(16,),
                        channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, num_head_channels=64)
    net = UNet(config).eval()
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("sqrt_")}
    net.load_state_dict(state, strict=True)
    ours = peers.PriorDenoiser(net, Schedule.from_betas(linear_betas(1000)).alpha_bar)
    g = torch.Generator().manual_seed(2)
    sigma = torch.tensor([0.01, 0.3])
    x = torch.rand(2, 3, 32, 32, generator=g) + sigma.view(-1, 1, 1, 1) * torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        expected, got = theirs(x, sigma), ours(x, sigma)
    assert (expected - 0.5).abs().max() > 0.1  # not a trivial output
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("task,options", [("sr", {"factor": 4}), ("deblur", {"mode": "valid"})])
def test_separable_physics_is_our_operator(task, options):
    op = make_operator(task, **options)
    x_shape = (2, 3, 32, 32)
    physics = peers.make_physics(op, task, x_shape, sigma=0.01)
    assert isinstance(physics, dinv.physics.DecomposablePhysics)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(x_shape, generator=g)
    y = op.A(x)
    r = torch.randn(y.shape, generator=g)
    assert (physics.A(x) - y).abs().max() < 1e-6
    assert (physics.A_adjoint(r) - op.A_adjoint(r, x_shape=x_shape)).abs().max() < 1e-6
    assert (physics.V(physics.V_adjoint(x)) - x).abs().max() < 1e-5  # V orthogonal
    assert (physics.U(physics.U_adjoint(r)) - r).abs().max() < 1e-5  # U orthogonal
    assert int((physics.mask > 0).sum()) == 3 * y.shape[-2] * y.shape[-1]  # full row rank
    assert physics.noise_model.sigma == pytest.approx(0.01)
    # the SVD's closed-form prox (DiffPIR's data step) is the regularised least-squares solution
    gamma, z = 5.0, torch.rand(x_shape, generator=g)
    expected = conjugate_gradient(op, z.double(), y.double(), 1 / gamma, iters=300).float()
    assert (physics.prox_l2(z, y, gamma) - expected).abs().max() < 1e-4
    # and the pseudo-inverse gives back y
    assert (op.A(physics.A_dagger(y)) - y).abs().max() < 1e-4


def test_stock_deepinv_operators_against_ours():
    """deepinv's own operators: average pooling and the valid blur and the mask are ours exactly;
    BlurFFT (the SVD blur) is circular: its 24x24 interior at offset (4, 4) is our valid output, but
    it has 32x32 outputs whose border wraps around the opposite edge (a different observation)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    sr, blur, mask = (make_operator("sr", factor=4), make_operator("deblur", mode="valid"),
                      make_operator("inpaint", ratio=0.25, seed=0))
    checks = {task: peers.physics_checks(op, task, x, peers.make_physics(op, task, tuple(x.shape)))
              for task, op in (("sr", sr), ("deblur", blur), ("inpaint", mask))}
    assert checks["sr"]["used"] < 1e-6 and checks["sr"]["Downsampling(box, valid)"] < 1e-6
    assert checks["deblur"]["used"] < 1e-6 and checks["deblur"]["Blur(valid)"] < 1e-6
    assert checks["deblur"]["BlurFFT (circular): its interior window"] < 1e-6
    assert checks["deblur"]["BlurFFT window offset"] == [4, 4]
    fft = dinv.physics.BlurFFT(img_size=(3, 32, 32), filter=blur.kernel.float()[None, None]).A(x)
    edge = torch.cat([fft[..., :4, :].flatten(), fft[..., -4:, :].flatten()])
    assert fft.shape[-2:] == (32, 32) and blur.A(x).shape[-2:] == (24, 24) and edge.numel() > 0
    assert checks["inpaint"]["used"] == 0 and checks["inpaint"]["Inpainting"] == 0


def test_kronecker_factors_refuse_an_operator_that_is_not_separable():
    with pytest.raises(ValueError, match="not separable"):
        peers.kronecker_factors(make_operator("inpaint", ratio=0.25, seed=0), (1, 3, 16, 16))


@pytest.mark.parametrize("name", [peers.DDRM, peers.DIFFPIR, peers.DPS, peers.PIGDM])
def test_every_peer_spends_exactly_the_nfe_it_is_given(tiny_prior, name):
    op = make_operator("sr", factor=4)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    physics = peers.make_physics(op, "sr", tuple(x.shape))
    denoiser = peers.PriorDenoiser.from_prior(tiny_prior)
    method = peers.methods("sr")[name]
    out = peers.run_peer(name, method.default, denoiser, physics, op.A(x), 4, 0, tiny_prior.schedule.alpha_bar)
    assert denoiser.calls == 4 and out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_ddrm_noise_levels_walk_the_ddpm_timesteps():
    ab = Schedule.from_betas(linear_betas(1000)).alpha_bar
    sigmas = peers.ddrm_sigmas(ab, 20)
    assert len(sigmas) == 20 and sigmas == sorted(sigmas, reverse=True)
    assert sigmas[0] == pytest.approx(math.sqrt((1 - ab[999]) / ab[999]) / 2)
    assert sigmas[-1] == pytest.approx(math.sqrt((1 - ab[0]) / ab[0]) / 2)


def _tune_rows(means: dict[float, float]) -> list[dict]:
    """Tuning rows whose two crops have these mean PSNRs (one crop 1 dB above, the other below)."""
    return [{"stage": "tune", "method": "m", "task": "sr", "nfe": 20, "value": v, "crop": c, "psnr": p + d}
            for v, p in means.items() for c, d in zip(peers.TUNE_CROPS, (1.0, -1.0))]


def test_tuning_takes_the_best_mean_psnr_and_extends_an_edge_that_still_gains():
    method = peers.Method("m", "w", 1.0, tuple(peers.MULTIPLIERS), tuple(peers.SERIES))
    grid = dict(zip(peers.MULTIPLIERS, (20.0, 22.0, 23.0, 22.5, 21.0)))
    assert peers.tuning(_tune_rows(grid), method, "sr", 20) == (None, 1.0)
    assert peers.tuning(_tune_rows(grid)[:-1], method, "sr", 20) == (10.0, None)  # 10 not run on both crops
    rising = dict(zip(peers.MULTIPLIERS, (20.0, 21.0, 22.0, 23.0, 24.0)))
    assert peers.tuning(_tune_rows(rising), method, "sr", 20) == (30.0, None)  # the edge: try one more
    assert peers.tuning(_tune_rows({**rising, 30.0: 25.0}), method, "sr", 20) == (100.0, None)
    assert peers.tuning(_tune_rows({**rising, 30.0: 25.0, 100.0: 26.0}), method, "sr", 20) == (None, 100.0)
    assert peers.tuning(_tune_rows({**rising, 30.0: 23.5}), method, "sr", 20) == (None, 10.0)
    flat = dict(zip(peers.MULTIPLIERS, (23.03, 23.0, 23.0, 23.0, 23.0)))  # the edge gains < 0.05 dB: stop
    assert peers.tuning(_tune_rows(flat), method, "sr", 20) == (None, 0.1)
    ties = dict(zip(peers.MULTIPLIERS, (20.0, 21.0, 23.0, 23.0, 23.0)))  # exact ties: the smallest
    assert peers.tuning(_tune_rows(ties), method, "sr", 20) == (None, 1.0)
    bounded = peers.Method("m", "eta", 0.85, (0.0, 0.25, 0.5, 0.85, 1.0))
    assert peers.tuning(_tune_rows(dict(zip(bounded.grid, rising.values()))), bounded, "sr", 20) == (None, 1.0)
    assert set(peers.TUNE_CROPS).isdisjoint(peers.REPORT_CROPS) and len(peers.REPORT_CROPS) == 6
    assert all(len(m.grid) == 5 for m in peers.methods("sr").values())  # the same effort for every method


def test_the_report_averages_the_report_crops_only():
    rows = [{"stage": "report", "method": peers.DDRM, "task": "sr", "nfe": 20, "crop": c, "param": "eta",
             "value": 0.5, "psnr": p, "ssim": 0.5, "consistency_psnr": 40.0, "seconds": 2.0, "cpu_seconds": 1.0,
             "nfe_counted": 20, "finite": True} for c, p in zip("ab", (20.0, 22.0))]
    rows.append({**rows[0], "stage": "tune", "psnr": 99.0})
    (summary,) = peers.summarise(rows)
    assert summary["psnr"] == 21.0 and summary["crops"] == 2 and summary["seconds"] == 1.0
    text = peers.markdown(rows)
    assert "| sr | DDRM (deepinv) | eta = 0.5 | 20 | 21.00 | 0.5000 | 40.00 | 1.0 |" in text


def test_our_guidance_pins_the_solved_settings_whatever_the_defaults():
    cg = peers.our_guidance("gdp-cg", "deblur", 3.0)
    assert (cg.data_step, cg.prox, cg.cg_iters, cg.zeta, cg.sigma_y) == ("cg", 3.0, 40, 1.0, 0.0)
    grad = peers.our_guidance("gdp-gradient", "sr", 4800.0)
    assert (grad.data_step, grad.scale, grad.mode, grad.step_rule) == ("gradient", 4800.0, "x0", "constant-total")
    assert peers.our_guidance("gdp-project", "sr", 1.0).data_step == "project"
