"""`python -m flows restore INPUT_URI OUTPUT_URI --task ...` runs the restore-collection flow;
`python -m flows demo` restores the bundled sample collection against a local Prefect server;
`python -m flows train DATA OUT ...` runs the train-prior flow;
`python -m flows evaluate REFERENCE_URI OUT_URI ...` runs the evaluate flow (GDP against baselines).

Which Prefect server: the one at PREFECT_API_URL when it is set (`demo` starts one at 127.0.0.1:4200
and sets it), else a temporary server that Prefect starts for this one run and stops at its end (no
UI). Either way the settings in PROJECT_SETTINGS apply unless the user set them (environment, .env,
prefect.toml, the active profile). Bad parameters are refused before any server starts."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gdp.cli import (UsageError, _add_task_options, _Parser, add_blind_options, add_restore_options, add_threads_option,
                     add_train_options, integer, set_threads, train_config)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
UI = "http://127.0.0.1:4200"
# What a local run needs from Prefect (a user's own value wins). The temporary server's telemetry logs
# an ERROR on a machine without internet, and its heartbeat, writing while the run writes, printed
# about 130 lines of "database is locked" tracebacks on a busy machine; its default 20 s to start
# was too short on a loaded one ("Timed out while attempting to connect to ephemeral Prefect API server").
PROJECT_SETTINGS = {"PREFECT_SERVER_ANALYTICS_ENABLED": False, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": 120}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m flows", description="Run the gdp Prefect flows locally")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("restore", help="restore a collection (restore-collection flow)",
                       description="Restore every image under INPUT_URI into OUTPUT_URI (same relative paths and "
                                   "formats) with the restore-collection flow, and write a Parquet manifest under "
                                   "OUTPUT_URI/_manifests. Talks to the Prefect server at PREFECT_API_URL, or to a "
                                   "temporary one started for this run (no UI).")
    r.add_argument("input_uri", help="folder or fsspec URL of the images (s3://bucket/prefix, ./scans)")
    r.add_argument("output_uri", help="where the restored images and the manifest go")
    _add_task_options(r)
    add_restore_options(r)
    add_blind_options(r, single_image=False)
    r.add_argument("--devices", nargs="+", default=["auto"],
                   help="devices that restore at once, e.g. cuda:0 cuda:1, or cpu cpu for two CPU workers")
    add_threads_option(r)
    r.add_argument("--pattern", default="**/*", help="glob of the images below INPUT_URI")
    r.add_argument("--reference-uri", help="clean images at the same relative paths: PSNR and SSIM in the manifest")
    r.add_argument("--max-images", type=integer(1), help="restore at most this many images (the first, sorted)")
    r.add_argument("--overwrite", action="store_true",
                   help="restore again inputs already done with the same configuration (default: skip them)")
    r.add_argument("--shards", type=integer(1, 1024), default=1,
                   help="N > 1: N child runs of the restore-shard/gpu deployment")
    r.add_argument("--task-runner", choices=["thread", "dask"], default="thread",
                   help="thread: this process; dask: a Dask cluster")
    r.add_argument("--dask-address", help="an existing Dask scheduler (default with dask: a local cluster)")
    r.add_argument("--dask-workers", type=integer(1), default=2, help="worker processes of the local Dask cluster")
    t = sub.add_parser("train", help="train a prior (train-prior flow)")
    t.add_argument("data_uri", help="folder or URL of clean training images")
    t.add_argument("output_uri", help="output folder or URL (checkpoints, prior.safetensors, sample grids)")
    add_train_options(t)
    e = sub.add_parser("evaluate", help="score GDP against classical baselines on clean images (evaluate flow)")
    e.add_argument("reference_uri", help="folder or URL of clean reference images")
    e.add_argument("output_uri", help="where results.parquet, summary.md and the PNGs go")
    e.add_argument("--tasks", nargs="+", choices=["sr", "deblur", "inpaint", "colorize", "lowlight", "hdr"],
                   default=["sr", "deblur", "inpaint", "colorize"])
    e.add_argument("--steps", type=integer(1, 1000), default=50, help="reverse diffusion steps")
    e.add_argument("--prior", default="default", help="default, a checkpoint path or an fsspec URL")
    e.add_argument("--preset", help="architecture of a checkpoint without config (e.g. adm-256-uncond)")
    e.add_argument("--guidance", nargs="+", choices=["x0", "xt"], default=["x0"], help="GDP-x0 and/or GDP-xt")
    e.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    e.add_argument("--max-images", type=integer(1), help="score at most this many reference images")
    e.add_argument("--tiling", choices=["auto", "single", "fused", "hierarchical"], default="auto",
                   help="as gdp restore --tiling")
    e.add_argument("--stride", type=integer(1), help="patch stride (default: 3/4 of the patch)")
    e.add_argument("--batch-size", type=integer(1), default=8, help="patches per network call")
    e.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add_threads_option(e)
    d = sub.add_parser("demo", help="restore the bundled samples (x4 super-resolution) with the default prior")
    d.add_argument("--output-uri", default=str(ROOT / "out" / "demo"), help="where the outputs and manifest go")
    d.add_argument("--steps", type=integer(1, 1000), default=50, help="reverse diffusion steps")
    d.add_argument("--no-server", action="store_true",
                   help="do not start a server: use PREFECT_API_URL, or a temporary one for this run")
    add_threads_option(d)
    return parser


def restore_parameters(args: argparse.Namespace) -> dict:
    options = {"factor": args.factor, "filter": args.filter, "sigma": args.sigma, "kernel_size": args.kernel_size,
               "kernel_file": args.kernel_file, "blur_mode": args.blur_mode, "mask": args.mask or "sidecar",
               "mask_ratio": args.mask_ratio, "mask_seed": args.mask_seed,
               "box": _box(args.box), "kernel_lr": args.kernel_lr,
               "kernel_passes": args.kernel_passes, "grid": args.grid, "target_mean": args.target_mean,
               "lr_f": args.lr_f, "lr_mask": args.lr_mask, "tv_weight": args.tv_weight, "param_init": args.param_init}
    if args.task == "hdr":
        raise UsageError("--task hdr fuses several exposures of one scene: use `gdp restore SHORT ... LONG OUT "
                         "--task hdr`; the collection flow restores one input per output")
    if args.blind and args.task != "deblur":
        raise UsageError("--blind applies to --task deblur only")
    task = "blind-deblur" if args.blind else args.task
    return {"input_uri": args.input_uri, "output_uri": args.output_uri, "task": task, "options": options,
            "prior": args.prior, "preset": args.preset, "steps": args.steps, "seed": args.seed,
            "guidance": args.guidance, "scale": args.scale, "data_step": args.data_step, "sigma_y": args.sigma_y,
            "cg_iters": args.cg_iters, "precision": args.precision, "samples": args.samples, "pattern": args.pattern,
            "tiling": {"mode": args.tiling, "patch": args.patch, "stride": args.stride, "blend": args.blend},
            "batch_size": args.batch_size, "devices": args.devices, "reference_uri": args.reference_uri,
            "max_images": args.max_images, "overwrite": args.overwrite, "shards": args.shards,
            "task_runner": args.task_runner, "dask_address": args.dask_address, "dask_workers": args.dask_workers}


def _box(text: str | None) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",")] if text else None
    except ValueError:
        raise UsageError(f"--box must be X,Y,W,H integers, got {text!r}") from None


def run_restore(parameters: dict) -> int:
    from flows.restore_collection import restore_collection
    from gdp.collection import check_collection
    try:  # a wrong input path, a pattern that matches nothing, output == input: one line, exit 2, nothing made
        check_collection(parameters["input_uri"], parameters["output_uri"], parameters.get("pattern", "**/*"))
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:
        state = restore_collection(**parameters, return_state=True)
    except Exception as e:  # the engine could not record the final state: the API went away mid-run
        if _api_reachable():
            raise
        _exit_without_api(1, f"error: the Prefect API became unreachable during the run ({type(e).__name__}); "
                             f"its outputs and manifest are under {parameters['output_uri']} "
                             "(_manifests/run-<flow run id>.parquet); its final state could not be recorded")
    try:
        manifest = state.result(raise_on_failure=False)
    except Exception:  # a run whose final state never reached the API (its server died): no result here
        manifest = None
    print(f"{state.name}: {state.message}")
    print(f"outputs under {parameters['output_uri']}; manifest {manifest if isinstance(manifest, str) else '(none)'}")
    code = 0 if state.is_completed() else 1
    if not _api_reachable():
        _exit_without_api(code, "the Prefect API is unreachable: this run's outputs and manifest are written; its "
                                "final state and events could not be recorded")
    return code


def _exit_without_api(code: int, message: str) -> None:
    """Exit now: at a normal exit Prefect would try to deliver every queued event to the dead API,
    about 7 s each (minutes for a collection)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _api_reachable() -> bool:
    """Whether the Prefect API this process talks to answers its health check (an ephemeral API: yes)."""
    from prefect.settings import PREFECT_API_URL
    url = PREFECT_API_URL.value()
    if not url:
        return True
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def project_settings():
    """A context with PROJECT_SETTINGS as Prefect's defaults: values the user set anywhere win."""
    from prefect.settings import temporary_settings
    return temporary_settings(set_defaults=PROJECT_SETTINGS)


def server_line() -> str:
    """Which Prefect server this process's runs go to, in one line (UsageError if none can)."""
    from prefect.settings import get_current_settings
    settings = get_current_settings()
    if settings.api.url:
        return f"Prefect: the server at {settings.api.url}"
    if not settings.server.ephemeral.enabled:
        raise UsageError("no Prefect server: PREFECT_API_URL is unset and the temporary server is disabled "
                         "(PREFECT_SERVER_EPHEMERAL_ENABLED=false); set one of them")
    return ("Prefect: a temporary server for this run only (no UI; run history in PREFECT_HOME); for the UI, "
            "`prefect server start` and PREFECT_API_URL=http://127.0.0.1:4200/api")


def check_restore_parameters(parameters: dict, devices: list[str], patch: int | None, stride: int | None) -> None:
    """Refuse bad parameters in one line before any Prefect server starts: the flow's own validation
    (pydantic), the devices, and the prior (loaded here into the process's cache, which the flow
    then reuses) with the patch it can take."""
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError
    from flows.restore_collection import restore_collection
    from gdp import collection as col
    from gdp.cli import check_patch, resolve_device
    with _quiet("prefect.flows"):  # it logs the whole pydantic dump as an ERROR first
        try:
            restore_collection.validate_parameters(parameters)
        except (ParameterTypeError, SignatureMismatchError) as e:
            problems = [line.strip(" -") for line in str(e).splitlines()[1:]] or [str(e)]
            raise UsageError("invalid parameters: " + "; ".join(problems)) from None
    try:
        for device in devices:
            resolve_device(device)
        prior = col.cached_prior(parameters["prior"], parameters["preset"], col.resolve_device(devices[0]))
    except ValueError as e:  # an unknown device, a checkpoint that is missing or does not fit
        raise UsageError(" ".join(str(e).split())) from None
    check_patch(prior, patch, stride)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def ensure_server() -> str:
    """The API URL of a local Prefect server (PREFECT_API_URL's if set), starting one at 127.0.0.1:4200
    in the background if needed, with this process's Prefect settings (PROJECT_SETTINGS included)."""
    from prefect.settings import get_current_settings
    if get_current_settings().api.url:
        return get_current_settings().api.url
    if not _healthy():
        if not _background_server_alive():
            print(f"starting a local Prefect server at {UI} (stop it with `prefect server stop`)", flush=True)
            prefect = Path(sys.executable).with_name("prefect")
            env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
            started = subprocess.run([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", "4200",
                                      "--background"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
            if started.returncode:
                raise RuntimeError(f"could not start a Prefect server at {UI}: "
                                   f"{' '.join(started.stderr.split())[-300:] or 'no message'}")
        deadline = time.time() + 90
        while not _healthy():
            if time.time() > deadline:
                raise RuntimeError(f"the Prefect server at {UI} did not become healthy in 90 s")
            time.sleep(1)
    os.environ["PREFECT_API_URL"] = f"{UI}/api"  # for child processes
    return f"{UI}/api"


def _background_server_alive() -> bool:
    """Whether `prefect server start --background` has a live server process (which may still be
    starting). A PID file left by a server that is gone (machine restarted, process killed) would
    make Prefect refuse to start a new one: it is removed here."""
    from prefect.settings import PREFECT_HOME
    pid_file = Path(PREFECT_HOME.value()) / "server.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        print(f"removing {pid_file}: its server (process {pid}) is gone", flush=True)
        pid_file.unlink(missing_ok=True)
        return False
    except PermissionError:  # alive, another user's
        return True


def _healthy() -> bool:
    try:
        with urllib.request.urlopen(f"{UI}/api/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def run_demo(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    server = contextlib.nullcontext()
    if not args.no_server:
        server = temporary_settings(updates={PREFECT_API_URL: ensure_server()})
        print(f"Prefect UI: {UI}  (flow runs, task runs and artifacts of this demo)", flush=True)
    parameters = {"input_uri": str(EXAMPLES / "sr-x4"), "output_uri": args.output_uri, "task": "sr",
                  "options": {"factor": 4}, "steps": args.steps, "reference_uri": str(EXAMPLES / "reference"),
                  "overwrite": True}
    with server:
        print(server_line(), flush=True)
        code = run_restore(parameters)
    import pandas as pd
    manifests = sorted(Path(args.output_uri, "_manifests").glob("*.parquet"), key=os.path.getmtime)
    df = pd.read_parquet(manifests[-1])
    print(df[["source_uri", "status", "width", "height", "nfe", "seconds", "consistency_psnr", "psnr", "ssim"]]
          .to_string(index=False))
    if not args.no_server:
        print(f"\nSee the run in the Prefect UI: {UI}/runs")
    return code


def run_evaluate(args: argparse.Namespace) -> int:
    from gdp.baselines import missing_requirements
    missing = missing_requirements(args.tasks)
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if missing:
        raise UsageError("; ".join(missing))
    from flows.evaluate import evaluate
    state = evaluate(reference_uri=args.reference_uri, output_uri=args.output_uri, tasks=args.tasks, steps=args.steps,
                     prior=args.prior, preset=args.preset, guidance=args.guidance, seed=args.seed,
                     max_images=args.max_images, tiling=args.tiling, stride=args.stride, batch_size=args.batch_size,
                     device=args.device, return_state=True)
    if not state.is_completed():
        print(f"{state.name}: {state.message}", file=sys.stderr)
        return 1
    parquet = state.result()
    import fsspec
    with fsspec.open(parquet.rsplit("/", 1)[0] + "/summary.md", "r") as f:
        print(f.read())
    print(f"results: {parquet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        with project_settings():
            return _run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "ephemeral Prefect API server" not in str(e):
            raise
        from prefect.settings import get_current_settings
        timeout = get_current_settings().server.ephemeral.startup_timeout_seconds
        print(f"error: {e} (after {timeout:g} s; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or start a "
              "server with `prefect server start` and set PREFECT_API_URL)", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    devices = len(args.devices) if args.command == "restore" else 1
    threads = set_threads(args.threads, devices) if hasattr(args, "threads") else None
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # Dask or process workers started from here
    if args.command == "restore":
        parameters = restore_parameters(args)
        check_restore_parameters(parameters, args.devices, args.patch, args.stride)
        print(server_line(), flush=True)
        return run_restore(parameters)
    if args.command == "demo":
        return run_demo(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "train":
        from flows.train_prior import train_prior
        print(train_prior(**train_parameters(args)))
        return 0
    return 2


def train_parameters(args: argparse.Namespace) -> dict:
    """The train-prior flow's parameters from the parsed `train` options: every flow parameter is
    read off the library's TrainConfig by name (so a CLI option cannot silently stay at the flow's
    default, as --gray-weight once did)."""
    import dataclasses
    from flows.train_prior import train_prior
    cfg = dataclasses.asdict(train_config(args, args.data_uri, args.output_uri))
    cfg.update(output_uri=cfg.pop("out_uri"), exclude=list(cfg["exclude"]), max_minutes=args.max_minutes)
    return {name: cfg[name] for name in inspect.signature(train_prior.fn).parameters}


if __name__ == "__main__":
    sys.exit(main())
