"""One update's window, run in one traced shape wherever it lies in the stream.

Every window of a call has the same length: k2 steps for an update that owns k1 (the
k2 - k1 overlap steps, then its loss steps), k2 - k1 + r for a last update of r < k1 steps.
A window near a stream's start would reach before the stream's first step; it is then
*front-padded*: its first `pad` steps lie outside the stream, and the model starts from
the stream's initial carry at the first step inside it. One traced window thus serves
every update, clipped or not, in the first call of a stream or a later one, so compile
time does not grow with (k2 - k1) / k1 and a stream's calls share one program.

Three runs of a window give the same values and gradients; `RUNS` lists them and `which`
picks one for a window's pad:
- `run_fast`: no pad, the steady state: the model over the window in one call (two, split
  at the hand-off), from the carry the previous update handed on;
- `run_aligned`: a pad at least as long as the hand-off offset (so the carry handed on is
  the stream's initial one): the window's steps inside the stream moved to its front, the
  model over them from the initial carry in one call, then over zeros, whose outputs
  nothing reads;
- `run_held`: a pad shorter than that (only a window whose hand-off lies in the stream
  while its start does not, which a stream fed in segments of k1 steps meets only when k1
  does not divide k2 - k1): the model over the window in chunks, a `lax.cond` per chunk
  holding the initial carry over the pad's chunks without running the model there.
The trainer takes the gradient inside each run and picks among them (`run_chosen`, a
`lax.switch`), so no run pays for another's residuals.

A window may hold *dead* steps (`dead`): steps of a row whose state a reset of that row
discards before any loss term still to be counted could read it. The trainer runs them on
zero inputs as if the row were reset there (`sanitize`), so whatever they hold (a NaN in a
finished episode) reaches neither the forward nor the backward pass: their cotangents are
exactly zero, so on finite data the losses and gradients are those of the plain run.
"""

from __future__ import annotations

import math
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


def chunk_size(*lengths: int) -> int:
    """The chunks of a held window: every pad a stream in segments of k1 can make, the
    hand-off and the window length fall on their boundaries (pass k1, k2 - k1, the hand-off
    offset and the window length)."""
    return math.gcd(*lengths)


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
    """Zeros for predictions `[t, B, ...]` the held run does not compute, split over the
    batch as `part` (the chunk's inputs) is: on a mesh with Explicit axes the split is in
    the type, which the model's predictions carry too."""
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


def _run_held(apply_part: ApplyPart, initial_carry: Carry, inputs: Any, pad: Array,
              loss_steps: int, handoff: int, chunk: int) -> tuple[Carry, Any]:
    length = leading(inputs)
    chunks = jax.tree.map(lambda leaf: leaf.reshape(length // chunk, chunk, *leaf.shape[1:]),
                          inputs)
    step_preds = jax.eval_shape(lambda c, x: apply_part(c, x, 0)[1], initial_carry,
                                take(inputs, 0, 1))

    def held_steps(carry, part, offset):
        """A chunk that straddles the pad's end (a stream fed in segments that are not
        multiples of k1): one step at a time."""
        def one_step(carry, scanned):
            index, step = scanned
            position = offset + index
            carry, preds = jax.lax.cond(
                position < pad,
                lambda: (initial_carry, jax.tree.map(
                    lambda s: _zeros(s.shape, s.dtype, jax.tree.map(lambda x: x[None], step)),
                    step_preds)),
                lambda: apply_part(carry, jax.tree.map(lambda leaf: leaf[None], step),
                                   position))
            return carry, jax.tree.map(lambda p: p[0], preds)
        return jax.lax.scan(one_step, carry, (jnp.arange(chunk), part))

    def one_chunk(carry, scanned):
        index, part = scanned
        offset = index * chunk
        branches = [
            lambda: (initial_carry, jax.tree.map(
                lambda s: _zeros((chunk, *s.shape[1:]), s.dtype, part), step_preds)),
            lambda: apply_part(carry, part, offset),
        ]
        if chunk > 1:
            branches.append(lambda: held_steps(carry, part, offset))
        which = jnp.where(offset + chunk <= pad, 0, jnp.where(offset >= pad, 1, 2))
        carry, preds = jax.lax.switch(which, branches)
        return carry, (carry, preds)

    _, (carries, preds) = jax.lax.scan(one_chunk, initial_carry,
                                       (jnp.arange(length // chunk), chunks))
    handoff_carry = (initial_carry if handoff == 0 else
                     jax.tree.map(lambda c: c[handoff // chunk - 1], carries))
    preds = jax.tree.map(lambda p: p.reshape(length, *p.shape[2:])[length - loss_steps:], preds)
    return handoff_carry, preds


def run_aligned(apply_part: ApplyPart, start_carry: Carry, initial_carry: Carry,
                inputs: Any, pad: Array, loss_steps: int, handoff: int, chunk: int
                ) -> tuple[Carry, Any]:
    length = leading(inputs)
    moved = take(concatenate([inputs, jax.tree.map(jnp.zeros_like, inputs)]), pad, length)
    _, preds = apply_part(initial_carry, moved, 0)
    return initial_carry, take(preds, length - pad - loss_steps, loss_steps)


def run_fast(apply_part: ApplyPart, start_carry: Carry, initial_carry: Carry, inputs: Any,
             pad: Array | None, loss_steps: int, handoff: int, chunk: int
             ) -> tuple[Carry, Any]:
    return _run_fast(apply_part, start_carry, inputs, loss_steps, handoff)


def run_held(apply_part: ApplyPart, start_carry: Carry, initial_carry: Carry, inputs: Any,
             pad: Array, loss_steps: int, handoff: int, chunk: int) -> tuple[Carry, Any]:
    return _run_held(apply_part, initial_carry, inputs, pad, loss_steps, handoff, chunk)


RUNS = (run_fast, run_aligned, run_held)


def which(pad: Array, handoff: int) -> Array:
    """The index in `RUNS` of the run for a window with `pad` steps of padding."""
    return jnp.where(pad == 0, 0, jnp.where(pad >= handoff, 1, 2))


def run_chosen(branch_of: Callable[[Callable[..., Any]], Callable[[], Any]], pad: Array | None,
               handoff: int) -> Any:
    """`branch_of(run)()` for the run `which` picks for `pad`: `lax.switch` over every run's
    branch, or the steady run's alone where the window cannot be padded (`pad` None)."""
    if pad is None:
        return branch_of(run_fast)()
    return jax.lax.switch(which(pad, handoff), [branch_of(run) for run in RUNS])
