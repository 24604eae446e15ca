"""A non-finite loss never silently corrupts parameters (SPEC §4), in both trainers.

A NaN or inf is put into the targets (or the inputs) of one known update of a GRU trained
with TBPTT(2, 2) over 6 steps, so 3 updates. By default both trainers raise their
`NonFiniteLossError` (a `FloatingPointError`) naming that update: JAX applies nothing of the
call, torch keeps the updates before it. With `on_nonfinite="skip"` exactly that update is
skipped: parameters, optimizer state and carry equal those of a run that trains the steps
before it, only advances the carry over it, and trains the steps after it; JAX marks it in
`metrics["skipped"]`, torch with a non-finite loss, and the two frameworks agree.

Two guarantees go further. A non-finite value in *dead* steps (those a later reset of their
sequence cuts off from every loss term still to be counted: a finished episode in an
update's overlap, masked-out padding before a reset) changes nothing at all: losses,
gradients, parameters, optimizer state and the carry handed on are those of the same data
with a finite value there, to the last bit, in the forward and the backward pass. And an
update whose step would leave the parameters or the optimizer state non-finite (float16
Adam) is not applied either.
"""

from __future__ import annotations

import copy
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import tbptt_jax
import tbptt_torch
from tbptt.stream import NONFINITE
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
    moments = {name: {key: value.numpy().copy() for key, value in optimizer.state[p].items()}
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
def test_a_compiled_step_skips_the_update_of_a_label_outside_the_classes(label):
    # `trainer.step` runs compiled and cannot raise: a label outside the model's OUTPUT
    # classes makes its cross-entropy term NaN (tbptt_jax.losses.cross_entropy), so its
    # update is skipped for its loss. tbptt_train_step refuses such labels before it
    # trains (tests/test_class_ids.py).
    params, _ = jax_start()
    labels = np.zeros((STEPS, BATCH), np.int32)
    labels[BAD_STEP, 0] = label
    configured = tbptt_jax.trainer(JAX_MODEL.apply, jax_losses.cross_entropy, JAX_OPTIMIZER,
                                   k1=K1)
    state = configured.init(params, XS)
    new_state, metrics = configured.step(state, jnp.asarray(XS), jnp.asarray(labels))
    assert np.asarray(metrics["skipped"]).tolist() == [False, True, False]
    assert [NONFINITE[code - 1] if code else None for code in np.asarray(
        metrics["nonfinite"]).tolist()] == [None, "loss", None]
    assert np.isnan(metrics["loss"][BAD_UPDATE]) and np.isfinite(metrics["loss"][0])
    assert int(new_state.opt_state[0].count) == 2  # Adam stepped for updates 0 and 2 only


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


# Dead steps ---------------------------------------------------------------------------------

def dead_step_case() -> tuple[np.ndarray, np.ndarray]:
    """Resets and mask for sequence 0 of XS: it is reset at steps 2 and 5 and its loss terms
    at steps 0-1 and 3-4 weigh nothing, so those steps can reach no counted term: they are
    dead. Sequence 1 runs on, unmasked."""
    resets = np.zeros((STEPS, BATCH), bool)
    resets[[2, 5], 0] = True
    mask = np.ones((STEPS, BATCH))
    mask[[0, 1, 3, 4], 0] = 0.0
    return resets, mask


def model_state(carry):
    """The model's state a call hands on (an OverlapCarry also holds the caller's inputs of
    the overlap, NaN and all, for the next call to recompute)."""
    return carry.state if isinstance(carry, tbptt_jax.OverlapCarry) else carry


def run_jax_traced(xs, resets, mask, k2):
    params, opt_state = jax_start()
    new_params, new_opt_state, carry, metrics = jax_step(
        params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), xs, YS, k2=k2,
        resets=jnp.asarray(resets), mask=jnp.asarray(mask), on_nonfinite="skip", trace=True)
    return jax.tree.map(np.asarray, (metrics["loss"], metrics["grads"], new_params,
                                     new_opt_state, model_state(carry)))


def run_torch_traced(xs, resets, mask, k2):
    model, optimizer = torch_gru()
    grads = []

    def record(index, loss, model):
        grads.append({name: p.grad.numpy().copy() for name, p in model.named_parameters()})

    carry, losses = torch_step(model, optimizer, None, xs, YS, k2=k2, resets=resets, mask=mask,
                               on_nonfinite="skip", on_update=record)
    to_numpy = partial(jax.tree.map, lambda t: t.detach().numpy().copy())
    return (losses.numpy(), grads, torch_state(model, optimizer),
            to_numpy(model_state(carry), is_leaf=lambda t: isinstance(t, torch.Tensor)))


@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("k2", [K1, K1 + 3])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_input_in_dead_steps_changes_nothing(framework, k2, value):
    """NaN or inf in the dead steps 0 and 3 of sequence 0 gives the run of finite inputs
    there, bit for bit: every loss and gradient finite, nothing skipped, the same model
    state handed on (with k2 = 5 the call's last window reaches back over both)."""
    resets, mask = dead_step_case()
    run = run_jax_traced if framework == "jax" else run_torch_traced
    poisoned = with_value(with_value(XS, 0, value), 3, value)
    finite = with_value(with_value(XS, 0, 123.0), 3, -7.0)
    got, expected = run(poisoned, resets, mask, k2), run(finite, resets, mask, k2)
    assert np.all(np.isfinite(got[0]))
    assert_trees_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_initial_carry_of_a_sequence_reset_before_its_first_counted_term(value):
    """The carry a caller passes in for sequence 0, cut off by the reset at step 2 before
    any counted term, matters as little as a dead input."""
    resets, mask = dead_step_case()
    carry = np.zeros((1, BATCH, HIDDEN))

    def jax_run(carry):
        params, opt_state = jax_start()
        out = jax_step(params, opt_state, jnp.asarray(carry), XS, YS, resets=jnp.asarray(resets),
                       mask=jnp.asarray(mask), on_nonfinite="skip")
        return jax.tree.map(np.asarray, out)

    def torch_run(carry):
        model, optimizer = torch_gru()
        out, losses = torch_step(model, optimizer, torch.tensor(carry), XS, YS, resets=resets,
                                 mask=mask, on_nonfinite="skip")
        return losses.numpy(), out.numpy(), torch_state(model, optimizer)

    poisoned = carry.copy()
    poisoned[0, 0, 1] = value
    for run in (jax_run, torch_run):
        assert_trees_close(run(poisoned), run(carry), rtol=0, atol=0)


def test_a_nan_in_a_finished_episode_in_the_overlap_does_not_reach_the_next_gradient():
    """The issue's case: k1 = 2, k2 = 4, NaN in xs[0] of sequence 0, which is reset at step
    2. Update 0 owns step 0, so its loss is NaN and it is skipped; update 1's window starts
    at step 0, but steps 0-1 of sequence 0 are dead to it: its loss and gradient are finite
    and it is applied (before, backpropagating through them made its gradient 0 x NaN)."""
    xs = with_value(XS, 0, np.nan)
    resets = np.zeros((STEPS, BATCH), bool)
    resets[2, 0] = True
    params, opt_state = jax_start()
    new_params, _, _, metrics = jax_step(
        params, opt_state, JAX_MODEL.initial_carry(BATCH, jnp.float64), xs, YS, k2=4,
        resets=jnp.asarray(resets), on_nonfinite="skip")
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), [True, False, False])
    model, optimizer = torch_gru()
    _, losses = torch_step(model, optimizer, None, xs, YS, k2=4, resets=resets,
                           on_nonfinite="skip")
    np.testing.assert_array_equal(np.isfinite(losses.numpy()), [False, True, True])
    np.testing.assert_allclose(losses.numpy()[1:], np.asarray(metrics["loss"])[1:], **PARITY)
    assert_trees_close(torch_state(model, optimizer)[0], new_params, **PARITY)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in new_params.values())


# Steps whose result is not finite -----------------------------------------------------------

FP16 = {"steps": 40, "batch": 4, "inputs": 3, "hidden": 8, "outputs": 2, "k1": 10}


def fp16_data():
    rng = np.random.default_rng(0)
    shape = (FP16["steps"], FP16["batch"])
    return (rng.normal(size=(*shape, FP16["inputs"])).astype(np.float16),
            rng.normal(size=(*shape, FP16["outputs"])).astype(np.float16))


def test_jax_does_not_apply_a_step_that_makes_float16_adam_non_finite():
    """The issue's case: a float16 LSTM with Adam(1e-3). Every update's loss and gradient
    are finite, but Adam's float16 second moment underflows to 0 and its step divides by
    it: the parameters would turn NaN. No such step is applied; "raise" names the cause."""
    model = jax_models.lstm(FP16["inputs"], FP16["hidden"], FP16["outputs"])
    params = model.init(jax.random.key(0), jnp.float16)
    optimizer = optax.adam(1e-3)
    xs, ys = fp16_data()
    kwargs = {"apply_fn": model.apply, "loss_fn": jax_losses.mse, "optimizer": optimizer,
              "k1": FP16["k1"]}
    with pytest.raises(tbptt_jax.NonFiniteLossError, match=re.escape(
            "update 0 of this call (counting from 0) has a step that made the parameters or "
            "the optimizer state non-finite (its loss, ")):
        tbptt_jax.tbptt_train_step(params, optimizer.init(params), None, xs, ys, **kwargs)
    new_params, new_opt_state, _, metrics = tbptt_jax.tbptt_train_step(
        params, optimizer.init(params), None, xs, ys, on_nonfinite="skip", **kwargs)
    assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    np.testing.assert_array_equal(np.asarray(metrics["skipped"]), [True] * 4)
    np.testing.assert_array_equal(np.asarray(metrics["nonfinite"]), [3] * 4)  # "step"
    assert_trees_close((new_params, new_opt_state), (params, optimizer.init(params)),
                       rtol=0, atol=0)


def torch_fp16_lstm():
    torch.manual_seed(0)
    model = torch_models.LSTMModel(FP16["inputs"], FP16["hidden"], FP16["outputs"]).half()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def test_torch_undoes_a_step_that_makes_float16_adam_non_finite():
    """The same case in torch, which steps in place: the trainer keeps a copy from before
    each step and restores it, moments and step count included."""
    xs, ys = fp16_data()
    kwargs = {"loss_fn": torch_losses.mse, "k1": FP16["k1"]}
    model, optimizer = torch_fp16_lstm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(tbptt_torch.NonFiniteLossError, match=re.escape(
            "update 0 of this call (counting from 0) has a step that made the parameters or "
            "the optimizer state non-finite (its loss, ")):
        tbptt_torch.tbptt_train_step(model, optimizer, None, xs, ys, **kwargs)
    assert optimizer.state == {}  # the first step made Adam's state: it is gone again
    model, optimizer = torch_fp16_lstm()
    _, losses = tbptt_torch.tbptt_train_step(model, optimizer, None, xs, ys,
                                             on_nonfinite="skip", **kwargs)
    assert bool(torch.isnan(losses).all())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)
    assert optimizer.state == {}


def test_torch_without_a_copy_raises_on_a_non_finite_step_saying_it_was_applied():
    xs, ys = fp16_data()
    model, optimizer = torch_fp16_lstm()
    with pytest.raises(tbptt_torch.NonFiniteLossError, match=re.escape(
            "; it was applied, as were the updates before it: with undo_nonfinite_steps=False "
            "no copy is kept to undo such a step with.")):
        tbptt_torch.tbptt_train_step(model, optimizer, None, xs, ys, loss_fn=torch_losses.mse,
                                     k1=FP16["k1"], on_nonfinite="skip",
                                     undo_nonfinite_steps=False)
    assert not all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_an_infinite_step_is_undone_with_the_state_the_optimizer_had(on_nonfinite):
    """SGD with momentum and an infinite learning rate, from a state made by a finite first
    call: the second call's steps would be infinite. Each is undone to the last bit, the
    momentum buffers included, in both frameworks."""
    model, _ = torch_gru()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch_step(model, optimizer, None, XS, YS)
    before = torch_state(model, optimizer)
    optimizer.param_groups[0]["lr"] = float("inf")
    if on_nonfinite == "raise":
        with pytest.raises(tbptt_torch.NonFiniteLossError, match="has a step that made"):
            torch_step(model, optimizer, None, XS, YS)
    else:
        _, losses = torch_step(model, optimizer, None, XS, YS, on_nonfinite="skip")
        assert bool(torch.isnan(losses).all())
    assert_trees_close(torch_state(model, optimizer), before, rtol=0, atol=0)

    params, _ = jax_start()
    optimizer = optax.sgd(np.inf, momentum=0.9)
    opt_state = optimizer.init(params)
    kwargs = {"apply_fn": JAX_MODEL.apply, "loss_fn": jax_losses.mse, "optimizer": optimizer,
              "k1": K1, "on_nonfinite": on_nonfinite}
    carry = JAX_MODEL.initial_carry(BATCH, jnp.float64)
    if on_nonfinite == "raise":
        with pytest.raises(tbptt_jax.NonFiniteLossError, match="has a step that made"):
            tbptt_jax.tbptt_train_step(params, opt_state, carry, XS, YS, **kwargs)
    else:
        new = tbptt_jax.tbptt_train_step(params, opt_state, carry, XS, YS, **kwargs)
        np.testing.assert_array_equal(np.asarray(new[3]["nonfinite"]), [3, 3, 3])
        assert_trees_close(new[:2], (params, opt_state), rtol=0, atol=0)
