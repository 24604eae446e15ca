"""`tbptt_parity.compare`, the one call that checks a port of one's own: a correct JAX port
of a torch module agrees to rounding; a GRU port with the reset gate in the wrong place is
caught at update 1 with the right parameter named; and the report's other verdicts."""

import numpy as np
import optax
import pytest
import torch
from torch import nn

import tbptt_jax
import tbptt_parity
import tbptt_torch
from examples.port_check import Forecaster, forecaster_apply, wrong_forecaster_apply

T, B, K1 = 10, 3, 5


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((T, B, 3))
    return xs, np.tanh(np.cumsum(xs, axis=0)[..., :2] / 4)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Forecaster()


def test_a_correct_port_agrees_to_rounding_at_every_update(model, data):
    xs, ys = data
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = tbptt_parity.compare(model, forecaster_apply, xs=xs, ys=ys, k1=K1,
                                  optimizer="adam", lr=0.01)
    assert report.ok and report.update is None and report.quantity is None
    assert [row.update for row in report.rows] == [1, 2] and report.updates == 2
    assert set(report.rows[0].grads) == set(model.state_dict())
    assert max(report.largest_gaps().values()) < 1e-13
    assert report.carry_gap is not None and report.carry_gap < 1e-13
    assert report.rows[1].torch_loss != report.rows[0].torch_loss  # it trained
    assert str(report).splitlines()[-1].startswith("OK: the port agrees with torch over all "
                                                   "2 updates to 1e-10")
    # The module passed in is not trained: compare trains a copy.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_gru_port_with_the_reset_gate_outside_the_bias_is_caught_at_update_1(model, data):
    xs, ys = data
    report = tbptt_parity.compare(model, wrong_forecaster_apply, xs=xs, ys=ys, k1=K1,
                                  optimizer="adam", lr=0.01)
    assert not report.ok
    assert (report.update, report.quantity, report.parameter) == (1, "grad", "gru.bias_hh_l0")
    assert len(report.rows) == 1  # the report stops at the divergence
    row = report.rows[0]
    assert report.gap == row.grads["gru.bias_hh_l0"] == max(row.grads.values())
    assert report.gap > 0.5 and row.loss > 1e-3
    text = str(report)
    assert ("DIVERGED at update 1: the gradient of 'gru.bias_hh_l0' differs by "
            f"{report.gap:.2e} relative (tolerance 1e-10)") in text
    # At the divergent update every parameter's gradient gap is listed.
    assert all(f"{key:<32} grad gap {row.grads[key]:.1e}" in text for key in row.grads)


def test_matching_trainers_with_different_optimizers_diverge_in_the_parameters(model, data):
    xs, ys = data
    report = tbptt_parity.compare(
        model, forecaster_apply, xs=xs, ys=ys, k1=K1,
        optimizer=(optax.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.05)))
    assert (report.update, report.quantity) == (1, "param")
    row = report.rows[0]
    assert row.loss < 1e-13 and max(row.grads.values()) < 1e-13
    assert report.gap == max(row.params.values()) > 1e-3
    assert report.verdict().startswith(f"DIVERGED at update 1: parameter {report.parameter!r}")


def test_the_bundled_models_agree_in_float32_with_updates_cutting_the_sequence():
    torch.manual_seed(1)
    torch_model = tbptt_torch.models.LSTMModel(2, 4, 3, num_layers=2)
    jax_model = tbptt_jax.models.lstm(2, 4, 3, num_layers=2)
    rng = np.random.default_rng(1)
    xs, labels = rng.standard_normal((30, 2, 2)), rng.integers(0, 3, (30, 2))
    report = tbptt_parity.compare(torch_model, jax_model.apply, xs=xs, ys=labels, k1=4, k2=6,
                                  loss_fn="cross_entropy", optimizer="nesterov", lr=0.1,
                                  updates=3, dtype="float32", reduction="sum", tail="drop")
    assert report.ok, report
    assert report.updates == 3 and report.rtol == 1e-5 and report.scale == "trajectory"
    assert 0 < max(report.largest_gaps().values()) < 1e-5  # float32 rounding, not zero


def test_random_data_is_shaped_for_the_module(model):
    xs, ys = tbptt_parity.random_data(model, steps=7, batch_size=2)
    assert xs.shape == (7, 2, 3) and ys.shape == (7, 2, 2)
    xs, labels = tbptt_parity.random_data(model, steps=7, batch_size=2,
                                          loss_fn="cross_entropy")
    assert labels.shape == (7, 2) and set(np.unique(labels)) <= {0, 1}


class WithBuffer(Forecaster):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(1))


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(updates=3), "updates=3 of k1=5 (tail='partial') need xs of at least 11 steps, got 10"),
    (dict(dtype="float16"), "dtype must be one of ('float32', 'float64'), got 'float16'"),
    (dict(loss_fn="l1"), "loss_fn must be one of ('mse', 'cross_entropy'), got 'l1'"),
    (dict(optimizer="lamb"), "optimizer must be one of ('sgd', 'nesterov', 'adam'), got 'lamb'"),
    (dict(rtol=0.0), "rtol must be a positive finite number, got 0.0"),
    (dict(k1=6, k2=5), "k2 must be >= k1 (k1=6), got k2=5"),
    (dict(model=WithBuffer()), "must hold parameters only; it has the buffers ['scale']"),
    (dict(model=nn.Linear(3, 2)), "the torch module has no initial_carry(batch_size) method"),
])
def test_bad_arguments_are_named(model, data, arguments, message):
    xs, ys = data
    arguments = {"k1": K1, **arguments}
    torch_model = arguments.pop("model", model)
    with pytest.raises(ValueError) as error:
        tbptt_parity.compare(torch_model, forecaster_apply, xs=xs, ys=ys, **arguments)
    assert message in str(error.value)
