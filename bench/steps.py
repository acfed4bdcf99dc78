"""Quality against the number of steps: the evaluation of `gdp.evaluate` at several step counts,
GDP-x0 and GDP-xt, plotted as PSNR and consistency PSNR against NFE.

    python bench/steps.py [--steps 10 25 50 100 250 1000] [--size 64] [--tasks sr deblur inpaint colorize]
                          [--data docs/data/quality_vs_steps.json] [--plot docs/img/quality_vs_steps.png]
    python bench/steps.py --plot-only          (redraw the plot and the table from --data)

`--long-steps 1000 --long-images astronaut-face` runs step counts >= 1000 on those images only
(1000 steps of one 64x64 image and task cost 1000 NFE); the plot then draws the mean over all
images where every image ran (thick) and the long-run images alone at every step count (thin).

Images: the three 128x128 held-out crops in examples/reference/, average-pooled to --size (64 by
default: one patch of the default prior, so NFE = steps). Baselines run once (they have no
steps). Results are saved to --data after every (steps, guidance) pair, and a re-run skips the
pairs already there, so the run can be stopped and resumed.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["sr", "deblur", "inpaint", "colorize"]


def load_images(size: int) -> dict[str, torch.Tensor]:
    from gdp.io import read_image
    images = {}
    for f in sorted(glob.glob(str(ROOT / "examples/reference/*.png"))):
        x = read_image(f).pixels
        images[Path(f).stem] = torch.nn.functional.adaptive_avg_pool2d(x, size) if x.shape[-1] != size else x
    return images


def run(args, data: dict) -> None:
    from gdp.evaluate import evaluate_image
    from gdp.prior.checkpoint import load_prior
    prior = load_prior(args.prior, device=args.device)
    images = load_images(args.size)
    done = {(r["steps"], r["method"]) for r in data["rows"]}
    if not any(r["steps"] is None for r in data["rows"]):  # baselines, once
        for name, x in images.items():
            data["rows"] += evaluate_image(x, name, prior, tasks=args.tasks, steps=1, guidance=())
        save(args.data, data)
    for steps in args.steps:
        subset = {n: x for n, x in images.items() if steps < args.long_steps or n in args.long_images}
        for mode in ("x0", "xt"):
            if (steps, f"gdp-{mode}") in done:
                continue
            t0 = time.perf_counter()
            for name, x in subset.items():
                data["rows"] += evaluate_image(x, name, prior, tasks=args.tasks, steps=steps, guidance=(mode,),
                                               baselines=False, batch_size=args.batch_size)
            save(args.data, data)
            print(f"steps {steps} gdp-{mode}: {time.perf_counter() - t0:.0f} s", flush=True)


def save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    """Mean over images per task, method and step count (markdown)."""
    import pandas as pd
    df = pd.DataFrame(rows)
    df["steps"] = df["steps"].fillna(0).astype(int)
    groups = df.groupby(["task", "method", "steps"], sort=False)
    means = groups[["nfe", "psnr", "ssim", "consistency_psnr"]].mean().join(groups.image.agg(lambda s: ", ".join(s)))
    lines = ["| task | method | steps | NFE | PSNR dB | SSIM | consistency dB | images |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, method, steps), r in means.iterrows():
        lines.append(f"| {task} | {method} | {steps or '-'} | {r.nfe:.0f} | {r.psnr:.2f} | {r.ssim:.4f} | "
                     f"{r.consistency_psnr:.2f} | {r.image} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.DataFrame(rows)
    tasks = list(dict.fromkeys(df.task))
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.6 * len(tasks), 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        d = df[df.task == task]
        for row, (metric, label) in enumerate([("psnr", "PSNR vs ground truth (dB)"),
                                               ("consistency_psnr", "consistency PSNR (dB)")]):
            ax = axes[row, col]
            for method, style, color in (("gdp-x0", "o-", "C0"), ("gdp-xt", "s--", "C1")):
                g = d[d.method == method]
                counts = g.groupby("nfe").image.nunique()
                full = g[g.nfe.isin(counts[counts == counts.max()].index)].groupby("nfe")[metric].mean()
                ax.plot(full.index, full.clip(upper=100).values, style, color=color, label=f"{method} ({counts.max()} images)")
                few = sorted(set(g[g.nfe == g.nfe.max()].image))
                if counts.min() < counts.max():  # the long-run image(s) alone, at every step count
                    m = g[g.image.isin(few)].groupby("nfe")[metric].mean()
                    ax.plot(m.index, m.clip(upper=100).values, style, color=color, linewidth=0.8, markersize=3,
                            alpha=0.6, label=f"{method} ({', '.join(few)})")
            for method, value in d[d.steps.isna()].groupby("method")[metric].mean().items():
                ax.axhline(min(value, 100), color="gray", linestyle=":", label=f"{method} (baseline)")
            ax.set_xscale("log")
            ax.set_xlabel("NFE per image")
            ax.set_title(f"{task}: PSNR" if row == 0 else f"{task}: consistency (inf drawn at 100)", fontsize=9)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 1000])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--prior", default="default")
    ap.add_argument("--long-steps", type=int, default=10 ** 9, help="from this step count on, only --long-images")
    ap.add_argument("--long-images", nargs="*", default=[])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (PSNR does not depend on it; seconds do)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--data", type=Path, default=ROOT / "docs/data/quality_vs_steps.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/img/quality_vs_steps.png")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = json.loads(args.data.read_text()) if args.data.exists() else {"rows": []}
    if not args.plot_only:
        data.setdefault("meta", {"started": time.strftime("%a %d %b %Y %H:%M:%S %Z"),
                                 "machine": f"{platform.machine()} {platform.processor()}, {args.threads} torch "
                                            f"threads, torch {torch.__version__}",
                                 "size": args.size, "images": list(load_images(args.size))})
        run(args, data)
        data["meta"]["finished"] = time.strftime("%a %d %b %Y %H:%M:%S %Z")
        save(args.data, data)
    meta = data.get("meta", {})
    priors = ", ".join(sorted({r["prior_id"] for r in data["rows"]}))
    plot(data["rows"], args.plot, f"GDP quality vs steps: {len(meta.get('images', []))} held-out crops of "
                                  f"{meta.get('size', '?')}x{meta.get('size', '?')}, prior {priors}")
    print(table(data["rows"]))


if __name__ == "__main__":
    main()
