"""A class id outside the model's classes is a clear error before anything trains.

A GRU scoring V = 3 classes is trained with TBPTT(2, 2) over 6 steps (3 updates) on class
ids with one bad id in update 1. Both trainers' one-call forms check the ids of a loss that
declares it takes them (`cross_entropy`, `nll`, or a user's loss through
`tbptt.takes_class_ids`) before the first update: a `ValueError` naming `ys`, the range, the
bad id and its place, with the parameters and the optimizer state as they were. Before the
check, JAX raised "non-finite loss" and torch raised torch's `IndexError` after update 0 was
applied. Terms a mask weighs 0 are not checked: their targets are never read.
"""

from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import tbptt
import tbptt_jax
import tbptt_torch
from tbptt_jax import losses as jax_losses
from tbptt_jax import models as jax_models
from tbptt_torch import losses as torch_losses
from tbptt_torch import models as torch_models

STEPS, BATCH, INPUT, HIDDEN, CLASSES, K1 = 6, 2, 2, 3, 3, 2
BAD_STEP, BAD_ROW = 3, 1  # in update 1, which owns steps [2, 4)
XS = np.random.default_rng(0).normal(size=(STEPS, BATCH, INPUT))
LABELS = np.random.default_rng(1).integers(0, CLASSES, size=(STEPS, BATCH))
JAX_MODEL = jax_models.gru(INPUT, HIDDEN, CLASSES)
JAX_OPTIMIZER = optax.adam(1e-2)

def torch_model() -> torch_models.GRUModel:
    torch.manual_seed(0)
    return torch_models.GRUModel(INPUT, HIDDEN, CLASSES).double()


def jax_log_softmax_apply(params, carry, xs):
    """The GRU's log-probabilities, for `nll`."""
    carry, scores = JAX_MODEL.apply(params, carry, xs)
    return carry, jax.nn.log_softmax(scores, axis=-1)


class LogSoftmaxGRU(torch_models.GRUModel):
    """The GRU's log-probabilities, for `nll`."""

    def forward(self, xs, carry=None):
        scores, carry = super().forward(xs, carry)
        return torch.log_softmax(scores, dim=-1), carry


def with_label(label: int) -> np.ndarray:
    labels = LABELS.copy()
    labels[BAD_STEP, BAD_ROW] = label
    return labels


def message(label: int) -> str:
    return re.escape(f"ys must be class ids in [0, {CLASSES}) (the classes the model "
                     f"predicts), got {label} at ys[{BAD_STEP}, {BAD_ROW}] (step t={BAD_STEP} "
                     f"of sequence b={BAD_ROW})")


def train_jax(labels, loss_fn, apply_fn=JAX_MODEL.apply, **kwargs):
    """`(params, opt_state)` before, and `tbptt_train_step`'s result on the given labels."""
    params = {name: jnp.asarray(p) for name, p in tbptt_torch.to_jax(torch_model()).items()}
    opt_state = JAX_OPTIMIZER.init(params)
    before = jax.tree.map(np.array, (params, opt_state))
    return before, lambda: tbptt_jax.tbptt_train_step(
        params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), jnp.asarray(XS),
        jnp.asarray(labels), apply_fn=apply_fn, loss_fn=loss_fn, optimizer=JAX_OPTIMIZER,
        k1=K1, **kwargs)


def torch_state(model, optimizer) -> dict:
    return copy.deepcopy({"params": model.state_dict(), "optimizer": optimizer.state_dict()})


def assert_same(actual, expected) -> None:
    actual, expected = jax.tree.map(np.asarray, actual), jax.tree.map(np.asarray, expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, e)


LOSSES = {"cross_entropy": (jax_losses.cross_entropy, torch_losses.cross_entropy, False),
          "nll": (jax_losses.nll, torch_losses.nll, True)}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("label", [-1, CLASSES, -100])
def test_jax_refuses_a_class_id_outside_the_classes_before_training(loss, label):
    jax_loss, _, log_softmax = LOSSES[loss]
    apply_fn = jax_log_softmax_apply if log_softmax else JAX_MODEL.apply
    before, train = train_jax(with_label(label), jax_loss, apply_fn)
    with pytest.raises(ValueError, match=message(label)):
        train()
    params, opt_state = before
    after = jax.tree.map(np.array, (params, opt_state))
    assert_same(after, before)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("label", [-1, CLASSES, -100])
def test_torch_refuses_a_class_id_outside_the_classes_before_any_update(loss, label):
    _, torch_loss, log_softmax = LOSSES[loss]
    torch.manual_seed(0)
    model = (LogSoftmaxGRU if log_softmax else torch_models.GRUModel)(
        INPUT, HIDDEN, CLASSES).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = torch_state(model, optimizer)
    with pytest.raises(ValueError, match=message(label)):
        tbptt_torch.tbptt_train_step(model, optimizer, None, torch.tensor(XS),
                                     torch.tensor(with_label(label)), loss_fn=torch_loss, k1=K1)
    after = torch_state(model, optimizer)
    assert after["optimizer"]["state"] == {}  # Adam never stepped
    assert_same(dict(after["params"]), dict(before["params"]))


def test_the_message_counts_the_other_bad_ids_in_both_frameworks():
    labels = with_label(7)
    labels[5, 0] = -2
    expected = message(7) + re.escape("; 1 more is outside it")
    with pytest.raises(ValueError, match=expected):
        train_jax(labels, jax_losses.cross_entropy)[1]()
    model = torch_model()
    with pytest.raises(ValueError, match=expected):
        tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                     torch.tensor(XS), torch.tensor(labels),
                                     loss_fn=torch_losses.cross_entropy, k1=K1)


def test_float_targets_for_a_class_id_loss_are_refused_in_both_frameworks():
    expected = re.escape("ys must be integer class ids for a loss_fn that takes class ids "
                         "(loss_fn.class_axis), got float64")
    with pytest.raises(ValueError, match=expected):
        train_jax(LABELS.astype(np.float64), jax_losses.cross_entropy)[1]()
    model = torch_model()
    with pytest.raises(ValueError, match=expected):
        tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                     torch.tensor(XS), torch.tensor(LABELS.astype(np.float64)),
                                     loss_fn=torch_losses.cross_entropy, k1=K1)


def test_a_users_loss_opts_in_and_masked_terms_are_not_checked():
    """A loss of one's own declares its targets class ids with `tbptt.takes_class_ids`: a
    bad id is then refused up front, as the library's losses' are; under a mask that
    weighs its term 0 the same data trains, to the same losses in both frameworks as with
    a 0 there (masked targets are never read)."""
    jax_loss = tbptt.takes_class_ids(lambda scores, labels: 2 * jax_losses.cross_entropy(
        scores, labels))
    torch_loss = tbptt.takes_class_ids(lambda scores, labels: 2 * torch_losses.cross_entropy(
        scores, labels))
    assert jax_loss.class_axis == torch_loss.class_axis == -1
    labels = with_label(-100)
    with pytest.raises(ValueError, match=message(-100)):
        train_jax(labels, jax_loss)[1]()
    model = torch_model()
    with pytest.raises(ValueError, match=message(-100)):
        tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                     torch.tensor(XS), torch.tensor(labels), loss_fn=torch_loss,
                                     k1=K1)

    mask = np.ones((STEPS, BATCH), bool)
    mask[BAD_STEP, BAD_ROW] = False
    masked = train_jax(labels, jax_loss, mask=jnp.asarray(mask))[1]()[3]["loss"]
    reference = train_jax(with_label(0), jax_loss, mask=jnp.asarray(mask))[1]()[3]["loss"]
    model = torch_model()
    _, torch_masked = tbptt_torch.tbptt_train_step(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), None, torch.tensor(XS),
        torch.tensor(labels), loss_fn=torch_loss, k1=K1, mask=torch.tensor(mask))
    assert np.all(np.isfinite(masked))
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(reference))
    np.testing.assert_allclose(torch_masked.numpy(), np.asarray(masked), rtol=1e-12)


def test_class_axis_must_name_an_axis_of_the_predictions():
    loss = tbptt.takes_class_ids(lambda scores, labels: jax_losses.cross_entropy(
        scores, labels), class_axis=3)
    with pytest.raises(ValueError, match=re.escape(
            "loss_fn.class_axis must be an axis of the model's predictions, of shape "
            f"(1, {BATCH}, {CLASSES}), got 3")):
        train_jax(LABELS, loss)[1]()
    with pytest.raises(ValueError, match=re.escape(
            "class_axis must be an int (an axis of the predictions), got 'last'")):
        tbptt.takes_class_ids(lambda scores, labels: scores, class_axis="last")
