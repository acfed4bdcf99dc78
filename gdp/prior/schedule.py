"""Noise schedules and respacing (Ho et al. 2020; Nichol & Dhariwal 2021, sec. 4).

A `Schedule` holds the betas of the chain actually sampled and, for respaced chains, the map from
its step index to the timestep the network was trained on. All arrays are float64 on the CPU;
the denoiser moves what it needs to the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    """ADM's linear schedule: beta from 1e-4 to 0.02 at 1000 steps, scaled for other lengths."""
    scale = 1000.0 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine schedule, alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(kind: str, num_steps: int = 1000) -> torch.Tensor:
    if kind == "linear":
        return linear_betas(num_steps)
    if kind == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {kind!r}: use 'linear' or 'cosine'")


def spaced_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """`num_steps` training timesteps, evenly spread from 0 to T-1 (both ends kept)."""
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"steps must be between 1 and {num_train_steps}, got {num_steps}")
    if num_steps == 1:
        return [num_train_steps - 1]
    stride = (num_train_steps - 1) / (num_steps - 1)
    return sorted({round(i * stride) for i in range(num_steps)})


@dataclass(frozen=True)
class Schedule:
    """A (possibly respaced) chain: `betas[i]` for step i, `timesteps[i]` = network timestep."""

    betas: torch.Tensor  # [N] float64
    timesteps: torch.Tensor  # [N] int64, training timesteps fed to the network

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> "Schedule":
        return cls(betas.to(torch.float64), torch.arange(len(betas)))

    def respace(self, num_steps: int) -> "Schedule":
        """Keep `num_steps` timesteps; new betas keep alpha_bar of the kept steps exact (IDDPM eq. 19)."""
        keep = spaced_timesteps(len(self.betas), num_steps)
        alpha_bar = self.alpha_bar
        betas, last = [], 1.0
        for t in keep:
            betas.append(1.0 - alpha_bar[t].item() / last)
            last = alpha_bar[t].item()
        return Schedule(torch.tensor(betas, dtype=torch.float64), self.timesteps[keep])

    def __len__(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alpha_bar(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @property
    def alpha_bar_prev(self) -> torch.Tensor:
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
        return self.betas * (1.0 - self.alpha_bar_prev) / (1.0 - self.alpha_bar)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        """log beta_tilde, with the t=0 entry (zero variance) replaced by the t=1 value as in ADM."""
        var = self.posterior_variance
        if len(var) == 1:
            return torch.log(self.betas)
        return torch.log(torch.cat([var[1:2], var[1:]]))

    @property
    def posterior_mean_coefs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mu = c1 x0 + c2 x_t (DDPM eq. 7)."""
        c1 = self.betas * torch.sqrt(self.alpha_bar_prev) / (1.0 - self.alpha_bar)
        c2 = (1.0 - self.alpha_bar_prev) * torch.sqrt(self.alphas) / (1.0 - self.alpha_bar)
        return c1, c2
