"""A second reference of TBPTT(k1, k2), independent of both trainers and of the first one.

`parity_tests.reference` runs the JAX models' own one-step cells; this one shares no code
with the project at all. It is torch autograd over a Python loop: cells written here from
their equations (no `nn.RNN`/`GRU`/`LSTM`, no `tbptt_jax._kernels`), the schedule from
SPEC §1's formulas, resets as `where(reset, 0, h)` before a step, the loss weighted by the
mask term by term, and SGD and Adam written out. Nothing here knows of dead steps: it runs
every step on the data it is given, so agreeing with it shows that the trainers' treatment
of dead steps changes no loss, gradient or parameter (and no carry a later loss can read).

A call continues a stream from `history` steps carried over (an `OverlapCarry`'s inputs):
the sequence is those steps then the call's T new ones, P in all, the carry given stands
before its first step, and update u owns the steps `[a_u, b_u)` with

    a_u = history + (u-1)*k1,  b_u = min(a_u + k1, P),  s_u = max(0, a_u - (k2 - k1)),

(history = 0 is SPEC §1 exactly). The carry handed on stands at `max(0, P - (k2 - k1))`.
Carries are lists of per-layer tuples of `[B, H]` tensors: `(h,)`, or `(h, c)` for the LSTM.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

Params = dict[str, torch.Tensor]  # torch's state_dict() names, float64
Carry = list[tuple[torch.Tensor, ...]]


class Optimizer(NamedTuple):
    name: str  # "sgd" or "adam"
    lr: float
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


class Result(NamedTuple):
    """What a call did: per update its loss (NaN where its terms all weigh 0), gradient and
    parameters after it; then the carry handed on and the optimizer state."""

    losses: list[float]
    grads: list[Params]
    params: list[Params]
    carry: Carry  # at max(0, P - (k2 - k1))
    opt_state: dict[str, Any]


def _cell(cell: str, params: Params, layer: int, state: tuple[torch.Tensor, ...],
          x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One step of one layer, torch's gate order (GRU r, z, n; LSTM i, f, g, o)."""
    w_ih, w_hh = params[f"rnn.weight_ih_l{layer}"], params[f"rnn.weight_hh_l{layer}"]
    b_ih, b_hh = params[f"rnn.bias_ih_l{layer}"], params[f"rnn.bias_hh_l{layer}"]
    h = state[0]
    from_x, from_h = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh
    if cell == "elman":
        return (torch.tanh(from_x + from_h),)
    if cell == "gru":
        x_r, x_z, x_n = from_x.chunk(3, dim=-1)
        h_r, h_z, h_n = from_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h,)
    i, f, g, o = (from_x + from_h).chunk(4, dim=-1)
    c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
    return (torch.sigmoid(o) * torch.tanh(c), c)


def step(cell: str, params: Params, carry: Carry, x: torch.Tensor, reset: torch.Tensor
         ) -> tuple[Carry, torch.Tensor]:
    """Every layer and the readout over one step: `x[B, I] -> y[B, O]`, each sequence's
    carry zeroed first where `reset[B]`."""
    new_carry = []
    for layer, state in enumerate(carry):
        state = tuple(torch.where(reset[:, None], torch.zeros_like(part), part)
                      for part in state)
        state = _cell(cell, params, layer, state, x)
        new_carry.append(state)
        x = state[0]
    return new_carry, x @ params["head.weight"].T + params["head.bias"]


def _loss_terms(loss: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One step's losses `[B]`: squared error averaged over the features, or the softmax
    cross-entropy of integer labels."""
    if loss == "mse":
        return torch.square(pred - target).mean(dim=-1)
    return F.cross_entropy(pred, target.long(), reduction="none")


def _optimizer_step(optimizer: Optimizer, params: Params, grads: Params,
                    state: dict[str, Any]) -> tuple[Params, dict[str, Any]]:
    if optimizer.name == "sgd":
        return {key: p - optimizer.lr * grads[key] for key, p in params.items()}, state
    count = state.get("count", 0) + 1
    mu = {key: optimizer.b1 * state.get("mu", {}).get(key, 0) + (1 - optimizer.b1) * g
          for key, g in grads.items()}
    nu = {key: optimizer.b2 * state.get("nu", {}).get(key, 0) + (1 - optimizer.b2) * g * g
          for key, g in grads.items()}
    new = {key: p - optimizer.lr * (mu[key] / (1 - optimizer.b1 ** count)) / (
        torch.sqrt(nu[key] / (1 - optimizer.b2 ** count)) + optimizer.eps)
        for key, p in params.items()}
    return new, {"count": count, "mu": mu, "nu": nu}


def loop_tbptt(cell: str, params: Params, carry: Carry, xs: torch.Tensor, ys: torch.Tensor, *,
               k1: int, k2: int, reduction: str, tail: str, loss: str, optimizer: Optimizer,
               opt_state: dict[str, Any] | None = None, resets: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, history: int = 0,
               vocab: int | None = None) -> Result:
    """TBPTT(k1, k2) over one call, one update and one time step at a time.

    Args:
      cell: "elman", "gru" or "lstm"; the depth is the carry's length.
      params: float64 tensors under torch's names.
      carry: the state before the call's first step (that of the history, if any).
      xs: `[P, B, I]` floats, or `[P, B]` token ids with `vocab` (one-hot inputs): the
        history, then the call's steps.
      ys: `[T, B, O]` targets of the call's steps (`[T, B]` labels for "cross_entropy").
      k1, k2, reduction, tail: as the trainers take them.
      loss: "mse" or "cross_entropy".
      optimizer, opt_state: the optimizer and its state from before the call (None: fresh).
      resets: bool `[P, B]` or None; mask: weights `[T, B]` or None.
      history: how many of the first steps of xs (and resets) came from the previous call.
    """
    total, batch = xs.shape[0], xs.shape[1]
    length, overlap = total - history, k2 - k1
    updates = math.ceil(length / k1) if tail == "partial" else length // k1
    final = max(0, total - overlap)
    no_resets = torch.zeros(batch, dtype=torch.bool)
    weights = torch.ones(length, batch, dtype=torch.float64) if mask is None else mask

    def a(u: int) -> int:
        return history + (u - 1) * k1

    def b(u: int) -> int:
        return min(a(u) + k1, total)

    def s(u: int) -> int:
        return max(0, a(u) - overlap)

    def forward(p: Params, state: Carry, start: int, stop: int
                ) -> tuple[dict[int, Carry], dict[int, torch.Tensor]]:
        """The carries at positions start..stop and the outputs of each step between."""
        states, preds = {start: state}, {}
        for t in range(start, stop):
            x = xs[t] if vocab is None else F.one_hot(xs[t].long(), vocab).to(torch.float64)
            state, preds[t] = step(cell, p, state, x, no_resets if resets is None else resets[t])
            states[t + 1] = state
        return states, preds

    state, position = carry, 0
    opt_state = {} if opt_state is None else opt_state
    result = Result([], [], [], carry, opt_state)
    for u in range(1, updates + 1):
        assert position == s(u)
        leaves = {key: value.detach().clone().requires_grad_() for key, value in params.items()}
        start_state = [tuple(part.detach() for part in layer) for layer in state]
        states, preds = forward(leaves, start_state, s(u), b(u))
        total_loss, total_weight = torch.zeros((), dtype=torch.float64), 0.0
        for t in range(a(u), b(u)):
            counted = weights[t - history] != 0  # only the terms that count are computed
            step_terms = _loss_terms(loss, preds[t], ys[t - history])[counted]
            total_loss = total_loss + (weights[t - history][counted] * step_terms).sum()
            total_weight += float(weights[t - history][counted].sum())
        handoff = min(s(u + 1), final)
        state, position = states[handoff], handoff
        if total_weight == 0:  # every term weighs 0: no loss, no step
            result.losses.append(math.nan)
            result.grads.append({key: torch.zeros_like(p) for key, p in params.items()})
            result.params.append(params)
            continue
        if reduction == "mean":
            total_loss = total_loss / total_weight
        grads = dict(zip(leaves, torch.autograd.grad(total_loss, list(leaves.values())),
                         strict=True))
        params, opt_state = _optimizer_step(optimizer, params, grads, opt_state)
        params = {key: value.detach() for key, value in params.items()}
        result.losses.append(float(total_loss.detach()))
        result.grads.append(grads)
        result.params.append(params)
    with torch.no_grad():  # tail="drop": the untrained steps still advance the carry
        state = forward(params, state, position, final)[0][final] if position < final else state
    return result._replace(carry=[tuple(part.detach() for part in layer) for layer in state],
                           opt_state=opt_state)
