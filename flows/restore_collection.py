"""Prefect flow `restore-collection`: restore every image under a URI with GDP.

discover -> plan (header + hash, in chunks) -> skip done -> shards -> restore_shard (per device,
retried on transient errors) -> assemble each image -> Parquet manifest + artifacts. Tasks pass
URIs and small dataclasses, never pixels; the library work lives in `gdp.collection`.

Scale-out: with `shards=N` the planned inputs are split into N groups of about equal work, each
restored by a child run of the `restore-shard/gpu` deployment on the work pool (any worker, any
machine); with `task_runner="dask"` the restore runs as an in-process `restore-shard` child whose
tasks go to a Dask cluster. Either way the parent merges the children's rows into its manifest.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Annotated, Callable, Literal

import fsspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound, ParameterTypeError, SignatureMismatchError
from prefect.futures import as_completed, wait
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, Field
from pydantic_core import to_jsonable_python

from gdp import collection as col
from gdp import contact_sheet

TaskName = Literal["sr", "deblur", "inpaint", "colorize", "lowlight", "blind-deblur"]  # hdr: several inputs per scene
SHARD_DEPLOYMENT = "restore-shard/gpu"  # prefect.yaml; its runs restore one group of a sharded run
CHILD_POLL_SECONDS = 2.0


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
    # blind tasks (None: the operator's documented default; gdp/operators/blind.py)
    grid: int | None = Field(None, ge=1, description="lowlight: control values per side of the mask M")
    target_mean: float | None = Field(None, gt=0, lt=1, description="lowlight: brightness the gain starts from")
    lr_f: float | None = Field(None, ge=0, description="lowlight: step on the gain f per diffusion step")
    lr_mask: float | None = Field(None, ge=0, description="lowlight: step on M per unit of residual")
    tv_weight: float | None = Field(None, ge=0, description="lowlight: weight of L_TV(M) in the parameter update")
    param_init: Literal["mean", "reference"] | None = None
    kernel_lr: float | None = Field(None, gt=0, description="blind-deblur: Adam step on the kernel logits")
    kernel_passes: int | None = Field(None, ge=1, le=8, description="blind-deblur: sampling chains (default 4)")


class TilingOptions(BaseModel):
    mode: Literal["auto", "single", "fused", "hierarchical"] = "auto"
    patch: int | None = Field(None, ge=8)
    stride: int | None = Field(None, ge=1)
    blend: Literal["uniform", "smooth"] = "smooth"


def _transient(task_, task_run, state) -> bool:
    """Retry storage, network and device hiccups (`gdp.collection.is_transient`: the storage
    client's own connection errors included); never bad input, memory or programming errors."""
    return col.is_transient(state.data if isinstance(state.data, BaseException) else None)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      task_run_name="plan-images-{chunk_index}")
def plan_images(uris: list[str], chunk_index: int, input_uri: str, output_uri: str, settings: col.Settings,
                native: int, max_pixels: int) -> list[col.ImageJob]:
    return [col.plan_image(u, input_uri, output_uri, settings, native, max_pixels) for u in uris]


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="restore-shard-{shard_index}-{device}")
def restore_shard(jobs: list[col.ImageJob], shard_index: int, settings: col.Settings, work_root: str,
                  device: str) -> list[col.ImageResult]:
    logger = get_run_logger()
    names = ", ".join(j.relpath for j in jobs)
    logger.info(f"shard {shard_index}: {len(jobs)} image(s), {sum(j.n_patches for j in jobs)} patches on {device}: {names}")
    results = col.restore_shard(jobs, settings, work_root, device)
    logger.info(f"shard {shard_index} done in process {os.getpid()} (priors loaded by this process: {col.prior_loads()})")
    return results


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="coarse-pass-{job.relpath}")
def coarse_pass(job: col.ImageJob, settings: col.Settings, work_root: str, device: str) -> tuple[str, int, float]:
    return col.coarse_pass(job, settings, work_root, device)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_transient,
      task_run_name="restore-windows-{shard_index}-{device}")
def restore_windows(batches: list[col.WindowBatch], shard_index: int, settings: col.Settings, work_root: str,
                    device: str) -> list[tuple[str, str, int, float]]:
    get_run_logger().info(f"window shard {shard_index}: " + ", ".join(
        f"{b.job.relpath}[{b.indices[0]}..{b.indices[-1]}]" for b in batches))
    return col.restore_window_batches(batches, settings, work_root, device)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      task_run_name="assemble-{name}")
def assemble(result: col.ImageResult, name: str, settings: col.Settings, prior_id: str, config_hash: str,
             run_id: str, reference_uri: str | None, journal_root: str | None = None) -> dict:
    """Write the output and return its manifest row; with `journal_root` (the output URI) the ok row is
    also journaled at once, so a re-run after a crash skips this input."""
    try:
        row = col.assemble(result, settings, prior_id, config_hash, run_id, reference_uri)
    except Exception as e:  # this image fails, not the run; a transient error (after retries) is retried
        if col.is_transient(e):
            raise
        row = col.manifest_row(result.job, settings, prior_id, config_hash, run_id)
        return {**row, "status": "failed", "error": col.describe(result.job.source_uri, e)}
    if journal_root and row["status"] == "ok":
        col.journal_row(row, journal_root, run_id, settings.storage_options, settings.retry_seconds)
    return row


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient,
      task_run_name="write-manifest")
def write_manifest(rows: list[dict], output_uri: str, run_id: str, storage_options: dict,
                   folder: str = col.MANIFEST_DIR, retry_seconds: float = col.Settings.retry_seconds) -> str:
    return col.write_manifest(rows, output_uri, run_id, storage_options, folder, retry_seconds)


def _run_name() -> str:
    p = flow_run.parameters
    return f"{p.get('task', 'sr')}-{posixpath.basename(str(p.get('input_uri', '')).rstrip('/')) or 'input'}"


def _shard_run_name() -> str:
    p = flow_run.parameters
    collection = p.get("collection") or {}
    name = posixpath.basename(str(collection.get("input_uri", "")).rstrip("/")) or "input"
    return f"{collection.get('task', 'sr')}-{name}-shard-{p.get('shard', 0)}"


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
    data_step: Annotated[Literal["auto", "gradient", "cg", "project"],
                         Field(description="auto: project (sr, inpaint, colorize), cg (deblur), gradient (blind)")] = "auto",
    sigma_y: Annotated[float, Field(ge=0, le=1, description="observation noise std in [0, 1] units")] = 0.0,
    cg_iters: Annotated[int | None, Field(ge=1, le=1000, description="CG iterations per step (default 40)")] = None,
    precision: Annotated[Literal["auto", "fp32", "bf16"],
                         Field(description="the network's: fp32, bf16, or auto = bf16 on CUDA and CPUs with "
                                           "native bf16 (faster; results then depend slightly on the batch)")] = "fp32",
    samples: Annotated[int, Field(ge=1)] = 1,
    pattern: str = "**/*",
    tiling: TilingOptions = TilingOptions(),
    batch_size: Annotated[int, Field(ge=1)] = 8,
    devices: list[str] = ["auto"],
    shard_patches: Annotated[int, Field(ge=1, description="patches per GPU task (images stay whole)")] = 64,
    reference_uri: str | None = None,
    max_images: Annotated[int | None, Field(ge=1)] = None,
    max_megapixels: Annotated[float, Field(gt=0, description="larger inputs are refused from their header")] = 100.0,
    max_output_megapixels: Annotated[float, Field(gt=0, description="larger outputs (after x factor) are refused "
                                                                    "from the input's header")] = 100.0,
    storage_retry_seconds: Annotated[float, Field(ge=0, description="how long one storage operation is retried "
                                                                   "through an outage (docs/RELIABILITY.md)")] = 120.0,
    overwrite: bool = False,
    storage_block: Annotated[str | None, Field(description="credentials for the storage: a saved Prefect block, "
                                                           "aws-credentials/NAME, s3-bucket/NAME or secret/NAME "
                                                           "(flows/storage.py)")] = None,
    shards: Annotated[int, Field(ge=1, le=1024, description="N > 1: N child runs of restore-shard/gpu on the "
                                                           "work pool, each restoring a group of inputs")] = 1,
    task_runner: Annotated[Literal["thread", "dask"], Field(description="dask: restore on a Dask cluster")] = "thread",
    dask_address: Annotated[str | None, Field(description="an existing Dask scheduler (tcp://host:8786); "
                                                          "none: a local cluster")] = None,
    dask_workers: Annotated[int, Field(ge=1, description="worker processes of the local Dask cluster, "
                                                         "one GPU task each at a time")] = 2,
):
    """Restore every image under `input_uri` into `output_uri` (same relative paths) and write a manifest."""
    parameters = dict(locals())  # this run's parameters by name (for child runs), before any other local
    _check_scale_out(shards, task_runner, dask_address)
    logger = get_run_logger()
    run = _prepare(parameters)
    # refused before anything is written: no input, no image, output == input, input inside output
    uris = col.check_collection(input_uri, run.output_uri, pattern, run.storage, run.settings.retry_seconds)
    uris = uris[:max_images] if max_images else uris
    logger.info(f"{len(uris)} image(s) under {input_uri}; prior {run.prior_id}; config {run.config_hash}")
    # one run at a time on an output root (a second one is refused); runs that died are tidied up
    with col.Lease(run.output_uri, run.run_id, run.storage, retry_seconds=run.settings.retry_seconds) as lease:
        recovered = col.recover(run.output_uri, run.run_id, run.storage, run.settings.retry_seconds)
        if any(recovered.values()):
            logger.warning(f"tidied up after runs that died: {recovered}")
        jobs = _plan(uris, run)
        rows, todo = _skip_done(jobs, run)
        progress = run.api.call(create_progress_artifact, progress=0.0, description=f"{len(jobs)} images")

        def record(row: dict) -> None:
            rows.append(row)
            if progress:
                run.api.call(update_progress_artifact, artifact_id=progress,
                             progress=100.0 * len(rows) / max(len(jobs), 1))

        collection = {**to_jsonable_python(parameters), "shards": 1}
        if shards > 1 and todo:
            _restore_in_child_runs(todo, shards, collection, run, record)
        elif task_runner == "dask" and todo:
            _restore_on_dask(todo, collection, run, record)
        else:
            _restore_jobs(todo, run, record)
        return _finish(rows, run, lost_lease=lease.lost)


@flow(name="restore-shard", flow_run_name=_shard_run_name, task_runner=ThreadPoolTaskRunner(max_workers=4),
      log_prints=True)
def restore_shard_flow(
    collection: Annotated[dict, Field(description="the parameters of the restore-collection run")],
    inputs: Annotated[list[str], Field(description="image URIs under collection.input_uri")],
    shard: Annotated[int, Field(ge=0)] = 0,
    windows: Annotated[dict[str, list[int]] | None, Field(
        description="huge hierarchical images split over child runs: URI -> [first, last + 1] window index")] = None,
    work_root: Annotated[str | None, Field(description="with windows: the parent run's work folder, which "
                                                       "holds the coarse results")] = None,
):
    """Restore `inputs` with the settings of a restore-collection run and write this run's partial
    manifest, OUTPUT/_manifests/_shards/run-<flow_run_id>.parquet (one row per input). With
    `windows`, also restore those window ranges of images whose coarse pass the parent ran, into
    the parent's work folder, and list the files in WORK_ROOT/_parts/shard-<shard>.json."""
    run = _prepare(_collection_parameters(collection))
    get_run_logger().info(f"shard {shard}: {len(inputs)} input(s), {len(windows or {})} window range(s); "
                          f"prior {run.prior_id}; config {run.config_hash}")
    if windows:
        if not work_root:
            raise ValueError("windows need the parent run's work_root")
        _restore_window_ranges(windows, work_root, shard, run)
    rows, todo = _skip_done(_plan(inputs, run), run) if inputs else ([], [])
    _restore_jobs(todo, run, rows.append)
    return _finish(rows, run, folder=posixpath.join(col.MANIFEST_DIR, col.SHARD_MANIFEST_DIR), keyed=False)


def _parts_uri(work_root: str, shard: int) -> str:
    return col.join_uri(work_root, "_parts", f"shard-{shard}.json")


def _restore_window_ranges(windows: dict[str, list[int]], work_root: str, shard: int, run: "_Run") -> None:
    """Window ranges of images planned and coarse-passed by the parent run, in batches of about
    `shard_patches` windows over this run's devices; the list of files goes to the parts JSON."""
    jobs = {job.source_uri: job for job in _plan(list(windows), run)}
    batches = []
    for uri, (lo, hi) in windows.items():
        job = jobs[uri]
        if job.status == "failed" or job.mode != "hierarchical":
            raise ValueError(f"{uri}: cannot restore windows of it here ({job.error or job.mode})")
        for start in range(lo, hi, run.shard_patches):
            batches.append([col.WindowBatch(job, tuple(range(start, min(hi, start + run.shard_patches))))])
    with _gpu_slot():
        futures = [restore_windows.submit(b, k, run.settings, work_root, run.devices[k % len(run.devices)])
                   for k, b in enumerate(batches)]
    done = []
    for fut in futures:
        done += [list(item) for item in fut.result()]  # a failed batch fails this child (the parent retries it)
    col.write_json(_parts_uri(work_root, shard), done, run.storage)


# ---------------------------------------------------------------------------------------------
# one run's context, planning, restoring, finishing


API_CALL_SECONDS = 15.0  # the longest an artifact call may hold up a run when the Prefect API is gone


class _Api:
    """Prefect API calls that only decorate a run (artifacts): each runs in a thread in this run's
    context and is waited for at most API_CALL_SECONDS; after one fails or times out, the run makes
    no more (the API is gone). Outputs, journal and manifest never wait on the API."""

    def __init__(self) -> None:
        self.down = False

    def call(self, fn, *args, **kwargs):
        if self.down:
            return None
        box: dict = {}
        context = contextvars.copy_context()

        def target() -> None:
            try:
                box["value"] = context.run(fn, *args, **kwargs)
            except Exception as e:  # httpx errors, PrefectHTTPStatusError, ...
                box["error"] = e

        thread = threading.Thread(target=target, name="prefect-api-call", daemon=True)
        thread.start()
        thread.join(API_CALL_SECONDS)
        if thread.is_alive() or "error" in box:
            self.down = True
            why = col.one_line(box["error"]) if "error" in box else f"no answer in {API_CALL_SECONDS:.0f} s"
            get_run_logger().warning(f"the Prefect API is unreachable ({why}): this run's artifacts are skipped; "
                                     "its outputs and manifest are written as always")
            return None
        return box.get("value")


@dataclass(frozen=True)
class _Run:
    """What the steps of one flow run share, built once from its parameters."""

    settings: col.Settings
    output_uri: str
    run_id: str
    devices: tuple[str, ...]
    prior_id: str
    native: int
    config_hash: str
    input_uri: str
    reference_uri: str | None
    shard_patches: int
    max_pixels: int
    overwrite: bool
    api: _Api = field(default_factory=_Api, compare=False)

    @property
    def storage(self) -> dict:
        return self.settings.storage_options

    @property
    def work_root(self) -> str:
        return col.join_uri(self.output_uri, col.WORK_DIR, self.run_id)


def _prepare(p: dict) -> _Run:
    """Settings, devices and the prior (loaded here, so a bad prior fails the run before any work)."""
    options, tiling = p["options"], p["tiling"]
    settings = col.Settings(task=p["task"], options=_operator_options(p["task"], options), prior=p["prior"],
                            preset=p["preset"], steps=p["steps"], seed=p["seed"], guidance=p["guidance"],
                            scale=p["scale"], data_step=p["data_step"], sigma_y=p["sigma_y"],
                            cg_iters=p["cg_iters"], precision=p["precision"], samples=p["samples"],
                            tiling=tiling.mode, patch=tiling.patch,
                            stride=tiling.stride, blend=tiling.blend, batch_size=p["batch_size"], mask=options.mask,
                            storage_options=_storage_options(p["storage_block"]),
                            retry_seconds=p["storage_retry_seconds"], max_output_megapixels=p["max_output_megapixels"])
    devices = tuple(col.resolve_device(d) for d in p["devices"])
    model = col.cached_prior(p["prior"], p["preset"], devices[0])
    output_uri = p["output_uri"] if "://" in p["output_uri"] else os.path.abspath(p["output_uri"])
    return _Run(settings, output_uri, str(flow_run.id or "local"), devices, model.prior_id,
                settings.patch or model.image_size, settings.config_hash(model.prior_id), p["input_uri"],
                p["reference_uri"], p["shard_patches"], int(p["max_megapixels"] * 1e6), p["overwrite"])


def _plan(uris: list[str], run: _Run) -> list[col.ImageJob]:
    chunks = [uris[i:i + 32] for i in range(0, len(uris), 32)]
    planned = plan_images.map(chunks, range(len(chunks)), run.input_uri, run.output_uri, run.settings, run.native,
                              run.max_pixels)
    return [job for fut in planned for job in fut.result()]


SHARD_ROUNDS = 3  # a shard's images interrupted by a transient error are restored again, at most twice
ROUND_DELAYS = (5.0, 30.0)


def _restore_jobs(todo: list[col.ImageJob], run: _Run, record: Callable[[dict], None]) -> None:
    """Restore `todo` with this run's task runner: whole images in shards of about `shard_patches`
    patches per device, hierarchical ones as a coarse pass plus window shards; each image is
    assembled (and journaled) as soon as it is restored, and its row recorded. Images of a shard
    that a transient error interrupted (`ImageResult.retry`) go into new shards, up to SHARD_ROUNDS
    rounds in all; the images it restored before are kept."""
    whole = [job for job in todo if job.mode != "hierarchical"]
    assembling = {}  # future -> the ImageResult it assembles

    def assemble_all(results: list[col.ImageResult]) -> None:
        for result in results:
            assembling[assemble.submit(result, result.job.relpath, run.settings, run.prior_id, run.config_hash,
                                       run.run_id, run.reference_uri, run.output_uri)] = result

    def submit_shards(jobs: list[col.ImageJob], first: int) -> dict:
        with _gpu_slot():
            return {restore_shard.submit(shard, first + k, run.settings, run.work_root,
                                         run.devices[(first + k) % len(run.devices)]): shard
                    for k, shard in enumerate(col.make_shards(jobs, run.shard_patches))}

    shard_futures = submit_shards(whole, 0)
    hierarchical = [job for job in todo if job.mode == "hierarchical"]
    if hierarchical:  # runs while the whole-image shards use the pool's other threads
        assemble_all(_restore_hierarchical(hierarchical, run))
    submitted = len(shard_futures)
    for round_ in range(SHARD_ROUNDS):
        again = []
        for fut in as_completed(list(shard_futures)):
            fut.wait()  # stores the final state locally (the API lags behind)
            results = fut.result(raise_on_failure=False)
            if isinstance(results, BaseException):  # the shard failed after its retries: every image fails
                results = [col.ImageResult(job, error=col.one_line(results)) for job in shard_futures[fut]]
            again += [r.job for r in results if r.retry and round_ + 1 < SHARD_ROUNDS]
            assemble_all([r for r in results if not r.retry or round_ + 1 == SHARD_ROUNDS])
        if not again:
            break
        get_run_logger().warning(f"{len(again)} image(s) interrupted by a transient error: restoring them again "
                                 f"in {ROUND_DELAYS[round_]:.0f} s")
        time.sleep(ROUND_DELAYS[round_])
        shard_futures = submit_shards(again, submitted)
        submitted += len(shard_futures)
    for fut in as_completed(list(assembling)):
        fut.wait()
        row = fut.result(raise_on_failure=False)
        if not isinstance(row, dict):  # assemble failed after its retries: a full row, so _report works
            row = _failed_row(assembling[fut].job, run, col.one_line(row))
        record(row)
    wait(list(assembling))


def _restore_hierarchical(jobs: list[col.ImageJob], run: _Run) -> list[col.ImageResult]:
    """Coarse pass per image, then shards of windows from one or several images (independent
    chains, so they spread over devices and workers); results point at the window files."""
    settings, work_root, devices = run.settings, run.work_root, run.devices
    coarse = _coarse_passes(jobs, run)
    errors = {relpath: out for relpath, out in coarse.items() if isinstance(out, str)}
    nfe = {relpath: out[0] for relpath, out in coarse.items() if relpath not in errors}
    seconds = {relpath: out[1] for relpath, out in coarse.items() if relpath not in errors}
    ready = [job for job in jobs if job.relpath not in errors]
    shards = col.window_batches(ready, run.shard_patches)
    with _gpu_slot():
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


def _finish(rows: list[dict], run: _Run, folder: str = col.MANIFEST_DIR, keyed: bool = True,
            lost_lease: bool = False):
    """Manifest (then the journal it replaces), artifacts, and the final state: Failed if any input
    failed, or if the run lost its lease on the output to a later run (it was presumed dead)."""
    _clean_work_area(run.work_root, run.storage, parent=keyed)
    manifest = write_manifest(rows, run.output_uri, run.run_id, run.storage, folder, run.settings.retry_seconds)
    col.clear_journal(run.output_uri, run.run_id, run.storage, run.settings.retry_seconds)
    _report(rows, manifest, run.api, keyed)
    if keyed:  # the worst and some of the best images, before and after, for a look without opening files
        try:  # a picture for the UI: its failure must not fail a run whose manifest is written
            sheet = contact_sheet.report(rows, run.output_uri, run.run_id, run.reference_uri, run.storage)
        except Exception as e:
            get_run_logger().warning(f"no contact sheet: {col.one_line(e)}")
            sheet = None
        if sheet:
            run.api.call(create_markdown_artifact, key="restore-contact-sheet", markdown=sheet,
                         description="Before/after")
    failed = sum(r["status"] == "failed" for r in rows)
    message = f"{len(rows)} images: {len(rows) - failed} ok or skipped, {failed} failed; manifest at {manifest}"
    if lost_lease:
        message += "; this run stopped renewing its lease on the output and another run took it over"
    get_run_logger().info(message)
    if failed or lost_lease:
        return Failed(message=message, data=manifest)
    return Completed(message=message, data=manifest)


def _failed_row(job: col.ImageJob, run: _Run, error: str) -> dict:
    return {**col.manifest_row(job, run.settings, run.prior_id, run.config_hash, run.run_id),
            "status": "failed", "error": error}


# ---------------------------------------------------------------------------------------------
# scale-out: child runs on the work pool, or a Dask cluster


def _check_scale_out(shards: int, task_runner: str, dask_address: str | None) -> None:
    if shards > 1 and task_runner == "dask":
        raise ValueError("shards > 1 runs child runs on the work pool's workers and task_runner='dask' runs on a "
                         "Dask cluster: choose one (shards=1 with dask, or task_runner='thread')")
    if dask_address and task_runner != "dask":
        raise ValueError("dask_address is used only with task_runner='dask'")


def _collection_parameters(collection: dict) -> dict:
    """A restore-collection run's parameters, validated and completed exactly as that flow does."""
    try:
        return restore_collection.validate_parameters(collection)
    except (ParameterTypeError, SignatureMismatchError) as e:
        raise ValueError(f"collection: {' '.join(str(e).split())}") from None


def _restore_in_child_runs(todo: list[col.ImageJob], shards: int, collection: dict, run: _Run,
                           record: Callable[[dict], None]) -> None:
    """Split `todo` into `shards` groups of about equal work, run each as a child run of the
    restore-shard deployment (any worker of its pool takes it) and merge the rows of their partial
    manifests. A child that ends without its manifest (crashed, or its worker lost) is started once
    more; the inputs of one that does so twice become failed rows."""
    from prefect.client.orchestration import get_client
    logger = get_run_logger()
    total = sum(max(job.n_patches, 1) for job in todo)
    huge = [job for job in todo if job.mode == "hierarchical" and job.n_patches > total / shards]
    groups = col.split_balanced([job for job in todo if job not in huge], shards)
    coarse, windows = _split_huge_images(huge, shards, run)  # each huge image's windows over all children
    n = max(len(groups), shards if windows else 0)
    groups += [[] for _ in range(n - len(groups))]
    logger.info(f"{len(todo)} image(s) in {n} child runs of {SHARD_DEPLOYMENT}, patches per child: "
                f"{[sum(j.n_patches for j in g) + sum(r[k][1] - r[k][0] for r in windows.values()) for k, g in enumerate(groups)]}"
                + (f"; windows of {len(windows)} huge image(s) spread over all children" if windows else ""))
    ranges = [{uri: list(r[k]) for uri, r in windows.items() if r[k][1] > r[k][0]} for k in range(n)]
    children = {k: _start_child(collection, groups[k], k, ranges[k], run.work_root) for k in range(n)}
    retried, parts = set(), {}
    with get_client(sync_client=True) as client:
        while children:
            time.sleep(CHILD_POLL_SECONDS)
            for k, child_id in list(children.items()):
                state = client.read_flow_run(child_id).state
                if not state or not state.is_final():
                    continue
                del children[k]
                rows = _child_rows(run, child_id)
                child_parts = col.read_json(_parts_uri(run.work_root, k), run.storage) if ranges[k] else []
                if (rows is None or child_parts is None) and k not in retried:
                    logger.warning(f"shard {k}: child run {child_id} ended {state.name} without its manifest "
                                   f"or window list ({state.message}); starting it once more")
                    retried.add(k)
                    children[k] = _start_child(collection, groups[k], k, ranges[k], run.work_root)
                    continue
                error = f"shard {k} (child run {child_id}) ended {state.name}: {' '.join(str(state.message).split())}"
                for row in _merge_rows(groups[k], rows or [], run, error):
                    record(row)
                if ranges[k]:
                    parts[k] = child_parts if child_parts is not None else error
    _assemble_huge_images(huge, coarse, windows, parts, run, record)


def _coarse_passes(jobs: list[col.ImageJob], run: _Run) -> dict[str, tuple[int, float] | str]:
    """The global pass of each hierarchical image, over this run's devices, into its work folder:
    {relpath: (NFE, seconds), or the one-line error}."""
    with _gpu_slot():
        futures = [coarse_pass.submit(job, run.settings, run.work_root, run.devices[k % len(run.devices)])
                   for k, job in enumerate(jobs)]
    coarse = {}
    for job, fut in zip(jobs, futures):
        fut.wait()
        out = fut.result(raise_on_failure=False)
        coarse[job.relpath] = col.one_line(out) if isinstance(out, BaseException) else (out[1], out[2])
    return coarse


def _split_huge_images(huge: list[col.ImageJob], shards: int, run: _Run):
    """The coarse pass of each huge hierarchical image, here (its windows need it), and the split of
    its windows into `shards` contiguous ranges: ({relpath: (NFE, seconds) or error}, {URI: ranges})."""
    coarse = _coarse_passes(huge, run)
    windows = {job.source_uri: col.split_windows(job.n_patches, shards)
               for job in huge if not isinstance(coarse[job.relpath], str)}
    return coarse, windows


def _assemble_huge_images(huge: list[col.ImageJob], coarse: dict, windows: dict, parts: dict, run: _Run,
                          record: Callable[[dict], None]) -> None:
    """Merge the window files the children listed into each huge image, and record its row."""
    futures = {}
    for job in huge:
        error = coarse[job.relpath] if isinstance(coarse[job.relpath], str) else ""
        files, nfe, seconds = [], 0, 0.0
        if not error:
            nfe, seconds = coarse[job.relpath]
            for k, (lo, hi) in enumerate(windows[job.source_uri]):
                if hi == lo:
                    continue
                if isinstance(parts.get(k), str) or k not in parts:
                    error = parts.get(k) or f"shard {k} did not report windows {lo}..{hi - 1}"
                    break
                for relpath, uri, n, secs in parts[k]:
                    if relpath == job.relpath:
                        files.append(uri)
                        nfe, seconds = nfe + n, seconds + secs
        if error:
            record(_failed_row(job, run, error))
            continue
        result = col.ImageResult(job, nfe=nfe, seconds=seconds, parts=tuple(files),
                                 tiling={"mode": "hierarchical", "n_patches": job.n_patches})
        futures[assemble.submit(result, job.relpath, run.settings, run.prior_id, run.config_hash, run.run_id,
                                run.reference_uri, run.output_uri)] = job
    for fut, job in futures.items():
        fut.wait()
        row = fut.result(raise_on_failure=False)
        record(row if isinstance(row, dict) else _failed_row(job, run, col.one_line(row)))


def _start_child(collection: dict, group: list[col.ImageJob], k: int, windows: dict | None = None,
                 work_root: str | None = None):
    parameters = {"collection": collection, "inputs": [job.source_uri for job in group], "shard": k}
    if windows:
        parameters.update(windows=windows, work_root=work_root)
    try:
        child = run_deployment(SHARD_DEPLOYMENT, timeout=0, parameters=parameters)
    except ObjectNotFound:
        raise ValueError(f"shards > 1 needs the deployment {SHARD_DEPLOYMENT} on this Prefect server "
                         "(bash deployments/setup.sh) and workers on its queue") from None
    return child.id


def _child_rows(run: _Run, child_id) -> list[dict] | None:
    uri = col.shard_manifest_uri(run.output_uri, str(child_id))
    return col.read_manifest(uri, run.storage) if _exists(uri, run.storage) else None


def _merge_rows(group: list[col.ImageJob], rows: list[dict], run: _Run, error: str) -> list[dict]:
    """One row per input of the group: the child's row, or a failed row with the child's fate."""
    by_source = {row["source_uri"]: row for row in rows}
    return [by_source.get(job.source_uri) or _failed_row(job, run, error) for job in group]


def _restore_on_dask(todo: list[col.ImageJob], collection: dict, run: _Run, record: Callable[[dict], None]) -> None:
    """Restore `todo` in a restore-shard child run (in this process) whose tasks run on Dask."""
    runner = _dask_runner(collection["dask_address"], collection["dask_workers"])
    state = restore_shard_flow.with_options(task_runner=runner)(
        collection=collection, inputs=[job.source_uri for job in todo], return_state=True)
    manifest = state.result(raise_on_failure=False)
    rows = col.read_manifest(manifest, run.storage) if isinstance(manifest, str) else []
    for row in _merge_rows(todo, rows, run, f"the Dask child run ended {state.name}: {state.message}"):
        record(row)


def _dask_runner(address: str | None, workers: int):
    """An existing cluster (its workers started with `--resources GPU=1`), or a local cluster of
    `workers` processes, each with one GPU resource: one GPU task per worker at a time."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ValueError("task_runner='dask' needs prefect-dask: pip install 'gdp[dask]'") from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 2, "processes": True,
                                          "resources": {"GPU": 1}, "dashboard_address": None})


def _gpu_slot():
    """Under the Dask task runner, tasks submitted here take the worker's one GPU resource."""
    context = FlowRunContext.get()
    if type(getattr(context, "task_runner", None)).__name__ != "DaskTaskRunner":
        return contextlib.nullcontext()
    import dask
    return dask.annotate(resources={"GPU": 1})


def _operator_options(task: str, options: TaskOptions) -> dict:
    from gdp.restore import operator_options
    return operator_options(task, **options.model_dump())


def _storage_options(block_ref: str | None) -> dict:
    """fsspec storage options from a Prefect credentials block (flows/storage.py), {} without one."""
    from flows.storage import storage_options
    return storage_options(block_ref)


def _skip_done(jobs: list[col.ImageJob], run: _Run) -> tuple[list[dict], list[col.ImageJob]]:
    """Rows for failed plans and already-done inputs, and the jobs left to restore."""
    done = {} if run.overwrite else col.previous_successes(run.output_uri, run.storage, run.settings.retry_seconds)
    rows, todo = [], []
    for job in jobs:
        if job.status == "failed":
            rows.append(col.manifest_row(job, run.settings, run.prior_id, run.config_hash, run.run_id))
            continue
        output_sha = col.already_done(job, run.config_hash, done, run.storage, run.settings.retry_seconds)
        if output_sha:  # same path, same content, same configuration, and the output is the one written
            rows.append({**col.manifest_row(replace(job, status="skipped"), run.settings, run.prior_id,
                                            run.config_hash, run.run_id), "output_sha256": output_sha})
        else:
            todo.append(job)
    return rows, todo


def _exists(uri: str, storage: dict) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **storage)
    return fs.exists(path)


def _clean_work_area(work_root: str, storage: dict, parent: bool = True) -> None:
    """Remove this run's work folder, and (a collection run, `parent`) the work area itself once it
    is empty. Only the lease holder does the latter, so no other collection run is using it; a
    child run leaves it to its parent."""
    fs, path = fsspec.core.url_to_fs(work_root, **storage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    folder = posixpath.dirname(path.rstrip("/"))
    if parent and fs.exists(folder) and not fs.ls(folder, refresh=True):
        fs.rm(folder, recursive=True)


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]{}|~#!])")


def _md(text: str) -> str:
    """Text from the outside world (object names, error messages) as literal markdown inside a table
    cell: one line, HTML escaped, markdown's special characters (the cell's `|` included) backslashed."""
    text = " ".join(str(text).split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _report(rows: list[dict], manifest: str, api: _Api, keyed: bool = True) -> None:
    """Summary table, manifest link and markdown report; keyed (versioned on the Artifacts page) for
    a collection run, only on the run's page for a child run."""
    summary = col.summarise(rows)
    api.call(create_table_artifact, key="restore-summary" if keyed else None, table=[summary],
             description="Collection summary")
    link = manifest if "://" in manifest else f"file://{manifest}"
    api.call(create_link_artifact, key="restore-manifest" if keyed else None, link=link, link_text="manifest.parquet")
    ok = sorted((r for r in rows if r["status"] == "ok" and r["consistency_psnr"] is not None),
                key=lambda r: r["consistency_psnr"])[:10]
    lines = ["# Restoration report", "",
             f"{summary['ok']} ok, {summary['skipped']} skipped, {summary['failed']} failed of {summary['images']}.",
             "", "## Worst images by consistency (PSNR of D(x) against y)", "",
             "| image | consistency dB | PSNR dB | seconds |", "|---|---|---|---|"]
    lines += [f"| {_md(r['source_uri'])} | {r['consistency_psnr']:.2f} | "
              f"{'' if r['psnr'] is None else format(r['psnr'], '.2f')} | {r['seconds']:.1f} |" for r in ok]
    failures = [r for r in rows if r["status"] == "failed"]
    if failures:
        lines += ["", "## Failed", "", "| image | error |", "|---|---|"]
        lines += [f"| {_md(r['source_uri'])} | {_md(r['error'])} |" for r in failures]
    api.call(create_markdown_artifact, key="restore-report" if keyed else None, markdown="\n".join(lines))
