"""One call restores one (or a batch of) observation(s): `restore(y, task, prior, ...) -> Restoration`.

Ranges: observations and restored images are `[B, C, H, W]` in [0, 1]; the sampler works in
model space [-1, 1] (conversion happens in `gdp.sampling`/`gdp.guidance` only through u(z)).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from gdp.guidance import DEFAULT_DATA_STEPS, DEFAULT_SCALES, PAPER_COLOR_WEIGHT, PAPER_SCALES, SOLVED_DEFAULTS, Guidance
from gdp.metrics import consistency_psnr
from gdp.operators import Operator, make_operator
from gdp.prior.checkpoint import Prior
from gdp.sampling import Callback, FusedDenoiser, gdp_sample

LINEAR_TASKS = ("sr", "deblur", "inpaint", "colorize")
BLIND_TASKS = ("lowlight", "hdr", "blind-deblur")


@dataclass(frozen=True)
class Restoration:
    image: torch.Tensor  # [B, C, H, W] in [0, 1]
    task: str
    steps: int
    nfe: int  # network evaluations per image
    seconds: float
    consistency_psnr: torch.Tensor  # [B] dB, PSNR of A(image) against y
    tiling: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)


def default_guidance(task: str, *, scale: float | None = None, mode: Literal["x0", "xt"] = "x0",
                     step_rule: str = "constant-total", size_rule: str = "per-pixel",
                     color_weight: float | None = None, exposure_weight: float = 0.0,
                     data_step: str | None = None, sigma_y: float = 0.0, cg_iters: int | None = None) -> Guidance:
    """Guidance for `task`: our measured data step (DEFAULT_DATA_STEPS; "auto" or None) and default
    scale, or with the paper rules the paper's gradient step and scale; the paper's colour-constancy
    term (500) for colorize with the paper rules only: it pulls the output's channel means together,
    and with the shipped prior halves the little colour there is (mean chroma 0.0029 against 0.0064
    without it, docs/PRIOR.md). GDP-xt keeps the gradient step. Everything overridable."""
    if task not in PAPER_SCALES:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(PAPER_SCALES)}")
    if scale is None:
        scale = PAPER_SCALES[task] if step_rule == "paper" else DEFAULT_SCALES[task]
    if color_weight is None:
        color_weight = PAPER_COLOR_WEIGHT if task == "colorize" and step_rule == "paper" else 0.0
    if data_step in (None, "auto"):
        data_step = "gradient" if step_rule == "paper" or mode == "xt" else DEFAULT_DATA_STEPS[task]
    solved = {} if data_step == "gradient" else dict(SOLVED_DEFAULTS)
    if cg_iters:
        solved["cg_iters"] = cg_iters
    return Guidance(scale=scale, mode=mode, color_weight=color_weight, exposure_weight=exposure_weight,
                    step_rule=step_rule, size_rule=size_rule, data_step=data_step, sigma_y=sigma_y, **solved)


def operator_options(task: str, *, factor: int = 4, filter: str = "avgpool", sigma: float | None = None,
                     kernel_size: int | None = None, kernel_file: str | None = None, blur_mode: str = "same",
                     mask: str | None = None, mask_ratio: float | None = None, mask_seed: int = 0,
                     box: Sequence[int] | None = None, exposures: int = 3, grid: int | None = None,
                     target_mean: float | None = None, share_params: bool = False, clip: bool = True,
                     lr_f: float | None = None, lr_mask: float | None = None, tv_weight: float | None = None,
                     param_init: str | None = None, kernel_lr: float | None = None,
                     kernel_passes: int | None = None, **_ignored) -> dict:
    """`make_operator` keywords from the flat task options shared by the CLI and the flows.

    inpaint takes the first of: a mask file (`mask`, not "sidecar"), a random ratio, a box; with
    none of them the caller supplies the mask (the CLI and the pipeline look for IMAGE.mask.png).
    Blind tasks: options left at None keep the operator's documented defaults.
    """
    if task == "sr":
        return {"factor": factor, "filter": filter}
    if task == "deblur":
        if kernel_file:
            return {"kernel_file": kernel_file, "mode": blur_mode}
        if sigma is not None:
            return {"sigma": sigma, "kernel_size": kernel_size, "mode": blur_mode}
        return {"mode": blur_mode}
    if task == "inpaint":
        if mask and mask != "sidecar":
            return {"mask_file": mask}
        if mask_ratio is not None:
            return {"ratio": mask_ratio, "seed": mask_seed}
        if box is not None:
            return {"box": tuple(int(v) for v in box)}
    if task in ("lowlight", "hdr"):
        options = {"grid": grid, "target_mean": target_mean, "lr_f": lr_f, "lr_mask": lr_mask,
                   "tv_weight": tv_weight, "init": param_init}
        if task == "hdr":
            options.update(exposures=exposures, share=share_params, clip=clip)
        return {k: v for k, v in options.items() if v is not None}
    if task == "blind-deblur":
        options = {"kernel_size": kernel_size or 15, "lr": kernel_lr, "passes": kernel_passes}
        return {k: v for k, v in options.items() if v is not None}
    return {}


def prepare_observation(pixels: torch.Tensor, task: str, operator: Operator) -> tuple[torch.Tensor, bool]:
    """(y, gray_input) from decoded pixels `[B, 1 or 3, H, W]` in [0, 1].

    colorize wants one channel (a colour file holding a gray picture gives its luminance);
    the other tasks restore colour, so a gray observation is repeated over RGB.
    """
    gray = pixels.shape[1] == 1
    if task == "colorize":
        return (pixels if gray else operator.A(pixels)), gray
    return (pixels.expand(-1, 3, -1, -1) if gray else pixels), gray


def finish_output(image: torch.Tensor, task: str, gray_input: bool) -> torch.Tensor:
    """A gray input (other than for colorize) gives a gray output."""
    return image.mean(dim=1, keepdim=True) if gray_input and task != "colorize" else image


class CropFirst(torch.nn.Module):
    """`A(x[..., :height, :width])`: guide only the image part of a canvas padded up to the patch size."""

    def __init__(self, inner: Operator, height: int, width: int):
        super().__init__()
        self.inner, self.height, self.width = inner, height, width

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.A(x[..., :self.height, :self.width])

    def y_shape(self, x_shape: tuple) -> tuple:
        return self.inner.y_shape(x_shape)

    def gram_scalar(self) -> float | None:
        """The inner operator's: a crop's adjoint is zero-padding, and crop(pad(v)) = v."""
        return self.inner.gram_scalar() if hasattr(self.inner, "gram_scalar") else None


FUSED_MAX_PIXELS = 4_000_000  # auto tiling: fused up to 4 MP, hierarchical above


def plan_tiling(height: int, width: int, native: int, tiling: str = "auto", patch: int | None = None,
                stride: int | None = None, align: int = 1) -> dict:
    """How to cover a height x width canvas with the prior's native patch: mode, patch, stride."""
    patch = patch or native
    stride = stride or max(1, (3 * patch) // 4)
    if tiling not in ("auto", "single", "fused", "hierarchical"):
        raise ValueError(f"unknown tiling {tiling!r}: use auto, single, fused or hierarchical")
    if tiling == "auto":
        tiling = ("single" if (height, width) == (patch, patch)
                  else "fused" if height * width <= FUSED_MAX_PIXELS else "hierarchical")
    if tiling == "hierarchical":
        from gdp.hierarchical import plan_hierarchical
        plan = plan_hierarchical(height, width, patch, stride, align)
        return {"mode": "hierarchical", "patch": plan.patch, "stride": plan.stride,
                "n_patches": len(plan.windows), "coarse_scale": plan.scale}
    if tiling == "single" and (height % 4 or width % 4):
        raise ValueError(f"single-pass sampling needs sizes divisible by 4, got {height}x{width}; use --tiling fused")
    if tiling == "single":
        return {"mode": "single", "patch": None, "stride": None, "n_patches": 1}
    from gdp.tiling import plan_windows
    n = len(plan_windows(height, width, patch, stride))
    return {"mode": "fused", "patch": patch, "stride": stride, "n_patches": n}


def restore(y: torch.Tensor, task: str, prior: Prior, *, operator: Operator | None = None, steps: int = 100,
            seed: int | Sequence[int] = 0, guidance: Guidance | None = None, samples: int = 1, tiling: str = "auto",
            patch: int | None = None, stride: int | None = None, batch_size: int = 8, blend: str = "smooth",
            callback: Callback | None = None, **operator_options) -> Restoration:
    """Restore observation(s) y `[B, C', h, w]` in [0, 1] with GDP.

    `seed`: one int per image, or an int s (image b then uses s + b). An image's result depends
    only on its own observation and seed, never on its batch-mates.
    Any size: images other than the prior's native size are sampled patch-fused (`tiling`);
    images smaller than a patch are sampled on a canvas of one patch, guided on their own area.
    `samples` > 1 averages that many posterior samples per image (an MMSE estimate).
    """
    op = operator or make_operator(task, **operator_options)
    guidance = guidance or default_guidance(task)
    device = prior.device
    y = y.to(device=device, dtype=torch.float32)
    b, _, height, width = op.x_shape(tuple(y.shape))
    native = patch or prior.image_size
    canvas = (b, prior.spec.unet.in_channels, max(height, native), max(width, native))
    align = op.factor if getattr(op, "name", "") == "sr" else 1
    plan = plan_tiling(canvas[2], canvas[3], prior.image_size, tiling, patch, stride, align)
    seeds = [seed + k for k in range(b)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {b} images")
    t0 = time.perf_counter()
    if plan["mode"] == "hierarchical":
        if canvas[2:] != (height, width):
            raise ValueError(f"hierarchical tiling needs an image of at least one patch, got {height}x{width}")
        runs, params = [], []
        # progress in patch-steps: each window takes `steps`, the coarse pass one per step
        done, total = 0, b * samples * steps * (plan["n_patches"] + 1)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if callback:
                callback(done, total)
        for k in range(b):
            runs.append(_hierarchical(y[k:k + 1], op, prior, seeds[k], steps, guidance, samples, batch_size, patch,
                                      stride, align, blend, advance))
            params.append(op.params if getattr(op, "blind", False) else None)
        image, nfe = runs[0][0] if b == 1 else torch.cat([r[0] for r in runs]), runs[0][1]  # no copy of one image
        if getattr(op, "blind", False):  # every image's estimate, for the consistency check and the report
            op.bind({name: torch.cat([p[name] for p in params]) for name in params[0]})
    else:
        image, nfe = _fused_or_single(y, op, prior, plan, canvas, seeds, steps, guidance, samples, batch_size,
                                      blend, callback)
    image = image[..., :height, :width]
    estimated = {"per_image": op.describe()} if getattr(op, "blind", False) else {}
    return Restoration(image, task, steps, nfe, time.perf_counter() - t0, consistency_psnr(op, image, y), plan,
                       estimated)


def _fused_or_single(y, op, prior, plan, canvas, seeds, steps, guidance, samples, batch_size, blend, callback):
    """Posterior mean of `samples` GDP chains over the whole canvas: (image [B, C, H, W], NFE per image)."""
    height, width = op.x_shape(tuple(y.shape))[-2:]
    guide = op if canvas[2:] == (height, width) else CropFirst(op, height, width)
    denoiser = prior.denoiser()
    if plan["mode"] == "fused":
        denoiser = FusedDenoiser(denoiser, canvas[2], canvas[3], plan["patch"], plan["stride"],
                                 batch_size=batch_size, blend=blend)
    total, nfe = torch.zeros(canvas, device=y.device), 0
    for k in range(samples):
        gens = [torch.Generator().manual_seed(s + 1_000_003 * k) for s in seeds]
        step_cb = None if callback is None else (lambda n, m, k=k: callback(k * m + n, samples * m))
        result = gdp_sample(denoiser, guide, y, steps, guidance=guidance, generators=gens, x_shape=canvas,
                            callback=step_cb)
        total += (result.x0 + 1) / 2
        nfe += result.nfe
    return (total / samples).clamp(0, 1), nfe


def _hierarchical(y, op, prior, seed, steps, guidance, samples, batch_size, patch, stride, align, blend, advance):
    """Global coarse pass, then independent windows streamed into a merger: (image [1, C, H, W], NFE).
    `advance(n)` is told the patch-steps done: one per coarse step, `steps` per window.

    Memory: the output plus one row of windows (StreamingMerger), whatever the image size.
    """
    from gdp.hierarchical import global_pass, plan_hierarchical, restore_windows, window_norm_sq
    from gdp.tiling import StreamingMerger
    height, width = op.x_shape(tuple(y.shape))[-2:]
    plan = plan_hierarchical(height, width, patch or prior.image_size, stride, align)
    blind = getattr(op, "blind", False)  # its windows' norm depends on the global pass's estimate
    local_norm = None if blind else window_norm_sq(op, y, plan, prior.spec.unet.in_channels)
    def coarse_step(i: int, m: int) -> None:  # step i of m (m > steps when a blind operator runs several chains)
        advance(steps * i // m - steps * (i - 1) // m)

    total, nfe = None, 0
    for k in range(samples):
        sample_seed = seed + 1_000_003 * k
        coarse, n = global_pass(y, op, prior, plan, steps, sample_seed, guidance, batch_size, callback=coarse_step)
        if blind:
            local_norm = window_norm_sq(op, y, plan, prior.spec.unet.in_channels)
        merger = StreamingMerger(height, width, prior.spec.unet.in_channels, plan.patch, plan.stride, blend,
                                 device=y.device)
        for start in range(0, len(plan.windows), batch_size):
            indices = list(range(start, min(start + batch_size, len(plan.windows))))
            patches, n_windows = restore_windows(y, op, prior, plan, coarse, indices, steps, sample_seed, guidance,
                                                 batch_size, local_norm=local_norm)
            for index, p in zip(indices, patches):
                merger.add(merger.windows[index], p)
            n += n_windows
            advance(len(indices) * steps)
        image = merger.finish()[None]
        total = image if total is None else total.add_(image)  # in place: no full-size copies at 64 MP
        nfe += n
    return total.div_(samples).clamp_(0, 1), nfe
