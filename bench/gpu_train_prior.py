"""Train the default prior on a GPU session's device machine for a fixed wall time.

    PYTHONPATH=. python3 bench/gpu_train_prior.py --seconds 480 --out "$OUT" [--init gdp/assets/default_prior.safetensors]
        [--data runs/prior-data]   # e.g. built here by `gdp data build runs/prior-data`, carried to the device

Exports what a device session can bring back (files of at most 16 MiB): the EMA weights as two
fp32 safetensors shards with the prior spec in their metadata, the raw (non-EMA) weights in fp16,
the loss history and the last sample grid. `merge_exported()` joins the shards into one prior file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from gdp.train import TrainConfig, train

DATA = "runs/prior-data"


def export(run_dir: Path, out: Path, light: bool = False) -> None:
    from safetensors.torch import save_file
    ckpt = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    meta = {"gdp_spec": json.dumps(ckpt["spec"]), "train_steps": str(ckpt["step"])}
    (out / "history.json").write_text(json.dumps(ckpt["history"]))
    if light:  # two files: the EMA weights in fp16 (what ships; < 16 MiB for adm-small-64) and the history
        save_file({k: v.half().contiguous() for k, v in ckpt["ema"].items()}, out / "ema-fp16.safetensors",
                  metadata=meta)
        return
    keys = sorted(ckpt["ema"])
    sizes = [ckpt["ema"][k].numel() for k in keys]
    half = next(i for i in range(len(keys)) if sum(sizes[:i + 1]) * 2 >= sum(sizes)) + 1  # balance bytes
    for n, part in enumerate((keys[:half], keys[half:])):
        save_file({k: ckpt["ema"][k].float().contiguous() for k in part}, out / f"ema-{n}.safetensors", metadata=meta)
    save_file({k: v.half().contiguous() for k, v in ckpt["model"].items()}, out / "model-fp16.safetensors", metadata=meta)
    grids = sorted(run_dir.glob("samples-*.png"))
    if grids:
        shutil.copy(grids[-1], out / "samples.png")


def merge_exported(folder: str, dest: str) -> None:
    """Join ema-0/ema-1 shards (brought back from the device) into one prior .safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    state, meta = {}, {}
    for shard in sorted(Path(folder).glob("ema-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            state.update({k: f.get_tensor(k) for k in f.keys()})
    save_file(state, dest, metadata=meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=480)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--preset", default="adm-small-64")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--gray-weight", type=float, default=1.0)
    ap.add_argument("--light", action="store_true", help="export only ema-fp16.safetensors and history.json")
    ap.add_argument("--run-dir", default="/tmp/prior-run")
    ap.add_argument("--data", default=DATA, help="training images, or a set built by `gdp data build` (its train/ "
                    "only; 56 MB for the full Debian set: fits a device session's 64 MiB carry)")
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    cfg = TrainConfig(data_uri=args.data, out_uri=str(run_dir), preset=args.preset, crop=args.crop,
                      batch_size=args.batch_size, lr=args.lr, steps=10**7, checkpoint_every=2000,
                      ema_decay=0.9995, max_seconds=args.seconds, init_from=args.init,
                      exclude=("astronaut.png", "coffee.png"), gray_weight=args.gray_weight)
    t0 = time.time()
    last = [0.0]

    def progress(p):
        if time.time() - last[0] > 15:
            last[0] = time.time()
            print(f"step {p.step} loss {p.loss:.4f} {p.steps_per_second:.1f} it/s {p.images_per_second:.0f} img/s",
                  flush=True)

    result = train(cfg, progress=progress)
    print(f"trained {result.steps} steps in {time.time() - t0:.0f} s, final loss {result.final_loss:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export(run_dir, out, light=args.light)
    print("exported", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
