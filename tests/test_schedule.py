"""Noise schedules and respacing (Ho et al. 2020; Nichol & Dhariwal 2021), checked against direct
float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from gdp.prior.schedule import Schedule, cosine_betas, linear_betas, make_betas, spaced_timesteps

T = 1000


@pytest.fixture(scope="module")
def linear() -> Schedule:
    return Schedule.from_betas(linear_betas(T))


def test_linear_betas_endpoints_and_shape():
    betas = linear_betas(T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert bool((betas[1:] > betas[:-1]).all())
    # shorter schedules are scaled by 1000 / T (ADM's get_named_beta_schedule)
    short = linear_betas(100)
    assert short[0].item() == pytest.approx(1e-3, abs=1e-15) and short[-1].item() == pytest.approx(0.2, abs=1e-15)


def test_make_betas_names_and_unknown():
    assert torch.equal(make_betas("linear", T), linear_betas(T))
    assert torch.equal(make_betas("cosine", T), cosine_betas(T))
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic")


@pytest.mark.parametrize("k", [1, 2, 3, 10, 25, 50, 100, 250, 999])
def test_respace_keeps_alpha_bar_of_kept_steps(linear, k):
    spaced = linear.respace(k)
    ts = spaced.timesteps
    assert len(spaced) == k and ts.shape == (k,) and spaced.betas.dtype == torch.float64
    assert ts[-1].item() == T - 1
    if k >= 2:
        assert ts[0].item() == 0
        assert bool((ts[1:] > ts[:-1]).all())
    assert torch.allclose(spaced.alpha_bar, linear.alpha_bar[ts], rtol=0, atol=1e-12)
    assert bool((spaced.betas > 0).all() and (spaced.betas < 1).all())


def test_spaced_timesteps_every_length_is_exact():
    """sorted(set(round(...))) must never merge two steps: every K gives K distinct timesteps."""
    bad = [k for k in range(1, T + 1) if len(spaced_timesteps(T, k)) != k]
    assert bad == []
    assert spaced_timesteps(T, 1) == [T - 1]
    assert spaced_timesteps(T, 2) == [0, T - 1]
    assert spaced_timesteps(T, 4) == [0, 333, 666, 999]


def test_respace_full_length_is_the_original(linear):
    same = linear.respace(T)
    assert torch.equal(same.timesteps, torch.arange(T))
    assert torch.allclose(same.betas, linear.betas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [0, T + 1, -3])
def test_spaced_timesteps_rejects_impossible_lengths(k):
    with pytest.raises(ValueError, match=f"steps must be between 1 and {T}, got {k}"):
        spaced_timesteps(T, k)


@pytest.mark.parametrize("steps", [None, 37])
def test_posterior_quantities_match_direct_formulas(linear, steps):
    s = linear if steps is None else linear.respace(steps)
    betas = s.betas.tolist()
    alpha_bar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        alpha_bar.append(prod)
    prev = [1.0] + alpha_bar[:-1]
    var = [b * (1 - p) / (1 - a) for b, p, a in zip(betas, prev, alpha_bar)]
    c1 = [b * math.sqrt(p) / (1 - a) for b, p, a in zip(betas, prev, alpha_bar)]
    c2 = [(1 - p) * math.sqrt(1 - b) / (1 - a) for b, p, a in zip(betas, prev, alpha_bar)]
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert torch.allclose(s.alpha_bar, as64(alpha_bar), rtol=1e-12, atol=0)
    assert torch.allclose(s.posterior_variance, as64(var), rtol=1e-12, atol=0)
    got_c1, got_c2 = s.posterior_mean_coefs
    assert torch.allclose(got_c1, as64(c1), rtol=1e-12, atol=0)
    assert torch.allclose(got_c2, as64(c2), rtol=1e-12, atol=0)
    # beta_tilde_0 = 0; ADM's clipped log replaces it with beta_tilde_1
    assert var[0] == 0.0
    logs = s.posterior_log_variance_clipped
    assert logs[0].item() == pytest.approx(math.log(var[1]), rel=1e-12)
    assert torch.allclose(logs[1:], as64(var[1:]).log(), rtol=1e-12, atol=0)
    # the x0 coefficient of the mean of q(x_{t-1} | x_t, x0) is sqrt(alpha_bar_{t-1})
    assert torch.allclose(got_c1 + got_c2 * s.alpha_bar.sqrt(), as64(prev).sqrt(), rtol=0, atol=1e-12)


def test_single_step_schedule_log_variance(linear):
    one = linear.respace(1)
    assert one.betas[0].item() == pytest.approx(1 - linear.alpha_bar[-1].item(), abs=1e-15)
    assert one.posterior_log_variance_clipped.tolist() == pytest.approx([math.log(one.betas[0].item())])


def test_cosine_schedule_follows_its_formula_and_is_monotone():
    betas = cosine_betas(T)
    s = Schedule.from_betas(betas)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    assert bool((s.alpha_bar[1:] < s.alpha_bar[:-1]).all())
    assert bool((betas > 0).all()) and betas.max().item() == pytest.approx(0.999)  # only the last is clipped
    assert torch.allclose(s.alpha_bar[:-1], expected[:-1], rtol=0, atol=1e-12)
