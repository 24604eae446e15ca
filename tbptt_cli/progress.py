"""The progress bar of a training run: tqdm's, on stderr, with the latest loss and the time
steps per second beside tqdm's updates per second and time left.

On a terminal tqdm redraws the bar in place. Into a file or a pipe (a log, CI) it draws
nothing (tqdm's `disable=None`), since a redrawn line fills a log with carriage returns; the
report on stdout is the record of the run. The bar starts at the first report, so its rates
and time left leave out what came before it (JAX's compile).
"""

from __future__ import annotations

from typing import TextIO

from tqdm import tqdm


class Progress:
    """Shows `done` of `total` updates with the latest loss.

    Args:
      label: what runs, e.g. "jax" (left of the bar).
      total: updates in all.
      steps_per_update: time steps each update trains (k1), for steps/s.
      stream: where to draw; stderr by default. Nothing is drawn unless it is a terminal.
    """

    def __init__(self, label: str, total: int, *, steps_per_update: int,
                 stream: TextIO | None = None) -> None:
        self.label, self.total, self.steps_per_update = label, total, steps_per_update
        self.stream = stream
        self._bar: tqdm | None = None

    def update(self, done: int, loss: float) -> None:
        """Reports that `done` updates are finished, the last with loss `loss`."""
        if self._bar is None:
            # smoothing=0: the rate is the mean since the first report, not a moving one.
            self._bar = tqdm(total=self.total, initial=done, desc=f"{self.label:<5}",
                             unit="update", smoothing=0, file=self.stream, disable=None,
                             dynamic_ncols=True, postfix=f"loss {loss:.4f}")
            return
        if self._bar.disable:  # not a terminal
            return
        postfix = f"loss {loss:.4f}"
        meter = self._bar.format_dict
        if done > meter["initial"] and meter["elapsed"] > 0:
            steps = (done - meter["initial"]) * self.steps_per_update / meter["elapsed"]
            postfix += f", {tqdm.format_sizeof(steps)} steps/s"
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.update(done - self._bar.n)

    def write(self, line: str) -> None:
        """Prints `line` on stdout without breaking the bar (tqdm clears and redraws it)."""
        tqdm.write(line)

    def close(self) -> None:
        """Draws the bar's final state and ends its line."""
        if self._bar is not None:
            self._bar.close()
