"""GPU speed of the paper-sized prior: precision, memory format, torch.compile, and seconds per megapixel.

    python bench/gpu.py --out DIR            # CUDA: adm-256-uncond, random weights (same FLOPs as the real model)
    python bench/gpu.py --out DIR --tiny     # CPU smoke run: adm-tiny-32, tiny sizes (what the test runs)

Without CUDA the run is tiny whatever the flags. Writes `gpu.json` and `gpu.md` (a markdown table)
under DIR and prints the table. Measures, each the median of --repeats timed forwards after warm-up:

1. seconds per patch per step (one UNet forward of a batch of native-size patches, divided by the
   batch size) for fp32 / bf16 / fp16 autocast, default and channels_last layouts, and torch.compile;
2. the model's FLOPs per patch (torch.utils.flop_counter) and the fraction of the GPU's peak that
   each configuration reaches: the theoretical floor is FLOPs / peak;
3. seconds per megapixel at --steps sampling steps (x4 super-resolution to a --megapixels output),
   fused and hierarchical tiling, in the fastest eager configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from gdp.operators import make_operator
from gdp.prior.checkpoint import PriorSpec, build_prior
from gdp.restore import restore

# Dense peak throughput in TFLOP/s from NVIDIA's data sheets (TF32 is what cuDNN uses for fp32
# convolutions by default; bf16/fp16 tensor cores). Keyed by a substring of the device name.
PEAKS = {
    "H100 PCIe": {"fp32": 378.0, "bf16": 756.0, "fp16": 756.0},
    "H100": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},  # SXM
    "H200": {"fp32": 494.7, "bf16": 989.4, "fp16": 989.4},
    "A100": {"fp32": 156.0, "bf16": 312.0, "fp16": 312.0},
}


def peak_for(name: str) -> dict | None:
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(model, x, t, precision: str, repeats: int, warmup: int) -> float:
    """Median seconds of one forward of batch x."""
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    times = []
    with torch.no_grad():
        for k in range(warmup + repeats):
            sync(x.device)
            t0 = time.perf_counter()
            if amp is None:
                model(x, t)
            else:
                with torch.autocast(x.device.type, dtype=amp):
                    model(x, t)
            sync(x.device)
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(model, size: int, channels: int, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, channels, size, size, device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return float(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true", help="small preset and sizes (the CPU test)")
    ap.add_argument("--batch", type=int, default=None, help="patches per forward (default 8 on CUDA, 2 tiny)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps for s/MP (default 100; tiny 2)")
    ap.add_argument("--megapixels", type=float, default=None, help="output size for s/MP (default 1; tiny 64x64)")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    preset = "adm-tiny-32" if tiny else "adm-256-uncond"
    batch = args.batch or (2 if tiny else 8)
    repeats = args.repeats or (3 if tiny else 10)
    steps = args.steps or (2 if tiny else 100)
    torch.manual_seed(0)
    prior = build_prior(PriorSpec.from_preset(preset), device=device)  # random weights: same FLOPs
    unet, size, ch = prior.unet, prior.image_size, prior.spec.unet.in_channels
    name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    peak = peak_for(name) if cuda else None
    flops = count_flops(unet, size, ch, device)
    info = {"device": name, "torch": torch.__version__, "preset": preset, "patch": size, "batch": batch,
            "params": sum(p.numel() for p in unet.parameters()), "gflops_per_patch": flops / 1e9,
            "date": time.strftime("%Y-%m-%d"), "rows": [], "tiling": []}
    print(f"{name}, torch {torch.__version__}, {preset} ({info['params'] / 1e6:.1f} M params, "
          f"{flops / 1e9:.1f} GFLOP per {size}x{size} patch), batch {batch}", flush=True)

    x = torch.randn(batch, ch, size, size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    configs = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True), ("fp16", False), ("fp16", True)]
    if not cuda:
        configs = [("fp32", False), ("fp32", True), ("bf16", True)]
    for precision, cl in configs:
        fmt = torch.channels_last if cl else torch.contiguous_format
        unet.to(memory_format=fmt)
        sec = time_forward(unet, x.contiguous(memory_format=fmt), t, precision, repeats, 2)
        info["rows"].append({"precision": precision, "channels_last": cl, "compile": False, "s_per_patch": sec / batch})
        print(f"{precision:5s} channels_last={cl!s:5s}: {sec / batch * 1e3:8.2f} ms/patch", flush=True)
    if not args.no_compile:
        best = min(info["rows"], key=lambda r: r["s_per_patch"])
        fmt = torch.channels_last if best["channels_last"] else torch.contiguous_format
        unet.to(memory_format=fmt)
        row = {"precision": best["precision"], "channels_last": best["channels_last"], "compile": True}
        try:
            t0 = time.perf_counter()
            compiled = torch.compile(unet)
            time_forward(compiled, x.contiguous(memory_format=fmt), t, best["precision"], 1, 0)
            row["compile_seconds"] = time.perf_counter() - t0
            sec = time_forward(compiled, x.contiguous(memory_format=fmt), t, best["precision"], repeats, 2)
            row["s_per_patch"] = sec / batch
            print(f"compiled {best['precision']}: {sec / batch * 1e3:8.2f} ms/patch "
                  f"(compile {row['compile_seconds']:.0f} s)", flush=True)
        except Exception as e:  # report, don't die: compile support differs between machines
            row["s_per_patch"], row["error"] = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            print("torch.compile failed:", row["error"], flush=True)
        info["rows"].append(row)
    for row in info["rows"]:
        if row["s_per_patch"] and peak:
            row["tflops"] = flops / row["s_per_patch"] / 1e12
            row["floor_s_per_patch"] = flops / (peak[row["precision"]] * 1e12)
            row["fraction_of_peak"] = row["floor_s_per_patch"] / row["s_per_patch"]

    # Seconds per megapixel of a whole restoration, in the fastest eager configuration.
    eager = [r for r in info["rows"] if not r["compile"]]
    best = min(eager, key=lambda r: r["s_per_patch"])
    prior.set_precision(best["precision"], channels_last=best["channels_last"])
    side = 64 if tiny and args.megapixels is None else int(round((args.megapixels or 1.0) ** 0.5 * 1024 / 16) * 16)
    op = make_operator("sr", factor=4)
    y = torch.rand(1, 3, side // 4, side // 4, device=device)
    for tiling in ("fused", "hierarchical"):
        sync(device)
        t0 = time.perf_counter()
        r = restore(y, "sr", prior, operator=op, steps=steps, tiling=tiling, batch_size=batch)
        sync(device)
        sec = time.perf_counter() - t0
        mp = side * side / 1e6
        info["tiling"].append({"tiling": tiling, "side": side, "steps": steps, "nfe": r.nfe, "seconds": sec,
                               "s_per_megapixel": sec / mp, "precision": best["precision"],
                               "channels_last": best["channels_last"]})
        print(f"{tiling}: {side}x{side} at {steps} steps in {sec:.1f} s = {sec / mp:.1f} s/MP ({r.nfe} NFE)",
              flush=True)
    if cuda:
        info["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(info, indent=1))
    (out / "gpu.md").write_text(markdown(info))
    print(markdown(info))


def markdown(info: dict) -> str:
    lines = [f"{info['device']}, torch {info['torch']}, {info['date']}: {info['preset']} "
             f"({info['params'] / 1e6:.1f} M params, {info['gflops_per_patch']:.1f} GFLOP per "
             f"{info['patch']}x{info['patch']} patch), batch {info['batch']}", "",
             "| precision | channels_last | compile | ms / patch / step | TFLOP/s | floor ms | of peak |",
             "|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        ms = f"{r['s_per_patch'] * 1e3:.2f}" if r["s_per_patch"] else r.get("error", "failed")
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        floor = f"{r['floor_s_per_patch'] * 1e3:.2f}" if "floor_s_per_patch" in r else "-"
        frac = f"{r['fraction_of_peak']:.0%}" if "fraction_of_peak" in r else "-"
        lines.append(f"| {r['precision']} | {r['channels_last']} | {r['compile']} | {ms} | {tf} | {floor} | {frac} |")
    lines += ["", "| tiling | output | steps | NFE | seconds | s / megapixel | precision |", "|---|---|---|---|---|---|---|"]
    for r in info["tiling"]:
        lines.append(f"| {r['tiling']} | {r['side']}x{r['side']} | {r['steps']} | {r['nfe']} | {r['seconds']:.1f} | "
                     f"{r['s_per_megapixel']:.1f} | {r['precision']}{' + channels_last' if r['channels_last'] else ''} |")
    if "peak_memory_gib" in info:
        lines += ["", f"Peak GPU memory: {info['peak_memory_gib']:.1f} GiB"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
