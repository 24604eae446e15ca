"""One update's window, run in one traced shape wherever it lies in the stream.

Every window of a call has the same length: k2 steps for an update that owns k1 (the
k2 - k1 overlap steps, then its loss steps), k2 - k1 + r for a last update of r < k1 steps.
A window near a stream's start would reach before the stream's first step; it is then
*front-padded*: its first `pad` steps lie outside the stream, and the model starts from
the stream's initial carry at the first step inside it. One traced window thus serves
every update, clipped or not, in the first call of a stream or a later one, so compile
time does not grow with (k2 - k1) / k1 and a stream's calls share one program.

Two runs of a window give the same values and gradients (`run` picks one, statically):
- `_run_fast`, the steady state, where no window of the phase can reach before the stream:
  the model over the window in two calls split at the hand-off, from the carry the
  previous update handed on;
- `run_padded`, for the first (k2 - k1) / k1 updates of a call, whose pad is known only
  when the program runs: up to the hand-off, `_run_fast`'s call where there is no pad, else
  the model step by step from the initial carry, held over the pad (a `lax.cond` per
  step); from the hand-off on, one call over the window's steps inside the stream moved
  to the front, then zeros, whose outputs nothing reads.
The model is thus traced three times for any k2 > k1 (the window, its hand-off part, one
step), where picking among whole-window runs (`lax.switch`) traced it, and took its
gradient, once per run.

A window may hold *dead* steps (`dead`): steps of a row whose state a reset of that row
discards before any loss term still to be counted could read it. The trainer runs them on
zero inputs as if the row were reset there (`sanitize`), so whatever they hold (a NaN in a
finished episode) reaches neither the forward nor the backward pass: their cotangents are
exactly zero, so on finite data the losses and gradients are those of the plain run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from tbptt import schedule

Array = jax.Array
Carry = Any
# (carry, inputs: a pytree of [t, B, ...], offset of its first step in the window)
#   -> (carry, preds: a pytree of [t, B, ...])
ApplyPart = Callable[[Carry, Any, Any], tuple[Carry, Any]]


def leading(tree: Any) -> int:
    """The shared length of a pytree's leaves' first axis."""
    return jax.tree.leaves(tree)[0].shape[0]


def take(tree: Any, start: Any, length: int) -> Any:
    """Steps `[start, start + length)` of every leaf (`start` may be traced)."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, length), tree)


def concatenate(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *trees)


def _steps_from(tree: Any, start: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[start:], tree)


def liveness(resets: Array, counted: Array) -> tuple[Array, Array]:
    """`(next_reset, next_counted)`, int32 `[P, B]` over a call's extended sequence of P
    steps: the first step after p where the row is reset, and the first step at or after p
    whose loss term is counted (owned by an update of the call, with a non-zero weight);
    P where there is none."""
    length = resets.shape[0]
    positions = jnp.arange(length, dtype=jnp.int32)[:, None]

    def first_at_or_after(flags: Array) -> Array:
        return jax.lax.cummin(jnp.where(flags, positions, length), axis=0, reverse=True)

    at_or_after = first_at_or_after(resets)
    next_reset = jnp.concatenate([at_or_after[1:], jnp.full_like(at_or_after[:1], length)])
    return next_reset, first_at_or_after(counted)


def dead(steps: tuple[Array, Array], start: Any, length: int, loss_start: Any) -> Array:
    """Bool `[length, B]`: which steps `[start, start + length)` of an update's window are
    dead, `steps` being `liveness(...)` and `loss_start` the update's first loss step. A
    step is dead when a reset of its row follows it within the call and no term the update
    or a later one counts lies between: from `loss_start` on, the counted terms are the
    update's own, and those before it belong to earlier updates."""
    next_reset, next_counted = take(steps, start, length)
    first_counted = jax.lax.dynamic_slice_in_dim(steps[1], loss_start, 1)
    return (next_reset < steps[0].shape[0]) & (
        jnp.maximum(next_counted, first_counted) >= next_reset)


def sanitize(window: tuple[Any, Array], dead_steps: Array) -> tuple[Any, Array]:
    """The window's `(xs, resets)` with its dead steps zeroed and reset: a select, so
    nothing they held reaches a value or a gradient."""
    xs, resets = window
    xs = jax.tree.map(lambda leaf: jnp.where(
        dead_steps.reshape(dead_steps.shape + (1,) * (leaf.ndim - 2)), jnp.zeros_like(leaf),
        leaf), xs)
    return xs, resets | dead_steps


def _zeros(shape: tuple[int, ...], dtype: Any, part: Any) -> Array:
    """Zeros for predictions `[t, B, ...]` of steps held over a pad, split over the batch as
    `part` (the steps' inputs) is: on a mesh with Explicit axes the split is in the type,
    which the model's predictions carry too."""
    leaf = jax.tree.leaves(part)[0]
    base = jnp.zeros_like(leaf[(slice(None), slice(None)) + (0,) * (leaf.ndim - 2)], dtype)
    return jnp.broadcast_to(base.reshape(base.shape + (1,) * (len(shape) - 2)), shape)


def _run_fast(apply_part: ApplyPart, start_carry: Carry, inputs: Any, loss_steps: int,
              handoff: int) -> tuple[Carry, Any]:
    """`(handoff_carry, preds)`: the carry reached at `handoff` and the predictions of the
    last `loss_steps` steps."""
    length = leading(inputs)

    def run(carry, lo, hi):
        return apply_part(carry, take(inputs, lo, hi - lo), lo)

    return schedule.run_window(run, start_carry, (length, length - loss_steps, handoff),
                               concatenate, _steps_from)


def _stepwise(apply_part: ApplyPart, initial_carry: Carry, inputs: Any, pad: Array,
              with_preds: bool) -> tuple[Carry, Any]:
    """`(carry, preds or None)`: the model one step at a time over `inputs` (the window's
    first steps) from the initial carry, held there, without running the model, over the
    steps the pad covers (whose predictions are zeros)."""
    step_preds = jax.eval_shape(lambda c, x: apply_part(c, x, 0)[1], initial_carry,
                                take(inputs, 0, 1))

    def one_step(carry, scanned):
        position, step = scanned
        step = jax.tree.map(lambda leaf: leaf[None], step)

        def held():
            return initial_carry, jax.tree.map(
                lambda s: _zeros(s.shape, s.dtype, step), step_preds) if with_preds else None

        def run():
            carry_after, preds = apply_part(carry, step, position)
            return carry_after, preds if with_preds else None

        carry, preds = jax.lax.cond(position < pad, held, run)
        return carry, jax.tree.map(lambda p: p[0], preds)

    return jax.lax.scan(one_step, initial_carry,
                        (jnp.arange(leading(inputs), dtype=jnp.int32), inputs))


def run_padded(apply_part: ApplyPart, start_carry: Carry, initial_carry: Carry,
               inputs: Any, pad: Array, loss_steps: int, handoff: int) -> tuple[Carry, Any]:
    """`_run_fast`'s `(handoff_carry, preds)` for a window whose first `pad` steps (traced,
    at most its length less `loss_steps`) lie before the stream's first step.

    Up to the hand-off: one model call from `start_carry` where there is no pad, else the
    model step by step from the initial carry, held over the pad. From the hand-off: the
    steps inside the stream moved to the front and run in one call from the hand-off carry
    (the initial one wherever the pad reaches past the hand-off), then zeros, whose outputs
    nothing reads."""
    length = leading(inputs)
    overlap = length - loss_steps  # the window's steps before its loss steps
    front, back = take(inputs, 0, handoff), _steps_from(inputs, handoff)
    front_preds = overlap < handoff  # some loss steps lie before the hand-off

    def unpadded():
        carry, preds = apply_part(start_carry, front, 0)
        return carry, preds if front_preds else None

    handoff_carry, preds_before = jax.lax.cond(
        pad == 0, unpadded,
        lambda: _stepwise(apply_part, initial_carry, front, pad, front_preds))
    if handoff == length:  # a dropped tail's advance: no loss steps, only the carry
        return handoff_carry, None
    shift = jnp.maximum(pad - handoff, 0)
    moved = take(concatenate([back, jax.tree.map(jnp.zeros_like, back)]), shift,
                 length - handoff)
    _, preds_after = apply_part(handoff_carry, moved, handoff + shift)
    if front_preds:  # then the pad, at most `overlap`, ends before the hand-off: no shift
        return handoff_carry, _steps_from(concatenate([preds_before, preds_after]), overlap)
    return handoff_carry, take(preds_after, overlap - handoff - shift, loss_steps)


def run(apply_part: ApplyPart, start_carry: Carry, initial_carry: Carry, inputs: Any,
        pad: Array | None, loss_steps: int, handoff: int) -> tuple[Carry, Any]:
    """`(handoff_carry, preds)` of an update's window: the carry at the hand-off and the
    predictions of its last `loss_steps` steps. `pad` is None where the window cannot reach
    before the stream's start (the steady state), else its traced pad."""
    if pad is None:
        return _run_fast(apply_part, start_carry, inputs, loss_steps, handoff)
    return run_padded(apply_part, start_carry, initial_carry, inputs, pad, loss_steps,
                      handoff)
