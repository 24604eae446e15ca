"""Per-term losses for the PyTorch trainer: `loss_fn(preds, targets) -> losses[T, B]`.

The twins of `tbptt_jax.losses`: term by term `nn.MSELoss`, `nn.CrossEntropyLoss` and
`nn.NLLLoss` with `reduction="none"`, so their mean is those losses' default.

The token losses (`cross_entropy`, `nll`) declare `class_axis = -1`: their targets are class
ids counting along the predictions' last axis, which `tbptt_torch.tbptt_train_step` checks
before training (`tbptt.takes_class_ids`). Called on their own, an id outside the classes
raises torch's own `IndexError`, and torch's `ignore_index` (-100) gives a 0 term, as
`nn.NLLLoss` does; the trainer refuses both (a mask leaves terms out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tbptt.checks import takes_class_ids


def mse(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the feature axes: `[T, B, ...] -> [T, B]`."""
    if preds.shape != targets.shape:
        raise ValueError(f"mse: preds and targets must have one shape, got {tuple(preds.shape)} "
                         f"and {tuple(targets.shape)}")
    squared = torch.square(preds - targets)
    return squared.mean(dim=tuple(range(2, squared.ndim))) if squared.ndim > 2 else squared


@takes_class_ids
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of integer labels: logits `[T, B, C]`, labels `[T, B]` -> `[T, B]`."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"cross_entropy: labels must be integer class ids, got "
                         f"{str(labels.dtype).removeprefix('torch.')}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: labels must have shape {tuple(logits.shape[:-1])} "
                         f"(the logits' without the class axis), got {tuple(labels.shape)}")
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten().long(),
                           reduction="none").view(labels.shape)


@takes_class_ids
def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of integer labels given log-probabilities (a log-softmax's
    output, as `nn.NLLLoss` takes): log_probs `[T, B, C]`, labels `[T, B]` -> `[T, B]`."""
    if log_probs.shape[:-1] != labels.shape:
        raise ValueError(f"nll: labels must have shape {tuple(log_probs.shape[:-1])} (the "
                         f"log-probabilities' without the class axis), got "
                         f"{tuple(labels.shape)}")
    return F.nll_loss(log_probs.flatten(0, -2), labels.flatten().long(),
                      reduction="none").view(labels.shape)
