"""Deployments against a real Prefect server and real process workers (see conftest.py): an
on-demand run, a sharded run spread over two workers, a crashed child run retried, a worker killed
in the middle of a run and the run repeated, a run on a local Dask cluster, and the run's page in
the Prefect UI in headless Chromium. Restores small real photo crops with a tiny random prior."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gdp import collection as col

COLLECTION = "restore-collection/on-demand"
ONE_PATCH, FOUR_PATCHES, TWO_PATCHES = (16, 16), (20, 20), (16, 24)  # inputs; x2 outputs in 32-px patches


def params(input_dir: Path, output_dir: Path, prior: Path, steps: int, **more) -> dict:
    return {"input_uri": str(input_dir), "output_uri": str(output_dir), "task": "sr", "options": {"factor": 2},
            "prior": str(prior), "steps": steps, **more}


def flow_run(run_id: str):
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def children(run_id: str) -> list:
    """Child flow runs of a run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])))
    return sorted(runs, key=lambda r: r.created)


def worker_of(stack, run_id: str) -> str:
    """The worker that executed a flow run, from the worker's own `executed-flow-run` event."""
    import urllib.request
    body = json.dumps({"filter": {"event": {"name": ["prefect.worker.executed-flow-run"]},
                                  "related": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 5}).encode()
    request = urllib.request.Request(f"{stack.api}/events/filter", data=body,
                                     headers={"content-type": "application/json"})
    for _ in range(20):  # events reach the API a moment after the run ends
        with urllib.request.urlopen(request, timeout=10) as r:
            events = json.load(r)["events"]
        if events:
            return events[0]["resource"]["prefect.resource.id"].removeprefix("prefect.worker.process.")
        time.sleep(0.5)
    raise AssertionError(f"no executed-flow-run event for {run_id}")


def manifest_rows(output_dir: Path, run_id: str) -> dict[str, dict]:
    table = pq.read_table(output_dir / "_manifests" / f"run-{run_id}.parquet")
    return {Path(r["source_uri"]).name: r for r in table.to_pylist()}


def journaled(output_dir: Path, run_id: str) -> set[str]:
    """Inputs that the run has journaled (finished) so far; empty once its manifest replaced them."""
    names = set()
    for f in (output_dir / "_manifests" / "_journal" / f"run-{run_id}").glob("*.parquet"):
        try:
            names.update(Path(r["source_uri"]).name for r in pq.read_table(f).to_pylist())
        except FileNotFoundError:  # the run finished and dropped its journal meanwhile
            return set()
    return names


def wait_until(condition, timeout: float, what: str, seen: list | None = None, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what} {(seen or [])[-6:]}"
        time.sleep(step)
    return value


def output_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_on_demand_run(stack, photo_collection, tiny_prior_file, tmp_path):
    """`prefect deployment run ... --watch` on 4 photos and a broken file: a worker runs it, the
    manifest has one row per input, the broken file is one failed row, and the CLI says Failed."""
    folder = photo_collection("on-demand", [ONE_PATCH, FOUR_PATCHES, TWO_PATCHES, ONE_PATCH])
    (folder / "broken.png").write_bytes(b"not a png")
    run_id, cli = stack.run_deployment(COLLECTION, params(folder, tmp_path / "out", tiny_prior_file, steps=4))
    assert cli.returncode == 1 and "Flow run finished in state 'Failed'" in cli.stdout, cli.stdout[-2000:]
    run = flow_run(run_id)
    assert run.state.is_failed() and "5 images: 4 ok or skipped, 1 failed" in run.state.message
    assert worker_of(stack, run_id) == "orchestrator"
    rows = manifest_rows(tmp_path / "out", run_id)
    assert sorted(rows) == ["broken.png", "photo0.png", "photo1.png", "photo2.png", "photo3.png"]
    assert rows["broken.png"]["status"] == "failed" and "not an image" in rows["broken.png"]["error"]
    expected = {"photo0.png": (32, 32, 1), "photo1.png": (40, 40, 4), "photo2.png": (48, 32, 2), "photo3.png": (32, 32, 1)}
    for name, (w, h, patches) in expected.items():
        r = rows[name]
        assert (r["status"], r["width"], r["height"], r["n_patches"], r["nfe"]) == ("ok", w, h, patches, 4 * patches)
        assert r["flow_run_id"] == run_id
        assert output_size(tmp_path / "out" / name) == (w, h)
    assert not (tmp_path / "out" / "_manifests" / "_journal").exists() or \
        not any((tmp_path / "out" / "_manifests" / "_journal").iterdir())  # cleared with the manifest


@pytest.fixture(scope="module")
def sharded_run(stack, photo_collection, tiny_prior_file, tmp_path_factory):
    """shards=2 over 6 photos (14 patches: 7 per child)."""
    folder = photo_collection("sharded", [FOUR_PATCHES, ONE_PATCH, TWO_PATCHES, FOUR_PATCHES, ONE_PATCH, TWO_PATCHES])
    out = tmp_path_factory.mktemp("sharded-out")
    started = time.monotonic()
    run_id, cli = stack.run_deployment(COLLECTION, params(folder, out, tiny_prior_file, steps=30, shards=2))
    return SimpleNamespace(id=run_id, cli=cli, out=out, seconds=time.monotonic() - started)


def test_sharded_run_uses_both_workers(stack, sharded_run):
    """Two restore-shard child runs, one on each shards worker; the parent's manifest merges their
    rows (one per input) and each child wrote its own partial manifest."""
    assert sharded_run.cli.returncode == 0, sharded_run.cli.stdout[-2000:]
    parent = flow_run(sharded_run.id)
    assert parent.state.is_completed() and "6 images: 6 ok or skipped, 0 failed" in parent.state.message
    kids = children(sharded_run.id)
    assert len(kids) == 2 and all(k.state.is_completed() for k in kids)
    assert sorted(k.name for k in kids) == ["sr-sharded0-shard-0", "sr-sharded0-shard-1"]
    assert {worker_of(stack, k.id) for k in kids} == {"gpu-a", "gpu-b"}
    assert worker_of(stack, sharded_run.id) == "orchestrator"

    rows = manifest_rows(sharded_run.out, sharded_run.id)
    assert sorted(rows) == [f"photo{k}.png" for k in range(6)]
    assert all(r["status"] == "ok" and r["nfe"] == 30 * r["n_patches"] for r in rows.values())
    by_child = {}
    for r in rows.values():
        by_child.setdefault(r["flow_run_id"], []).append(r["n_patches"])
    assert sorted(by_child) == sorted(str(k.id) for k in kids)
    assert sorted(sum(p) for p in by_child.values()) == [7, 7]  # balanced by planned patches
    for kid in kids:
        partial = col.read_manifest(col.shard_manifest_uri(str(sharded_run.out), str(kid.id)))
        assert sorted(r["source_uri"] for r in partial) == \
            sorted(r["source_uri"] for r in rows.values() if r["flow_run_id"] == str(kid.id))
    for name, r in rows.items():
        assert output_size(sharded_run.out / name) == (r["width"], r["height"])
    print(f"sharded run: {sharded_run.seconds:.1f} s from `prefect deployment run` to the end of --watch")


def test_huge_image_windows_are_spread_over_child_runs(stack, photo_collection, tiny_prior_file, tmp_path):
    """shards=2 with one hierarchical image holding most of the work (9 of 11 patches): the parent
    runs its coarse pass, each child restores about half of its windows into the parent's work area
    (and one small image whole), the parent merges them; the output and NFE equal a shards=1 run's."""
    folder = photo_collection("huge", [(40, 40), ONE_PATCH, ONE_PATCH])
    tiling = {"mode": "hierarchical"}
    runs = {}
    for shards in (2, 1):
        out = tmp_path / f"out-{shards}"
        run_id, cli = stack.run_deployment(COLLECTION, params(folder, out, tiny_prior_file, steps=6, shards=shards,
                                                              tiling=tiling, shard_patches=4))
        assert cli.returncode == 0, cli.stdout[-2000:]
        runs[shards] = (run_id, out, manifest_rows(out, run_id))
    run_id, out, rows = runs[2]
    kids = children(run_id)
    assert len(kids) == 2 and all(k.state.is_completed() for k in kids)
    assert {worker_of(stack, k.id) for k in kids} == {"gpu-a", "gpu-b"}
    windows = [k.parameters["windows"] for k in kids]
    huge_uri = str(folder / "photo0.png")
    assert sorted(tuple(w[huge_uri]) for w in windows) == [(0, 5), (5, 9)]  # 9 windows: 5 + 4
    assert sorted(len(k.parameters["inputs"]) for k in kids) == [1, 1]
    assert sorted(rows) == ["photo0.png", "photo1.png", "photo2.png"]
    huge, single = rows["photo0.png"], runs[1][2]["photo0.png"]
    assert (huge["status"], huge["n_patches"], huge["width"]) == ("ok", 9, 80)
    assert huge["flow_run_id"] == run_id  # assembled by the parent
    assert huge["nfe"] == single["nfe"] > 9 * 6  # windows plus the coarse pass, as in one process
    for name in rows:
        a = np.asarray(Image.open(out / name), dtype=np.int16)
        b = np.asarray(Image.open(runs[1][1] / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name  # same chains, seeded by window index, anywhere
    assert not (out / col.WORK_DIR).exists()  # the parent's work area (windows, parts lists) is cleaned


def test_crashed_child_run_is_retried_once(stack, photo_collection, tiny_prior_file, tmp_path):
    """SIGKILL one child run's process after it restored an image: its worker reports it Crashed,
    the parent starts that shard once more, the retry skips what the crashed child journaled, and
    the parent's manifest still has one row per input with nothing written twice."""
    folder = photo_collection("crash", [ONE_PATCH] * 8)
    out = tmp_path / "out"
    run_id, _ = stack.run_deployment(COLLECTION, params(folder, out, tiny_prior_file, steps=50, shards=2,
                                                            shard_patches=1), watch=False)  # one image per task
    seen = []

    def running_child_with_a_restored_image():
        for kid in children(run_id):
            seen.append((kid.name, kid.state.name, kid.infrastructure_pid, len(journaled(out, str(kid.id)))))
            if kid.state.is_running() and kid.infrastructure_pid and journaled(out, str(kid.id)):
                return kid
    victim = wait_until(running_child_with_a_restored_image, 180, "a child run that restored an image", seen)
    os.kill(int(victim.infrastructure_pid), 9)
    time.sleep(0.5)
    done_before = journaled(out, str(victim.id))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in done_before}

    parent = wait_until(lambda: (r := flow_run(run_id)).state.is_final() and r, 240, "the parent run to end", step=1)
    assert parent.state.is_completed(), parent.state.message
    kids = children(run_id)
    assert len(kids) == 3
    crashed = [k for k in kids if k.state.is_crashed()]
    assert [k.id for k in crashed] == [victim.id]
    retry = kids[-1]
    assert retry.state.is_completed() and retry.name == victim.name  # the same shard, started again
    assert retry.parameters["inputs"] == victim.parameters["inputs"]

    rows = manifest_rows(out, run_id)
    assert sorted(rows) == [f"photo{k}.png" for k in range(8)]
    skipped = {name for name, r in rows.items() if r["status"] == "skipped"}
    assert skipped == done_before and 1 <= len(skipped) < 4
    assert all(r["status"] in ("ok", "skipped") for r in rows.values())
    assert all(rows[name]["flow_run_id"] == str(retry.id) for name in skipped)
    for name in rows:
        assert output_size(out / name) == (32, 32)
    assert {name: (out / name).stat().st_mtime_ns for name in done_before} == mtimes  # not written again


def test_killed_worker_then_rerun_loses_nothing(stack, photo_collection, tiny_prior_file, tmp_path):
    """Kill the worker (and the flow run under it) in the middle of a run, start another worker and
    run again: every input ends with one output and one row; what the dead run finished (journaled)
    is skipped, not written again. Only an image caught between its write and its journal row (at
    most the one in flight) is restored again."""
    folder = photo_collection("kill", [ONE_PATCH] * 6)
    out = tmp_path / "out"
    parameters = params(folder, out, tiny_prior_file, steps=50, shard_patches=1)  # one image per restore task
    first, _ = stack.run_deployment(COLLECTION, parameters, watch=False)
    wait_until(lambda: journaled(out, first), 180, "the first restored image")
    killed = stack.kill_worker("orchestrator")
    stack.start_worker("orchestrator-2", "default")  # the machine comes back (or another takes over)
    assert len(killed) >= 2  # the worker and its flow run process
    done = journaled(out, first)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    in_flight = set(written) - done
    assert 1 <= len(done) < 6 and done <= set(written) and len(in_flight) <= 1, (done, written)
    assert not (out / "_manifests" / f"run-{first}.parquet").exists()  # it died before its manifest

    second, cli = stack.run_deployment(COLLECTION, parameters)
    assert cli.returncode == 0, cli.stdout[-2000:]
    assert worker_of(stack, second) == "orchestrator-2"
    rows = manifest_rows(out, second)
    assert sorted(rows) == [f"photo{k}.png" for k in range(6)]
    assert {n for n, r in rows.items() if r["status"] == "skipped"} == done
    assert {n for n, r in rows.items() if r["status"] == "ok"} == {f"photo{k}.png" for k in range(6)} - done
    assert {n: (out / n).stat().st_mtime_ns for n in done} == {n: written[n] for n in done}  # not written twice
    assert sorted(p.name for p in out.glob("*.png")) == sorted(rows)
    assert not flow_run(first).state.is_final()  # the killed run never reported an end (see deployments/README)


def test_dask_local_cluster(stack, photo_collection, tiny_prior_file, tmp_path):
    """task_runner=dask with a local cluster of 2 worker processes: the restore tasks run in both,
    and each process loads the prior once whatever the number of tasks it runs."""
    folder = photo_collection("dask", [ONE_PATCH] * 4)
    out = tmp_path / "out"
    run_id, cli = stack.run_deployment(COLLECTION, params(folder, out, tiny_prior_file, steps=10, task_runner="dask",
                                                          dask_workers=2, shard_patches=1))
    assert cli.returncode == 0, cli.stdout[-2000:]
    rows = manifest_rows(out, run_id)
    assert sorted(rows) == [f"photo{k}.png" for k in range(4)] and all(r["status"] == "ok" for r in rows.values())
    (child,) = children(run_id)
    assert child.state.is_completed() and child.name == "sr-dask0-shard-0"
    assert {r["flow_run_id"] for r in rows.values()} == {str(child.id)}

    lines = wait_until(lambda: _shard_done_lines(child.id, 4), 30, "4 restore-shard log lines")
    processes = {}
    for pid, loads in lines:
        processes.setdefault(pid, set()).add(loads)
    assert len(processes) == 2, lines  # both Dask workers restored
    assert all(loads == {1} for loads in processes.values()), lines  # the prior loaded once per process
    assert str(flow_run(run_id).infrastructure_pid) not in {str(p) for p in processes}


def test_scale_out_parameters_fail_in_one_line():
    """Bad combinations and a bad `collection` for restore-shard: one-line ValueErrors that say what to do."""
    from flows.restore_collection import _check_scale_out, _collection_parameters
    with pytest.raises(ValueError, match=r"^shards > 1 runs child runs .* choose one"):
        _check_scale_out(2, "dask", None)
    with pytest.raises(ValueError, match=r"^dask_address is used only with task_runner='dask'$"):
        _check_scale_out(1, "thread", "tcp://scheduler:8786")
    _check_scale_out(4, "thread", None)
    _check_scale_out(1, "dask", "tcp://scheduler:8786")
    with pytest.raises(ValueError) as bad:
        _collection_parameters({"input_uri": "/in", "output_uri": "/out", "steps": 0})
    assert str(bad.value).startswith("collection: ") and "steps" in str(bad.value) and "\n" not in str(bad.value)
    with pytest.raises(ValueError, match=r"^collection: .*unknown_key"):
        _collection_parameters({"input_uri": "/in", "output_uri": "/out", "unknown_key": 1})
    full = _collection_parameters({"input_uri": "/in", "output_uri": "/out", "options": {"factor": 2}})
    assert (full["options"].factor, full["steps"], full["shards"], full["devices"]) == (2, 100, 1, ["auto"])


def _shard_done_lines(run_id, expected: int) -> list[tuple[int, int]] | None:
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])), limit=200)
    found = [re.search(r"done in process (\d+) \(priors loaded by this process: (\d+)\)", log.message) for log in logs]
    lines = [(int(m.group(1)), int(m.group(2))) for m in found if m]
    return lines if len(lines) >= expected else None


# --------------------------------------------------------------------------------- the UI


CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1400,1000", "--virtual-time-budget=20000"]


def chromium(tmp_path: Path, url: str, *action: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"  # a fresh profile each time
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
                          capture_output=True, text=True, timeout=120)


def page_text(tmp_path: Path, url: str, expected: list[str]) -> str:
    """The text of the page once the single-page app has loaded (tried again while the API lags)."""
    import re
    for _ in range(3):
        dom = chromium(tmp_path, url, "--dump-dom").stdout
        text = " ".join(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", dom, flags=re.S)).split())
        if all(e in text for e in expected):
            break
    return text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_ui_shows_the_run_its_child_runs_and_artifacts(stack, sharded_run, tmp_path):
    kids = sorted(children(sharded_run.id), key=lambda k: k.name)
    page = f"{stack.ui}/v2/runs/flow-run/{sharded_run.id}"
    text = page_text(tmp_path, page, ["sr-sharded0", "Completed"])
    for expected in ("sr-sharded0", "Completed", "restore-collection", "Deployment on-demand", "Work Pool gpu-pool",
                     "Subflow Runs", "Artifacts"):
        assert expected in text, expected
    names = [k.name for k in kids]
    text = page_text(tmp_path, f"{page}?tab=SubflowRuns", names)
    assert "2 Subflow runs" in text
    for kid in kids:
        assert f"restore-shard / {kid.name}" in text
    assert text.count("Work Queue shards") == 2
    text = page_text(tmp_path, f"{page}?tab=Artifacts", ["restore-summary"])
    for key in ("restore-summary", "restore-manifest", "restore-report"):
        assert key in text, key
    assert "6 images" in text  # the progress artifact

    shot = tmp_path / "prefect-ui-run.png"
    chromium(tmp_path, f"{page}?tab=SubflowRuns", f"--screenshot={shot}")
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)
    if os.environ.get("GDP_UI_SCREENSHOT"):  # to refresh docs/img/prefect-ui-run.png
        shutil.copy(shot, os.environ["GDP_UI_SCREENSHOT"])
