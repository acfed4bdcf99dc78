"""Issue 15: the restore-collection flow against hostile inputs and flaky infrastructure.

Real files, the moto S3 server on loopback (tests/flow_tests/conftest.py), the session's Prefect
test server, and the tiny random prior. Each test names the promise of docs/RELIABILITY.md it holds.
"""

from __future__ import annotations

import json
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


CONTACT = "_manifests/_contact/"  # the run's contact sheet (gdp.contact_sheet), not at issue here


def local_files(root: Path) -> set[str]:
    """Files under root (relative paths), without contact sheets."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and CONTACT not in p.as_posix()}


def s3_files(fs, prefix: str) -> list[str]:
    return sorted(p for p in fs.find(prefix) if CONTACT not in p)


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
    assert s3_files(s3fs_fresh(), "hostile-out") == [f"hostile-out/res/_manifests/run-{run_id}.parquet",
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
    import shutil
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): a file mode cannot deny reading")
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
    assert s3_files(fs, "badfiles-out/res") == ["badfiles-out/res/_manifests/" + manifest.rsplit("/", 1)[1],
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


# ------------------------------------------------------------------ helpers: runs in processes

FLOW_SCRIPT = """
import json, sys
from flows.restore_collection import restore_collection
state = restore_collection(**json.loads(sys.argv[1]), return_state=True)
print("STATE", state.name, "|", state.message, flush=True)
"""


def flow_env(tmp_path: Path, prefect_api_url: str, name: str = "home") -> dict:
    return {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path / f"prefect-{name}"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "OMP_NUM_THREADS": "1"}


def start_flow(parameters: dict, env: dict):
    """The restore-collection flow in its own process (its own process group, so it can be killed)."""
    import json
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, json.dumps(parameters)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, seconds: float, what: str, proc=None) -> None:
    import time
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()[-2000:]} {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        time.sleep(0.2)


def write_photos(folder: Path, images, n: int) -> dict[str, bytes]:
    files = {f"p{k}.png": images.png(images.crop(16, 16, "astronaut", top=20 + 12 * k, left=100 + 9 * k))
             for k in range(n)}
    for name, data in files.items():
        images.write(folder / name, data)
    return files


def dataset(out: Path):
    import pandas as pd
    return pd.read_parquet(out / "_manifests")


# ------------------------------------------------------------------ 6. what a crash leaves


def test_kill_9_mid_run_is_tidied_and_merged_by_the_next_run(tmp_path, images, tiny_prior_path, prefect_api_url):
    """kill -9 after some images are journaled: the next run (the dead run's lease is freed at once on
    this host) turns the journal into the dead run's manifest (rows with metrics), removes its work
    folder, restores the rest and skips the finished ones: one ok row per input in the dataset."""
    import signal
    files = write_photos(tmp_path / "in", images, 6)
    out = tmp_path / "out"
    params = dict(input_uri=str(tmp_path / "in"), output_uri=str(out), prior=tiny_prior_path, task="sr",
                  options={"factor": 2}, steps=60, shard_patches=1)
    proc = start_flow(params, flow_env(tmp_path, prefect_api_url))
    journal = out / "_manifests" / "_journal"
    wait_for(lambda: len(list(journal.glob("run-*/*.parquet"))) >= 2, 240, "two journaled images", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (dead,) = [p.name.removeprefix("run-") for p in journal.iterdir()]
    finished = len(list((journal / f"run-{dead}").glob("*.parquet")))
    assert 2 <= finished < 6 and (out / "_work" / dead).exists()
    assert not list((out / "_manifests").glob("run-*.parquet"))  # it died before its manifest

    state, manifest = run_flow(**params)
    assert state.is_completed(), state.message
    table = dataset(out)
    assert set(table.flow_run_id) == {dead, str(state.state_details.flow_run_id)}
    recovered = table[table.flow_run_id == dead]
    assert len(recovered) == finished and set(recovered.status) == {"ok"}
    assert (recovered.nfe == 60).all() and recovered.consistency_psnr.notna().all()
    rerun = table[table.flow_run_id != dead]
    assert len(rerun) == 6 and (rerun.status == "skipped").sum() == finished
    assert (table.status == "ok").sum() == 6 and table[table.status == "ok"].source_uri.nunique() == 6
    assert local_files(out) == set(files) | {f"_manifests/run-{dead}.parquet", f"_manifests/{Path(manifest).name}"}


def test_a_full_disk_leaves_no_file_that_readers_trip_over(tmp_path):
    """A manifest write that fails for lack of space (a file size limit, EFBIG, in a child process)
    leaves no temporary file; the manifests folder still reads as one dataset."""
    import subprocess
    import sys
    out = tmp_path / "out"
    script = f"""
import resource, signal
from gdp import collection as col
job = col.ImageJob("/in/a.png", "a.png", "/out/a.png", 10, 10, 1, "sha")
row = {{**col.manifest_row(job, col.Settings(), "prior", "cfg", "r"), "status": "ok"}}
col.write_manifest([row], {str(out)!r}, "small")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    col.write_manifest([row] * 2000, {str(out)!r}, "big", retry_seconds=0)
except OSError as e:
    print("ERRNO", e.errno)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    import errno
    assert f"ERRNO {errno.EFBIG}" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(p.name for p in (out / "_manifests").iterdir()) == ["run-small.parquet"]
    assert len(dataset(out)) == 1


def test_the_next_run_removes_temporary_files_a_crash_left(tmp_path, images, tiny_prior_path):
    """A 0-byte run-….parquet.tmp (what the old writer left after a full disk) made every dataset read
    fail; the next run removes it (and hidden temporaries), so pandas reads the folder again."""
    write_photos(tmp_path / "in", images, 1)
    manifests = tmp_path / "out" / "_manifests"
    manifests.mkdir(parents=True)
    (manifests / "run-old.parquet.tmp").write_bytes(b"")
    (manifests / ".run-old2.parquet.tmp-0123456789abcdef").write_bytes(b"")
    with pytest.raises(Exception):
        dataset(tmp_path / "out")
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                               prior=tiny_prior_path, **TINY)
    assert state.is_completed(), state.message
    assert {f for f in local_files(manifests.parent) if f.startswith("_manifests/")} == \
        {f"_manifests/{Path(manifest).name}"}
    assert list(dataset(tmp_path / "out").status) == ["ok"]


def test_an_output_folder_inside_the_input_is_not_restored_again(tmp_path, images, tiny_prior_path):
    files = write_photos(tmp_path / "in", images, 2)
    out = tmp_path / "in" / "restored"
    for k in range(2):
        state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(out), prior=tiny_prior_path, **TINY)
        assert state.is_completed(), state.message
        rows = read_rows(manifest)
        assert sorted(Path(u).name for u in rows) == sorted(files)  # never restored/p0.png
        assert {r["status"] for r in rows.values()} == ({"ok"} if k == 0 else {"skipped"})
    assert {f for f in local_files(out) if not f.startswith("_manifests/")} == set(files)


@pytest.mark.parametrize("case", ["same", "input inside output", "no such folder", "no match", "s3 prefix"])
def test_wrong_locations_are_refused_before_anything_is_written(case, tmp_path, images, tiny_prior_path, s3_env,
                                                                 capsys):
    """Issue 19.1 and 15.6: refused up front with one line: the CLI exits 2, the flow run fails, and
    neither creates the output folder, a manifest, or a flow run (the CLI)."""
    from flows.__main__ import main
    write_photos(tmp_path / "in", images, 1)
    fs = s3fs_fresh()
    if not fs.exists("refuse-bucket"):
        fs.mkdir("refuse-bucket")
    input_uri, output_uri, pattern, problem = {
        "same": (str(tmp_path / "in"), str(tmp_path / "in"), "**/*", "the output is the input folder"),
        "input inside output": (str(tmp_path / "in"), str(tmp_path), "**/*", "the input lies inside the output"),
        "no such folder": (str(tmp_path / "no_such_dir"), str(tmp_path / "out"), "**/*",
                           "no such file, folder or prefix"),
        "no match": (str(tmp_path / "in"), str(tmp_path / "out"), "*.tif", "no image matches the pattern '*.tif'"),
        "s3 prefix": ("s3://refuse-bucket/no/such/prefix", str(tmp_path / "out"), "**/*",
                      "no such file, folder or prefix"),
    }[case]
    before = local_files(tmp_path)
    code = main(["restore", input_uri, output_uri, "--task", "sr", "--prior", tiny_prior_path, "--steps", "1",
                 "--pattern", pattern])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and problem in err[0] and err[0].startswith("error: "), err
    state, _ = run_flow(input_uri=input_uri, output_uri=output_uri, pattern=pattern, prior=tiny_prior_path, **TINY)
    assert state.is_failed() and problem in state.message
    assert local_files(tmp_path) == before and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 5. skips that tell the truth


def test_a_skip_checks_path_content_configuration_and_the_outputs_own_hash(tmp_path, images, tiny_prior_path):
    import hashlib
    files = write_photos(tmp_path / "in", images, 3)
    out = tmp_path / "out"
    params = dict(input_uri=str(tmp_path / "in"), output_uri=str(out), prior=tiny_prior_path, **TINY)

    def statuses(manifest) -> dict[str, str]:
        return {Path(u).name: r["status"] for u, r in read_rows(manifest).items()}

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    state, first = run_flow(**params)
    assert statuses(first) == {"p0.png": "ok", "p1.png": "ok", "p2.png": "ok"}
    rows = {Path(u).name: r for u, r in read_rows(first).items()}
    assert all(rows[n]["output_sha256"] == sha(out / n) for n in files)
    original = {n: (out / n).read_bytes() for n in files}

    (tmp_path / "in" / "p0.png").write_bytes(files["p1.png"])  # p0 now holds p1's bytes
    (out / "p2.png").write_bytes(original["p2.png"][:100])  # a truncated output
    state, second = run_flow(**params)
    assert statuses(second) == {"p0.png": "ok", "p1.png": "skipped", "p2.png": "ok"}
    assert (out / "p0.png").read_bytes() == original["p1.png"]  # p0 restored from its new bytes
    assert (out / "p2.png").read_bytes() == original["p2.png"]  # rewritten whole
    skipped = {Path(u).name: r for u, r in read_rows(second).items()}["p1.png"]
    assert skipped["output_sha256"] == sha(out / "p1.png")

    state, third = run_flow(**params)
    assert set(statuses(third).values()) == {"skipped"}


def test_two_runs_started_together_on_one_output(tmp_path, images, tiny_prior_path, prefect_api_url):
    """Two runs on one output: the output's lease lets exactly one write; the other fails at once with
    one line naming the holder and writes nothing; the dataset has one ok row per input. (The
    second starts once the first holds the lease, so that they surely overlap; two that take it at
    the same instant are told apart by the exclusive create, test_the_lease_is_exclusive_on_s3.)"""
    files = write_photos(tmp_path / "in", images, 3)
    out = tmp_path / "out"
    params = dict(input_uri=str(tmp_path / "in"), output_uri=str(out), prior=tiny_prior_path, task="sr",
                  options={"factor": 2}, steps=40)
    first = start_flow(params, flow_env(tmp_path, prefect_api_url, "home1"))
    wait_for(lambda: list((out / "_manifests" / "_lease").glob("g-*.json")), 240, "the first run's lease", first)
    second = start_flow(params, flow_env(tmp_path, prefect_api_url, "home2"))
    (out1, err1), (out2, err2) = first.communicate(timeout=400), second.communicate(timeout=400)
    assert "STATE Completed |" in out1, err1[-3000:]
    assert "STATE Failed |" in out2 and "concurrent runs on one output are refused" in out2, out2 + err2[-3000:]
    table = dataset(out)
    assert len(table) == 3 and set(table.status) == {"ok"} and table.source_uri.nunique() == 3
    assert {f for f in local_files(out) if not f.startswith("_manifests/")} == set(files)


def test_the_lease_is_exclusive_on_s3(s3_env):
    """Conditional PUTs (If-None-Match) on the loopback S3 server: a second holder is refused while
    the first lives, and gets the lease once it is released."""
    fs = s3fs_fresh()
    if not fs.exists("lease-bucket"):
        fs.mkdir("lease-bucket")
    first = col.Lease("s3://lease-bucket/out", "run-a").acquire()
    try:
        assert first.generation == 1
        with pytest.raises(col.LeaseHeldError, match="run run-a .* is writing this output"):
            col.Lease("s3://lease-bucket/out", "run-b").acquire()
        with pytest.raises(FileExistsError):  # what makes two simultaneous takers safe
            first._create(1)
        first.renew()
        assert not first.lost
    finally:
        first.release()
    path = "lease-bucket/out/_manifests/_lease/g-000000000001.json"
    with col.Lease("s3://lease-bucket/out", "run-b") as second:
        assert second.generation == 1 and fs.find("lease-bucket/out") == [path]
    assert fs.find("lease-bucket/out") == []
    # a holder presumed dead whose generation was taken over by another run notices at its next renewal
    stalled = col.Lease("s3://lease-bucket/out", "run-c").acquire()
    stalled._stop.set()  # its renewals stop (a stalled process)
    fs.rm_file(path)  # presumed dead: its file is gone, and another run takes the same generation
    with col.Lease("s3://lease-bucket/out", "run-d") as taker:
        stalled._stop.clear()
        stalled.renew()
        assert stalled.lost and not taker.lost
        stalled.release()  # a lost lease is not released: the file is the taker's
        assert b"run-d" in fs.cat_file(path)
    assert fs.find("lease-bucket/out") == []


# ------------------------------------------------------------ 3. limits before allocation


def peak_rss(argv: list[str], env: dict, address_space: int | None = None, timeout: float = 300):
    """Run a child to its end: (returncode, stdout, stderr, peak RSS in bytes), from its own rusage."""
    import resource
    import subprocess
    import tempfile

    def cap():
        if address_space:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, preexec_fn=cap)
        import time
        deadline = time.monotonic() + timeout
        while True:  # wait4 reaps the child and gives its own resource usage
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv[:4]} ran past {timeout} s")
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), usage.ru_maxrss * 1024


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line and
             not line.startswith("restore ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


GIB = 1 << 30


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> str:
    """A 9000x9000 PNG of under 100 KB (a flat gray compresses to nearly nothing)."""
    from PIL import Image
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("L", (9000, 9000), 128).save(path, optimize=True)
    assert path.stat().st_size < 256 * 1024
    return str(path)


def test_a_tiny_prior_file_that_declares_a_huge_network_is_refused_before_building_it(tmp_path, images):
    """524 bytes of safetensors whose metadata declares a 2048-channel ADM (billions of weights):
    refused by the shape check on the meta device, in one line, with the CLI's peak RSS far below
    what building the network would take."""
    import json
    import sys

    import torch
    from safetensors.torch import save

    from gdp.prior.checkpoint import PriorSpec
    spec = {**PriorSpec.from_preset("adm-256-uncond").to_dict(), "preset": None}
    spec["unet"] = {**spec["unet"], "model_channels": 2048}
    prior = tmp_path / "huge.safetensors"
    prior.write_bytes(save({"x": torch.zeros(1)}, metadata={"gdp_spec": json.dumps(spec)}))
    assert prior.stat().st_size < 600
    absurd = tmp_path / "absurd.safetensors"
    spec["unet"] = {**spec["unet"], "model_channels": 10**7}
    absurd.write_bytes(save({"x": torch.zeros(1)}, metadata={"gdp_spec": json.dumps(spec)}))
    obs = images.write(tmp_path / "obs.png", images.png(images.crop(16, 16)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for path, problem in ((prior, "checkpoint does not fit the architecture; missing keys"),
                          (absurd, "declares model_channels = 10000000, outside 1..4096")):
        code, _, err, rss = peak_rss([sys.executable, "-m", "gdp", "restore", obs, str(tmp_path / "out.png"),
                                      "--task", "sr", "--factor", "2", "--steps", "1", "--prior", str(path)], env)
        assert code == 2 and problem in one_error_line(err), err[-2000:]
        assert rss < 1.5 * GIB, rss  # the declared network alone: about 28 GiB of float32 weights
    assert not (tmp_path / "out.png").exists()


def test_a_small_png_with_a_huge_output_is_refused_from_its_header(bomb_png, tmp_path, images, tiny_prior_path,
                                                                   prefect_api_url):
    """9000x9000 in under 100 KB, x2 super-resolution: an 18000x18000 output is above
    max_output_megapixels; the flow writes a failed row (no retries) and restores the good image,
    the CLI prints one line; neither decodes the image (peak RSS)."""
    import shutil
    import sys
    shutil.copy(bomb_png, images.write(tmp_path / "in" / "good.png", images.png(images.crop(16, 16))).replace(
        "good.png", "bomb.png"))
    env = flow_env(tmp_path, prefect_api_url)
    code, out, err, rss = peak_rss([sys.executable, "-m", "flows", "restore", str(tmp_path / "in"),
                                    str(tmp_path / "out"), "--task", "sr", "--factor", "2", "--steps", "1",
                                    "--prior", tiny_prior_path], env)
    assert code == 1, out[-2000:] + err[-2000:]
    (manifest,) = (tmp_path / "out" / "_manifests").glob("run-*.parquet")
    rows = {Path(u).name: r for u, r in read_rows(str(manifest)).items()}
    assert rows["good.png"]["status"] == "ok"
    assert rows["bomb.png"]["status"] == "failed" and rows["bomb.png"]["error"] == (
        f"{tmp_path / 'in' / 'bomb.png'}: its output would be 18000x18000 (324.0 MP), above the limit of 100 MP "
        "(max_output_megapixels)")
    assert "Retrying" not in err
    assert rss < 1.5 * GIB, rss  # decoding alone would hold 81 M pixels as float32 (0.3 GiB per channel)

    code, _, err, rss = peak_rss([sys.executable, "-m", "gdp", "restore", bomb_png, str(tmp_path / "one.png"),
                                  "--task", "sr", "--factor", "2", "--steps", "1", "--prior", tiny_prior_path],
                                 {**os.environ, "OMP_NUM_THREADS": "1"})
    assert code == 2 and one_error_line(err).endswith("its output would be 18000x18000 (324.0 MP), above the "
                                                      "limit of 100 MP (max_output_megapixels)"), err[-2000:]
    assert rss < 1.2 * GIB and not (tmp_path / "one.png").exists()


def test_an_image_that_needs_more_memory_than_the_process_can_get_is_refused(bomb_png, tmp_path, images,
                                                                             tiny_prior_path, prefect_api_url):
    """9000x9000 deblurred (81 MP, under the output limit) under a 6 GiB address-space cap: the
    memory estimate (about 7 GiB) exceeds what the process can get; one line / one failed row,
    without trying."""
    import shutil
    import sys
    images.write(tmp_path / "in" / "good.png", images.png(images.crop(16, 16)))
    shutil.copy(bomb_png, tmp_path / "in" / "bomb.png")
    cap = 6 * GIB
    code, _, err, _ = peak_rss([sys.executable, "-m", "gdp", "restore", bomb_png, str(tmp_path / "one.png"),
                                "--task", "deblur", "--steps", "1", "--prior", tiny_prior_path],
                               {**os.environ, "OMP_NUM_THREADS": "1"}, address_space=cap)
    line = one_error_line(err)
    assert code == 2 and "restoring it (9000x9000 hierarchical) needs about 6.9 GiB" in line, err[-2000:]
    assert "GiB (memory estimate, docs/RELIABILITY.md)" in line and not (tmp_path / "one.png").exists()

    code, out, err, _ = peak_rss([sys.executable, "-m", "flows", "restore", str(tmp_path / "in"),
                                  str(tmp_path / "out"), "--task", "deblur", "--steps", "1",
                                  "--prior", tiny_prior_path], flow_env(tmp_path, prefect_api_url), address_space=cap)
    assert code == 1, out[-2000:] + err[-3000:]
    (manifest,) = (tmp_path / "out" / "_manifests").glob("run-*.parquet")
    rows = {Path(u).name: r for u, r in read_rows(str(manifest)).items()}
    assert rows["good.png"]["status"] == "ok"
    assert rows["bomb.png"]["status"] == "failed" and "needs about 6.9 GiB" in rows["bomb.png"]["error"]


# ------------------------------------------------------------------------------ 4. outages


def test_a_40_second_s3_outage_mid_run_is_survived(s3_proxy, moto_endpoint, images, tiny_prior_path):
    """The flow talks to S3 through a loopback proxy; once the first output is written, the proxy
    refuses every connection for 40 s (botocore's EndpointConnectionError). Each storage operation
    waits it out (collection.retrying, 120 s by default): every image ends ok, nothing is restored twice."""
    import threading
    import time

    import s3fs
    direct = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True, use_listings_cache=False)
    for bucket in ("outage-in", "outage-out"):
        if not direct.exists(bucket):
            direct.mkdir(bucket)
    n = 12
    for k in range(n):
        direct.pipe_file(f"outage-in/coll/p{k:02d}.png",
                         images.png(images.crop(16, 16, "astronaut", top=20 + 9 * k, left=100 + 7 * k)))
    outage = {}

    def cut_when_first_output_appears():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(p.endswith(".png") for p in direct.find("outage-out/res")):
                s3_proxy.down()
                outage["start"] = time.monotonic()
                outage["written_before"] = len([p for p in direct.find("outage-out/res") if p.endswith(".png")])
                time.sleep(40)
                s3_proxy.up()
                outage["end"] = time.monotonic()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=cut_when_first_output_appears, daemon=True)
    watcher.start()
    state, manifest = run_flow(input_uri="s3://outage-in/coll", output_uri="s3://outage-out/res",
                               prior=tiny_prior_path, task="sr", options={"factor": 2}, steps=20, shard_patches=2)
    finished = time.monotonic()
    watcher.join(timeout=60)
    assert outage.get("end"), "the outage never happened"
    assert outage["written_before"] < n  # it struck mid-run
    assert finished > outage["end"]  # the run outlived it
    assert state.is_completed(), state.message
    rows = list(read_rows(manifest).values())
    assert len(rows) == n and {r["status"] for r in rows} == {"ok"}
    assert len([p for p in direct.find("outage-out/res") if p.endswith(".png") and CONTACT not in p]) == n


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_prefect_server_dying_mid_run_costs_artifacts_only(tmp_path, images, tiny_prior_path):
    """A real `prefect server start` on loopback, killed (its whole process group, -9) once the first
    image is journaled: the run still restores every image, writes its manifest and ends within a
    bounded time (artifact calls give up after 15 s; then only Prefect's own client retries on the
    final state remain)."""
    import signal
    import subprocess
    import sys
    import time
    files = write_photos(tmp_path / "in", images, 12)
    port = free_port()
    home = tmp_path / "server-home"
    server_env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_API_URL": ""}
    prefect = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(healthy, 180, "the Prefect server", server)
        out = tmp_path / "out"
        env = flow_env(tmp_path, f"http://127.0.0.1:{port}/api", "client")
        run = subprocess.Popen([sys.executable, "-m", "flows", "restore", str(tmp_path / "in"), str(out), "--task",
                                "sr", "--factor", "2", "--steps", "30", "--prior", tiny_prior_path],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        wait_for(lambda: list((out / "_manifests" / "_journal").glob("run-*/*.parquet")), 240,
                 "the first journaled image", run)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        killed, killed_at = time.monotonic(), time.time()
        try:
            _, stderr = run.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            raise AssertionError("the run hung after its Prefect server died")
        seconds = time.monotonic() - killed
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    (manifest,) = (out / "_manifests").glob("run-*.parquet")
    rows = list(read_rows(str(manifest)).values())
    assert len(rows) == 12 and {r["status"] for r in rows} == {"ok"}
    assert {f for f in local_files(out) if not f.startswith("_manifests/")} == set(files)
    assert not list((out / "_manifests" / "_journal").glob("run-*/*"))  # merged into the manifest
    assert "the Prefect API became unreachable during the run" in stderr or \
        "the Prefect API is unreachable: this run's outputs and manifest are written" in stderr, stderr[-3000:]
    assert run.returncode in (0, 1)
    assert seconds < 240, seconds  # the work, 15 s for an artifact call, then the engine's two state proposals
    print(f"the run ended {seconds:.0f} s after its server died; manifest after "
          f"{manifest.stat().st_mtime - killed_at:.0f} s")


# ------------------------------------------------------------------ 7. credentials through a block


@pytest.mark.parametrize("kind", ["aws-credentials", "s3-bucket", "secret"])
def test_storage_credentials_from_a_prefect_block(kind, s3_env, moto_endpoint, images, tiny_prior_path):
    """The AWS variables removed from the environment: the run reaches the loopback S3 server only
    through the block (prefect-aws AwsCredentials with the endpoint in its client parameters, an
    S3Bucket holding them, or a Secret holding the storage options); the secret appears neither in
    the run's parameters nor in its logs."""
    import uuid

    import s3fs
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters
    direct = s3fs.S3FileSystem(endpoint_url=moto_endpoint, key="testing", secret="testing",
                               skip_instance_cache=True, use_listings_cache=False)
    for bucket in ("block-in", "block-out"):
        if not direct.exists(bucket):
            direct.mkdir(bucket)
    direct.pipe_file("block-in/coll/a.png", images.png(images.crop(16, 16)))
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    name = f"moto-{kind}-{uuid.uuid4().hex[:8]}"
    credentials = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key=secret, region_name="us-east-1",
                                 aws_client_parameters=AwsClientParameters(endpoint_url=moto_endpoint))
    if kind == "aws-credentials":
        credentials.save(name)
    elif kind == "s3-bucket":
        S3Bucket(bucket_name="block-out", credentials=credentials).save(name)
    else:
        Secret(value={"key": "testing", "secret": secret, "endpoint_url": moto_endpoint}).save(name)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(var, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()
        state, manifest = run_flow(input_uri="s3://block-in/coll", output_uri=f"s3://block-out/{kind}",
                                   storage_block=f"{kind}/{name}", prior=tiny_prior_path, **TINY)
        s3fs.S3FileSystem.clear_instance_cache()
    assert state.is_completed(), state.message
    assert direct.exists(f"block-out/{kind}/a.png")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.parameters["storage_block"] == f"{kind}/{name}"
    assert secret not in json.dumps(flow_run.parameters) and all(secret not in log.message for log in logs)


def test_a_storage_block_that_does_not_exist_is_one_line():
    from flows.storage import storage_options
    with pytest.raises(ValueError, match="no aws-credentials block named 'nope'"):
        storage_options("aws-credentials/nope")
    with pytest.raises(ValueError, match="name a saved block as TYPE/NAME"):
        storage_options("my-json-block")


# ------------------------------------------------------------------------------ 8. names


def test_longest_legal_names_are_restored(tmp_path, images, tiny_prior_path):
    """250- and 255-byte file names (the longest a Linux folder holds): the temporary name of the
    atomic write no longer grows with the target's."""
    names = ["a" * 246 + ".png", "b" * 251 + ".png"]
    for name in names:
        images.write(tmp_path / "in" / name, images.png(images.crop(16, 16)))
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                               prior=tiny_prior_path, **TINY)
    assert state.is_completed(), state.message
    assert {r["status"] for r in read_rows(manifest).values()} == {"ok"}
    assert {f for f in local_files(tmp_path / "out") if not f.startswith("_manifests/")} == set(names)
    assert [len(n) for n in names] == [250, 255]


def test_object_names_are_escaped_in_the_markdown_report(tmp_path, images, tiny_prior_path):
    """Names with markdown and HTML in them (legal on S3 and on Linux) stay literal text in one cell
    of the run's report: the table keeps its columns, no link, no HTML."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    evil = ["a|b <script>alert(1)</script>.png", "[x](javascript:alert(1)) `code` *b*.png"]
    for name in evil:
        images.write(tmp_path / "in" / name, os.urandom(64))  # failed rows: name and error in the table
    images.write(tmp_path / "in" / "c|d_e.png", images.png(images.crop(16, 16)))  # an ok row
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"),
                               prior=tiny_prior_path, **TINY)
    assert state.is_failed()
    import time
    with get_client(sync_client=True) as client:
        for _ in range(50):  # the server records artifacts a little after the run
            (report,) = client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["restore-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))) or [None]
            if report:
                break
            time.sleep(0.2)
    markdown = report.data
    assert "<script>" not in markdown and "](javascript" not in markdown.replace("\\](javascript", "")
    import re
    rows = [line for line in markdown.splitlines() if line.startswith("| /")]
    assert len(rows) == 3  # 2 failed, 1 ok
    failed = [line for line in rows if "not an image" in line]  # unescaped pipes: the cell borders only
    assert len(failed) == 2 and all(len(re.findall(r"(?<!\\)\|", line)) == 3 for line in failed)
    ok = [line for line in rows if line not in failed]
    assert len(ok) == 1 and len(re.findall(r"(?<!\\)\|", ok[0])) == 5 and r"c\|d\_e.png" in ok[0]


def test_recover_on_s3(s3_env):
    """recover() on the loopback S3 server: a dead run's journal becomes its manifest, its work
    prefix and a temporary object in _manifests go; this run's own work prefix stays."""
    fs = s3fs_fresh()
    if not fs.exists("recover-bucket"):
        fs.mkdir("recover-bucket")
    out = "s3://recover-bucket/out"
    settings = col.Settings()
    for sha in ("a", "b"):
        job = col.ImageJob(f"s3://in/{sha}.png", f"{sha}.png", f"{out}/{sha}.png", 8, 8, 1, sha)
        col.journal_row({**col.manifest_row(job, settings, "prior", "cfg", "dead"), "status": "ok",
                         "output_sha256": f"o-{sha}"}, out, "dead")
    fs.pipe_file("recover-bucket/out/_work/dead/x.safetensors", b"x")
    fs.pipe_file("recover-bucket/out/_work/mine/y.safetensors", b"y")
    fs.pipe_file("recover-bucket/out/_manifests/run-z.parquet.tmp", b"")
    counts = col.recover(out, "mine")
    assert counts == {"journals_merged": 1, "rows_merged": 2, "work_folders_removed": 1, "temporary_files_removed": 1}
    assert sorted(s3_files(fs, "recover-bucket/out")) == ["recover-bucket/out/_manifests/run-dead.parquet",
                                                          "recover-bucket/out/_work/mine/y.safetensors"]
    assert sorted(r["content_sha256"] for r in col.read_manifest(f"{out}/_manifests/run-dead.parquet")) == ["a", "b"]
    assert set(col.previous_successes(out)) == {(f"{out}/a.png", "a", "cfg"), (f"{out}/b.png", "b", "cfg")}
