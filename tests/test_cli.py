"""`gdp degrade` / `gdp restore` end to end on real photo crops with a tiny saved prior, and the
bad-input contract: exit status 2, exactly one line on stderr, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from gdp.cli import EXIT_BAD_INPUT, main
from gdp.io import read_image, write_image

from conftest import photo

FAST = ["--steps", "3", "--seed", "0", "--device", "cpu"]


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    """(exit status, the JSON line on stdout or None, stderr) of an in-process `gdp` call."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if code == 0 else None), err


def only_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gdp") and "error" in lines[0]
    return lines[0]


@pytest.mark.parametrize("task, degrade_options, obs_shape", [
    ("sr", [], (3, 10, 10)),
    ("deblur", [], (3, 40, 40)),
    ("inpaint", ["--mask-ratio", "0.25", "--mask-seed", "4"], (3, 40, 40)),
    ("colorize", [], (1, 40, 40)),
])
def test_degrade_then_restore(capsys, tmp_path, photo_png, tiny_prior_file, task, degrade_options, obs_shape):
    obs, out = tmp_path / f"{task}-obs.png", tmp_path / f"{task}-out.png"
    code, info, err = run(capsys, "degrade", photo_png, obs, "--task", task, *degrade_options)
    assert code == 0, err
    assert info["task"] == task and info["shape"] == list(obs_shape)
    assert read_image(str(obs)).pixels.shape[1:] == obs_shape
    if task == "inpaint":
        mask = tmp_path / f"{task}-obs.mask.png"
        assert info["mask"] == str(mask) and mask.exists()
        known = read_image(str(mask)).pixels
        assert 0.70 < known.mean().item() < 0.80  # 25 % missing

    # restore finds OBS.mask.png by itself (no mask option given)
    code, info, err = run(capsys, "restore", obs, out, "--task", task, "--prior", tiny_prior_file, *FAST)
    assert code == 0, err
    assert {"task", "output", "steps", "nfe", "seconds", "consistency_psnr"} <= set(info)
    assert info["task"] == task and info["output"] == str(out) and info["steps"] == 3
    assert info["tiling"]["mode"] == "fused" and info["tiling"]["n_patches"] == 4
    assert info["nfe"] == 3 * 4 and info["seconds"] > 0
    assert info["consistency_psnr"] > 20  # the capped paper scale fits the observation
    assert (info["width"], info["height"]) == (40, 40)
    restored = read_image(str(out))
    assert restored.pixels.shape == (1, 3, 40, 40) and restored.bit_depth == 8


def test_module_entry_point_in_a_subprocess(tmp_path, photo_png, tiny_prior_file):
    out = tmp_path / "sub.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gdp", "restore", str(photo_png), str(out), "--task", "deblur",
                           "--prior", str(tiny_prior_file), "--steps", "2", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["nfe"] == 2 * 4 and info["output"] == str(out)
    with Image.open(out) as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_sixteen_bit_gray_in_gives_sixteen_bit_gray_out(capsys, tmp_path, tiny_prior_file):
    gt, obs, out = tmp_path / "gray16.png", tmp_path / "obs16.png", tmp_path / "out16.png"
    write_image(str(gt), photo(32, 32, name="camera", top=100, left=150), bit_depth=16)
    assert run(capsys, "degrade", gt, obs, "--task", "sr", "--factor", "2")[0] == 0
    assert read_image(str(obs)).bit_depth == 16
    code, info, err = run(capsys, "restore", obs, out, "--task", "sr", "--factor", "2",
                          "--prior", tiny_prior_file, *FAST)
    assert code == 0, err
    restored = read_image(str(out))
    assert restored.bit_depth == 16 and restored.pixels.shape == (1, 1, 32, 32)
    with Image.open(out) as im:
        assert im.mode.startswith("I")  # 16-bit grayscale
    assert info["tiling"]["mode"] == "single" and info["nfe"] == 3


def _bad_restore(capsys, tmp_path, obs, *extra) -> str:
    out = tmp_path / "never.png"
    code, _, err = run(capsys, "restore", obs, out, *extra)
    assert code == EXIT_BAD_INPUT
    assert not out.exists() and not list(tmp_path.glob(".never.png.tmp-*"))
    return only_error_line(err)


def test_missing_input(capsys, tmp_path, tiny_prior_file):
    missing = tmp_path / "nope.png"
    line = _bad_restore(capsys, tmp_path, missing, "--task", "sr", "--prior", tiny_prior_file, *FAST)
    assert str(missing) in line
    code, _, err = run(capsys, "degrade", missing, tmp_path / "obs.png", "--task", "sr")
    assert code == EXIT_BAD_INPUT and str(missing) in only_error_line(err)
    assert not (tmp_path / "obs.png").exists()


def test_corrupt_input(capsys, tmp_path, tiny_prior_file):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(os.urandom(2000))
    line = _bad_restore(capsys, tmp_path, corrupt, "--task", "sr", "--prior", tiny_prior_file, *FAST)
    assert str(corrupt) in line


def test_unknown_task_and_option(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "denoise", "--prior", tiny_prior_file)
    assert "denoise" in line and "--task" in line
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--frobnicate", "3")
    assert "--frobnicate" in line
    code, _, err = run(capsys, "unmake", photo_png)
    assert code == EXIT_BAD_INPUT and "unmake" in only_error_line(err)


def test_checkpoint_that_does_not_fit(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file,
                        "--preset", "adm-small-64", *FAST)
    assert str(tiny_prior_file) in line and "does not fit" in line
    missing = tmp_path / "missing.safetensors"
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", missing, *FAST)
    assert str(missing) in line


def test_inpaint_without_any_mask(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "inpaint", "--prior", tiny_prior_file, *FAST)
    assert "mask" in line and "photo.mask.png" in line


def test_bad_numbers(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file, "--steps", "0")
    assert "--steps" in line
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "inpaint", "--box", "1,2,3",
                        "--prior", tiny_prior_file, *FAST)
    assert "--box" in line


def test_refuses_to_overwrite_its_input(capsys, tmp_path, photo_png, tiny_prior_file):
    """Checked only when writing, after sampling: the progress bar has printed by then."""
    before = Path(photo_png).read_bytes()
    code, _, err = run(capsys, "restore", photo_png, photo_png, "--task", "deblur", "--prior", tiny_prior_file,
                       "--steps", "1", "--device", "cpu")
    assert code == EXIT_BAD_INPUT
    last = err.strip().splitlines()[-1]
    assert last.startswith("gdp: error:") and "refusing to overwrite the input" in last
    assert Path(photo_png).read_bytes() == before
