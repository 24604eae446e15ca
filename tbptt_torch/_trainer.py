"""The PyTorch TBPTT(k1, k2) trainer, the twin of `tbptt_jax.tbptt_train_step`.

It follows the same plan (`tbptt.plan`) with the same semantics (SPEC §1): each update
clears the gradients, runs the model over its window from the carry at the window start
(detached; dead steps on zero inputs as if reset, as `tbptt_jax._windows.dead` says),
reduces the loss over the steps it owns, backpropagates, takes one optimizer step (undone
if it leaves the parameters or the optimizer state non-finite), and hands on the
(detached) carry its forward reached at the next window's start. The window runs as one
call of the model (two when the hand-off lies inside it).

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

import copy
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from tbptt import tree
from tbptt.checks import (
    ON_NONFINITE,
    REDUCTIONS,
    TAILS,
    check_callable,
    check_carry,
    check_choice,
    check_class_ids,
    check_float_dtypes,
    check_k,
    check_losses,
    check_mask,
    check_mask_weights,
    check_overlap,
    check_resets,
    check_sequences,
    class_count,
    declared_class_axis,
    flattened_preds,
    loss_fails,
    model_fails,
    not_arrays,
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


def _window_loss(model, start_carry, window_xs, window_resets, targets, weights,
                 update: Update, loss_fn, reduction, batch: int, xs: str, ys: str,
                 check_preds: Callable[[Any], None]) -> tuple[torch.Tensor, torch.Tensor, Carry]:
    """`(loss, weight, carry)`: the loss of one update, the weight of its terms, and the
    carry it hands on.

    The first update of a call checks what it runs: the model on the carry and xs (`xs`
    describes them) it is given, the carry it returns, its predictions (`check_preds`), and
    `loss_fn` on its predictions and `ys` (`ys` describes them); every update checks what
    `loss_fn` returns. All of it before the update's optimizer step.
    """
    # Truncation: the window starts from a constant; no gradient reaches earlier steps.
    start_carry = _detach(start_carry)

    flattened = []  # per leaf of the predictions, whether the model gives [t * B, ...]

    def run(carry, lo, hi):
        resets = None if window_resets is None else window_resets[lo:hi]
        carry, preds = _run_model(model, carry, _steps(window_xs, lo, hi), resets)
        layout = [flattened_preds(f"the model's predictions{path}", leaf.shape, hi - lo, batch)
                  for path, leaf in tree.leaves(preds)]
        flattened[:] = layout
        return carry, _in_steps(preds, layout, batch)

    first = update.index == 0
    try:
        handoff_carry, preds = run_window(run, start_carry, update.shape, _concatenate,
                                          _steps_from)
    except Exception as error:  # a user's model may fail in any way
        if not first:
            raise
        raise model_fails(_describe(start_carry), xs, error) from error
    preds = _as_model_gave(preds, flattened)
    if first and _describe(handoff_carry) != _describe(start_carry):
        raise ValueError(f"carry must keep its structure and shapes through the model: got "
                         f"{_describe(start_carry)}, the model returns "
                         f"{_describe(handoff_carry)}")
    if first:
        check_preds(preds)
    if weights is not None:
        # Masked terms add nothing, whatever their targets hold: they are replaced before the
        # loss sees them, so not even a NaN target can reach the gradient.
        counted = weights != 0
        targets = tree.map_leaves(lambda leaf: torch.where(
            counted.view(counted.shape + (1,) * (leaf.ndim - 2)), leaf,
            torch.zeros_like(leaf)), targets)
    try:
        losses = loss_fn(preds, targets)
    except Exception as error:  # a user's loss_fn may fail in any way
        if not first:
            raise
        raise loss_fails(ys, _describe(preds), update.loss_length, error) from error
    check_losses(tuple(losses.shape) if isinstance(losses, torch.Tensor) else None,
                 type(losses).__name__, update.loss_length, batch)
    if weights is None:
        weight = torch.tensor(float(losses.numel()), dtype=losses.dtype)
        loss = losses.mean() if reduction == "mean" else losses.sum()
    else:
        weights = weights.to(losses.dtype)
        loss = torch.where(counted, weights * losses, torch.zeros_like(losses)).sum()
        weight = weights.sum()
        if reduction == "mean":
            loss = loss / torch.where(weight > 0, weight, torch.ones_like(weight))
    return loss, weight, _detach(handoff_carry)


def _in_steps(preds: Any, flattened: list[bool], batch: int) -> Any:
    """Predictions as `[t, B, ...]`, each leaf the model gave flattened unflattened, so the
    window can be cut and joined by steps."""
    layout = iter(flattened)
    return tree.map_leaves(lambda leaf: leaf.unflatten(0, (-1, batch)) if next(layout)
                           else leaf, preds)


def _as_model_gave(preds: Any, flattened: list[bool]) -> Any:
    """The loss steps' predictions in the layout the model gave them, for `loss_fn`."""
    layout = iter(flattened)
    return tree.map_leaves(lambda leaf: leaf.flatten(0, 1) if next(layout) else leaf, preds)


def _steps(data: Any, lo: int, hi: int) -> Any:
    """Steps `[lo, hi)` of every tensor of `data`."""
    return tree.map_leaves(lambda leaf: leaf[lo:hi], data)


def _steps_from(data: Any, start: int) -> Any:
    """Steps `[start, end)` of every tensor of `data`."""
    return tree.map_leaves(lambda leaf: leaf[start:], data)


def _concatenate(pieces: list[Any]) -> Any:
    return tree.map_leaves(lambda *leaves: torch.cat(leaves), pieces[0], *pieces[1:])


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every entry of every floating tensor is finite. A sum is finite only if all
    its terms are, and costs a fraction of `isfinite().all()` (measured: a 25th on 3.6M
    float32 entries); only a sum that is not (an overflow, or a true NaN) is looked at
    entry by entry."""
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats or bool(torch.isfinite(torch.stack([t.sum() for t in floats])).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floats)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, dict]]:
    """Each parameter the optimizer updates, with its state (a dict, empty before its first
    step)."""
    return [(p, optimizer.state.get(p, {})) for group in optimizer.param_groups
            for p in group["params"]]


def _copy_of(optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, torch.Tensor, dict]]:
    """The optimizer's parameters and state as they are, to undo a step with (`_undo`)."""
    return [(p, p.detach().clone(), {key: value.clone() if isinstance(value, torch.Tensor)
                                     else copy.deepcopy(value) for key, value in state.items()})
            for p, state in _optimizer_tensors(optimizer)]


def _undo(optimizer: torch.optim.Optimizer, saved: list[tuple[nn.Parameter, torch.Tensor, dict]]
          ) -> None:
    with torch.no_grad():
        for p, value, state in saved:
            p.copy_(value)
            if not state:  # the step made the state: the parameter had never been stepped
                optimizer.state.pop(p, None)
                continue
            current = optimizer.state[p]
            for key in set(current) - set(state):
                del current[key]
            for key, old in state.items():
                # In place where it can be, so a tensor held elsewhere sees the undo too.
                if (isinstance(old, torch.Tensor) and isinstance(current.get(key), torch.Tensor)
                        and current[key].shape == old.shape):
                    current[key].copy_(old)
                else:
                    current[key] = old


def _step_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the parameters and the optimizer state a step left are all finite."""
    return _all_finite([tensor for p, state in _optimizer_tensors(optimizer)
                        for tensor in (p, *state.values()) if isinstance(tensor, torch.Tensor)])


def _liveness(resets: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(next_reset, next_counted)` `[P, B]` over the extended sequence of P steps: the first
    step after p where the row is reset, and the first step at or after p whose loss term
    is counted; P where there is none (the twin of `tbptt_jax._windows.liveness`)."""
    length = resets.shape[0]
    positions = torch.arange(length, device=resets.device)[:, None]

    def first_at_or_after(flags: torch.Tensor) -> torch.Tensor:
        marked = torch.flip(torch.where(flags, positions, length), [0])
        return torch.flip(torch.cummin(marked, dim=0).values, [0])

    at_or_after = first_at_or_after(resets)
    return (torch.cat([at_or_after[1:], torch.full_like(at_or_after[:1], length)]),
            first_at_or_after(counted))


def _dead(steps: tuple[torch.Tensor, torch.Tensor], window: slice, loss_start: int
          ) -> torch.Tensor:
    """Which steps of `window` are dead for an update whose loss starts at `loss_start`: a
    reset of the row follows within the call, and no term the update or a later one counts
    lies between (the twin of `tbptt_jax._windows.dead`)."""
    next_reset, next_counted = steps[0][window], steps[1][window]
    return (next_reset < steps[0].shape[0]) & (
        torch.maximum(next_counted, steps[1][loss_start]) >= next_reset)


def _sanitize(xs: Any, resets: torch.Tensor, dead: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """xs and resets with the dead steps zeroed and reset: a select, so nothing they held
    reaches a value or a gradient."""
    xs = tree.map_leaves(lambda leaf: torch.where(
        dead.view(dead.shape + (1,) * (leaf.ndim - 2)), torch.zeros_like(leaf), leaf), xs)
    return xs, resets | dead


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
    mask: torch.Tensor | None = None,
    on_nonfinite: str = "raise",
    on_update: OnUpdate | None = None,
    clip_grad_norm: float | None = None,
    undo_nonfinite_steps: bool = True,
) -> tuple[Carry | OverlapCarry, torch.Tensor]:
    """Trains `model` in place on one sequence with TBPTT(k1, k2).

    Args:
      model: `forward(xs, carry[, resets]) -> (preds, carry)` over a time-major chunk, e.g.
        `tbptt_torch.models.LSTMModel`; `preds` a tensor `[t, B, ...]`, or `[t * B, ...]`
        flattened time-major (word_language_model's `RNNModel`), or a structure of them;
        `loss_fn` gets the loss steps' in the same layout.
      optimizer: any `torch.optim.Optimizer` over the model's parameters.
      carry: the state before the first step; None for the model's zero carry; or the carry
        a previous call returned, to continue the stream (an `OverlapCarry` if k2 > k1).
      xs: inputs, time-major: a tensor `[T, B, ...]` (floats or integer token ids), or
        tensors in nested tuples, lists and dicts; numpy arrays are taken too.
      ys: targets, `[T, B, ...]` with the same T and B (or a structure of them).
      loss_fn: `(preds, targets) -> losses[t, b]`, e.g. `tbptt_torch.losses.mse`. For a loss
        that takes class ids (`tbptt.takes_class_ids`: `losses.cross_entropy` and
        `losses.nll` do), every id of `ys` the mask counts is checked against the classes
        the first window's predictions score, after that forward and before any backward
        or optimizer step: one outside `[0, V)` raises `ValueError` with nothing trained.
      k1, k2, reduction, tail, resets, mask, on_nonfinite: as in
        `tbptt_jax.tbptt_train_step`. With on_nonfinite="raise", the updates before the
        failing one stay applied (the model is trained in place); the failing one is not.
        `losses.isnan()` marks exactly the updates that made no optimizer step: those
        skipped with "skip" and those whose loss terms the mask weighs all 0.
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
      undo_nonfinite_steps: keep a copy of the parameters and the optimizer state before
        each optimizer step, and restore it if the step leaves any of them non-finite
        (e.g. float16 moments that underflow): that update then counts as non-finite, as
        one with a non-finite loss or gradient does. The copy costs one more set of the
        parameters and optimizer state in memory and, on the benchmark configurations,
        about 1% of an update's time. False keeps no copy: such a step stays applied and
        raises `NonFiniteLossError` whatever `on_nonfinite` says.

    Returns:
      `(carry, losses)`: the carry to continue the stream with, and the `[U]` losses.
    """
    k1, k2 = check_k(k1, k2)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
    _check_clip_grad_norm(clip_grad_norm)
    if not isinstance(undo_nonfinite_steps, bool):
        raise ValueError(f"undo_nonfinite_steps must be True or False, got "
                         f"{undo_nonfinite_steps!r}")
    _check_model_and_optimizer(model, optimizer)
    check_callable("loss_fn", loss_fn, "(preds, targets) -> losses[t, b]")
    check_callable("on_update", on_update, "f(update_index, loss, model)", optional=True)
    device = next(model.parameters()).device
    xs, ys = _as_tensors(xs, "xs", device), _as_tensors(ys, "ys", device)
    resets, mask = (None if value is None else _as_tensors(value, name, device)
                    for name, value in (("resets", resets), ("mask", mask)))
    length, batch = _check_sequences(xs, ys, resets, mask)
    state, history_xs, history_resets = _split_carry(model, carry, xs, k1, k2, device)
    _check_dtypes(model, state, xs)
    _check_declared_carry(model, state, batch)
    history = tree.leaves(history_xs)[0][1].shape[0]
    schedule = plan(length, k1, k2, tail=tail, history=history)

    ext_xs = _concatenate([history_xs, xs]) if history else xs
    ext_resets = None
    if resets is not None or history_resets is not None:
        if resets is None:
            resets = torch.zeros((length, batch), dtype=torch.bool, device=device)
        if history_resets is None:
            history_resets = torch.zeros((history, batch), dtype=torch.bool, device=device)
        ext_resets = torch.cat([history_resets, resets]) if history else resets
    # Only a reset makes steps dead (`_dead`), so only a stream with resets has any.
    trained = schedule.updates[-1].loss_stop if schedule.updates else history
    steps = None if ext_resets is None else _liveness(
        ext_resets, _counted(ext_resets, mask, history, trained))

    def window(start: int, stop: int, loss_start: int) -> tuple[Any, torch.Tensor | None]:
        """The inputs and resets of steps `[start, stop)`, their dead steps sanitized."""
        window_xs = _steps(ext_xs, start, stop)
        if steps is None:
            return window_xs, None if ext_resets is None else ext_resets[start:stop]
        return _sanitize(window_xs, ext_resets[start:stop],
                         _dead(steps, slice(start, stop), loss_start))

    described = _describe_data(xs), str(_describe(ys))
    check_preds = _class_ids_check(loss_fn, ys, mask)
    losses = []
    for update in schedule.updates:
        optimizer.zero_grad(set_to_none=True)
        owned = slice(update.loss_start - history, update.loss_stop - history)
        loss, weight, state = _window_loss(
            model, state, *window(update.window_start, update.loss_stop, update.loss_start),
            _steps(ys, owned.start, owned.stop), None if mask is None else mask[owned],
            update, loss_fn, reduction, batch, *described, check_preds)
        loss.backward()
        # A non-finite loss, gradient or step result never reaches the parameters or the
        # optimizer state; nor does an update whose terms are all masked out.
        cause = ""
        if weight != 0:
            if not torch.isfinite(loss):
                cause = "loss"
            elif not _all_finite([p.grad for p in model.parameters() if p.grad is not None]):
                cause = "gradient"
            else:
                if clip_grad_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                saved = _copy_of(optimizer) if undo_nonfinite_steps else None
                optimizer.step()
                if not _step_finite(optimizer):
                    cause = "step"
                    if saved is None:
                        raise NonFiniteLossError(nonfinite_message(
                            update.index, loss.item(), cause, earlier_updates_applied=True,
                            applied=True))
                    _undo(optimizer, saved)
            if cause and on_nonfinite == "raise":
                raise NonFiniteLossError(nonfinite_message(update.index, loss.item(), cause,
                                                           earlier_updates_applied=True))
        applied = weight != 0 and not cause
        losses.append(loss.detach() if applied else torch.full_like(loss, torch.nan).detach())
        if on_update is not None:
            on_update(update.index, loss.detach(), model)

    # tail="drop": the untrained remainder still advances the carry, with the final params.
    advance = slice(schedule.carry_after_updates, schedule.final_carry_at)
    if advance.stop > advance.start:
        with torch.no_grad():
            state, _ = _run_model(model, state, *window(advance.start, advance.stop, trained))
    loss_dtype = next(model.parameters()).dtype
    losses_out = torch.stack(losses) if losses else torch.zeros(0, dtype=loss_dtype)
    if k2 == k1:
        return state, losses_out
    tail_steps = slice(schedule.final_carry_at, None)
    return OverlapCarry(state, _steps(ext_xs, tail_steps.start, None),
                        None if ext_resets is None else ext_resets[tail_steps]), losses_out


def _counted(resets: torch.Tensor, mask: torch.Tensor | None, history: int, trained: int
             ) -> torch.Tensor:
    """Bool `[P, B]` over the extended sequence (the overlap carried in, then the call's
    steps): the loss terms the call's updates count, steps `[history, trained)` where the
    mask weighs them."""
    position = torch.arange(resets.shape[0], device=resets.device)[:, None]
    counted = ((position >= history) & (position < trained)).expand(resets.shape)
    if mask is None:
        return counted
    return counted & torch.cat([torch.zeros_like(resets[:history]), mask != 0])


def _class_ids_check(loss_fn: LossFn, ys: Any, mask: torch.Tensor | None
                     ) -> Callable[[Any], None]:
    """What the first update checks of its predictions: for a loss that declares it takes
    class ids (`tbptt.takes_class_ids`), that every id of `ys` the mask counts lies within
    the classes the predictions score, so that no update trains before a bad id is found
    (torch's own error would come mid-call, from the update reading it)."""
    class_axis = declared_class_axis(loss_fn)
    if class_axis is None:
        return lambda preds: None
    if not isinstance(ys, torch.Tensor):
        raise ValueError(f"ys must be one tensor of class ids for a loss_fn that takes them "
                         f"(loss_fn.class_axis), got {_describe_data(ys)}")

    def check(preds: Any) -> None:
        if not isinstance(preds, torch.Tensor):
            raise ValueError(f"the model's predictions must be one tensor for a loss_fn that "
                             f"takes class ids (loss_fn.class_axis), got {_describe(preds)}")
        check_class_ids("ys", ys.detach().cpu().numpy(), class_count(preds.shape, class_axis),
                        None if mask is None else (mask != 0).cpu().numpy())

    return check


def _check_clip_grad_norm(clip_grad_norm: object) -> None:
    if clip_grad_norm is None:
        return
    if (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, numbers.Real)
            or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"clip_grad_norm must be a finite float > 0 (the max norm) or None, "
                         f"got {clip_grad_norm!r}")


def _as_tensors(data: Any, name: str, device: torch.device, *, alternative: str = "") -> Any:
    """Tensors in nested tuples, lists and dicts as given; numpy arrays (and a nested list
    of numbers, which is one array; a list of arrays is a structure) become tensors on the
    model's device. `alternative` ends the message for anything else."""
    if isinstance(data, list) and all(isinstance(leaf, (numbers.Number, np.generic))
                                      for _, leaf in tree.leaves(data)):
        return torch.as_tensor(np.asarray(data), device=device)
    for path, leaf in tree.leaves(data):
        if not isinstance(leaf, (torch.Tensor, np.ndarray)):
            raise not_arrays(name, leaf, path, alternative=alternative)
    return tree.map_leaves(
        lambda leaf: leaf if isinstance(leaf, torch.Tensor) else torch.as_tensor(
            leaf, device=device), data)


def _named_shapes(data: Any, name: str) -> dict[str, tuple[int, ...]]:
    return {name + path: tuple(leaf.shape) for path, leaf in tree.leaves(data)}


def _describe_data(data: Any) -> str:
    """A tensor's shape, or a structure's tensors as `dtype[shape]`."""
    if isinstance(data, torch.Tensor):
        return str(tuple(data.shape))
    return str(_describe(data))


def _check_sequences(xs: Any, ys: Any, resets: torch.Tensor | None,
                     mask: torch.Tensor | None) -> tuple[int, int]:
    sequence = check_sequences(_named_shapes(xs, "xs"), _named_shapes(ys, "ys"))
    if resets is not None:
        if not isinstance(resets, torch.Tensor):
            raise ValueError(f"resets must be a bool tensor of shape [T, B] = {sequence}, got "
                             f"{type(resets).__name__}")
        check_resets(resets.shape, str(resets.dtype), resets.dtype == torch.bool, sequence)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"mask must be a tensor of shape [T, B] = {sequence}, got "
                             f"{type(mask).__name__}")
        check_mask(mask.shape, str(mask.dtype),
                   mask.dtype == torch.bool or mask.is_floating_point(), sequence)
        if mask.is_floating_point():
            bad = ~(torch.isfinite(mask) & (mask >= 0))
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                check_mask_weights(first, mask[first].item())
    return sequence


def _split_carry(model: nn.Module, carry: Any, xs: torch.Tensor, k1: int, k2: int,
                 device: torch.device) -> tuple[Carry, torch.Tensor, torch.Tensor | None]:
    """(model state, overlap inputs, overlap resets) from what the caller passed; numpy
    arrays in it become tensors on the model's device."""
    history_xs, history_resets = _steps(xs, 0, 0), None
    if isinstance(carry, OverlapCarry):
        carry, history_xs, history_resets = carry
        history_xs = _as_tensors(history_xs, "carry.xs", device)
        if history_resets is not None:
            history_resets = _as_tensors(history_resets, "carry.resets", device)
        if tree.structure(history_xs) != tree.structure(xs):
            raise ValueError(f"carry: the OverlapCarry's xs must have the structure of xs, "
                             f"{_describe_data(xs)}, got {_describe_data(history_xs)}")
        for (_, history), (_, leaf) in zip(tree.leaves(history_xs), tree.leaves(xs),
                                           strict=True):
            check_overlap(history.shape,
                          None if history_resets is None else history_resets.shape,
                          leaf.shape, k1, k2, xs_dtype=str(history.dtype),
                          sequence_dtype=str(leaf.dtype),
                          resets_dtype=None if history_resets is None else str(
                              history_resets.dtype))
    initial_carry = getattr(model, "initial_carry", None)
    if carry is None:
        if initial_carry is None:
            raise ValueError("carry: None means the model's zero carry, but the model has no "
                             "initial_carry(batch_size) method; pass the carry explicitly")
        return initial_carry(tree.leaves(xs)[0][1].shape[1]), history_xs, history_resets
    if not tree.leaves(carry):
        raise ValueError(f"carry must hold at least one tensor, got {carry!r}")
    carry = _as_tensors(carry, "carry", device,
                        alternative=", or None for the model's zero carry")
    return carry, history_xs, history_resets


def _check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    """The model must be a module with parameters, and the optimizer update only them (one
    made for another model, or a copy, would step tensors the trainer never touches)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")
    own = {id(p) for p in model.parameters()}
    if not own:
        raise ValueError(f"model must have parameters to train, got a {type(model).__name__} "
                         "with none")
    foreign = sum(id(p) not in own for group in optimizer.param_groups for p in group["params"])
    if foreign:
        raise ValueError(f"optimizer must update model.parameters(), but {foreign} of the "
                         "tensors it updates are not the model's (was it made for another "
                         "model, or a copy of this one?)")


def _check_declared_carry(model: nn.Module, carry: Carry, batch_size: int) -> None:
    initial_carry = getattr(model, "initial_carry", None)
    if initial_carry is not None:
        check_carry(_describe(initial_carry(batch_size)), _describe(carry), batch_size)


def _check_dtypes(model: nn.Module, carry: Carry, xs: torch.Tensor) -> None:
    def floating(tensors: Any) -> set[str]:
        return {str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()}

    check_float_dtypes(floating(model.parameters()),
                       floating(leaf for _, leaf in tree.leaves(carry)),
                       floating(leaf for _, leaf in tree.leaves(xs)),
                       hint=" (model.to(dtype) converts the model)")
