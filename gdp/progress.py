"""A small progress bar on stderr (redrawn in place on a terminal, a line per 10% otherwise)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 30):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.monotonic()
        self._last_decile = -1

    def update(self, done: int, total: int | None = None, extra: str = "") -> None:
        if total:
            self.total = max(total, 1)
        frac = min(done / self.total, 1.0)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(frac * self.width)
        text = (f"{self.label} {frac:4.0%} |{bar:<{self.width}}| {done}/{self.total} "
                f"[{_clock(elapsed)}<{_clock(eta)}]{' ' + extra if extra else ''}")
        if self.tty:
            self.stream.write("\r" + text + ("\n" if done >= self.total else ""))
            self.stream.flush()
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            self.stream.write(text + "\n")
            self.stream.flush()

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m:02d}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"
