"""Training: data loading and skips, checkpoints, exact resumption, and the hybrid-loss helpers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from gdp.io import write_image
from gdp.prior.checkpoint import load_prior
from gdp.train import DataError, TrainConfig, discretized_gaussian_nll, normal_kl, train

from conftest import photo


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """3 real photos (40x44), one too small (20x20) and one corrupt file."""
    d = tmp_path_factory.mktemp("data")
    for k, name in enumerate(("astronaut", "coffee", "chelsea")):
        write_image(str(d / f"photo{k}.png"), photo(40, 44, name=name))
    write_image(str(d / "small.png"), photo(20, 20))
    (d / "corrupt.png").write_bytes(os.urandom(500))
    return d


def _config(data_dir: Path, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(data_uri=str(data_dir), out_uri=str(out), preset="adm-tiny-32", crop=32, batch_size=2,
                       steps=steps, checkpoint_every=2, grid_size=1, grid_steps=2, device="cpu", seed=0)


def _ckpt(out: Path) -> dict:
    return torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for k, (u, v) in enumerate(zip(a, b)):
            _assert_same_tensors(u, v, f"{where}/{k}")
    else:
        assert a == b, where


def test_train_checkpoints_and_resumes_exactly(data_dir, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    logs: list[str] = []
    first = train(_config(data_dir, resumed, 4), log=logs.append)
    assert first.steps == 4 and len(first.skipped_files) == 2
    reasons = " | ".join(first.skipped_files)
    assert "corrupt.png" in reasons and "small.png: 20x20 is smaller than the crop size 32" in reasons
    assert "training on 3 images (2 skipped) on cpu" in logs
    for name in ("ckpt.pt", "prior.safetensors", "history.json", "samples-0000002.png", "samples-0000004.png"):
        assert (resumed / name).exists(), name
    with Image.open(resumed / "samples-0000004.png") as grid:
        assert grid.size == (34, 34)  # one 32-px sample with a 1-px border
    ckpt = _ckpt(resumed)
    assert ckpt["step"] == 4 and ckpt["opt"]["state"][0]["step"].item() == 4
    assert math.isfinite(first.final_loss)

    logs.clear()
    second = train(_config(data_dir, resumed, 6), log=logs.append)
    assert second.steps == 6 and any(m.endswith("at step 4") and m.startswith("resumed from") for m in logs)
    after = _ckpt(resumed)
    assert after["step"] == 6 and after["opt"]["state"][0]["step"].item() == 6  # optimiser state restored
    assert [row[0] for row in after["history"]] == [1, 2, 3, 4, 5, 6]
    assert len(json.loads((resumed / "history.json").read_text())) == 6

    train(_config(data_dir, straight, 6), log=lambda m: None)
    reference = _ckpt(straight)
    for key in ("model", "ema", "opt", "rng", "history", "step"):
        _assert_same_tensors(after[key], reference[key], key)
    assert (resumed / "samples-0000006.png").read_bytes() == (straight / "samples-0000006.png").read_bytes()

    prior = load_prior(str(resumed / "prior.safetensors"))
    assert prior.image_size == 32 and prior.spec.unet.learn_sigma and prior.extra["train_steps"] == "6"
    assert torch.equal(prior.unet.state_dict()["out.2.weight"], after["ema"]["out.2.weight"])


def test_resume_refuses_another_configuration(data_dir, tmp_path):
    train(_config(data_dir, tmp_path, 2), log=lambda m: None)
    other = replace(_config(data_dir, tmp_path, 4), learn_sigma=False)
    with pytest.raises(DataError, match="different preset/config"):
        train(other, log=lambda m: None)


def test_no_usable_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"empty: no images found \(looked for \.png"):
        train(_config(empty, tmp_path / "out", 2), log=lambda m: None)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.png").write_bytes(os.urandom(300))
    write_image(str(bad / "tiny.png"), photo(8, 8))
    with pytest.raises(DataError, match="none of the 2 files is usable"):
        train(_config(bad, tmp_path / "out", 2), log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_normal_kl():
    m = torch.randn(5, generator=torch.Generator().manual_seed(0))
    lv = torch.randn(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(normal_kl(m, lv, m, lv), torch.zeros(5))
    # KL(N(0, 1) || N(1, e^2)) = log(e) + (1 + 1) / (2 e^2) - 1/2
    got = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(2.0))
    assert got.item() == pytest.approx(1 + 1 / math.exp(2) - 0.5, rel=1e-6)


@pytest.mark.parametrize("mean, log_scale", [(0.1, math.log(0.05)), (-0.97, math.log(0.02)), (0.6, math.log(0.5))])
def test_discretized_gaussian_nll_is_a_distribution_over_256_levels(mean, log_scale):
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    nll = discretized_gaussian_nll(levels, torch.full_like(levels, mean), torch.full_like(levels, log_scale))
    assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-6)
    # interior bins agree with the exact Gaussian mass (the tanh CDF approximation is good to ~1e-4)
    exact = lambda v: 0.5 * (1 + math.erf((v - mean) / (math.exp(log_scale) * math.sqrt(2))))  # noqa: E731
    k = int(round((mean + 1) * 127.5))
    k = min(max(k, 1), 254)
    mass = exact(levels[k].item() + 1 / 255) - exact(levels[k].item() - 1 / 255)
    assert math.exp(-nll[k].item()) == pytest.approx(mass, abs=5e-4)


def test_gray_weight_draws_colour_images_more_often():
    """`gray_weight` is a sampling weight per source: 0 never draws the grayscale image, 1 is uniform."""
    from gdp.train import is_gray, random_crops
    colour = photo(40, 40, name="astronaut")[0] * 2 - 1
    gray = colour.mean(0, keepdim=True).expand(3, -1, -1).contiguous()
    assert is_gray(gray) and not is_gray(colour)
    g = torch.Generator().manual_seed(0)
    crops = random_crops([gray, colour], 200, 16, 0.5, g, torch.tensor([0.0, 1.0]))
    chroma = (crops - crops.mean(1, keepdim=True)).abs().flatten(1).amax(1)
    assert (chroma > 1e-3).all()  # every crop came from the colour image
    crops = random_crops([gray, colour], 400, 16, 0.5, g, torch.tensor([0.25, 1.0]))
    share = ((crops - crops.mean(1, keepdim=True)).abs().flatten(1).amax(1) < 1e-6).float().mean().item()
    assert 0.12 < share < 0.28  # expected 0.25 / 1.25 = 0.2


def test_gray_weight_rejects_a_negative_weight(data_dir, tmp_path):
    with pytest.raises(DataError, match="gray_weight"):
        train(replace(_config(data_dir, tmp_path / "run", 1), gray_weight=-1.0), log=lambda m: None)


def test_training_precision_rules():
    from gdp.train import training_bf16
    cpu = torch.device("cpu")
    assert training_bf16("fp32", cpu) is False and training_bf16("bf16", cpu) is True
    assert training_bf16("auto", torch.device("cuda")) is True
    assert training_bf16("auto", cpu) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    with pytest.raises(DataError, match="unknown precision"):
        training_bf16("fp8", cpu)


def test_bf16_training_step_tracks_fp32(data_dir, tmp_path):
    """Three steps from the same seed in bf16 autocast and in fp32 give losses within 5%."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = replace(_config(data_dir, tmp_path / precision, 3), precision=precision, grid_size=0)
        losses[precision] = train(cfg, log=lambda _: None).final_loss
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
