"""What a stream carries from one call to the next, and what stops an update, for both
trainers: one `OverlapCarry` and one `NonFiniteLossError`, whichever framework raised or
returned them.

`OverlapCarry` is a NamedTuple, so it is a pytree to JAX and a plain tuple to torch: it
travels through `jax.jit`, checkpoints and `isinstance` checks alike in both frameworks.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class OverlapCarry(NamedTuple):
    """What a stream carries from one call to the next when k2 > k1.

    The next call's first window starts `k2 - k1` steps before its first new step, so it
    needs the model state there and the inputs of those steps, recomputed with the
    parameters it then has (SPEC §1: no stale activations).
    """

    state: Any  # the model's carry before the first overlap step
    xs: Any  # shape=[n, B, ...]: the overlap's inputs, n <= k2 - k1
    resets: Any  # shape=[n, B], bool; None when the stream has no resets


class NonFiniteLossError(FloatingPointError):
    """An update's loss, its gradient, or the parameters or optimizer state its step made
    were not finite; that update was not applied."""


# What made an update non-finite, in the order the trainers check: the code `i + 1` marks
# NONFINITE[i] in `metrics["nonfinite"]` (0: finite).
NONFINITE = ("loss", "gradient", "step")


def nonfinite_message(update: int, loss: float, cause: str = "", *,
                      earlier_updates_applied: bool, applied: bool = False) -> str:
    """Why a call stopped at `update` (its index in the call's losses), and what of the call
    was applied: in JAX nothing (a call is one program), in torch the updates before it
    (and this one too where `applied`: a step that could not be undone).

    `cause` is one of `NONFINITE`; by default the loss if it is not finite, else the
    gradient."""
    if not cause:
        cause = "gradient" if math.isfinite(loss) else "loss"
    described = {
        "loss": f"a non-finite loss ({loss})",
        "gradient": f"a non-finite gradient (its loss, {loss}, is finite)",
        "step": f"a step that made the parameters or the optimizer state non-finite (its "
                f"loss, {loss}, and its gradient are finite)",
    }[cause]
    stop = f"update {update} of this call (counting from 0) has {described}"
    if applied:
        return (f"{stop}; it was applied, as were the updates before it: with "
                "undo_nonfinite_steps=False no copy is kept to undo such a step with.")
    outcome = ("it was not applied (the updates before it were)" if earlier_updates_applied
               else "nothing of this call was applied, the params passed in are unchanged")
    return f"{stop}; {outcome}. Pass on_nonfinite='skip' to skip such updates instead."
