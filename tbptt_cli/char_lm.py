"""The character-level language model of `tbptt train`, trained by both frameworks.

Both frameworks train the same model (Elman, GRU or LSTM from `tbptt_jax.models` /
`tbptt_torch.models`) from the same initial weights, drawn by torch and carried to JAX with
`tbptt_torch.to_jax`, on the same streams (`tbptt_cli.text`), with the same Adam settings. The
stream is fed a segment at a time: each call of `tbptt_train_step` runs a few TBPTT updates
and returns the carry the next call continues from. Everything returned is numpy, so the
command that reports on it (`tbptt_cli.commands.train`) needs neither framework.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import torch

import tbptt_jax
import tbptt_torch
from tbptt_cli.text import VOCAB_SIZE, decode, encode, one_hot, segments
from tbptt_jax import sharding
from tbptt_parity._harness import CELLS

# Adam's hyperparameters, shared by optax.adam and torch.optim.Adam (their defaults too).
BETAS = (0.9, 0.999)
EPS = 1e-8
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Called after every call of tbptt_train_step with (updates done so far, the latest loss).
OnCall = Callable[[int, float], None]


class Run(NamedTuple):
    """What one framework's training produced."""

    losses: np.ndarray  # shape=[U]: the loss of every update, in nats per character
    seconds: list[float]  # wall time of every call of tbptt_train_step


class Models(NamedTuple):
    """One character model in both frameworks, holding the same initial weights."""

    jax_model: tbptt_jax.models.RecurrentModel
    torch_model: tbptt_torch.models.RecurrentModel
    params: dict[str, np.ndarray]  # the torch model's initial weights, keyed as its state_dict


def build_models(cell: str, hidden_size: int, num_layers: int, *, seed: int,
                 dtype: str = "float32") -> Models:
    """The model over the text alphabet (`VOCAB_SIZE` in and out), weights drawn by torch
    from `seed` (through the global torch RNG, as a script seeding torch would)."""
    jax_factory, torch_class = CELLS[cell]
    torch.manual_seed(seed)
    torch_model = torch_class(VOCAB_SIZE, hidden_size, VOCAB_SIZE, num_layers)
    torch_model = torch_model.to(TORCH_DTYPES[dtype])
    jax_model = jax_factory(VOCAB_SIZE, hidden_size, VOCAB_SIZE, num_layers=num_layers)
    return Models(jax_model, torch_model, tbptt_torch.to_jax(torch_model))


def jax_devices(count: int) -> list[jax.Device]:
    """The first `count` devices of JAX's default backend, to split the batch over. On a
    CPU, asks XLA for `count` CPU devices first, which it can only do before JAX's first
    operation in this process."""
    if count > 1:
        sharding.request_cpu_devices(count)
    devices = jax.devices()
    if len(devices) < count:
        raise ValueError(f"--jax-devices {count}: JAX has {len(devices)} "
                         f"{devices[0].platform} device(s) in this process")
    return devices[:count]


def train_jax(model: tbptt_jax.models.RecurrentModel, params: dict, inputs: np.ndarray,
              targets: np.ndarray, *, k1: int, k2: int, segment_length: int, lr: float,
              dtype: str = "float32", devices: Sequence[jax.Device] = (),
              on_call: OnCall | None = None) -> tuple[dict, Run]:
    """Trains `params` with `tbptt_jax.tbptt_train_step`, one call per segment of the
    streams `inputs`, `targets` (codes `[T, B]`). float64 needs JAX's 64-bit mode on.
    With two or more `devices`, the streams are split over them (`tbptt_jax.sharding`)."""
    # One optimizer object for every call: a new one would be a new program to compile.
    optimizer = optax.adam(lr, b1=BETAS[0], b2=BETAS[1], eps=EPS)
    params = jax.tree.map(jax.numpy.asarray, params)
    opt_state = optimizer.init(params)
    carry = model.initial_carry(inputs.shape[1], np.dtype(dtype))
    mesh = sharding.data_mesh(devices) if len(devices) > 1 else None
    if mesh is not None:
        params, opt_state, carry = sharding.shard_state(mesh, params, opt_state, carry)
    losses, seconds = [], []
    for xs, ys in segments(inputs, targets, segment_length, np.dtype(dtype)):
        start = time.perf_counter()
        if mesh is not None:
            xs, ys, _ = sharding.shard_batch(mesh, xs, ys)
        # The returned carry (an OverlapCarry when k2 > k1) continues the streams next call.
        params, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
            params, opt_state, carry, xs, ys, apply_fn=model.apply,
            loss_fn=tbptt_jax.losses.cross_entropy, optimizer=optimizer, k1=k1, k2=k2)
        # JAX dispatches asynchronously: wait for the results before reading the clock.
        jax.block_until_ready((params, opt_state, carry, metrics))
        seconds.append(time.perf_counter() - start)
        losses.append(np.asarray(metrics["loss"]))
        if on_call is not None:
            on_call(sum(map(len, losses)), float(losses[-1][-1]))
    return params, Run(np.concatenate(losses), seconds)


def train_torch(model: tbptt_torch.models.RecurrentModel, inputs: np.ndarray,
                targets: np.ndarray, *, k1: int, k2: int, segment_length: int, lr: float,
                on_call: OnCall | None = None) -> Run:
    """Trains `model` in place with `tbptt_torch.tbptt_train_step`, one call per segment,
    in the model's dtype."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=BETAS, eps=EPS)
    dtype = next(model.parameters()).dtype
    carry = None  # the model's zero carry
    losses, seconds = [], []
    for xs, ys in segments(inputs, targets, segment_length):
        start = time.perf_counter()
        carry, segment_losses = tbptt_torch.tbptt_train_step(
            model, optimizer, carry, torch.from_numpy(xs).to(dtype), torch.from_numpy(ys),
            loss_fn=tbptt_torch.losses.cross_entropy, k1=k1, k2=k2)
        seconds.append(time.perf_counter() - start)
        losses.append(segment_losses.numpy())
        if on_call is not None:
            on_call(sum(map(len, losses)), float(losses[-1][-1]))
    return Run(np.concatenate(losses), seconds)


def sample(model: tbptt_jax.models.RecurrentModel, params: dict, prompt: str, length: int,
           *, temperature: float, seed: int) -> str:
    """`prompt` followed by `length` characters drawn one at a time from the model."""
    apply = jax.jit(model.apply)
    dtype = np.asarray(params["head.weight"]).dtype
    carry, logits = apply(params, model.initial_carry(1, dtype),
                          one_hot(encode(prompt)[:, None], dtype))
    key = jax.random.key(seed)
    codes = []
    for _ in range(length):
        key, draw = jax.random.split(key)
        code = int(jax.random.categorical(draw, logits[-1, 0] / temperature))
        codes.append(code)
        carry, logits = apply(params, carry, one_hot(np.array([[code]]), dtype))
    return prompt + decode(codes)


def precision(dtype: str) -> contextlib.AbstractContextManager:
    """A context in which JAX computes in `dtype`: float64 needs JAX's 64-bit mode."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A torch model's weights as JAX params (`tbptt_torch.to_jax`)."""
    return tbptt_torch.to_jax(model)


def set_torch_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def describe_devices(devices: Sequence[jax.Device] = ()) -> str:
    split = (f" ({len(devices)} devices, the batch split over them)" if len(devices) > 1
             else "")
    return (f"JAX {jax.__version__} on {jax.devices()[0].platform}{split}, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads")


def versions() -> dict[str, Any]:
    """The software and machine a run used, for its log."""
    try:
        tbptt_version = importlib.metadata.version("tbptt")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        tbptt_version = None
    return {"tbptt": tbptt_version, "python": platform.python_version(),
            "numpy": np.__version__,
            "jax": jax.__version__, "jax_platform": jax.devices()[0].platform,
            "optax": optax.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(), "system": platform.platform()}
