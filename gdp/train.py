"""Train a small ADM prior (Ho et al. 2020 with Nichol & Dhariwal's hybrid loss for learned sigma).

Data: random crops (scale jitter, flips, 90-degree rotations) of the clean images under any
fsspec URL or folder, held in memory. Checkpoints (`ckpt.pt`: model, EMA, optimiser,
step, loss log, RNG) are written atomically every N steps together with `prior.safetensors`
(EMA weights + spec) and a sample grid PNG; a restarted run resumes from `ckpt.pt`.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import fsspec
import torch
import torch.nn.functional as F
from PIL import Image

from gdp.prior.checkpoint import PriorSpec, build_prior, resolve_device, save_prior
from gdp.prior.denoiser import resolve_precision
from gdp.prior.schedule import Schedule, make_betas
from gdp.prior.unet import PRESETS, UNet


@dataclass(frozen=True)
class TrainConfig:
    data_uri: str
    out_uri: str
    preset: str = "adm-small-64"
    crop: int = 64
    batch_size: int = 16
    steps: int = 10000  # total optimiser steps (a resumed run continues up to this)
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    schedule: str = "linear"
    learn_sigma: bool = True
    checkpoint_every: int = 250
    min_scale: float = 0.5  # scale jitter: crops of crop/scale pixels, resized down to crop
    exclude: tuple[str, ...] = ()  # file names kept out of training (validation)
    gray_weight: float = 1.0  # how often a grayscale source is drawn relative to a colour one (<1: more colour)
    seed: int = 0
    device: str = "auto"
    grid_size: int = 4  # sample grid is grid_size x grid_size
    grid_steps: int = 50
    max_seconds: float | None = None  # stop (with a checkpoint) after this much wall time
    init_from: str | None = None  # start a new run from these weights (a prior file or URL)
    precision: str = "auto"  # autocast of the forward: bf16 where the hardware has it (auto), fp32 or bf16


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total: int
    loss: float
    steps_per_second: float
    images_per_second: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    checkpoint_uri: str
    prior_uri: str
    skipped_files: tuple[str, ...]
    seconds: float
    final_loss: float


class DataError(ValueError):
    """No usable training images (one-line message)."""


def load_training_images(uri: str, crop: int, exclude: tuple[str, ...] = ()) -> tuple[list[torch.Tensor], list[str]]:
    """Float `[3, H, W]` tensors in [-1, 1] of every readable image >= crop under `uri`, plus the
    skipped files with reasons (unreadable, too small). A data set written by `gdp data build`
    trains on its `train/` folder only (never on `heldout/`)."""
    from gdp.data import training_folder
    from gdp.io import IMAGE_EXTENSIONS, ImageError, list_images, read_image

    uri = training_folder(uri)
    files = [f for f in list_images(uri) if f.rsplit("/", 1)[-1] not in exclude]
    if not files:
        raise DataError(f"{uri}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    images, skipped = [], []
    for f in files:
        try:
            px = read_image(f).pixels[0]
        except ImageError as e:
            skipped.append(str(e))
            continue
        if min(px.shape[-2:]) < crop:
            skipped.append(f"{f}: {px.shape[-1]}x{px.shape[-2]} is smaller than the crop size {crop}")
            continue
        images.append((px.expand(3, -1, -1) * 2 - 1).contiguous())
    if not images:
        raise DataError(f"{uri}: none of the {len(files)} files is usable: " + "; ".join(skipped[:3]))
    return images, skipped


def is_gray(image: torch.Tensor) -> bool:
    """True when the three channels of `[3, H, W]` are identical (a grayscale source used as RGB)."""
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())


def random_crops(images: list[torch.Tensor], n: int, crop: int, min_scale: float, g: torch.Generator,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """`[n, 3, crop, crop]` in [-1, 1]: random image (uniform, or drawn by `weights`), scale jitter,
    position, flip and 90-degree rotation.

    All crops of one source image are drawn in one `grid_sample` call (bilinear), so this is cheap
    on a GPU; `images` are uint8 `[3, H, W]` on the training device.
    """
    device = images[0].device
    if weights is None:
        which = torch.randint(len(images), (n,), generator=g)
    else:
        which = torch.multinomial(weights, n, replacement=True, generator=g)
    scale = min_scale + (1 - min_scale) * torch.rand(n, generator=g)  # crop covers crop/scale source px
    pos = torch.rand(n, 2, generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rot = torch.randint(4, (n,), generator=g)
    out = torch.empty(n, 3, crop, crop, device=device)
    for k in which.unique().tolist():
        idx = (which == k).nonzero().flatten()
        img = images[k]
        h, w = img.shape[-2:]
        side = torch.clamp(crop / scale[idx], max=min(h, w))  # source side in pixels
        # affine theta maps output [-1, 1]^2 to source normalised coordinates
        sx, sy = side / w, side / h
        cx = (pos[idx, 0] * (w - side) + side / 2) / w * 2 - 1
        cy = (pos[idx, 1] * (h - side) + side / 2) / h * 2 - 1
        angle = rot[idx].float() * (torch.pi / 2)
        cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
        fx = torch.where(flip[idx], -1.0, 1.0)
        theta = torch.stack([torch.stack([sx * cos * fx, -sx * sin, cx], -1),
                             torch.stack([sy * sin * fx, sy * cos, cy], -1)], 1).to(device)
        grid = F.affine_grid(theta, [len(idx), 3, crop, crop], align_corners=False)
        # one source image, all its crops stacked as one tall grid: no copies of the source
        tall = F.grid_sample(img[None], grid.reshape(1, -1, crop, 2), mode="bilinear",
                             padding_mode="reflection", align_corners=False)
        out[idx.to(device)] = tall.reshape(3, len(idx), crop, crop).transpose(0, 1)
    return out.clamp(-1, 1)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p(x) for 8-bit data in [-1, 1] under a Gaussian discretised into 256 bins (DDPM sec 3.3)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = _std_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_prob = torch.where(x < -0.999, torch.log(cdf_plus.clamp(min=1e-12)),
                           torch.where(x > 0.999, torch.log((1 - cdf_min).clamp(min=1e-12)),
                                       torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return -log_prob


class DiffusionLoss:
    """L_simple (eps MSE) plus, for learned sigma, the per-step VLB term on the variance only
    (IDDPM L_hybrid with lambda = 0.001 at T = 1000)."""

    def __init__(self, schedule: Schedule, learn_sigma: bool, device: torch.device):
        self.T = len(schedule)
        self.learn_sigma = learn_sigma
        to = lambda v: v.float().to(device)  # noqa: E731
        self.sqrt_ab, self.sqrt_1mab = to(schedule.alpha_bar.sqrt()), to((1 - schedule.alpha_bar).sqrt())
        self.c1, self.c2 = (to(c) for c in schedule.posterior_mean_coefs)
        self.log_beta, self.log_beta_tilde = to(schedule.betas.log()), to(schedule.posterior_log_variance_clipped)

    def __call__(self, unet: torch.nn.Module, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        b, c = x0.shape[:2]
        t = torch.randint(self.T, (b,), generator=g).to(x0.device)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        ex = lambda v: v[t][:, None, None, None]  # noqa: E731
        x_t = ex(self.sqrt_ab) * x0 + ex(self.sqrt_1mab) * noise
        out = unet(x_t, t).float()
        mse = (out[:, :c] - noise).square().mean(dim=(1, 2, 3))
        if not self.learn_sigma:
            return mse.mean(), {"mse": mse.mean().item()}
        # VLB on the variance only: the mean comes from a detached eps (IDDPM sec 3.1).
        x0_pred = (x_t - ex(self.sqrt_1mab) * out[:, :c].detach()) / ex(self.sqrt_ab)
        mean_pred = ex(self.c1) * x0_pred + ex(self.c2) * x_t
        frac = (out[:, c:] + 1) / 2
        logvar_pred = frac * ex(self.log_beta) + (1 - frac) * ex(self.log_beta_tilde)
        mean_true = ex(self.c1) * x0 + ex(self.c2) * x_t
        kl = normal_kl(mean_true, ex(self.log_beta_tilde), mean_pred, logvar_pred).mean(dim=(1, 2, 3)) / math.log(2)
        nll = discretized_gaussian_nll(x0, mean_pred, 0.5 * logvar_pred).mean(dim=(1, 2, 3)) / math.log(2)
        vb = torch.where(t == 0, nll, kl)
        return (mse + vb).mean(), {"mse": mse.mean().item(), "vb": vb.mean().item()}


def spec_for(cfg: TrainConfig) -> PriorSpec:
    unet = replace(PRESETS[cfg.preset], image_size=cfg.crop, out_channels=6 if cfg.learn_sigma else 3)
    return PriorSpec(unet, schedule=cfg.schedule, num_train_steps=1000, preset=cfg.preset)


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def _write_atomic(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def _read_checkpoint(uri: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def save_grid(uri: str, images: torch.Tensor, nrow: int) -> None:
    """Write `[N, 3, h, w]` images in [-1, 1] as one PNG grid."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + 2), nrow * (w + 2))
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = images[k]
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    _write_atomic(uri, buf.getvalue())


def training_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast for "bf16", never for "fp32"; "auto": on CUDA, and on CPUs with native bf16
    (AVX512-BF16 / AMX: 1.7-2x faster per training step on this project's CPU, docs/PRIOR.md)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise DataError(f"unknown precision {precision!r}: use auto, fp32 or bf16")
    return resolve_precision(precision, device) == "bf16"


def train(cfg: TrainConfig, *, progress: Callable[[TrainProgress], None] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) a prior; returns where the checkpoint and the EMA prior were written."""
    device = resolve_device(cfg.device)
    images, skipped = load_training_images(cfg.data_uri, cfg.crop, cfg.exclude)
    for s in skipped:
        log(f"skipped {s}")
    log(f"training on {len(images)} images ({len(skipped)} skipped) on {device}")
    weights = None
    if cfg.gray_weight != 1.0:
        if cfg.gray_weight < 0:
            raise DataError(f"gray_weight must be >= 0, got {cfg.gray_weight}")
        weights = torch.tensor([cfg.gray_weight if is_gray(im) else 1.0 for im in images])
        if not weights.sum() > 0:
            raise DataError(f"{cfg.data_uri}: every image is grayscale and gray_weight is 0")
        log(f"{int((weights != 1).sum())} grayscale images drawn with weight {cfg.gray_weight}")
    spec = spec_for(cfg)
    with torch.random.fork_rng(devices=[]):  # initial weights from cfg.seed; the caller's RNG is left as it was
        torch.manual_seed(cfg.seed)
        unet = UNet(spec.unet)
    unet = unet.to(device).to(memory_format=torch.channels_last)
    ema = UNet(spec.unet).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)
    g = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    ckpt_uri = _join(cfg.out_uri, "ckpt.pt")
    ckpt = _read_checkpoint(ckpt_uri)
    if ckpt is not None:
        if ckpt["spec"] != spec.to_dict():
            raise DataError(f"{ckpt_uri}: checkpoint was trained with a different preset/config; use a new output")
        unet.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        g.set_state(ckpt["rng"])
        step, history = int(ckpt["step"]), list(ckpt["history"])
        log(f"resumed from {ckpt_uri} at step {step}")
    elif cfg.init_from:
        from gdp.prior.checkpoint import read_checkpoint
        state, _ = read_checkpoint(cfg.init_from)
        unet.load_state_dict({k: v.float() for k, v in state.items()})
        ema.load_state_dict(unet.state_dict())
        log(f"initialised from {cfg.init_from}")
    images = [im.to(device) for im in images]
    bf16 = training_bf16(cfg.precision, device)
    log(f"forward in {'bf16 autocast' if bf16 else 'fp32'}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    loss_fn = DiffusionLoss(Schedule.from_betas(make_betas(cfg.schedule, 1000)), cfg.learn_sigma, device)
    t_start, t_window, window_steps, last_loss = time.time(), time.time(), 0, float("nan")
    while step < cfg.steps and not (cfg.max_seconds and time.time() - t_start > cfg.max_seconds):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        x0 = random_crops(images, cfg.batch_size, cfg.crop, cfg.min_scale, g, weights).to(device)
        with autocast:
            loss, parts = loss_fn(unet, x0.contiguous(memory_format=torch.channels_last), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        window_steps += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pm, 1 - decay)
        last_loss = loss.item()
        history.append([step, last_loss, parts.get("mse", last_loss), parts.get("vb", 0.0)])
        if step % 10 == 0 or step == cfg.steps:
            rate = window_steps / max(time.time() - t_window, 1e-9)
            t_window, window_steps = time.time(), 0
            if progress:
                progress(TrainProgress(step, cfg.steps, last_loss, rate, rate * cfg.batch_size))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _checkpoint(cfg, spec, unet, ema, opt, g, step, history, device)
            log(f"step {step}/{cfg.steps} loss {last_loss:.4f} checkpoint written to {cfg.out_uri}")
    if step % cfg.checkpoint_every:  # stopped by max_seconds between checkpoints
        _checkpoint(cfg, spec, unet, ema, opt, g, step, history, device)
    return TrainResult(step, ckpt_uri, _join(cfg.out_uri, "prior.safetensors"), tuple(skipped),
                       time.time() - t_start, last_loss)


def _checkpoint(cfg, spec, unet, ema, opt, g, step, history, device) -> None:
    state = {"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": g.get_state(),
             "step": step, "history": history, "spec": spec.to_dict(), "config": json.dumps(asdict(cfg))}
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_atomic(_join(cfg.out_uri, "ckpt.pt"), buf.getvalue())
    prior = build_prior(spec, {k: v.cpu() for k, v in ema.state_dict().items()}, device=device)
    local = _join(cfg.out_uri, "prior.safetensors")
    save_prior(local, prior, spec, {"train_steps": step, "train_images": cfg.data_uri})
    _write_atomic(_join(cfg.out_uri, "history.json"), json.dumps(history).encode())
    if cfg.grid_size > 0:
        from gdp.sampling import make_generators, sample_prior
        n = cfg.grid_size ** 2
        samples = sample_prior(prior.denoiser(), (3, cfg.crop, cfg.crop), cfg.grid_steps, make_generators(0, n), device)
        save_grid(_join(cfg.out_uri, f"samples-{step:07d}.png"), samples.cpu(), cfg.grid_size)
