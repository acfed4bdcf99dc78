"""bench/gpu.sh runs unchanged on a CPU (tiny preset) and writes complete, consistent results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_runs_on_cpu_with_tiny_sizes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", str(ROOT / "bench/gpu.sh"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((tmp_path / "gpu.json").read_text())
    assert info["preset"] == "adm-tiny-32" and info["gflops_per_patch"] > 0.1
    eager = [r for r in info["rows"] if not r["compile"]]
    assert [(r["precision"], r["channels_last"]) for r in eager] == [("fp32", False), ("fp32", True), ("bf16", True)]
    assert all(r["s_per_patch"] > 0 for r in eager)
    compiled = [r for r in info["rows"] if r["compile"]]
    assert len(compiled) == 1 and (compiled[0]["s_per_patch"] or compiled[0]["error"])
    tiling = {r["tiling"]: r for r in info["tiling"]}
    assert set(tiling) == {"fused", "hierarchical"}
    for r in tiling.values():
        assert r["side"] == 64 and r["steps"] == 2 and r["nfe"] >= 2 * 4  # at least 4 patches of 32 px per step
        assert abs(r["s_per_megapixel"] - r["seconds"] / (64 * 64 / 1e6)) < 1e-6
    md = (tmp_path / "gpu.md").read_text()
    assert md.count("\n| fp32 |") >= 2 and "| hierarchical | 64x64 |" in md
