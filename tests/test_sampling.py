"""Denoiser contract, ancestral sampling and GDP guidance, checked against closed forms.

The sampler is run on an analytic prior: data x0 ~ N(m, s^2) per pixel, whose exact noise
predictor is eps*(x_t, t) = (x_t - sqrt(ab) E[x0|x_t]) / sqrt(1 - ab) with
E[x0|x_t] = m + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) m). Every step is then affine in
x_t plus Gaussian noise, so the exact law of the sampler's output is a scalar recursion.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gdp.guidance import (Guidance, color_constancy, guidance_gradient, normaliser, operator_norm_sq)
from gdp.operators import make_operator
from gdp.prior.denoiser import Chain, Denoiser
from gdp.prior.schedule import Schedule, linear_betas
from gdp.sampling import gdp_sample, make_generators, randn_per_image, sample_prior

from conftest import photo

T = 1000
TRAIN = Schedule.from_betas(linear_betas(T))


class GaussianPrior:
    """Exact eps (and, with `oracle_chain`, the exact reverse variance as ADM's v) for N(m, s^2) data."""

    def __init__(self, m: float, s: float, oracle_chain: Chain | None = None):
        self.m, self.s, self.alpha_bar = m, s, TRAIN.alpha_bar
        self.oracle = oracle_chain
        self.calls: list[torch.Tensor] = []

    def posterior_mean(self, x_t: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        m, s2 = self.m, self.s ** 2
        return m + ab.sqrt() * s2 / (ab * s2 + 1 - ab) * (x_t - ab.sqrt() * m)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(t.clone())
        ab = self.alpha_bar[t].view(-1, 1, 1, 1)
        x = x_t.double()
        eps = (x - ab.sqrt() * self.posterior_mean(x, ab)) / (1 - ab).sqrt()
        if self.oracle is None:
            return eps
        return torch.cat([eps, torch.full_like(eps, self._v(int(t[0])))], dim=1)

    def _v(self, t: int) -> float:
        """v with exp(frac log beta + (1 - frac) log beta_tilde) = beta_tilde + c1^2 Var[x0 | x_t]."""
        ch = self.oracle
        i = ch.timesteps.index(t)
        ab, s2 = ch.sqrt_alpha_bar[i] ** 2, self.s ** 2
        true = math.exp(ch.log_beta_tilde[i]) + ch.coef_x0[i] ** 2 * s2 * (1 - ab) / (ab * s2 + 1 - ab)
        frac = (math.log(true) - ch.log_beta_tilde[i]) / (ch.log_beta[i] - ch.log_beta_tilde[i])
        return 2 * frac - 1


def exact_output_law(chain: Chain, m: float, s: float, exact_variance: bool = False) -> tuple[float, float]:
    """(mean, std) of the ancestral sampler's x_0 with the exact eps, clip off, from x_T ~ N(0, 1)."""
    mu, var = 0.0, 1.0
    for i in reversed(range(len(chain))):
        ab = chain.sqrt_alpha_bar[i] ** 2
        k = math.sqrt(ab) * s * s / (ab * s * s + 1 - ab)  # E[x0|x_t] = m(1 - k sqrt(ab)) + k x_t
        a = chain.coef_x0[i] * k + chain.coef_xt[i]
        b = chain.coef_x0[i] * m * (1 - k * math.sqrt(ab))
        noise = math.exp(chain.log_beta_tilde[i]) if i > 0 else 0.0
        if exact_variance and i > 0:
            noise += chain.coef_x0[i] ** 2 * s * s * (1 - ab) / (ab * s * s + 1 - ab)
        mu, var = a * mu + b, a * a * var + noise
    return mu, math.sqrt(var)


# ------------------------------------------------------------------------------------- denoiser


class FixedOutput:
    """A 'network' returning a fixed tensor and recording the timesteps it was given."""

    def __init__(self, out: torch.Tensor):
        self.out, self.timesteps = out, []

    def __call__(self, x_t, t):
        self.timesteps.append(t.tolist())
        return self.out


def _hand_step(x_t, eps, i, steps, clip=True):
    """x0_hat and mean in float64 from the respaced schedule's own formulas."""
    s = TRAIN.respace(steps)
    ab = s.alpha_bar[i].item()
    ab_prev = s.alpha_bar[i - 1].item() if i > 0 else 1.0
    beta = s.betas[i].item()
    x, e = x_t.double(), eps.double()
    x0 = (x - math.sqrt(1 - ab) * e) / math.sqrt(ab)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = beta * math.sqrt(ab_prev) / (1 - ab) * x0 + (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab) * x
    beta_tilde = [s.betas[j].item() * (1 - (s.alpha_bar[j - 1].item() if j else 1.0)) / (1 - s.alpha_bar[j].item())
                  for j in range(steps)]
    return x0, mean, beta, beta_tilde


@pytest.mark.parametrize("i", [0, 3, 9])
def test_denoiser_learned_range_matches_hand_formulas(i):
    g = torch.Generator().manual_seed(i)
    x_t = 2 * torch.randn(2, 3, 4, 5, generator=g)  # large enough for clipping to act
    eps = torch.randn(2, 3, 4, 5, generator=g)
    v = torch.cat([-torch.ones(1, 3, 4, 5), torch.ones(1, 3, 4, 5)])  # image 0: v = -1, image 1: v = +1
    model = FixedOutput(torch.cat([eps, v], dim=1))
    den = Denoiser(model, TRAIN, variance="learned_range", clip=True)
    chain = den.chain(10)
    out = den.predict(x_t, i, chain)
    x0, mean, beta, beta_tilde = _hand_step(x_t, eps, i, 10)
    assert model.timesteps == [[TRAIN.respace(10).timesteps[i].item()] * 2]
    assert torch.equal(out.eps, eps)
    assert torch.allclose(out.x0_hat.double(), x0, atol=1e-6) and out.x0_hat.abs().max() <= 1
    assert bool((out.x0_hat.abs() == 1).any())  # the clamp was exercised
    assert torch.allclose(out.mean.double(), mean, atol=1e-6)
    log_beta_tilde = math.log(beta_tilde[max(i, 1)])  # clipped: beta_tilde_0 = 0 is replaced by beta_tilde_1
    assert torch.allclose(out.log_variance[0].double(), torch.tensor(log_beta_tilde, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(out.log_variance[1].double(), torch.tensor(math.log(beta), dtype=torch.float64), atol=1e-6)


def test_denoiser_learned_range_interpolates_in_log_space():
    eps = torch.zeros(1, 3, 2, 2)
    den = Denoiser(FixedOutput(torch.cat([eps, torch.full_like(eps, 0.5)], 1)), TRAIN, variance="learned_range")
    chain = den.chain()
    out = den.predict(torch.zeros(1, 3, 2, 2), 500, chain)
    expected = 0.75 * math.log(TRAIN.betas[500].item()) + 0.25 * TRAIN.posterior_log_variance_clipped[500].item()
    assert torch.allclose(out.log_variance, torch.full_like(out.log_variance, expected), atol=1e-6)


@pytest.mark.parametrize("i", [0, 1, 7])
def test_denoiser_fixed_variances(i):
    eps = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    x_t = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    small = Denoiser(FixedOutput(eps), TRAIN, variance="fixed_small", clip=False)
    large = Denoiser(FixedOutput(eps), TRAIN, variance="fixed_large", clip=False)
    chain = small.chain(8)
    _, _, beta, beta_tilde = _hand_step(x_t, eps, i, 8, clip=False)
    lv_small = small.predict(x_t, i, chain).log_variance
    lv_large = large.predict(x_t, i, chain).log_variance
    assert lv_small.shape == lv_large.shape == (1, 1, 1, 1)
    assert lv_small.item() == pytest.approx(math.log(beta_tilde[max(i, 1)]), abs=1e-6)
    assert lv_large.item() == pytest.approx(math.log(beta_tilde[1] if i == 0 else beta), abs=1e-6)


def test_denoiser_without_clipping_keeps_x0_hat():
    x_t = torch.full((1, 3, 2, 2), 3.0)
    eps = torch.zeros(1, 3, 2, 2)
    for clip, expected in ((False, 3.0 / math.sqrt(TRAIN.alpha_bar[0].item())), (True, 1.0)):
        out = Denoiser(FixedOutput(eps), TRAIN, variance="fixed_small", clip=clip).predict(x_t, 0, Chain.from_schedule(TRAIN))
        assert torch.allclose(out.x0_hat, torch.full_like(x_t, expected), atol=1e-6)
        assert torch.allclose(out.mean, out.x0_hat, atol=1e-6)  # at t = 0, mu = x0_hat (c1 = 1, c2 = 0)


def test_denoiser_rejects_learned_range_without_variance_channels():
    den = Denoiser(FixedOutput(torch.zeros(1, 3, 2, 2)), TRAIN, variance="learned_range")
    with pytest.raises(ValueError, match="2x output channels"):
        den.predict(torch.zeros(1, 3, 2, 2), 0, den.chain(4))


# ------------------------------------------------------------------- unconditional, analytic prior

M, S = 0.2, 0.5
N_PIXELS = 4 * 64 * 64  # 4 images of 1 x 64 x 64


@pytest.mark.parametrize("steps, deficit", [(1000, 0.0078), (100, 0.0641), (50, 0.1136)])
def test_ancestral_sampling_reproduces_gaussian_data(steps, deficit):
    """fixed_small drops c1^2 Var[x0|x_t] from the true reverse variance, so the output std is
    s (1 - deficit): 0.8 % low at 1000 steps, 6.4 % at 100, 11 % at 50 (exact in the limit of
    infinitely many steps). The samples match that exact law within 4 standard errors."""
    den = Denoiser(GaussianPrior(M, S), TRAIN, variance="fixed_small", clip=False)
    chain = den.chain(steps)
    mu, sd = exact_output_law(chain, M, S)
    assert mu == pytest.approx(M, abs=1e-5)
    assert 1 - sd / S == pytest.approx(deficit, abs=5e-4)
    mu_true, sd_true = exact_output_law(chain, M, S, exact_variance=True)
    assert mu_true == pytest.approx(M, abs=1e-5) and sd_true == pytest.approx(S, rel=1e-3)

    seen = []
    x = sample_prior(den, (1, 64, 64), steps, make_generators(0, 4), callback=lambda n, k: seen.append((n, k)))
    assert x.shape == (4, 1, 64, 64) and seen[-1] == (steps, steps) and len(seen) == steps
    se_mean, se_std = sd / math.sqrt(N_PIXELS), sd / math.sqrt(2 * N_PIXELS)
    assert abs(x.mean().item() - mu) < 4 * se_mean
    assert abs(x.std().item() - sd) < 4 * se_std


def test_learned_range_with_the_exact_variance_makes_short_chains_exact():
    """With v giving beta_tilde + c1^2 Var[x0|x_t], even 50 steps reproduce N(m, s^2)."""
    chain = Chain.from_schedule(TRAIN.respace(50))
    den = Denoiser(GaussianPrior(M, S, oracle_chain=chain), TRAIN, variance="learned_range", clip=False, channels=1)
    x = sample_prior(den, (1, 64, 64), 50, make_generators(1, 4))
    se = S / math.sqrt(2 * N_PIXELS)
    assert abs(x.mean().item() - M) < 4 * S / math.sqrt(N_PIXELS)
    assert abs(x.std().item() - S) < 4 * se  # fixed_small is 11 % (20 standard errors) low here


# ------------------------------------------------------------------------------- GDP guidance


def _gaussian_denoiser(m=0.2, s=0.3, clip=True) -> Denoiser:
    return Denoiser(GaussianPrior(m, s), TRAIN, variance="fixed_small", clip=clip)


def _two_photos(size=16) -> torch.Tensor:
    return torch.cat([photo(size, size, top=100, left=100), photo(size, size, name="coffee", top=50, left=200)])


def test_gdp_scale_zero_is_unconditional_sampling():
    den = _gaussian_denoiser()
    op = make_operator("inpaint", ratio=0.5, seed=1)
    y = op.A(_two_photos())
    result = gdp_sample(den, op, y, 20, guidance=Guidance(scale=0.0), generators=make_generators(3, 2))
    plain = sample_prior(den, (3, 16, 16), 20, make_generators(3, 2))
    assert torch.equal(result.x0, plain.clamp(-1, 1))
    assert result.nfe == 20


def test_gdp_residual_falls_with_the_scale():
    den = _gaussian_denoiser()
    op = make_operator("inpaint", ratio=0.5, seed=1)
    y = op.A(_two_photos())
    mse = {}
    for scale in (0.0, 100.0, 1000.0, 4000.0, 20000.0):
        mse[scale] = gdp_sample(den, op, y, 20, guidance=Guidance(scale=scale),
                                generators=make_generators(3, 2)).mse
    values = torch.stack(list(mse.values()))  # [scales, B]
    assert bool((values[1:] < values[:-1]).all())
    # the per-step cap 2N/||A||^2 is a full correction for a projection: the last step lands on y
    assert mse[20000.0].max().item() < 1e-10
    # without the cap a huge scale overshoots every step and ends far from y
    wild = gdp_sample(den, op, y, 20, guidance=Guidance(scale=1e6, max_correction=None), generators=make_generators(3, 2))
    assert bool((wild.mse > 10 * mse[4000.0]).all())


def test_gdp_result_is_independent_of_batch_mates():
    den = _gaussian_denoiser()
    op = make_operator("sr", factor=2)
    y = op.A(_two_photos())
    both = gdp_sample(den, op, y, 10, guidance=Guidance(scale=3000.0), generators=make_generators(7, 2))
    second = gdp_sample(den, op, y[1:], 10, guidance=Guidance(scale=3000.0), generators=[torch.Generator().manual_seed(8)])
    assert torch.allclose(both.x0[1:], second.x0, atol=1e-6)


class Recorder:
    """Wraps a denoiser and keeps every (x_t, PriorOutput) the sampler asked for."""

    def __init__(self, denoiser):
        self.denoiser, self.seen = denoiser, []

    def chain(self, steps=None):
        return self.denoiser.chain(steps)

    def predict(self, x_t, i, chain):
        out = self.denoiser.predict(x_t, i, chain)
        self.seen.append((i, x_t.clone(), out))
        return out


def _avgpool_adjoint(r: torch.Tensor, f: int) -> torch.Tensor:
    """A^T r for f x f average pooling: every pixel gets 1/f^2 of its block's residual."""
    return r.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) / f ** 2


@pytest.mark.parametrize("mode", ["x0", "xt"])
def test_gdp_step_matches_the_paper_update_by_hand(mode):
    """x_{t-1} = mu + g + sigma z, g = -dL/dz, L = s_eff sum((A u(z) - y)^2) / N, z = x0_hat (GDP-x0)
    or x_t (GDP-xt); for 2x2 average pooling dL/dz = (s_eff / N) A^T (A u(z) - y)."""
    steps, scale, seeds = 3, 500.0, (11, 12)
    den = Recorder(_gaussian_denoiser())
    op = make_operator("sr", factor=2)
    y = op.A(_two_photos(8))
    guidance = Guidance(scale=scale, mode=mode, max_correction=None)
    result = gdp_sample(den, op, y, steps, guidance=guidance, generators=[torch.Generator().manual_seed(s) for s in seeds])

    replay = [torch.Generator().manual_seed(s) for s in seeds]  # x_T first, then one z per step
    x = torch.stack([torch.randn((3, 8, 8), generator=g) for g in replay])
    s_eff, n = scale * 1000 / steps, 3 * 128 * 128  # constant-total steps; N at 256x256: 3 x 128 x 128
    assert [i for i, _, _ in den.seen] == [2, 1, 0]
    assert torch.equal(den.seen[0][1], x)
    for i, x_in, out in den.seen:
        assert torch.allclose(x_in, x, atol=1e-6)  # the previous step, recomputed by hand
        z = out.x0_hat if mode == "x0" else x_in
        r = F.avg_pool2d((z + 1) / 2, 2) - y
        g = -(s_eff / n) * _avgpool_adjoint(r, 2)
        x = out.mean + g
        if i > 0:
            x = x + torch.exp(0.5 * out.log_variance) * torch.stack([torch.randn((3, 8, 8), generator=gen) for gen in replay])
    assert torch.allclose(result.x0, x.clamp(-1, 1), atol=1e-6)
    assert torch.allclose(result.mse, (F.avg_pool2d((x.clamp(-1, 1) + 1) / 2, 2) - y).square().flatten(1).mean(1), atol=1e-7)
    assert result.nfe == steps


def test_gdp_cap_is_a_full_correction_for_average_pooling():
    """||A||^2 = 1/4 for 2x2 average pooling; at the cap 2N/||A||^2 the final step solves A u(x0) = y."""
    op = make_operator("sr", factor=2)
    assert operator_norm_sq(op, (1, 3, 8, 8)) == pytest.approx(0.25, rel=1e-5)
    assert operator_norm_sq(make_operator("inpaint", ratio=0.3), (1, 3, 8, 8)) == pytest.approx(1.0, rel=1e-5)
    den = _gaussian_denoiser(s=0.2)
    y = op.A(_two_photos(8))
    result = gdp_sample(den, op, y, 4, guidance=Guidance(scale=1e9), generators=make_generators(0, 2))
    assert result.mse.max().item() < 1e-10


# ------------------------------------------------------------------------------ guidance rules


def test_step_scale_rules():
    assert Guidance(scale=2000.0).step_scale(1000) == pytest.approx(2000.0)
    assert Guidance(scale=2000.0).step_scale(100) == pytest.approx(20000.0)
    assert Guidance(scale=2000.0).step_scale(25) == pytest.approx(80000.0)
    assert Guidance(scale=2000.0, step_rule="paper").step_scale(25) == 2000.0


def test_guidance_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown guidance mode 'eps'"):
        Guidance(mode="eps")
    with pytest.raises(ValueError, match=">= 0"):
        Guidance(scale=-1.0)


@pytest.mark.parametrize("task, options, x_shape, per_pixel", [
    ("sr", {"factor": 4}, (1, 3, 40, 48), 3 * 64 * 64),
    ("deblur", {"mode": "valid"}, (1, 3, 40, 48), 3 * 248 * 248),
    ("deblur", {"mode": "same"}, (1, 3, 40, 48), 3 * 256 * 256),
    ("colorize", {}, (1, 3, 40, 48), 1 * 256 * 256),
    ("inpaint", {"ratio": 0.25}, (1, 3, 40, 48), 3 * 256 * 256),
    ("inpaint", {"mask": torch.ones(40, 48)}, (1, 3, 40, 48), 3 * 256 * 256),  # bound to 40x48
])
def test_normaliser_rules(task, options, x_shape, per_pixel):
    op = make_operator(task, **options)
    y = op.A(torch.rand(x_shape))
    assert normaliser(op, y, x_shape, "per-pixel") == per_pixel
    assert normaliser(op, y, x_shape, "paper") == y[0].numel()


def test_color_constancy_matches_hand_formula():
    gray = torch.rand(2, 1, 6, 7).expand(-1, 3, -1, -1)
    assert color_constancy(gray).max().item() < 1e-5  # sqrt(1e-12) guard only
    z = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    r, g, b = z.double().mean(dim=(2, 3)).unbind(1)
    expected = ((r - g) ** 4 + (r - b) ** 4 + (g - b) ** 4).sqrt()
    assert bool((expected > 1e-4).all())
    assert torch.allclose(color_constancy(z).double(), expected, rtol=1e-4)


def test_guidance_gradient_with_colour_term_matches_autograd_free_formula():
    """Colorize: A u(z) = mean_c (z_c + 1) / 2, so d/dz_c sum (A u(z) - y)^2 = r / 3 and
    g = -(s / N) r / 3; the colour term's gradient is checked by a central difference."""
    op = make_operator("colorize")
    z = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    y = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    g, mse, _ = guidance_gradient(op, z, y, scale=50.0, n=16)
    r = ((z + 1) / 2).mean(1, keepdim=True) - y
    assert torch.allclose(g, -(50.0 / 16) * r.expand(-1, 3, -1, -1) / 3, atol=1e-6)
    assert mse.item() == pytest.approx(r.square().mean().item(), rel=1e-6)
    g_col, _, _ = guidance_gradient(op, z, y, scale=0.0, n=16, color_weight=1.0)
    h = 1e-3
    bump = torch.zeros_like(z, dtype=torch.float64)
    bump[0, 0, 1, 2] = h
    numeric = (color_constancy(z.double() + bump) - color_constancy(z.double() - bump)) / (2 * h)
    assert -g_col[0, 0, 1, 2].item() == pytest.approx(numeric.item(), rel=1e-3)


def test_randn_per_image_uses_one_generator_per_image():
    a = randn_per_image((2, 3), make_generators(5, 3), torch.device("cpu"))
    b = randn_per_image((2, 3), [torch.Generator().manual_seed(6)], torch.device("cpu"))
    assert a.shape == (3, 2, 3) and torch.equal(a[1], b[0])


@pytest.mark.parametrize("device,precision", [("cpu", "bf16"), pytest.param(
    "cuda", "fp16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_reduced_precision_network_stays_close_to_fp32(tiny_prior, device, precision):
    """Autocast applies to the network only: eps agrees with fp32 to bf16/fp16 accuracy."""
    from gdp.prior.checkpoint import build_prior
    prior = build_prior(tiny_prior.spec, tiny_prior.unet.state_dict(), device=device)
    x = torch.randn(2, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(0))
    chain = prior.denoiser().chain(10)
    ref = prior.denoiser().predict(x, 5, chain)
    low = prior.set_precision(precision, channels_last=True).denoiser().predict(x, 5, chain)
    assert low.eps.dtype == torch.float32 and low.mean.dtype == torch.float32
    err = (low.eps - ref.eps).abs().max().item()
    assert 0 < err < 0.05 * ref.eps.abs().max().item()  # changed (it ran in low precision), but close
    with pytest.raises(ValueError, match="precision"):
        prior.set_precision("int8")


def test_precision_auto_follows_the_hardware():
    from gdp.prior.denoiser import resolve_precision
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")
