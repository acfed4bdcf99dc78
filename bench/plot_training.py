"""Loss curve of a prior's training run: python bench/plot_training.py HISTORY.json [MORE.json ...] --out docs/img/prior_loss.png

HISTORY.json is the `history.json` a training run writes: rows [step, loss, mse, vb].
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def smooth(v: np.ndarray, k: int = 50) -> np.ndarray:
    return np.convolve(v, np.ones(k) / k, mode="valid") if len(v) > k else v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("histories", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = {}
    for path in args.histories:
        for r in json.load(open(path)):
            rows[int(r[0])] = r
    h = np.array([rows[k] for k in sorted(rows)])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(h[:, 0], h[:, 2], color="0.8", lw=0.5, label="eps MSE (per step)")
    ax.plot(h[49:, 0] if len(h) > 50 else h[:, 0], smooth(h[:, 2]), color="C0", label="eps MSE (mean of 50)")
    ax.plot(h[49:, 0] if len(h) > 50 else h[:, 0], smooth(h[:, 3]), color="C1", label="VLB term (mean of 50)")
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{len(h)} steps, last 200-step mean MSE {h[-200:, 2].mean():.4f}, VLB {h[-200:, 3].mean():.4f}")


if __name__ == "__main__":
    main()
