"""The character model in JAX: its weights, training with `tbptt_jax.tbptt_train_step`, and a
step for sampling. Imports JAX, optax and `tbptt_jax` only, never torch.

The stream is fed a segment at a time: each call of `tbptt_train_step` runs a few TBPTT
updates and returns the carry the next call continues from.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

import tbptt_jax
from tbptt_cli.char_lm import BETAS, EPS, OnCall, Run, Step
from tbptt_cli.text import VOCAB_SIZE, one_hot, one_hot_segments
from tbptt_jax import sharding

MODELS = {"elman": tbptt_jax.models.elman, "gru": tbptt_jax.models.gru,
          "lstm": tbptt_jax.models.lstm}


def precision(dtype: str) -> contextlib.AbstractContextManager:
    """A context in which JAX computes in `dtype`: float64 needs JAX's 64-bit mode."""
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def build_model(cell: str, hidden_size: int, num_layers: int) -> tbptt_jax.models.RecurrentModel:
    """The model over the text alphabet, `VOCAB_SIZE` in and out."""
    return MODELS[cell](VOCAB_SIZE, hidden_size, VOCAB_SIZE, num_layers=num_layers)


def init(model: tbptt_jax.models.RecurrentModel, *, seed: int, dtype: str
         ) -> dict[str, np.ndarray]:
    """Initial weights drawn by JAX from `seed`, as numpy arrays keyed as torch's
    `state_dict()` (what `tbptt_torch.load_jax` takes)."""
    params = model.init(jax.random.key(seed), np.dtype(dtype))
    return {name: np.asarray(value) for name, value in params.items()}


def devices(count: int) -> list[jax.Device]:
    """The first `count` devices of JAX's default backend, to split the batch over. On a
    CPU, asks XLA for `count` CPU devices first, which it can only do before JAX's first
    operation in this process."""
    if count > 1:
        sharding.request_cpu_devices(count)
    available = jax.devices()
    if len(available) < count:
        raise ValueError(f"--jax-devices {count}: JAX has {len(available)} "
                         f"{available[0].platform} device(s) in this process")
    return available[:count]


def train(model: tbptt_jax.models.RecurrentModel, params: dict, inputs: np.ndarray,
          targets: np.ndarray, *, k1: int, k2: int, segment_length: int, lr: float,
          dtype: str = "float32", devices: Sequence[jax.Device] = (),
          on_call: OnCall | None = None) -> tuple[dict, Run]:
    """Trains `params` with `tbptt_jax.tbptt_train_step`, one call per segment of the
    streams `inputs`, `targets` (codes `[T, B]`). float64 needs `precision("float64")`.
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
    for xs, ys in one_hot_segments(inputs, targets, segment_length, np.dtype(dtype)):
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


def sampler(model: tbptt_jax.models.RecurrentModel, params: dict) -> Step:
    """The trained model as a `Step` for `tbptt_cli.char_lm.sample`."""
    apply = jax.jit(model.apply)
    dtype = np.asarray(params["head.weight"]).dtype

    def step(carry: Any, codes: np.ndarray) -> tuple[Any, np.ndarray]:
        if carry is None:
            carry = model.initial_carry(1, dtype)
        carry, logits = apply(params, carry, one_hot(codes[:, None], dtype))
        return carry, np.asarray(logits[-1, 0])

    return step


def describe(devices: Sequence[jax.Device]) -> str:
    split = (f" ({len(devices)} devices, the batch split over them)" if len(devices) > 1
             else "")
    return f"JAX {jax.__version__} on {jax.devices()[0].platform}{split}"


def versions() -> dict[str, Any]:
    return {"jax": jax.__version__, "jax_platform": jax.devices()[0].platform,
            "optax": optax.__version__}
