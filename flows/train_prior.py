"""Prefect flow `train-prior`: train (or resume) a small ADM prior on a folder or URL of clean images.

A thin wrapper around `gdp.train.train`: progress goes to the run's logs and to a progress
artifact; the checkpoint, the EMA prior and sample grids are written under `output_uri`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import Field

from gdp.train import TrainConfig, train


@flow(name="train-prior", log_prints=True)
def train_prior(
    data_uri: str,
    output_uri: str,
    preset: Literal["adm-small-64", "adm-tiny-32", "adm-256-uncond"] = "adm-small-64",
    crop: Annotated[int, Field(ge=16)] = 64,
    steps: Annotated[int, Field(ge=1)] = 10000,
    batch_size: Annotated[int, Field(ge=1)] = 16,
    lr: Annotated[float, Field(gt=0)] = 2e-4,
    checkpoint_every: Annotated[int, Field(ge=1)] = 250,
    schedule: Literal["linear", "cosine"] = "linear",
    learn_sigma: bool = True,
    exclude: list[str] = [],
    gray_weight: Annotated[float, Field(ge=0)] = 1.0,
    max_minutes: Annotated[float | None, Field(gt=0)] = None,
    init_from: str | None = None,
    device: str = "auto",
    seed: int = 0,
    precision: Literal["auto", "fp32", "bf16"] = "auto",
) -> str:
    """Train; returns the URI of the EMA prior (`prior.safetensors`), usable as `--prior`."""
    logger = get_run_logger()
    cfg = TrainConfig(data_uri=data_uri, out_uri=output_uri, preset=preset, crop=crop, steps=steps,
                      batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, schedule=schedule,
                      learn_sigma=learn_sigma, exclude=tuple(exclude), device=device, seed=seed,
                      max_seconds=max_minutes * 60 if max_minutes else None, init_from=init_from,
                      gray_weight=gray_weight, precision=precision)
    artifact = create_progress_artifact(progress=0.0, description=f"training {preset} on {data_uri}")

    def progress(p) -> None:
        if p.step % 50 == 0 or p.step == p.total:
            logger.info(f"step {p.step}/{p.total} loss {p.loss:.4f} {p.steps_per_second:.2f} steps/s "
                        f"{p.images_per_second:.1f} images/s")
            update_progress_artifact(artifact_id=artifact, progress=100.0 * p.step / p.total)

    result = train(cfg, progress=progress, log=logger.info)
    create_markdown_artifact(key="train-prior-result", markdown=(
        f"# Prior training\n\nsteps {result.steps}, final loss {result.final_loss:.4f}, "
        f"{result.seconds / 60:.1f} min\n\nprior: `{result.prior_uri}`\n\n"
        f"skipped inputs: {len(result.skipped_files)}\n" + "".join(f"\n- {s}" for s in result.skipped_files)))
    return result.prior_uri
