"""Prefect flow `evaluate`: GDP against classical baselines on a folder of clean reference images.

list references -> one `evaluate-image` task per image (observation by `degrade`, GDP and every
baseline of each task, scores, PNGs) -> results.parquet + summary.md under the output URI, a
progress artifact per image and a table artifact of the means. The library work lives in
`gdp.evaluate` and `gdp.baselines`.
"""

from __future__ import annotations

import math
import posixpath
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from gdp import collection as col
from gdp import evaluate as ev

EvalTask = Literal["sr", "deblur", "inpaint", "colorize", "lowlight", "hdr"]


@task(cache_policy=NO_CACHE, task_run_name="evaluate-{name}")
def evaluate_image(uri: str, name: str, settings: dict, output_uri: str, use_lpips: bool) -> list[dict]:
    from gdp.io import read_image
    logger = get_run_logger()
    prior = col.cached_prior(settings["prior"], settings["preset"], settings["device"])
    lpips = ev.lpips_scorer()[0] if use_lpips else None
    options = {k: v for k, v in settings.items() if k not in ("prior", "preset", "device")}
    with col.device_lock(settings["device"]):
        return ev.evaluate_image(read_image(uri).pixels, name, prior, out_uri=output_uri, lpips=lpips,
                                 log=logger.info, **options)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10], task_run_name="write-results")
def write_results(rows: list[dict], output_uri: str, notes: list[str]) -> tuple[str, str]:
    return ev.write_results(rows, output_uri, notes)


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def evaluate(
    reference_uri: str,
    output_uri: str,
    tasks: list[EvalTask] = ["sr", "deblur", "inpaint", "colorize"],
    steps: Annotated[int, Field(ge=1, le=1000)] = 50,
    prior: str = "default",
    preset: str | None = None,
    guidance: list[Literal["x0", "xt"]] = ["x0"],
    seed: int = 0,
    max_images: Annotated[int | None, Field(ge=1)] = None,
    tiling: Literal["auto", "single", "fused", "hierarchical"] = "auto",
    stride: Annotated[int | None, Field(ge=1)] = None,
    batch_size: Annotated[int, Field(ge=1)] = 8,
    device: str = "auto",
) -> str:
    """Score GDP and the classical baselines on every image under `reference_uri`; returns the
    Parquet URI (one row per image x task x method; summary.md and PNGs beside it)."""
    from gdp.baselines import missing_requirements
    from gdp.io import list_images, relative_path
    logger = get_run_logger()
    missing = missing_requirements(tasks)
    if missing:
        raise RuntimeError("; ".join(missing))
    uris = list_images(reference_uri)[:max_images]
    if not uris:
        raise ValueError(f"no images under {reference_uri}")
    device = col.resolve_device(device)
    model = col.cached_prior(prior, preset, device)  # fail early on a bad prior
    lpips, lpips_note = ev.lpips_scorer()
    notes = [f"prior {model.prior_id}; {steps} steps; guidance {', '.join(guidance)}; seed {seed}; tiling {tiling}",
             lpips_note]
    logger.info(f"{len(uris)} reference image(s) x tasks {', '.join(tasks)}; " + "; ".join(notes))
    settings = {"prior": prior, "preset": preset, "device": device, "tasks": list(tasks), "steps": steps,
                "guidance": list(guidance), "seed": seed, "tiling": tiling, "stride": stride,
                "batch_size": batch_size}
    names = [posixpath.splitext(relative_path(reference_uri, u))[0] if u != reference_uri else
             posixpath.splitext(posixpath.basename(u))[0] for u in uris]
    futures = [evaluate_image.submit(u, n, settings, output_uri, lpips is not None) for u, n in zip(uris, names)]
    progress = create_progress_artifact(progress=0.0, description=f"{len(uris)} reference images")
    rows: list[dict] = []
    for done, fut in enumerate(as_completed(futures), 1):
        rows += fut.result()
        logger.info(f"image {done}/{len(uris)} done: {rows[-1]['image']}")
        update_progress_artifact(artifact_id=progress, progress=100.0 * done / len(uris))
    parquet, report = write_results(rows, output_uri, notes)
    _artifacts(rows, notes, report)
    logger.info(f"results: {parquet}; summary: {report}")
    return parquet


def _artifacts(rows: list[dict], notes: list[str], report: str) -> None:
    means = ev.summary(rows)
    table = [{"task": r.task, "method": r.method, "images": int(r.images), "psnr": _number(r.psnr, 2),
              "ssim": _number(r.ssim, 4), "consistency_psnr": _number(r.consistency_psnr, 2),
              "seconds": _number(r.seconds, 2)} for r in means.itertuples()]
    create_table_artifact(key="evaluation-summary", table=table, description="; ".join(notes))
    create_markdown_artifact(key="evaluation-report", markdown=ev.markdown_report(rows, notes),
                             description=f"also at {report}")


def _number(value: float, digits: int) -> float | str:
    """Rounded, or 'inf' (artifacts are JSON: no infinities)."""
    return round(float(value), digits) if math.isfinite(value) else str(value)
