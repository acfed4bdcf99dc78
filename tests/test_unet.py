"""ADM UNet: functional equivalence with an independent reference, and the parameter layout
of the published 256x256 unconditional checkpoint (names/shapes for strict loading)."""

from __future__ import annotations

import math

import pytest
import torch

from gdp.prior.unet import PRESETS, UNet, UNetConfig, timestep_embedding

from unet_reference import TrackedWeights, ref_timestep_embedding, reference_unet

# Small configs covering every structural switch. Channel counts 96 / 160 are odd multiples of
# 32 (odd head counts with 32 channels per head); attention appears at several resolutions,
# including full resolution (ds 1) and inside the up/down-sampling levels.
CONFIGS = {
    "updown-ss-sigma": UNetConfig(
        image_size=32, model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(1, 2, 2),
        attention_resolutions=(16, 8), num_heads=4, num_head_channels=32,
        resblock_updown=True, use_scale_shift_norm=True),
    "convresample-noss-heads2": UNetConfig(
        image_size=16, model_channels=32, out_channels=3, num_res_blocks=2, channel_mult=(1, 3, 5),
        attention_resolutions=(8, 4), num_heads=2, num_head_channels=-1,
        resblock_updown=False, use_scale_shift_norm=False),
    "updown-noss-headsup": UNetConfig(
        image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, channel_mult=(3, 1, 2),
        attention_resolutions=(16, 4), num_heads=2, num_head_channels=-1, num_heads_upsample=4,
        resblock_updown=True, use_scale_shift_norm=False),
    "convresample-ss-oddheads": UNetConfig(
        image_size=16, model_channels=32, out_channels=3, num_res_blocks=2, channel_mult=(1, 3, 5),
        attention_resolutions=(16, 8, 4), num_heads=4, num_head_channels=32,
        resblock_updown=False, use_scale_shift_norm=True),
}


def _randomised(cfg: UNetConfig, seed: int) -> UNet:
    """Every parameter re-drawn as randn * 0.1: the zero-initialised output convs of the real
    init would make whole branches vanish and hide wiring bugs."""
    model = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_timestep_embedding_matches_closed_form():
    t = torch.tensor([0, 1, 17, 500, 999])
    for dim in (32, 33, 256):
        ours, ref = timestep_embedding(t, dim), ref_timestep_embedding(t, dim)
        assert ours.shape == (5, dim)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        half = dim // 2
        f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        arg = t.double()[:, None] * f[None]
        exact = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)  # cos first, then sin
        torch.testing.assert_close(ours[:, : 2 * half].double(), exact, rtol=0, atol=2e-4)
        if dim % 2:
            assert torch.all(ours[:, -1] == 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_functional_reference(name):
    cfg = CONFIGS[name]
    model = _randomised(cfg, seed=len(name))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([3, 871])
    # float32: like ADM, the model cannot run in float64 (timestep embedding and GroupNorm32
    # are computed in float32 and would meet float64 weights).
    weights = TrackedWeights(model.state_dict())
    with torch.no_grad():
        ours = model(x, t)
        ref = reference_unet(weights, cfg, x, t)
    assert ours.shape == ref.shape == (2, cfg.out_channels, cfg.image_size, cfg.image_size)
    assert weights.unused() == set(), "parameters the ADM architecture does not have"
    assert ref.abs().max() > 0.1  # non-degenerate output
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# --- Published 256x256 unconditional ADM (256x256_diffusion_uncond.pt) -------------------
# Derivation: model_channels 256, channel_mult (1,1,2,2,4,4) -> widths 256,256,512,512,1024,1024;
# time-embedding width 4*256 = 1024; attention where ds in {256/32, 256/16, 256/8} = {8,16,32},
# i.e. levels 3,4,5 (32x32, 16x16, 8x8); heads = width/64; scale-shift -> emb_layers 2*width.
# input_blocks: 0 conv; level L has res blocks 3L+1, 3L+2 and (L<5) a down-resblock 3L+3
#   -> 1,2 | 3 down | 4,5 | 6 down | 7,8 | 9 down | 10,11 (+attn) | 12 down | 13,14 (+attn) |
#      15 down | 16,17 (+attn). Skip widths pushed: 256 x7 (0..6), 512 x6 (7..12), 1024 x5.
# output_blocks: 3 per level from level 5 down; each res eats one skip (popped in reverse):
#   0:1024+1024, 1:1024+1024, 2:1024+1024 (+up at .2, after attn .1), 3:1024+1024, 4:1024+1024,
#   5:1024+512 (+up .2), 6:1024+512, 7:512+512, 8:512+512 (+up .2), 9:512+512, 10:512+512,
#   11:512+256 (+up .1, no attn at ds 4), 12:512+256, 13:256+256, 14:256+256 (+up .1),
#   15..17:256+256.
ADM256_TABLE = {
    "time_embed.0.weight": (1024, 256),
    "time_embed.0.bias": (1024,),
    "time_embed.2.weight": (1024, 1024),
    "input_blocks.0.0.weight": (256, 3, 3, 3),
    "input_blocks.0.0.bias": (256,),
    "input_blocks.1.0.in_layers.0.weight": (256,),
    "input_blocks.1.0.in_layers.2.weight": (256, 256, 3, 3),
    "input_blocks.1.0.emb_layers.1.weight": (512, 1024),
    "input_blocks.1.0.out_layers.0.bias": (256,),
    "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
    "input_blocks.3.0.in_layers.2.weight": (256, 256, 3, 3),  # down-resblock (no .op)
    "input_blocks.3.0.emb_layers.1.bias": (512,),
    "input_blocks.7.0.in_layers.2.weight": (512, 256, 3, 3),
    "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),
    "input_blocks.7.0.emb_layers.1.weight": (1024, 1024),
    "input_blocks.9.0.out_layers.3.weight": (512, 512, 3, 3),
    "input_blocks.10.1.norm.weight": (512,),
    "input_blocks.10.1.qkv.weight": (1536, 512, 1),  # first attention, 32x32, 8 heads
    "input_blocks.10.1.qkv.bias": (1536,),
    "input_blocks.10.1.proj_out.weight": (512, 512, 1),
    "input_blocks.11.1.qkv.weight": (1536, 512, 1),
    "input_blocks.13.0.skip_connection.weight": (1024, 512, 1, 1),
    "input_blocks.13.0.emb_layers.1.weight": (2048, 1024),
    "input_blocks.13.1.qkv.weight": (3072, 1024, 1),
    "input_blocks.15.0.in_layers.2.weight": (1024, 1024, 3, 3),
    "input_blocks.17.1.proj_out.bias": (1024,),
    "middle_block.0.in_layers.2.weight": (1024, 1024, 3, 3),
    "middle_block.1.qkv.weight": (3072, 1024, 1),
    "middle_block.1.proj_out.weight": (1024, 1024, 1),
    "middle_block.2.emb_layers.1.weight": (2048, 1024),
    "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
    "output_blocks.0.0.in_layers.0.weight": (2048,),
    "output_blocks.0.0.in_layers.2.weight": (1024, 2048, 3, 3),
    "output_blocks.0.0.skip_connection.weight": (1024, 2048, 1, 1),
    "output_blocks.0.1.qkv.weight": (3072, 1024, 1),
    "output_blocks.2.2.in_layers.2.weight": (1024, 1024, 3, 3),  # up-resblock after attention
    "output_blocks.2.2.emb_layers.1.weight": (2048, 1024),
    "output_blocks.5.0.skip_connection.weight": (1024, 1536, 1, 1),
    "output_blocks.5.2.out_layers.3.weight": (1024, 1024, 3, 3),
    "output_blocks.6.0.in_layers.2.weight": (512, 1536, 3, 3),
    "output_blocks.6.1.qkv.weight": (1536, 512, 1),
    "output_blocks.7.0.skip_connection.weight": (512, 1024, 1, 1),
    "output_blocks.8.2.in_layers.0.weight": (512,),
    "output_blocks.11.0.skip_connection.weight": (512, 768, 1, 1),
    "output_blocks.11.1.in_layers.2.weight": (512, 512, 3, 3),  # up-resblock, no attention
    "output_blocks.12.0.skip_connection.weight": (256, 768, 1, 1),
    "output_blocks.12.0.emb_layers.1.weight": (512, 1024),
    "output_blocks.14.1.out_layers.3.weight": (256, 256, 3, 3),
    "output_blocks.17.0.skip_connection.weight": (256, 512, 1, 1),
    "out.0.weight": (256,),
    "out.2.weight": (6, 256, 3, 3),
    "out.2.bias": (6,),
}
ADM256_ABSENT = [
    "input_blocks.3.0.op.weight",  # resblock_updown: no conv downsample
    "input_blocks.3.1.qkv.weight",
    "input_blocks.9.1.qkv.weight",  # ds 4: no attention
    "input_blocks.2.0.skip_connection.weight",  # same width: identity skip
    "output_blocks.2.2.conv.weight",
    "output_blocks.11.2.in_layers.0.weight",
    "output_blocks.17.1.in_layers.0.weight",  # last level: no upsample
    "output_blocks.18.0.in_layers.0.weight",
    "input_blocks.18.0.in_layers.0.weight",
    "label_emb.weight",
]


def test_adm256_uncond_parameter_layout():
    with torch.device("meta"):
        model = UNet(PRESETS["adm-256-uncond"])
    sd = model.state_dict()
    assert len(sd) == 566
    assert sum(p.numel() for p in sd.values()) == 552_814_086
    assert next(iter(sd)) == "time_embed.0.weight"
    assert tuple(sd["time_embed.0.weight"].shape) == (1024, 256)
    assert tuple(sd["out.2.weight"].shape) == (6, 256, 3, 3)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    wrong = {k: (v, shapes.get(k)) for k, v in ADM256_TABLE.items() if shapes.get(k) != v}
    assert not wrong, wrong
    assert not [k for k in ADM256_ABSENT if k in shapes]
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks.")) == 17
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("output_blocks.")) == 17
    assert len([k for k in shapes if k.endswith(".qkv.weight")]) == 2 * 3 + 1 + 3 * 3
