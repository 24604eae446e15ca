"""SPEC §4 for both trainers: every wrong input gets a `ValueError` that names the argument
and states the expected and the actual value, raised before any parameter changes.

Each case runs against `tbptt_jax.tbptt_train_step` and `tbptt_torch.tbptt_train_step` on
the same one-layer LSTM. Afterwards the JAX arrays passed in (params and optimizer state)
and the torch model's `state_dict()` and optimizer state (made non-trivial by one valid call
first) must be exactly as they were. Weight loading (`load_jax`) and JAX params that do not
fit the model are checked the same way.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

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

STEPS, BATCH, INPUT, HIDDEN, OUTPUT = 5, 2, 2, 3, 1
XS = np.random.default_rng(0).normal(size=(STEPS, BATCH, INPUT))
YS = np.random.default_rng(1).normal(size=(STEPS, BATCH, OUTPUT))
JAX_OPTIMIZER = optax.adam(1e-2)  # one object: a new one would be a new static argument


def torch_lstm() -> torch_models.LSTMModel:
    torch.manual_seed(0)
    return torch_models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()


class JaxTrainer:
    """`tbptt_jax.tbptt_train_step` with valid defaults that a case overrides."""

    dtype_prefix = ""
    OverlapCarry = tbptt_jax.OverlapCarry

    def __init__(self) -> None:
        self.model = jax_models.lstm(INPUT, HIDDEN, OUTPUT)
        self.params = {name: jnp.asarray(p) for name, p in tbptt_torch.to_jax(torch_lstm()).items()}
        self.opt_state = JAX_OPTIMIZER.init(self.params)
        self.before = jax.tree.map(np.array, (self.params, self.opt_state))

    def array(self, value: Any) -> Any:
        return jax.tree.map(jnp.asarray, value)

    def call(self, **overrides: Any) -> Any:
        kwargs = {"params": self.params, "opt_state": self.opt_state,
                  "carry": self.model.initial_carry(BATCH, jnp.float64), "xs": XS, "ys": YS,
                  "apply_fn": self.model.apply, "loss_fn": jax_losses.mse,
                  "optimizer": JAX_OPTIMIZER, "k1": 2, **overrides}
        return tbptt_jax.tbptt_train_step(**kwargs)

    def assert_unchanged(self) -> None:
        after = jax.tree.map(np.asarray, (self.params, self.opt_state))
        assert jax.tree.structure(after) == jax.tree.structure(self.before)
        for old, new in zip(jax.tree.leaves(self.before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(new, old)


class TorchTrainer:
    """`tbptt_torch.tbptt_train_step` with valid defaults that a case overrides."""

    dtype_prefix = "torch."
    OverlapCarry = tbptt_torch.OverlapCarry

    def __init__(self) -> None:
        self.model = torch_lstm()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        # One valid call first, so the optimizer has state (step, moments) to lose.
        self.call()
        self.before = (copy.deepcopy(self.model.state_dict()),
                       copy.deepcopy(self.optimizer.state_dict()))

    def array(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(torch.tensor(part) for part in value)
        return torch.tensor(value)

    def call(self, **overrides: Any) -> Any:
        kwargs = {"model": self.model, "optimizer": self.optimizer, "carry": None,
                  "xs": torch.tensor(XS), "ys": torch.tensor(YS), "loss_fn": torch_losses.mse,
                  "k1": 2, **overrides}
        return tbptt_torch.tbptt_train_step(**kwargs)

    def assert_unchanged(self) -> None:
        state_before, optimizer_before = self.before
        state_after = self.model.state_dict()
        assert list(state_after) == list(state_before)
        for name, tensor in state_before.items():
            torch.testing.assert_close(state_after[name], tensor, rtol=0, atol=0, msg=name)
        optimizer_after = self.optimizer.state_dict()
        assert optimizer_after["param_groups"] == optimizer_before["param_groups"]
        assert optimizer_after["state"].keys() == optimizer_before["state"].keys()
        for index, entries in optimizer_before["state"].items():
            assert entries.keys() == optimizer_after["state"][index].keys()
            for key, value in entries.items():
                torch.testing.assert_close(optimizer_after["state"][index][key], value,
                                           rtol=0, atol=0, msg=f"optimizer state {index} {key}")


TRAINERS = {"jax": JaxTrainer, "torch": TorchTrainer}
Case = Callable[[Any], dict[str, Any]]


def lstm_carry(layers: int, batch: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.zeros((layers, batch, hidden)), np.zeros((layers, batch, hidden)))


def case(case_id: str, overrides: Case, message: str):
    """One bad call: `overrides(trainer)` replaces valid arguments; `message` is the exact
    text expected in the error ("{t}" stands for "torch." where torch prints its dtypes)."""
    return pytest.param(overrides, message, id=case_id)


BAD_K = [0, -1, 2.5, True, "3"]


def carry_message(got: str) -> str:
    """Both trainers describe a carry as dtype[shape] per tensor, the LSTM's as a pair."""
    return ("carry must match the model and batch size 2: expected "
            f"('float64[1, 2, 3]', 'float64[1, 2, 3]'), got {got}")
CASES = [
    *[case(f"k1={value!r}", lambda t, v=value: {"k1": v},
           f"k1 must be a positive int, got {value!r}") for value in BAD_K],
    *[case(f"k2={value!r}", lambda t, v=value: {"k1": 1, "k2": v},
           f"k2 must be a positive int, got {value!r}") for value in BAD_K],
    case("k2<k1", lambda t: {"k1": 3, "k2": 2}, "k2 must be >= k1 (k1=3), got k2=2"),
    case("ys-other-T", lambda t: {"ys": t.array(YS[:4])},
         "ys must have the [T, B] of xs, expected (5, 2), got (4, 2)"),
    case("ys-other-B", lambda t: {"ys": t.array(np.zeros((STEPS, 3, OUTPUT)))},
         "ys must have the [T, B] of xs, expected (5, 2), got (5, 3)"),
    case("xs-not-time-major", lambda t: {"xs": t.array(np.zeros(STEPS))},
         "xs and ys must be time-major [T, B, ...]; got xs of shape (5,) and ys of shape "
         "(5, 2, 1)"),
    case("empty-T", lambda t: {"xs": t.array(XS[:0]), "ys": t.array(YS[:0])},
         "xs must hold at least one step of one sequence, got shape (0, 2, 2)"),
    case("empty-B", lambda t: {"xs": t.array(XS[:, :0]), "ys": t.array(YS[:, :0])},
         "xs must hold at least one step of one sequence, got shape (5, 0, 2)"),
    case("carry-wrong-B", lambda t: {"carry": t.array(lstm_carry(1, 3, HIDDEN))},
         carry_message("('float64[1, 3, 3]', 'float64[1, 3, 3]')")),
    case("carry-wrong-H", lambda t: {"carry": t.array(lstm_carry(1, BATCH, 4))},
         carry_message("('float64[1, 2, 4]', 'float64[1, 2, 4]')")),
    case("carry-wrong-layers", lambda t: {"carry": t.array(lstm_carry(2, BATCH, HIDDEN))},
         carry_message("('float64[2, 2, 3]', 'float64[2, 2, 3]')")),
    case("carry-lstm-bare-tensor", lambda t: {"carry": t.array(np.zeros((1, BATCH, HIDDEN)))},
         carry_message("float64[1, 2, 3]")),
    case("carry-wrong-dtype",
         lambda t: {"carry": t.array(tuple(np.float32(c) for c in lstm_carry(1, BATCH, HIDDEN)))},
         "params, carry and xs must share one floating-point dtype; got params float64, "
         "carry float32, xs float64"),
    case("xs-wrong-dtype", lambda t: {"xs": t.array(np.float32(XS))},
         "params, carry and xs must share one floating-point dtype; got params float64, "
         "carry float64, xs float32"),
    case("xs-wrong-features", lambda t: {"xs": t.array(np.zeros((STEPS, BATCH, 4)))},
         "the model fails on the carry ('float64[1, 2, 3]', 'float64[1, 2, 3]') and xs of "
         "shape (5, 2, 4): "),
    case("reduction", lambda t: {"reduction": "avg"},
         "reduction must be one of ('mean', 'sum'), got 'avg'"),
    case("tail", lambda t: {"tail": "keep"},
         "tail must be one of ('partial', 'drop'), got 'keep'"),
    case("on_nonfinite", lambda t: {"on_nonfinite": "ignore"},
         "on_nonfinite must be one of ('raise', 'skip'), got 'ignore'"),
    case("resets-wrong-shape", lambda t: {"resets": t.array(np.zeros((STEPS, 3), bool))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}bool of shape (5, 3)"),
    case("resets-wrong-dtype", lambda t: {"resets": t.array(np.zeros((STEPS, BATCH)))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}float64 of shape (5, 2)"),
    case("resets-int", lambda t: {"resets": t.array(np.zeros((STEPS, BATCH), np.int64))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}int64 of shape (5, 2)"),
    case("overlap-too-long",
         lambda t: {"k2": 3, "carry": t.OverlapCarry(t.array(lstm_carry(1, BATCH, HIDDEN)),
                                                     t.array(XS[:2]), None)},
         "carry: an OverlapCarry holds at most k2 - k1 = 1 steps, got 2 (was it made with "
         "other k1, k2?)"),
    case("overlap-with-k1=k2",
         lambda t: {"carry": t.OverlapCarry(t.array(lstm_carry(1, BATCH, HIDDEN)),
                                            t.array(XS[:1]), None)},
         "carry: an OverlapCarry holds at most k2 - k1 = 0 steps, got 1"),
    case("overlap-wrong-B",
         lambda t: {"k2": 4, "carry": t.OverlapCarry(t.array(lstm_carry(1, BATCH, HIDDEN)),
                                                     t.array(np.zeros((1, 3, INPUT))), None)},
         "carry: the OverlapCarry's xs must have shape [1, 2, 2] (n steps, then the batch and "
         "features of xs), got [1, 3, 2]"),
    case("overlap-resets-wrong-B",
         lambda t: {"k2": 4, "resets": t.array(np.zeros((STEPS, BATCH), bool)),
                    "carry": t.OverlapCarry(t.array(lstm_carry(1, BATCH, HIDDEN)),
                                            t.array(XS[:1]), t.array(np.zeros((1, 3), bool)))},
         "carry: the OverlapCarry's resets must be bool of shape [1, 2], got {t}bool of shape "
         "[1, 3]"),
    case("overlap-state-wrong-H",
         lambda t: {"k2": 4, "carry": t.OverlapCarry(t.array(lstm_carry(1, BATCH, 4)),
                                                     t.array(XS[:1]), None)},
         carry_message("('float64[1, 2, 4]', 'float64[1, 2, 4]')")),
]


@pytest.mark.parametrize(("overrides", "message"), CASES)
@pytest.mark.parametrize("framework", list(TRAINERS))
def test_bad_input_raises_a_value_error_before_any_parameter_changes(
        framework, overrides, message):
    trainer = TRAINERS[framework]()
    expected = message.replace("{t}", trainer.dtype_prefix)
    with pytest.raises(ValueError, match=re.escape(expected)):
        trainer.call(**overrides(trainer))
    trainer.assert_unchanged()


@pytest.mark.parametrize(("framework", "message"), [
    ("jax", "ys of shape float64[5, 2, 3] does not fit loss_fn with the model's predictions "
            "of shape float64[1, 2, 1] for 1 step: mse: preds and targets must have one "
            "shape, got (1, 2, 1) and (1, 2, 3)"),
    ("torch", "ys of shape float64[5, 2, 3] does not fit loss_fn with the model's predictions "
              "of shape float64[2, 2, 1] for 2 steps: mse: preds and targets must have one "
              "shape, got (2, 2, 1) and (2, 2, 3)"),
])
def test_targets_of_another_feature_shape_fail_in_the_loss_before_any_update(framework, message):
    """ys with the right [T, B] but other features: JAX traces loss_fn on one step before
    running; torch runs it on the first window (k1=2), before an optimizer step; both quote
    the loss's own error after naming ys."""
    trainer = TRAINERS[framework]()
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.call(ys=trainer.array(np.zeros((STEPS, BATCH, 3))))
    trainer.assert_unchanged()


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(lambda p: p.pop("head.bias"),
                 "missing ['head.bias'], unexpected []", id="missing-key"),
    pytest.param(lambda p: p.update({"rnn.weight_ih_l1": np.zeros((12, 3))}),
                 "missing [], unexpected ['rnn.weight_ih_l1']", id="unexpected-key"),
    pytest.param(lambda p: p.update({"head.weight": np.zeros((HIDDEN, OUTPUT))}),
                 "params['head.weight'] must have shape (1, 3), got (3, 1)", id="wrong-shape"),
    pytest.param(lambda p: p.update({"rnn.bias_hh_l0": np.zeros(3 * HIDDEN)}),
                 "params['rnn.bias_hh_l0'] must have shape (12,), got (9,)", id="gru-sized"),
])
def test_jax_params_that_do_not_fit_the_model_are_rejected(edit, message):
    trainer = JaxTrainer()
    params = dict(trainer.params)
    edit(params)
    params = {name: jnp.asarray(p) for name, p in params.items()}
    keys = list(trainer.model.param_shapes())
    full = (f"params must have the keys {keys}; " if "missing" in message else "") + message
    with pytest.raises(ValueError, match=re.escape(full)):
        trainer.call(params=params)
    trainer.assert_unchanged()


@pytest.mark.parametrize(("edit", "message"), [
    pytest.param(lambda p: p.pop("rnn.weight_hh_l0"),
                 "missing ['rnn.weight_hh_l0'], unexpected []", id="missing-key"),
    pytest.param(lambda p: p.update({"head.scale": np.ones(OUTPUT)}),
                 "missing [], unexpected ['head.scale']", id="unexpected-key"),
    pytest.param(lambda p: p.update({"rnn.weight_ih_l0": np.zeros((INPUT, 4 * HIDDEN))}),
                 "params['rnn.weight_ih_l0'] must have shape (12, 2), got (2, 12)",
                 id="transposed"),
    pytest.param(lambda p: p.update({"head.bias": np.zeros((1, OUTPUT))}),
                 "params['head.bias'] must have shape (1,), got (1, 1)", id="extra-axis"),
])
def test_load_jax_checks_every_key_and_shape_before_copying(edit, message):
    model = torch_lstm()
    before = copy.deepcopy(model.state_dict())
    # Every other entry differs from the model's, so a partial copy would show.
    params = {name: np.full(tuple(t.shape), 0.25) for name, t in before.items()}
    edit(params)
    keys = list(before)
    full = (f"params must have the keys {keys}; " if "missing" in message else "") + message
    with pytest.raises(ValueError, match=re.escape(full)):
        tbptt_torch.load_jax(model, params)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


def test_load_jax_copies_jax_arrays_into_the_model_dtype_and_to_jax_round_trips():
    model = torch_lstm()
    params = jax_models.lstm(INPUT, HIDDEN, OUTPUT).param_shapes()
    values = {name: jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
              for name, shape in params.items()}
    assert tbptt_torch.load_jax(model, values) is model
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float64
        np.testing.assert_array_equal(tensor.numpy(), np.asarray(values[name], np.float64))
    exported = tbptt_torch.to_jax(model)
    assert list(exported) == list(params)
    for name, array in exported.items():
        assert isinstance(array, np.ndarray) and array.dtype == np.float64
        np.testing.assert_array_equal(array, np.asarray(values[name], np.float64))
    # The export is a copy: changing it leaves the model alone.
    exported["head.bias"][...] = 7.0
    assert model.state_dict()["head.bias"].item() != 7.0


@pytest.mark.parametrize("framework", list(TRAINERS))
def test_numpy_integers_are_accepted_for_k1_and_k2(framework):
    """k1 and k2 read from numpy or a config are ints too; they train as plain ints do."""
    plain = TRAINERS[framework]().call(k1=2, k2=3)
    numpy_ints = TRAINERS[framework]().call(k1=np.int64(2), k2=np.int32(3))
    losses = (lambda out: np.asarray(out[3]["loss"])) if framework == "jax" else (
        lambda out: out[1].numpy())
    np.testing.assert_array_equal(losses(numpy_ints), losses(plain))


@pytest.mark.parametrize("framework", list(TRAINERS))
def test_numpy_and_list_data_train_as_arrays_do(framework):
    """Both trainers take xs, ys, resets and mask as numpy arrays or nested lists too."""
    resets = np.zeros((STEPS, BATCH), bool)
    resets[3, 1] = True
    mask = np.ones((STEPS, BATCH))
    mask[4, 0] = 0.0
    losses = (lambda out: np.asarray(out[3]["loss"])) if framework == "jax" else (
        lambda out: out[1].numpy())
    trainer = TRAINERS[framework]()
    native = losses(trainer.call(xs=trainer.array(XS), ys=trainer.array(YS),
                                 resets=trainer.array(resets), mask=trainer.array(mask)))
    plain = losses(TRAINERS[framework]().call(xs=XS, ys=YS.tolist(), resets=resets,
                                              mask=mask.tolist()))
    np.testing.assert_array_equal(plain, native)


def test_torch_resets_must_be_arrays():
    trainer = TorchTrainer()
    with pytest.raises(ValueError, match=re.escape(
            "resets must be arrays (numpy or the framework's) in tuples, lists or dicts; got str "
            "at resets")):
        trainer.call(resets="none")
    trainer.assert_unchanged()


def test_a_none_carry_is_the_zero_carry_in_both_frameworks():
    """carry=None starts from the model's zero carry, in JAX as in torch."""
    trainer = JaxTrainer()
    explicit = trainer.call()
    implicit = trainer.call(carry=None)
    np.testing.assert_array_equal(np.asarray(implicit[3]["loss"]), np.asarray(explicit[3]["loss"]))


def test_jax_none_carry_needs_a_model_that_knows_its_zero_carry():
    trainer = JaxTrainer()
    with pytest.raises(ValueError, match=re.escape(
            "carry: None means the model's zero carry, but apply_fn is not the apply of a "
            "model with initial_carry(batch_size, dtype); pass the carry explicitly")):
        trainer.call(carry=None, apply_fn=lambda params, carry, xs: trainer.model.apply(
            params, carry, xs))
    trainer.assert_unchanged()
