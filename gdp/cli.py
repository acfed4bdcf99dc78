"""Command line: `gdp degrade`, `gdp restore`, `gdp train`, `gdp data build` (also `python -m gdp`).

Errors in the input (missing or corrupt images, unknown options, checkpoints that do not fit)
print one line on stderr and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
TASKS = ["sr", "deblur", "inpaint", "colorize", "lowlight", "hdr"]


class UsageError(ValueError):
    pass


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or isinstance(default, bool) or default in (argparse.SUPPRESS, []))
        if shown and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        raise UsageError(f"{self.prog}: {message} (see --help)")


def integer(low: int = 1, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value
    return parse


def number(low: float = 0.0, high: float = math.inf, *, open_low: bool = False,
           open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (ends excluded where open)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (math.isfinite(value) and above and below):
            bounds = (f"{'>' if open_low else '>='} {low:g}" if high == math.inf else
                      f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value
    return parse


def default_threads(devices: int = 1) -> int:
    """CPU threads for torch: OMP_NUM_THREADS when the user set it, else half the usable cores,
    shared by the devices that run at once (at least 1). Torch's own default (every core) is
    several times slower on a machine that runs anything else: 117.8 s against 31.5 s with 1
    thread for one restore on a busy 2-core machine (the same output)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2 // max(devices, 1))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=integer(1), help="CPU threads for torch (default: OMP_NUM_THREADS if "
                   "set, else half the usable cores, split over the devices of a flow run)")


def set_threads(threads: int | None, devices: int = 1) -> int:
    """Apply --threads (or the default) to torch in this process; returns the number used."""
    import torch
    n = threads or default_threads(devices)
    torch.set_num_threads(n)
    return n


def _add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=TASKS,
                   help="sr: super-resolution, deblur, inpaint, colorize, lowlight (dark, noisy), "
                        "hdr (fuse exposures)")
    p.add_argument("--factor", type=integer(1), default=4, help="sr: downsampling factor (default 4)")
    p.add_argument("--filter", choices=["avgpool", "bicubic"], default="avgpool", help="sr: downsampling filter")
    p.add_argument("--sigma", type=number(0, open_low=True),
                   help="deblur: Gaussian kernel sigma (default: the paper's 9x9 kernel)")
    p.add_argument("--kernel-size", type=integer(1), help="deblur: Gaussian kernel size")
    p.add_argument("--kernel-file", help="deblur: kernel as .npy or grayscale PNG (normalised to sum 1)")
    p.add_argument("--blur-mode", choices=["same", "valid"], default="same",
                   help="deblur: 'same' size with reflect padding, or the paper's 'valid' convolution")
    p.add_argument("--mask", help="inpaint: mask image, white = known pixel, black = missing")
    p.add_argument("--mask-ratio", type=number(0, 1), help="inpaint: fraction of pixels missing at random")
    p.add_argument("--mask-seed", type=int, default=0, help="inpaint: seed of the random mask")
    p.add_argument("--box", help="inpaint: missing box X,Y,W,H")


def add_blind_options(p: argparse.ArgumentParser, single_image: bool = True) -> None:
    """Options of the blind tasks (lowlight, hdr, deblur --blind): those of the collection flow too,
    and with `single_image` those of `gdp restore` only (hdr, the image losses, --save-params)."""
    g = p.add_argument_group("blind tasks (parameters estimated during sampling)")
    g.add_argument("--blind", action="store_true", help="deblur: estimate an unknown kernel of --kernel-size "
                   "(default 15) jointly with the image")
    g.add_argument("--kernel-lr", type=number(0, open_low=True),
                   help="deblur --blind: Adam step on the kernel logits (default 0.1)")
    g.add_argument("--kernel-passes", type=integer(1, 8), help="deblur --blind: sampling chains; each later one "
                   "starts from the last kernel estimate and refines it in its last 20%% (default 4; NFE = passes x steps)")
    g.add_argument("--grid", type=integer(1), help="lowlight/hdr: the mask M has grid x grid control values (default 8)")
    g.add_argument("--target-mean", type=number(0, 1, open_low=True, open_high=True),
                   help="lowlight/hdr: mean brightness the gains start from (default 0.4 / 0.45)")
    g.add_argument("--lr-f", type=number(0), help="lowlight/hdr: gradient step on the gain f (default 0.1; the authors used 1)")
    g.add_argument("--lr-mask", type=number(0), help="lowlight/hdr: step on M, per unit of residual (default 0.01 / 0.05)")
    g.add_argument("--tv-weight", type=number(0), help="lowlight/hdr: weight of L_TV(M) in the parameter update (default 0)")
    g.add_argument("--param-init", choices=["mean", "reference"], help="lowlight/hdr: gains from the observation's "
                   "mean (default) or the authors' random init")
    if not single_image:
        return
    g.add_argument("--share-params", action="store_true", help="hdr: one (f, M) for all exposures, as the authors")
    g.add_argument("--no-clip", dest="clip", action="store_false", help="hdr: model exposures without saturation")
    g.add_argument("--exposure-weight", type=number(0), default=0.0, help="weight of the exposure loss L_exp on the image")
    g.add_argument("--color-weight", type=number(0), help="weight of the colour-constancy loss L_col "
                   "(default 0; 500 for colorize with --paper-scale, as the authors)")
    g.add_argument("--save-params", metavar="DIR", help="write the estimated masks / kernel as images into DIR")


def operator_options(args: argparse.Namespace, task: str | None = None, exposures: int = 3) -> dict:
    """Keyword options of `make_operator` from the parsed task options."""
    from gdp.restore import operator_options as options
    fields = vars(args).copy()
    fields["exposures"] = exposures
    if args.box:
        try:
            fields["box"] = tuple(int(v) for v in args.box.split(","))
            assert len(fields["box"]) == 4
        except (ValueError, AssertionError):
            raise UsageError(f"--box must be X,Y,W,H integers, got {args.box!r}") from None
    fields.pop("task", None)
    return options(task or args.task, **fields)


def sidecar(observation_uri: str, suffix: str) -> str:
    """OBS.png -> OBS<suffix>: where `gdp degrade` puts what it knows about an observation."""
    stem = observation_uri.rsplit(".", 1)[0] if "." in observation_uri.rsplit("/", 1)[-1] else observation_uri
    return stem + suffix


def mask_uri(observation_uri: str) -> str:
    """Where `gdp degrade --task inpaint` puts the mask of an observation: OBS.mask.png."""
    return sidecar(observation_uri, ".mask.png")


def add_restore_options(p: argparse.ArgumentParser) -> None:
    """Prior, sampling and tiling options shared by `gdp restore` and `python -m flows restore`."""
    p.add_argument("--prior", default="default", help="default (the shipped prior), a checkpoint path or an fsspec URL")
    p.add_argument("--preset", help="architecture of a checkpoint without config (e.g. adm-256-uncond)")
    p.add_argument("--steps", type=integer(1, 1000), default=100,
                   help="reverse diffusion steps (time grows linearly with them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise: the same seed gives the same output")
    p.add_argument("--guidance", choices=["x0", "xt"], default="x0", help="GDP-x0 (default) or GDP-xt")
    p.add_argument("--scale", type=number(0), help="guidance scale s, quoted at 1000 steps and 256x256 "
                   "(default per task: sr 16000, deblur 48000, inpaint 48000, colorize 6000, lowlight 80000, "
                   "hdr 80000, blind deblur 48000)")
    p.add_argument("--data-step", choices=["auto", "gradient", "cg", "project"], default="auto",
                   help="how each step agrees with the observation: auto (project for sr/inpaint/colorize, cg for "
                        "deblur, gradient for the blind tasks), gradient (the paper's capped step), cg (conjugate "
                        "gradients on the data term), project (its closed form where A A^T = cI, else cg)")
    p.add_argument("--sigma-y", type=number(0, 1), default=0.0,
                   help="noise std of the observation in [0, 1] units (e.g. 0.02); the solved data steps fit y "
                        "less tightly as it grows (default 0: only 8-bit quantisation)")
    p.add_argument("--cg-iters", type=integer(1, 1000), help="conjugate-gradient iterations per step (default 40)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="the network's arithmetic: fp32 (default), bf16, or auto = bf16 on CUDA and on CPUs with "
                        "native bf16. bf16 sampled 1.4-2.5x faster here with PSNR within 0.011 dB, but an image's "
                        "result then depends slightly on its batch-mates (docs/BENCHMARKS.md)")
    p.add_argument("--samples", type=integer(1), default=1, help="average this many posterior samples")
    p.add_argument("--tiling", choices=["auto", "single", "fused", "hierarchical"], default="auto",
                   help="auto: one pass at the prior's size, fused patches up to 4 MP, hierarchical above (a coarse "
                        "global pass, then independent windows); single, fused, hierarchical force one")
    p.add_argument("--patch", type=integer(8), help="patch size (default: the prior's native size)")
    p.add_argument("--stride", type=integer(1), help="patch stride (default: 3/4 of the patch)")
    p.add_argument("--batch-size", type=integer(1), default=8, help="patches per network call")
    p.add_argument("--blend", choices=["uniform", "smooth"], default="smooth",
                   help="patch blending: smooth (default; hides seams) or uniform (the authors)")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Training options shared by `gdp train` and `python -m flows train`."""
    p.add_argument("--preset", default="adm-small-64", help="architecture of the new prior")
    p.add_argument("--crop", type=integer(8), default=64, help="training crop size in pixels")
    p.add_argument("--steps", type=integer(1), default=10000, help="optimiser steps")
    p.add_argument("--batch-size", type=integer(1), default=16, help="crops per optimiser step")
    p.add_argument("--lr", type=number(0, open_low=True), default=2e-4, help="Adam learning rate")
    p.add_argument("--checkpoint-every", type=integer(1), default=250, help="steps between resumable checkpoints")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule")
    p.add_argument("--fixed-sigma", action="store_true", help="train without the learned variance")
    p.add_argument("--exclude", nargs="*", default=[], help="file names kept out of training")
    p.add_argument("--gray-weight", type=number(0), default=1.0,
                   help="draw grayscale images this often relative to colour ones (e.g. 0.2: a more colourful prior)")
    p.add_argument("--max-minutes", type=number(0, open_low=True), help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--init", help="start from these weights (fine-tune an existing prior)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="forward pass of training: auto = bf16 on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and the noise")
    add_threads_option(p)


def train_config(args: argparse.Namespace, data: str, out: str):
    from gdp.train import TrainConfig
    return TrainConfig(data_uri=data, out_uri=out, preset=args.preset, crop=args.crop, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
                       schedule=args.schedule, learn_sigma=not args.fixed_sigma, exclude=tuple(args.exclude),
                       max_seconds=args.max_minutes * 60 if args.max_minutes else None, init_from=args.init,
                       device=args.device, seed=args.seed, gray_weight=args.gray_weight, precision=args.precision)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gdp", description="Generative Diffusion Prior restoration (Fei et al., CVPR 2023)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("degrade", help="synthesise an observation from a clean image",
                       description="Apply a task's degradation to a clean image: the observation that `gdp restore` "
                                   "then restores (and a ground truth to score it against).")
    d.add_argument("gt", metavar="CLEAN", help="the clean image (the ground truth) to degrade")
    d.add_argument("obs", metavar="OBS", help="where to write the observation (inpaint: also OBS.mask.png; hdr: "
                   "OBS-1, OBS-2, ...; deblur --motion-kernel: also OBS.kernel.npy)")
    _add_task_options(d)
    d.add_argument("--noise", type=number(0), default=0.0, help="Gaussian noise sigma in [0, 1] units")
    d.add_argument("--seed", type=int, default=0, help="seed of the noise")
    d.add_argument("--gain", type=number(0, open_low=True), default=0.15, help="lowlight: light gain (default 0.15)")
    d.add_argument("--gamma", type=number(0, open_low=True), default=1.0, help="lowlight: gamma applied before the gain")
    d.add_argument("--gains", type=number(0, open_low=True), nargs="+", default=[0.25, 1.0, 4.0],
                   help="hdr: one exposure per gain, written as OBS-1, OBS-2, ... (clipped at white)")
    d.add_argument("--motion-kernel", type=integer(1), metavar="SIZE",
                   help="deblur: blur with a random motion-like kernel of SIZE (saved as OBS.kernel.npy)")
    d.add_argument("--kernel-seed", type=int, default=0, help="deblur --motion-kernel: seed of the kernel")

    r = sub.add_parser("restore", help="restore an observation with GDP",
                       usage="gdp restore OBS [OBS ...] OUT --task TASK [options]  (hdr: one OBS per exposure)",
                       description="Restore one observation with GDP: reverse diffusion of the prior, pulled at every "
                                   "step towards agreement with OBS through the task's degradation operator. Writes "
                                   "OUT in its extension's format (bit depth, ICC, EXIF and DPI of the input kept; "
                                   "the DPI x factor after sr), says what it will compute and about how long it will "
                                   "take, shows a progress bar on stderr and prints one JSON line on stdout.")
    r.add_argument("paths", nargs="+", metavar="OBS ... OUT",
                   help="the observation (hdr: every exposure, darkest first), then the output path")
    _add_task_options(r)
    add_restore_options(r)
    add_blind_options(r)
    r.add_argument("--paper-scale", action="store_true",
                   help="the authors' rules: their scale per task (sr 2000, deblur 6000, inpaint 4000, "
                        "colorize 6000) applied per step, on the mean over the observation")
    r.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    add_threads_option(r)

    t = sub.add_parser("train", help="train a prior on a folder or URL of clean images",
                       description="Train a small diffusion prior on clean images (random crops); resumable.")
    t.add_argument("data", help="folder or URL of clean training images")
    t.add_argument("out", help="output folder or URL (checkpoints, prior.safetensors, sample grids)")
    add_train_options(t)

    data = sub.add_parser("data", help="the prior's training set (gdp data build OUT)")
    data_sub = data.add_subparsers(dest="data_command", metavar="build", required=True, parser_class=_Parser)
    b = data_sub.add_parser("build", help="fetch the photos listed in gdp/assets/prior_sources.json (Debian "
                            "packages, scikit-image), check their sha256, downscale and write OUT/train, "
                            "OUT/heldout and OUT/manifest.parquet")
    b.add_argument("out", help="local output folder (built next to it, then renamed)")
    b.add_argument("--permissive-only", action="store_true",
                   help="only files under CC0, public-domain or CC-BY licences")
    b.add_argument("--overwrite", action="store_true", help="replace OUT when it exists and is not empty")
    return parser


def resolve_device(name: str):
    import torch

    from gdp.prior.checkpoint import resolve_device as to_device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return to_device(name)


def numbered(uri: str, k: int) -> str:
    """OBS.png -> OBS-k.png (the k-th exposure written by `gdp degrade --task hdr`)."""
    name = uri.rsplit("/", 1)[-1]
    if "." in name:
        stem, ext = uri.rsplit(".", 1)
        return f"{stem}-{k}.{ext}"
    return f"{uri}-{k}"


def cmd_degrade(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from gdp.io import read_image, write_image
    from gdp.operators import Deblur, degrade, exposure_bracket, low_light, make_operator, motion_kernel
    img = read_image(args.gt)
    x = img.pixels
    gen = torch.Generator().manual_seed(args.seed)

    def write(uri: str, y: torch.Tensor) -> None:  # the ground truth's metadata, its DPI for y's size
        write_image(uri, y, bit_depth=img.bit_depth, icc_profile=img.icc_profile, exif=img.exif,
                    dpi=img.dpi_for(y.shape[-1], y.shape[-2]), protect=args.gt)
    if args.task == "colorize" and x.shape[1] == 1:
        raise UsageError(f"{args.gt}: is already grayscale; colorize needs a colour ground truth")
    if args.task == "lowlight":
        y = low_light(x, gain=args.gain, gamma=args.gamma, noise=args.noise, generator=gen)
        write(args.obs, y)
        return {"task": args.task, "input": args.gt, "output": args.obs, "shape": list(y.shape[1:]),
                "gain": args.gain, "gamma": args.gamma, "noise": args.noise}
    if args.task == "hdr":
        outputs = [numbered(args.obs, k + 1) for k in range(len(args.gains))]
        for out, y in zip(outputs, exposure_bracket(x, tuple(args.gains), noise=args.noise, generator=gen)):
            write(out, y)
        return {"task": args.task, "input": args.gt, "outputs": outputs, "gains": args.gains, "noise": args.noise}
    if args.task == "deblur" and args.motion_kernel:
        kernel = motion_kernel(args.motion_kernel, args.kernel_seed)
        op = Deblur(kernel=kernel, mode=args.blur_mode)
        y = degrade(x, op, noise_sigma=args.noise, generator=gen)
        write(args.obs, y)
        import fsspec
        with fsspec.open(sidecar(args.obs, ".kernel.npy"), "wb") as f:
            np.save(f, kernel.numpy())
        return {"task": args.task, "input": args.gt, "output": args.obs, "shape": list(y.shape[1:]),
                "kernel": sidecar(args.obs, ".kernel.npy")}
    op = make_operator(args.task, **operator_options(args))
    y = degrade(x, op, noise_sigma=args.noise, generator=gen)
    write(args.obs, y)
    result = {"task": args.task, "input": args.gt, "output": args.obs, "shape": list(y.shape[1:])}
    if args.task == "inpaint":
        mask = op.mask_for(x.shape[-2], x.shape[-1])[0]
        write_image(mask_uri(args.obs), mask, protect=args.gt)
        result["mask"] = mask_uri(args.obs)
    return result


def cmd_restore(args: argparse.Namespace) -> dict:
    import fsspec
    import torch
    from gdp.io import check_writable, read_image, same_location, writable_bit_depth, write_image
    from gdp.operators import make_operator
    from gdp.prior.checkpoint import load_prior
    from gdp.prior.denoiser import resolve_precision
    from gdp.progress import ProgressBar
    from gdp.restore import default_guidance, finish_output, prepare_observation, restore

    if len(args.paths) < 2:
        raise UsageError("gdp restore needs at least one observation and an output path")
    inputs, out = args.paths[:-1], args.paths[-1]
    task = "blind-deblur" if args.task == "deblur" and args.blind else args.task
    if args.blind and args.task != "deblur":
        raise UsageError("--blind applies to --task deblur only (lowlight and hdr are always blind)")
    if task == "hdr" and len(inputs) < 2:
        raise UsageError(f"--task hdr needs at least 2 exposures of one scene, got {len(inputs)} input")
    if task != "hdr" and len(inputs) != 1:
        raise UsageError(f"--task {args.task} takes one observation, got {len(inputs)}: {' '.join(inputs)}")
    for obs in inputs:
        if same_location(out, obs):
            raise UsageError(f"{out}: refusing to overwrite the input; choose another output path")
    check_writable(out)  # before any work: not after the whole restore
    device = resolve_device(args.device)
    options = operator_options(args, task, len(inputs))
    if task == "inpaint" and not options:
        mask = mask_uri(inputs[0])
        fs, path = fsspec.core.url_to_fs(mask)
        if not fs.exists(path):
            raise UsageError(f"{inputs[0]}: inpaint needs a mask: --mask FILE, --mask-ratio R [--mask-seed S] "
                             f"or --box X,Y,W,H (no {mask} found)")
        options = {"mask_file": mask}
    op = make_operator(task, **options)
    check_restore_size(inputs[0], op, args, len(inputs))  # from the header, before decoding or allocating
    images = [read_image(obs) for obs in inputs]
    img = images[0]
    if task == "hdr":
        for other, uri in zip(images[1:], inputs[1:]):
            if other.pixels.shape[-2:] != img.pixels.shape[-2:]:
                h, w = img.pixels.shape[-2:]
                raise UsageError(f"{uri}: exposure of {other.pixels.shape[-1]}x{other.pixels.shape[-2]} does not "
                                 f"match {inputs[0]} ({w}x{h}); all exposures must show one scene at one size")
        y = torch.cat([im.pixels.expand(-1, 3, -1, -1) for im in images], dim=1)
        gray_in = all(im.pixels.shape[1] == 1 for im in images)
    else:
        y, gray_in = prepare_observation(img.pixels, task, op)
    depth = writable_bit_depth(out, img.bit_depth)
    prior = load_prior(args.prior, preset=args.preset, device=device)
    precision = resolve_precision(args.precision, prior.device)
    prior.set_precision(precision, channels_last=precision != "fp32")
    check_patch(prior, args.patch, args.stride)
    print(describe_job(task, y, op, prior, args), file=sys.stderr, flush=True)
    rule = "paper" if args.paper_scale else None
    guidance = default_guidance(task, scale=args.scale, mode=args.guidance, color_weight=args.color_weight,
                                exposure_weight=args.exposure_weight, data_step=args.data_step,
                                sigma_y=args.sigma_y, cg_iters=args.cg_iters,
                                **({"step_rule": rule, "size_rule": rule} if rule else {}))
    warn_if_noisy(inputs[0], y, task, guidance)
    bar = ProgressBar(args.steps * args.samples, "restore")
    result = restore(y, task, prior, operator=op, steps=args.steps, seed=args.seed, guidance=guidance,
                     samples=args.samples, tiling=args.tiling, patch=args.patch, stride=args.stride,
                     batch_size=args.batch_size, blend=args.blend, callback=bar)
    image = finish_output(result.image, task, gray_in)
    write_image(out, image.cpu(), bit_depth=depth, icc_profile=img.icc_profile, exif=img.exif,
                dpi=img.dpi_for(image.shape[-1], image.shape[-2]), protect=inputs[0])
    report = {"task": task, "input": inputs[0] if len(inputs) == 1 else inputs, "output": out,
              "width": image.shape[-1], "height": image.shape[-2], "steps": args.steps, "samples": args.samples,
              "nfe": result.nfe, "seconds": round(result.seconds, 3),
              "consistency_psnr": round(float(result.consistency_psnr[0]), 3), "tiling": result.tiling,
              "prior": prior.prior_id, "seed": args.seed, "device": str(prior.device), "guidance": args.guidance,
              "scale": guidance.scale, "data_step": guidance.data_step, "sigma_y": guidance.sigma_y,
              "precision": precision, "dpi": img.dpi_for(image.shape[-1], image.shape[-2]),
              "notes": list(img.notes) + ([f"wrote {depth}-bit: {out} cannot hold {img.bit_depth} bits"]
                                          if depth != img.bit_depth else [])}
    if result.params:
        report["estimated"] = result.params["per_image"][0]
        if args.save_params:
            report["saved_params"] = save_params(op, args.save_params, image.shape[-2], image.shape[-1])
    return report


def check_restore_size(uri: str, op, args: argparse.Namespace, exposures: int = 1) -> None:
    """ImageError (one line) if the output would exceed max_output_megapixels or the memory this
    process can get (gdp.limits), from the input's header alone (hdr: its exposures stack)."""
    from gdp.io import read_info
    from gdp.limits import DEFAULT_MAX_OUTPUT_MEGAPIXELS, auto_mode, check_size
    info = read_info(uri)
    channels = 3 * exposures if exposures > 1 else info.channels
    _, _, height, width = op.x_shape((1, channels, info.height, info.width))
    check_size(uri, info.width, info.height, width, height, auto_mode(width, height, args.tiling),
               getattr(args, "max_output_megapixels", None) or DEFAULT_MAX_OUTPUT_MEGAPIXELS)


def check_patch(prior, patch: int | None, stride: int | None) -> None:
    """--patch and --stride that this prior's network can take (before any sampling)."""
    halvings = len(prior.spec.unet.channel_mult) - 1
    multiple = 2 ** halvings
    if patch is not None and patch % multiple:
        raise UsageError(f"--patch {patch}: this prior's network halves its input {halvings} times, so the patch "
                         f"must be a multiple of {multiple} (e.g. {max(multiple, patch // multiple * multiple)})")
    size = patch or prior.image_size
    if stride is not None and stride > size:
        raise UsageError(f"--stride {stride} is larger than the patch ({size} pixels): the windows would leave gaps")


NOISY = 0.015  # noise_sigma reads about 0.01 on sharp noise-free 8-bit photos after x4 SR, 0 after a blur


def warn_if_noisy(uri: str, y, task: str, guidance) -> None:
    """One line on stderr when a solved data step would fit visible noise: without --sigma-y, 40 CG
    iterations of deblurring turn noise of 0.05 into an 8 dB image (docs/BENCHMARKS.md). Masked
    pixels (inpaint) and several exposures (hdr) would read as noise, so those are not checked."""
    from gdp.metrics import noise_sigma
    if guidance.data_step == "gradient" or guidance.sigma_y > 0 or task in ("inpaint", "hdr"):
        return
    sigma = float(noise_sigma(y.float()).max())
    if sigma >= NOISY:
        print(f"{uri}: the observation looks noisy (noise sigma about {sigma:.3f} in [0, 1] units); pass "
              f"--sigma-y {sigma:.3f} or the {guidance.data_step} data step will fit the noise", file=sys.stderr)


def describe_job(task: str, y, op, prior, args: argparse.Namespace) -> str:
    """What `restore` is about to compute, in one line for stderr before the progress bar: sizes, tiling,
    network evaluations (NFE) and about how long they take here, from one timed network call. Plans
    the canvas exactly as `gdp.restore.restore` does."""
    from gdp.restore import plan_tiling
    _, _, height, width = op.x_shape(tuple(y.shape))
    native = args.patch or prior.image_size
    align = op.factor if getattr(op, "name", "") == "sr" else 1
    plan = plan_tiling(max(height, native), max(width, native), prior.image_size, args.tiling, args.patch,
                       args.stride, align)
    chains = args.samples * getattr(op, "passes", 1)
    windows = plan["n_patches"] + (plan["mode"] == "hierarchical")  # + one coarse pass, as the progress bar counts
    batch = min(args.batch_size, windows)
    calls = args.steps * chains * math.ceil(windows / batch)
    # a CPU's time grows with the batch, so a last, partial batch costs its share; a GPU's hardly does
    share = calls if prior.device.type == "cuda" else args.steps * chains * windows / batch
    seconds = share * _seconds_per_network_call(prior, batch, plan["patch"] or native)
    tiles = (f": {plan['n_patches']} windows of {plan['patch']} px, stride {plan['stride']}"
             + (", after a coarse pass" if plan["mode"] == "hierarchical" else "")) if plan["mode"] != "single" else ""
    scale = f" x{op.factor}" if getattr(op, "name", "") == "sr" else ""
    runs = f"{args.steps} steps" + (f" x {chains} chains" if chains > 1 else "")
    return (f"restore {task}{scale}: {y.shape[-1]}x{y.shape[-2]} -> {width}x{height} ({width * height / 1e6:.3g} MP), "
            f"{plan['mode']} tiling{tiles}; {runs}: NFE {args.steps * chains * windows:,} in {calls:,} network calls "
            f"of {batch} on {prior.device} ({_threads()} CPU thread{'s' * (_threads() > 1)}); about {_duration(seconds)}")


def _seconds_per_network_call(prior, batch: int, size: int) -> float:
    import time
    import torch
    denoiser = prior.denoiser()
    x = torch.zeros(batch, prior.spec.unet.in_channels, size, size, device=prior.device)
    chain, times = denoiser.chain(2), []
    for _ in range(2):  # the faster of two: the first may pay for allocations, or a busy moment
        if prior.device.type == "cuda":
            torch.cuda.synchronize(prior.device)
        start = time.perf_counter()
        denoiser.predict(x, 0, chain)
        if prior.device.type == "cuda":
            torch.cuda.synchronize(prior.device)
        times.append(time.perf_counter() - start)
    return min(times)


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def save_params(op, folder: str, height: int, width: int) -> list[str]:
    """Write the estimated parameters of image 0 as images into `folder`: the masks M (lowlight,
    hdr; 16-bit PNG of M clipped to [0, 1]) or the kernel (blind deblur; PNG scaled to its peak,
    and the exact values as .npy)."""
    import fsspec
    import numpy as np
    from gdp.io import write_image
    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    sep = "" if folder.endswith("/") else "/"
    written = []
    if hasattr(op, "kernels"):
        k = op.kernels()[0].detach().cpu()
        write_image(f"{folder}{sep}kernel.png", (k / k.max())[None, None].float())
        with fsspec.open(f"{folder}{sep}kernel.npy", "wb") as f:
            np.save(f, k.double().numpy())
        return [f"{folder}{sep}kernel.png", f"{folder}{sep}kernel.npy"]
    masks = op.mask_image(height, width)[0].detach().cpu()
    for k, m in enumerate(masks):
        uri = f"{folder}{sep}mask-{k + 1}.png" if len(masks) > 1 else f"{folder}{sep}mask.png"
        write_image(uri, m.clamp(0, 1)[None, None].float(), bit_depth=16)
        written.append(uri)
    return written


def cmd_train(args: argparse.Namespace) -> dict:
    from gdp.progress import ProgressBar
    from gdp.train import train
    cfg = train_config(args, args.data, args.out)
    bar = ProgressBar(cfg.steps, "train")
    result = train(cfg, progress=lambda p: bar.update(p.step, p.total, f"loss {p.loss:.4f} {p.steps_per_second:.2f} it/s"),
                   log=lambda m: print(m, file=sys.stderr))
    return {"steps": result.steps, "checkpoint": result.checkpoint_uri, "prior": result.prior_uri,
            "skipped": list(result.skipped_files), "seconds": round(result.seconds, 1),
            "final_loss": round(result.final_loss, 5)}


def cmd_data(args: argparse.Namespace) -> dict:
    from gdp.data import build_dataset
    report = build_dataset(args.out, permissive_only=args.permissive_only, overwrite=args.overwrite)
    return report.to_dict()


COMMANDS = {"degrade": cmd_degrade, "restore": cmd_restore, "train": cmd_train, "data": cmd_data}


def main(argv: Sequence[str] | None = None) -> int:
    from gdp.io import ImageError
    from gdp.prior.checkpoint import CheckpointError
    try:
        args = build_parser().parse_args(argv)
        set_threads(getattr(args, "threads", None))
        result = COMMANDS[args.command](args)
    except (UsageError, ImageError, CheckpointError, ValueError, OSError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"gdp: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
