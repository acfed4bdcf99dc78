"""A real Prefect stack for the deployment tests: `prefect server start` on a free loopback port
(its own PREFECT_HOME), the project's prefect.yaml deployed by deployments/setup.sh, and process
workers started with `prefect worker start`, exactly as deployments/README.md tells a user.

Workers: `orchestrator` polls the `default` queue (collection runs), `gpu-a` and `gpu-b` poll the
`shards` queue with `--limit 1` (one child run each at a time, like one worker per GPU). Each runs
flow runs in subprocesses with one torch thread (OMP_NUM_THREADS=1), standing in for one device.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
import skimage.data
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The server, the workers and the CLI, all as subprocesses with one environment."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.ui = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.ui}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": self.api,
                    "PREFECT_UI_API_URL": self.api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_CLI_WRAP_LINES": "false",
                    "GDP_HOME": str(ROOT), "GDP_ARCHIVE_URI": str(home / "archive"),
                    "GDP_ARCHIVE_OUTPUT_URI": str(home / "archive-restored"), "PREFECT": PREFECT,
                    "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
        self.workers: dict[str, subprocess.Popen] = {}
        self.server: subprocess.Popen | None = None

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.home / log, "ab") as out:
            return subprocess.Popen(args, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # its own process group: killed as a unit

    def start_server(self, timeout: float = 120) -> None:
        self.server = self._spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                  "server.log")
        deadline = time.monotonic() + timeout
        while not self._healthy():
            assert self.server.poll() is None, (self.home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the Prefect server was not healthy after {timeout} s"
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([PREFECT, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def start_worker(self, name: str, queue: str, limit: int | None = None, timeout: float = 120) -> None:
        """Start a process worker and wait until it polls (so runs spread as the test expects)."""
        args = [PREFECT, "worker", "start", "--pool", "gpu-pool", "--type", "process", "--work-queue", queue,
                "--name", name]
        proc = self._spawn(args + (["--limit", str(limit)] if limit else []), f"worker-{name}.log")
        self.workers[name] = proc
        log, deadline = self.home / f"worker-{name}.log", time.monotonic() + timeout
        while f"Worker '{name}' started" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"worker {name} did not start in {timeout} s"
            time.sleep(0.2)

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL a worker and every process under it (its flow runs), as if its machine died."""
        worker = psutil.Process(self.workers.pop(name).pid)
        victims = [worker, *worker.children(recursive=True)]
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=10)
        return [p.pid for p in victims]

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.server]:
            if proc and proc.poll() is None:
                with _quiet():
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.server]:
            if proc:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with _quiet():
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)

    def run_deployment(self, name: str, params: dict, watch: bool = True) -> tuple[str, subprocess.CompletedProcess]:
        """`prefect deployment run NAME --param k=json ... [--watch]`: (flow run id, the CLI's result)."""
        import json
        args = ["deployment", "run", name]
        for key, value in params.items():
            args += ["--param", f"{key}={json.dumps(value)}"]
        if watch:
            args += ["--watch", "--watch-timeout", "300"]
        result = self.cli(*args, timeout=330)
        found = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout)
        assert found, result.stdout[-3000:] + result.stderr[-3000:]
        return found.group(1), result


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, ProcessLookupError)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server + deployments + the three workers; the test process's Prefect client points at it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    s = Stack(tmp_path_factory.mktemp("prefect-home"))
    try:
        s.start_server()
        setup = subprocess.run(["bash", "deployments/setup.sh"], env=s.env, cwd=ROOT, capture_output=True,
                               text=True, timeout=300)
        assert setup.returncode == 0, setup.stdout[-3000:] + setup.stderr[-3000:]
        s.start_worker("orchestrator", "default")
        s.start_worker("gpu-a", "shards", limit=1)
        s.start_worker("gpu-b", "shards", limit=1)
        with temporary_settings(updates={PREFECT_API_URL: s.api}):
            yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def photo_collection(tmp_path_factory):
    """write(folder, sizes): PNG crops of skimage's astronaut and coffee photos at the given (h, w)."""
    photos = [np.asarray(skimage.data.astronaut()), np.asarray(skimage.data.coffee())]

    def write(name: str, sizes: list[tuple[int, int]]) -> Path:
        folder = tmp_path_factory.mktemp(name)
        for k, (h, w) in enumerate(sizes):
            array = photos[k % 2][30 + 9 * k:30 + 9 * k + 4 * h:4, 60 + 7 * k:60 + 7 * k + 4 * w:4]
            Image.fromarray(np.ascontiguousarray(array)).save(folder / f"photo{k}.png")
        return folder

    return write
