"""Reverse diffusion: unconditional ancestral sampling and the GDP loop (Fei et al., CVPR 2023).

Images in this module live in model space `[-1, 1]`, shaped `[B, C, H, W]`. Randomness comes
from one `torch.Generator` per image, so an image's result never depends on its batch-mates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from gdp.prior.denoiser import Chain, PriorOutput

Callback = Callable[[int, int], None]  # (steps done, steps total)


class PredictsPrior(Protocol):
    """Anything with the denoiser contract: a plain `Denoiser` or a patch-fused one."""

    def chain(self, steps: int | None = None) -> Chain: ...

    def predict(self, x_t: torch.Tensor, i: int, chain: Chain) -> PriorOutput: ...


def randn_per_image(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """`[B, *shape]` standard normal noise, image b drawn from generators[b] (on the CPU)."""
    noise = [torch.randn(tuple(shape), generator=g) for g in generators]
    return torch.stack(noise).to(device)


def make_generators(seed: int, n: int) -> list[torch.Generator]:
    """Generators for n images: image k gets seed + k."""
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


@torch.no_grad()
def sample_prior(denoiser: PredictsPrior, shape: Sequence[int], steps: int, generators: Sequence[torch.Generator],
                 device: torch.device | str = "cpu", callback: Callback | None = None) -> torch.Tensor:
    """Unconditional ancestral DDPM sampling; returns x_0 `[B, C, H, W]` in [-1, 1]."""
    chain = denoiser.chain(steps)
    x = randn_per_image(shape, generators, torch.device(device))
    for n, i in enumerate(reversed(range(len(chain)))):
        out = denoiser.predict(x, i, chain)
        x = out.mean
        if i > 0:
            x = x + torch.exp(0.5 * out.log_variance) * randn_per_image(shape, generators, x.device)
        if callback:
            callback(n + 1, len(chain))
    return x


@dataclass(frozen=True)
class GDPResult:
    x0: torch.Tensor  # [B, C, H, W] in [-1, 1]
    mse: torch.Tensor  # [B] final mean squared residual of A u(x0) against y, [0, 1] units
    nfe: int  # network evaluations per image (patches count separately)
    seconds: float
    params: dict = field(default_factory=dict)  # estimated operator parameters (blind operators)


def gdp_sample(denoiser: PredictsPrior, operator, y: torch.Tensor, steps: int, *, guidance,
               generators: Sequence[torch.Generator], x_shape: Sequence[int] | None = None,
               callback: Callback | None = None, norm_sq: float | None = None) -> GDPResult:
    """GDP (Fei et al. 2023), Alg. 2 (GDP-x0) or Alg. 1 (GDP-xt), without Sigma scaling.

    y: observation `[B, ...]` in [0, 1] (what `operator.A` returns); x_shape: `[B, C, H, W]` of the
    image to restore (default `operator.x_shape(y.shape)`); one generator per image; norm_sq:
    ||A||^2 for the per-step cap when the caller knows it (else found by power iteration).

    Blind operators (gdp.operators.blind), also inside wrappers: their parameters are initialised
    per image from y, take one update per step at the same x0_hat and pre-step parameters as the
    image guidance, and are returned in `GDPResult.params`; the cap is then per image, and with
    several stacked guides (HDR) per guide: each may correct 1/K of its residual per step, so a
    bright exposure's large gain does not throttle the dark one's pull. An operator's `passes` > 1
    runs that many chains (fresh noise each), every later one starting from the previous estimate
    and holding it for `later_update_from` of the chain (1: fixed); the last chain's image is returned.
    """
    from gdp.guidance import blind_part, consistent_x0, guidance_gradient, normaliser, operator_norm_sq

    t0 = time.perf_counter()
    x_shape = tuple(x_shape or operator.x_shape(tuple(y.shape)))
    chain = denoiser.chain(steps)
    n = normaliser(operator, y, x_shape, guidance.size_rule)
    step_scale = guidance.step_scale(len(chain))
    blind = blind_part(operator)
    solved = guidance.data_step != "gradient"
    if blind is not None and solved:
        raise ValueError(f"the {guidance.data_step!r} data step needs a linear operator; blind tasks estimate "
                         "their parameters with the paper's gradient step (data step 'gradient')")
    passes = blind.passes if blind is not None else 1
    if blind is not None:
        blind.bind(blind.init_params(y, x_shape))
        wrapper_norm = wrapper_norm_sq(operator, x_shape, y.device)
    scale = step_scale
    if guidance.max_correction and blind is None and not solved:  # never overshoot y in one step (gdp.guidance)
        norm_sq = norm_sq or operator_norm_sq(operator, x_shape, y.device)
        scale = min(step_scale, guidance.max_correction * 2 * n / norm_sq)
    nfe = getattr(denoiser, "nfe_per_call", 1)
    total = passes * len(chain)
    for p in range(passes):  # blind operators may ask for several chains, each starting from the last estimate
        updater = ParamUpdater(blind) if blind is not None else None
        hold = (blind.update_from if p == 0 else blind.later_update_from) if blind is not None else 0.0
        x = randn_per_image(x_shape[1:], generators, y.device)  # 1. x_T ~ N(0, I)
        for k, i in enumerate(reversed(range(len(chain)))):
            out = denoiser.predict(x, i, chain)  # 2. eps, x0_hat, mu, Sigma from the prior
            if solved:  # 3-5 with the data term solved on x0_hat instead of stepped (gdp.guidance)
                x0 = consistent_x0(operator, out.x0_hat, y, guidance, chain.sigma_bar_sq(i))
                noise = randn_per_image(x_shape[1:], generators, x.device) if i > 0 else None
                x = renoise(x, x0, out, i, chain, guidance.zeta, noise)
                if callback:
                    callback(p * len(chain) + k + 1, total)
                continue
            z = out.x0_hat if guidance.mode == "x0" else x
            if blind is not None and guidance.max_correction:  # per image and guide: ||A_phi||^2 changes with phi
                guide_norm = wrapper_norm * blind.guide_norm_sq(blind.params) * blind.guides  # [B, K]
                scale = (guidance.max_correction * 2 * n / guide_norm.clamp_min(1e-12)).clamp(max=step_scale)
                if blind.guides == 1:
                    scale = scale[:, 0]
            updating = updater is not None and k >= hold * len(chain)  # phi held: no gradients for it
            g, _, grads = guidance_gradient(operator, z, y, scale, n, guidance.color_weight,  # 3. g = -grad L
                                            guidance.exposure_weight, blind if updating else None)
            if updating:  # 3b. step(s) on the parameters
                updater.step(grads)
                for _ in range(blind.iters - 1):  # more steps at the same z (the image guidance g is kept)
                    updater.step(guidance_gradient(operator, z, y, scale, n, blind=blind)[2])
            x = out.mean + g  # 4. mu~ = mu + g (no Sigma)
            if i > 0:  # 5. x_{t-1} = mu~ + sigma z  (no noise at the last step)
                x = x + torch.exp(0.5 * out.log_variance) * randn_per_image(x_shape[1:], generators, x.device)
            if callback:
                callback(p * len(chain) + k + 1, total)
    x = x.clamp(-1, 1)
    with torch.no_grad():
        mse = (operator.A((x + 1) / 2) - y).square().flatten(1).mean(dim=1)
    params = {k: v.detach() for k, v in blind.params.items()} if blind is not None else {}
    return GDPResult(x, mse, nfe * total, time.perf_counter() - t0, params)


def renoise(x_t: torch.Tensor, x0: torch.Tensor, out: PriorOutput, i: int, chain: Chain, zeta: float | None,
            noise: torch.Tensor | None) -> torch.Tensor:
    """x_{t-1} from x_t and a data-consistent x0~ (`noise` None at the last step).

    zeta None: the posterior q(x_{t-1} | x_t, x0~) with the prior's variance (GDP's step with x0~
    for x0_hat). zeta in [0, 1]: DiffPIR (Zhu et al. 2023, eq. 15), sqrt(alpha_bar_{t-1}) x0~ +
    sqrt(1 - alpha_bar_{t-1}) (sqrt(1 - zeta) eps~ + sqrt(zeta) z), eps~ the noise x_t implies for x0~.
    """
    if zeta is None:
        x = chain.coef_x0[i] * x0 + chain.coef_xt[i] * x_t
        return x if noise is None else x + torch.exp(0.5 * out.log_variance) * noise
    if noise is None:
        return x0
    eps = (x_t - chain.sqrt_alpha_bar[i] * x0) / chain.sqrt_one_minus_alpha_bar[i]
    ab_prev = chain.sqrt_alpha_bar[i - 1] ** 2
    return ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * ((1 - zeta) ** 0.5 * eps + zeta ** 0.5 * noise)


class ParamUpdater:
    """One update of a blind operator's parameters per call: plain gradient descent, or Adam for
    the names in `operator.adam` (element-wise moments: each image keeps its own state)."""

    def __init__(self, operator, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.op, self.betas, self.eps, self.t = operator, betas, eps, 0
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        b1, b2 = self.betas
        new = {}
        for name, value in self.op.params.items():
            g, lr = grads[name], self.op.lr.get(name, 0.0)
            if name in self.op.adam:
                m, v = self.moments.get(name, (torch.zeros_like(g), torch.zeros_like(g)))
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g.square()
                self.moments[name] = (m, v)
                g = (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps)
            new[name] = value - lr * g
        self.op.bind(self.op.project(new))


def wrapper_norm_sq(operator, x_shape: Sequence[int], device) -> float:
    """||W||^2 of the wrappers around a blind operator (e.g. the global pass's upsampling): the
    product of their `norm_factor(x_shape)`; 1 for none. Independent of the parameters."""
    from gdp.guidance import blind_part
    blind, factor = blind_part(operator), 1.0
    while operator is not blind:
        if hasattr(operator, "norm_factor"):
            factor *= operator.norm_factor(tuple(x_shape), device)
        operator = operator.inner
    return factor


class FusedDenoiser:
    """Patch-fused prior for images larger than the network (GDP_REFERENCE sec. 4.1).

    x_t lives at full resolution; each call runs every window through the network, `batch_size`
    patches at a time, and merges eps, x0_hat, the posterior mean and the log-variance per pixel
    with the blending weight, so only one batch of patches is on the device at once.
    """

    def __init__(self, denoiser: PredictsPrior, height: int, width: int, patch: int, stride: int, *,
                 batch_size: int = 8, blend: str = "smooth"):
        from gdp.tiling import blend_window, plan_windows
        self.denoiser = denoiser
        self.windows = plan_windows(height, width, patch, stride)
        self.batch_size = batch_size
        self.patch, self.stride, self.height, self.width = patch, stride, height, width
        self._weight = blend_window(patch, blend)
        self.nfe_per_call = len(self.windows)

    def chain(self, steps: int | None = None) -> Chain:
        return self.denoiser.chain(steps)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, i: int, chain: Chain) -> PriorOutput:
        b, c, h, w = x_t.shape
        weight = self._weight.to(x_t.device)
        sums = torch.zeros(4, b, c, h, w, device=x_t.device)  # eps, x0_hat, mean, log_variance
        total = torch.zeros(h, w, device=x_t.device)
        jobs = [(k, win) for k in range(b) for win in self.windows]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            out = self.denoiser.predict(torch.stack([x_t[k][win.index] for k, win in chunk]), i, chain)
            log_var = out.log_variance.expand_as(out.mean)
            for n, (k, win) in enumerate(chunk):
                for field_index, value in enumerate((out.eps, out.x0_hat, out.mean, log_var)):
                    sums[field_index, k][win.index] += weight * value[n]
        for win in self.windows:
            total[win.index] += weight
        eps, x0_hat, mean, log_var = sums / total
        return PriorOutput(eps, x0_hat, mean, log_var)
