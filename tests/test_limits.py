"""gdp.limits and the prior's architecture check: limits checked before anything large is allocated."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from gdp import limits
from gdp.io import ImageError
from gdp.prior.checkpoint import CheckpointError, PriorSpec, build_prior, load_prior, save_prior


def test_estimate_follows_the_measured_memory():
    # docs/BENCHMARKS.md: hierarchical 3.86 GiB at 64 MP (0.9 GiB of it the fixed part), fused 2.77 GiB at 16 MP
    hierarchical = limits.estimate_bytes(2000, 2000, 8000, 8000, "hierarchical")
    assert 2.96 * 2**30 < hierarchical < 3.8 * 2**30
    fused = limits.estimate_bytes(1000, 1000, 4000, 4000, "fused")
    assert 1.87 * 2**30 < fused < 2.4 * 2**30
    assert limits.estimate_bytes(16, 16, 32, 32, "single") < 300 << 20
    assert limits.auto_mode(2000, 2000) == "fused" and limits.auto_mode(2001, 2000) == "hierarchical"
    assert limits.auto_mode(100, 100, "hierarchical") == "hierarchical"


def test_check_size_refuses_big_outputs_in_one_line():
    with pytest.raises(ImageError) as e:
        limits.check_size("s3://b/a.png", 9000, 9000, 36000, 36000, "hierarchical")
    assert str(e.value) == ("s3://b/a.png: its output would be 36000x36000 (1296.0 MP), above the limit of 100 MP "
                            "(max_output_megapixels)")
    with pytest.raises(ImageError, match="above the limit of 0.5 MP"):
        limits.check_size("a.png", 500, 500, 1000, 1000, "fused", max_output_megapixels=0.5)
    assert limits.check_size("a.png", 16, 16, 32, 32, "single") == limits.estimate_bytes(16, 16, 32, 32, "single")
    room = limits.available_bytes()
    assert room is None or room > 0
    with pytest.raises(ImageError, match=r"needs about \d+\.\d GiB and this process can get"):
        limits.check_memory("a.png", 1 << 62, "huge")


def test_a_prior_must_hold_every_weight_of_the_network_it_declares(tmp_path):
    spec = {**PriorSpec.from_preset("adm-256-uncond").to_dict(), "preset": None}
    spec["unet"] = {**spec["unet"], "model_channels": 2048}
    path = tmp_path / "huge.safetensors"
    path.write_bytes(save({"x": torch.zeros(1)}, metadata={"gdp_spec": json.dumps(spec)}))
    with pytest.raises(CheckpointError, match="does not fit the architecture; missing keys"):
        load_prior(str(path))
    for key, value in (("num_res_blocks", 10**6), ("channel_mult", [1] * 100), ("image_size", 0)):
        spec["unet"] = {**PriorSpec.from_preset("adm-tiny-32").to_dict()["unet"], key: value}
        path.write_bytes(save({"x": torch.zeros(1)}, metadata={"gdp_spec": json.dumps(spec)}))
        with pytest.raises(CheckpointError, match="outside 1\\.\\."):
            load_prior(str(path))
    tiny = PriorSpec.from_preset("adm-tiny-32")
    save_prior(str(tmp_path / "ok.safetensors"), build_prior(tiny), tiny)  # a real prior still loads
    assert load_prior(str(tmp_path / "ok.safetensors")).spec == tiny
