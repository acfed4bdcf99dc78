"""Seconds per network evaluation (NFE) and the share of wall time inside the UNet forward.

    python bench/speed.py [--prior default] [--steps 20] [--repeats 3] [--batch-sizes 1 4 8 16] [--one-call]

Restores held-out sample images (examples/sr-x4, x4 super-resolution, 128x128 outputs = 9 patches
of 64 px with the default prior) with patch-fused sampling at several patch batch sizes, and
times every UNet forward with a hook. Prints a markdown table (medians of --repeats runs): wall and
CPU (process) seconds per NFE (one NFE = one patch through the network; on a shared machine the
CPU time is the steadier figure), patches per second of the whole sampler and of the UNet
forwards alone, and the share of wall time inside the UNet.

By default each image is restored by its own call (9 patches per step: batch sizes above 9 do
not apply); `--one-call` restores the three images in one call (27 patches per step, batched
across images; results do not depend on it), so batch sizes up to 27 are exercised.
"""

from __future__ import annotations

import argparse
import glob
import platform
import statistics
import time
from pathlib import Path

import torch

from gdp.io import read_image
from gdp.prior.checkpoint import load_prior
from gdp.restore import restore

ROOT = Path(__file__).resolve().parent.parent


class UNetTimer:
    """Accumulates wall time spent inside `module.forward` (CPU: no sync needed; CUDA: synchronised)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self.calls, self._t0 = 0.0, 0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _sync(self, x):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def _pre(self, module, args):
        self._sync(args[0])
        self._t0 = time.perf_counter()

    def _post(self, module, args, out):
        self._sync(out)
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prior", default="default")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one-call", action="store_true", help="restore the three images in one batched call")
    args = ap.parse_args()
    prior = load_prior(args.prior, device=args.device)
    timer = UNetTimer(prior.unet)
    ys = [read_image(f).pixels for f in sorted(glob.glob(str(ROOT / "examples/sr-x4/*.png")))]
    calls = [torch.cat(ys)] if args.one_call else ys
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, prior {prior.prior_id}")
    print(f"one call for all images: {args.one_call}; steps {args.steps}; repeats {args.repeats} (interleaved: "
          "every repeat runs every batch size, so load changes hit all of them)")
    measure(calls, prior, timer, 1, args.batch_sizes[0])  # warm-up (first calls allocate and pick kernels)
    runs: dict[int, list[dict]] = {bs: [] for bs in args.batch_sizes}
    for _ in range(args.repeats):
        for bs in args.batch_sizes:
            runs[bs].append(measure(calls, prior, timer, args.steps, bs))
    print("\n| patch batch | s / NFE (median) | CPU s / NFE (median) | patches / s (sampler) | "
          "patches / s (UNet forwards) | share of wall time in UNet (median) | NFE per image |")
    print("|---|---|---|---|---|---|---|")
    for bs, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {bs} | {med['wall'] * 1000:.1f} ms | {med['cpu'] * 1000:.1f} ms | {1 / med['wall']:.1f} | "
              f"{med['unet_rate']:.1f} | {med['share']:.3f} | {rs[0]['nfe'] // len(ys)} |")


def measure(calls: list[torch.Tensor], prior, timer: UNetTimer, steps: int, batch_size: int) -> dict:
    """Wall and CPU (process) seconds per NFE, UNet patches per second and UNet share of one pass."""
    timer.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    nfe = sum(restore(y, "sr", prior, factor=4, steps=steps, batch_size=batch_size).nfe * len(y) for y in calls)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall": wall / nfe, "cpu": cpu / nfe, "unet_rate": nfe / timer.seconds, "share": timer.seconds / wall,
            "nfe": nfe}

if __name__ == "__main__":
    main()
