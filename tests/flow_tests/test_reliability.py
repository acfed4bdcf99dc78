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


# ------------------------------------------------------------ 2. one bad file is one failed row


def as_unprivileged(argv: list[str]) -> list[str]:
    """argv run without the right to bypass file modes: as root, through setpriv dropping
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (a mode of 000 then denies reading, as for any user)."""
    if os.geteuid() != 0:
        return argv
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *argv]


def test_bad_files_on_s3_are_failed_rows_and_the_rest_is_restored(s3_env, images, tiny_prior_path):
    """A 17-byte file with the PNG signature, random bytes, and an object that is listed but whose
    GET fails (an archived GLACIER object: InvalidObjectState): each a failed row at once (no
    retries), the good images restored, a manifest written."""
    import time

    import boto3
    fs = s3fs_fresh()
    for bucket in ("badfiles-in", "badfiles-out"):
        if not fs.exists(bucket):
            fs.mkdir(bucket)
    good = {f"coll/good{k}.png": images.png(images.crop(16, 16, "astronaut", top=40 + 8 * k, left=120))
            for k in range(2)}
    fake = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + b"\x00"  # 17 bytes: a header cut short
    for key, data in {**good, "coll/fake.png": fake,
                      "coll/noise.png": os.urandom(300)}.items():
        fs.pipe_file(f"badfiles-in/{key}", data)
    boto3.client("s3").put_object(Bucket="badfiles-in", Key="coll/archived.png", Body=good["coll/good0.png"],
                                  StorageClass="GLACIER")
    start = time.monotonic()
    state, manifest = run_flow(input_uri="s3://badfiles-in/coll", output_uri="s3://badfiles-out/res",
                               prior=tiny_prior_path, **TINY)
    seconds = time.monotonic() - start
    rows = read_rows(manifest)
    assert state.is_failed() and "5 images: 2 ok or skipped, 3 failed" in state.message
    for key in good:
        assert rows[f"s3://badfiles-in/{key}"]["status"] == "ok"
    problems = {"fake.png": "truncated file", "noise.png": "not an image (cannot identify image file)",
                "archived.png": "cannot read it: permission denied (The operation is not valid for the "
                                "object's storage class)"}
    for name, problem in problems.items():
        r = rows[f"s3://badfiles-in/coll/{name}"]
        assert r["status"] == "failed" and r["error"] == f"s3://badfiles-in/coll/{name}: {problem}", r["error"]
    assert sorted(fs.find("badfiles-out/res")) == ["badfiles-out/res/_manifests/" + manifest.rsplit("/", 1)[1],
                                                   "badfiles-out/res/good0.png", "badfiles-out/res/good1.png"]
    assert seconds < 60  # no retry delays spent on bad files


def test_unreadable_local_file_is_a_failed_row_and_one_cli_line(tmp_path, images, tiny_prior_path,
                                                                prefect_api_url):
    """A file that cannot be read (mode 000, run without DAC override): the collection run writes
    its manifest with the good image ok and one failed row; `gdp restore` on it prints one line
    and exits 2."""
    import subprocess
    import sys
    png = images.png(images.crop(16, 16, "astronaut", top=40, left=120))
    images.write(tmp_path / "in" / "good.png", png)
    locked = Path(images.write(tmp_path / "in" / "locked.png", png))
    locked.chmod(0)
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(as_unprivileged([sys.executable, "-m", "flows", "restore", str(tmp_path / "in"),
                                           str(tmp_path / "out"), "--task", "sr", "--factor", "2", "--steps", "1",
                                           "--prior", tiny_prior_path]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (manifest,) = (tmp_path / "out" / "_manifests").glob("run-*.parquet")
    rows = read_rows(str(manifest))
    assert rows[str(tmp_path / "in" / "good.png")]["status"] == "ok"
    r = rows[str(locked)]
    assert r["status"] == "failed" and r["error"] == f"{locked}: cannot read it: permission denied"
    assert local_files(tmp_path / "out") == {"good.png", f"_manifests/{manifest.name}"}

    cli = subprocess.run(as_unprivileged([sys.executable, "-m", "gdp", "restore", str(locked),
                                          str(tmp_path / "one.png"), "--task", "sr", "--factor", "2",
                                          "--steps", "1", "--prior", tiny_prior_path]),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2, cli.stderr[-2000:]
    lines = [line for line in cli.stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].endswith(f"error: {locked}: cannot read it: permission denied"), cli.stderr
    assert not (tmp_path / "one.png").exists()
