"""Per-term losses for the JAX trainer: `loss_fn(preds, targets) -> losses[T, B]`.

The trainer reduces these over an update's loss steps (`reduction="mean"` or `"sum"`), so
each function returns one loss per time step and sequence. They match `tbptt_torch.losses`,
term by term `nn.MSELoss`, `nn.CrossEntropyLoss` and `nn.NLLLoss` with `reduction="none"`.

The token losses (`cross_entropy`, `nll`) declare `class_axis = -1`: their targets are class
ids counting along the predictions' last axis, which `tbptt_jax.tbptt_train_step` checks
before training (`tbptt.takes_class_ids`). Called on their own, or inside a compiled
`trainer.step`, an id outside the classes gives a NaN loss term, never a clamped one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tbptt.checks import takes_class_ids

Array = jax.Array


def mse(preds: Array, targets: Array) -> Array:
    """Squared error averaged over the feature axes: `[T, B, ...] -> [T, B]`.

    Averaging (not summing) the features makes the mean over `[T, B]` equal to
    `nn.MSELoss()`'s mean over every element, as in Ignite's trainer.
    """
    if preds.shape != targets.shape:
        raise ValueError(f"mse: preds and targets must have one shape, got {preds.shape} "
                         f"and {targets.shape}")
    squared = jnp.square(preds - targets)
    return jnp.mean(squared, axis=tuple(range(2, squared.ndim))) if squared.ndim > 2 else squared


@takes_class_ids
def cross_entropy(logits: Array, labels: Array) -> Array:
    """Softmax cross-entropy of integer labels: logits `[T, B, C]`, labels `[T, B]` -> `[T, B]`."""
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"cross_entropy: labels must be integer class ids, got "
                         f"{jnp.dtype(labels.dtype).name}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"cross_entropy: labels must have shape {logits.shape[:-1]} (the "
                         f"logits' without the class axis), got {labels.shape}")
    # log-sum-exp minus the labelled logit, picked by `take_along_axis`: its derivative
    # scatters into a zero-filled copy of the logits, which XLA fuses into the softmax's
    # gradient; picking it by a select against the class index costs a pass over the
    # window's largest array (benchmarks/NOTES.md, changes 29 and 32). A label outside
    # 0..C-1 picks NaN, so that the trainer's non-finite check stops the update.
    shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    log_sum_exp = jnp.log(jnp.sum(jnp.exp(logits - shift), axis=-1)) + shift[..., 0]
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1, mode="fill",
                                 fill_value=jnp.nan, wrap_negative_indices=False)
    return log_sum_exp - picked[..., 0]


@takes_class_ids
def nll(log_probs: Array, labels: Array) -> Array:
    """Negative log-likelihood of integer labels given log-probabilities (a log-softmax's
    output, as `nn.NLLLoss` takes): log_probs `[T, B, C]`, labels `[T, B]` -> `[T, B]`."""
    if log_probs.shape[:-1] != labels.shape:
        raise ValueError(f"nll: labels must have shape {log_probs.shape[:-1]} (the "
                         f"log-probabilities' without the class axis), got {labels.shape}")
    # As in `cross_entropy`: a gather whose fill makes a label outside 0..C-1 a NaN.
    picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1, mode="fill",
                                 fill_value=jnp.nan, wrap_negative_indices=False)
    return -picked[..., 0]
