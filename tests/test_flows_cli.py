"""`python -m flows` as a user runs it: without CI's environment (no PREFECT_* variables, a fresh
PREFECT_HOME), against the real temporary server Prefect starts when PREFECT_API_URL is unset; its
help texts, and bad parameters refused in one line before any server starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.__main__ import PROJECT_SETTINGS, build_parser, restore_parameters

ROOT = Path(__file__).resolve().parent.parent


def user_env(home: Path, **extra: str) -> dict:
    """The environment of a new user: this one without any PREFECT_* variable (CI sets some), a
    fresh PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_HOME": str(home), **extra}


def flows(*argv, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_a_collection_run_on_the_temporary_server_prints_no_errors(tmp_path, photo_png, tiny_prior_file):
    """Issue 19.2: every such run printed an ERROR from the server's telemetry (no internet here) and,
    on a busy machine, ~130 lines of 'database is locked' tracebacks; re-runs that skip everything too."""
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "a.png").write_bytes(photo_png.read_bytes())
    env = user_env(tmp_path / "prefect-home")
    args = ["restore", scans, tmp_path / "out", "--task", "sr", "--factor", "2", "--prior", tiny_prior_file,
            "--steps", "2", "--devices", "cpu"]
    for run, status in [(1, "ok"), (2, "skipped")]:
        proc = flows(*args, env=env)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output
        assert "Prefect: a temporary server for this run only" in proc.stdout
        assert "Starting temporary server" in output  # it really ran on one
        for noise in ("ERROR", "Traceback", "database is locked", "Failed to send telemetry"):
            assert noise not in output, (run, output)
        manifests = sorted((tmp_path / "out" / "_manifests").glob("run-*.parquet"), key=os.path.getmtime)
        assert len(manifests) == run
        assert pd.read_parquet(manifests[-1])["status"].tolist() == [status]
    assert (tmp_path / "out" / "a.png").exists()


def test_the_project_settings_apply_unless_the_user_set_them(tmp_path):
    script = ("from flows.__main__ import project_settings\n"
              "from prefect.settings import get_current_settings\n"
              "import json\n"
              "with project_settings():\n"
              "    s = get_current_settings()\n"
              "    env = s.to_environment_variables(exclude_unset=True)\n"
              "    print(json.dumps([s.server.analytics_enabled, s.server.ephemeral.startup_timeout_seconds,\n"
              "                      env['PREFECT_SERVER_ANALYTICS_ENABLED']]))\n")

    def settings(env: dict) -> list:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert PROJECT_SETTINGS["PREFECT_SERVER_ANALYTICS_ENABLED"] is False
    # nothing set: the project's values (also what the temporary server process is given)
    assert settings(user_env(tmp_path / "a")) == [False, 120, "False"]
    # the user's environment and the user's profile win
    home = tmp_path / "b"
    home.mkdir()
    (home / "profiles.toml").write_text('active = "mine"\n[profiles.mine]\nPREFECT_SERVER_ANALYTICS_ENABLED = "true"\n')
    assert settings(user_env(home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="7")) == [True, 7, "True"]


@pytest.mark.parametrize("bad, message", [
    (["--steps", "0"], "argument --steps: must be an integer between 1 and 1000, got 0"),
    (["--devices", "banana"], "unknown device 'banana': use auto, cpu, cuda or cuda:N"),
    (["--patch", "9"], "--patch 9: this prior's network halves its input 1 times"),
])
def test_bad_parameters_are_refused_in_one_line_before_any_server_starts(tmp_path, photo_png, tiny_prior_file,
                                                                         bad, message):
    """Issue 19.4 / 15.8: `--steps 0` was refused after the temporary server had started, with a pydantic
    dump and exit 1 (and a Failed run on the server)."""
    home = tmp_path / "prefect-home"
    proc = flows("restore", photo_png.parent, tmp_path / "out", "--task", "sr", "--prior", tiny_prior_file, *bad,
                 env=user_env(home))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr
    assert "server" not in proc.stdout + proc.stderr.replace("(see --help)", "")
    assert not (home / "prefect.db").exists() and not (tmp_path / "out").exists()


def test_the_flows_own_validation_is_one_line(tiny_prior_file):
    """What only the flow's pydantic model knows (here its bounds on a nested option) is also refused
    in one line, by `check_restore_parameters`, which needs no server."""
    from flows.__main__ import check_restore_parameters
    from gdp.cli import UsageError
    parameters = {"input_uri": "in", "output_uri": "out", "task": "sr", "options": {"factor": 0},
                  "prior": str(tiny_prior_file), "preset": None, "tiling": {"patch": 4}}
    with pytest.raises(UsageError) as error:
        check_restore_parameters(parameters, ["cpu"], None, None)
    assert str(error.value) == ("invalid parameters: options.factor: Input should be greater than or equal to 1; "
                                "tiling.patch: Input should be greater than or equal to 8")


def _help(*command) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    return " ".join(sub.format_help().split())


def test_flows_restore_help_explains_every_option():
    text = _help("restore")
    assert "Restore every image under INPUT_URI into OUTPUT_URI" in text and "PREFECT_API_URL" in text
    for option, words in [("--pattern", "glob of the images"), ("--reference-uri", "PSNR and SSIM"),
                          ("--max-images", "at most this many"), ("--overwrite", "restore again"),
                          ("--devices", "devices that restore at once"), ("--grid", "control values"),
                          ("--lr-f", "step on the gain"), ("--target-mean", "brightness"),
                          ("--param-init", "random init"), ("--threads", "split over the devices")]:
        start = text.index(f" {option} ", text.index(" options: "))
        assert words in text[start:start + 250], option
    assert "(default: 100)" in text[text.index(" --steps ", text.index(" options: ")):][:120]


def test_blind_options_reach_the_flow_parameters():
    args = build_parser().parse_args(["restore", "in", "out", "--task", "lowlight", "--grid", "4", "--lr-f", "0.5",
                                      "--target-mean", "0.3", "--param-init", "reference", "--tv-weight", "2"])
    options = restore_parameters(args)["options"]
    assert (options["grid"], options["lr_f"], options["target_mean"], options["param_init"], options["tv_weight"]) \
        == (4, 0.5, 0.3, "reference", 2.0)


def test_data_step_options_reach_the_flow_and_its_settings():
    """--data-step, --sigma-y and --cg-iters go from `python -m flows restore` into the flow's
    parameters, its typed form, the Settings that build the guidance, and the skip key."""
    from gdp import collection as col
    from gdp.restore import default_guidance

    args = build_parser().parse_args(["restore", "in", "out", "--task", "deblur", "--data-step", "cg",
                                      "--sigma-y", "0.05", "--cg-iters", "7", "--precision", "auto"])
    p = restore_parameters(args)
    assert (p["data_step"], p["sigma_y"], p["cg_iters"], p["precision"]) == ("cg", 0.05, 7, "auto")
    settings = col.Settings(task="deblur", data_step=p["data_step"], sigma_y=p["sigma_y"], cg_iters=p["cg_iters"],
                            precision=p["precision"])
    g = col._guidance(settings)
    assert (g.data_step, g.sigma_y, g.cg_iters) == ("cg", 0.05, 7)
    assert settings.config_hash("p") != col.Settings(task="deblur").config_hash("p")
    defaults = restore_parameters(build_parser().parse_args(["restore", "in", "out", "--task", "sr"]))
    assert (defaults["data_step"], defaults["sigma_y"], defaults["cg_iters"], defaults["precision"]) == \
        ("auto", 0.0, None, "fp32")
    assert col._guidance(col.Settings(task="sr")).data_step == default_guidance("sr").data_step == "project"
    with pytest.raises(ValueError, match="sigma-y"):  # the CLI's UsageError: one line, exit 2
        build_parser().parse_args(["restore", "in", "out", "--task", "sr", "--sigma-y", "2"])


def test_every_train_option_reaches_the_train_flow():
    """--gray-weight used to stay at the flow's 1.0; every parameter of train-prior is now read off
    the parsed options (TrainConfig), so each CLI value below must arrive as given."""
    import inspect

    from flows.__main__ import train_parameters
    from flows.train_prior import train_prior

    given = {"--preset": "adm-tiny-32", "--crop": "32", "--steps": "7", "--batch-size": "3", "--lr": "0.001",
             "--checkpoint-every": "5", "--schedule": "cosine", "--exclude": "a.png", "--gray-weight": "0.2",
             "--max-minutes": "4", "--init": "old.safetensors", "--device": "cpu", "--seed": "9",
             "--precision": "fp32"}
    argv = ["train", "data", "out", "--fixed-sigma"] + [v for kv in given.items() for v in kv]
    p = train_parameters(build_parser().parse_args(argv))
    assert set(p) == set(inspect.signature(train_prior.fn).parameters)
    assert p == {"data_uri": "data", "output_uri": "out", "preset": "adm-tiny-32", "crop": 32, "steps": 7,
                 "batch_size": 3, "lr": 0.001, "checkpoint_every": 5, "schedule": "cosine", "learn_sigma": False,
                 "exclude": ["a.png"], "gray_weight": 0.2, "max_minutes": 4.0, "init_from": "old.safetensors",
                 "device": "cpu", "seed": 9, "precision": "fp32"}
