"""Resource limits checked before anything large is allocated.

An image's header (a few bytes) says how big its restoration will be: its output size follows from
the operator (x factor for super-resolution) and its memory from the tiling mode. `check_size`
refuses, in one line naming the file, an output above `max_output_megapixels` or one whose memory
estimate exceeds what this process can still get (`available_bytes`). docs/RELIABILITY.md gives
the model and its measurements.
"""

from __future__ import annotations

import resource

from gdp.io import ImageError

DEFAULT_MAX_OUTPUT_MEGAPIXELS = 100.0  # as the input limit (max_megapixels); 64 MP is the largest size measured

# Memory of one restoration beyond the process's fixed part (Python, torch, the prior: about 0.9 GiB),
# from docs/BENCHMARKS.md, "Time and memory against image size" and "Peak memory at 16 megapixels":
# hierarchical 0.91 -> 3.86 GiB from 4 to 64 MP (about 50 MiB per output MP), fused 2.77 GiB at
# 16 MP (about 120 MiB per MP). Rounded up; the decoded input (float32 and its copies) on top.
BYTES_PER_OUTPUT_PIXEL = {"hierarchical": 56, "fused": 136, "single": 136}
BYTES_PER_INPUT_PIXEL = 32
MARGIN_BYTES = 256 << 20


def estimate_bytes(in_width: int, in_height: int, out_width: int, out_height: int, mode: str) -> int:
    """Memory one restoration needs beyond the process's fixed part, in bytes (an estimate)."""
    per_pixel = BYTES_PER_OUTPUT_PIXEL.get(mode, max(BYTES_PER_OUTPUT_PIXEL.values()))
    return MARGIN_BYTES + in_width * in_height * BYTES_PER_INPUT_PIXEL + out_width * out_height * per_pixel


def auto_mode(out_width: int, out_height: int, tiling: str = "auto") -> str:
    """The tiling mode `gdp.restore.plan_tiling` picks for an output (without the prior's patch size)."""
    from gdp.restore import FUSED_MAX_PIXELS
    if tiling != "auto":
        return tiling
    return "fused" if out_width * out_height <= FUSED_MAX_PIXELS else "hierarchical"


def available_bytes() -> int | None:
    """What this process can still allocate: the least of the system's available memory, its cgroup's
    room (v2 memory.max, v1 limit_in_bytes) and its own address-space and data limits; None if unknown."""
    room = []
    meminfo = _read_kv("/proc/meminfo")
    if "MemAvailable" in meminfo:
        room.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            room.append(max(0, cap - used))
    status = _read_kv("/proc/self/status")
    for rlimit, key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(rlimit)[0]
        if soft != resource.RLIM_INFINITY and key in status:
            room.append(max(0, soft - int(status[key].split()[0]) * 1024))
    return min(room) if room else None


def check_size(uri: str, in_width: int, in_height: int, out_width: int, out_height: int, mode: str,
               max_output_megapixels: float = DEFAULT_MAX_OUTPUT_MEGAPIXELS) -> int:
    """The memory estimate of restoring `uri`, or ImageError (one line) if its output exceeds
    `max_output_megapixels` or the estimate exceeds `available_bytes()`."""
    megapixels = out_width * out_height / 1e6
    if megapixels > max_output_megapixels:
        raise ImageError(uri, f"its output would be {out_width}x{out_height} ({megapixels:.1f} MP), above the limit "
                              f"of {max_output_megapixels:g} MP (max_output_megapixels)")
    need = estimate_bytes(in_width, in_height, out_width, out_height, mode)
    check_memory(uri, need, f"{out_width}x{out_height} {mode}")
    return need


def check_memory(uri: str, need: int, what: str = "") -> None:
    """ImageError if `need` bytes exceed what this process can still allocate now."""
    room = available_bytes()
    if room is not None and need > room:
        what = f" ({what})" if what else ""
        raise ImageError(uri, f"restoring it{what} needs about {need / 2**30:.1f} GiB and this process can get "
                              f"{room / 2**30:.1f} GiB (memory estimate, docs/RELIABILITY.md)")


def _read_kv(path: str) -> dict[str, str]:
    try:
        with open(path) as f:
            return dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
