"""The JAX TBPTT(k1, k2) trainer: every update of a sequence in one compiled program.

`tbptt_train_step` checks its arguments, then calls `_train`, which is jitted with the
update schedule (`tbptt.plan`) as a static argument. `_train` reads as SPEC §1: each update
starts from the carry at its window start as a constant (`stop_gradient`), runs the model
over its window with the current parameters, reduces the loss over the steps it owns,
differentiates, applies the optax update, and hands on the carry its forward reached at
the next window's start. Each run of consecutive updates with one window shape is one
`lax.scan`; windows clipped at step 0 and a partial last chunk are runs of their own.

With k2 > k1 the next call of a stream must recompute the overlap, so the carry returned
is an `OverlapCarry`: the state at the start of the overlap plus the overlap's inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tbptt.checks import (
    ON_NONFINITE,
    REDUCTIONS,
    TAILS,
    check_choice,
    check_k,
    check_overlap,
    check_param_shapes,
    nonfinite_cause,
)
from tbptt.schedule import Schedule, plan, run_window
from tbptt_jax.models import RecurrentModel

Array = jax.Array
Params = Any  # a pytree of arrays; the models in `tbptt_jax.models` use a flat dict
Carry = Any
ApplyFn = Callable[..., tuple[Carry, Array]]
LossFn = Callable[[Array, Array], Array]

class OverlapCarry(NamedTuple):
    """What a stream carries from one call to the next when k2 > k1.

    The next call's first window starts `k2 - k1` steps before its first new step, so it
    needs the model state there and the inputs of those steps, recomputed with the
    parameters it then has (SPEC §1: no stale activations).
    """

    state: Carry  # the model's carry before the first overlap step
    xs: Array  # shape=[n, B, ...]: the overlap's inputs, n <= k2 - k1
    resets: Array | None  # shape=[n, B], bool; None when the stream has no resets


class NonFiniteLossError(FloatingPointError):
    """An update's loss or gradient was not finite; the parameters passed in are intact."""


class _Record(NamedTuple):
    loss: Array  # shape=()
    skipped: Array  # shape=(), bool: the loss or a gradient was not finite
    grads: Params | None  # the update's gradient, when traced
    params: Params | None  # the parameters after the update, when traced


def _run_model(apply_fn: ApplyFn, params: Params, carry: Carry, xs: Array,
               resets: Array | None) -> tuple[Carry, Array]:
    if resets is None:
        return apply_fn(params, carry, xs)
    return apply_fn(params, carry, xs, resets)


def _window_loss(params, start_carry, window_xs, window_resets, targets, *, shape,
                 apply_fn, loss_fn, reduction):
    """The loss of one update and the carry it hands on, as a function of the parameters."""
    # Truncation: the window starts from a constant; no gradient reaches earlier steps.
    start_carry = jax.lax.stop_gradient(start_carry)

    def run(carry, lo, hi):
        resets = None if window_resets is None else window_resets[lo:hi]
        return _run_model(apply_fn, params, carry, window_xs[lo:hi], resets)

    handoff_carry, preds = run_window(run, start_carry, shape, jnp.concatenate)
    losses = loss_fn(preds, targets)
    loss = jnp.mean(losses) if reduction == "mean" else jnp.sum(losses)
    return loss, handoff_carry


def _all_finite(tree: Any) -> Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def _update(params, opt_state, start_carry, window_xs, window_resets, targets, *, shape,
            apply_fn, loss_fn, optimizer, reduction, trace):
    """One TBPTT update: forward over the window, gradient, one optimizer step."""
    (loss, handoff_carry), grads = jax.value_and_grad(_window_loss, has_aux=True)(
        params, start_carry, window_xs, window_resets, targets, shape=shape,
        apply_fn=apply_fn, loss_fn=loss_fn, reduction=reduction)
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite loss or gradient never reaches the parameters or the optimizer state.
    finite = jnp.isfinite(loss) & _all_finite(grads)
    keep = partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
    record = _Record(loss, ~finite, grads if trace else None, params if trace else None)
    return params, opt_state, handoff_carry, record


def _window(ext_xs, ext_resets, ys, history, update_start, loss_start, shape):
    """Slices one update's window inputs and loss targets (starts may be traced)."""
    length, overlap, _ = shape
    window_xs = jax.lax.dynamic_slice_in_dim(ext_xs, update_start, length)
    window_resets = (None if ext_resets is None
                     else jax.lax.dynamic_slice_in_dim(ext_resets, update_start, length))
    targets = jax.lax.dynamic_slice_in_dim(ys, loss_start - history, length - overlap)
    return window_xs, window_resets, targets


@partial(jax.jit, static_argnames=("schedule", "apply_fn", "loss_fn", "optimizer",
                                   "reduction", "trace"))
def _train(params, opt_state, state, history_xs, xs, ys, history_resets, resets, *,
           schedule: Schedule, apply_fn, loss_fn, optimizer, reduction, trace):
    ext_xs = jnp.concatenate([history_xs, xs]) if schedule.history else xs
    ext_resets = None
    if resets is not None:
        ext_resets = jnp.concatenate([history_resets, resets]) if schedule.history else resets
    step = partial(_update, apply_fn=apply_fn, loss_fn=loss_fn, optimizer=optimizer,
                   reduction=reduction, trace=trace)

    records = []
    for run in schedule.runs():
        def scanned(loop, starts, shape=run[0].shape):
            params, opt_state, state = loop
            window = _window(ext_xs, ext_resets, ys, schedule.history, *starts, shape)
            params, opt_state, state, record = step(params, opt_state, state, *window,
                                                    shape=shape)
            return (params, opt_state, state), record

        starts = (jnp.array([u.window_start for u in run]),
                  jnp.array([u.loss_start for u in run]))
        (params, opt_state, state), record = jax.lax.scan(
            scanned, (params, opt_state, state), starts)
        records.append(record)

    # tail="drop": the untrained remainder still advances the carry, with the final params.
    advance_from, advance_to = schedule.carry_after_updates, schedule.final_carry_at
    if advance_to > advance_from:
        state, _ = _run_model(
            apply_fn, params, state, ext_xs[advance_from:advance_to],
            None if ext_resets is None else ext_resets[advance_from:advance_to])

    if records:
        record = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *records)
        metrics = {"loss": record.loss, "skipped": record.skipped}
        if trace:
            metrics["grads"], metrics["params"] = record.grads, record.params
    else:
        metrics = {"loss": jnp.zeros((0,)), "skipped": jnp.zeros((0,), bool)}
    overlap = (ext_xs[schedule.final_carry_at:],
               None if ext_resets is None else ext_resets[schedule.final_carry_at:])
    return params, opt_state, state, overlap, metrics


def tbptt_train_step(
    params: Params,
    opt_state: optax.OptState,
    carry: Carry | OverlapCarry | None,
    xs: Array,
    ys: Array,
    *,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    k1: int,
    k2: int | None = None,
    reduction: str = "mean",
    tail: str = "partial",
    resets: Array | None = None,
    on_nonfinite: str = "raise",
    trace: bool = False,
) -> tuple[Params, optax.OptState, Carry | OverlapCarry, dict[str, Any]]:
    """Trains on one sequence with TBPTT(k1, k2): all its updates in one compiled program.

    Args:
      params: the model's parameters (for `tbptt_jax.models`, a flat dict as torch names it).
      opt_state: `optimizer.init(params)` or the state a previous call returned.
      carry: the state before the first step, e.g. `model.initial_carry(B)` (None means
        that zero carry, for a `tbptt_jax.models` model); or the carry a previous call
        returned, to continue the same stream (an `OverlapCarry` if k2 > k1).
      xs: inputs, time-major `[T, B, ...]`.
      ys: targets, `[T, B, ...]` with the same T and B.
      apply_fn: `(params, carry, xs[, resets]) -> (carry, preds)` over a time-major chunk.
      loss_fn: `(preds, targets) -> losses[t, b]`, e.g. `tbptt_jax.losses.mse`.
      optimizer: any `optax.GradientTransformation`; pass the same object on every call,
        since a new one is a new static argument and compiles anew.
      k1: steps between updates, each update owns k1 loss steps.
      k2: steps each update backpropagates through (k2 >= k1; defaults to k1).
      reduction: "mean" (divide by the number of loss terms, as Ignite) or "sum" (the hand
        loop of SPEC §0).
      tail: "partial" trains a last chunk shorter than k1; "drop" leaves it untrained,
        though it still advances the carry.
      resets: optional bool `[T, B]`: where true, that sequence's carry is replaced by the
        model's zero carry before that step, in every window containing it.
      on_nonfinite: "raise" (default) raises `NonFiniteLossError` if any update's loss or
        gradient is not finite, leaving the caller's parameters as they were; "skip" skips
        such updates (parameters and optimizer state unchanged) and marks them in
        `metrics["skipped"]`.
      trace: also return each update's gradient and the parameters after it, stacked over
        updates, as `metrics["grads"]` and `metrics["params"]` (for parity checks).

    Returns:
      `(params, opt_state, carry, metrics)`: `metrics["loss"]` has shape `[U]`, one loss
      per update, and `metrics["skipped"]` (bool `[U]`) marks skipped updates.
    """
    k1, k2 = check_k(k1, k2)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    xs, ys = jnp.asarray(xs), jnp.asarray(ys)
    resets = None if resets is None else jnp.asarray(resets)
    _check_sequences(xs, ys, resets)
    state, history_xs, history_resets = _split_carry(carry, xs, k1, k2, apply_fn, params)
    _check_model_inputs(apply_fn, loss_fn, params, state, xs, ys)
    schedule = plan(xs.shape[0], k1, k2, tail=tail, history=history_xs.shape[0])
    if resets is not None or history_resets is not None:
        if resets is None:
            resets = jnp.zeros(xs.shape[:2], bool)
        if history_resets is None:
            history_resets = jnp.zeros(history_xs.shape[:2], bool)

    new_params, new_opt_state, state, (overlap_xs, overlap_resets), metrics = _train(
        params, opt_state, state, history_xs, xs, ys, history_resets, resets,
        schedule=schedule, apply_fn=apply_fn, loss_fn=loss_fn, optimizer=optimizer,
        reduction=reduction, trace=trace)

    if on_nonfinite == "raise" and bool(jnp.any(metrics["skipped"])):
        first = int(np.argmax(np.asarray(metrics["skipped"])))
        raise NonFiniteLossError(
            f"update {first} of this call (counting from 0) has "
            f"{nonfinite_cause(float(metrics['loss'][first]))}; "
            "nothing of this call was applied, the params passed in are unchanged. Pass "
            "on_nonfinite='skip' to skip such updates instead.")
    if k2 > k1:
        state = OverlapCarry(state, overlap_xs, overlap_resets)
    return new_params, new_opt_state, state, metrics


def _describe(tree: Any) -> Any:
    """Shapes and dtypes of a pytree's leaves, for error messages."""
    return jax.tree.map(lambda leaf: f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}", tree)


def _check_sequences(xs: Array, ys: Array, resets: Array | None) -> None:
    if xs.ndim < 2 or ys.ndim < 2:
        raise ValueError(f"xs and ys must be time-major [T, B, ...]; got xs of shape {xs.shape} "
                         f"and ys of shape {ys.shape}")
    if xs.shape[0] == 0 or xs.shape[1] == 0:
        raise ValueError(f"xs must hold at least one step of one sequence, got shape {xs.shape}")
    if xs.shape[:2] != ys.shape[:2]:
        raise ValueError(f"ys must have the [T, B] of xs, expected {xs.shape[:2]}, "
                         f"got {ys.shape[:2]}")
    if resets is not None and (resets.shape != xs.shape[:2] or resets.dtype != np.bool_):
        raise ValueError(f"resets must be bool of shape [T, B] = {xs.shape[:2]}, got "
                         f"{resets.dtype} of shape {resets.shape}")
    for name, array in (("xs", xs), ("ys", ys), ("resets", resets)):
        # On Explicit mesh axes the split is in the type: one over time cannot run, since
        # the steps run in order (JAX's examples split axis 0, here T, not the batch).
        split = None if array is None else jax.typeof(array).sharding.spec[0]
        if split is not None:
            raise ValueError(f"{name} must be split over its batch axis (1), not its time axis "
                             f"(0): got {jax.typeof(array)}; place it with "
                             f"P(None, {split!r}), or tbptt_jax.sharding.shard_batch")


def _split_carry(carry: Any, xs: Array, k1: int, k2: int, apply_fn: ApplyFn, params: Params
                 ) -> tuple[Carry, Array, Array | None]:
    """(model state, overlap inputs, overlap resets) from what the caller passed."""
    if carry is None:
        model = getattr(apply_fn, "__self__", None)
        if not isinstance(model, RecurrentModel):
            raise ValueError("carry: None means the model's zero carry, but apply_fn is not the "
                             "apply of a tbptt_jax.models model; pass the carry explicitly")
        _check_params(model.param_shapes(), params)
        carry = model.initial_carry(xs.shape[1], params["rnn.weight_hh_l0"].dtype)
    if not isinstance(carry, OverlapCarry):
        return carry, jnp.zeros((0, *xs.shape[1:]), xs.dtype), None
    history_xs = jnp.asarray(carry.xs)
    history_resets = None if carry.resets is None else jnp.asarray(carry.resets)
    check_overlap(history_xs.shape, None if history_resets is None else history_resets.shape,
                  xs.shape, k1, k2)
    return carry.state, history_xs, history_resets


_checked: set[Any] = set()


def _check_model_inputs(apply_fn: ApplyFn, loss_fn: LossFn, params: Params, state: Carry,
                        xs: Array, ys: Array) -> None:
    """Checks params, carry, xs and ys against the model and the loss, once per signature.

    A model of `tbptt_jax.models` is asked for its parameter shapes, input size and carry;
    any `apply_fn` is traced for one step (it must hand back a carry like the one it was
    given) and `loss_fn` on its predictions and `ys`.
    """
    signature = (apply_fn, loss_fn, jax.tree.structure((params, state)),
                 tuple(_describe(jax.tree.leaves((params, state)))),
                 tuple(_typed(jax.tree.leaves((state, xs)))),
                 xs.shape[1:], xs.dtype, ys.shape[1:], ys.dtype)
    if signature in _checked:
        return
    batch = xs.shape[1]
    model = getattr(apply_fn, "__self__", None)
    if isinstance(model, RecurrentModel):
        _check_params(model.param_shapes(), params)
        if xs.shape[2:] != (model.input_size,):
            raise ValueError(f"xs must be [T, B, input_size] = [T, B, {model.input_size}], "
                             f"got shape {xs.shape}")
        dtype = params["rnn.weight_hh_l0"].dtype
        expected = jax.eval_shape(partial(model.initial_carry, batch, dtype))
        if jax.tree.structure(expected) != jax.tree.structure(state) or \
                _describe(state) != _describe(expected):
            raise ValueError(f"carry must match the model and batch size {batch}: expected "
                             f"{_describe(expected)}, got {_describe(state)}")
    try:
        out_state, preds = jax.eval_shape(partial(_run_model, apply_fn), params, state, xs[:1],
                                          None)
    except Exception as error:  # the trace of a user's apply_fn may fail in any way
        _check_carry_split(state, xs, error)
        raise ValueError(f"apply_fn fails on the carry {_describe(state)} and xs of shape "
                         f"{xs.shape}: {error}") from error
    if jax.tree.structure(out_state) != jax.tree.structure(state) or \
            _describe(out_state) != _describe(state):
        raise ValueError(f"carry must keep its shapes through apply_fn for batch size {batch}: "
                         f"got {_describe(state)}, apply_fn returns {_describe(out_state)}")
    if _typed(jax.tree.leaves(out_state)) != _typed(jax.tree.leaves(state)):
        _check_carry_split(state, xs, None)
    try:
        losses = jax.eval_shape(loss_fn, preds, ys[:1])
    except Exception as error:  # a user's loss_fn may fail in any way
        raise ValueError(f"ys of shape {ys.shape} does not fit loss_fn with the model's "
                         f"predictions of shape [T, *{preds.shape[1:]}]: {error}") from error
    if losses.shape != (1, batch):
        raise ValueError(f"loss_fn must return per-step, per-sequence losses [t, b], expected "
                         f"shape (1, {batch}) for one step, got {losses.shape}")
    _checked.add(signature)


def _typed(leaves: list[Any]) -> list[str]:
    """The leaves' types with their sharding where a mesh's `Explicit` axes put it there
    (`float32[1,8@data,16]`)."""
    return [str(jax.typeof(leaf)) for leaf in leaves]


def _check_carry_split(state: Carry, xs: Array, error: Exception | None) -> None:
    """Raises if xs's batch is split over `Explicit` mesh axes and the carry's is not:
    there the split is part of the types, and the carry leaving a step split like the
    batch must have entered it so (`lax.scan` keeps one type), which `shard_state`
    does."""
    split = jax.typeof(xs).sharding.spec[1]
    unsplit = [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(state)
               if not any(jax.typeof(leaf).sharding.spec)]
    if split is not None and unsplit:
        raise ValueError(
            f"carry must be split over the batch as xs is on a mesh with Explicit axes: xs is "
            f"{jax.typeof(xs)}, the carry has {unsplit}; place it as the batch, e.g. with "
            f"jax.device_put(carry, P(None, {split!r})) for a tbptt_jax.models carry, or "
            "tbptt_jax.sharding.shard_state (carry=None builds an unsplit one)") from error


def _check_params(expected: dict[str, tuple[int, ...]], params: Any) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    check_param_shapes(expected, {name: np.shape(value) for name, value in params.items()})
