"""Prefect flow `restore-collection`: restore every image under a URI with GDP.

discover -> plan (header + hash, in chunks) -> skip done -> shards -> restore_shard (per device,
retried on transient errors) -> assemble each image -> Parquet manifest + artifacts. Tasks pass
URIs and small dataclasses, never pixels; the library work lives in `gdp.collection`.
"""

from __future__ import annotations

import posixpath
from dataclasses import replace
from typing import Annotated, Literal

import fsspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed, wait
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field

from gdp import collection as col
from gdp.io import ImageError

TaskName = Literal["sr", "deblur", "inpaint", "colorize"]


class TaskOptions(BaseModel):
    """Degradation options (only those of the chosen task are used)."""

    factor: int = Field(4, ge=1, description="sr: downsampling factor")
    filter: Literal["avgpool", "bicubic"] = "avgpool"
    sigma: float | None = Field(None, gt=0, description="deblur: Gaussian sigma (default: the paper's 9x9 kernel)")
    kernel_size: int | None = Field(None, ge=1)
    kernel_file: str | None = None
    blur_mode: Literal["same", "valid"] = "same"
    mask: str = Field("sidecar", description="inpaint: 'sidecar' (IMAGE.mask.png next to each image) or one mask URI")
    mask_ratio: float | None = Field(None, ge=0, le=1)
    mask_seed: int = 0
    box: tuple[int, int, int, int] | None = None


class TilingOptions(BaseModel):
    mode: Literal["auto", "single", "fused", "hierarchical"] = "auto"
    patch: int | None = Field(None, ge=8)
    stride: int | None = Field(None, ge=1)
    blend: Literal["uniform", "smooth"] = "smooth"


def _transient(task_, task_run, state) -> bool:
    """Retry storage, network and device hiccups; never bad input or programming errors."""
    exc = state.data
    return isinstance(exc, (OSError, TimeoutError, RuntimeError)) and not isinstance(exc, (ImageError, ValueError))


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      task_run_name="plan-images-{chunk_index}")
def plan_images(uris: list[str], chunk_index: int, input_uri: str, output_uri: str, settings: col.Settings,
                native: int, max_pixels: int) -> list[col.ImageJob]:
    return [col.plan_image(u, input_uri, output_uri, settings, native, max_pixels) for u in uris]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="restore-shard-{shard_index}-{device}", tags=["gpu"])
def restore_shard(jobs: list[col.ImageJob], shard_index: int, settings: col.Settings, work_root: str,
                  device: str) -> list[col.ImageResult]:
    logger = get_run_logger()
    names = ", ".join(j.relpath for j in jobs)
    logger.info(f"shard {shard_index}: {len(jobs)} image(s), {sum(j.n_patches for j in jobs)} patches on {device}: {names}")
    return col.restore_shard(jobs, settings, work_root, device)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="coarse-pass-{job.relpath}", tags=["gpu"])
def coarse_pass(job: col.ImageJob, settings: col.Settings, work_root: str, device: str) -> tuple[str, int, float]:
    return col.coarse_pass(job, settings, work_root, device)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="restore-windows-{shard_index}-{device}", tags=["gpu"])
def restore_windows(batches: list[col.WindowBatch], shard_index: int, settings: col.Settings, work_root: str,
                    device: str) -> list[tuple[str, str, int, float]]:
    get_run_logger().info(f"window shard {shard_index}: " + ", ".join(
        f"{b.job.relpath}[{b.indices[0]}..{b.indices[-1]}]" for b in batches))
    return col.restore_window_batches(batches, settings, work_root, device)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      task_run_name="assemble-{name}")
def assemble(result: col.ImageResult, name: str, settings: col.Settings, prior_id: str, config_hash: str,
             run_id: str, reference_uri: str | None) -> dict:
    try:
        return col.assemble(result, settings, prior_id, config_hash, run_id, reference_uri)
    except (ImageError, ValueError) as e:  # a bad reference or output path: this image fails, not the run
        row = col.manifest_row(result.job, settings, prior_id, config_hash, run_id)
        return {**row, "status": "failed", "error": col.one_line(e)}


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], task_run_name="write-manifest")
def write_manifest(rows: list[dict], output_uri: str, run_id: str, storage_options: dict) -> str:
    return col.write_manifest(rows, output_uri, run_id, storage_options)


def _run_name() -> str:
    p = flow_run.parameters
    return f"{p.get('task', 'sr')}-{posixpath.basename(str(p.get('input_uri', '')).rstrip('/')) or 'input'}"


@flow(name="restore-collection", flow_run_name=_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=True)
def restore_collection(
    input_uri: str,
    output_uri: str,
    task: TaskName = "sr",
    options: TaskOptions = TaskOptions(),
    prior: str = "default",
    preset: str | None = None,
    steps: Annotated[int, Field(ge=1, le=1000)] = 100,
    seed: int = 0,
    guidance: Literal["x0", "xt"] = "x0",
    scale: Annotated[float | None, Field(ge=0)] = None,
    samples: Annotated[int, Field(ge=1)] = 1,
    pattern: str = "**/*",
    tiling: TilingOptions = TilingOptions(),
    batch_size: Annotated[int, Field(ge=1)] = 8,
    devices: list[str] = ["auto"],
    shard_patches: Annotated[int, Field(ge=1, description="patches per GPU task (images stay whole)")] = 64,
    reference_uri: str | None = None,
    max_images: Annotated[int | None, Field(ge=1)] = None,
    max_megapixels: Annotated[float, Field(gt=0)] = 100.0,
    overwrite: bool = False,
    storage_block: Annotated[str | None, Field(description="Prefect JSON block holding fsspec storage options")] = None,
):
    """Restore every image under `input_uri` into `output_uri` (same relative paths) and write a manifest."""
    logger = get_run_logger()
    storage = _storage_options(storage_block)
    settings = col.Settings(task=task, options=_operator_options(task, options), prior=prior, preset=preset,
                            steps=steps, seed=seed, guidance=guidance, scale=scale, samples=samples,
                            tiling=tiling.mode, patch=tiling.patch, stride=tiling.stride, blend=tiling.blend,
                            batch_size=batch_size, mask=options.mask, storage_options=storage)
    run_id = str(flow_run.id or "local")
    devices = [col.resolve_device(d) for d in devices]
    model = col.cached_prior(prior, preset, col.resolve_device(devices[0]))  # fail early on a bad prior
    config_hash = settings.config_hash(model.prior_id)
    uris = col.discover(input_uri, pattern, max_images, storage)
    logger.info(f"{len(uris)} image(s) under {input_uri}; prior {model.prior_id}; config {config_hash}")
    chunks = [uris[i:i + 32] for i in range(0, len(uris), 32)]
    planned = plan_images.map(chunks, range(len(chunks)), input_uri, output_uri, settings,
                              settings.patch or model.image_size, int(max_megapixels * 1e6))
    jobs = [job for fut in planned for job in fut.result()]
    rows, todo = _skip_done(jobs, settings, model.prior_id, config_hash, run_id, output_uri, overwrite, storage)
    progress = create_progress_artifact(progress=0.0, description=f"{len(jobs)} images")

    def record(row: dict) -> None:
        rows.append(row)
        update_progress_artifact(artifact_id=progress, progress=100.0 * len(rows) / max(len(jobs), 1))

    work_root = col.join_uri(output_uri, col.WORK_DIR, run_id)
    whole = [job for job in todo if job.mode != "hierarchical"]
    shards = col.make_shards(whole, shard_patches)
    shard_futures = [restore_shard.submit(shard, k, settings, work_root, devices[k % len(devices)])
                     for k, shard in enumerate(shards)]
    assembling = {}  # future -> the ImageResult it assembles

    def assemble_all(results: list[col.ImageResult]) -> None:
        for result in results:
            assembling[assemble.submit(result, result.job.relpath, settings, model.prior_id, config_hash,
                                       run_id, reference_uri)] = result

    hierarchical = [job for job in todo if job.mode == "hierarchical"]
    if hierarchical:  # runs while the whole-image shards use the pool's other threads
        assemble_all(_restore_hierarchical(hierarchical, settings, work_root, devices, shard_patches))
    for fut in as_completed(shard_futures):
        fut.wait()  # stores the final state locally (the API lags behind)
        results = fut.result(raise_on_failure=False)
        if isinstance(results, BaseException):  # the shard failed after its retries: every image fails
            shard = shards[shard_futures.index(fut)]
            results = [col.ImageResult(job, error=col.one_line(results)) for job in shard]
        assemble_all(results)
    for fut in as_completed(list(assembling)):
        fut.wait()
        row = fut.result(raise_on_failure=False)
        if not isinstance(row, dict):  # assemble failed after its retries: a full row, so _report works
            job = assembling[fut].job
            row = {**col.manifest_row(job, settings, model.prior_id, config_hash, run_id),
                   "status": "failed", "error": col.one_line(row)}
        record(row)
    wait(list(assembling))
    _clean_work_area(work_root, storage)
    manifest = write_manifest(rows, output_uri, run_id, storage)
    _report(rows, manifest)
    failed = sum(r["status"] == "failed" for r in rows)
    message = f"{len(rows)} images: {len(rows) - failed} ok or skipped, {failed} failed; manifest at {manifest}"
    logger.info(message)
    return Failed(message=message, data=manifest) if failed else Completed(message=message, data=manifest)


def _restore_hierarchical(jobs: list[col.ImageJob], settings: col.Settings, work_root: str, devices: list[str],
                          shard_patches: int) -> list[col.ImageResult]:
    """Coarse pass per image, then shards of windows from one or several images (independent
    chains, so they spread over devices and workers); results point at the window files."""
    coarse = [coarse_pass.submit(job, settings, work_root, devices[k % len(devices)]) for k, job in enumerate(jobs)]
    errors, nfe, seconds = {}, {}, {}
    for job, fut in zip(jobs, coarse):
        fut.wait()
        out = fut.result(raise_on_failure=False)
        if isinstance(out, BaseException):
            errors[job.relpath] = col.one_line(out)
        else:
            nfe[job.relpath], seconds[job.relpath] = out[1], out[2]
    ready = [job for job in jobs if job.relpath not in errors]
    shards = col.window_batches(ready, shard_patches)
    futures = [restore_windows.submit(shard, k, settings, work_root, devices[k % len(devices)])
               for k, shard in enumerate(shards)]
    parts: dict[str, list[str]] = {job.relpath: [] for job in ready}
    for shard, fut in zip(shards, futures):
        fut.wait()
        out = fut.result(raise_on_failure=False)
        if isinstance(out, BaseException):
            errors.update({batch.job.relpath: col.one_line(out) for batch in shard})
            continue
        for relpath, uri, n, secs in out:
            parts[relpath].append(uri)
            nfe[relpath] += n
            seconds[relpath] += secs
    tiling = {"mode": "hierarchical"}
    return [col.ImageResult(job, error=errors[job.relpath]) if job.relpath in errors else
            col.ImageResult(job, nfe=nfe[job.relpath], seconds=seconds[job.relpath], parts=tuple(parts[job.relpath]),
                            tiling={**tiling, "n_patches": job.n_patches}) for job in jobs]


def _operator_options(task: str, options: TaskOptions) -> dict:
    from gdp.restore import operator_options
    return operator_options(task, **options.model_dump())


def _storage_options(block_name: str | None) -> dict:
    if not block_name:
        return {}
    from prefect.blocks.system import JSON
    return dict(JSON.load(block_name).value)


def _skip_done(jobs, settings, prior_id, config_hash, run_id, output_uri, overwrite, storage):
    """Rows for failed plans and already-done inputs, and the jobs left to restore."""
    done = set() if overwrite else col.previous_successes(output_uri, storage)
    rows, todo = [], []
    for job in jobs:
        if job.status == "failed":
            rows.append(col.manifest_row(job, settings, prior_id, config_hash, run_id))
        elif (job.content_sha256, config_hash) in done and _exists(job.output_uri, storage):
            rows.append(col.manifest_row(replace(job, status="skipped"), settings, prior_id, config_hash, run_id))
        else:
            todo.append(job)
    return rows, todo


def _exists(uri: str, storage: dict) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **storage)
    return fs.exists(path)


def _clean_work_area(work_root: str, storage: dict) -> None:
    """Remove this run's work folder, and the work area itself once no other run uses it."""
    fs, path = fsspec.core.url_to_fs(work_root, **storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = posixpath.dirname(path.rstrip("/"))
    if fs.exists(parent) and not fs.ls(parent):
        fs.rm(parent, recursive=True)


def _report(rows: list[dict], manifest: str) -> None:
    summary = col.summarise(rows)
    create_table_artifact(key="restore-summary", table=[summary], description="Collection summary")
    link = manifest if "://" in manifest else f"file://{manifest}"
    create_link_artifact(key="restore-manifest", link=link, link_text="manifest.parquet")
    ok = sorted((r for r in rows if r["status"] == "ok" and r["consistency_psnr"] is not None),
                key=lambda r: r["consistency_psnr"])[:10]
    lines = ["# Restoration report", "",
             f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed of {summary['images']}.",
             "", "## Worst images by consistency (PSNR of D(x) against y)", "",
             "| image | consistency dB | PSNR dB | seconds |", "|---|---|---|---|"]
    lines += [f"| {r['source_uri']} | {r['consistency_psnr']:.2f} | "
              f"{'' if r['psnr'] is None else format(r['psnr'], '.2f')} | {r['seconds']:.1f} |" for r in ok]
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failed", "", "| image | error |", "|---|---|"]
        lines += [f"| {r['source_uri']} | {r['error']} |" for r in failures]
    create_markdown_artifact(key="restore-report", markdown="\n".join(lines))
