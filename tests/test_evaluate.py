"""Evaluation (gdp.evaluate, gdp.baselines): rows, baselines recomputed independently, report,
PNGs; Richardson-Lucy on a real photo; LPIPS and scikit-image detection."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gdp import evaluate as ev
from gdp.baselines import BASELINES, EvalCase, missing_requirements, richardson_lucy
from gdp.metrics import psnr
from gdp.operators import degrade, make_operator

TASKS = ["sr", "deblur", "inpaint", "colorize"]


def np_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(1.0 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def levels(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> 8-bit levels / 255 (what the evaluation scores)."""
    return np.round(np.clip(x, 0, 1) * 255) / 255


@pytest.fixture(scope="module")
def evaluated(tiny_prior, tmp_path_factory):
    """Two 32x32 photo crops x four tasks, GDP-x0 at 2 steps with the tiny prior."""
    from conftest import photo
    out = tmp_path_factory.mktemp("eval")
    refs = {"astro": photo(32, 32, top=40, left=120), "coffee": photo(32, 32, name="coffee", top=40, left=160)}
    rows = []
    for name, x in refs.items():
        rows += ev.evaluate_image(x, name, tiny_prior, tasks=TASKS, steps=2, seed=0, out_uri=str(out))
    parquet, report = ev.write_results(rows, str(out), ["LPIPS skipped: test"])
    return refs, pd.read_parquet(parquet), open(report).read(), out


def test_one_row_per_image_task_and_method(evaluated, tiny_prior):
    _, df, _, out = evaluated
    methods = {task: sorted(["gdp-x0", *BASELINES[task]]) for task in TASKS}
    assert len(df) == 2 * sum(len(m) for m in methods.values()) == 16
    assert list(df.columns) == ev.COLUMNS
    for (image, task), group in df.groupby(["image", "task"]):
        assert sorted(group.method) == methods[task], (image, task)
    assert set(df.prior_id) == {tiny_prior.prior_id}
    for row in df.itertuples():  # every output saved as an 8-bit PNG of the reference's size
        with Image.open(row.output) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    assert (out / "images/astro/sr/observation.png").exists()


def test_gdp_rows(evaluated):
    _, df, _, _ = evaluated
    gdp = df[df.method == "gdp-x0"]
    assert len(gdp) == 8 and set(gdp.steps) == {2} and set(gdp.nfe) == {2}  # 32 px = one patch: NFE = steps
    assert np.isfinite(gdp.psnr).all() and (gdp.psnr > 5).all() and (gdp.ssim.abs() <= 1).all()
    assert (gdp.seconds > 0).all() and gdp.lpips.isna().all()
    # consistency: finite, except that inpainting may reproduce every known pixel exactly (the
    # per-step cap applies a full correction), which is +inf dB
    assert np.isfinite(gdp[gdp.task != "inpaint"].consistency_psnr).all()
    assert (gdp.consistency_psnr > 10).all()


def test_baselines_match_an_independent_computation(evaluated):
    refs, df, _, _ = evaluated
    for name, x in refs.items():
        rgb = x[0].permute(1, 2, 0).numpy().astype(np.float64)  # [H, W, 3] in [0, 1]
        rows = df[df.image == name].set_index("method")
        # sr: 4x4 block means on the 0-255 scale, truncated (the paper's uint8 cast), bicubic up
        low = np.floor(rgb.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)) * 255 + 1e-3) / 255
        up = F.interpolate(torch.from_numpy(low).permute(2, 0, 1)[None], size=(32, 32), mode="bicubic",
                           align_corners=False)[0].permute(1, 2, 0).numpy()
        assert rows.loc["bicubic", "psnr"] == pytest.approx(np_psnr(levels(up), rgb), abs=2e-3)
        # colorize: the truncated channel mean in every channel
        gray = np.floor(rgb.mean(axis=2, keepdims=True) * 255 + 1e-3) / 255
        assert rows.loc["gray", "psnr"] == pytest.approx(np_psnr(np.repeat(gray, 3, axis=2), rgb), abs=2e-3)
        # inpaint: biharmonic keeps every known pixel, so its consistency is exact
        assert rows.loc["biharmonic", "consistency_psnr"] == math.inf
        assert rows.loc["biharmonic", "psnr"] > np_psnr(np.zeros_like(rgb), rgb) + 10
        assert (rows.loc[list(rows.index.difference(["gdp-x0"])), "nfe"] == 0).all()


def test_report_has_a_line_per_task_and_method_and_every_comparison(evaluated):
    _, df, report, _ = evaluated
    means_part, comparison_part = report.split("## GDP against each baseline")
    assert "- LPIPS skipped: test" in means_part
    for (task, method), group in df.groupby(["task", "method"]):
        lines = [l for l in means_part.splitlines() if l.startswith(f"| {task} | {method} |")]
        assert len(lines) == 1, (task, method)
        assert f"| {group.psnr.mean():.2f} |" in lines[0]
    for task in TASKS:
        (baseline,) = BASELINES[task]
        d = df[(df.task == task) & (df.method == "gdp-x0")].psnr.mean() - df[(df.task == task) &
                                                                              (df.method == baseline)].psnr.mean()
        line = f"| {task} | gdp-x0 | {baseline} | {d:+.2f} |"
        assert line in comparison_part and ("| win |" if d > 0 else "| lose |") in comparison_part.split(line)[1]


def test_richardson_lucy_sharpens_a_blurred_photo(photo_crop):
    """The paper's 9x9 kernel on a real photo: RL (50 iterations) gains > 1.5 dB over the blurred
    image (measured 24.55 -> 26.68 dB), and the 'valid' observation, 8 px smaller, is restored
    about as well (26.33 dB): A^T 1 handles the missing border."""
    x = photo_crop(64, 64, name="coffee", top=40, left=180, step=2)
    same = make_operator("deblur")
    y = degrade(x, same)
    rl = richardson_lucy(EvalCase(same, y, tuple(x.shape)))
    assert rl.shape == x.shape and 0 <= rl.min() and rl.max() <= 1
    gain = (psnr(rl, x) - psnr(y, x)).item()
    assert gain > 1.5
    valid = make_operator("deblur", mode="valid")
    y_valid = degrade(x, valid)
    assert y_valid.shape[-1] == 56
    rl_valid = richardson_lucy(EvalCase(valid, y_valid, tuple(x.shape)))
    assert psnr(rl_valid, x).item() > psnr(rl, x).item() - 0.6


def test_lpips_skipped_cleanly_without_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    scorer, note = ev.lpips_scorer()
    assert scorer is None and note.startswith("LPIPS skipped: ")


def test_missing_scikit_image_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    import flows.__main__ as cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    assert missing_requirements(["sr", "deblur", "colorize"]) == []
    (message,) = missing_requirements(["sr", "inpaint"])
    assert "biharmonic" in message and "gdp[eval]" in message
    assert cli.main(["evaluate", str(tmp_path), str(tmp_path / "out"), "--tasks", "inpaint"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gdp[eval]" in err
    assert not (tmp_path / "out").exists()


def test_a_new_task_is_one_protocol_line_and_one_baselines_entry(monkeypatch, tiny_prior, photo_crop):
    from gdp.baselines import Baseline, bicubic

    def sr2(x: torch.Tensor, generator: torch.Generator) -> EvalCase:  # synthesised by a function
        op = make_operator("sr", factor=2)
        return EvalCase(op, degrade(x, op), tuple(x.shape), x)
    monkeypatch.setitem(ev.PROTOCOL, "sr2", sr2)
    monkeypatch.setitem(BASELINES, "sr2", {"bicubic": Baseline(bicubic),
                                           "oracle": Baseline(lambda case: case.reference)})
    rows = ev.evaluate_image(photo_crop(32, 32), "p", tiny_prior, tasks=["sr2"], steps=1, guidance=())
    assert [(r["task"], r["method"]) for r in rows] == [("sr2", "bicubic"), ("sr2", "oracle")]
    assert rows[1]["psnr"] == math.inf and 15 < rows[0]["psnr"] < 60


def test_blind_tasks_lowlight_and_hdr(tiny_prior, photo_crop, tmp_path):
    """Low light (gain, histogram equalisation, CLAHE) and HDR (each exposure as shot) against GDP:
    baselines recomputed here; a baseline estimates no parameters, so its consistency is NaN, and
    GDP's is measured with its own estimate."""
    from skimage import exposure as skx

    from gdp.operators import exposure_bracket, low_light
    x = photo_crop(32, 32)
    rows = ev.evaluate_image(x, "p", tiny_prior, tasks=["lowlight", "hdr"], steps=2, out_uri=str(tmp_path))
    got = {(r["task"], r["method"]): r for r in rows}
    assert sorted(got) == [("hdr", "exposure-1"), ("hdr", "exposure-2"), ("hdr", "gdp-x0"),
                           ("lowlight", "clahe"), ("lowlight", "gain"), ("lowlight", "gdp-x0"),
                           ("lowlight", "histeq")]
    ref = x.numpy()[0].transpose(1, 2, 0)
    y = low_light(x, gain=0.15, noise=0.01, generator=torch.Generator().manual_seed(0)).numpy()[0].transpose(1, 2, 0)
    expected = {"gain": y * (0.45 / y.mean()), "histeq": skx.equalize_hist(y.astype(np.float64)),
                "clahe": skx.equalize_adapthist(y.astype(np.float64), clip_limit=0.01)}
    for name, image in expected.items():
        assert got[("lowlight", name)]["psnr"] == pytest.approx(np_psnr(levels(image), ref), abs=0.02), name
        assert math.isnan(got[("lowlight", name)]["consistency_psnr"])
    shots = exposure_bracket(x, (0.3, 3.0), noise=0.02, generator=torch.Generator().manual_seed(0))
    for k, shot in enumerate(shots):
        row = got[("hdr", f"exposure-{k + 1}")]
        assert row["psnr"] == pytest.approx(np_psnr(levels(shot.numpy()[0].transpose(1, 2, 0)), ref), abs=0.02)
        assert (tmp_path / "images/p/hdr" / f"observation-{k + 1}.png").exists()
    for task in ("lowlight", "hdr"):
        gdp = got[(task, "gdp-x0")]
        assert gdp["nfe"] == 2 and 5 < gdp["consistency_psnr"] < 200 and 3 < gdp["psnr"] < 60
