"""Loss curve of a prior's training run: python bench/plot_training.py HISTORY.json [MORE.json ...] --out docs/img/prior_loss.png

HISTORY.json is the `history.json` a training run writes: rows [step, loss, mse, vb]. A run that
continued another (`--init`) restarts its step count: `--continues` offsets each later file's steps
by the last step of the files before it and marks the switch with a vertical line.
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
    ap.add_argument("--continues", action="store_true", help="later files continue earlier ones (offset steps)")
    ap.add_argument("--labels", nargs="*", default=[], help="with --continues: one label per later file")
    args = ap.parse_args()
    rows, offset, marks = {}, 0, []
    for n, path in enumerate(args.histories):
        if args.continues and n > 0:
            offset = max(rows)
            marks.append(offset)
        for r in json.load(open(path)):
            rows[int(r[0]) + offset] = [int(r[0]) + offset, *r[1:]]
    h = np.array([rows[k] for k in sorted(rows)])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, step in enumerate(marks):
        ax.axvline(step, color="0.5", ls="--", lw=0.8)
        if k < len(args.labels):
            ax.text(step, 0.98, " " + args.labels[k], transform=ax.get_xaxis_transform(), va="top", fontsize=7)
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
