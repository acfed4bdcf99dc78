"""The one denoiser contract: an epsilon-predicting network plus its noise schedule.

`Denoiser.predict(x_t, i, chain)` runs the network once and returns eps, the clipped x0_hat, the
posterior mean of q(x_{t-1} | x_t, x0_hat) and its log-variance (learned range or fixed), for
step i of a (respaced) chain. The raw network is called here and nowhere else in sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from gdp.prior.schedule import Schedule

VarianceType = Literal["learned_range", "fixed_small", "fixed_large"]
Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """The network's precision for `precision` in auto | fp32 | bf16 | fp16 on `device`. auto is bf16
    on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX: 1.4-2.5x faster sampling on this project's
    CPU, PSNR within 0.011 dB of fp32, docs/BENCHMARKS.md), else fp32. In bf16 a batch of 8 and a
    batch of 1 differ by up to 0.07 in x0_hat (fp32: 5e-6), so fp32 stays the default."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if precision not in AUTOCAST:
        raise ValueError(f"unknown precision {precision!r}; choose auto or one of {', '.join(AUTOCAST)}")
    return precision


@dataclass(frozen=True)
class PriorOutput:
    eps: torch.Tensor  # [B, C, H, W]
    x0_hat: torch.Tensor  # [B, C, H, W] in [-1, 1] when clipping
    mean: torch.Tensor  # [B, C, H, W] posterior mean mu(x_t, x0_hat)
    log_variance: torch.Tensor  # [B, C, H, W] (or broadcastable [1, 1, 1, 1])


@dataclass(frozen=True)
class Chain:
    """Per-step scalars of a sampling chain, as Python floats (cheap to index every step)."""

    schedule: Schedule
    timesteps: list[int]
    sqrt_alpha_bar: list[float]
    sqrt_one_minus_alpha_bar: list[float]
    coef_x0: list[float]
    coef_xt: list[float]
    log_beta: list[float]
    log_beta_tilde: list[float]

    @classmethod
    def from_schedule(cls, s: Schedule) -> "Chain":
        c1, c2 = s.posterior_mean_coefs
        return cls(s, s.timesteps.tolist(), s.alpha_bar.sqrt().tolist(), (1 - s.alpha_bar).sqrt().tolist(),
                   c1.tolist(), c2.tolist(), s.betas.log().tolist(), s.posterior_log_variance_clipped.tolist())

    def __len__(self) -> int:
        return len(self.timesteps)

    def sigma_bar_sq(self, i: int) -> float:
        """(1 - alpha_bar) / alpha_bar at step i: the variance of x0_hat's error, [-1, 1] units."""
        return (self.sqrt_one_minus_alpha_bar[i] / self.sqrt_alpha_bar[i]) ** 2


class Denoiser:
    """Wraps `model(x_t, t) -> eps` (or `[eps, v]` with learned sigma) and its training schedule."""

    def __init__(self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: Schedule, *,
                 variance: VarianceType = "learned_range", clip: bool = True, image_size: int | None = None,
                 channels: int = 3, precision: Precision = "fp32"):
        if precision not in AUTOCAST:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(AUTOCAST)}")
        self.model = model
        self.precision = precision
        self.schedule = schedule
        self.variance = variance
        self.clip = clip
        self.image_size = image_size
        self.channels = channels

    def chain(self, steps: int | None = None) -> Chain:
        """The chain for `steps` respaced steps (all training steps when None)."""
        s = self.schedule if steps is None or steps == len(self.schedule) else self.schedule.respace(steps)
        return Chain.from_schedule(s)

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, i: int, chain: Chain) -> PriorOutput:
        """One network evaluation at step i of `chain`; x_t is `[B, C, H, W]`."""
        t = torch.full((x_t.shape[0],), chain.timesteps[i], device=x_t.device, dtype=torch.long)
        amp = AUTOCAST[self.precision]
        if amp is None:
            out = self.model(x_t, t).float()
        else:  # the network in reduced precision (autocast); everything after it stays fp32
            with torch.autocast(x_t.device.type, dtype=amp):
                out = self.model(x_t, t)
            out = out.float()
        c = self.channels
        eps = out[:, :c]
        x0_hat = (x_t - chain.sqrt_one_minus_alpha_bar[i] * eps) / chain.sqrt_alpha_bar[i]
        if self.clip:
            x0_hat = x0_hat.clamp(-1, 1)
        mean = chain.coef_x0[i] * x0_hat + chain.coef_xt[i] * x_t
        return PriorOutput(eps, x0_hat, mean, self._log_variance(out, i, chain))

    def _log_variance(self, out: torch.Tensor, i: int, chain: Chain) -> torch.Tensor:
        if self.variance == "learned_range":
            if out.shape[1] != 2 * self.channels:
                raise ValueError("learned_range variance needs a network with 2x output channels (learn_sigma)")
            frac = (out[:, self.channels:] + 1) / 2
            return frac * chain.log_beta[i] + (1 - frac) * chain.log_beta_tilde[i]
        if self.variance == "fixed_small":
            value = chain.log_beta_tilde[i]
        elif self.variance == "fixed_large":  # ADM: beta_t, with beta_tilde_1 at the first step
            value = chain.log_beta_tilde[1] if i == 0 and len(chain) > 1 else chain.log_beta[i]
        else:
            raise ValueError(f"unknown variance type {self.variance!r}")
        return torch.full((1, 1, 1, 1), value, device=out.device)
