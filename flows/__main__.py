"""`python -m flows restore INPUT_URI OUTPUT_URI --task ...` runs the restore-collection flow;
`python -m flows demo` restores the bundled sample collection against a local Prefect server;
`python -m flows train DATA OUT ...` runs the train-prior flow;
`python -m flows evaluate REFERENCE_URI OUT_URI ...` runs the evaluate flow (GDP against baselines)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gdp.cli import UsageError, _add_task_options, _Parser, add_restore_options, add_train_options, train_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
UI = "http://127.0.0.1:4200"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m flows", description="Run the gdp Prefect flows locally")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("restore", help="restore a collection (restore-collection flow)")
    r.add_argument("input_uri")
    r.add_argument("output_uri")
    _add_task_options(r)
    add_restore_options(r)
    r.add_argument("--devices", nargs="+", default=["auto"])
    r.add_argument("--pattern", default="**/*")
    r.add_argument("--reference-uri")
    r.add_argument("--max-images", type=int)
    r.add_argument("--overwrite", action="store_true")
    r.add_argument("--shards", type=int, default=1, help="N > 1: N child runs of the restore-shard/gpu deployment")
    r.add_argument("--task-runner", choices=["thread", "dask"], default="thread")
    r.add_argument("--dask-address", help="an existing Dask scheduler (default with dask: a local cluster)")
    r.add_argument("--dask-workers", type=int, default=2, help="worker processes of the local Dask cluster")
    r.add_argument("--blind", action="store_true", help="deblur: estimate an unknown kernel of --kernel-size")
    r.add_argument("--kernel-lr", type=float, help="deblur --blind: Adam step on the kernel logits")
    r.add_argument("--kernel-passes", type=int, help="deblur --blind: sampling chains (default 4)")
    t = sub.add_parser("train", help="train a prior (train-prior flow)")
    t.add_argument("data_uri")
    t.add_argument("output_uri")
    add_train_options(t)
    e = sub.add_parser("evaluate", help="score GDP against classical baselines on clean images (evaluate flow)")
    e.add_argument("reference_uri", help="folder or URL of clean reference images")
    e.add_argument("output_uri", help="where results.parquet, summary.md and the PNGs go")
    e.add_argument("--tasks", nargs="+", choices=["sr", "deblur", "inpaint", "colorize", "lowlight", "hdr"],
                   default=["sr", "deblur", "inpaint", "colorize"])
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--prior", default="default", help="default, a checkpoint path or an fsspec URL")
    e.add_argument("--preset", help="architecture of a checkpoint without config (e.g. adm-256-uncond)")
    e.add_argument("--guidance", nargs="+", choices=["x0", "xt"], default=["x0"], help="GDP-x0 and/or GDP-xt")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-images", type=int)
    e.add_argument("--tiling", choices=["auto", "single", "fused", "hierarchical"], default="auto")
    e.add_argument("--stride", type=int, help="patch stride (default: 3/4 of the patch)")
    e.add_argument("--batch-size", type=int, default=8, help="patches per network call")
    e.add_argument("--device", default="auto")
    d = sub.add_parser("demo", help="restore the bundled samples (x4 super-resolution) with the default prior")
    d.add_argument("--output-uri", default=str(ROOT / "out" / "demo"))
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--no-server", action="store_true", help="use PREFECT_API_URL or an ephemeral API")
    return parser


def restore_parameters(args: argparse.Namespace) -> dict:
    options = {"factor": args.factor, "filter": args.filter, "sigma": args.sigma, "kernel_size": args.kernel_size,
               "kernel_file": args.kernel_file, "blur_mode": args.blur_mode, "mask": args.mask or "sidecar",
               "mask_ratio": args.mask_ratio, "mask_seed": args.mask_seed,
               "box": [int(v) for v in args.box.split(",")] if args.box else None, "kernel_lr": args.kernel_lr,
               "kernel_passes": args.kernel_passes}
    if args.task == "hdr":
        raise UsageError("--task hdr fuses several exposures of one scene: use `gdp restore SHORT ... LONG OUT "
                         "--task hdr`; the collection flow restores one input per output")
    if args.blind and args.task != "deblur":
        raise UsageError("--blind applies to --task deblur only")
    task = "blind-deblur" if args.blind else args.task
    return {"input_uri": args.input_uri, "output_uri": args.output_uri, "task": task, "options": options,
            "prior": args.prior, "preset": args.preset, "steps": args.steps, "seed": args.seed,
            "guidance": args.guidance, "scale": args.scale, "samples": args.samples, "pattern": args.pattern,
            "tiling": {"mode": args.tiling, "patch": args.patch, "stride": args.stride, "blend": args.blend},
            "batch_size": args.batch_size, "devices": args.devices, "reference_uri": args.reference_uri,
            "max_images": args.max_images, "overwrite": args.overwrite, "shards": args.shards,
            "task_runner": args.task_runner, "dask_address": args.dask_address, "dask_workers": args.dask_workers}


def run_restore(parameters: dict) -> int:
    from flows.restore_collection import restore_collection
    state = restore_collection(**parameters, return_state=True)
    manifest = state.result(raise_on_failure=False)
    print(f"{state.name}: {state.message}")
    print(f"outputs under {parameters['output_uri']}; manifest {manifest if isinstance(manifest, str) else '(none)'}")
    return 0 if state.is_completed() else 1


def ensure_server() -> None:
    """Point this process at a local Prefect server, starting one in the background if needed."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if os.environ.get("PREFECT_API_URL"):
        return
    if not _healthy():
        if not _background_server_alive():
            print(f"starting a local Prefect server at {UI} (stop it with `prefect server stop`)", flush=True)
            prefect = Path(sys.executable).with_name("prefect")
            started = subprocess.run([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", "4200",
                                      "--background"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if started.returncode:
                raise RuntimeError(f"could not start a Prefect server at {UI}: "
                                   f"{' '.join(started.stderr.split())[-300:] or 'no message'}")
        deadline = time.time() + 90
        while not _healthy():
            if time.time() > deadline:
                raise RuntimeError(f"the Prefect server at {UI} did not become healthy in 90 s")
            time.sleep(1)
    os.environ["PREFECT_API_URL"] = f"{UI}/api"


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
    if not args.no_server:
        ensure_server()
        print(f"Prefect UI: {UI}  (flow runs, task runs and artifacts of this demo)", flush=True)
    parameters = {"input_uri": str(EXAMPLES / "sr-x4"), "output_uri": args.output_uri, "task": "sr",
                  "options": {"factor": 4}, "steps": args.steps, "reference_uri": str(EXAMPLES / "reference"),
                  "overwrite": True}
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
        if args.command == "restore":
            return run_restore(restore_parameters(args))
        if args.command == "demo":
            return run_demo(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "train":
            from flows.train_prior import train_prior
            cfg = train_config(args, args.data_uri, args.output_uri)
            print(train_prior(data_uri=cfg.data_uri, output_uri=cfg.out_uri, preset=cfg.preset, crop=cfg.crop,
                              steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              checkpoint_every=cfg.checkpoint_every, schedule=cfg.schedule,
                              learn_sigma=cfg.learn_sigma, exclude=list(cfg.exclude),
                              max_minutes=args.max_minutes, init_from=cfg.init_from, device=cfg.device, seed=cfg.seed))
            return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
