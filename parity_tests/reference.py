"""A deliberately naive reference of TBPTT(k1, k2), written straight from SPEC §1's formulas.

It shares nothing with the trainers but the model's one-step function: no `tbptt.schedule`,
no `lax.scan`, no jit, no fused windows. A Python loop over updates u = 1..U computes

    a_u = (u-1)*k1,   b_u = min(u*k1, T),   s_u = max(0, a_u - (k2 - k1)),

runs `step` once per time step over the window [s_u, b_u) from the carry at s_u, reduces the
loss over [a_u, b_u) only (overlap steps add none), differentiates with `jax.grad`, and
applies one optax update. Resets are applied here, as `where(reset, 0, h)` before step t,
not by the model; so is the rule for dead steps (a step of a sequence that a later reset in
the call cuts off from every loss term update u or a later one counts runs on a zero input
from a zero carry), checked position by position. Agreement with the trainers therefore
checks their semantics independently of the schedule they share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from parity_tests.harness import Trajectory, to_numpy

StepFn = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


def _reset(state: Any, reset: jax.Array) -> Any:
    """Zeroes the carry of the sequences where `reset[B]` is true; carry leaves are [L, B, H]."""
    return jax.tree.map(lambda h: jnp.where(reset[None, :, None], jnp.zeros_like(h), h), state)


def reference_tbptt(
    step: StepFn,
    params: dict[str, jax.Array],
    opt_state: Any,
    carry: Any,
    xs: jax.Array,
    ys: jax.Array,
    *,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    k1: int,
    k2: int | None = None,
    reduction: str = "mean",
    tail: str = "partial",
    resets: jax.Array | None = None,
) -> Trajectory:
    """TBPTT(k1, k2) over one sequence, one time step at a time.

    Args:
      step: `(params, carry, x[B, I]) -> (carry, y[B, O])`, one time step of the model
        (e.g. `tbptt_jax.models.lstm(...).step`); it is called without resets.
      params, opt_state, carry: the starting parameters, optax state and carry.
      xs, ys: `[T, B, ...]` inputs and targets.
      loss_fn: `(preds, targets) -> losses[t, b]`; called on one step at a time.
      optimizer, k1, k2, reduction, tail, resets: as in `tbptt_jax.tbptt_train_step`.

    Returns:
      The trajectory (per-update losses, gradients and parameters after each update), the
      final optax state, and the carry a stream continues from: the state at
      `f = max(0, T - (k2 - k1))`, where the next call's first window starts; with k2 > k1
      it comes as `(state, xs[f:], resets[f:])`, the layout of an `OverlapCarry`.
    """
    k2 = k1 if k2 is None else k2
    length = xs.shape[0]
    overlap = k2 - k1
    updates = math.ceil(length / k1) if tail == "partial" else length // k1
    final = max(0, length - overlap)

    def a(u: int) -> int:
        return (u - 1) * k1

    def b(u: int) -> int:
        return min(u * k1, length)

    def s(u: int) -> int:
        return max(0, a(u) - overlap)

    trained = b(updates) if updates else 0  # the steps whose loss terms some update counts

    def dead(t: int, row: int, loss_start: int) -> bool:
        """Whether step t of sequence `row` is dead for the update whose loss starts at
        `loss_start`: a later reset in the call comes before any term counted from there."""
        if resets is None:
            return False
        later = [r for r in range(t + 1, length) if resets[r, row]]
        return bool(later) and not any(max(t, loss_start) <= q < min(later[0], trained)
                                       for q in range(length))

    def forward(p: Any, state: Any, start: int, stop: int, loss_start: int
                ) -> tuple[dict[int, Any], dict]:
        """The states reached at every position start..stop, and the outputs of each step."""
        states, preds = {start: state}, {}
        for t in range(start, stop):
            x = xs[t]
            if resets is not None:
                cut = jnp.asarray([dead(t, row, loss_start) for row in range(xs.shape[1])])
                x = jnp.where(cut[:, None], jnp.zeros_like(x), x)
                state = _reset(state, resets[t] | cut)
            state, preds[t] = step(p, state, x)
            states[t + 1] = state
        return states, preds

    losses, grads, history = [], [], []
    state, position = carry, 0  # the carry at s_1 = 0
    for u in range(1, updates + 1):
        assert position == s(u)
        # The carry handed on is taken where the next window starts; after the last update,
        # where the stream's next call starts (s_{U+1} may lie past T in a partial tail).
        handoff = min(s(u + 1), final)

        def loss_of(p: Any, u: int = u, start_state: Any = state, handoff: int = handoff
                    ) -> tuple[jax.Array, Any]:
            states, preds = forward(p, jax.lax.stop_gradient(start_state), s(u), b(u), a(u))
            terms = jnp.stack([loss_fn(preds[t][None], ys[t][None])[0] for t in range(a(u), b(u))])
            loss = jnp.mean(terms) if reduction == "mean" else jnp.sum(terms)
            return loss, states[handoff]

        (loss, state), grad = jax.value_and_grad(loss_of, has_aux=True)(params)
        step_updates, opt_state = optimizer.update(grad, opt_state, params)
        params = optax.apply_updates(params, step_updates)
        position = handoff
        losses.append(loss)
        grads.append(grad)
        history.append(params)

    # tail="drop": the untrained remainder still advances the carry, with the final params.
    state = forward(params, state, position, final, trained)[0][final]
    if overlap:
        state = (state, xs[final:], None if resets is None else resets[final:])

    def stacked(records: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
        return {key: np.stack([np.asarray(r[key]) for r in records]) if records
                else np.zeros((0, *np.shape(value))) for key, value in params.items()}

    return Trajectory(np.asarray(jnp.stack(losses)) if losses else np.zeros(0),
                      stacked(grads), stacked(history), to_numpy(state), opt_state)
