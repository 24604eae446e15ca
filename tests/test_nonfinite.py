"""A non-finite loss never silently corrupts parameters (SPEC §4), in both trainers.

A NaN or inf is put into the targets (or the inputs) of one known update of a GRU trained
with TBPTT(2, 2) over 6 steps, so 3 updates. By default both trainers raise their
`NonFiniteLossError` (a `FloatingPointError`) naming that update: JAX applies nothing of the
call, torch keeps the updates before it. With `on_nonfinite="skip"` exactly that update is
skipped: parameters, optimizer state and carry equal those of a run that trains the steps
before it, only advances the carry over it, and trains the steps after it; JAX marks it in
`metrics["skipped"]`, torch with a non-finite loss, and the two frameworks agree.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import tbptt_jax
import tbptt_torch
from tbptt_jax import losses as jax_losses
from tbptt_jax import models as jax_models
from tbptt_torch import losses as torch_losses
from tbptt_torch import models as torch_models

STEPS, BATCH, INPUT, HIDDEN, OUTPUT, K1 = 6, 2, 2, 3, 1, 2
BAD_STEP, BAD_UPDATE = 3, 1  # step 3 lies in update 1, which owns steps [2, 4)
XS = np.random.default_rng(0).normal(size=(STEPS, BATCH, INPUT))
YS = np.random.default_rng(1).normal(size=(STEPS, BATCH, OUTPUT))
JAX_MODEL = jax_models.gru(INPUT, HIDDEN, OUTPUT)
JAX_OPTIMIZER = optax.adam(1e-2)  # one object: a new one would be a new static argument
SAME = {"rtol": 1e-12, "atol": 1e-14}
PARITY = {"rtol": 1e-10, "atol": 1e-12}


def torch_gru() -> tuple[torch_models.GRUModel, torch.optim.Adam]:
    torch.manual_seed(0)
    model = torch_models.GRUModel(INPUT, HIDDEN, OUTPUT).double()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def jax_start() -> tuple[dict, optax.OptState]:
    params = {name: jnp.asarray(p) for name, p in tbptt_torch.to_jax(torch_gru()[0]).items()}
    return params, JAX_OPTIMIZER.init(params)


def jax_step(params, opt_state, carry, xs, ys, **kwargs):
    kwargs = {"loss_fn": jax_losses.mse, "k1": K1, **kwargs}
    return tbptt_jax.tbptt_train_step(
        params, opt_state, carry, jnp.asarray(xs), jnp.asarray(ys), apply_fn=JAX_MODEL.apply,
        optimizer=JAX_OPTIMIZER, **kwargs)


def torch_step(model, optimizer, carry, xs, ys, **kwargs):
    kwargs = {"loss_fn": torch_losses.mse, "k1": K1, **kwargs}
    return tbptt_torch.tbptt_train_step(model, optimizer, carry, torch.tensor(xs),
                                        torch.tensor(ys), **kwargs)


def with_value(array: np.ndarray, step: int, value: float) -> np.ndarray:
    array = array.copy()
    array[step, 0, 0] = value
    return array


def assert_trees_close(actual, expected, **tolerance) -> None:
    actual, expected = jax.tree.map(np.asarray, actual), jax.tree.map(np.asarray, expected)
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **tolerance)


def torch_state(model, optimizer) -> tuple[dict, dict]:
    """The model's weights and Adam's (step, moments) per parameter name, as numpy."""
    names = [name for name, _ in model.named_parameters()]
    moments = {name: {key: np.asarray(value) for key, value in optimizer.state[p].items()}
               for name, p in zip(names, model.parameters(), strict=True)}
    return {name: t.numpy().copy() for name, t in model.state_dict().items()}, moments


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_jax_raises_by_default_naming_the_update_and_applies_nothing(value):
    params, opt_state = jax_start()
    before = jax.tree.map(np.array, (params, opt_state))
    assert issubclass(tbptt_jax.NonFiniteLossError, FloatingPointError)
    with pytest.raises(tbptt_jax.NonFiniteLossError, match=re.escape(
            f"update {BAD_UPDATE} of this call (counting from 0) has a non-finite loss ({value}); "
            "nothing of this call was applied, the params passed in are unchanged. Pass "
            "on_nonfinite='skip' to skip such updates instead.")):
        jax_step(params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), XS,
                 with_value(YS, BAD_STEP, value))
    assert_trees_close((params, opt_state), before, rtol=0, atol=0)


@pytest.mark.parametrize("label", [-1, OUTPUT])
def test_jax_raises_on_a_label_outside_the_classes_and_applies_nothing(label):
    # The model's OUTPUT classes are 0..OUTPUT-1: a label outside them makes that term's
    # cross-entropy NaN (tbptt_jax.losses.cross_entropy), which stops the call.
    params, opt_state = jax_start()
    before = jax.tree.map(np.array, (params, opt_state))
    labels = np.zeros((STEPS, BATCH), np.int32)
    labels[BAD_STEP, 0] = label
    with pytest.raises(tbptt_jax.NonFiniteLossError, match=re.escape(
            f"update {BAD_UPDATE} of this call (counting from 0) has a non-finite loss (nan)")):
        jax_step(params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), XS, labels,
                 loss_fn=jax_losses.cross_entropy)
    assert_trees_close((params, opt_state), before, rtol=0, atol=0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_torch_raises_by_default_keeping_the_updates_before_it(value):
    model, optimizer = torch_gru()
    assert issubclass(tbptt_torch.NonFiniteLossError, FloatingPointError)
    with pytest.raises(tbptt_torch.NonFiniteLossError, match=re.escape(
            f"update {BAD_UPDATE} of this call (counting from 0) has a non-finite loss ({value}); "
            "it was not applied (the updates before it were). Pass on_nonfinite='skip' to "
            "skip such updates instead.")):
        torch_step(model, optimizer, None, XS, with_value(YS, BAD_STEP, value))
    # Exactly update 0 was applied: a twin trained on update 0's steps alone is identical.
    twin, twin_optimizer = torch_gru()
    torch_step(twin, twin_optimizer, None, XS[:K1], YS[:K1])
    weights, moments = torch_state(model, optimizer)
    twin_weights, twin_moments = torch_state(twin, twin_optimizer)
    assert {int(m["step"]) for m in moments.values()} == {1}
    assert_trees_close((weights, moments), (twin_weights, twin_moments), rtol=0, atol=0)


def jax_reference_without_update_1(params, opt_state):
    """Trains update 0, runs the model over update 1's steps only to move the carry, then
    trains update 2: what skipping update 1 must amount to (k1 = k2, so no overlap)."""
    carry = JAX_MODEL.initial_carry(BATCH, jnp.float64)
    params, opt_state, carry, first = jax_step(params, opt_state, carry, XS[:2], YS[:2])
    carry, _ = JAX_MODEL.apply(params, carry, jnp.asarray(XS[2:4]))
    params, opt_state, carry, last = jax_step(params, opt_state, carry, XS[4:], YS[4:])
    return params, opt_state, carry, np.concatenate([first["loss"], last["loss"]])


def torch_reference_without_update_1():
    model, optimizer = torch_gru()
    carry, first = torch_step(model, optimizer, None, XS[:2], YS[:2])
    with torch.no_grad():
        _, carry = model(torch.tensor(XS[2:4]), carry)
    carry, last = torch_step(model, optimizer, carry, XS[4:], YS[4:])
    return model, optimizer, carry, torch.cat([first, last]).numpy()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_skip_skips_exactly_that_update_in_both_frameworks(value):
    ys = with_value(YS, BAD_STEP, value)

    params, opt_state = jax_start()
    new_params, new_opt_state, carry, metrics = jax_step(
        params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), XS, ys,
        on_nonfinite="skip")
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), [False, True, False])
    losses = np.asarray(metrics["loss"])
    assert not np.isfinite(losses[BAD_UPDATE]) and np.all(np.isfinite(losses[[0, 2]]))
    assert int(new_opt_state[0].count) == 2  # Adam's bias correction counts real updates
    ref_params, ref_opt_state, ref_carry, ref_losses = jax_reference_without_update_1(
        params, opt_state)
    assert_trees_close((new_params, new_opt_state, carry),
                       (ref_params, ref_opt_state, ref_carry), **SAME)
    np.testing.assert_allclose(losses[[0, 2]], ref_losses, **SAME)

    model, optimizer = torch_gru()
    torch_carry, torch_losses_out = torch_step(model, optimizer, None, XS, ys,
                                               on_nonfinite="skip")
    torch_losses_out = torch_losses_out.numpy()
    np.testing.assert_array_equal(np.isfinite(torch_losses_out), [True, False, True])
    twin, twin_optimizer, twin_carry, twin_losses = torch_reference_without_update_1()
    weights, moments = torch_state(model, optimizer)
    assert {int(m["step"]) for m in moments.values()} == {2}
    assert_trees_close((weights, moments), torch_state(twin, twin_optimizer), **SAME)
    assert_trees_close(torch_carry.numpy(), twin_carry.numpy(), **SAME)
    np.testing.assert_allclose(torch_losses_out[[0, 2]], twin_losses, **SAME)

    # The frameworks agree on the marks, the losses, the weights, Adam's moments, the carry.
    np.testing.assert_array_equal(np.isfinite(torch_losses_out), ~np.asarray(metrics["skipped"]))
    np.testing.assert_allclose(torch_losses_out[[0, 2]], losses[[0, 2]], **PARITY)
    assert_trees_close(weights, new_params, **PARITY)
    adam = new_opt_state[0]
    assert_trees_close({name: m["exp_avg"] for name, m in moments.items()}, adam.mu, **PARITY)
    assert_trees_close({name: m["exp_avg_sq"] for name, m in moments.items()}, adam.nu,
                       **PARITY)
    np.testing.assert_allclose(torch_carry.numpy(), np.asarray(carry), **PARITY)


@pytest.mark.parametrize("reset_after", [False, True])
def test_a_nan_input_poisons_the_carry_until_a_reset_in_both_frameworks(reset_after):
    """A NaN input at step 3 of sequence 0 makes update 1 non-finite, and through the carry
    every later update too, unless sequence 0 restarts at step 4 (SPEC §1 resets)."""
    xs = with_value(XS, BAD_STEP, np.nan)
    resets = np.zeros((STEPS, BATCH), bool)
    resets[BAD_STEP + 1, 0] = reset_after
    expected_skipped = [False, True, not reset_after]
    second_update = r"^update 1 of this call \(counting from 0\)"

    params, opt_state = jax_start()
    carry = JAX_MODEL.initial_carry(BATCH, jnp.float64)
    with pytest.raises(tbptt_jax.NonFiniteLossError, match=second_update):
        jax_step(params, opt_state, carry, xs, YS, resets=jnp.asarray(resets))
    new_params, _, _, metrics = jax_step(params, opt_state, carry, xs, YS,
                                         resets=jnp.asarray(resets), on_nonfinite="skip")
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), expected_skipped)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in new_params.values())

    model, optimizer = torch_gru()
    with pytest.raises(tbptt_torch.NonFiniteLossError, match=second_update):
        torch_step(model, optimizer, None, xs, YS, resets=torch.tensor(resets))
    model, optimizer = torch_gru()
    _, losses = torch_step(model, optimizer, None, xs, YS, resets=torch.tensor(resets),
                           on_nonfinite="skip")
    np.testing.assert_array_equal(~np.isfinite(losses.numpy()), expected_skipped)
    weights, _ = torch_state(model, optimizer)
    assert_trees_close(weights, new_params, **PARITY)
    np.testing.assert_allclose(losses.numpy()[0], np.asarray(metrics["loss"])[0], **PARITY)


def jax_loss_with_nan_gradient(preds, targets):
    """mse plus sqrt(|0 * preds|): adds 0 to the loss, but its gradient is 0 * inf = NaN."""
    return jax_losses.mse(preds, targets) + jnp.sqrt(jnp.abs(0.0 * preds[..., 0]))


def torch_loss_with_nan_gradient(preds, targets):
    return torch_losses.mse(preds, targets) + torch.sqrt(torch.abs(0.0 * preds[..., 0]))


def test_a_finite_loss_with_a_non_finite_gradient_is_not_applied_either():
    params, opt_state = jax_start()
    carry = JAX_MODEL.initial_carry(BATCH, jnp.float64)
    kwargs = {"apply_fn": JAX_MODEL.apply, "loss_fn": jax_loss_with_nan_gradient,
              "optimizer": JAX_OPTIMIZER, "k1": K1}
    cause = (r"^update 0 of this call \(counting from 0\) has a non-finite gradient "
             r"\(its loss, [0-9.e-]+, is finite\)")
    with pytest.raises(tbptt_jax.NonFiniteLossError, match=cause):
        tbptt_jax.tbptt_train_step(params, opt_state, carry, XS, YS, **kwargs)
    new_params, new_opt_state, _, metrics = tbptt_jax.tbptt_train_step(
        params, opt_state, carry, XS, YS, on_nonfinite="skip", **kwargs)
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), [True, True, True])
    assert_trees_close((new_params, new_opt_state), (params, opt_state), rtol=0, atol=0)

    model, optimizer = torch_gru()
    before = torch_state(model, optimizer)
    with pytest.raises(tbptt_torch.NonFiniteLossError, match=cause):
        torch_step(model, optimizer, None, XS, YS, loss_fn=torch_loss_with_nan_gradient)
    _, losses = torch_step(model, optimizer, None, XS, YS, loss_fn=torch_loss_with_nan_gradient,
                           on_nonfinite="skip")
    # torch marks a skipped update by a NaN loss, its finite loss notwithstanding.
    assert losses.shape == (3,) and bool(torch.isnan(losses).all())
    assert_trees_close(torch_state(model, optimizer), before, rtol=0, atol=0)
