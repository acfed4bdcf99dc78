"""Command line: `gdp degrade`, `gdp restore`, `gdp train` (also `python -m gdp`).

Errors in the input (missing or corrupt images, unknown options, checkpoints that do not fit)
print one line on stderr and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + message)
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=["sr", "deblur", "inpaint", "colorize"])
    p.add_argument("--factor", type=int, default=4, help="sr: downsampling factor (default 4)")
    p.add_argument("--filter", choices=["avgpool", "bicubic"], default="avgpool", help="sr: downsampling filter")
    p.add_argument("--sigma", type=float, help="deblur: Gaussian kernel sigma (default: the paper's 9x9 kernel)")
    p.add_argument("--kernel-size", type=int, help="deblur: Gaussian kernel size")
    p.add_argument("--kernel-file", help="deblur: kernel as .npy or grayscale PNG (normalised to sum 1)")
    p.add_argument("--blur-mode", choices=["same", "valid"], default="same",
                   help="deblur: 'same' size with reflect padding, or the paper's 'valid' convolution")
    p.add_argument("--mask", help="inpaint: mask image, white = known pixel, black = missing")
    p.add_argument("--mask-ratio", type=float, help="inpaint: fraction of pixels missing at random")
    p.add_argument("--mask-seed", type=int, default=0, help="inpaint: seed of the random mask")
    p.add_argument("--box", help="inpaint: missing box X,Y,W,H")


def operator_options(args: argparse.Namespace) -> dict:
    """Keyword options of `make_operator` from the parsed task options."""
    from gdp.restore import operator_options as options
    fields = vars(args).copy()
    if args.box:
        try:
            fields["box"] = tuple(int(v) for v in args.box.split(","))
            assert len(fields["box"]) == 4
        except (ValueError, AssertionError):
            raise UsageError(f"--box must be X,Y,W,H integers, got {args.box!r}") from None
    return options(**fields)


def mask_uri(observation_uri: str) -> str:
    """Where `gdp degrade --task inpaint` puts the mask of an observation: OBS.mask.png."""
    stem = observation_uri.rsplit(".", 1)[0] if "." in observation_uri.rsplit("/", 1)[-1] else observation_uri
    return stem + ".mask.png"


def add_restore_options(p: argparse.ArgumentParser) -> None:
    """Prior, sampling and tiling options shared by `gdp restore` and `python -m flows restore`."""
    p.add_argument("--prior", default="default", help="default, a checkpoint path or an fsspec URL")
    p.add_argument("--preset", help="architecture of a checkpoint without config (e.g. adm-256-uncond)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", choices=["x0", "xt"], default="x0", help="GDP-x0 (default) or GDP-xt")
    p.add_argument("--scale", type=float, help="guidance scale s, quoted at 1000 steps and 256x256 "
                   "(default per task: sr 16000, deblur 48000, inpaint 48000, colorize 6000)")
    p.add_argument("--samples", type=int, default=1, help="average this many posterior samples")
    p.add_argument("--tiling", choices=["auto", "single", "fused", "hierarchical"], default="auto")
    p.add_argument("--patch", type=int, help="patch size (default: the prior's native size)")
    p.add_argument("--stride", type=int, help="patch stride (default: 3/4 of the patch)")
    p.add_argument("--batch-size", type=int, default=8, help="patches per network call")
    p.add_argument("--blend", choices=["uniform", "smooth"], default="smooth",
                   help="patch blending: smooth (default; hides seams) or uniform (the authors)")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Training options shared by `gdp train` and `python -m flows train`."""
    p.add_argument("--preset", default="adm-small-64")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    p.add_argument("--fixed-sigma", action="store_true", help="train without the learned variance")
    p.add_argument("--exclude", nargs="*", default=[], help="file names kept out of training")
    p.add_argument("--gray-weight", type=float, default=1.0,
                   help="draw grayscale images this often relative to colour ones (e.g. 0.2: a more colourful prior)")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this many minutes")
    p.add_argument("--init", help="start from these weights (fine-tune an existing prior)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)


def train_config(args: argparse.Namespace, data: str, out: str):
    from gdp.train import TrainConfig
    return TrainConfig(data_uri=data, out_uri=out, preset=args.preset, crop=args.crop, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
                       schedule=args.schedule, learn_sigma=not args.fixed_sigma, exclude=tuple(args.exclude),
                       max_seconds=args.max_minutes * 60 if args.max_minutes else None, init_from=args.init,
                       device=args.device, seed=args.seed, gray_weight=args.gray_weight)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gdp", description="Generative Diffusion Prior restoration (Fei et al., CVPR 2023)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("degrade", help="synthesise an observation from a clean image")
    d.add_argument("gt")
    d.add_argument("obs")
    _add_task_options(d)
    d.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma in [0, 1] units")
    d.add_argument("--seed", type=int, default=0, help="seed of the noise")

    r = sub.add_parser("restore", help="restore an observation with GDP")
    r.add_argument("obs")
    r.add_argument("out")
    _add_task_options(r)
    add_restore_options(r)
    r.add_argument("--paper-scale", action="store_true",
                   help="the authors' rules: their scale per task (sr 2000, deblur 6000, inpaint 4000, "
                        "colorize 6000) applied per step, on the mean over the observation")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    t = sub.add_parser("train", help="train a prior on a folder or URL of clean images")
    t.add_argument("data")
    t.add_argument("out", help="output folder or URL (checkpoints, prior.safetensors, sample grids)")
    add_train_options(t)
    return parser


def resolve_device(name: str):
    import torch

    from gdp.prior.checkpoint import resolve_device as to_device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return to_device(name)


def cmd_degrade(args: argparse.Namespace) -> dict:
    import torch
    from gdp.io import read_image, write_image
    from gdp.operators import degrade, make_operator
    img = read_image(args.gt)
    x = img.pixels
    if args.task == "colorize" and x.shape[1] == 1:
        raise UsageError(f"{args.gt}: is already grayscale; colorize needs a colour ground truth")
    op = make_operator(args.task, **operator_options(args))
    y = degrade(x, op, noise_sigma=args.noise, generator=torch.Generator().manual_seed(args.seed))
    write_image(args.obs, y, bit_depth=img.bit_depth, icc_profile=img.icc_profile, protect=args.gt)
    result = {"task": args.task, "input": args.gt, "output": args.obs, "shape": list(y.shape[1:])}
    if args.task == "inpaint":
        mask = op.mask_for(x.shape[-2], x.shape[-1])[0]
        write_image(mask_uri(args.obs), mask, protect=args.gt)
        result["mask"] = mask_uri(args.obs)
    return result


def cmd_restore(args: argparse.Namespace) -> dict:
    import fsspec
    from gdp.io import read_image, same_location, write_image
    from gdp.operators import make_operator
    from gdp.prior.checkpoint import load_prior
    from gdp.progress import ProgressBar
    from gdp.restore import default_guidance, finish_output, prepare_observation, restore

    if args.steps < 1 or args.samples < 1:
        raise UsageError("--steps and --samples must be >= 1")
    if same_location(args.out, args.obs):
        raise UsageError(f"{args.out}: refusing to overwrite the input; choose another output path")
    options = operator_options(args)
    if args.task == "inpaint" and not options:
        mask = mask_uri(args.obs)
        fs, path = fsspec.core.url_to_fs(mask)
        if not fs.exists(path):
            raise UsageError(f"{args.obs}: inpaint needs a mask: --mask FILE, --mask-ratio R [--mask-seed S] "
                             f"or --box X,Y,W,H (no {mask} found)")
        options = {"mask_file": mask}
    op = make_operator(args.task, **options)
    img = read_image(args.obs)
    y, gray_in = prepare_observation(img.pixels, args.task, op)
    prior = load_prior(args.prior, preset=args.preset, device=resolve_device(args.device))
    rule = "paper" if args.paper_scale else None
    guidance = default_guidance(args.task, scale=args.scale, mode=args.guidance,
                                **({"step_rule": rule, "size_rule": rule} if rule else {}))
    bar = ProgressBar(args.steps * args.samples, "restore")
    result = restore(y, args.task, prior, operator=op, steps=args.steps, seed=args.seed, guidance=guidance,
                     samples=args.samples, tiling=args.tiling, patch=args.patch, stride=args.stride,
                     batch_size=args.batch_size, blend=args.blend, callback=bar)
    image = finish_output(result.image, args.task, gray_in)
    write_image(args.out, image.cpu(), bit_depth=img.bit_depth, icc_profile=img.icc_profile, exif=img.exif,
                protect=args.obs)
    return {"task": args.task, "input": args.obs, "output": args.out, "width": image.shape[-1],
            "height": image.shape[-2], "steps": args.steps, "samples": args.samples, "nfe": result.nfe,
            "seconds": round(result.seconds, 3), "consistency_psnr": round(float(result.consistency_psnr[0]), 3),
            "tiling": result.tiling, "prior": prior.prior_id, "seed": args.seed, "device": str(prior.device),
            "guidance": args.guidance, "scale": guidance.scale, "notes": list(img.notes)}


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


COMMANDS = {"degrade": cmd_degrade, "restore": cmd_restore, "train": cmd_train}


def main(argv: Sequence[str] | None = None) -> int:
    from gdp.io import ImageError
    from gdp.prior.checkpoint import CheckpointError
    try:
        args = build_parser().parse_args(argv)
        result = COMMANDS[args.command](args)
    except (UsageError, ImageError, CheckpointError, ValueError, FileNotFoundError) as e:
        message = " ".join(str(e).split())  # always one line
        print(f"gdp: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
