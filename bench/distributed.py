"""Speed-up of a sharded run over workers, and the time from `prefect deployment run` to the first
restored patch, against a real local Prefect server and process workers.

    python bench/distributed.py --images 12 --steps 100

Starts `prefect server start` (a temporary PREFECT_HOME, a free port), registers prefect.yaml with
deployments/setup.sh, writes a collection of `--images` photo crops (x4 super-resolution to one
64-px patch of the default prior each), then times `prefect deployment run
'restore-collection/on-demand' --watch`:

  1 worker:  shards=1 on one worker (queue default): the run restores everything itself;
  2 workers: shards=2: the parent on an orchestrator worker (queue default) plans and waits, two
             restore-shard child runs on workers gpu-a and gpu-b (queue shards, --limit 1).

Every worker runs its flow runs with one torch thread (OMP_NUM_THREADS=1): on a CPU machine a
worker stands for one device. "First patch" is when the first restored image (one patch, all its
steps) lands in the run's work area; "one patch" is the median restore time of an image (from the
manifest), so their difference is the time to get going. Prints a markdown table, the load
average and the busiest other processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).with_name("prefect"))
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def write_collection(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    for k in range(n):
        array = np.asarray(getattr(skimage.data, PHOTOS[k % len(PHOTOS)])())
        top, left = 20 + 11 * (k // len(PHOTOS)), 40 + 13 * (k // len(PHOTOS))
        crop = array[top:top + 4 * size:4, left:left + 4 * size:4]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"img{k:03d}.png")


class Stack:
    def __init__(self, home: Path):
        port = socket.create_server(("127.0.0.1", 0)).getsockname()[1]  # released below: free for the server
        self.home, self.api = home, f"http://127.0.0.1:{port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
                    "GDP_HOME": str(ROOT), "GDP_ARCHIVE_URI": str(home / "archive"),
                    "GDP_ARCHIVE_OUTPUT_URI": str(home / "archive-out"), "PREFECT": PREFECT, "OMP_NUM_THREADS": "1"}
        self.procs: list[subprocess.Popen] = []
        self.server = self.spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], "server")
        deadline = time.monotonic() + 180
        while not self.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError("the Prefect server did not start in 180 s")
            time.sleep(0.5)
        subprocess.run(["bash", "deployments/setup.sh"], env=self.env, cwd=ROOT, check=True, capture_output=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2):
                return True
        except OSError:
            return False

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.home / f"{log}.log", "ab") as out:
            proc = subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, queue: str, limit: int | None) -> subprocess.Popen:
        args = [PREFECT, "worker", "start", "--pool", "gpu-pool", "--type", "process", "--work-queue", queue,
                "--name", name] + (["--limit", str(limit)] if limit else [])
        proc = self.spawn(args, f"worker-{name}")
        deadline = time.monotonic() + 120
        while f"Worker '{name}' started" not in (self.home / f"worker-{name}.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {name} did not start in 120 s")
            time.sleep(0.2)
        return proc

    def stop(self, procs: list[subprocess.Popen]) -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def timed_run(stack: Stack, params: dict, out: Path) -> dict:
    """Seconds from `prefect deployment run` to the first restored patch and to the end of --watch."""
    args = [PREFECT, "deployment", "run", "restore-collection/on-demand", "--watch", "--watch-timeout", "3600"]
    for key, value in params.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    cli = subprocess.Popen(args, env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    while cli.poll() is None:
        if first is None and any((out / "_work").glob("*/*.safetensors")):
            first = time.monotonic() - t0
        time.sleep(0.05)
    total = time.monotonic() - t0
    text = cli.stdout.read()
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", text).group(1)
    import pyarrow.parquet as pq
    rows = pq.read_table(out / "_manifests" / f"run-{run_id}.parquet").to_pylist()
    seconds = sorted(r["seconds"] for r in rows if r["status"] == "ok")
    return {"first_patch_s": first, "total_s": total, "exit": cli.returncode, "rows": len(rows),
            "ok": len(seconds), "patch_s": seconds[len(seconds) // 2] if seconds else float("nan"),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def busiest_processes(n: int = 6) -> str:
    ps = subprocess.run(["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return "\n".join(line[:140] for line in ps.splitlines()[: n + 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--size", type=int, default=16, help="input side in pixels (x4 super-resolution)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prior", default="default")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (server and worker logs)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gdp-bench-distributed-"))
    write_collection(home / "in", args.images, args.size)
    common = {"input_uri": str(home / "in"), "task": "sr", "options": {"factor": 4}, "prior": args.prior,
              "steps": args.steps}
    started = datetime.datetime.now().isoformat(timespec="minutes")
    stack = Stack(home)
    results = {}
    try:
        one = [stack.worker("one", "default", None)]
        results["1 worker, shards=1"] = timed_run(stack, {**common, "output_uri": str(home / "out1")}, home / "out1")
        stack.stop(one)
        two = [stack.worker("orchestrator", "default", None), stack.worker("gpu-a", "shards", 1),
               stack.worker("gpu-b", "shards", 1)]
        results["2 workers, shards=2"] = timed_run(stack, {**common, "output_uri": str(home / "out2"), "shards": 2},
                                                   home / "out2")
        stack.stop(two)
    finally:
        stack.stop(stack.procs)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    base = results["1 worker, shards=1"]["total_s"]
    print(f"\n{started}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
          f"{args.images} images {args.size}px x4 -> {4 * args.size}px, {args.steps} steps, prior {args.prior}\n")
    print("| run | images ok | total s | speed-up | first patch s | one patch s (median) | "
          "load avg 1 min (before, after) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ok']}/{r['rows']} | {r['total_s']:.1f} | {base / r['total_s']:.2f}x | "
              f"{r['first_patch_s']:.1f} | {r['patch_s']:.1f} | {r['load_before']:.1f}, {r['load_after']:.1f} |")
    print(f"\nbusiest processes at the end:\n{busiest_processes()}")
    if args.keep:
        print(f"\nlogs and outputs: {home}")
    return 0 if all(r["exit"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
