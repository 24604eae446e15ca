"""The TBPTT(k1, k2) update schedule, framework-free: which steps each update owns and sees.

Both trainers (`tbptt_jax` and `tbptt_torch`) follow the plan made here, so the two cannot
disagree about where an update's window starts, which steps carry loss, or where the carry
for the next update is taken. Positions count from the start of the *extended* sequence:
the `history` steps carried over from the previous call of a stream (the overlap that
k2 > k1 needs, at most k2 - k1 steps) followed by the `length` new steps of this call.
With no history these are the positions of SPEC §1 exactly:

    a_u = (u-1)*k1,  b_u = min(u*k1, T),  s_u = max(0, a_u - (k2 - k1)),

update u owns the loss steps [a_u, b_u) and runs the model over its window [s_u, b_u);
the carry handed to update u+1 is the state its forward reached at s_{u+1}.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tbptt.checks import TAILS, check_choice, check_int, check_k

C = TypeVar("C")  # a framework's carry
P = TypeVar("P")  # a framework's predictions: an array, or a structure of them


@dataclass(frozen=True)
class Update:
    """One optimizer update: its window, its loss steps and where its carry hand-off lies.

    All positions are indices into the extended sequence (history + new steps);
    `window_start <= handoff <= loss_stop` and `window_start <= loss_start < loss_stop`.
    """

    index: int  # 0-based position of this update within the call
    window_start: int  # s_u: the model runs from the (constant) carry at this step
    loss_start: int  # a_u: first step whose loss counts
    loss_stop: int  # b_u: one past the last step of the window and of the loss
    handoff: int  # s_{u+1}: the carry reached here is handed to the next update

    @property
    def window_length(self) -> int:
        return self.loss_stop - self.window_start

    @property
    def overlap(self) -> int:
        """Steps of the window before its loss steps: a gradient path, no loss."""
        return self.loss_start - self.window_start

    @property
    def loss_length(self) -> int:
        return self.loss_stop - self.loss_start

    @property
    def shape(self) -> tuple[int, int, int]:
        """What a compiled window depends on: (window length, overlap, hand-off offset)."""
        return (self.window_length, self.overlap, self.handoff - self.window_start)


@dataclass(frozen=True)
class Schedule:
    """The plan of one call: its updates, and where the carry it returns is taken.

    After the last update the carry stands at `updates[-1].handoff` (at 0 when there is no
    update); if that is before `final_carry_at` (the remainder that `tail="drop"` leaves),
    the trainer runs the model forward, without gradient, with the final parameters up to
    `final_carry_at`. The steps `[final_carry_at, history + length)` are the overlap the
    next call of the stream recomputes: they are returned beside the carry.
    """

    k1: int
    k2: int
    tail: str
    history: int
    length: int
    updates: tuple[Update, ...]
    final_carry_at: int

    @property
    def total(self) -> int:
        """Length of the extended sequence: history + new steps."""
        return self.history + self.length

    @property
    def carry_after_updates(self) -> int:
        return self.updates[-1].handoff if self.updates else 0

    def runs(self) -> tuple[tuple[Update, ...], ...]:
        """Consecutive updates of equal `shape`, k1 apart: each run is one `lax.scan`."""
        runs: list[list[Update]] = []
        for update in self.updates:
            if runs and runs[-1][-1].shape == update.shape:
                runs[-1].append(update)
            else:
                runs.append([update])
        return tuple(tuple(run) for run in runs)


def run_window(run: Callable[[C, int, int], tuple[C, P]], start_carry: C,
               shape: tuple[int, int, int], concatenate: Callable[[list[P]], P],
               steps_from: Callable[[P, int], P]) -> tuple[C, P]:
    """Runs the model over one update's window, in either framework.

    `run(carry, lo, hi) -> (carry, preds)` runs the steps `[lo, hi)` of the window. The
    window is split at the hand-off, so the carry there can be handed to the next update.
    `concatenate` joins predictions along time and `steps_from(preds, lo)` keeps their steps
    from `lo` on, leaf by leaf where the model predicts a structure.

    Returns:
      `(handoff_carry, preds)`: the carry reached at the hand-off and the predictions of the
      loss steps only (the overlap's outputs are only a gradient path and carry no loss).
    """
    length, overlap, handoff = shape
    if handoff == 0:
        handoff_carry = start_carry
        _, preds = run(start_carry, 0, length)
    elif handoff == length:
        handoff_carry, preds = run(start_carry, 0, length)
    else:
        handoff_carry, preds_before = run(start_carry, 0, handoff)
        _, preds_after = run(handoff_carry, handoff, length)
        preds = concatenate([preds_before, preds_after])
    return handoff_carry, steps_from(preds, overlap)


def number_of_updates(length: int, k1: int, tail: str) -> int:
    """U for a call of `length` new steps: ceil(T/k1) for "partial", floor for "drop"."""
    return math.ceil(length / k1) if tail == "partial" else length // k1


def plan(
    length: int,
    k1: int,
    k2: int | None = None,
    *,
    tail: str = "partial",
    history: int = 0,
) -> Schedule:
    """Plans the updates of one call over `length` new steps.

    Args:
      length: T, the number of new time steps in this call (>= 1).
      k1: steps between updates; each update owns k1 loss steps (fewer in a partial tail).
      k2: steps each update backpropagates through (>= k1; defaults to k1).
      tail: "partial" trains a last shorter chunk; "drop" leaves the `length % k1` last
        steps untrained (they still advance the carry).
      history: steps carried over from the previous call of the stream, at most k2 - k1.
    """
    k1, k2 = check_k(k1, k2)
    check_choice("tail", tail, TAILS)
    length = check_int("the sequence length T", length)
    history = check_int("history", history, minimum=0)
    overlap = k2 - k1
    if history > overlap:
        raise ValueError(f"history must be in [0, k2 - k1 = {overlap}], got {history}")

    updates = []
    for u in range(number_of_updates(length, k1, tail)):
        loss_start = history + u * k1
        loss_stop = min(loss_start + k1, history + length)
        updates.append(
            Update(
                index=u,
                window_start=max(0, loss_start - overlap),
                loss_start=loss_start,
                loss_stop=loss_stop,
                handoff=max(0, loss_stop - overlap),
            )
        )
    return Schedule(
        k1=k1,
        k2=k2,
        tail=tail,
        history=history,
        length=length,
        updates=tuple(updates),
        final_carry_at=max(0, history + length - overlap),
    )
