"""Seconds per network evaluation (NFE) and the share of wall time inside the UNet forward.

    python bench/speed.py [--prior default] [--steps 20] [--repeats 3] [--batch-sizes 1 4 8 16] [--one-call]

Restores held-out sample images (examples/sr-x4, x4 super-resolution, 128x128 outputs = 9 patches
of 64 px with the default prior) with patch-fused sampling at several patch batch sizes, and
times every UNet forward with a hook. Prints a markdown table (medians of --repeats runs): seconds
per NFE (one NFE = one patch through the network), patches per second of the whole sampler and
of the UNet forwards alone, and the share of wall time inside the UNet.

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
    print(f"one call for all images: {args.one_call}; steps {args.steps}; repeats {args.repeats}")
    print("\n| patch batch | s / NFE (median) | patches / s (sampler) | patches / s (UNet forwards) | "
          "share of wall time in UNet (median) | NFE per image |")
    print("|---|---|---|---|---|---|")
    for bs in args.batch_sizes:
        per_nfe, unet_rate, shares = [], [], []
        for _ in range(args.repeats):
            timer.reset()
            t0 = time.perf_counter()
            nfe = sum(restore(y, "sr", prior, factor=4, steps=args.steps, batch_size=bs).nfe * len(y) for y in calls)
            wall = time.perf_counter() - t0
            per_nfe.append(wall / nfe)
            unet_rate.append(nfe / timer.seconds)
            shares.append(timer.seconds / wall)
        print(f"| {bs} | {statistics.median(per_nfe) * 1000:.1f} ms | {1 / statistics.median(per_nfe):.1f} | "
              f"{statistics.median(unet_rate):.1f} | {statistics.median(shares):.3f} | {nfe // len(ys)} |", flush=True)


if __name__ == "__main__":
    main()
