"""Load priors from checkpoints: data, never code (`weights_only=True` or safetensors).

Sources: "default" (the small prior shipped in gdp/assets), a local path, or any fsspec URL to a
`.pt`/`.pth` state dict (e.g. guided-diffusion's 256x256_diffusion_uncond.pt) or a `.safetensors`
file written by `gdp train` (its config travels in the safetensors metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import torch

from gdp.prior.denoiser import AUTOCAST, Denoiser, Precision, VarianceType
from gdp.prior.schedule import Schedule, make_betas
from gdp.prior.unet import PRESETS, UNet, UNetConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PRIOR = ASSETS / "default_prior.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the architecture (one-line message)."""


@dataclass(frozen=True)
class PriorSpec:
    """Everything needed to rebuild a prior besides its weights."""

    unet: UNetConfig
    schedule: str = "linear"
    num_train_steps: int = 1000
    preset: str | None = None

    def to_dict(self) -> dict:
        return {"unet": self.unet.to_dict(), "schedule": self.schedule,
                "num_train_steps": self.num_train_steps, "preset": self.preset}

    @classmethod
    def from_dict(cls, d: dict) -> "PriorSpec":
        return cls(UNetConfig.from_dict(d["unet"]), d.get("schedule", "linear"),
                   int(d.get("num_train_steps", 1000)), d.get("preset"))

    @classmethod
    def from_preset(cls, name: str) -> "PriorSpec":
        if name not in PRESETS:
            raise CheckpointError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return cls(PRESETS[name], preset=name)


@dataclass
class Prior:
    """A loaded prior: the raw network `.unet` (`unet(x, t)`), its training `.schedule`, an id."""

    unet: UNet
    schedule: Schedule
    spec: PriorSpec
    prior_id: str
    extra: dict = field(default_factory=dict)
    precision: Precision = "fp32"  # the UNet's autocast precision in sampling (bf16/fp16: CUDA)

    @property
    def image_size(self) -> int:
        return self.spec.unet.image_size

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def denoiser(self, *, variance: VarianceType | None = None, clip: bool = True) -> Denoiser:
        if variance is None:
            variance = "learned_range" if self.spec.unet.learn_sigma else "fixed_small"
        return Denoiser(self.unet, self.schedule, variance=variance, clip=clip,
                        image_size=self.image_size, channels=self.spec.unet.in_channels, precision=self.precision)

    def set_precision(self, precision: Precision, *, channels_last: bool = False) -> "Prior":
        """Run the UNet under autocast in `precision` (and in channels_last memory format)."""
        if precision not in AUTOCAST:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(AUTOCAST)}")
        self.precision = precision
        self.unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return self


# Bounds on an architecture that a file's metadata may declare, far above any real prior (ADM 256:
# 256 channels, 6 levels, 2 blocks, 1000 training steps), so that the spec itself stays cheap to
# check; the real bound on memory is that every weight must be in the file (check_keys, below).
SPEC_LIMITS = {"image_size": 8192, "in_channels": 64, "model_channels": 4096, "out_channels": 128,
               "num_res_blocks": 32, "num_heads": 1024, "num_head_channels": 4096, "levels": 12,
               "channel_mult": 64, "num_train_steps": 100_000}


def check_spec(spec: PriorSpec, source: str = "") -> None:
    """CheckpointError for an architecture out of SPEC_LIMITS (before anything is built)."""
    u = spec.unet
    values = {"image_size": u.image_size, "in_channels": u.in_channels, "model_channels": u.model_channels,
              "out_channels": u.out_channels, "num_res_blocks": u.num_res_blocks, "num_heads": u.num_heads,
              "num_head_channels": u.num_head_channels, "levels": len(u.channel_mult),
              "channel_mult": max(u.channel_mult, default=1), "num_train_steps": spec.num_train_steps}
    for key, value in values.items():
        if not isinstance(value, int) or value > SPEC_LIMITS[key] or (value < 1 and key not in ("num_heads",
                                                                                              "num_head_channels")):
            raise CheckpointError(f"{source or 'prior'}: its architecture declares {key} = {value!r}, outside "
                                  f"1..{SPEC_LIMITS[key]}; not a prior this package can build")


def build_prior(spec: PriorSpec, state_dict: dict | None = None, *, device: str | torch.device = "cpu",
                prior_id: str = "random", source: str = "") -> Prior:
    """Instantiate the UNet of `spec`, load `state_dict` strictly (if given), move to `device`.

    With a state dict, the architecture is checked against it first on the meta device (shapes
    only, no memory), so a file must hold every weight of the network it declares: a few hundred
    bytes of metadata cannot make this allocate a large network."""
    check_spec(spec, source)
    if state_dict is not None:
        with torch.device("meta"):
            shapes_only = UNet(spec.unet)
        check_keys(shapes_only, state_dict, source)
    unet = UNet(spec.unet)
    if state_dict is not None:
        unet.load_state_dict(state_dict, strict=True)
    unet.eval().requires_grad_(False).to(device)
    schedule = Schedule.from_betas(make_betas(spec.schedule, spec.num_train_steps))
    return Prior(unet, schedule, spec, prior_id)


def check_keys(unet: torch.nn.Module, state_dict: dict, source: str) -> None:
    expected = {k: v.shape for k, v in unet.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label} keys: {shown}")
        raise CheckpointError(f"{source}: checkpoint does not fit the architecture; " + "; ".join(parts)
                              + " (pass the matching --preset)")


def _read_bytes(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no such checkpoint file") from None
    except OSError as e:
        raise CheckpointError(f"{uri}: cannot read checkpoint ({e})") from None


def read_checkpoint(uri: str, data: bytes | None = None) -> tuple[dict, dict]:
    """(state_dict, metadata) from a .safetensors or .pt/.pth file; metadata may be empty."""
    data = _read_bytes(uri) if data is None else data
    name = uri.lower()
    if name.endswith(".safetensors"):
        from safetensors.torch import load as st_load
        try:
            state = st_load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {}) or {}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{uri}: not a valid safetensors file ({e})") from None
        return state, meta
    if name.endswith((".pt", ".pth", ".ckpt")):
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{uri}: not a loadable weights-only checkpoint ({str(e).splitlines()[0]})") from None
        if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):  # a gdp training checkpoint
            meta = {"gdp_spec": json.dumps(obj["spec"])} if "spec" in obj else {}
            return obj["ema"], meta
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{uri}: expected a state dict of tensors")
        return obj, {}
    raise CheckpointError(f"{uri}: unknown checkpoint type; use .safetensors, .pt or .pth")


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" picks CUDA when available, else the CPU; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def prior_uri(source: str) -> str:
    return str(DEFAULT_PRIOR) if source == "default" else str(source)


def load_prior(source: str = "default", *, preset: str | None = None, device: str | torch.device = "cpu") -> Prior:
    """Load a prior. `source`: "default", a path or an fsspec URL; `preset` names the architecture
    for checkpoints that carry no config (guided-diffusion .pt files default to adm-256-uncond)."""
    uri = prior_uri(source)
    if source == "default" and not DEFAULT_PRIOR.exists():
        raise CheckpointError(f"{uri}: the default prior is not installed (train one with `gdp train`)")
    data = _read_bytes(uri)
    state, meta = read_checkpoint(uri, data)
    if preset is not None:
        spec = PriorSpec.from_preset(preset)
    elif "gdp_spec" in meta:
        try:
            spec = PriorSpec.from_dict(json.loads(meta["gdp_spec"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{uri}: its gdp_spec metadata does not describe an architecture "
                                  f"({type(e).__name__}: {e}); pass --preset to name it") from None
    else:
        spec = PriorSpec.from_preset("adm-256-uncond")
    prior_id = (spec.preset or "custom") + "-" + hashlib.sha256(data).hexdigest()[:12]
    prior = build_prior(spec, state, device=device, prior_id=prior_id, source=uri)
    prior.extra = {k: v for k, v in meta.items() if k != "gdp_spec"}
    return prior


def save_prior(path: str, prior_or_unet: Prior | UNet, spec: PriorSpec, metadata: dict | None = None) -> None:
    """Write weights + spec as one .safetensors file (fp32), atomically for local paths."""
    from safetensors.torch import save as st_save
    unet = prior_or_unet.unet if isinstance(prior_or_unet, Prior) else prior_or_unet
    state = {k: v.detach().float().cpu().contiguous() for k, v in unet.state_dict().items()}
    meta = {"gdp_spec": json.dumps(spec.to_dict())}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    blob = st_save(state, metadata=meta)
    tmp = f"{path}.tmp"
    with fsspec.open(tmp, "wb") as f:
        f.write(blob)
    fs, p = fsspec.core.url_to_fs(path)
    fs.mv(f"{fs._strip_protocol(tmp)}", p)
