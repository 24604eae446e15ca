"""The character-level language model of `tbptt train`, one module per framework.

`tbptt_cli.char_lm._jax` trains it with `tbptt_jax` and imports JAX and optax only;
`tbptt_cli.char_lm._torch` trains it with `tbptt_torch` and imports PyTorch only; so the
command trains with either framework installed alone. What both share needs neither and
lives here: the Adam settings, what a run returns, and sampling text from a trained model;
`report` prints and checks the runs, `record` writes the JSON log, `plot` the loss curve.

Initial weights: drawn by JAX (`tbptt_jax.models.*.init(jax.random.key(seed))`) whenever
JAX trains, and copied into torch (`tbptt_torch.load_jax`) when both do, so the two start
from the same model; drawn by torch (`torch.manual_seed(seed)`) when torch trains alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from tbptt_cli.text import VOCAB_SIZE, decode, encode

# Adam's hyperparameters, shared by optax.adam and torch.optim.Adam (their defaults too).
BETAS = (0.9, 0.999)
EPS = 1e-8
CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "elman": "Elman RNN"}

# Called after every call of tbptt_train_step with (updates done so far, the latest loss).
OnCall = Callable[[int, float], None]
# One step of a trained model for sampling: (carry or None for the zero carry, character
# codes [T]) -> (the carry after them, the logits [VOCAB_SIZE] of the last one, numpy).
Step = Callable[[Any, np.ndarray], tuple[Any, np.ndarray]]


class Run(NamedTuple):
    """What one framework's training produced."""

    losses: np.ndarray  # shape=[U]: the loss of every update, in nats per character
    seconds: list[float]  # wall time of every call of tbptt_train_step


def sample(step: Step, prompt: str, length: int, *, temperature: float, seed: int) -> str:
    """`prompt` followed by `length` characters drawn one at a time from the model `step`
    runs, with numpy's generator seeded by `seed`: the same weights give the same text in
    either framework (up to a draw that float rounding tips)."""
    rng = np.random.default_rng(seed)
    carry, logits = step(None, encode(prompt))
    codes = []
    for _ in range(length):
        scaled = np.asarray(logits, np.float64) / temperature
        weights = np.exp(scaled - scaled.max())
        code = int(rng.choice(VOCAB_SIZE, p=weights / weights.sum()))
        codes.append(code)
        carry, logits = step(carry, np.array([code], np.int32))
    return prompt + decode(codes)


def versions() -> dict[str, Any]:
    """The software and machine of a run, for its log; each framework's module adds its own."""
    try:
        tbptt_version = importlib.metadata.version("tbptt")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        tbptt_version = None
    return {"tbptt": tbptt_version, "python": platform.python_version(),
            "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "processor": platform.processor(),
            "system": platform.platform()}
