"""The per-term losses the audit recognises from the gradient a loop's loss puts on the
predictions: squared and absolute error for float targets, cross-entropy of logits and the
negative log-likelihood of log-probabilities for integer class targets.

A loss term `l(preds[t, b], targets[t, b])` gives the predictions of step t and sequence b the
gradient `w[t, b] * dl/dpreds`, whatever the loop does with the terms (a sum, a mean, a
mask, `nn.NLLLoss`, `F.mse_loss(..., reduction="sum")`, a running total over steps). So the
audit needs no name from the loop: it finds the loss whose term gradient every observed
gradient is a multiple of, and reads each term's weight `w` off it. A loss it does not know
is handed over as `loss_fn(preds, targets) -> losses[t, b]`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tbptt_torch import losses

WEIGHT_RTOL = 1e-9  # a loss weight read back from the gradient, against 1, 1/B, 1/(nB), 1/n
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Loss(NamedTuple):
    """A per-term loss `fn(preds[t, B, ...], targets[t, B, ...]) -> losses[t, B]`."""

    name: str
    fn: LossFn


def _l1(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    error = (preds - targets).abs()
    return error.mean(dim=tuple(range(2, error.ndim))) if error.ndim > 2 else error


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -F.log_softmax(logits, dim=-1).gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


FLOAT_LOSSES = (Loss("mse", losses.mse), Loss("l1", _l1))
CLASS_LOSSES = (Loss("cross_entropy", _cross_entropy), Loss("nll", _nll))
KNOWN = {loss.name: loss for loss in (*FLOAT_LOSSES, *CLASS_LOSSES)}


def candidates(ys: torch.Tensor, given: Loss | None) -> tuple[Loss, ...]:
    """The losses to try for targets like `ys`: the one given, or those the audit knows."""
    if given is not None:
        return (given,)
    return FLOAT_LOSSES if torch.is_floating_point(ys) else CLASS_LOSSES


def term_gradient(loss: Loss, preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d loss(preds, targets)[t, b] / d preds[t, b], for every term at once: `[t, B, ...]`."""
    with torch.enable_grad():
        probe = preds.detach().clone().requires_grad_(True)
        terms = loss.fn(probe, targets)
        if tuple(terms.shape) != tuple(targets.shape[:2]):
            raise ValueError(f"loss_fn {loss.name} must return losses [t, B] = "
                             f"{list(targets.shape[:2])}, got {list(terms.shape)}")
        (grad,) = torch.autograd.grad(terms.sum(), probe)
    return grad


def weights(grad: torch.Tensor, term: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The weight of each term `[t, B]` with `grad ~ weight * term`, and whether every term
    fits that (terms with no gradient fit any loss, with weight 0)."""
    g, g0 = grad.flatten(2), term.flatten(2)
    square = (g0 * g0).sum(-1)
    w = torch.where(square > 0, (g * g0).sum(-1) / square.clamp_min(torch.finfo(g.dtype).tiny),
                    torch.zeros_like(square))
    misfit = (g - w[..., None] * g0).abs().amax(-1)
    size = g.abs().amax(-1)
    return w, bool((misfit <= 1e-8 * size).all())
