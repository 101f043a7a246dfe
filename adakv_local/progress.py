"""A progress bar for prompt processing, on stderr.

On a terminal the bar is redrawn in place (``\\r``) at most ten times a second; anywhere else
(a pipe, a log file, CI) a few plain lines are printed: one at each quarter of the prompt.
Use an instance as ``llm.progress_callback``::

    bar = PrefillProgress()
    llm.progress_callback = bar
    llm.create_completion(prompt)   # calls bar(tokens_done, tokens_total)
    bar.finish()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_BAR_WIDTH = 24
_REDRAW_S = 0.1


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class PrefillProgress:
    """Callable ``(tokens_done, tokens_total)`` that draws tokens done/total, tokens/s and the ETA.

    Args:
        label: what is being processed, shown first.
        stream: where to draw (default: ``sys.stderr`` at the time of each call).
        enabled: False draws nothing (``--quiet``).
        tty: force terminal (redraw) or plain-line mode; default: ``stream.isatty()``.
    """

    def __init__(self, label: str = "prompt", stream: TextIO | None = None, *, enabled: bool = True,
                 tty: bool | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self._stream = stream
        self._tty = tty
        self._t0: float | None = None
        self._last_draw = 0.0
        self._last_quarter = -1
        self._open_line = False
        self.done = 0
        self.total = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is None:
            isatty = getattr(self.stream, "isatty", None)
            self._tty = bool(callable(isatty) and isatty())
        return self._tty

    def start(self) -> None:
        """Start the clock (otherwise the first call starts it, and its tokens count as instant)."""
        self._t0 = time.perf_counter()
        self._last_quarter = -1
        self.done = self.total = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0 = now
        self.done, self.total = done, max(total, 1)
        if not self.enabled:
            return
        if self.tty:
            if done >= total or now - self._last_draw >= _REDRAW_S:
                self._last_draw = now
                self.stream.write("\r" + self.line(now) + "\x1b[K")
                self._open_line = True
                if done >= total:
                    self.finish()
                else:
                    self.stream.flush()
            return
        quarter = min(4, done * 4 // self.total)
        if quarter > self._last_quarter and (quarter > 0 or done >= total):
            self._last_quarter = quarter
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The text of the bar as it stands."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - (self._t0 if self._t0 is not None else now), 1e-9)
        frac = min(1.0, self.done / max(self.total, 1))
        rate = self.done / elapsed if self.done else 0.0
        if self.done >= self.total:
            tail = f"done in {format_duration(elapsed)}"
        elif rate > 0:
            tail = f"ETA {format_duration((self.total - self.done) / rate)}"
        else:
            tail = "ETA ?"
        head = f"[adakv-local] {self.label}"
        if self.tty:
            filled = int(round(frac * _BAR_WIDTH))
            head += " [" + "#" * filled + "." * (_BAR_WIDTH - filled) + "]"
        return f"{head} {self.done}/{self.total} tokens ({frac:.0%}), {rate:.1f} tok/s, {tail}"

    def finish(self) -> None:
        """End the bar's line on a terminal (idempotent)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
