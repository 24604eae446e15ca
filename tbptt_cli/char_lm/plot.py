"""The loss curve of a `tbptt train` run as a PNG, drawn with matplotlib where it is installed
(`pip install "tbptt[plot]"`); without it the run writes its JSON log only and says why.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import numpy as np

PLOT_NAME = "loss_curve.png"


def unavailable() -> str | None:
    """Why no PNG can be drawn here (matplotlib cannot be imported), or None."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as error:
        return f"{error}; pip install \"tbptt[plot]\""
    return None


def plot_losses(runs: dict[str, Any], path: Path, *, title: str,
                tolerance: tuple[int, float] | None = None) -> None:
    """A PNG of every framework's loss per update (bits/char), overlaid; with two runs, a
    second panel shows their relative difference on a log scale, and `tolerance`
    `(checked updates, rtol)` the bound the parity check holds the first updates to."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    both = len(runs) == 2
    figure, axes = plt.subplots(2 if both else 1, 1, figsize=(8, 6.5 if both else 4.5),
                                sharex=True, squeeze=False,
                                gridspec_kw={"height_ratios": [3, 1.4] if both else [1]})
    top = axes[0, 0]
    styles = {"jax": dict(color="tab:blue", linewidth=2.2),
              "torch": dict(color="tab:orange", linewidth=1.2, linestyle="--")}
    for name, losses in runs.items():
        updates = np.arange(1, len(losses) + 1)
        top.plot(updates, np.asarray(losses) / math.log(2), label=name, **styles[name])
    top.set_ylabel("loss (bits/char)")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    top.legend()
    if both:
        jax_losses, torch_losses = (np.asarray(losses) for losses in runs.values())
        rel = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
        bottom = axes[1, 0]
        # Updates where the losses are bit-identical have no place on a log scale: gaps.
        bottom.semilogy(np.arange(1, len(rel) + 1), np.where(rel > 0, rel, np.nan),
                        color="tab:gray", linewidth=1, marker=".", markersize=3)
        if tolerance is not None:
            checked, rtol = tolerance
            bottom.hlines(rtol, 1, min(checked, len(rel)), color="tab:red", linestyle=":",
                          label=f"tolerance, updates 1-{min(checked, len(rel))}")
            bottom.legend(loc="lower right", fontsize=8)
        bottom.set_ylabel("|jax - torch| / torch")
        bottom.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("update")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
