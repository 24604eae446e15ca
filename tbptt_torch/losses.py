"""Per-term losses for the PyTorch trainer: `loss_fn(preds, targets) -> losses[T, B]`.

The twins of `tbptt_jax.losses`; under the mean reduction they equal `nn.MSELoss()` and
`nn.CrossEntropyLoss()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over the feature axes: `[T, B, ...] -> [T, B]`."""
    if preds.shape != targets.shape:
        raise ValueError(f"mse: preds and targets must have one shape, got {tuple(preds.shape)} "
                         f"and {tuple(targets.shape)}")
    squared = torch.square(preds - targets)
    return squared.mean(dim=tuple(range(2, squared.ndim))) if squared.ndim > 2 else squared


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
