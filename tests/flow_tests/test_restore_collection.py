"""The restore-collection flow end to end (Prefect test server, moto S3, a tiny random prior) and
its task bodies through `.fn()`.

The S3 tests share one collection and run in order: first run -> same configuration again
(everything skipped) -> changed configuration (restored again).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gdp import collection as col
from gdp.io import ImageError, read_image
from gdp.metrics import psnr, ssim

ROOT = Path(__file__).resolve().parents[2]
MANIFEST_COLUMNS = ["source_uri", "output_uri", "status", "error", "task", "params_json", "width", "height",
                    "n_patches", "steps", "nfe", "seconds", "consistency_psnr", "psnr", "ssim",
                    "estimated_params_json", "seed", "prior_id", "config_hash", "content_sha256", "flow_run_id",
                    "finished_at"]


def run_flow(**parameters):
    from flows.restore_collection import restore_collection
    state = restore_collection(**parameters, return_state=True)
    return state, state.result(raise_on_failure=False)


def check_schema(schema) -> None:
    """The file's schema is manifest_schema(), column by column."""
    expected = col.manifest_schema()
    assert schema.names == expected.names
    for name in MANIFEST_COLUMNS:
        assert name in schema.names
    for name in expected.names:
        assert schema.field(name).type == expected.field(name).type, name


def rows_by_name(table) -> dict[str, dict]:
    return {r["source_uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def as_array(pixels: torch.Tensor) -> np.ndarray:
    """[1, C, H, W] in [0, 1] -> float64 [H, W, C]."""
    return pixels[0].permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------------------ S3 runs


def s3fs_fresh():
    import s3fs
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def read_s3_table(fs, uri: str):
    with fs.open(uri.removeprefix("s3://"), "rb") as f:
        return pq.read_table(f)


def s3_outputs(fs) -> dict[str, object]:
    """Every object under s3://out-bucket/res -> its LastModified."""
    return {p: info["LastModified"] for p, info in fs.find("out-bucket/res", detail=True).items()}


@pytest.fixture(scope="module")
def s3_collection(s3_env, images):
    """s3://in-bucket/coll: 4 good images (16-bit gray PNG, oriented JPEG with ICC in a subfolder,
    two RGB PNGs) and 3 bad files (random bytes, truncated PNG, zero bytes)."""
    fs = s3fs_fresh()
    fs.mkdir("in-bucket")
    fs.mkdir("out-bucket")
    icc = images.icc()
    stored_jpeg = images.crop(12, 16, "coffee", top=80, left=160, step=16)  # stored 16 wide, 12 high
    full = images.png(images.crop(16, 16, "astronaut", top=40, left=120))
    rng = np.random.default_rng(0)
    files = {
        "gray16.png": images.png(images.gray16(20, 20)),                      # -> 40x40, 16-bit
        "photos/oriented.jpg": images.jpeg(stored_jpeg, orientation=6, icc=icc),  # upright 12x16 -> 24x32
        "astro.png": images.png(images.crop(14, 18, "astronaut", top=20, left=200)),  # -> 36x28
        "coffee.png": images.png(images.crop(16, 16, "coffee", top=60, left=200)),  # -> 32x32
        "bad.png": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "trunc.png": full[:len(full) // 2],
        "empty.png": b"",
    }
    for rel, data in files.items():
        fs.pipe_file(f"in-bucket/coll/{rel}", data)
    return SimpleNamespace(files=files, icc=icc, stored_jpeg=stored_jpeg,
                           sizes={"gray16.png": (40, 40), "oriented.jpg": (24, 32), "astro.png": (36, 28),
                                  "coffee.png": (32, 32)})  # (width, height) of the outputs


S3_PARAMS = dict(input_uri="s3://in-bucket/coll", output_uri="s3://out-bucket/res", task="sr", options={"factor": 2},
                 steps=2)
GOOD = ("gray16.png", "oriented.jpg", "astro.png", "coffee.png")
BAD = ("bad.png", "trunc.png", "empty.png")


def s3_run(prior: str, **changes) -> SimpleNamespace:
    state, manifest = run_flow(**{**S3_PARAMS, "prior": prior, **changes})
    fs = s3fs_fresh()
    return SimpleNamespace(state=state, manifest=manifest, table=read_s3_table(fs, manifest), objects=s3_outputs(fs))


@pytest.fixture(scope="module")
def first_run(s3_collection, tiny_prior_path):
    return s3_run(tiny_prior_path)


@pytest.fixture(scope="module")
def second_run(first_run, tiny_prior_path):
    run = s3_run(tiny_prior_path)
    run.dataset = pq.read_table("out-bucket/res/_manifests", filesystem=s3fs_fresh())
    return run


@pytest.fixture(scope="module")
def third_run(second_run, tiny_prior_path):
    return s3_run(tiny_prior_path, seed=1)


def test_s3_end_to_end(first_run, s3_collection, tiny_prior_path):
    state, table = first_run.state, first_run.table
    run_id = str(state.state_details.flow_run_id)
    assert state.is_failed()
    assert "7 images: 4 ok or skipped, 3 failed" in state.message
    assert first_run.manifest == f"s3://out-bucket/res/_manifests/run-{run_id}.parquet"
    check_schema(table.schema)
    rows = rows_by_name(table)
    assert table.num_rows == 7 and sorted(rows) == sorted(GOOD + BAD)

    # columns shared by every row
    prior_id = col.cached_prior(tiny_prior_path, None, "cpu").prior_id
    assert prior_id.startswith("adm-tiny-32-")
    hashes = {r["config_hash"] for r in rows.values()}
    assert len(hashes) == 1 and len(hashes.pop()) == 16
    now = datetime.now(timezone.utc)
    for name, r in rows.items():
        rel = "photos/oriented.jpg" if name == "oriented.jpg" else name
        assert r["source_uri"] == f"s3://in-bucket/coll/{rel}"
        assert r["output_uri"] == f"s3://out-bucket/res/{rel}"
        assert r["task"] == "sr" and r["steps"] == 2 and r["seed"] == 0
        assert r["prior_id"] == prior_id and r["flow_run_id"] == run_id
        params = json.loads(r["params_json"])
        assert params["options"] == {"factor": 2, "filter": "avgpool"}
        assert (params["steps"], params["seed"], params["prior_id"], params["task"]) == (2, 0, prior_id, "sr")
        assert json.loads(r["estimated_params_json"]) == {}
        assert r["psnr"] is None and r["ssim"] is None  # no reference_uri
        assert now - timedelta(minutes=5) < r["finished_at"] <= now
        assert r["finished_at"].tzinfo is not None

    # good images
    for name in GOOD:
        r = rows[name]
        rel = "photos/oriented.jpg" if name == "oriented.jpg" else name
        assert r["status"] == "ok" and r["error"] == "", name
        assert (r["width"], r["height"]) == s3_collection.sizes[name]
        assert r["content_sha256"] == sha256(s3_collection.files[rel])
        assert r["n_patches"] >= 1 and r["nfe"] == 2 * r["n_patches"]
        assert r["seconds"] > 0 and math.isfinite(r["consistency_psnr"])
    assert rows["gray16.png"]["n_patches"] == 4  # 40x40 in 32-px patches, stride 24
    assert rows["coffee.png"]["n_patches"] == 1  # exactly one patch: single pass

    # bad inputs: one-line errors naming the file and the problem
    problems = {"bad.png": "not an image", "trunc.png": "truncated", "empty.png": "empty file (0 bytes)"}
    for name, problem in problems.items():
        r = rows[name]
        assert r["status"] == "failed", name
        assert r["error"].startswith(f"s3://in-bucket/coll/{name}: ") and problem in r["error"], r["error"]
        assert "\n" not in r["error"]
        assert r["nfe"] == 0 and r["consistency_psnr"] is None
    assert rows["bad.png"]["content_sha256"] == rows["empty.png"]["content_sha256"] == ""
    assert (rows["bad.png"]["width"], rows["bad.png"]["n_patches"]) == (0, 0)
    # a truncated file passes the header-only plan and fails on decoding
    assert rows["trunc.png"]["content_sha256"] == sha256(s3_collection.files["trunc.png"])
    assert (rows["trunc.png"]["width"], rows["trunc.png"]["height"]) == (32, 32)

    # outputs: same relative paths, 2x size, bit depth and metadata kept; nothing for the bad ones
    fs = s3fs_fresh()
    outputs = sorted(p.removeprefix("out-bucket/res/") for p in first_run.objects)
    assert outputs == sorted(["astro.png", "coffee.png", "gray16.png", "photos/oriented.jpg",
                              f"_manifests/run-{run_id}.parquet", f"_manifests/_contact/run-{run_id}.png"])
    assert fs.find("out-bucket/res/_work") == []
    for name in GOOD:
        rel = "photos/oriented.jpg" if name == "oriented.jpg" else name
        with Image.open(fs.open(f"out-bucket/res/{rel}", "rb")) as im:
            im.load()
            assert im.size == s3_collection.sizes[name]
            mode, fmt, icc, orientation = im.mode, im.format, im.info.get("icc_profile"), im.getexif().get(0x0112, 1)
        if name == "gray16.png":
            assert mode == "I;16" and fmt == "PNG"
        elif name == "oriented.jpg":
            assert fmt == "JPEG" and mode == "RGB"
            assert icc == s3_collection.icc and orientation == 1
        else:
            assert mode == "RGB" and fmt == "PNG"
    restored = read_image("s3://out-bucket/res/gray16.png")
    assert restored.bit_depth == 16
    levels = np.unique((restored.pixels.numpy() * 65535).round() % 257)
    assert len(levels) > 1  # not an 8-bit image stored in 16 bits

    # the JPEG was rotated (EXIF 6: 90 degrees clockwise) before restoration: D(output) is closer
    # to the upright observation than to the one rotated the other way
    out = as_array(read_image("s3://out-bucket/res/photos/oriented.jpg").pixels)
    d_out = out.reshape(16, 2, 12, 2, 3).mean(axis=(1, 3))
    stored = s3_collection.stored_jpeg.astype(np.float64) / 255
    upright, wrong = np.rot90(stored, -1), np.rot90(stored, 1)
    assert np.abs(d_out - upright).mean() < np.abs(d_out - wrong).mean()


def test_s3_rerun_same_configuration_skips(first_run, second_run):
    state, rows = second_run.state, rows_by_name(second_run.table)
    run_id = str(state.state_details.flow_run_id)
    assert run_id != str(first_run.state.state_details.flow_run_id)
    assert state.is_failed() and "7 images: 4 ok or skipped, 3 failed" in state.message
    check_schema(second_run.table.schema)
    assert second_run.table.num_rows == 7
    first = rows_by_name(first_run.table)
    for name in GOOD:
        r = rows[name]
        assert r["status"] == "skipped" and r["error"] == ""
        assert r["config_hash"] == first[name]["config_hash"]
        assert r["content_sha256"] == first[name]["content_sha256"]
        assert (r["width"], r["height"], r["n_patches"]) == (first[name]["width"], first[name]["height"],
                                                             first[name]["n_patches"])
        assert r["nfe"] == 0 and r["flow_run_id"] == run_id
    for name in BAD:
        assert rows[name]["status"] == "failed" and rows[name]["error"] == first[name]["error"]
    # nothing rewritten: the same objects with the same LastModified, plus one new manifest
    new = {p: t for p, t in second_run.objects.items() if p not in first_run.objects}
    assert list(new) == [f"out-bucket/res/_manifests/run-{run_id}.parquet"]
    assert {p: second_run.objects[p] for p in first_run.objects} == first_run.objects
    # the manifest folder reads as one dataset
    check_schema(second_run.dataset.schema)
    assert second_run.dataset.num_rows == 14
    statuses = second_run.dataset.column("status").to_pylist()
    assert (statuses.count("ok"), statuses.count("skipped"), statuses.count("failed")) == (4, 4, 6)


def test_s3_changed_configuration_restores_again(second_run, third_run):
    rows, before = rows_by_name(third_run.table), rows_by_name(second_run.table)
    assert third_run.state.is_failed() and "4 ok or skipped, 3 failed" in third_run.state.message
    for name in GOOD:
        assert rows[name]["status"] == "ok" and rows[name]["seed"] == 1
        assert rows[name]["config_hash"] != before[name]["config_hash"]
        assert json.loads(rows[name]["params_json"])["seed"] == 1
    for name in BAD:
        assert rows[name]["status"] == "failed"
    rewritten = [p for p in second_run.objects if "_manifests" not in p]
    assert len(rewritten) == 4
    assert all(third_run.objects[p] > second_run.objects[p] for p in rewritten)


# ---------------------------------------------------------------------------------- local runs


def test_reference_metrics_local(tmp_path, images, tiny_prior_path):
    """With ground truths at the same relative paths, psnr/ssim are those of the written output."""
    truths = {"a.png": images.crop(32, 32, "astronaut", top=40, left=120),
              "sub/b.png": images.crop(28, 36, "camera", top=100, left=100)}  # gray
    for rel, gt in truths.items():
        images.write(tmp_path / "ref" / rel, images.png(gt))
        images.write(tmp_path / "in" / rel, images.png(images.downsample(gt, 2)))
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), task="sr",
                               options={"factor": 2}, prior=tiny_prior_path, steps=1,
                               reference_uri=str(tmp_path / "ref"))
    assert state.is_completed(), state.message
    assert manifest == str(tmp_path / "out" / "_manifests" / f"run-{state.state_details.flow_run_id}.parquet")
    table = pq.read_table(manifest)
    check_schema(table.schema)
    rows = rows_by_name(table)
    assert sorted(rows) == ["a.png", "b.png"]
    for rel in truths:
        r = rows[rel.rsplit("/", 1)[-1]]
        assert r["status"] == "ok" and r["output_uri"] == str(tmp_path / "out" / rel)
        out = read_image(tmp_path / "out" / rel).pixels
        ref = read_image(tmp_path / "ref" / rel).pixels
        assert out.shape == ref.shape
        assert r["psnr"] == pytest.approx(float(psnr(out, ref)[0]), abs=1e-3)
        assert r["ssim"] == pytest.approx(float(ssim(out, ref)[0]), abs=1e-3)
    assert not list((tmp_path / "out" / "_work").rglob("*.*"))


def test_cli_inpaint_sidecar_masks(tmp_path, images, tiny_prior_path, prefect_api_url):
    """`python -m flows restore` on a local folder: masks next to the images are not inputs."""
    inputs = {"a.png": images.crop(16, 16, "astronaut", top=40, left=120),
              "sub/b.png": images.crop(14, 18, "coffee", top=60, left=200)}
    for rel, pixels in inputs.items():
        mask = np.full(pixels.shape[:2], 255, np.uint8)
        mask[4:10, 5:12] = 0
        images.write(tmp_path / "in" / rel, images.png(pixels))
        images.write(tmp_path / "in" / rel.replace(".png", ".mask.png"), images.png(mask))
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.run([sys.executable, "-m", "flows", "restore", str(tmp_path / "in"), str(tmp_path / "out"),
                           "--task", "inpaint", "--prior", tiny_prior_path, "--steps", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifests = list((tmp_path / "out" / "_manifests").glob("run-*.parquet"))
    assert len(manifests) == 1
    assert f"manifest {manifests[0]}" in proc.stdout
    rows = rows_by_name(pq.read_table(manifests[0]))
    assert sorted(rows) == ["a.png", "b.png"]
    assert all(r["status"] == "ok" and r["task"] == "inpaint" for r in rows.values())
    assert json.loads(rows["a.png"]["params_json"])["mask"] == "sidecar"
    for rel, pixels in inputs.items():
        with Image.open(tmp_path / "out" / rel) as im:
            assert im.size == pixels.shape[1::-1] and im.mode == "RGB"
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png")
                  if "_contact" not in p.parts) == ["a.png", "sub/b.png"]


def test_assemble_failure_after_retries_is_a_full_row(tmp_path, images, tiny_prior_path, monkeypatch):
    """An unexpected error in assemble fails that image (with its source in the row), not the report."""
    import flows.restore_collection as rc

    images.write(tmp_path / "in" / "a.png", images.png(images.crop(16, 16)))

    def broken(*args, **kwargs):
        raise RuntimeError("disk\nfull")

    monkeypatch.setattr(rc.col, "assemble", broken)
    monkeypatch.setattr(rc, "assemble", rc.assemble.with_options(retries=0))
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), task="sr",
                               options={"factor": 2}, prior=tiny_prior_path, steps=1)
    assert state.is_failed() and "1 failed" in state.message
    (row,) = pq.read_table(manifest).to_pylist()
    assert row["status"] == "failed" and row["error"] == f"{tmp_path / 'in' / 'a.png'}: RuntimeError: disk full"
    assert row["source_uri"] == str(tmp_path / "in" / "a.png") and row["width"] == 32


# ------------------------------------------------------------------------------ task bodies


@pytest.fixture
def local_job(tmp_path, images, tiny_prior_path):
    images.write(tmp_path / "in" / "x" / "a.png", images.png(images.crop(16, 16, "astronaut", top=40, left=120)))
    images.write(tmp_path / "in" / "bad.png", b"not an image at all")
    settings = col.Settings(task="sr", options={"factor": 2, "filter": "avgpool"}, prior=tiny_prior_path, steps=1)
    prior_id = col.cached_prior(tiny_prior_path, None, "cpu").prior_id
    return SimpleNamespace(root=tmp_path, settings=settings, prior_id=prior_id,
                           config_hash=settings.config_hash(prior_id), input=str(tmp_path / "in"),
                           output=str(tmp_path / "out"))


def test_task_bodies_fn(local_job):
    from prefect.logging import disable_run_logger

    from flows.restore_collection import assemble, plan_images, restore_shard, write_manifest
    j = local_job
    uris = col.discover(j.input)
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["bad.png", "a.png"]  # sorted by full path
    bad, good = plan_images.fn(uris, 0, j.input, j.output, j.settings, 32, 10**6)
    assert (good.relpath, good.width, good.height, good.n_patches, good.status) == ("x/a.png", 32, 32, 1, "pending")
    assert good.output_uri == os.path.join(j.output, "x", "a.png")
    assert bad.status == "failed" and bad.error.startswith(uris[0]) and "not an image" in bad.error

    work_root = col.join_uri(j.output, col.WORK_DIR, "run-1")
    with disable_run_logger():
        (result,) = restore_shard.fn([good], 0, j.settings, work_root, "cpu")
    assert result.error == "" and result.nfe == 1 and os.path.exists(result.work_uri)
    assert result.tiling["n_patches"] == 1 and math.isfinite(result.consistency_psnr)

    row = assemble.fn(result, "x/a.png", j.settings, j.prior_id, j.config_hash, "run-1", None)
    assert row["status"] == "ok" and row["nfe"] == 1 and row["flow_run_id"] == "run-1"
    assert not os.path.exists(result.work_uri)  # work file removed
    assert read_image(good.output_uri).pixels.shape == (1, 3, 32, 32)

    failed = assemble.fn(col.ImageResult(good, error="boom"), "x/a.png", j.settings, j.prior_id, j.config_hash,
                         "run-1", None)
    assert (failed["status"], failed["error"], failed["source_uri"]) == ("failed", "boom", good.source_uri)

    # a reference of the wrong size fails this image only (ImageError caught in the task)
    Path(j.root, "ref", "x").mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(j.root / "ref" / "x" / "a.png")
    with disable_run_logger():
        (again,) = restore_shard.fn([good], 1, j.settings, work_root, "cpu")
    wrong = assemble.fn(again, "x/a.png", j.settings, j.prior_id, j.config_hash, "run-1", str(j.root / "ref"))
    assert wrong["status"] == "failed" and "reference is 10x10, output is 32x32" in wrong["error"]

    uri = write_manifest.fn([row, failed, wrong], j.output, "run-1", {})
    assert uri == os.path.join(j.output, "_manifests", "run-run-1.parquet")
    table = pq.read_table(uri)
    check_schema(table.schema)
    assert table.column("status").to_pylist() == ["ok", "failed", "failed"]
    assert table.column("error").to_pylist() == ["", "boom", wrong["error"]]


def test_transient_retry_condition():
    from prefect.states import Failed

    from flows.restore_collection import _transient
    assert _transient(None, None, Failed(data=ImageError("s3://b/a.png", "truncated file"))) is False
    assert _transient(None, None, Failed(data=ValueError("bad option"))) is False
    assert _transient(None, None, Failed(data=ConnectionResetError("connection reset"))) is True
    assert _transient(None, None, Failed(data=RuntimeError("CUDA error: unspecified launch failure"))) is True
    assert _transient(None, None, Failed(data=RuntimeError("CUDA out of memory"))) is False
    assert _transient(None, None, Failed(data=KeyError("source_uri"))) is False  # a bug: fail fast, no retry
    from botocore.exceptions import EndpointConnectionError
    assert _transient(None, None, Failed(data=EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))) is True


def test_hierarchical_mode_shards_windows_across_images(tmp_path, tiny_prior_path):
    """tiling=hierarchical: a coarse pass per image, window shards that mix images, outputs equal restore()."""
    from gdp.io import read_image, write_image
    from gdp.prior.checkpoint import load_prior
    from gdp.restore import restore
    torch.manual_seed(5)
    for name in ("a.png", "b.png"):
        write_image(str(tmp_path / "in" / name), torch.rand(1, 3, 36, 40))
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "out"), task="sr",
                               options={"factor": 2}, prior=tiny_prior_path, steps=2, tiling={"mode": "hierarchical"},
                               shard_patches=7)
    assert state.is_completed(), state.message
    table = pq.read_table(manifest).to_pylist()
    assert [(r["status"], r["n_patches"], r["width"], r["height"]) for r in table] == [("ok", 9, 80, 72)] * 2
    expected = restore(read_image(str(tmp_path / "in" / "b.png")).pixels, "sr", load_prior(tiny_prior_path),
                       factor=2, steps=2, seed=[0], tiling="hierarchical")
    assert table[1]["nfe"] == expected.nfe
    written = read_image(str(tmp_path / "out" / "b.png")).pixels
    assert (written - expected.image).abs().max() <= 1 / 255 + 1e-6
    assert not (tmp_path / "out" / "_work").exists()


def test_blind_tasks_report_their_estimates(tmp_path, images, tiny_prior_path):
    """lowlight (fused) and blind deblur (hierarchical: the coarse pass's estimate travels to the
    window tasks) through the flow: each row has the image's own estimate in estimated_params_json."""
    import json
    for rel, (h, w) in {"small.png": (32, 36), "big.png": (72, 80)}.items():
        images.write(tmp_path / "in" / rel, images.png(images.crop(h, w, "astronaut", top=40, left=120) // 5))
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "ll"), task="lowlight",
                               prior=tiny_prior_path, steps=2)
    assert state.is_completed(), state.message
    rows = rows_by_name(pq.read_table(manifest))
    for r in rows.values():
        est = json.loads(r["estimated_params_json"])
        assert r["status"] == "ok" and r["task"] == "lowlight" and 0.05 < est["f"][0] < 1.0
        assert set(est) == {"f", "mask_mean", "mask_min", "mask_max", "mask_grid"}
    state, manifest = run_flow(input_uri=str(tmp_path / "in"), output_uri=str(tmp_path / "bd"), task="blind-deblur",
                               options={"kernel_size": 5}, prior=tiny_prior_path, steps=2,
                               tiling={"mode": "hierarchical"})
    assert state.is_completed(), state.message
    for r in pq.read_table(manifest).to_pylist():
        kernel = json.loads(r["estimated_params_json"])["kernel"]
        assert len(kernel) == 5 and abs(sum(map(sum, kernel)) - 1) < 1e-4
