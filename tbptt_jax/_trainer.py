"""The JAX TBPTT(k1, k2) trainer: every update of a sequence in one compiled program.

`trainer(apply_fn, loss_fn, optimizer, k1=..., ...)` takes the static configuration once,
checks it once, and returns a `Trainer` of two pure functions: `init` builds a
`TBPTTState` (parameters, optimizer state, carry, the overlap a k2 > k1 stream carries,
the updates made and an optional PRNG key), `step` trains on one sequence. `step` reads as
SPEC §1: each update starts from the carry at its window start as a constant
(`stop_gradient`), runs the model over its window with the current parameters (its dead
steps, which a reset cuts off from every loss still to be counted, on zero inputs as if
reset: `_windows.dead`), reduces the loss over the (weighted) steps it owns,
differentiates, applies the optax update unless the loss, the gradient or the parameters
and optimizer state it would give are not finite or the update owns no weight, and hands
on the carry its forward reached at the next window's start. Every full update is one
iteration of one `lax.scan`; a partial last update and the carry's advance over a dropped
tail are pieces of their own. Windows have one length whatever their place in the stream
(`tbptt_jax._windows`), so one program serves a stream's first call and its later ones,
and its size does not grow with (k2 - k1) / k1.

What `step` checks of the model, the carry and the data it checks while tracing, once per
compiled program: a model may declare `param_shapes()` and `initial_carry(batch_size,
dtype)` (on the object whose bound method `apply_fn` is), and any `apply_fn` is traced
for one step and `loss_fn` on its predictions.

`tbptt_train_step(params, opt_state, carry, xs, ys, ...)` is the one-call form on top:
it builds the trainer, turns the carry (an `OverlapCarry` when k2 > k1) into a state,
steps, and hands back `(params, opt_state, carry, metrics)`.
"""

from __future__ import annotations

import dataclasses
import numbers
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
    check_callable,
    check_carry,
    check_choice,
    check_class_ids,
    check_float_dtypes,
    check_int,
    check_k,
    check_losses,
    check_mask,
    check_mask_weights,
    check_overlap,
    check_param_shapes,
    check_resets,
    check_sequences,
    class_count,
    declared_class_axis,
    flattened_preds,
    loss_fails,
    model_fails,
    not_arrays,
)
from tbptt.stream import NONFINITE, NonFiniteLossError, OverlapCarry, nonfinite_message
from tbptt_jax import _windows

__all__ = ["NonFiniteLossError", "OverlapCarry", "TBPTTState", "Trainer", "tbptt_train_step",
           "trainer"]

Array = jax.Array
Params = Any  # a pytree of arrays; the models in `tbptt_jax.models` use a flat dict
Carry = Any
ApplyFn = Callable[..., tuple[Carry, Any]]
LossFn = Callable[[Any, Any], Array]


class TBPTTState(NamedTuple):
    """Everything a stream needs to continue: what `Trainer.step` takes and returns."""

    params: Params
    opt_state: optax.OptState
    carry: Carry  # the model's carry at the stream's first step still needed: that of the
    # overlap's first real step (k2 > k1), else that before the next new step
    overlap: Any  # k2 > k1: the last k2 - k1 inputs, leaves [k2 - k1, B, ...]; else None
    overlap_resets: Array | None  # shape=[k2 - k1, B], bool; None for a stream without resets
    overlap_steps: Array  # shape=(), int32: how many of `overlap`'s last steps are the
    # stream's (fewer than k2 - k1 near its start; the steps before them are padding)
    updates: Array  # shape=(), int32: updates made so far in the stream, skipped ones too
    key: Array | None  # with a key, update u of the stream runs the model with key=
    # fold_in(fold_in(key, u), offset), offset the first step of the model call in the window


@dataclasses.dataclass(frozen=True)
class _Config:
    """The static configuration of a trainer (hashable: it keys the compiled program)."""

    apply_fn: ApplyFn
    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    k1: int
    k2: int
    reduction: str
    tail: str
    trace: bool
    model: Any  # the object `apply_fn` is a bound method of, asked what it declares

    @property
    def overlap(self) -> int:
        return self.k2 - self.k1


class _Record(NamedTuple):
    loss: Array  # shape=()
    skipped: Array  # shape=(), bool: the loss, a gradient or the step's result was not finite
    nonfinite: Array  # shape=(), int32: what was not, 1 + its index in NONFINITE (0: none)
    weight: Array  # shape=(): the summed weight of the loss terms the update owns
    grads: Params | None  # the update's gradient, when traced
    params: Params | None  # the parameters after the update, when traced


class Trainer(NamedTuple):
    """A configured TBPTT trainer: `init` and `step` are pure; `step` is jitted."""

    init: Callable[..., TBPTTState]
    step: Callable[..., tuple[TBPTTState, dict[str, Any]]]


def trainer(apply_fn: ApplyFn, loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
            k1: int, k2: int | None = None, reduction: str = "mean", tail: str = "partial",
            trace: bool = False) -> Trainer:
    """Builds a TBPTT(k1, k2) trainer.

    Args:
      apply_fn: `(params, carry, xs[, resets][, key=]) -> (carry, preds)` over a time-major
        chunk (`preds` an array `[t, B, ...]`, or `[t * B, ...]` flattened time-major, or
        any pytree of them; `loss_fn` gets the loss steps' in the same layout); it gets
        `resets` only
        when the stream has resets and `key` only when the state has a key. A model's bound
        `apply` (e.g. `tbptt_jax.models.lstm(...).apply`) also lends the trainer the
        model's `initial_carry` and `param_shapes`.
      loss_fn: `(preds, targets) -> losses[t, b]`, e.g. `tbptt_jax.losses.mse`. `step` is
        compiled and cannot raise on a class id outside the model's classes: the token
        losses make that term NaN and the update is skipped, `metrics["nonfinite"]`
        saying "loss" (`tbptt_train_step` checks the ids first and raises).
      optimizer: any `optax.GradientTransformation`.
      k1: steps between updates; each update owns k1 loss steps.
      k2: steps each update backpropagates through (k2 >= k1; defaults to k1).
      reduction: "mean" (divide by the loss terms' weight, as Ignite) or "sum" (the hand
        loop of SPEC §0).
      tail: "partial" trains a last chunk shorter than k1; "drop" leaves it untrained,
        though it still advances the carry.
      trace: also return each update's gradient and the parameters after it, stacked over
        updates, as `metrics["grads"]` and `metrics["params"]` (for parity checks).

    Returns:
      A `Trainer`: `init(params, xs, carry=None, *, resets=False, key=None, opt_state=None)`
      -> `TBPTTState` and `step(state, xs, ys, *, resets=None, mask=None)` -> `(state,
      metrics)`, with `metrics["loss"]`, `["skipped"]`, `["nonfinite"]` and `["weight"]` of
      shape `[U]` (see `tbptt_train_step`).
    """
    k1, k2 = check_k(k1, k2)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_callable("apply_fn", apply_fn, "(params, carry, xs) -> (carry, preds)")
    check_callable("loss_fn", loss_fn, "(preds, targets) -> losses[t, b]")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise ValueError(f"optimizer must be an optax.GradientTransformation, got "
                         f"{type(optimizer).__name__}")
    config = _Config(apply_fn, loss_fn, optimizer, k1, k2, reduction, tail, bool(trace),
                     getattr(apply_fn, "__self__", None))
    return Trainer(partial(_init, config), partial(_jitted_step, config=config))


def _init(config: _Config, params: Params, xs: Any, carry: Carry | None = None, *,
          resets: bool = False, key: Array | None = None,
          opt_state: optax.OptState | None = None) -> TBPTTState:
    """A stream's state before its first step.

    Args:
      params: the model's parameters.
      xs: the stream's first sequence, or any with its batch and per-step shapes and dtypes
        (they size the overlap buffer and the zero carry).
      carry: the state before the first step; None for the model's zero carry in the
        parameters' dtype (for a model that declares `initial_carry`).
      resets: whether the stream's calls pass `resets` (k2 > k1: keeps their overlap, so
        the state has one structure from the first call on, as `lax.scan` needs).
      key: a PRNG key for `apply_fn` (dropout), or None for none.
      opt_state: the optimizer state to continue from; default `optimizer.init(params)`.
    """
    xs = _as_arrays(xs, "xs")
    batch = _sequence(xs, "xs")[1]
    if carry is None:
        carry = _zero_carry(config, params, batch)
    overlap = overlap_resets = None
    if config.overlap:
        overlap = jax.tree.map(
            lambda leaf: jnp.zeros((config.overlap, *leaf.shape[1:]), leaf.dtype), xs)
        if resets:
            overlap_resets = jnp.zeros((config.overlap, batch), bool)
    return TBPTTState(params, config.optimizer.init(params) if opt_state is None else opt_state,
                      _as_carry(carry), overlap, overlap_resets, jnp.int32(0), jnp.int32(0),
                      key)


def _step(state: TBPTTState, xs: Any, ys: Any, resets: Array | None = None,
          mask: Array | None = None, *, config: _Config) -> tuple[TBPTTState, dict[str, Any]]:
    (length, batch), step_preds = _check_step(config, state, xs, ys, resets, mask)
    # Which leaves of the predictions the model gives flattened, [t * B, ...]: the windows
    # run on them as [t, B, ...] (`apply_part`), and the loss gets them as the model gave.
    flattened = jax.tree.map(
        lambda leaf: flattened_preds("the model's predictions", leaf.shape, 1, batch),
        step_preds)
    k1, overlap = config.k1, config.overlap
    full_updates, remainder = divmod(length, k1)
    partial_tail = config.tail == "partial" and remainder > 0

    # The extended sequence: the overlap the stream carries, then this call's steps.
    if resets is None and state.overlap_resets is not None:
        resets = _no_resets(xs)
    inputs = (xs, resets)
    if overlap:
        history_resets = state.overlap_resets
        if resets is not None and history_resets is None:
            history_resets = _no_resets(state.overlap)
        inputs = _windows.concatenate([(state.overlap, history_resets), inputs])
    # Positions in the extended sequence before `start` precede the stream's first step.
    start = overlap - state.overlap_steps if overlap else None
    initial_carry = state.carry
    # Only a reset makes steps dead (`_windows.dead`), so only a stream with resets has any.
    steps = None if inputs[1] is None else _windows.liveness(
        inputs[1], _counted(inputs[1], mask, overlap, full_updates * k1 + (
            remainder if partial_tail else 0)))

    def pad_at(position: Any) -> Array | None:
        return None if start is None else jnp.maximum(start - position, 0)

    def update_key(index: Any) -> Array | None:
        return None if state.key is None else jax.random.fold_in(state.key, state.updates + index)

    def apply_part(params, key, carry, part, offset):
        part_xs, part_resets = part
        kwargs = {} if key is None else {"key": jax.random.fold_in(key, offset)}
        extra = () if part_resets is None else (part_resets,)
        carry, preds = config.apply_fn(params, carry, part_xs, *extra, **kwargs)
        steps = _windows.leading(part_xs)
        return carry, jax.tree_util.tree_map_with_path(
            lambda path, leaf: leaf.reshape(steps, batch, *leaf.shape[1:]) if flattened_preds(
                f"the model's predictions{jax.tree_util.keystr(path)}", leaf.shape, steps,
                batch) else leaf, preds)

    def window_at(position: Any, length: int) -> tuple[Any, Array | None]:
        """The inputs and resets of `length` steps from `position` of the extended
        sequence, its dead steps zeroed and reset."""
        window = _windows.take(inputs, position, length)
        if steps is None:
            return window
        return _windows.sanitize(window, _windows.dead(steps, position, length,
                                                       position + overlap))

    def update(params, opt_state, start_carry, window_start, index, *, loss_steps,
               padded=True):
        """One TBPTT update: forward over its window, gradient, one optimizer step."""
        window = window_at(window_start, overlap + loss_steps)
        targets = _windows.take(ys, window_start, loss_steps)
        weights = None if mask is None else _windows.take(mask, window_start, loss_steps)
        key = update_key(index)
        pad = pad_at(window_start) if padded else None

        def loss_of(params):
            # Truncation: the window starts from a constant; no gradient reaches earlier steps.
            handoff_carry, preds = _windows.run(
                partial(apply_part, params, key), jax.lax.stop_gradient(start_carry),
                jax.lax.stop_gradient(initial_carry), window, pad, loss_steps=loss_steps,
                handoff=loss_steps)
            preds = jax.tree.map(
                lambda leaf, flat: leaf.reshape(-1, *leaf.shape[2:]) if flat else leaf,
                preds, flattened)
            loss, weight = _reduce(config.loss_fn, preds, targets, weights, config.reduction)
            return loss, (weight, handoff_carry)

        (loss, (weight, handoff_carry)), grads = jax.value_and_grad(
            loss_of, has_aux=True)(params)
        updates, new_opt_state = config.optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss, gradient or step result (parameters or optimizer state: Adam's
        # float16 moments may underflow) never reaches the parameters or the optimizer
        # state; nor does an update that owns no weight (every loss term masked out).
        nonfinite = jnp.where(weight > 0, jnp.select(
            [~jnp.isfinite(loss), ~_all_finite(grads), ~_all_finite((new_params, new_opt_state))],
            [jnp.int32(code) for code in range(1, len(NONFINITE) + 1)], jnp.int32(0)), 0)
        keep = partial(jax.tree.map,
                       lambda new, old: jnp.where((nonfinite == 0) & (weight > 0), new, old))
        params, opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
        # An update with no weight has no loss: NaN, as torch reports it.
        record = _Record(jnp.where(weight > 0, loss, jnp.nan), nonfinite > 0, nonfinite, weight,
                         grads if config.trace else None, params if config.trace else None)
        return params, opt_state, handoff_carry, record

    params, opt_state, carry = state.params, state.opt_state, initial_carry
    records = []
    # Only the windows of the first (k2 - k1) / k1 updates can reach before the stream's
    # start: the others run the steady state's window alone, with no choice to make.
    may_pad = min(full_updates, -(-overlap // k1))
    for first, stop, padded in ((0, may_pad, True), (may_pad, full_updates, False)):
        if stop == first:
            continue

        def scanned(loop, index, padded=padded):
            params, opt_state, carry, record = update(*loop, index * k1, index, loss_steps=k1,
                                                      padded=padded)
            return (params, opt_state, carry), record

        (params, opt_state, carry), record = jax.lax.scan(
            scanned, (params, opt_state, carry), jnp.arange(first, stop))
        records.append(record)
    if partial_tail:
        params, opt_state, carry, record = update(
            params, opt_state, carry, full_updates * k1, full_updates, loss_steps=remainder)
        records.append(jax.tree.map(lambda leaf: leaf[None], record))
    elif remainder:
        # tail="drop": the untrained remainder still advances the carry, with the final
        # params, from the last hand-off to where the next call's first window starts.
        position = full_updates * k1
        key = update_key(full_updates)
        apply = partial(apply_part, params,
                        None if key is None else jax.random.fold_in(key, config.k2))
        carry, _ = _windows.run(apply, carry, initial_carry, window_at(position, remainder),
                                pad_at(position), loss_steps=0, handoff=remainder)

    if records:
        record = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *records)
        metrics = {"loss": record.loss, "skipped": record.skipped,
                   "nonfinite": record.nonfinite, "weight": record.weight}
        if config.trace:
            metrics["grads"], metrics["params"] = record.grads, record.params
    else:
        dtype = jnp.result_type(*_floats(params)) if _floats(params) else jnp.float32
        metrics = {"loss": jnp.zeros((0,), dtype), "skipped": jnp.zeros((0,), bool),
                   "nonfinite": jnp.zeros((0,), jnp.int32), "weight": jnp.zeros((0,), dtype)}

    new_state = state._replace(params=params, opt_state=opt_state, carry=carry,
                               updates=state.updates + full_updates + partial_tail)
    if overlap:
        history, history_resets = _windows.take(inputs, length, overlap)
        new_state = new_state._replace(
            overlap=history, overlap_resets=history_resets,
            overlap_steps=jnp.minimum(state.overlap_steps + length, overlap))
    return new_state, metrics


_jitted_step = jax.jit(_step, static_argnames=("config",))


def _reduce(loss_fn: LossFn, preds: Any, targets: Any, weights: Array | None,
            reduction: str) -> tuple[Array, Array]:
    """`(loss, weight)` of an update's owned terms: their (weighted) sum, or mean."""
    if weights is None:
        losses = loss_fn(preds, targets)
        weight = jnp.asarray(losses.size, losses.dtype)
        return (jnp.mean(losses) if reduction == "mean" else jnp.sum(losses)), weight
    # Masked terms add nothing, whatever their targets hold: they are replaced before the
    # loss sees them, so not even a NaN target can reach the gradient.
    counted = weights != 0
    targets = jax.tree.map(
        lambda leaf: jnp.where(counted.reshape(counted.shape + (1,) * (leaf.ndim - 2)), leaf,
                               jnp.zeros_like(leaf)), targets)
    losses = loss_fn(preds, targets)
    weights = weights.astype(losses.dtype)
    total = jnp.sum(jnp.where(counted, weights * losses, 0))
    weight = jnp.sum(weights)
    if reduction == "mean":
        total = total / jnp.where(weight > 0, weight, 1)
    return total, weight


def _counted(resets: Array, mask: Array | None, overlap: int, trained: int) -> Array:
    """Bool `[P, B]` over the extended sequence (the overlap carried in, then the call's
    steps): the loss terms the call's updates count, those of its first `trained` steps
    that the mask (if any) does not weigh 0."""
    position = jnp.arange(resets.shape[0])[:, None]
    counted = (position >= overlap) & (position < overlap + trained) & jnp.ones_like(resets)
    if mask is None:
        return counted
    weighed = mask != 0
    if overlap:
        weighed = jnp.concatenate([jnp.zeros_like(resets[:overlap]), weighed])
    return counted & weighed


def _no_resets(xs: Any) -> Array:
    """False `[T, B]` for the T, B of `xs`, split as its batch is (a mesh's Explicit axes
    put the split in the type)."""
    leaf = jax.tree.leaves(xs)[0]
    return jnp.zeros_like(leaf[(slice(None), slice(None)) + (0,) * (leaf.ndim - 2)], bool)


def _all_finite(tree: Any) -> Array:
    """Whether every inexact entry of `tree` is finite (its integer leaves, such as an
    optimizer's step count, always are)."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def _floats(tree: Any) -> list[np.dtype]:
    return [np.dtype(leaf.dtype) for leaf in jax.tree.leaves(tree)
            if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)]


def _describe(tree: Any) -> Any:
    """Shapes and dtypes of a pytree's leaves, for error messages."""
    return jax.tree.map(
        lambda leaf: (f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"
                      if hasattr(leaf, "dtype") else type(leaf).__name__), tree)


def _describe_data(tree: Any) -> str:
    """An array's shape, or a structure's leaves as `dtype[shape]`."""
    if isinstance(tree, (jax.Array, np.ndarray)) or hasattr(tree, "aval"):
        return str(tuple(np.shape(tree)))
    return str(_describe(tree))


def _named_shapes(tree: Any, name: str) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape under its path: `{"xs": shape}` for one array, `{"xs['obs']": ...}`
    for a structure."""
    return {name + jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sequence(tree: Any, name: str) -> tuple[int, int]:
    shapes = _named_shapes(tree, name)
    return check_sequences(shapes, shapes)


def _as_arrays(tree: Any, name: str) -> Any:
    """Data as arrays: a pytree of array-likes; a nested list of numbers is one array (a
    list of arrays is a structure, as torch's trainer takes it)."""
    if isinstance(tree, list) and all(isinstance(leaf, (numbers.Number, np.generic))
                                      for leaf in jax.tree.leaves(tree)):
        return jnp.asarray(np.asarray(tree))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, numbers.Number)):
            raise not_arrays(name, leaf, jax.tree_util.keystr(path))
    return jax.tree.map(jnp.asarray, tree)


def _as_carry(carry: Any) -> Carry:
    for path, leaf in jax.tree_util.tree_flatten_with_path(carry)[0]:
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise not_arrays("carry", leaf, jax.tree_util.keystr(path),
                             alternative=", or None for the model's zero carry")
    return jax.tree.map(jnp.asarray, carry)


def _check_mask_weights(mask: Array | None) -> None:
    """Float weights must be finite and >= 0, checked where their values are known (not
    under a caller's `jax.jit`, where the step cannot look at them)."""
    if mask is None or isinstance(mask, jax.core.Tracer) or not jnp.issubdtype(
            mask.dtype, jnp.floating):
        return
    bad = ~(jnp.isfinite(mask) & (mask >= 0))
    if bool(jnp.any(bad)):
        first = tuple(int(i) for i in np.argwhere(np.asarray(bad))[0])
        check_mask_weights(first, float(mask[first]))


def _check_key(key: Any) -> None:
    is_key = isinstance(key, (jax.Array, np.ndarray)) and (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == np.uint32 and key.shape[-1:] == (2,)))
    if key is not None and not is_key:
        raise ValueError(f"key must be a PRNG key (jax.random.key(seed) or "
                         f"jax.random.PRNGKey(seed)) or None, got {_describe(key)}")


def _zero_carry(config: _Config, params: Params, batch: int) -> Carry:
    initial_carry = getattr(config.model, "initial_carry", None)
    if initial_carry is None:
        raise ValueError("carry: None means the model's zero carry, but apply_fn is not the "
                         "apply of a model with initial_carry(batch_size, dtype); pass the "
                         "carry explicitly")
    _check_params(config, params)
    floats = _floats(params)
    return initial_carry(batch, jnp.result_type(*floats) if floats else None)


def _check_params(config: _Config, params: Params) -> None:
    param_shapes = getattr(config.model, "param_shapes", None)
    if param_shapes is None:
        return
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    check_param_shapes(param_shapes(), {name: np.shape(value) for name, value in params.items()})


def _split_axes(leaf: Any) -> tuple[Any, ...]:
    """The mesh axes each axis of `leaf` is split over where a mesh's `Explicit` axes put
    the split in its type (None for an axis that is not split); all None elsewhere."""
    spec = tuple(jax.typeof(leaf).sharding.spec)
    return spec + (None,) * (np.ndim(leaf) - len(spec))


def _typed(tree: Any) -> list[str]:
    """The leaves' types with their sharding on `Explicit` axes (`float32[1,8@data,16]`)."""
    return [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(tree)]


def _check_carry_split(carry: Carry, xs: Any, error: Exception | None) -> None:
    """Raises if xs's batch is split over `Explicit` mesh axes and the carry's is not:
    there the split is part of the types, and the carry leaving a step split like the
    batch must have entered it so (`lax.scan` keeps one type), which `shard_state` does."""
    first = jax.tree.leaves(xs)[0]
    split = _split_axes(first)[1]
    unsplit = [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(carry)
               if not any(_split_axes(leaf))]
    if split is not None and unsplit:
        raise ValueError(
            f"carry must be split over the batch as xs is on a mesh with Explicit axes: xs is "
            f"{jax.typeof(first)}, the carry has {unsplit}; place it as the batch, e.g. with "
            f"jax.device_put(carry, P(None, {split!r})) for a tbptt_jax.models carry, or "
            "tbptt_jax.sharding.shard_state (carry=None builds an unsplit one)") from error


def _check_step(config: _Config, state: TBPTTState, xs: Any, ys: Any, resets: Array | None,
                mask: Array | None) -> tuple[tuple[int, int], Any]:
    """Checks a step's arguments against each other, the model and the loss; runs while
    tracing, once per compiled program. Returns `(T, B)` and the shapes of the model's
    predictions for one step."""
    sequence = check_sequences(_named_shapes(xs, "xs"), _named_shapes(ys, "ys"))
    for name, tree in (("xs", xs), ("ys", ys), ("resets", resets)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            # On Explicit mesh axes the split is in the type: one over time cannot run, since
            # the steps run in order (JAX's examples split axis 0, here T, not the batch).
            split = _split_axes(leaf)[0]
            if split is not None:
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} must be split over its batch axis "
                    f"(1), not its time axis (0): got {jax.typeof(leaf)}; place it with "
                    f"P(None, {split!r}), or tbptt_jax.sharding.shard_batch")
    if resets is not None:
        check_resets(np.shape(resets), np.dtype(resets.dtype).name,
                     resets.dtype == np.bool_, sequence)
    if mask is not None:
        check_mask(np.shape(mask), np.dtype(mask.dtype).name,
                   mask.dtype == np.bool_ or jnp.issubdtype(mask.dtype, jnp.floating), sequence)
    if config.overlap:
        expected = jax.tree.map(lambda leaf: (config.overlap, *leaf.shape[1:]), xs)
        if jax.tree.structure(state.overlap) != jax.tree.structure(xs) or jax.tree.map(
                np.shape, state.overlap) != expected:
            raise ValueError(f"state.overlap must hold the last k2 - k1 = {config.overlap} "
                             f"steps of xs, shaped {expected}, got {_describe(state.overlap)} "
                             "(was the state made with other k1, k2 or data?)")
    params, carry, batch = state.params, state.carry, sequence[1]
    _check_params(config, params)
    expected = jax.eval_shape(config.optimizer.init, params)
    if jax.tree.structure(expected) != jax.tree.structure(state.opt_state) or jax.tree.map(
            np.shape, expected) != jax.tree.map(np.shape, state.opt_state):
        raise ValueError(f"opt_state must have the structure and shapes of "
                         f"optimizer.init(params): expected {_describe(expected)}, got "
                         f"{_describe(state.opt_state)}")
    floats = _floats(params)
    check_float_dtypes({d.name for d in floats}, {d.name for d in _floats(carry)},
                       {d.name for d in _floats(xs)},
                       hint=" (make the carry in the params' dtype, e.g. "
                            "model.initial_carry(B, dtype), or pass carry=None)")
    initial_carry = getattr(config.model, "initial_carry", None)
    if initial_carry is not None:
        expected = jax.eval_shape(partial(initial_carry, batch,
                                          jnp.result_type(*floats) if floats else None))
        if jax.tree.structure(expected) != jax.tree.structure(carry) or \
                _describe(carry) != _describe(expected):
            check_carry(_describe(expected), _describe(carry), batch)
    out_carry, preds = _first_step(config, state, xs, resets is not None)
    if jax.tree.structure(out_carry) != jax.tree.structure(carry) or \
            _describe(out_carry) != _describe(carry):
        raise ValueError(f"carry must keep its structure and shapes through the model: got "
                         f"{_describe(carry)}, the model returns {_describe(out_carry)}")
    if _typed(out_carry) != _typed(carry):
        _check_carry_split(carry, xs, None)
    try:
        losses = jax.eval_shape(config.loss_fn, preds,
                                jax.tree.map(lambda leaf: leaf[:1], ys))
    except Exception as error:  # a user's loss_fn may fail in any way
        raise loss_fails(str(_describe(ys)), str(_describe(preds)), 1, error) from error
    check_losses(getattr(losses, "shape", None), type(losses).__name__, 1, batch)
    return sequence, preds


def _first_step(config: _Config, state: TBPTTState, xs: Any, resets: bool) -> tuple[Any, Any]:
    """The shapes and dtypes of `(carry, preds)` the model gives for the first step of xs
    (traced, not run); a model that fails says so with what it was given."""
    first_step = jax.tree.map(lambda leaf: leaf[:1], xs)
    extra = (_no_resets(first_step),) if resets or state.overlap_resets is not None else ()
    kwargs = {} if state.key is None else {"key": state.key}
    try:
        return jax.eval_shape(lambda p, c, x: config.apply_fn(p, c, x, *extra, **kwargs),
                              state.params, state.carry, first_step)
    except Exception as error:  # the trace of a user's apply_fn may fail in any way
        _check_carry_split(state.carry, xs, error)
        raise model_fails(_describe(state.carry), _describe_data(xs), error) from error


@partial(jax.jit, static_argnames=("config", "resets"))
def _one_step(params: Params, carry: Carry, first_step: Any, key: Array | None, *,
              config: _Config, resets: bool) -> tuple[Carry, Any]:
    """The model over one step, as `_first_step` traces it; only its shapes are asked for
    (`eval_shape`), and jit keeps the trace, so asking again for the same shapes costs
    tens of microseconds, not a trace of the model (milliseconds)."""
    extra = (_no_resets(first_step),) if resets else ()
    return config.apply_fn(params, carry, first_step, *extra,
                           **({} if key is None else {"key": key}))


def _check_class_ids(config: _Config, state: TBPTTState, xs: Any, ys: Any, resets: bool,
                     mask: Array | None) -> None:
    """For a loss that declares it takes class ids (`tbptt.takes_class_ids`): every id of
    `ys` the mask counts must lie within the classes the model's predictions score. Run by
    `tbptt_train_step` before the compiled step, which cannot raise: there an id outside
    would only make its loss term NaN."""
    class_axis = declared_class_axis(config.loss_fn)
    if class_axis is None:
        return
    if not isinstance(ys, jax.Array):
        raise ValueError(f"ys must be one array of class ids for a loss_fn that takes them "
                         f"(loss_fn.class_axis), got {_describe_data(ys)}")
    first_step = jax.tree.map(lambda leaf: leaf[:1], xs)
    try:
        _, preds = _one_step.eval_shape(state.params, state.carry, first_step, state.key,
                                        config=config,
                                        resets=resets or state.overlap_resets is not None)
    except Exception:  # the trace of a user's apply_fn may fail in any way: said clearly
        _first_step(config, state, xs, resets)
        raise
    if not hasattr(preds, "shape"):
        raise ValueError(f"the model's predictions must be one array for a loss_fn that "
                         f"takes class ids (loss_fn.class_axis), got {_describe(preds)}")
    check_class_ids("ys", np.asarray(ys), class_count(preds.shape, class_axis),
                    None if mask is None else np.asarray(mask) != 0)


def tbptt_train_step(
    params: Params,
    opt_state: optax.OptState,
    carry: Carry | OverlapCarry | None,
    xs: Any,
    ys: Any,
    *,
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    k1: int,
    k2: int | None = None,
    reduction: str = "mean",
    tail: str = "partial",
    resets: Array | None = None,
    mask: Array | None = None,
    key: Array | None = None,
    updates_done: int = 0,
    on_nonfinite: str = "raise",
    trace: bool = False,
) -> tuple[Params, optax.OptState, Carry | OverlapCarry, dict[str, Any]]:
    """Trains on one sequence with TBPTT(k1, k2): all its updates in one compiled program.

    Args:
      params: the model's parameters (for `tbptt_jax.models`, a flat dict as torch names it).
      opt_state: `optimizer.init(params)` or the state a previous call returned.
      carry: the state before the first step, e.g. `model.initial_carry(B)` (None means
        that zero carry, in the parameters' dtype, for a model that declares
        `initial_carry`); or the carry a previous call returned, to continue the same
        stream (an `OverlapCarry` if k2 > k1).
      xs: inputs, time-major: an array `[T, B, ...]` (floats or integer token ids), or any
        pytree of them.
      ys: targets, `[T, B, ...]` with the same T and B (or a pytree of them).
      apply_fn, loss_fn, optimizer, k1, k2, reduction, tail, trace: as `trainer` takes
        them. Pass the same function and optimizer objects on every call: new ones are a
        new static argument and compile anew. For a loss that takes class ids
        (`tbptt.takes_class_ids`: `losses.cross_entropy` and `losses.nll` do), every id of
        `ys` the mask counts is checked here, before the compiled step, against the
        classes the model's predictions score (their shape traced for one step): one
        outside `[0, V)` raises `ValueError` and nothing trains.
      resets: optional bool `[T, B]`: where true, that sequence's carry is replaced by the
        model's zero carry before that step, in every window containing it.
      mask: optional `[T, B]`, bool or float weights of the loss terms (padding: 0).
        "sum" adds `w * l`, "mean" divides that by the weights' sum; an update whose terms
        all weigh 0 makes no optimizer step: its loss is NaN and `metrics["weight"]` 0.
      key: a PRNG key for `apply_fn` (dropout); update u of this call runs the model with
        `key=fold_in(fold_in(key, updates_done + u), offset)`, offset being where the
        model call starts in the window.
      updates_done: updates made in the stream before this call (for the keys), so that a
        stream fed in segments gets the keys of one call over the whole sequence.
      on_nonfinite: "raise" (default) raises `NonFiniteLossError` if any update's loss or
        gradient is not finite, or its step would make the parameters or the optimizer
        state so, leaving the caller's parameters as they were; "skip" skips such updates
        (parameters and optimizer state unchanged) and marks them in `metrics["skipped"]`.
        Under a `jax.jit`, `vmap` or `lax.scan` of the caller only "skip" can work (the
        check needs the call's results).

    Returns:
      `(params, opt_state, carry, metrics)`: `metrics["loss"]` has shape `[U]`, one loss
      per update, `metrics["skipped"]` (bool `[U]`) marks skipped updates,
      `metrics["nonfinite"]` (int32 `[U]`) says why: `1 + i` for `tbptt.stream.NONFINITE[i]`
      ("loss", "gradient", "step"), 0 for an update that was not skipped; and
      `metrics["weight"]` (`[U]`) the owned terms' weight.
    """
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    if not isinstance(updates_done, jax.Array):  # a traced count is the caller's to keep
        check_int("updates_done", updates_done, minimum=0)
    _check_key(key)
    configured = trainer(apply_fn, loss_fn, optimizer, k1=k1, k2=k2, reduction=reduction,
                         tail=tail, trace=trace)
    config: _Config = configured.step.keywords["config"]
    xs, ys = _as_arrays(xs, "xs"), _as_arrays(ys, "ys")
    resets = None if resets is None else _as_arrays(resets, "resets")
    mask = None if mask is None else _as_arrays(mask, "mask")
    length, batch = check_sequences(_named_shapes(xs, "xs"), _named_shapes(ys, "ys"))
    _check_mask_weights(mask)
    state = _state_of(config, params, opt_state, carry, xs, resets, key, updates_done)
    _check_class_ids(config, state, xs, ys, resets is not None, mask)
    state, metrics = configured.step(state, xs, ys, resets=resets, mask=mask)

    if on_nonfinite == "raise":
        if isinstance(metrics["skipped"], jax.core.Tracer):
            raise ValueError("on_nonfinite='raise' needs the call's results, which a jax.jit, "
                             "vmap or lax.scan around tbptt_train_step hides: pass "
                             "on_nonfinite='skip' and read metrics['skipped'] (or build the "
                             "trainer once with tbptt_jax.trainer)")
        if bool(jnp.any(metrics["skipped"])):
            first = int(np.argmax(np.asarray(metrics["skipped"])))
            cause = NONFINITE[int(metrics["nonfinite"][first]) - 1]
            raise NonFiniteLossError(nonfinite_message(first, float(metrics["loss"][first]),
                                                       cause, earlier_updates_applied=False))
    if not config.overlap:
        return state.params, state.opt_state, state.carry, metrics
    # The overlap's real steps, as many as the stream has had (static: known from the call).
    history = carry.xs if isinstance(carry, OverlapCarry) else None
    steps = min(config.overlap, length + (0 if history is None else
                                          jax.tree.leaves(history)[0].shape[0]))
    real = slice(config.overlap - steps, None)
    return state.params, state.opt_state, OverlapCarry(
        state.carry, jax.tree.map(lambda leaf: leaf[real], state.overlap),
        None if state.overlap_resets is None else state.overlap_resets[real]), metrics


def _state_of(config: _Config, params: Params, opt_state: optax.OptState, carry: Any, xs: Any,
              resets: Array | None, key: Array | None, updates_done: Any) -> TBPTTState:
    """The state `step` continues from, given what `tbptt_train_step` was passed."""
    history = history_resets = None
    if isinstance(carry, OverlapCarry):
        carry, history, history_resets = carry
        history, history_resets = _as_arrays(history, "carry.xs"), (
            None if history_resets is None else _as_arrays(history_resets, "carry.resets"))
        first, leaf = jax.tree.leaves(history)[0], jax.tree.leaves(xs)[0]
        check_overlap(first.shape, None if history_resets is None else history_resets.shape,
                      leaf.shape, config.k1, config.k2, xs_dtype=np.dtype(first.dtype).name,
                      sequence_dtype=np.dtype(leaf.dtype).name,
                      resets_dtype=None if history_resets is None else np.dtype(
                          history_resets.dtype).name)
    state = _init(config, params, xs, carry, resets=resets is not None or (
        history_resets is not None), key=key, opt_state=opt_state)
    if config.overlap and history is not None:
        steps = jax.tree.leaves(history)[0].shape[0]

        def padded(zeros, leaf):
            """The history behind as many steps of padding as it falls short of k2 - k1."""
            if steps == config.overlap:
                return leaf
            return jnp.concatenate([zeros[:config.overlap - steps], leaf])

        state = state._replace(overlap=jax.tree.map(padded, state.overlap, history),
                               overlap_steps=jnp.int32(steps))
        if history_resets is not None:
            state = state._replace(overlap_resets=padded(state.overlap_resets, history_resets))
    return state._replace(updates=jnp.int32(updates_done))
