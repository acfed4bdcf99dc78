"""gdp.collection without Prefect: shards, config hashes, discovery, planning, manifests, summaries."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from gdp import collection as col
from gdp.io import ImageError
from gdp.prior.checkpoint import PriorSpec, build_prior, save_prior


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def photo(height: int, width: int, top: int = 40, left: int = 120) -> np.ndarray:
    return np.ascontiguousarray(skimage.data.astronaut()[top:top + 4 * height:4, left:left + 4 * width:4])


def put(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def job(name: str, n_patches: int) -> col.ImageJob:
    return col.ImageJob(f"/in/{name}", name, f"/out/{name}", 32, 32, n_patches, "0" * 64)


# ------------------------------------------------------------------------------------- shards


def test_make_shards_packs_whole_images_biggest_first():
    jobs = [job("a", 1), job("b", 5), job("c", 3), job("d", 9), job("e", 2), job("f", 2)]
    shards = col.make_shards(jobs, 6)
    assert [[j.relpath for j in s] for s in shards] == [["d"], ["b"], ["c", "e"], ["f", "a"]]
    assert [sum(j.n_patches for j in s) for s in shards] == [9, 5, 5, 3]  # 9 > 6: a shard of its own
    flat = [j for s in shards for j in s]
    assert sorted(flat, key=lambda j: j.relpath) == jobs  # every job exactly once, unchanged
    assert [j.n_patches for j in flat] == sorted((j.n_patches for j in jobs), reverse=True)
    assert col.make_shards(jobs, 1000) == [sorted(jobs, key=lambda j: -j.n_patches)]
    assert [len(s) for s in col.make_shards(jobs, 1)] == [1] * 6
    assert col.make_shards([], 8) == []


def test_split_balanced_groups_whole_images_by_planned_patches():
    jobs = [job("a", 1), job("b", 5), job("c", 3), job("d", 9), job("e", 2), job("f", 2), job("g", 4)]
    groups = col.split_balanced(jobs, 2)
    assert [[j.relpath for j in g] for g in groups] == [["d", "c", "a"], ["b", "g", "e", "f"]]
    assert [sum(j.n_patches for j in g) for g in groups] == [13, 13]
    assert sorted(j.relpath for g in groups for j in g) == list("abcdefg")  # every job exactly once
    three = col.split_balanced(jobs, 3)
    assert [sum(j.n_patches for j in g) for g in three] == [9, 9, 8]
    assert [len(g) for g in col.split_balanced(jobs[:2], 4)] == [1, 1]  # no empty groups
    assert col.split_balanced([], 3) == []
    assert [len(g) for g in col.split_balanced([job(n, 0) for n in "xyz"], 2)] == [2, 1]  # zero-patch plans count 1


# ------------------------------------------------------------------------------- config hash


def test_config_hash_covers_the_result_and_nothing_else():
    base = col.Settings(task="sr", options={"factor": 4, "filter": "avgpool"}, steps=100, seed=0)
    h = base.config_hash("prior-a")
    assert len(h) == 16 and int(h, 16) >= 0
    assert base.config_hash("prior-a") == h  # deterministic
    changed = [replace(base, steps=50), replace(base, seed=1),
               replace(base, options={"factor": 2, "filter": "avgpool"}),
               replace(base, options={"factor": 4, "filter": "bicubic"}), replace(base, task="deblur", options={}),
               replace(base, guidance="xt"), replace(base, scale=0.5), replace(base, samples=2),
               replace(base, tiling="fused"), replace(base, patch=64), replace(base, stride=16),
               replace(base, blend="uniform")]
    hashes = {s.config_hash("prior-a") for s in changed}
    assert h not in hashes and len(hashes) == len(changed)
    assert base.config_hash("prior-b") != h
    same = [replace(base, batch_size=1), replace(base, storage_options={"anon": True, "key": "secret"}),
            replace(base, options={"filter": "avgpool", "factor": 4}),  # key order
            replace(base, prior="/elsewhere/same-weights.safetensors")]  # the prior is named by its id
    assert {s.config_hash("prior-a") for s in same} == {h}
    config = base.result_config("prior-a")
    assert config["prior_id"] == "prior-a" and "batch_size" not in config and "storage_options" not in config


# ----------------------------------------------------------------------------- discover/plan


def test_discover_skips_masks_and_respects_max_images(tmp_path):
    for rel in ["a.png", "a.mask.png", "sub/b.jpg", "sub/b.mask.png", "c.TIF", "notes.txt", "d.PNG"]:
        put(tmp_path / rel, b"x")
    found = col.discover(str(tmp_path))
    assert [Path(u).relative_to(tmp_path).as_posix() for u in found] == ["a.png", "c.TIF", "d.PNG", "sub/b.jpg"]
    assert col.discover(str(tmp_path), max_images=2) == found[:2]
    assert [Path(u).name for u in col.discover(str(tmp_path), pattern="*.png")] == ["a.png"]


SR2 = col.Settings(task="sr", options={"factor": 2, "filter": "avgpool"})


def test_plan_image_ok(tmp_path):
    data = png(photo(20, 18))
    uri = put(tmp_path / "in" / "sub" / "a.png", data)
    j = col.plan_image(uri, str(tmp_path / "in"), str(tmp_path / "out"), SR2, 32)
    assert (j.relpath, j.output_uri) == ("sub/a.png", str(tmp_path / "out" / "sub" / "a.png"))
    assert (j.width, j.height, j.status, j.error) == (36, 40, "pending", "")
    assert j.n_patches == 4  # 36x40 in 32-px windows with stride 24: 2 x 2
    assert j.content_sha256 == hashlib.sha256(data).hexdigest()
    small = col.plan_image(put(tmp_path / "in" / "s.png", png(photo(8, 8))), str(tmp_path / "in"), "/o", SR2, 32)
    assert (small.width, small.height, small.n_patches) == (16, 16, 1)  # smaller than a patch: one canvas
    inpaint = col.Settings(task="inpaint")  # sidecar masks: the shape does not need the mask
    assert col.plan_image(uri, str(tmp_path / "in"), "/o", inpaint, 32).width == 18


@pytest.mark.parametrize("name, data, max_pixels, problem", [
    ("bomb.png", png(photo(20, 20)), 399, "20x20 exceeds the limit of 399 pixels (decompression bomb)"),
    ("empty.png", b"", None, "empty file (0 bytes)"),
    ("text.png", b"hello, not an image\n" * 10, None, "not an image (cannot identify image file)"),
    ("fake.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00", None, "truncated file"),  # 17 bytes
])
def test_plan_image_failures_are_failed_jobs(tmp_path, name, data, max_pixels, problem):
    uri = put(tmp_path / "in" / name, data)
    j = col.plan_image(uri, str(tmp_path / "in"), str(tmp_path / "out"), SR2, 32, max_pixels)
    assert j.status == "failed" and j.error == f"{uri}: {problem}"
    assert "\n" not in j.error
    assert (j.width, j.height, j.n_patches, j.content_sha256) == (0, 0, 0, "")
    assert j.relpath == name and j.output_uri == str(tmp_path / "out" / name)


def test_plan_image_missing_file(tmp_path):
    uri = str(tmp_path / "gone.png")
    j = col.plan_image(uri, str(tmp_path), str(tmp_path / "out"), SR2, 32)
    assert j.status == "failed" and j.error == f"{uri}: no such file"


@pytest.mark.parametrize("relpath, problem", [
    ("/some/dir/PWNED.png", "is absolute"), ("../PWNED.png", "'..' segment"), ("a/../../x.png", "'..' segment"),
    ("a/..", "'..' segment"), ("a//b.png", "not canonical"), ("./a.png", "not canonical"), ("a/./b.png", "not canonical"),
    ("..\\x.png", "backslash"), ("a\\b.png", "backslash"), ("a\nb.png", "control character"),
    ("a\x00.png", "control character"), ("C:/x.png", "drive letter"), ("c:x.png", "drive letter"), ("", "empty"),
    ("_manifests/run-x.parquet", "reserved folder _manifests/"), ("_work/r/x.png", "reserved folder _work/"),
])
def test_output_uri_for_refuses_paths_that_leave_the_root(relpath, problem):
    for root in ("s3://bucket/out", "/data/out", "memory://x"):
        with pytest.raises(col.UnsafePathError, match=problem.replace("(", r"\(")):
            col.output_uri_for(root, relpath)


def test_output_uri_for_joins_canonical_paths(tmp_path):
    assert col.output_uri_for("s3://bucket/out/", "a/b.png") == "s3://bucket/out/a/b.png"
    assert col.output_uri_for("s3://bucket", "a.png") == "s3://bucket/a.png"
    assert col.output_uri_for("/", "a.png") == "/a.png"
    assert col.output_uri_for(str(tmp_path), "sub/_work.png") == f"{tmp_path}/sub/_work.png"  # only the top level
    assert col.output_uri_for(str(tmp_path), "..a/b...png") == f"{tmp_path}/..a/b...png"  # dots inside names
    # a link already in a local output tree that points out of it
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(col.UnsafePathError, match="symbolic link"):
        col.output_uri_for(str(tmp_path / "out"), "link/x/y.png")
    assert col.output_uri_for(str(tmp_path / "out"), "real/x/y.png") == f"{tmp_path}/out/real/x/y.png"
    (tmp_path / "root-link").symlink_to(tmp_path / "out")  # a root that is itself a link is the user's choice
    assert col.output_uri_for(str(tmp_path / "root-link"), "a.png") == f"{tmp_path}/root-link/a.png"


def test_plan_image_unsafe_relative_path_is_a_failed_job(tmp_path):
    uri = put(tmp_path / "in" / "a\\b.png", png(photo(8, 8)))
    j = col.plan_image(uri, str(tmp_path / "in"), str(tmp_path / "out"), SR2, 32)
    assert j.status == "failed" and j.output_uri == "" and j.relpath == "a\\b.png"
    assert j.error == f"{uri}: its relative path holds a backslash ('a\\\\b.png'); nothing is written for it"


def test_one_line():
    assert col.one_line(ImageError("s3://b/a.png", "truncated\nfile")) == "s3://b/a.png: truncated file"
    assert col.one_line(ValueError("bad\n  option")) == "bad option"
    assert col.one_line(OSError("connection\nreset")) == "OSError: connection reset"
    assert col.one_line(RuntimeError()) == "RuntimeError: RuntimeError"


# ------------------------------------------------------------------------ transient errors


def test_is_transient_knows_the_storage_clients_errors():
    import errno

    import aiohttp
    from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError, ReadTimeoutError
    s3_error = OSError(errno.EIO, "We encountered an internal error")  # how s3fs translates S3's 500
    s3_error.__cause__ = ClientError({"Error": {"Code": "InternalError"}}, "GetObject")
    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
                 ConnectionClosedError(endpoint_url="http://127.0.0.1:1"),
                 ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), ConnectionRefusedError(), TimeoutError(),
                 OSError(errno.EBUSY, "SlowDown"), s3_error, ClientError({"Error": {"Code": "SlowDown"}}, "PutObject"),
                 ClientError({"Error": {"Code": "X"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"),
                 aiohttp.ServerDisconnectedError(), RuntimeError("CUDA error: an illegal memory access")]
    wrapped = ImageError("s3://b/a.png", "x")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    transient.append(wrapped)  # the cause decides
    permanent = [ImageError("s3://b/a.png", "truncated file"), ValueError("bad"), FileNotFoundError("a.png"),
                 PermissionError("AccessDenied"), OSError(errno.ENOSPC, "No space left on device"),
                 OSError("Truncated File Read"), MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate"),
                 RuntimeError("DefaultCPUAllocator: can't allocate memory"), RuntimeError("size mismatch"),
                 KeyError("x"), ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"), None]
    assert [col.is_transient(e) for e in transient] == [True] * len(transient)
    assert [col.is_transient(e) for e in permanent] == [False] * len(permanent)


def test_retrying_waits_through_transient_errors_within_its_budget(monkeypatch):
    import time
    sleeps = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the clock of the waits, not the thing under test
    calls = []

    def flaky(n: int):
        calls.append(n)
        if len(calls) < 4:
            raise ConnectionRefusedError("refused")
        return "done"

    assert col.retrying(100, flaky, 7) == "done" and calls == [7] * 4
    assert sleeps == list(col.RETRY_DELAYS[:3])
    calls.clear()
    with pytest.raises(ValueError):  # not transient: at once
        col.retrying(100, lambda: calls.append(1) or int("x"))
    assert calls == [1]
    with pytest.raises(ConnectionRefusedError):  # a budget of 0: one attempt
        col.retrying(0, flaky, 1)
    assert sum(col.RETRY_DELAYS) < col.Settings().retry_seconds  # the default outlasts every listed wait


# ------------------------------------------------------------------------------ restore_shard


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory) -> str:
    spec = PriorSpec.from_preset("adm-tiny-32")
    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    save_prior(str(path), build_prior(spec), spec)
    return str(path)


def test_restore_shard_bad_inputs_are_error_results(tmp_path, prior_file):
    """Unreadable images and missing/corrupt sidecar masks are per-image errors, not exceptions
    (an exception would be retried and fail the whole shard)."""
    full = png(photo(16, 16))
    put(tmp_path / "in" / "trunc.png", full[:len(full) // 2])
    put(tmp_path / "in" / "nomask.png", full)
    put(tmp_path / "in" / "badmask.png", full)
    put(tmp_path / "in" / "badmask.mask.png", b"garbage")
    settings = col.Settings(task="inpaint", prior=prior_file, steps=1)
    jobs = [col.plan_image(str(tmp_path / "in" / n), str(tmp_path / "in"), str(tmp_path / "out"), settings, 32)
            for n in ("trunc.png", "nomask.png", "badmask.png")]
    assert all(j.status == "pending" for j in jobs)  # the header-only plan cannot see these problems
    seen = []
    results = col.restore_shard(jobs, settings, str(tmp_path / "work"), "cpu", progress=seen.append)
    assert seen == jobs and [r.job for r in results] == jobs
    trunc, nomask, badmask = (r.error for r in results)
    assert trunc == f"{tmp_path}/in/trunc.png: truncated file"
    assert nomask.startswith(f"{tmp_path}/in/nomask.png: cannot read the inpainting mask "
                             f"{tmp_path}/in/nomask.mask.png (")
    assert badmask.startswith(f"{tmp_path}/in/badmask.png: cannot read the inpainting mask")
    assert all(r.work_uri == "" and r.nfe == 0 for r in results)
    assert not (tmp_path / "work").exists()


# ----------------------------------------------------------------------------------- manifests


def row(sha: str, status: str, config: str = "cfg", **values) -> dict:
    j = col.ImageJob(f"/in/{sha}.png", f"{sha}.png", f"/out/{sha}.png", 10, 20, 1, sha, status)
    return {**col.manifest_row(j, SR2, "prior", config, "run"), "output_sha256": f"out-{sha}", **values}


def done_keys(out: str) -> set[tuple[str, str]]:
    """(content_sha256, config_hash) of the ok rows that previous_successes found (each with its output hash)."""
    found = col.previous_successes(out)
    assert all(hashes == {f"out-{sha}"} and path == f"/out/{sha}.png" for (path, sha, _), hashes in found.items())
    return {(sha, config) for _, sha, config in found}


def test_write_manifest_and_previous_successes(tmp_path):
    out = str(tmp_path / "out")
    assert col.previous_successes(out) == {}
    uri = col.write_manifest([row("a", "ok"), row("b", "skipped"), row("c", "failed", error="x: bad")], out, "r1")
    assert uri == str(tmp_path / "out" / "_manifests" / "run-r1.parquet")
    col.write_manifest([row("d", "ok", "other"), row("c", "failed")], out, "r2")
    col.write_manifest([], out, "r3")  # an empty run still writes a readable manifest
    assert done_keys(out) == {("a", "cfg"), ("d", "other")}

    table = pq.read_table(uri)
    assert table.schema.equals(col.manifest_schema())
    assert table.column("status").to_pylist() == ["ok", "skipped", "failed"]
    assert table.column("error").to_pylist() == ["", "", "x: bad"]
    assert table.column("psnr").to_pylist() == [None] * 3
    first = table.to_pylist()[0]
    assert json.loads(first["params_json"]) == SR2.result_config("prior")
    assert (first["width"], first["height"], first["n_patches"], first["steps"]) == (10, 20, 1, 100)
    assert first["finished_at"].tzinfo is not None
    assert pq.read_table(str(tmp_path / "out" / "_manifests")).num_rows == 5
    assert sorted(p.name for p in (tmp_path / "out" / "_manifests").iterdir()) == \
        ["run-r1.parquet", "run-r2.parquet", "run-r3.parquet"]  # no temporary files left


def test_journal_and_shard_manifests_count_as_done_but_stay_out_of_the_dataset(tmp_path):
    """A run that dies keeps its journaled rows; a child run's partial manifest counts too; dataset
    readers of _manifests see only run manifests (pyarrow skips "_" folders)."""
    out = str(tmp_path / "out")
    col.write_manifest([row("a", "ok")], out, "r1")
    journaled = col.journal_row(row("b", "ok"), out, "crashed")
    col.journal_row(row("c", "failed"), out, "crashed")
    assert journaled.startswith(str(tmp_path / "out" / "_manifests" / "_journal" / "run-crashed") + "/")
    shard = col.shard_manifest_uri(out, "child-1")
    assert shard == str(tmp_path / "out" / "_manifests" / "_shards" / "run-child-1.parquet")
    assert col.write_manifest([row("d", "ok"), row("e", "skipped")], out, "child-1",
                              folder="_manifests/_shards") == shard
    assert [r["status"] for r in col.read_manifest(shard)] == ["ok", "skipped"]
    assert done_keys(out) == {("a", "cfg"), ("b", "cfg"), ("d", "cfg")}
    assert pq.read_table(str(tmp_path / "out" / "_manifests")).num_rows == 1  # run manifests only
    col.clear_journal(out, "crashed")
    col.clear_journal(out, "never-ran")  # nothing to clear: no error
    assert done_keys(out) == {("a", "cfg"), ("d", "cfg")}
    assert not (tmp_path / "out" / "_manifests" / "_journal" / "run-crashed").exists()


def test_summarise():
    rows = [row("a", "ok", width=40, height=40, seconds=2.0, consistency_psnr=30.0, psnr=20.0, ssim=0.5),
            row("b", "ok", width=20, height=50, seconds=1.0, consistency_psnr=20.0),
            row("c", "skipped"), row("d", "failed")]
    assert col.summarise(rows) == {
        "images": 4, "ok": 2, "skipped": 1, "failed": 1, "mean_consistency_psnr": 25.0,
        "min_consistency_psnr": 20.0, "mean_psnr": 20.0, "min_psnr": 20.0, "mean_ssim": 0.5,
        "seconds_per_megapixel": 1153.85}  # 3 s for (1600 + 1000) pixels
    assert col.summarise([row("c", "skipped")]) == {
        "images": 1, "ok": 0, "skipped": 1, "failed": 0, "mean_consistency_psnr": None,
        "min_consistency_psnr": None, "mean_psnr": None, "min_psnr": None, "mean_ssim": None,
        "seconds_per_megapixel": None}


# ----------------------------------------------------------------------------------- the lease


def plant_lease(out: Path, n: int, **holder) -> Path:
    """Write generation n of the lease as another run would have."""
    path = out / "_manifests" / "_lease" / f"g-{n:012d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": "other", "token": "t", **holder}))
    return path


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    out = tmp_path / "out"
    here, now = socket.gethostname(), time.time()
    with col.Lease(str(out), "r1") as first:
        with pytest.raises(col.LeaseHeldError, match=r"run r1 \(host .*, pid \d+\) is writing this output"):
            col.Lease(str(out), "r2").acquire()
        assert first.generation == 1 and not first.lost
    assert not list((out / "_manifests" / "_lease").iterdir())  # released: free at once

    live = plant_lease(out, 4, host="elsewhere", pid=1, expires=now + 60)  # another host, renewed lately
    with pytest.raises(col.LeaseHeldError, match="run other .* runs 6\\d s more"):
        col.Lease(str(out), "r3").acquire()
    live.unlink()
    plant_lease(out, 4, host="elsewhere", pid=1, expires=now - 1)  # another host, stopped renewing
    with col.Lease(str(out), "r3") as lease:
        assert lease.generation == 5
        assert [p.name for p in (out / "_manifests" / "_lease").iterdir()] == ["g-000000000005.json"]

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant_lease(out, 7, host=here, pid=int(gone.stdout), expires=now + 60)  # this host, its process is dead
    with col.Lease(str(out), "r4") as lease:
        assert lease.generation == 8
    plant_lease(out, 9, host=here, pid=os.getpid(), expires=now + 60)  # this host, alive (this very process)
    with pytest.raises(col.LeaseHeldError):
        col.Lease(str(out), "r5").acquire()


def test_lease_an_unreadable_generation_file_counts_as_dead_after_10_s(tmp_path):
    import os
    import time
    path = tmp_path / "out" / "_manifests" / "_lease" / "g-000000000001.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # its writer died between creating and writing it
    with pytest.raises(col.LeaseHeldError, match="taking the output's lease right now"):
        col.Lease(str(tmp_path / "out"), "r1").acquire()
    os.utime(path, (time.time() - 11, time.time() - 11))
    with col.Lease(str(tmp_path / "out"), "r1") as lease:
        assert lease.generation == 2


def test_recover_merges_journals_and_removes_what_dead_runs_left(tmp_path):
    out = tmp_path / "out"
    col.journal_row(row("a", "ok", nfe=7), str(out), "dead")
    col.journal_row(row("b", "ok", nfe=7), str(out), "dead")
    col.journal_row(row("c", "ok"), str(out), "finished")  # died after its manifest, before dropping the journal
    col.write_manifest([row("c", "ok")], str(out), "finished")
    put(out / "_work" / "dead" / "x.safetensors", b"x")
    put(out / "_work" / "mine" / "y.safetensors", b"y")
    put(out / "_manifests" / "run-z.parquet.tmp", b"")
    counts = col.recover(str(out), "mine")
    assert counts == {"journals_merged": 1, "rows_merged": 2, "work_folders_removed": 1, "temporary_files_removed": 1}
    assert sorted(r["content_sha256"] for r in col.read_manifest(str(out / "_manifests" / "run-dead.parquet"))) == \
        ["a", "b"]
    assert not (out / "_manifests" / "_journal" / "run-dead").exists()
    assert not (out / "_manifests" / "_journal" / "run-finished").exists()
    assert not (out / "_work" / "dead").exists() and (out / "_work" / "mine" / "y.safetensors").exists()
    assert len(pq.read_table(str(out / "_manifests"))) == 3
    assert col.recover(str(out), "mine") == dict.fromkeys(counts, 0)  # nothing left to do


def test_check_collection_refuses_wrong_locations_up_front(tmp_path):
    put(tmp_path / "in" / "a.png", png(photo(8, 8)))
    put(tmp_path / "in" / "out" / "old.png", png(photo(8, 8)))
    assert [Path(u).name for u in col.check_collection(str(tmp_path / "in"), str(tmp_path / "in" / "out"))] == ["a.png"]
    for input_uri, output_uri, pattern, problem in [
            (tmp_path / "in", tmp_path / "in", "**/*", "the output is the input folder"),
            (tmp_path / "in", str(tmp_path / "in") + "/", "**/*", "the output is the input folder"),
            (tmp_path / "in", tmp_path, "**/*", "the input lies inside the output"),
            (tmp_path / "nope", tmp_path / "o", "**/*", "no such file, folder or prefix"),
            (tmp_path / "in", tmp_path / "o", "*.jpg", "no image matches the pattern '*.jpg'")]:
        with pytest.raises(ValueError) as e:
            col.check_collection(str(input_uri), str(output_uri), pattern)
        assert problem in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
