"""Issue 15: the restore-collection flow against hostile inputs and flaky infrastructure.

Real files, the moto S3 server on loopback (tests/flow_tests/conftest.py), the session's Prefect
test server, and the tiny random prior. Each test names the promise of docs/RELIABILITY.md it holds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gdp import collection as col

ROOT = Path(__file__).resolve().parents[2]


def run_flow(**parameters):
    from flows.restore_collection import restore_collection
    state = restore_collection(**parameters, return_state=True)
    return state, state.result(raise_on_failure=False)


def s3fs_fresh():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def read_rows(uri: str) -> dict[str, dict]:
    """Manifest rows by source URI (local path or s3://)."""
    if uri.startswith("s3://"):
        with s3fs_fresh().open(uri.removeprefix("s3://"), "rb") as f:
            table = pq.read_table(f)
    else:
        table = pq.read_table(uri)
    return {r["source_uri"]: r for r in table.to_pylist()}


def local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


TINY = dict(task="sr", options={"factor": 2}, steps=1)


# ------------------------------------------------------------- 1. nothing outside the output root


@pytest.fixture
def hostile_bucket(s3_env, images, tmp_path):
    """s3://hostile-in/coll with one good image and keys whose relative part is absolute (it names
    a local file under tmp_path), has '..' segments, or is inside a reserved folder."""
    fs = s3fs_fresh()
    for bucket in ("hostile-in", "hostile-out"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    for key in fs.find("hostile-in") + fs.find("hostile-out"):
        fs.rm_file(key)
    png = images.png(images.crop(16, 16, "astronaut", top=40, left=120))
    absolute = tmp_path / "elsewhere" / "PWNED.png"  # the key's relative part is this local path
    keys = {"good": "coll/good.png", "absolute": "coll/" + str(absolute),  # coll//tmp/.../PWNED.png
            "dotdot": "coll/../PWNED.png", "deep": "coll/a/../../PWNED2.png",
            "reserved": "coll/_manifests/run-evil.png"}
    for key in keys.values():
        fs.pipe_file(f"hostile-in/{key}", png)
    return keys, absolute


def check_hostile_rows(rows: dict, keys: dict, output_root: str) -> None:
    good = f"s3://hostile-in/{keys['good']}"
    assert rows[good]["status"] == "ok" and rows[good]["output_uri"] == f"{output_root}/good.png"
    problems = {"absolute": "is absolute", "dotdot": "'..' segment", "deep": "'..' segment",
                "reserved": "reserved folder _manifests/"}
    for name, problem in problems.items():
        r = rows[f"s3://hostile-in/{keys[name]}"]
        assert r["status"] == "failed" and r["output_uri"] == "", name
        assert r["error"].startswith(f"s3://hostile-in/{keys[name]}: ") and problem in r["error"], r["error"]
    assert len(rows) == 5


def test_hostile_keys_write_nothing_outside_an_s3_output_root(hostile_bucket, tiny_prior_path):
    keys, absolute = hostile_bucket
    state, manifest = run_flow(input_uri="s3://hostile-in/coll", output_uri="s3://hostile-out/res",
                               prior=tiny_prior_path, **TINY)
    assert state.is_failed() and "5 images: 1 ok or skipped, 4 failed" in state.message
    check_hostile_rows(read_rows(manifest), keys, "s3://hostile-out/res")
    run_id = state.state_details.flow_run_id
    assert sorted(s3fs_fresh().find("hostile-out")) == [f"hostile-out/res/_manifests/run-{run_id}.parquet",
                                                        "hostile-out/res/good.png"]
    assert not absolute.exists() and not absolute.parent.exists()


def test_hostile_keys_write_nothing_outside_a_local_output_root(hostile_bucket, tiny_prior_path, tmp_path):
    keys, absolute = hostile_bucket
    out = tmp_path / "a" / "b" / "out"
    state, manifest = run_flow(input_uri="s3://hostile-in/coll", output_uri=str(out), prior=tiny_prior_path, **TINY)
    assert state.is_failed() and "4 failed" in state.message
    check_hostile_rows(read_rows(manifest), keys, str(out))
    run_id = state.state_details.flow_run_id
    assert local_files(tmp_path) == {"a/b/out/good.png", f"a/b/out/_manifests/run-{run_id}.parquet"}
    assert not absolute.exists()


def test_hostile_local_names_write_nothing_outside_the_output_root(tmp_path, images, tiny_prior_path):
    """Local names that are legal on Linux but not canonical relative paths everywhere."""
    png = images.png(images.crop(16, 16, "astronaut", top=40, left=120))
    names = {"good": "good.png", "backslash": "..\\..\\PWNED.png", "newline": "x\n.png",
             "reserved": "_work/run-evil/x.png"}
    for name in names.values():
        images.write(tmp_path / "in" / name, png)
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                               prior=tiny_prior_path, **TINY)
    rows = read_rows(manifest)
    assert len(rows) == 4 and state.is_failed()
    assert rows[str(tmp_path / "in" / "good.png")]["status"] == "ok"
    for name, problem in {"backslash": "backslash", "newline": "control character",
                          "reserved": "reserved folder _work/"}.items():
        r = rows[str(tmp_path / "in" / names[name])]
        assert r["status"] == "failed" and problem in r["error"] and r["output_uri"] == "", name
    run_id = state.state_details.flow_run_id
    assert local_files(tmp_path / "out") == {"good.png", f"_manifests/run-{run_id}.parquet"}
    assert local_files(tmp_path) - {f"in/{n}" for n in names.values()} == \
        {"out/good.png", f"out/_manifests/run-{run_id}.parquet"}
