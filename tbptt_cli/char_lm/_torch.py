"""The character model in PyTorch: its weights, training with `tbptt_torch.tbptt_train_step`,
and a step for sampling. Imports PyTorch and `tbptt_torch` only, never JAX.

The stream is fed a segment at a time, as in JAX: each call of `tbptt_train_step` runs a
few TBPTT updates and returns the carry the next call continues from.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

import tbptt_torch
from tbptt_cli.char_lm import BETAS, EPS, OnCall, Run, Step
from tbptt_cli.text import VOCAB_SIZE, one_hot, one_hot_segments

MODELS = {"elman": tbptt_torch.models.ElmanModel, "gru": tbptt_torch.models.GRUModel,
          "lstm": tbptt_torch.models.LSTMModel}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(cell: str, hidden_size: int, num_layers: int, *, seed: int, dtype: str,
                params: Mapping[str, np.ndarray] | None = None
                ) -> tbptt_torch.models.RecurrentModel:
    """The model over the text alphabet, `VOCAB_SIZE` in and out, holding `params` (JAX's
    draw, copied with `tbptt_torch.load_jax`) or, without them, weights drawn by torch from
    `seed` (through the global torch RNG, as a script seeding torch would)."""
    torch.manual_seed(seed)
    model = MODELS[cell](VOCAB_SIZE, hidden_size, VOCAB_SIZE, num_layers).to(DTYPES[dtype])
    if params is not None:
        tbptt_torch.load_jax(model, params)
    return model


def train(model: tbptt_torch.models.RecurrentModel, inputs: np.ndarray, targets: np.ndarray,
          *, k1: int, k2: int, segment_length: int, lr: float,
          on_call: OnCall | None = None) -> Run:
    """Trains `model` in place with `tbptt_torch.tbptt_train_step`, one call per segment,
    in the model's dtype."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS)
    dtype = next(model.parameters()).dtype
    carry = None  # the model's zero carry
    losses, seconds = [], []
    for xs, ys in one_hot_segments(inputs, targets, segment_length):
        start = time.perf_counter()
        carry, segment_losses = tbptt_torch.tbptt_train_step(
            model, optimizer, carry, torch.from_numpy(xs).to(dtype), torch.from_numpy(ys),
            loss_fn=tbptt_torch.losses.cross_entropy, k1=k1, k2=k2)
        seconds.append(time.perf_counter() - start)
        losses.append(segment_losses.numpy())
        if on_call is not None:
            on_call(sum(map(len, losses)), float(losses[-1][-1]))
    return Run(np.concatenate(losses), seconds)


def sampler(model: tbptt_torch.models.RecurrentModel) -> Step:
    """The trained model as a `Step` for `tbptt_cli.char_lm.sample`."""
    dtype = next(model.parameters()).dtype

    def step(carry: Any, codes: np.ndarray) -> tuple[Any, np.ndarray]:
        xs = torch.from_numpy(one_hot(codes[:, None])).to(dtype)
        with torch.no_grad():
            logits, carry = model(xs, carry)
        return carry, logits[-1, 0].numpy()

    return step


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def describe() -> str:
    return f"torch {torch.__version__} with {torch.get_num_threads()} threads"


def versions() -> dict[str, Any]:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
