"""Independent functional reference of the ADM UNet forward pass (Dhariwal & Nichol 2021,
OpenAI guided-diffusion semantics), used only by the tests.

Everything here is a plain function over a state dict: weights are looked up by their
guided-diffusion parameter names, and the block structure is walked from the config fields
(`channel_mult`, `num_res_blocks`, `attention_resolutions`, `resblock_updown`,
`use_scale_shift_norm`, `num_heads` / `num_head_channels` / `num_heads_upsample`), never from
`gdp.prior.unet` module objects. `TrackedWeights` records which names were read, so a test can
check that the reference consumed every tensor of the state dict and nothing else.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

GROUPS = 32


class TrackedWeights:
    """Read-only view of a state dict that remembers every name looked up."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = dict(state)
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.state:
            raise KeyError(f"reference needs a parameter the state dict lacks: {name}")
        self.used.add(name)
        return self.state[name]

    def unused(self) -> set[str]:
        return set(self.state) - self.used


def ref_timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ADM sinusoidal embedding: first half cos, second half sin, frequencies
    max_period^(-i/half) for i = 0..half-1; computed in float32 as ADM does (the rounding of
    t * f at t ~ 1000 matters at the 1e-5 level)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / half)
    phase = t.to(torch.float32).reshape(-1, 1) * freqs.reshape(1, -1)
    parts = [torch.cos(phase), torch.sin(phase)]
    if dim % 2 == 1:
        parts.append(phase.new_zeros(phase.shape[0], 1))
    return torch.cat(parts, dim=1)


def _group_norm(w: TrackedWeights, name: str, x: torch.Tensor) -> torch.Tensor:
    # ADM's GroupNorm32: 32 groups, eps 1e-5, statistics in float32.
    y = F.group_norm(x.to(torch.float32), GROUPS, w[name + ".weight"].to(torch.float32),
                     w[name + ".bias"].to(torch.float32), eps=1e-5)
    return y.to(x.dtype)


def _conv3(w: TrackedWeights, name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    weight = w[name + ".weight"]
    assert weight.shape[-2:] == (3, 3), (name, weight.shape)
    return F.conv2d(x, weight, w[name + ".bias"], stride=stride, padding=1)


def _conv1(w: TrackedWeights, name: str, x: torch.Tensor) -> torch.Tensor:
    weight = w[name + ".weight"]
    if x.dim() == 3:  # conv1d on [B, C, T]
        return F.conv1d(x, weight, w[name + ".bias"])
    return F.conv2d(x, weight, w[name + ".bias"])


def _resblock(w: TrackedWeights, p: str, x: torch.Tensor, emb: torch.Tensor, c_out: int, *,
              scale_shift: bool, up: bool = False, down: bool = False) -> torch.Tensor:
    c_in = x.shape[1]
    h = F.silu(_group_norm(w, f"{p}.in_layers.0", x))
    if up:  # resample after norm+SiLU and before the conv, on both branches
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    elif down:
        h = F.avg_pool2d(h, kernel_size=2, stride=2)
        x = F.avg_pool2d(x, kernel_size=2, stride=2)
    h = _conv3(w, f"{p}.in_layers.2", h)
    e = F.linear(F.silu(emb), w[f"{p}.emb_layers.1.weight"], w[f"{p}.emb_layers.1.bias"]).to(h.dtype)
    if scale_shift:
        assert e.shape[1] == 2 * c_out
        scale, shift = e[:, :c_out, None, None], e[:, c_out:, None, None]
        h = _group_norm(w, f"{p}.out_layers.0", h) * (scale + 1.0) + shift
        h = F.silu(h)
    else:
        assert e.shape[1] == c_out
        h = F.silu(_group_norm(w, f"{p}.out_layers.0", h + e[:, :, None, None]))
    h = _conv3(w, f"{p}.out_layers.3", h)  # out_layers.2 is Dropout (identity in eval)
    skip = x if c_in == c_out else _conv1(w, f"{p}.skip_connection", x)
    return skip + h


def _attention(w: TrackedWeights, p: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    t = hgt * wid
    flat = x.reshape(b, c, t)
    qkv = _conv1(w, f"{p}.qkv", _group_norm(w, f"{p}.norm", flat))  # [B, 3C, T]
    assert c % heads == 0, (p, c, heads)
    ch = c // heads
    # Legacy layout: channels are [head][q | k | v][ch].
    qkv = qkv.reshape(b * heads, 3 * ch, t)
    q, k, v = qkv[:, :ch], qkv[:, ch:2 * ch], qkv[:, 2 * ch:]
    s = ch ** -0.25
    logits = torch.einsum("nct,ncs->nts", q * s, k * s)
    weights = torch.softmax(logits.to(torch.float32), dim=-1).to(logits.dtype)
    a = torch.einsum("nts,ncs->nct", weights, v).reshape(b, c, t)
    return (flat + _conv1(w, f"{p}.proj_out", a)).reshape(b, c, hgt, wid)


def _heads(cfg, c: int, num_heads: int) -> int:
    if cfg.num_head_channels == -1:
        return num_heads
    assert c % cfg.num_head_channels == 0, (c, cfg.num_head_channels)
    return c // cfg.num_head_channels


def reference_unet(state: Mapping[str, torch.Tensor] | TrackedWeights, cfg, x: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """ADM UNetModel forward (no class conditioning) from a state dict and a config with the
    fields of `UNetConfig` (attention_resolutions in pixels, as on the ADM command line)."""
    w = state if isinstance(state, TrackedWeights) else TrackedWeights(state)
    mc = cfg.model_channels
    attn_at = {cfg.image_size // r for r in cfg.attention_resolutions}  # downsampling factors
    up_heads = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample
    ss = cfg.use_scale_shift_norm
    n_levels = len(cfg.channel_mult)

    emb = ref_timestep_embedding(t, mc).to(x.dtype)
    emb = F.linear(emb, w["time_embed.0.weight"], w["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), w["time_embed.2.weight"], w["time_embed.2.bias"])

    # Encoder.
    h = _conv3(w, "input_blocks.0.0", x)
    skips = [h]
    blk, ds = 1, 1
    for level in range(n_levels):
        width = int(cfg.channel_mult[level] * mc)
        for _ in range(cfg.num_res_blocks):
            h = _resblock(w, f"input_blocks.{blk}.0", h, emb, width, scale_shift=ss)
            if ds in attn_at:
                h = _attention(w, f"input_blocks.{blk}.1", h, _heads(cfg, width, cfg.num_heads))
            skips.append(h)
            blk += 1
        if level < n_levels - 1:
            if cfg.resblock_updown:
                h = _resblock(w, f"input_blocks.{blk}.0", h, emb, width, scale_shift=ss, down=True)
            else:
                h = _conv3(w, f"input_blocks.{blk}.0.op", h, stride=2)
            skips.append(h)
            blk += 1
            ds *= 2

    # Bottleneck: res, attention, res (attention always present).
    c = h.shape[1]
    h = _resblock(w, "middle_block.0", h, emb, c, scale_shift=ss)
    h = _attention(w, "middle_block.1", h, _heads(cfg, c, cfg.num_heads))
    h = _resblock(w, "middle_block.2", h, emb, c, scale_shift=ss)

    # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
    blk = 0
    for level in reversed(range(n_levels)):
        width = int(cfg.channel_mult[level] * mc)
        for i in range(cfg.num_res_blocks + 1):
            h = torch.cat([h, skips.pop()], dim=1)
            p = f"output_blocks.{blk}"
            h = _resblock(w, f"{p}.0", h, emb, width, scale_shift=ss)
            sub = 1
            if ds in attn_at:
                h = _attention(w, f"{p}.{sub}", h, _heads(cfg, width, up_heads))
                sub += 1
            if level > 0 and i == cfg.num_res_blocks:
                if cfg.resblock_updown:
                    h = _resblock(w, f"{p}.{sub}", h, emb, width, scale_shift=ss, up=True)
                else:
                    h = _conv3(w, f"{p}.{sub}.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
                ds //= 2
            blk += 1
    assert not skips

    h = F.silu(_group_norm(w, "out.0", h))
    return _conv3(w, "out.2", h)
