"""The canonical TBPTT program, end to end: pytorch/examples' word_language_model (an
embedding, a stacked LSTM, dropout, a linear decoder; SGD at lr 20 with the gradient
clipped to norm 0.25, the learning rate divided by 4 when the validation loss stops
improving) trained by TBPTT(35) on words of the Python standard library's docstrings, in
PyTorch (`torch_lm`) or its JAX port (`jax_lm`), perplexity per epoch; docs/word_lm.md.

This module is framework-free: the run's configuration, the corpus cut into streams
(`tbptt.data`), and the epoch loop both frameworks' trainers go through.

    .venv/bin/python -m examples.word_lm --framework jax      # or torch; --help
    .venv/bin/python -m examples.word_lm.parity               # the port, checked exactly
    .venv/bin/python -m examples.word_lm.dropout              # dropout on, both frameworks
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import numpy as np

from tbptt.data import batchify, next_step_pairs

# Called after every trainer call with (updates done in the epoch so far, the latest loss).
OnCall = Callable[[int, float], None]


@dataclasses.dataclass(frozen=True)
class Config:
    """A run: word_language_model's options (its names in comments where they differ),
    with a smaller model and vocabulary so that it trains in about a minute on 2 cores."""

    cell: str = "lstm"  # --model LSTM
    vocab_size: int = 2000  # the capped vocabulary, <unk> included
    embedding_size: int = 64  # --emsize (upstream 200)
    hidden_size: int = 64  # --nhid (upstream 200)
    num_layers: int = 2  # --nlayers
    dropout: float = 0.2
    tied: bool = False
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 35  # k1 = k2
    lr: float = 20.0
    clip: float = 0.25
    epochs: int = 6  # upstream 40
    updates_per_call: int = 10  # updates per trainer call, a stream through each epoch
    seed: int = 1111  # upstream's --seed

    @property
    def segment_length(self) -> int:
        return self.bptt * self.updates_per_call


class Streams(NamedTuple):
    """The corpus as word_language_model feeds it: `batchify`, then next-word pairs."""

    train_inputs: np.ndarray  # shape=[T_train, batch_size], int32
    train_targets: np.ndarray  # shape=[T_train, batch_size], int32: the next word
    valid_inputs: np.ndarray  # shape=[T_valid, eval_batch_size], int32
    valid_targets: np.ndarray  # shape=[T_valid, eval_batch_size], int32


def streams(train: np.ndarray, valid: np.ndarray, config: Config) -> Streams:
    return Streams(*next_step_pairs(batchify(train, config.batch_size)),
                   *next_step_pairs(batchify(valid, config.eval_batch_size)))


class Trainer(Protocol):
    """What `torch_lm.Trainer` and `jax_lm.Trainer` both are."""

    def set_lr(self, lr: float) -> None: ...

    def train_epoch(self, inputs: np.ndarray, targets: np.ndarray,
                    on_call: OnCall | None = None) -> np.ndarray: ...

    def evaluate(self, inputs: np.ndarray, targets: np.ndarray) -> float: ...


def updates_per_epoch(config: Config, data: Streams) -> int:
    return math.ceil(data.train_inputs.shape[0] / config.bptt)


def train(trainer: Trainer, config: Config, data: Streams, *,
          on_call: Callable[[int, float], None] | None = None,
          log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """word_language_model's epoch loop: train, evaluate on the validation streams, and
    divide the learning rate by 4 after an epoch that did not improve on the best
    validation loss. `on_call(updates done in the run, latest loss)`.

    Returns every epoch's mean training loss, validation loss, learning rate and seconds.
    """
    lr, best = config.lr, math.inf
    record: dict[str, list[float]] = {"train_loss": [], "valid_loss": [], "lr": [],
                                      "seconds": []}
    per_epoch = updates_per_epoch(config, data)
    for epoch in range(config.epochs):
        start = time.perf_counter()
        epoch_call = None if on_call is None else (
            lambda done, loss, before=epoch * per_epoch: on_call(before + done, loss))
        losses = trainer.train_epoch(data.train_inputs, data.train_targets, epoch_call)
        valid_loss = trainer.evaluate(data.valid_inputs, data.valid_targets)
        seconds = time.perf_counter() - start
        for name, value in (("train_loss", float(np.mean(losses))), ("valid_loss", valid_loss),
                            ("lr", lr), ("seconds", seconds)):
            record[name].append(value)
        if log is not None:
            log(f"| end of epoch {epoch + 1:3d} | time: {seconds:6.2f}s | lr {lr:6.2f} | "
                f"train ppl {math.exp(record['train_loss'][-1]):8.2f} | valid loss "
                f"{valid_loss:5.2f} | valid ppl {math.exp(valid_loss):8.2f}")
        if valid_loss < best:
            best = valid_loss
        else:
            lr /= 4.0
            trainer.set_lr(lr)
    return record
