"""The solved data steps of gdp.guidance (cg, project) and the re-noising of gdp.sampling, against
dense linear algebra: every operator is turned into its matrix and the regularised least-squares
problem argmin_x |A x - y|^2 + rho |x - x0|^2 is solved in closed form with torch.linalg."""

from __future__ import annotations

import math

import pytest
import torch

from gdp.guidance import Guidance, adjoint, conjugate_gradient, consistent_x0, operator_norm_sq, project
from gdp.operators import make_operator
from gdp.prior.denoiser import Denoiser, PriorOutput
from gdp.prior.schedule import Schedule, linear_betas
from gdp.restore import CropFirst
from gdp.sampling import gdp_sample, make_generators, renoise
from tests.test_sampling import GaussianPrior, _two_photos


def dense(op, x_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of a linear operator on images of `x_shape` (float64, one column per pixel)."""
    n = math.prod(x_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *x_shape[1:])
    return torch.stack([op.A(b[None]).flatten() for b in basis], dim=1)


def tikhonov(a: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    n = a.shape[1]
    lhs = a.T @ a + rho * torch.eye(n, dtype=a.dtype)
    return torch.linalg.solve(lhs, a.T @ y.flatten() + rho * x0.flatten()).reshape(x0.shape)


def _problem(task: str, x_shape, **options):
    g = torch.Generator().manual_seed(3)
    op = make_operator(task, **options)
    x0 = torch.rand(x_shape, generator=g, dtype=torch.float64)
    y = op.A(torch.rand(x_shape, generator=g, dtype=torch.float64))
    return op, x0, y


@pytest.mark.parametrize("task,options,x_shape", [
    ("deblur", {"sigma": 1.2, "kernel_size": 5, "mode": "valid"}, (1, 1, 9, 8)),
    ("deblur", {"sigma": 1.0, "kernel_size": 3}, (1, 3, 7, 6)),
    ("sr", {"factor": 2, "filter": "bicubic"}, (1, 1, 10, 8)),
    ("sr", {"factor": 2}, (1, 3, 6, 8)),
    ("inpaint", {"ratio": 0.4}, (1, 3, 6, 5)),
    ("colorize", {}, (1, 3, 5, 4)),
])
@pytest.mark.parametrize("rho", [0.05, 1.0])
def test_cg_converges_to_the_regularised_least_squares_solution(task, options, x_shape, rho):
    op, x0, y = _problem(task, x_shape, **options)
    n = math.prod(x_shape)
    x = conjugate_gradient(op, x0, y, rho, iters=n)
    assert (x - tikhonov(dense(op, x_shape), x0, y, rho)).abs().max() < 1e-8


@pytest.mark.parametrize("task,options,x_shape", [
    ("sr", {"factor": 2}, (1, 3, 6, 8)), ("inpaint", {"ratio": 0.4}, (1, 3, 6, 5)), ("colorize", {}, (1, 3, 5, 4))])
@pytest.mark.parametrize("rho", [0.0, 0.3])
def test_project_is_the_closed_form_for_row_orthogonal_operators(task, options, x_shape, rho):
    op, x0, y = _problem(task, x_shape, **options)
    c = op.gram_scalar()
    assert c == pytest.approx(operator_norm_sq(op, x_shape, iterations=50), rel=1e-6)  # A A^T = c I: ||A||^2 = c
    a = dense(op, x_shape)
    x = project(op, x0, y, rho, c)
    if rho:
        assert (x - tikhonov(a, x0, y, rho)).abs().max() < 1e-10
    else:  # range/null-space split: A x = y exactly, and x0's null-space part is kept
        assert (op.A(x) - y).abs().max() < 1e-12
        null = torch.eye(a.shape[1], dtype=a.dtype) - torch.linalg.pinv(a) @ a
        assert (null @ (x - x0).flatten()).abs().max() < 1e-10
    # one CG iteration is the same solution: the residual lies in one eigenspace of A^T A + rho I
    assert (conjugate_gradient(op, x0, y, rho, iters=1) - x).abs().max() < 1e-10


def test_operators_without_a_gram_scalar():
    assert make_operator("deblur").gram_scalar() is None
    assert make_operator("sr", filter="bicubic").gram_scalar() is None


def test_adjoint_through_a_wrapper_is_autograd_and_exact():
    """CropFirst (guide the image part of a padded canvas) has no closed-form adjoint: the
    vector-Jacobian product must equal the inner adjoint zero-padded to the canvas."""
    op = make_operator("sr", factor=2)
    wrapped = CropFirst(op, 6, 4)
    r = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    by_hand = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    by_hand[..., :6, :4] = op.A_adjoint(r)
    assert (adjoint(wrapped, r, (2, 3, 8, 8)) - by_hand).abs().max() < 1e-15


def test_cg_treats_every_image_of_a_batch_alone():
    op, x0, y = _problem("deblur", (3, 3, 12, 10), sigma=1.5, kernel_size=5)
    both = conjugate_gradient(op, x0, y, 0.1, iters=4)
    for k in range(3):
        alone = conjugate_gradient(op, x0[k:k + 1], y[k:k + 1], 0.1, iters=4)
        assert (both[k:k + 1] - alone).abs().max() < 1e-12


def _chain(steps=10):
    den = Denoiser(lambda x, t: torch.zeros_like(x), Schedule.from_betas(linear_betas(1000)), variance="fixed_small")
    return den.chain(steps)


def test_renoise_rules():
    chain, i = _chain(), 6
    g = torch.Generator().manual_seed(0)
    x_t, x0, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    out = PriorOutput(x0, x0, x0, torch.full((1, 1, 1, 1), -3.0))
    posterior = chain.coef_x0[i] * x0 + chain.coef_xt[i] * x_t + math.exp(-1.5) * z
    assert torch.allclose(renoise(x_t, x0, out, i, chain, None, z), posterior, atol=1e-6)
    ab_prev = chain.sqrt_alpha_bar[i - 1] ** 2
    fresh = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * z  # zeta = 1: DiffPIR's full re-noising
    assert torch.allclose(renoise(x_t, x0, out, i, chain, 1.0, z), fresh, atol=1e-6)
    eps = (x_t - chain.sqrt_alpha_bar[i] * x0) / chain.sqrt_one_minus_alpha_bar[i]
    ddim = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps  # zeta = 0: deterministic (DDIM, eta 0)
    assert torch.allclose(renoise(x_t, x0, out, i, chain, 0.0, z), ddim, atol=1e-6)
    assert torch.equal(renoise(x_t, x0, out, 0, chain, 0.5, None), x0)  # last step: x0~ itself


def _gaussian_denoiser():
    schedule = Schedule.from_betas(linear_betas(1000))
    return Denoiser(GaussianPrior(0.2, 0.3), schedule, variance="fixed_small")


@pytest.mark.parametrize("data_step,zeta", [("cg", None), ("cg", 1.0), ("project", None), ("project", 0.5)])
def test_solved_data_steps_agree_with_a_noiseless_observation(data_step, zeta):
    """Noise-free SR x2 with the analytic Gaussian prior: the last step's x0~ solves A x = y up to
    the proximal weight (tiny at t = 0), so the consistency is far above the 35 dB bar, where the
    paper's gradient step is not; each image's result is the same alone as in the batch."""
    den, op = _gaussian_denoiser(), make_operator("sr", factor=2)
    y = op.A(_two_photos())
    guidance = Guidance(data_step=data_step, zeta=zeta, cg_iters=3)
    result = gdp_sample(den, op, y, 10, guidance=guidance, generators=make_generators(5, 2))
    consistency = -10 * torch.log10(result.mse)
    assert consistency.min() > 50
    alone = gdp_sample(den, op, y[1:], 10, guidance=guidance, generators=[torch.Generator().manual_seed(6)])
    assert torch.allclose(result.x0[1:], alone.x0, atol=1e-5)
    paper = gdp_sample(den, op, y, 10, guidance=Guidance(scale=2000.0), generators=make_generators(5, 2))
    assert (-10 * torch.log10(paper.mse)).max() < consistency.min() - 10


def test_sigma_y_loosens_the_fit_to_a_noisy_observation():
    """With sigma_y given, x0~ is pulled less hard to y: the proximal weight grows with sigma_y^2."""
    op = make_operator("sr", factor=2)
    x0_hat = torch.zeros(1, 3, 8, 8)
    y = torch.full((1, 3, 4, 4), 0.9)
    exact = consistent_x0(op, x0_hat, y, Guidance(data_step="project"), sigma_bar_sq=0.01)
    noisy = consistent_x0(op, x0_hat, y, Guidance(data_step="project", sigma_y=0.05), sigma_bar_sq=0.01)
    q2 = 1 / (255 ** 2 * 12)  # 8-bit quantisation noise keeps rho > 0 at sigma_y = 0
    for x, sigma_y in ((exact, 0.0), (noisy, 0.05)):
        rho = 4 * (sigma_y ** 2 + q2) / 0.01
        # A u(x0_hat) = 0.5, residual 0.4, A^T r = 0.1 per pixel, c = 1/4
        assert float((x[0, 0, 0, 0] + 1) / 2) == pytest.approx(0.5 + 0.1 / (0.25 + rho), rel=1e-5)
    assert float(exact[0, 0, 0, 0]) > float(noisy[0, 0, 0, 0]) + 0.5


def test_solved_data_steps_refuse_blind_operators_and_xt():
    with pytest.raises(ValueError, match="works on x0_hat"):
        Guidance(data_step="cg", mode="xt")
    with pytest.raises(ValueError, match="unknown data step"):
        Guidance(data_step="newton")
    op = make_operator("lowlight")
    y = torch.rand(1, 3, 16, 16) * 0.2
    with pytest.raises(ValueError, match="blind tasks"):
        gdp_sample(_gaussian_denoiser(), op, y, 4, guidance=Guidance(data_step="cg"), generators=make_generators(0, 1))
