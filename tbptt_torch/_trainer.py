"""The PyTorch TBPTT(k1, k2) trainer, the twin of `tbptt_jax.tbptt_train_step`.

It follows the same plan (`tbptt.plan`) with the same semantics (SPEC §1): each update
clears the gradients, runs the model over its window from the carry at the window start
(detached), reduces the loss over the steps it owns, backpropagates, takes one optimizer
step, and hands on the (detached) carry its forward reached at the next window's start.
The window runs as one call of the model (two when the hand-off lies inside it).

The model is any module with `forward(xs, carry[, resets]) -> (preds, carry)`, the carry
any nested tuples, lists and dicts of tensors (`tbptt.tree`). What the trainer checks it
asks the model or learns by running it: a model may declare `initial_carry(batch_size)`,
which the carry must match (and which `carry=None` means); the first window's forward
must keep the carry's structure and shapes, and `loss_fn` must return `[t, b]` losses,
both checked before the first optimizer step.

With k2 > k1 the carry returned is an `OverlapCarry`: the state at the start of the
overlap and the overlap's inputs, which the next call of the stream recomputes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tbptt import tree
from tbptt.checks import (
    ON_NONFINITE,
    REDUCTIONS,
    TAILS,
    check_carry,
    check_choice,
    check_float_dtypes,
    check_k,
    check_overlap,
    check_resets,
    check_sequences,
    model_fails,
)
from tbptt.schedule import Update, plan, run_window
from tbptt.stream import NonFiniteLossError, OverlapCarry, nonfinite_message

__all__ = ["NonFiniteLossError", "OverlapCarry", "tbptt_train_step"]

Carry = Any  # tensors in nested tuples, lists and dicts
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OnUpdate = Callable[[int, torch.Tensor, nn.Module], None]


def _detach(carry: Carry) -> Carry:
    return tree.map_leaves(torch.Tensor.detach, carry)


def _describe(carry: Carry) -> Any:
    """The carry with each tensor as `dtype[shape]`, for checks and their messages."""
    return tree.map_leaves(
        lambda part: f"{str(part.dtype).removeprefix('torch.')}{list(part.shape)}", carry)


def _run_model(model: nn.Module, carry: Carry, xs: torch.Tensor,
               resets: torch.Tensor | None) -> tuple[Carry, torch.Tensor]:
    preds, carry = model(xs, carry) if resets is None else model(xs, carry, resets)
    return carry, preds


def _window_loss(model, start_carry, window_xs, window_resets, targets, update: Update,
                 loss_fn, reduction, xs_shape) -> tuple[torch.Tensor, Carry]:
    """The loss of one update and the carry it hands on.

    The first update of a call checks what it runs: the model on the carry and xs (of
    shape `xs_shape`) it is given, and the carry it returns; every update checks what
    `loss_fn` returns. All of it before the update's optimizer step.
    """
    # Truncation: the window starts from a constant; no gradient reaches earlier steps.
    start_carry = _detach(start_carry)

    def run(carry, lo, hi):
        resets = None if window_resets is None else window_resets[lo:hi]
        return _run_model(model, carry, window_xs[lo:hi], resets)

    first = update.index == 0
    try:
        handoff_carry, preds = run_window(run, start_carry, update.shape, torch.cat)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        if not first:
            raise
        raise model_fails(_describe(start_carry), str(tuple(xs_shape)), error) from error
    if first and _describe(handoff_carry) != _describe(start_carry):
        raise ValueError(f"carry must keep its structure and shapes through the model: got "
                         f"{_describe(start_carry)}, the model returns "
                         f"{_describe(handoff_carry)}")
    losses = loss_fn(preds, targets)
    expected = (update.loss_length, window_xs.shape[1])
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != expected:
        got = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-step, per-sequence losses [t, b], expected "
                         f"shape {expected} for this window's {update.loss_length} loss "
                         f"steps, got {got}")
    loss = losses.mean() if reduction == "mean" else losses.sum()
    return loss, _detach(handoff_carry)


def _gradients_finite(model: nn.Module) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def tbptt_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    carry: Carry | OverlapCarry | None,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    loss_fn: LossFn,
    k1: int,
    k2: int | None = None,
    reduction: str = "mean",
    tail: str = "partial",
    resets: torch.Tensor | None = None,
    on_nonfinite: str = "raise",
    on_update: OnUpdate | None = None,
    clip_grad_norm: float | None = None,
) -> tuple[Carry | OverlapCarry, torch.Tensor]:
    """Trains `model` in place on one sequence with TBPTT(k1, k2).

    Args:
      model: `forward(xs, carry[, resets]) -> (preds, carry)` over a time-major chunk, e.g.
        `tbptt_torch.models.LSTMModel`.
      optimizer: any `torch.optim.Optimizer` over the model's parameters.
      carry: the state before the first step; None for the model's zero carry; or the carry
        a previous call returned, to continue the stream (an `OverlapCarry` if k2 > k1).
      xs: inputs, time-major `[T, B, ...]`.
      ys: targets, `[T, B, ...]` with the same T and B.
      loss_fn: `(preds, targets) -> losses[t, b]`, e.g. `tbptt_torch.losses.mse`.
      k1, k2, reduction, tail, resets, on_nonfinite: as in `tbptt_jax.tbptt_train_step`.
        With on_nonfinite="raise", the updates before the failing one stay applied (the
        model is trained in place); the failing one is not. With "skip", a skipped update's
        entry in `losses` is NaN, so `losses.isnan()` marks exactly the skipped updates.
      on_update: optional `f(update_index, loss, model)`, called after each update's
        optimizer step; the update's gradients are still in `p.grad` (clipped, if
        `clip_grad_norm` clipped them). To step an LR scheduler once per update, as optax
        advances a schedule, call `scheduler.step()` here or from
        `optimizer.register_step_post_hook` (which, unlike this, skips skipped updates,
        as optax's step count does).
      clip_grad_norm: a max norm (float > 0), or None for no clipping: each update's
        gradients are clipped with `torch.nn.utils.clip_grad_norm_(model.parameters(),
        clip_grad_norm)` after backward and before the optimizer step, i.e. scaled by
        `min(clip_grad_norm / (norm + 1e-6), 1)` with `norm` their global L2 norm. The
        exact JAX twin is `tbptt_jax.optim.clip_by_global_norm_torch`; plain
        `optax.clip_by_global_norm` divides by `norm` (docs/optimizers.md).

    Returns:
      `(carry, losses)`: the carry to continue the stream with, and the `[U]` losses.
    """
    k1, k2 = check_k(k1, k2)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    _check_clip_grad_norm(clip_grad_norm)
    _check_sequences(xs, ys, resets)
    state, history_xs, history_resets = _split_carry(model, carry, xs, k1, k2)
    _check_dtypes(model, state, xs)
    _check_declared_carry(model, state, xs.shape[1])
    schedule = plan(xs.shape[0], k1, k2, tail=tail, history=history_xs.shape[0])

    ext_xs = torch.cat([history_xs, xs]) if schedule.history else xs
    ext_resets = None
    if resets is not None or history_resets is not None:
        if resets is None:
            resets = torch.zeros(xs.shape[:2], dtype=torch.bool, device=xs.device)
        if history_resets is None:
            history_resets = torch.zeros(history_xs.shape[:2], dtype=torch.bool,
                                         device=xs.device)
        ext_resets = torch.cat([history_resets, resets]) if schedule.history else resets

    losses = []
    for update in schedule.updates:
        optimizer.zero_grad(set_to_none=True)
        window = slice(update.window_start, update.loss_stop)
        targets = ys[update.loss_start - schedule.history:update.loss_stop - schedule.history]
        loss, state = _window_loss(
            model, state, ext_xs[window], None if ext_resets is None else ext_resets[window],
            targets, update, loss_fn, reduction, xs.shape)
        loss.backward()
        # A non-finite loss or gradient never reaches the parameters or the optimizer state.
        if torch.isfinite(loss) and _gradients_finite(model):
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            losses.append(loss.detach())
        elif on_nonfinite == "raise":
            raise NonFiniteLossError(nonfinite_message(update.index, loss.item(),
                                                       earlier_updates_applied=True))
        else:
            losses.append(torch.full_like(loss, torch.nan).detach())
        if on_update is not None:
            on_update(update.index, loss.detach(), model)

    # tail="drop": the untrained remainder still advances the carry, with the final params.
    advance = slice(schedule.carry_after_updates, schedule.final_carry_at)
    if advance.stop > advance.start:
        with torch.no_grad():
            state, _ = _run_model(model, state, ext_xs[advance],
                                  None if ext_resets is None else ext_resets[advance])
    loss_dtype = next(model.parameters()).dtype
    losses_out = torch.stack(losses) if losses else torch.zeros(0, dtype=loss_dtype)
    if k2 == k1:
        return state, losses_out
    tail_steps = slice(schedule.final_carry_at, None)
    return OverlapCarry(state, ext_xs[tail_steps],
                        None if ext_resets is None else ext_resets[tail_steps]), losses_out


def _check_clip_grad_norm(clip_grad_norm: object) -> None:
    if clip_grad_norm is None:
        return
    if (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, numbers.Real)
            or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"clip_grad_norm must be a finite float > 0 (the max norm) or None, "
                         f"got {clip_grad_norm!r}")


def _check_sequences(xs: Any, ys: Any, resets: Any) -> None:
    for name, value in (("xs", xs), ("ys", ys)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor [T, B, ...], got "
                             f"{type(value).__name__}")
    sequence = check_sequences({"xs": xs.shape}, {"ys": ys.shape})
    if resets is None:
        return
    if not isinstance(resets, torch.Tensor):
        raise ValueError(f"resets must be a bool torch.Tensor of shape [T, B] = {sequence}, "
                         f"got {type(resets).__name__}")
    check_resets(resets.shape, str(resets.dtype), resets.dtype == torch.bool, sequence)


def _split_carry(model: nn.Module, carry: Any, xs: torch.Tensor, k1: int, k2: int
                 ) -> tuple[Carry, torch.Tensor, torch.Tensor | None]:
    """(model state, overlap inputs, overlap resets) from what the caller passed."""
    history_xs, history_resets = xs[:0], None
    if isinstance(carry, OverlapCarry):
        carry, history_xs, history_resets = carry
        check_overlap(history_xs.shape,
                      None if history_resets is None else history_resets.shape, xs.shape, k1, k2)
    initial_carry = getattr(model, "initial_carry", None)
    if carry is None:
        if initial_carry is None:
            raise ValueError("carry: None means the model's zero carry, but the model has no "
                             "initial_carry(batch_size) method; pass the carry explicitly")
        return initial_carry(xs.shape[1]), history_xs, history_resets
    found = tree.leaves(carry)
    if not found:
        raise ValueError(f"carry must hold at least one tensor, got {carry!r}")
    for path, leaf in found:
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(f"carry must be tensors in tuples, lists or dicts (or None for "
                             f"the model's zero carry); got {type(leaf).__name__} at "
                             f"carry{path}")
    return carry, history_xs, history_resets


def _check_declared_carry(model: nn.Module, carry: Carry, batch_size: int) -> None:
    initial_carry = getattr(model, "initial_carry", None)
    if initial_carry is not None:
        check_carry(_describe(initial_carry(batch_size)), _describe(carry), batch_size)


def _check_dtypes(model: nn.Module, carry: Carry, xs: torch.Tensor) -> None:
    def floating(tensors: Any) -> set[str]:
        return {str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}

    check_float_dtypes(floating(model.parameters()),
                       floating(leaf for _, leaf in tree.leaves(carry)), floating([xs]),
                       hint=" (model.to(dtype) converts the model)")
