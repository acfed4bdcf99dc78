"""Pipeline overhead: the restore-collection flow against a plain library loop, same images and settings.

    PREFECT_API_URL=http://127.0.0.1:4200/api python bench/pipeline.py [--images 8] [--steps 10] [--repeats 3]
        [--threads N] [--server-pid PID]

Makes N observations (x4 average-pooled crops of a held-out photo, 32x32 -> 128x128 outputs,
9 patches of the default prior each), then alternates, per repeat: (a) a plain loop of
read_image -> restore -> write_image, (b) the flow over the same folder (overwrite=True). Reports
the median wall times, their ratio, the share of the flow's wall time spent in UNet forwards, the
UNet seconds of both (the same network calls: any difference is the network running slower inside
the flow), and with --server-pid the CPU seconds the Prefect server (and its children) used
during each phase. --threads sets torch's threads for both (default: torch's, one per core).
`--rss-megapixels 16` instead runs the flow once on one image of that many output megapixels
(1 step) and reports the process's peak RSS.

Scaling (time and peak memory against image size, hierarchical mode):

    python bench/pipeline.py --scaling 1 4 16 --steps 2 --repeats 3 [--plot docs/img/scaling.png]

makes one x4 SR observation per size (output side = sqrt(MP) rounded down to a multiple of 4),
then restores it `--repeats` times, each in a fresh process (`--one`: read -> restore ->
write, the library path a worker runs; timed after the prior is loaded) so that each peak RSS is that run's own; prints medians,
appends every run to --data (JSON) and plots seconds and peak RSS against megapixels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import UNetTimer  # noqa: E402

from gdp import collection as col  # noqa: E402
from gdp.io import read_image, write_image  # noqa: E402
from gdp.operators import degrade, make_operator  # noqa: E402
from gdp.progress import ProgressBar  # noqa: E402
from gdp.restore import restore  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_inputs(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ref = read_image(str(ROOT / "examples/reference/astronaut-face.png")).pixels
    op = make_operator("sr", factor=4)
    big = torch.nn.functional.interpolate(ref, size=(size, size), mode="bilinear") if size != 128 else ref
    for k in range(n):
        write_image(str(folder / f"img{k:02d}.png"), degrade(big.roll(k * 7, dims=-1), op))


def plain_loop(folder: Path, out: Path, steps: int) -> float:
    t0 = time.perf_counter()
    prior = col.cached_prior("default", None, "cpu")
    for f in sorted(folder.glob("*.png")):
        y = read_image(str(f)).pixels
        r = restore(y, "sr", prior, factor=4, steps=steps, seed=[0])
        write_image(str(out / f.name), r.image)
    return time.perf_counter() - t0


def flow_run(folder: Path, out: Path, steps: int, tiling: str = "auto") -> float:
    from flows.restore_collection import restore_collection
    t0 = time.perf_counter()
    state = restore_collection(input_uri=str(folder), output_uri=str(out), task="sr", options={"factor": 4},
                               steps=steps, overwrite=True, tiling={"mode": tiling}, return_state=True)
    assert state.is_completed(), state.message
    return time.perf_counter() - t0


def make_observation(path: Path, side: int) -> None:
    """An x4 SR observation of a side x side output, made at the low resolution directly (a
    bilinear resize of the held-out crop, quantised to 8 bits): no full-size image in memory."""
    ref = read_image(str(ROOT / "examples/reference/astronaut-face.png")).pixels
    low = torch.nn.functional.interpolate(ref, size=(side // 4, side // 4), mode="bilinear", align_corners=False)
    write_image(str(path), low)


def one_run(obs: Path, out: Path, steps: int, tiling: str) -> dict:
    """read -> restore -> write in this process; wall time, NFE and this process's peak RSS."""
    prior = col.cached_prior("default", None, "cpu")
    timer = UNetTimer(prior.unet)
    t0, c0 = time.perf_counter(), time.process_time()
    y = read_image(str(obs)).pixels
    bar = ProgressBar(steps, f"{obs.name} x4")  # on stderr, a line per 10% (scaling passes it through)
    r = restore(y, "sr", prior, factor=4, steps=steps, seed=[0], tiling=tiling, callback=bar)
    write_image(str(out), r.image)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"megapixels": r.image.shape[-1] * r.image.shape[-2] / 1e6, "side": r.image.shape[-1], "steps": steps,
            "tiling": r.tiling.get("mode"), "n_patches": r.tiling.get("n_patches"), "nfe": r.nfe,
            "seconds": seconds, "cpu_seconds": cpu, "unet_seconds": timer.seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def scaling(sizes: list[float], steps: int, repeats: int, tiling: str, data: Path, plot: Path | None) -> None:
    tmp = Path(tempfile.mkdtemp())
    runs = json.loads(data.read_text()) if data.exists() else []
    meta = {"date": time.strftime("%a %d %b %Y %H:%M:%S %Z"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
            "threads": torch.get_num_threads()}
    print(f"threads {torch.get_num_threads()}")
    print("| output | MP | steps | NFE | seconds (median) | CPU seconds (median) | CPU s / MP / step | UNet share | "
          "peak RSS GiB (median) | runs (wall / CPU / RSS) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mp in sizes:
        side = int((mp * 1e6) ** 0.5) // 4 * 4
        obs = tmp / f"obs{side}.png"
        make_observation(obs, side)
        rows = []
        for k in range(repeats):
            cmd = [sys.executable, __file__, "--one", str(obs), str(tmp / "out.png"), "--steps", str(steps),
                   "--tiling", tiling]
            rows.append({**json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout), **meta})
            runs.append(rows[-1])
            data.parent.mkdir(parents=True, exist_ok=True)
            data.write_text(json.dumps(runs, indent=1))
        med = {k: statistics.median(r[k] for r in rows) for k in ("seconds", "cpu_seconds", "peak_rss_gib")}
        r0 = rows[0]
        share = statistics.median(r["unet_seconds"] / r["seconds"] for r in rows)
        runs_text = ", ".join(f"{r['seconds']:.0f} s / {r['cpu_seconds']:.0f} s / {r['peak_rss_gib']:.2f} GiB"
                              for r in rows)
        print(f"| {side}x{side} | {r0['megapixels']:.2f} | {steps} | {r0['nfe']} | {med['seconds']:.1f} | "
              f"{med['cpu_seconds']:.1f} | {med['cpu_seconds'] / r0['megapixels'] / steps:.1f} | {share:.3f} | "
              f"{med['peak_rss_gib']:.2f} | {runs_text} |", flush=True)
    if plot:
        plot_scaling(runs, plot)


def plot_scaling(runs: list[dict], out: Path) -> None:
    """Seconds per step and peak RSS against output megapixels (medians over runs, log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["megapixels"], r["steps"]), []).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for steps in sorted({s for _, s in groups}):
        keys = sorted(k for k in groups if k[1] == steps)
        mps = [k[0] for k in keys]
        for key, style, what in (("seconds", "o-", "wall"), ("cpu_seconds", "s--", "CPU")):
            ax1.plot(mps, [statistics.median(r[key] for r in groups[k]) for k in keys], style,
                     label=f"{what}, {steps} step(s)")
        ax2.plot(mps, [statistics.median(r["peak_rss_gib"] for r in groups[k]) for k in keys], "o-",
                 label=f"{steps} step(s)")
    for ax, label in ((ax1, "seconds (median)"), (ax2, "peak RSS (GiB, median)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("output megapixels (x4 SR, hierarchical, default prior)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="default 10 (overhead); 1 with --rss-megapixels")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-megapixels", type=float)
    ap.add_argument("--threads", type=int, help="torch threads for the overhead comparison (both sides)")
    ap.add_argument("--server-pid", type=int, help="the Prefect server's process id: its CPU seconds per phase")
    ap.add_argument("--tiling", default="auto", help="with --rss-megapixels or --scaling: auto, fused or hierarchical")
    ap.add_argument("--scaling", type=float, nargs="+", help="output megapixels: time and peak RSS per size")
    ap.add_argument("--data", type=Path, default=ROOT / "docs/data/scaling.json")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--one", nargs=2, type=Path, metavar=("OBS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps, args.tiling)))
        return
    if args.plot_only:
        plot_scaling(json.loads(args.data.read_text()), args.plot)
        return
    if args.scaling:
        scaling(args.scaling, args.steps, args.repeats, "hierarchical" if args.tiling == "auto" else args.tiling,
                args.data, args.plot)
        return
    tmp = Path(tempfile.mkdtemp())
    if args.rss_megapixels:
        side = int((args.rss_megapixels * 1e6) ** 0.5) // 4 * 4
        make_inputs(tmp / "in", 1, side)
        seconds = flow_run(tmp / "in", tmp / "out", 1, args.tiling)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
        print(f"| {side}x{side} ({side * side / 1e6:.1f} MP output) | tiling {args.tiling} | 1 step | {seconds:.0f} s "
              f"| peak RSS {peak:.2f} GiB |")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    make_inputs(tmp / "in", args.images, 128)
    timer = UNetTimer(col.cached_prior("default", None, "cpu").unet)
    flow_run(tmp / "in", tmp / "warm", 1)  # warm-up: imports, first API calls, model load
    rows = []
    for _ in range(args.repeats):
        row = {}
        for kind, run in (("plain", plain_loop), ("flow", flow_run)):
            timer.reset()
            server0 = server_cpu_seconds(args.server_pid)
            row[kind] = run(tmp / "in", tmp / kind, args.steps)
            row[f"{kind}_unet"] = timer.seconds
            row[f"{kind}_server_cpu"] = server_cpu_seconds(args.server_pid) - server0
        rows.append(row)
        print(json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    ratio = [r["flow"] / r["plain"] for r in rows]
    print(f"images {args.images}, steps {args.steps}, repeats {args.repeats}, threads {torch.get_num_threads()}, "
          f"API {os.environ.get('PREFECT_API_URL', 'ephemeral')}")
    print("| torch threads | plain loop (median) | flow (median) | flow / plain (median of per-repeat ratios) | "
          "UNet share of flow wall time | UNet s plain / flow | server CPU s plain / flow |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {torch.get_num_threads()} | {med['plain']:.1f} s | {med['flow']:.1f} s | {statistics.median(ratio):.3f} "
          f"(runs: {', '.join(f'{r:.3f}' for r in ratio)}) | {statistics.median(r['flow_unet'] / r['flow'] for r in rows):.3f} "
          f"| {med['plain_unet']:.1f} / {med['flow_unet']:.1f} | {med['plain_server_cpu']:.1f} / {med['flow_server_cpu']:.1f} |")


def server_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` and its children (0 without a pid)."""
    if not pid:
        return 0.0
    import psutil
    proc = psutil.Process(pid)
    return sum(sum(p.cpu_times()[:2]) for p in [proc, *proc.children(recursive=True)])


if __name__ == "__main__":
    main()
