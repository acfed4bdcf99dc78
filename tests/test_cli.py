"""`gdp degrade` / `gdp restore` end to end on real photo crops with a tiny saved prior, and the
bad-input contract: exit status 2, exactly one line on stderr, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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


# --- help texts and early, one-line refusals (issue 19.4, issue 15.8) ---------------------------


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def _option_help(text: str, option: str) -> str:
    """The help of one option: from its name (after the usage line) to the next option's."""
    start = text.index(f" {option} ", text.index(" options: "))
    following = [text.find(" --", start + len(option) + 2)]
    return text[start:min(i for i in following if i > 0)]


def test_restore_help_describes_the_command_and_every_option_with_its_default(capsys):
    from gdp.guidance import DEFAULT_SCALES
    text = _help(capsys, "restore")
    assert "Restore one observation with GDP" in text and "about how long" in text
    assert "(default: 100)" in _option_help(text, "--steps")
    assert "seed" in _option_help(text, "--seed") and "(default: 0)" in _option_help(text, "--seed")
    assert "hierarchical" in _option_help(text, "--tiling") and "(default: auto)" in _option_help(text, "--tiling")
    assert "super-resolution" in _option_help(text, "--task")
    assert "(default: 8)" in _option_help(text, "--batch-size")
    scale = _option_help(text, "--scale")
    for task, value in DEFAULT_SCALES.items():  # every task's default scale, as the library has it
        name = "blind deblur" if task == "blind-deblur" else task
        assert f"{name} {value:.0f}" in scale, (task, scale)
    assert "half the usable cores" in _option_help(text, "--threads")


def test_degrade_help_explains_its_positionals(capsys):
    text = _help(capsys, "degrade")
    assert "CLEAN the clean image (the ground truth) to degrade" in text
    assert "OBS where to write the observation" in text


@pytest.mark.parametrize("option, value, expected", [
    ("--patch", "7", "argument --patch: must be an integer >= 8, got 7"),
    ("--patch", "0", "argument --patch: must be an integer >= 8, got 0"),
    ("--batch-size", "-1", "argument --batch-size: must be an integer >= 1, got -1"),
    ("--scale", "inf", "argument --scale: must be a finite number >= 0, got inf"),
    ("--scale", "nan", "argument --scale: must be a finite number >= 0, got nan"),
    ("--steps", "0", "argument --steps: must be an integer between 1 and 1000, got 0"),
    ("--samples", "0", "argument --samples: must be an integer >= 1, got 0"),
    ("--factor", "0", "argument --factor: must be an integer >= 1, got 0"),
    ("--threads", "0", "argument --threads: must be an integer >= 1, got 0"),
    ("--mask-ratio", "1.5", "argument --mask-ratio: must be a finite number in [0, 1], got 1.5"),
])
def test_bad_numbers_are_refused_in_one_line(capsys, tmp_path, photo_png, tiny_prior_file, option, value, expected):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file, option, value)
    assert expected in line


def test_patch_the_network_cannot_take_is_refused_before_sampling(capsys, tmp_path, photo_png, tiny_prior_file):
    # adm-tiny-32 halves its input once: a 9-pixel patch would fail inside the UNet
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file, "--patch", "9", *FAST)
    assert "--patch 9: this prior's network halves its input 1 times, so the patch must be a multiple of 2" in line
    assert "restore" not in capsys.readouterr().err
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file, "--stride", "40", *FAST)
    assert "--stride 40 is larger than the patch (32 pixels)" in line


def test_unknown_device_is_one_line(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", tiny_prior_file, "--steps", "2",
                        "--device", "banana")
    assert "unknown device 'banana': use auto, cpu, cuda or cuda:N" in line


def test_prior_with_bad_metadata_is_one_line(capsys, tmp_path, photo_png, tiny_prior):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in tiny_prior.unet.state_dict().items()}
    for name, spec in [("notjson", "{not json"), ("nounet", "{}"), ("badkeys", '{"unet": {"colour": 3}}')]:
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata={"gdp_spec": spec})
        line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--prior", path, *FAST)
        assert f"{path}: its gdp_spec metadata does not describe an architecture" in line and "--preset" in line


def test_missing_or_garbage_mask_is_one_line_naming_the_file(capsys, tmp_path, photo_png, tiny_prior_file):
    missing = tmp_path / "missing.png"
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "inpaint", "--mask", missing,
                        "--prior", tiny_prior_file, *FAST)
    assert line == f"gdp: error: {missing}: no such file"
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a mask" * 20)
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "inpaint", "--mask", garbage,
                        "--prior", tiny_prior_file, *FAST)
    assert line == f"gdp: error: {garbage}: not an image (cannot identify image file)"
    kernel = tmp_path / "kernel.npy"
    kernel.write_bytes(b"garbage" * 10)
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "deblur", "--kernel-file", kernel,
                        "--prior", tiny_prior_file, *FAST)
    assert f"{kernel}: not a kernel array (.npy)" in line


def test_unwritable_output_is_refused_before_restoring(capsys, tmp_path, photo_png, tiny_prior_file):
    (tmp_path / "afile").write_text("x")
    for out, problem in [(tmp_path / "afile" / "out.png", f"cannot create it: {tmp_path / 'afile'} is a file"),
                         (tmp_path / "out.xyz", "unknown image format '.xyz'")]:
        code, _, err = run(capsys, "restore", photo_png, out, "--task", "sr", "--prior", tiny_prior_file, *FAST)
        assert code == EXIT_BAD_INPUT and problem in only_error_line(err)  # no plan line, no progress bar


def test_sr_factor_larger_than_the_window_or_the_image_is_explained(capsys, tmp_path, photo_png, tiny_prior_file):
    line = _bad_restore(capsys, tmp_path, photo_png, "--task", "sr", "--factor", "100", "--prior", tiny_prior_file,
                        *FAST)
    assert "the sr factor must be at most 32, got 100" in line
    code, _, err = run(capsys, "degrade", photo_png, tmp_path / "d.png", "--task", "sr", "--factor", "1000")
    line = only_error_line(err)
    assert code == EXIT_BAD_INPUT and "sr factor 1000 is larger than the image (40x40)" in line and "0x0" not in line


def test_restore_says_what_it_will_do_before_the_progress_bar(capsys, tmp_path, photo_png, tiny_prior_file):
    code, info, err = run(capsys, "restore", photo_png, tmp_path / "o.png", "--task", "sr", "--factor", "2",
                          "--prior", tiny_prior_file, *FAST, "--threads", "1")
    assert code == 0, err
    lines = err.strip().splitlines()
    plan = lines[0]
    assert plan.startswith("restore sr x2: 40x40 -> 80x80 (0.0064 MP), fused tiling: 9 windows of 32 px, stride 24; "
                           "3 steps: NFE 27 in 6 network calls of 8 on cpu (1 CPU thread); about ")
    assert info["nfe"] == 27 and info["tiling"]["n_patches"] == 9  # as planned
    bar = [k for k, line in enumerate(lines) if line.startswith("restore ") and "|" in line]
    assert bar and bar[0] > 0  # the progress bar comes after the plan


def test_dpi_and_exif_reach_the_restored_file(capsys, tmp_path, photo_crop, tiny_prior_file):
    """x2 super-resolution doubles the DPI (the same print size); deblurring keeps it. EXIF is carried."""
    exif = Image.Exif()
    exif[0x010F] = "gdp-test"
    obs = tmp_path / "scan.png"
    array = (photo_crop(40, 40, top=40, left=120)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).save(obs, dpi=(300, 300), exif=exif)
    for task, extra, dpi in [("sr", ["--factor", "2"], 600), ("deblur", [], 300)]:
        out = tmp_path / f"{task}.jpg"
        code, info, err = run(capsys, "restore", obs, out, "--task", task, *extra, "--prior", tiny_prior_file, *FAST)
        assert code == 0, err
        assert info["dpi"] == [dpi, dpi]
        with Image.open(out) as im:
            assert im.info["dpi"] == (dpi, dpi) and im.getexif()[0x010F] == "gdp-test"


def test_sixteen_bit_input_into_jpeg_is_written_as_8_bit_with_a_note(capsys, tmp_path, tiny_prior_file):
    gt = tmp_path / "gray16.png"
    write_image(str(gt), photo(32, 32, name="camera", top=100, left=150), bit_depth=16)
    code, info, err = run(capsys, "restore", gt, tmp_path / "out.jpg", "--task", "deblur", "--prior",
                          tiny_prior_file, *FAST)
    assert code == 0, err
    assert read_image(str(tmp_path / "out.jpg")).bit_depth == 8
    assert f"wrote 8-bit: {tmp_path / 'out.jpg'} cannot hold 16 bits" in info["notes"]


def test_threads_default_is_half_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    from gdp.cli import default_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == max(1, cores // 2)
    assert default_threads(devices=cores) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


@pytest.mark.parametrize("data_step, expected", [([], "cg"), (["--data-step", "gradient"], "gradient"),
                                                 (["--data-step", "project"], "project")])
def test_restore_data_step_option_reaches_the_sampler(capsys, tmp_path, photo_png, tiny_prior_file, data_step,
                                                      expected):
    """deblur's default data step is cg; the report says which one ran and with what sigma_y; the
    solved steps fit the observation closer than the capped gradient step of the paper
    (deblur has no closed form: project falls back to cg)."""
    obs = tmp_path / "obs.png"
    assert run(capsys, "degrade", photo_png, obs, "--task", "deblur")[0] == 0
    code, info, err = run(capsys, "restore", obs, tmp_path / "out.png", "--task", "deblur", "--prior",
                          tiny_prior_file, *FAST, *data_step, "--cg-iters", "5")
    code_auto, auto, _ = run(capsys, "restore", obs, tmp_path / "auto.png", "--task", "deblur", "--prior",
                             tiny_prior_file, *FAST, "--steps", "1", "--precision", "auto")
    assert code_auto == 0 and auto["precision"] == ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")
    assert code == 0, err
    assert (info["data_step"], info["sigma_y"]) == (expected, 0.0)
    assert info["precision"] == "fp32"  # the default
    # (a random-weight prior: its x0_hat is far off, and the clip to [0, 1] limits both)
    assert info["consistency_psnr"] > (22 if expected == "gradient" else 26)


def test_restore_warns_when_a_solved_data_step_meets_a_noisy_observation(capsys, tmp_path, photo_png,
                                                                         tiny_prior_file):
    clean, noisy = tmp_path / "clean.png", tmp_path / "noisy.png"
    assert run(capsys, "degrade", photo_png, clean, "--task", "deblur")[0] == 0
    assert run(capsys, "degrade", photo_png, noisy, "--task", "deblur", "--noise", "0.05")[0] == 0
    cases = ((noisy, [], True), (clean, [], False), (noisy, ["--sigma-y", "0.05"], False),
             (noisy, ["--data-step", "gradient"], False))
    for k, (obs, extra, warned) in enumerate(cases):
        code, _, err = run(capsys, "restore", obs, tmp_path / f"out{k}.png", "--task", "deblur", "--prior",
                           tiny_prior_file, "--steps", "1", "--device", "cpu", *extra)
        assert code == 0, err
        line = [ln for ln in err.splitlines() if "looks noisy" in ln]
        assert bool(line) == warned, (obs, extra, err)
        if warned:  # the estimate is close to the true 0.05 and says what to pass
            sigma = float(line[0].split("about ")[1].split()[0])
            assert 0.04 <= sigma <= 0.06 and f"--sigma-y {sigma:.3f}" in line[0]
