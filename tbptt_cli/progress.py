"""A progress bar for long runs, standard library only: updates done, the latest loss and the
throughput, on stderr.

On a terminal the line is redrawn in place (`\\r`); into a file or a pipe (CI logs, tests)
it is written as a plain line at every tenth of the run and at its end, so logs stay short.
Throughput is measured from the first report on, so the time before it (a JAX compile) does
not count against it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def _si(value: float) -> str:
    """`1234.5 -> "1.2k"`, `12.34 -> "12.3"`: a rate in a few characters."""
    for factor, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.1f}{suffix}"
    return f"{value:.1f}"


class Progress:
    """Reports `done` of `total` updates with the latest loss.

    Args:
      label: what runs, e.g. "jax" (left of the bar).
      total: updates in all.
      steps_per_update: time steps each update trains (k1), for steps/s.
      stream: where to write; stderr by default.
      interactive: redraw in place; default: whether `stream` is a terminal.
      clock: seconds, monotonic (a parameter so tests can drive it).
    """

    def __init__(self, label: str, total: int, *, steps_per_update: int,
                 stream: TextIO | None = None, interactive: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.label, self.total, self.steps_per_update = label, total, steps_per_update
        self.stream = sys.stderr if stream is None else stream
        self.interactive = (self.stream.isatty() if interactive is None else interactive)
        self.clock = clock
        self._first: tuple[int, float] | None = None  # (done, time) at the first report
        self._tenths_shown = 0
        self._drawn = False

    def line(self, done: int, loss: float) -> str:
        """The progress line for `done` updates and the latest `loss`."""
        width = 20
        filled = width * done // max(self.total, 1)
        text = (f"{self.label:<6}[{'#' * filled}{'.' * (width - filled)}] "
                f"{done:>{len(str(self.total))}}/{self.total} updates  loss {loss:.4f}")
        rate = self.rate(done)
        if rate is not None:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            text += (f"  {_si(rate)} updates/s  {_si(rate * self.steps_per_update)} steps/s"
                     f"  eta {eta:.0f}s")
        return text

    def rate(self, done: int) -> float | None:
        """Updates per second since the first report; None before a second one."""
        if self._first is None or done <= self._first[0]:
            return None
        elapsed = self.clock() - self._first[1]
        return (done - self._first[0]) / elapsed if elapsed > 0 else None

    def update(self, done: int, loss: float) -> None:
        """Reports that `done` updates are finished, the last with loss `loss`."""
        if self._first is None:
            self._first = (done, self.clock())
        if self.interactive:
            self.stream.write("\r" + self.line(done, loss) + "\x1b[K")
            self._drawn = True
        else:
            tenths = 10 * done // max(self.total, 1)
            if tenths > self._tenths_shown or done == self.total:
                self._tenths_shown = tenths
                self.stream.write(self.line(done, loss) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the redrawn line, so what follows starts on a line of its own."""
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
