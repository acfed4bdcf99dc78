"""Peer benchmark: deepinv's DDRM, DiffPIR, DPS and PiGDM against GDP's data steps, same prior,
same observations, same NFE (optional `bench` extra: `pip install 'gdp[bench]'`, deepinv 0.5.0).

Pieces (each tested in tests/test_peers.py):

- `PriorDenoiser`: the project's prior (`load_prior(...).unet` and `.schedule`) as a deepinv
  denoiser `D(x, sigma)`, x in [0, 1] with noise of std sigma. It mirrors deepinv's own
  `DiffUNet.forward` (noise-level mode) step for step: images smaller than 520 px are padded
  circularly on the top/left to a multiple of 32; alpha = 1 / (1 + 4 sigma^2) and
  x_t = sqrt(alpha) (2 x - 1) (the variance-preserving scaling, in [-1, 1]); the timestep is the
  one whose sqrt(1 - alpha_bar_t) is nearest to 2 sigma sqrt(alpha); the network's first 3
  output channels are eps (the learned-variance channels are dropped); x0 = (x_t - 2 sigma
  sqrt(alpha) eps) / sqrt(alpha_bar_t), clamped to [-1, 1] and mapped back to [0, 1]. The alpha_bar
  table is the prior's own training schedule (deepinv hard-codes the same linear 1e-4..0.02).
- `SeparablePhysics`: a deepinv `DecomposablePhysics` (an SVD, which DDRM and PiGDM's exact
  inverse need) for any of our operators that acts per channel as M_h X M_w^T: the x4 average
  pooling and the paper's 9x9 kernel with a *valid* convolution (the kernel is rank one). M_h and
  M_w are read off our operator (its 4-D matrix is factored as a Kronecker product, and the
  factorisation is checked exact), so every method sees the same observation of the same operator;
  inpainting uses deepinv's own `Inpainting` with our mask. `physics_checks` compares them, and
  deepinv's `Downsampling`, `Blur` and `BlurFFT`, with our A on the observed images.
- the runner: tune each method's main hyperparameter on the tuning crops (5 values each, one
  edge rule for all, see `tuning`; the best mean PSNR per task at NFE 20 and 50, NFE 100 reusing
  50's), then run the report crops; rows to a JSON-lines file (resumable: rows already there are
  skipped). `report` prints the markdown tables and draws the plot of PSNR against NFE.

    OMP_NUM_THREADS=1 python bench/peers.py run --out a.jsonl --methods ddrm diffpir gdp-gradient gdp-cg gdp-project
    OMP_NUM_THREADS=1 python bench/peers.py run --out b.jsonl --methods dps pigdm --no-baselines
    python bench/peers.py report a.jsonl b.jsonl --plot docs/img/peers_nfe.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdp.guidance import QUANTISATION_SIGMA, Guidance  # noqa: E402
from gdp.prior.schedule import spaced_timesteps  # noqa: E402

PAD_LIMIT = 520  # DiffUNet pads images below this size to a multiple of 32; above, it runs patches
PAD_MULTIPLE = 32


# ------------------------------------------------------------------------------ the denoiser


class PriorDenoiser(torch.nn.Module):
    """Our prior as a deepinv denoiser D(x, sigma) (x in [0, 1]), mirroring `DiffUNet.forward`.

    `forward(x, t, type_t="timestep")` returns the raw network output (eps and the variance
    channels), as `DiffUNet.forward_diffusion`. `calls` counts network evaluations (a batch of
    images in one call counts once: NFE per image)."""

    def __init__(self, unet: torch.nn.Module, alpha_bar: torch.Tensor, channels: int = 3):
        super().__init__()
        self.unet = unet
        self.channels = channels
        alpha_bar = alpha_bar.to(torch.float64)
        self.register_buffer("sqrt_alphas_cumprod", alpha_bar.sqrt().float())
        self.register_buffer("sqrt_1m_alphas_cumprod", (1 - alpha_bar).sqrt().float())
        self.calls = 0

    @classmethod
    def from_prior(cls, prior) -> "PriorDenoiser":
        return cls(prior.unet, prior.schedule.alpha_bar, prior.spec.unet.in_channels).to(prior.device)

    def forward(self, x: torch.Tensor, sigma, y=None, type_t: str = "noise_level") -> torch.Tensor:
        if x.shape[-2] >= PAD_LIMIT or x.shape[-1] >= PAD_LIMIT:
            raise ValueError(f"DiffUNet runs images of {PAD_LIMIT} px or more in patches; not mirrored here")
        pad = (-x.size(-1) % PAD_MULTIPLE, 0, -x.size(-2) % PAD_MULTIPLE, 0)
        x = F.pad(x, pad, mode="circular")
        if type_t == "timestep":
            out = self.forward_diffusion(x, sigma)
        elif type_t == "noise_level":
            out = self.forward_denoise(x, sigma)
        else:
            raise ValueError('type_t must be either "timestep" or "noise_level"')
        return out[..., pad[-2]:, pad[-4]:]

    def forward_diffusion(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The network on x_t in [-1, 1] at integer timesteps: [eps, v] (2C channels)."""
        self.calls += 1
        return self.unet(x, timesteps)

    def sigma_tensor(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """sigma (float, 0-d, [1] or [B]) as [B, 1, 1, 1] in x's dtype, as deepinv's `_handle_sigma`."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(x.shape[0])
        if s.numel() != x.shape[0]:
            raise ValueError(f"got {s.numel()} noise levels for a batch of {x.shape[0]}")
        return s.view(-1, *([1] * (x.ndim - 1)))

    def timestep(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """The DDPM timestep [B] the noise level sigma ([0, 1] units) is mapped to."""
        s = self.sigma_tensor(sigma, x)
        s = s * (1 / (1 + 4 * s ** 2)).sqrt()
        table = self.sqrt_1m_alphas_cumprod.to(x.device)
        return (table[:, None] - 2 * s.reshape(1, -1)).abs().argmin(dim=0)

    def forward_denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = self.sigma_tensor(sigma, x)
        alpha = 1 / (1 + 4 * s ** 2)
        x_t = alpha.sqrt() * (2 * x - 1)
        s = s * alpha.sqrt()
        t = (self.sqrt_1m_alphas_cumprod.to(x.device)[:, None] - 2 * s.reshape(1, -1)).abs().argmin(dim=0)
        eps = self.forward_diffusion(x_t, t)[:, :self.channels]
        x0 = (x_t - eps * s * 2) / self.sqrt_alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        return (x0.clamp(-1, 1) + 1) / 2


# ------------------------------------------------------------------------------- the physics


def operator_matrix(op, x_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Our operator on one channel as a 4-D tensor T[a, b, i, j] = (A e_ij)[a, b] (float64)."""
    _, _, h, w = x_shape
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    out = torch.cat([op.A(chunk) for chunk in basis.split(1024)])  # [h*w, 1, h', w']
    return out[:, 0].reshape(h, w, *out.shape[-2:]).permute(2, 3, 0, 1)


def kronecker_factors(op, x_shape, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_h [h', h], M_w [w', w]) with A x = M_h x M_w^T per channel (Van Loan-Pitsianis: the rank-one
    factorisation of T rearranged as [(a, i), (b, j)]); ValueError if A is not separable to `tol`."""
    t = operator_matrix(op, x_shape)
    hp, wp, h, w = t.shape
    r = t.permute(0, 2, 1, 3).reshape(hp * h, wp * w)
    v = r.abs().sum(dim=0)  # power iteration for the leading singular pair (r is sparse-ish, large)
    for _ in range(100):
        u = r @ v
        u = u / u.norm()
        v = r.T @ u
    s0, v = v.norm(), v / v.norm()
    rest = (r - s0 * torch.outer(u, v)).norm() / r.norm()
    if rest > tol:
        raise ValueError(f"operator is not separable: relative residual {float(rest):.2e}")
    m_h = (s0.sqrt() * u).reshape(hp, h)
    m_w = (s0.sqrt() * v).reshape(wp, w)
    if m_h.sum() < 0:  # fix the sign so both factors are non-negative filters
        m_h, m_w = -m_h, -m_w
    return m_h, m_w


def _deepinv():
    import deepinv
    return deepinv


def separable_physics(m_h: torch.Tensor, m_w: torch.Tensor, channels: int, sigma: float):
    """A deepinv DecomposablePhysics for x -> M_h x M_w^T per channel, with Gaussian noise `sigma`."""
    dinv = _deepinv()

    class SeparablePhysics(dinv.physics.DecomposablePhysics):
        """SVD A = (U_h (x) U_w) diag(s_h (x) s_w) (V_h (x) V_w)^T; the spectral domain has the image's
        shape, the singular values fill its top-left h' x w' block (zero elsewhere: the null space)."""

        def __init__(self):
            u_h, s_h, vt_h = torch.linalg.svd(m_h, full_matrices=True)
            u_w, s_w, vt_w = torch.linalg.svd(m_w, full_matrices=True)
            (hp, h), (wp, w) = m_h.shape, m_w.shape
            mask = torch.zeros(1, channels, h, w, dtype=torch.float64)
            mask[..., :hp, :wp] = torch.outer(s_h, s_w)
            super().__init__(mask=mask.float(), noise_model=dinv.physics.GaussianNoise(sigma=sigma))
            self.out_hw = (hp, wp)
            for name, value in {"u_h": u_h, "u_w": u_w, "v_h": vt_h.T, "v_w": vt_w.T}.items():
                self.register_buffer(name, value.float().contiguous())

        def V_adjoint(self, x):
            return self.v_h.T @ x @ self.v_w

        def V(self, x, **kwargs):
            return self.v_h @ x @ self.v_w.T

        def U(self, x):
            hp, wp = self.out_hw
            return self.u_h @ x[..., :hp, :wp] @ self.u_w.T

        def U_adjoint(self, x, **kwargs):
            core = self.u_h.T @ x @ self.u_w
            h, w = self.mask.shape[-2:]
            return F.pad(core, (0, w - core.shape[-1], 0, h - core.shape[-2]))

    return SeparablePhysics()


def make_physics(op, task: str, x_shape, sigma: float = QUANTISATION_SIGMA):
    """The deepinv physics every peer uses for our operator `op` on images of `x_shape`."""
    dinv = _deepinv()
    if task == "inpaint":
        mask = op.mask_for(*x_shape[-2:])[0].expand(x_shape[1], -1, -1).contiguous()
        return dinv.physics.Inpainting(img_size=tuple(x_shape[1:]), mask=mask,
                                       noise_model=dinv.physics.GaussianNoise(sigma=sigma))
    m_h, m_w = kronecker_factors(op, x_shape)
    return separable_physics(m_h, m_w, x_shape[1], sigma)


def physics_checks(op, task: str, x: torch.Tensor, physics) -> dict:
    """Max |A_deepinv x - A_ours x| for the physics used and deepinv's stock operators (float32)."""
    dinv = _deepinv()
    ours = op.A(x)
    checks = {"used": float((physics.A(x) - ours).abs().max())}
    if task == "sr":
        box = torch.ones(1, 1, op.factor, op.factor) / op.factor ** 2
        stock = dinv.physics.Downsampling(img_size=tuple(x.shape[1:]), filter=box, factor=op.factor,
                                          padding="valid")
        checks["Downsampling(box, valid)"] = float((stock.A(x) - ours).abs().max())
    if task == "deblur":
        kernel = op.kernel.float()[None, None]
        checks["Blur(valid)"] = float((dinv.physics.Blur(filter=kernel, padding="valid").A(x) - ours).abs().max())
        fft = dinv.physics.BlurFFT(img_size=tuple(x.shape[1:]), filter=kernel).A(x)
        gap, offset = _best_window(fft, ours)
        checks["BlurFFT (circular): its interior window"] = gap
        checks["BlurFFT window offset"] = offset
        checks["BlurFFT output size"] = list(fft.shape[-2:])
    if task == "inpaint":
        stock = dinv.physics.Inpainting(img_size=tuple(x.shape[1:]), mask=op.mask_for(*x.shape[-2:])[0])
        checks["Inpainting"] = float((stock.A(x) - ours).abs().max())
    return checks


def _best_window(full: torch.Tensor, valid: torch.Tensor) -> tuple[float, list[int]]:
    """The offset where the valid output sits inside a same-size (circular) one, and the max gap there."""
    hp, wp = valid.shape[-2:]
    best = (math.inf, [0, 0])
    for dy in range(full.shape[-2] - hp + 1):
        for dx in range(full.shape[-1] - wp + 1):
            gap = float((full[..., dy:dy + hp, dx:dx + wp] - valid).abs().max())
            best = min(best, (gap, [dy, dx]))
    return best


# ------------------------------------------------------------------------------- the methods

DDRM, DIFFPIR, DPS, PIGDM = "ddrm", "diffpir", "dps", "pigdm"
OURS = {"gdp-gradient": "gradient", "gdp-cg": "cg", "gdp-project": "project"}
# Every unbounded hyperparameter is tried at its default times 0.1, 0.3, 1, 3, 10; when the best of
# these is on an edge and beats its neighbour by more than EXTEND_DB, the next value of the series
# beyond that edge is tried too (at most two per side): the same rule for every method.
SERIES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
MULTIPLIERS = SERIES[2:7]
EXTEND_DB = 0.05


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    param: str  # the hyperparameter tuned
    default: float
    grid: tuple[float, ...]  # tried first
    series: tuple[float, ...] = ()  # the values an edge may extend to, ascending (empty: bounded, no extension)


def methods(task: str) -> dict[str, Method]:
    """Every method with its main hyperparameter and the 5-value grid it is tuned over (the same size
    for all): deepinv's default (ours: the project's) times 0.1..10, extensible to 0.01..100 by the
    edge rule; DDRM's eta lives in [0, 1] and is not extended."""
    from gdp.guidance import DEFAULT_SCALES

    def scaled(name, param, default):
        return Method(name, param, default, tuple(default * m for m in MULTIPLIERS),
                      tuple(default * m for m in SERIES))
    out = {DDRM: Method(DDRM, "eta", 0.85, (0.0, 0.25, 0.5, 0.85, 1.0)),
           DIFFPIR: scaled(DIFFPIR, "lambda", 7.0),
           DPS: scaled(DPS, "weight", 1.0),
           PIGDM: scaled(PIGDM, "weight", 1.0),
           "gdp-gradient": scaled("gdp-gradient", "scale", DEFAULT_SCALES[task])}
    out.update({name: scaled(name, "prox", 1.0) for name in ("gdp-cg", "gdp-project")})
    return out


def ddrm_sigmas(alpha_bar: torch.Tensor, nfe: int) -> list[float]:
    """DDRM's noise levels in [0, 1] units at `nfe` evenly spaced DDPM timesteps, 999 down to 0
    (the original DDRM walks the DDPM timesteps; sigma_t = sqrt((1 - a_t) / a_t) in [-1, 1] units)."""
    ab = alpha_bar.to(torch.float64)
    return [float(((1 - ab[t]) / ab[t]).sqrt() / 2) for t in reversed(spaced_timesteps(len(ab), nfe))]


def run_peer(name: str, value: float, denoiser: PriorDenoiser, physics, y: torch.Tensor, nfe: int,
             seed: int, alpha_bar: torch.Tensor) -> torch.Tensor:
    """One deepinv sampler on y with `nfe` network evaluations; returns x in [0, 1]."""
    dinv = _deepinv()
    device = y.device
    torch.manual_seed(seed)  # DDRM and DiffPIR draw from the global generator
    rng = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        if name == DDRM:
            model = dinv.sampling.DDRM(denoiser, sigmas=np.array(ddrm_sigmas(alpha_bar, nfe)), eta=value)
            return model(y, physics)
        if name == DIFFPIR:
            model = dinv.sampling.DiffPIR(denoiser, dinv.optim.data_fidelity.L2(), max_iter=nfe, lambda_=value,
                                          device=device)
            return model(y, physics)
    steps = nfe + 1  # nfe + 1 time steps from 1 to 0: nfe solver steps, one call each (none left at t = 0)
    if name == DPS:
        model = dinv.sampling.DPS(denoiser, num_steps=steps, weight=value, device=device, rng=rng)
        return model(y, physics, seed=seed).float()
    if name == PIGDM:
        from deepinv.sampling import DDPMSolver, PiGDMDataFidelity, PosteriorDiffusion, VariancePreservingDiffusion
        solver = DDPMSolver(timesteps=torch.linspace(1, 0, steps, device=device, dtype=torch.float64), rng=rng)
        model = PosteriorDiffusion(data_fidelity=PiGDMDataFidelity(weight=value), denoiser=denoiser,
                                   sde=VariancePreservingDiffusion(alpha=1.0, device=device, dtype=torch.float64),
                                   solver=solver, device=device, dtype=torch.float64)
        return model(y, physics, seed=seed).float()
    raise ValueError(f"unknown peer {name!r}")


# The solved steps' settings, pinned (the project's defaults of 2026-12-01, gdp.guidance.SOLVED_DEFAULTS):
# a later change of the defaults cannot leak into half of a run. Every row records its guidance.
SOLVED = {"cg_iters": 40, "zeta": 1.0, "sigma_y": 0.0}


def our_guidance(name: str, task: str, value: float) -> Guidance:
    """The project's guidance for `task` with data step OURS[name] and its hyperparameter `value`:
    the default scale and rules of `default_guidance`, the solved steps' settings of SOLVED."""
    from gdp.restore import default_guidance
    step = OURS[name]
    base = dataclasses.replace(default_guidance(task, data_step="gradient"), data_step=step)
    if step == "gradient":
        return dataclasses.replace(base, scale=value)
    return dataclasses.replace(base, prox=value, **SOLVED)


# -------------------------------------------------------------------------------- the runner

# 64x64 crops (NAME:TOP:LEFT:SIZE) of the two photos held out of the shipped prior's training,
# outside the 256x256 crops of examples/eval (on which the project's default scales were chosen)
TUNE_CROPS = ("astronaut:160:384:64", "coffee:276:330:64")
REPORT_CROPS = ("astronaut:0:0:64", "astronaut:0:384:64", "astronaut:320:400:64",
                "coffee:64:0:64", "coffee:128:426:64", "coffee:300:100:64")
TASKS = ("sr", "deblur", "inpaint")
NFES = (20, 50, 100)
TUNE_NFES = (20, 50)  # NFE 100 reuses the value tuned at 50 (CPU budget; the same rule for every method)
PEERS = (DDRM, DIFFPIR, DPS, PIGDM)
ALL_METHODS = (*PEERS, *OURS)
SEED = 0


def load_crop(spec: str) -> tuple[str, torch.Tensor]:
    """NAME:TOP:LEFT:SIZE of a scikit-image photo -> (spec, [1, 3, SIZE, SIZE] in [0, 1])."""
    import skimage.data
    name, top, left, size = spec.split(":")
    top, left, size = int(top), int(left), int(size)
    pixels = getattr(skimage.data, name)()[top:top + size, left:left + size, :3]
    if pixels.shape[:2] != (size, size):
        raise ValueError(f"{spec}: crop outside the photo")
    return spec, torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 255


def skipped(method: str, task: str) -> str | None:
    """Why a (method, task) pair is not run, or None."""
    if method == "gdp-project" and task == "deblur":
        return "the valid blur is not row-orthogonal: data_step 'project' falls back to 'cg' (same run)"
    return None


def run_case(method: Method, value: float, task: str, case, physics, prior, denoiser, nfe: int) -> dict:
    """One restoration of one observation, scored: PSNR/SSIM of the 8-bit output, consistency, time."""
    from gdp.evaluate import quantise
    from gdp.metrics import consistency_psnr, psnr, ssim
    from gdp.restore import restore
    wall, cpu = time.perf_counter(), time.process_time()
    extra = {}
    if method.name in OURS:
        guidance = our_guidance(method.name, task, value)
        extra["guidance"] = dataclasses.asdict(guidance)
        result = restore(case.y, task, prior, operator=case.op, steps=nfe, seed=SEED, guidance=guidance)
        image, counted = result.image, result.nfe
    else:
        before = denoiser.calls
        image = run_peer(method.name, value, denoiser, physics, case.y, nfe, SEED, prior.schedule.alpha_bar)
        counted = denoiser.calls - before
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    image = quantise(image.detach().cpu().float())
    finite = bool(torch.isfinite(image).all())
    image = torch.nan_to_num(image, nan=0.0)
    return {"psnr": round(float(psnr(image, case.reference)[0]), 3), "ssim": round(float(ssim(image, case.reference)[0]), 4),
            "consistency_psnr": round(float(consistency_psnr(case.op, image, case.y)[0]), 2),
            "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "nfe_counted": counted, "finite": finite,
            **extra}


def _key(row: dict) -> tuple:
    return row["stage"], row["method"], row["task"], row["nfe"], row["crop"], row["value"]


def read_rows(paths) -> list[dict]:
    rows = []
    for path in paths:
        p = Path(path)
        if p.exists():
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return rows


def _tune_psnrs(rows: list[dict], method: str, task: str, nfe: int, value: float) -> list[float]:
    return [r["psnr"] for r in rows if r["stage"] == "tune" and r["method"] == method and r["task"] == task
            and r["nfe"] == nfe and math.isclose(r["value"], value, rel_tol=1e-9)]


def tuning(rows: list[dict], method: Method, task: str, nfe: int) -> tuple[float | None, float | None]:
    """(next value to run on the tuning crops, None when tuning is complete; the tuned value, None until
    then). The grid first; then the edge rule (see SERIES). The tuned value has the best mean PSNR on the
    tuning crops (the smallest value of exact ties)."""
    values = list(method.grid)
    while True:
        means = {}
        for value in values:
            ps = _tune_psnrs(rows, method.name, task, nfe, value)
            if len(ps) < len(TUNE_CROPS):
                return value, None
            means[value] = sum(ps) / len(ps)
        ordered = sorted(values)
        k = max(range(len(ordered)), key=lambda j: (means[ordered[j]], -j))
        series = list(method.series)
        edge, inner, step = (ordered[-1], ordered[-2], 1) if k == len(ordered) - 1 else (ordered[0], ordered[1], -1)
        if series and k in (0, len(ordered) - 1) and means[edge] - means[inner] > EXTEND_DB:
            at = min(range(len(series)), key=lambda j: abs(series[j] - edge))
            if 0 <= at + step < len(series):
                values.append(series[at + step])
                continue
        return None, ordered[k]


def best_value(rows: list[dict], method: Method, task: str, nfe: int) -> float | None:
    """The tuned value (None while tuning is incomplete)."""
    return tuning(rows, method, task, nfe)[1]


def run(args) -> None:
    from gdp.baselines import BASELINES
    from gdp.evaluate import observe, quantise
    from gdp.metrics import consistency_psnr, psnr, ssim
    from gdp.prior.checkpoint import load_prior
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    if prior.spec.schedule != "linear":  # DiffPIR and the VP SDE of DPS/PiGDM hard-code the linear schedule
        raise SystemExit(f"deepinv's samplers assume the linear DDPM schedule; this prior uses {prior.spec.schedule}")
    prior.unet.eval()
    denoiser = PriorDenoiser.from_prior(prior).eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows([out, *args.also_read])
    done = {_key(r) for r in rows}
    crops = {"tune": [load_crop(c) for c in TUNE_CROPS], "report": [load_crop(c) for c in REPORT_CROPS]}
    physics_cache, checks = {}, {}

    def emit(row: dict) -> None:
        rows.append(row)
        done.add(_key(row))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)

    for task in args.tasks:  # physics once per task: the same operator for every crop (fixed size, mask seed 0)
        case = observe(crops["report"][0][1], task)
        physics_cache[task] = make_physics(case.op, task, tuple(crops["report"][0][1].shape))
        checks[task] = {name: physics_checks(case.op, task, x, physics_cache[task])
                        for name, x in crops["report"] + crops["tune"]}
    if args.checks:
        Path(args.checks).write_text(json.dumps(checks, indent=1) + "\n")
    base = {"prior_id": prior.prior_id, "seed": SEED, "threads": args.threads}
    if args.baselines:
        for task in args.tasks:
            for crop, x in crops["report"]:
                case = observe(x, task)
                for name, baseline in BASELINES[task].items():
                    if ("report", name, task, 0, crop, 0.0) in done:
                        continue
                    t0 = time.perf_counter()
                    image = quantise(baseline.fn(case))
                    emit({"stage": "report", "method": name, "task": task, "nfe": 0, "crop": crop, "param": None,
                          "value": 0.0, "psnr": round(float(psnr(image, x)[0]), 3),
                          "ssim": round(float(ssim(image, x)[0]), 4),
                          "consistency_psnr": round(float(consistency_psnr(case.op, image, case.y)[0]), 2),
                          "seconds": round(time.perf_counter() - t0, 2), **base})
    for nfe in args.nfe:
        for task in args.tasks:
            table = methods(task)
            for name in args.methods:
                if skipped(name, task):
                    continue
                method = table[name]
                tuned_at = max([n for n in args.tune_nfe if n <= nfe], default=min(args.tune_nfe))

                def once(stage: str, value: float, todo) -> None:
                    for crop, x in todo:
                        if (stage, name, task, nfe, crop, value) not in done:
                            emit({"stage": stage, "method": name, "task": task, "nfe": nfe, "crop": crop,
                                  "param": method.param, "value": value, "tuned_at": tuned_at,
                                  **run_case(method, value, task, observe(x, task), physics_cache[task], prior,
                                             denoiser, nfe), **base})
                while tuned_at == nfe and (value := tuning(rows, method, task, nfe)[0]) is not None:
                    once("tune", value, crops["tune"])
                value = best_value(rows, method, task, tuned_at)
                if value is None:
                    raise SystemExit(f"{name} {task}: not tuned at NFE {tuned_at}; run that NFE first")
                once("report", value, crops["report"])


# -------------------------------------------------------------------------------- the report

LABELS = {DDRM: "DDRM (deepinv)", DIFFPIR: "DiffPIR (deepinv)", DPS: "DPS (deepinv)", PIGDM: "ΠGDM (deepinv)",
          "gdp-gradient": "GDP, gradient (paper)", "gdp-cg": "GDP, cg", "gdp-project": "GDP, project"}
TASK_LABELS = {"sr": "SR x4 (avgpool)", "deblur": "deblur 9x9 (valid)", "inpaint": "inpaint 25%"}


def summarise(rows: list[dict]) -> list[dict]:
    """Means over the report crops per (task, method, nfe), with the tuned value."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["stage"] == "report":
            groups.setdefault((r["task"], r["method"], r["nfe"]), []).append(r)
    out = []
    for (task, method, nfe), rs in groups.items():
        if len({r["value"] for r in rs}) > 1:
            raise ValueError(f"{method} {task} NFE {nfe}: report rows at several values {sorted({r['value'] for r in rs})}")
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        out.append({"task": task, "method": method, "nfe": nfe, "crops": len(rs), "param": rs[0]["param"],
                    "value": rs[0]["value"], "tuned_at": rs[0].get("tuned_at", nfe), "psnr": mean("psnr"), "ssim": mean("ssim"),
                    "consistency_psnr": mean("consistency_psnr"),
                    "seconds": mean("cpu_seconds") if "cpu_seconds" in rs[0] else mean("seconds"),
                    "nfe_counted": rs[0].get("nfe_counted"), "finite": all(r.get("finite", True) for r in rs)})
    order = {m: k for k, m in enumerate(ALL_METHODS)}
    return sorted(out, key=lambda s: (TASKS.index(s["task"]), s["nfe"] == 0, order.get(s["method"], 99), s["nfe"]))


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.3g}"


def _db(value: float) -> str:
    return "∞ (exact)" if math.isinf(value) else f"{value:.2f}"


def markdown(rows: list[dict]) -> str:
    """PSNR against NFE per task and method, then every mean with the tuned value."""
    summary = summarise(rows)
    nfes = sorted({s["nfe"] for s in summary if s["nfe"]})
    lines = ["| task | method | " + " | ".join(f"NFE {n}" for n in nfes) + " | tuned (per NFE) |",
             "|---|---|" + "---|" * len(nfes) + "---|"]
    for task in TASKS:
        for method in ALL_METHODS:
            cells = {s["nfe"]: s for s in summary if s["task"] == task and s["method"] == method}
            if cells:
                tuned = " / ".join(_fmt(cells[n]["value"]) if n in cells else "-" for n in nfes)
                lines.append(f"| {task} | {LABELS[method]} | " + " | ".join(
                    f"{cells[n]['psnr']:.2f}" if n in cells else "not run" for n in nfes)
                    + f" | {next(iter(cells.values()))['param']} {tuned} |")
        for s in summary:
            if s["task"] == task and s["nfe"] == 0:
                lines.append(f"| {task} | {s['method']} (no network) | " + " | ".join([f"{s['psnr']:.2f}"] * len(nfes))
                             + " | - |")
    lines += ["", "| task | method | tuned | NFE | PSNR dB | SSIM | consistency dB | CPU s/image |",
              "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        tuned = "-" if s["param"] is None else f"{s['param']} = {_fmt(s['value'])}"
        if s["param"] is not None and s["tuned_at"] != s["nfe"]:
            tuned += f" (NFE {s['tuned_at']}'s)"
        bad = "" if s["finite"] else " (non-finite output)"
        lines.append(f"| {s['task']} | {LABELS.get(s['method'], s['method'])} | {tuned} | {s['nfe'] or '-'} | "
                     f"{s['psnr']:.2f}{bad} | {s['ssim']:.4f} | {_db(s['consistency_psnr'])} | {s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    summary = summarise(rows)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.6))
    styles = {DDRM: ("tab:blue", "o", "-"), DIFFPIR: ("tab:orange", "s", "-"), DPS: ("tab:green", "^", "-"),
              PIGDM: ("tab:red", "v", "-"), "gdp-gradient": ("black", "o", "--"), "gdp-cg": ("tab:purple", "D", "--"),
              "gdp-project": ("tab:brown", "x", "--")}
    for ax, task in zip(axes, TASKS):
        for method in ALL_METHODS:
            pts = sorted((s["nfe"], s["psnr"]) for s in summary if s["task"] == task and s["method"] == method)
            if pts:
                colour, marker, line = styles[method]
                ax.plot(*zip(*pts), color=colour, marker=marker, linestyle=line, label=LABELS[method])
        ax.set_xscale("log")
        ax.set_xlim(16, 125)
        for s in summary:
            if s["task"] == task and s["nfe"] == 0:
                ax.axhline(s["psnr"], color="gray", linestyle=":", linewidth=1)
                ax.annotate(f"{s['method']} {s['psnr']:.1f}", (17, s["psnr"]), fontsize=7, color="gray",
                            xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(NFES, [str(n) for n in NFES])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(TASK_LABELS[task])
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("PSNR dB (6 held-out 64x64 crops)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="tune on the tuning crops, then run the report crops (resumable)")
    r.add_argument("--out", required=True, help="JSON lines, appended to (rows already there are skipped)")
    r.add_argument("--also-read", nargs="*", default=[], help="other row files whose rows count as done")
    r.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    r.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    r.add_argument("--nfe", nargs="+", type=int, default=list(NFES))
    r.add_argument("--tune-nfe", nargs="+", type=int, default=list(TUNE_NFES),
                   help="NFEs tuned on the tuning crops; a larger NFE reuses the value of the last one below it")
    r.add_argument("--prior", default="default")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--checks", help="write the physics checks (max |A_deepinv - A_ours| per crop) to this JSON")
    r.add_argument("--no-baselines", dest="baselines", action="store_false")
    q = sub.add_parser("report", help="markdown table (stdout) and plot from row files")
    q.add_argument("rows", nargs="+")
    q.add_argument("--plot")
    args = p.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        rows = read_rows(args.rows)
        sys.stdout.write(markdown(rows))
        if args.plot:
            plot(rows, args.plot)


if __name__ == "__main__":
    main()
