"""Per-term losses `[T, B]`: `tbptt_jax.losses` against `tbptt_torch.losses` and torch.nn.

Each framework's `mse`, `cross_entropy` and `nll` must give the same per-term losses, term
by term those of `nn.CrossEntropyLoss` / `nn.NLLLoss` with `reduction="none"`, and their
mean must be `nn.MSELoss()` / `nn.CrossEntropyLoss()` (what Ignite's trainer computes);
their sum with one feature is the hand loop's summed squared error (SPEC §0). Mismatched
shapes raise a `ValueError` stating both shapes.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from tbptt_jax import losses as jax_losses
from tbptt_torch import losses as torch_losses

EXACT = {"rtol": 1e-12, "atol": 1e-14}


@pytest.mark.parametrize("shape", [(5, 3), (5, 3, 1), (5, 3, 4), (5, 3, 2, 3)])
def test_mse_matches_across_frameworks_and_nn_mse_loss(shape):
    rng = np.random.default_rng(0)
    preds, targets = rng.normal(size=shape), rng.normal(size=shape)
    expected = ((preds - targets) ** 2).reshape(5, 3, -1).mean(axis=-1)

    jax_terms = np.asarray(jax_losses.mse(jnp.asarray(preds), jnp.asarray(targets)))
    torch_terms = torch_losses.mse(torch.tensor(preds), torch.tensor(targets)).numpy()
    assert jax_terms.shape == torch_terms.shape == (5, 3)
    np.testing.assert_allclose(jax_terms, expected, **EXACT)
    np.testing.assert_allclose(torch_terms, expected, **EXACT)

    reference = nn.MSELoss()(torch.tensor(preds), torch.tensor(targets)).item()
    np.testing.assert_allclose(jax_terms.mean(), reference, **EXACT)
    np.testing.assert_allclose(torch_terms.mean(), reference, **EXACT)


def test_mse_summed_with_one_feature_is_the_hand_loops_squared_error():
    rng = np.random.default_rng(1)
    preds, targets = rng.normal(size=(4, 2, 1)), rng.normal(size=(4, 2, 1))
    hand_loop = sum(float(((preds[i] - targets[i]) ** 2).sum()) for i in range(4))
    jax_sum = float(jnp.sum(jax_losses.mse(jnp.asarray(preds), jnp.asarray(targets))))
    torch_sum = float(torch_losses.mse(torch.tensor(preds), torch.tensor(targets)).sum())
    np.testing.assert_allclose([jax_sum, torch_sum], [hand_loop, hand_loop], **EXACT)


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
def test_cross_entropy_matches_across_frameworks_and_nn_cross_entropy_loss(label_dtype):
    rng = np.random.default_rng(2)
    logits = 3 * rng.normal(size=(6, 4, 5))
    labels = rng.integers(0, 5, size=(6, 4)).astype(label_dtype)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    expected = -np.take_along_axis(log_probs, labels[..., None].astype(np.int64), -1)[..., 0]

    jax_terms = np.asarray(jax_losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    torch_terms = torch_losses.cross_entropy(torch.tensor(logits), torch.tensor(labels)).numpy()
    assert jax_terms.shape == torch_terms.shape == (6, 4)
    np.testing.assert_allclose(jax_terms, expected, **EXACT)
    np.testing.assert_allclose(torch_terms, expected, **EXACT)

    reference = nn.CrossEntropyLoss()(torch.tensor(logits).reshape(-1, 5),
                                      torch.tensor(labels).reshape(-1).long()).item()
    np.testing.assert_allclose(jax_terms.mean(), reference, **EXACT)
    np.testing.assert_allclose(torch_terms.mean(), reference, **EXACT)


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
def test_token_losses_equal_torchs_nn_losses_term_by_term_in_both_frameworks(label_dtype):
    """float64: `cross_entropy` of logits is `nn.CrossEntropyLoss(reduction="none")`, `nll`
    of log-probabilities `nn.NLLLoss(reduction="none")`, each `[T, B]` term, and the JAX
    twins equal the torch ones."""
    rng = np.random.default_rng(4)
    logits = 3 * rng.normal(size=(7, 3, 6))
    labels = rng.integers(0, 6, size=(7, 3)).astype(label_dtype)
    log_probs = torch.log_softmax(torch.tensor(logits), dim=-1)
    flat_labels = torch.tensor(labels).reshape(-1).long()
    expected_ce = nn.CrossEntropyLoss(reduction="none")(
        torch.tensor(logits).reshape(-1, 6), flat_labels).reshape(7, 3).numpy()
    expected_nll = nn.NLLLoss(reduction="none")(log_probs.reshape(-1, 6), flat_labels
                                                 ).reshape(7, 3).numpy()

    for name, inputs, expected in (("cross_entropy", logits, expected_ce),
                                   ("nll", log_probs.numpy(), expected_nll)):
        jax_terms = np.asarray(getattr(jax_losses, name)(jnp.asarray(inputs),
                                                          jnp.asarray(labels)))
        torch_terms = getattr(torch_losses, name)(torch.tensor(inputs),
                                                  torch.tensor(labels)).numpy()
        assert jax_terms.shape == torch_terms.shape == (7, 3)
        np.testing.assert_allclose(torch_terms, expected, **EXACT)
        np.testing.assert_allclose(jax_terms, expected, **EXACT)
        np.testing.assert_allclose(jax_terms, torch_terms, **EXACT)
    np.testing.assert_allclose(expected_nll, expected_ce, **EXACT)


def test_nll_gradient_is_minus_the_weighted_one_hot_in_both_frameworks():
    rng = np.random.default_rng(5)
    log_probs = rng.normal(size=(4, 3, 5))
    labels = rng.integers(0, 5, size=(4, 3))
    weights = rng.normal(size=(4, 3))
    expected = -weights[..., None] * np.eye(5)[labels]
    jax_grad = jax.grad(lambda z: jnp.sum(jnp.asarray(weights) * jax_losses.nll(
        z, jnp.asarray(labels))))(jnp.asarray(log_probs))
    torch_log_probs = torch.tensor(log_probs, requires_grad=True)
    (torch.tensor(weights) * torch_losses.nll(torch_log_probs, torch.tensor(labels))
     ).sum().backward()
    np.testing.assert_allclose(np.asarray(jax_grad), expected, **EXACT)
    np.testing.assert_allclose(torch_log_probs.grad.numpy(), expected, **EXACT)


def test_cross_entropy_gradient_is_softmax_minus_one_hot_in_both_frameworks():
    """However the JAX loss picks the label's logit (a gather with a NaN fill for labels
    outside the classes), its gradient must be exactly softmax minus the one-hot label,
    weighted, as torch's."""
    rng = np.random.default_rng(3)
    logits = 3 * rng.normal(size=(6, 4, 5))
    labels = rng.integers(0, 5, size=(6, 4))
    weights = rng.normal(size=(6, 4))
    softmax = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    expected = weights[..., None] * (softmax - np.eye(5)[labels])

    jax_grad = jax.grad(lambda z: jnp.sum(jnp.asarray(weights) * jax_losses.cross_entropy(
        z, jnp.asarray(labels))))(jnp.asarray(logits))
    torch_logits = torch.tensor(logits, requires_grad=True)
    (torch.tensor(weights) * torch_losses.cross_entropy(torch_logits, torch.tensor(labels))
     ).sum().backward()
    np.testing.assert_allclose(np.asarray(jax_grad), expected, **EXACT)
    np.testing.assert_allclose(torch_logits.grad.numpy(), expected, **EXACT)


def test_cross_entropy_is_stable_for_large_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0]]])
    labels = np.array([[1]])
    jax_terms = np.asarray(jax_losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    torch_terms = torch_losses.cross_entropy(torch.tensor(logits), torch.tensor(labels)).numpy()
    np.testing.assert_allclose(jax_terms, [[1000.0]], **EXACT)
    np.testing.assert_allclose(torch_terms, [[1000.0]], **EXACT)


@pytest.mark.parametrize("label", [-1, 3])
def test_cross_entropy_of_a_label_outside_the_classes_is_nan_in_jax_and_an_error_in_torch(
        label):
    # JAX cannot raise from inside a compiled step: its loss is NaN, which the trainer's
    # non-finite check turns into an error before any parameter changes (test_nonfinite.py).
    logits = np.zeros((1, 2, 3))
    labels = np.array([[0, label]])
    jax_terms = np.asarray(jax_losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(jax_terms[0, 0], np.log(3.0), **EXACT)
    assert np.isnan(jax_terms[0, 1])
    with pytest.raises(IndexError, match="out of bounds"):
        torch_losses.cross_entropy(torch.tensor(logits), torch.tensor(labels))


@pytest.mark.parametrize("label", [-1, 3])
def test_nll_of_a_label_outside_the_classes_is_nan_in_jax_and_an_error_in_torch(label):
    # As cross_entropy: the trainers' one-call forms refuse such labels before they train
    # (test_class_ids.py); this is the loss on its own.
    log_probs = np.full((1, 2, 3), np.log(1 / 3))
    labels = np.array([[0, label]])
    jax_terms = np.asarray(jax_losses.nll(jnp.asarray(log_probs), jnp.asarray(labels)))
    np.testing.assert_allclose(jax_terms[0, 0], np.log(3.0), **EXACT)
    assert np.isnan(jax_terms[0, 1])
    with pytest.raises(IndexError, match="out of bounds"):
        torch_losses.nll(torch.tensor(log_probs), torch.tensor(labels))


def test_the_token_losses_declare_their_class_axis():
    assert {loss.class_axis for loss in (jax_losses.cross_entropy, jax_losses.nll,
                                         torch_losses.cross_entropy, torch_losses.nll)} == {-1}
    assert not hasattr(jax_losses.mse, "class_axis")
    assert not hasattr(torch_losses.mse, "class_axis")


def test_mse_rejects_mismatched_shapes_in_both_frameworks():
    message = re.escape("mse: preds and targets must have one shape, got (5, 3, 2) and (5, 3, 1)")
    with pytest.raises(ValueError, match=message):
        jax_losses.mse(jnp.zeros((5, 3, 2)), jnp.zeros((5, 3, 1)))
    with pytest.raises(ValueError, match=message):
        torch_losses.mse(torch.zeros(5, 3, 2), torch.zeros(5, 3, 1))


@pytest.mark.parametrize("labels_shape", [(5, 3, 4), (5, 2), (5, 3, 1)])
def test_cross_entropy_rejects_labels_not_shaped_as_the_logits_without_classes(labels_shape):
    message = re.escape("cross_entropy: labels must have shape (5, 3) (the logits' without "
                        f"the class axis), got {labels_shape}")
    with pytest.raises(ValueError, match=message):
        jax_losses.cross_entropy(jnp.zeros((5, 3, 4)), jnp.zeros(labels_shape, jnp.int32))
    with pytest.raises(ValueError, match=message):
        torch_losses.cross_entropy(torch.zeros(5, 3, 4), torch.zeros(labels_shape).long())
    message = re.escape("nll: labels must have shape (5, 3) (the log-probabilities' without "
                        f"the class axis), got {labels_shape}")
    with pytest.raises(ValueError, match=message):
        jax_losses.nll(jnp.zeros((5, 3, 4)), jnp.zeros(labels_shape, jnp.int32))
    with pytest.raises(ValueError, match=message):
        torch_losses.nll(torch.zeros(5, 3, 4), torch.zeros(labels_shape).long())
