"""Global-norm gradient clipping on both sides: `tbptt_torch.tbptt_train_step(...,
clip_grad_norm=)` and its JAX twin `tbptt_jax.optim.clip_by_global_norm_torch`, with the
other factories of `tbptt_jax.optim` that take numbers, and `sgd_torch`'s dampening.

Bad values are rejected with a `ValueError` naming the argument and the value given, before
any parameter changes; good ones scale the gradient by `min(max_norm / (norm + 1e-6), 1)`,
checked here against numbers computed by hand (the cross-framework trajectories are in
parity_tests/test_optimizers.py).
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

import tbptt_torch
from tbptt_jax import optim
from tbptt_torch import losses as torch_losses
from tbptt_torch import models as torch_models

STEPS, BATCH, INPUT, HIDDEN, OUTPUT = 4, 2, 2, 3, 1
XS = torch.from_numpy(np.random.default_rng(0).normal(size=(STEPS, BATCH, INPUT)))
YS = torch.from_numpy(np.random.default_rng(1).normal(size=(STEPS, BATCH, OUTPUT)))
BAD_NORMS = [0.0, -1.0, float("nan"), float("inf"), True, "1.0", np.array([1.0, 2.0])]


def torch_lstm() -> torch_models.LSTMModel:
    torch.manual_seed(0)
    return torch_models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()


def train_once(model: torch.nn.Module, clip_grad_norm: float | None) -> dict[str, np.ndarray]:
    """One update of SGD(lr=1) over the whole sequence; returns the gradient it applied."""
    applied: dict[str, np.ndarray] = {}

    def record(index: int, loss: torch.Tensor, model: torch.nn.Module) -> None:
        applied.update({name: p.grad.numpy().copy() for name, p in model.named_parameters()})

    tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), None, XS,
                                 YS, loss_fn=torch_losses.mse, k1=STEPS, on_update=record,
                                 clip_grad_norm=clip_grad_norm)
    return applied


def global_norm(tree: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(g ** 2) for g in tree.values())))


@pytest.mark.parametrize("value", BAD_NORMS, ids=repr)
def test_torch_rejects_bad_clip_grad_norm_before_any_change(value):
    model = torch_lstm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=re.escape(f"clip_grad_norm must be a finite float > 0 "
                                                   f"(the max norm) or None, got {value!r}")):
        train_once(model, value)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_torch_clip_scales_by_max_norm_over_norm_plus_1e_6():
    raw = train_once(torch_lstm(), None)
    norm = global_norm(raw)
    max_norm = norm / 4
    clipped = train_once(torch_lstm(), max_norm)
    coefficient = max_norm / (norm + 1e-6)
    for name, grad in raw.items():
        np.testing.assert_allclose(clipped[name], grad * coefficient, rtol=1e-14, atol=0,
                                   err_msg=name)
    # The parameters moved by the clipped gradient (SGD with lr=1).
    model = torch_lstm()
    start = {name: p.detach().numpy().copy() for name, p in model.named_parameters()}
    train_once(model, max_norm)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(start[name] - p.detach().numpy(), clipped[name],
                                   rtol=1e-13, atol=1e-15, err_msg=name)


def test_torch_clip_above_the_norm_changes_nothing():
    raw = train_once(torch_lstm(), None)
    unclipped = train_once(torch_lstm(), 2 * global_norm(raw))
    for name, grad in raw.items():
        np.testing.assert_array_equal(unclipped[name], grad, err_msg=name)


@pytest.mark.parametrize("value", BAD_NORMS, ids=repr)
def test_jax_rejects_bad_max_norm(value):
    with pytest.raises(ValueError, match=re.escape(f"max_norm must be a finite float > 0, "
                                                   f"got {value!r}")):
        optim.clip_by_global_norm_torch(value)


def test_jax_clip_matches_torch_formula_and_differs_from_optax():
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}  # global norm 13
    clip = jax.jit(optim.clip_by_global_norm_torch(6.5).update)
    clipped, _ = clip(grads, optax.EmptyState())
    coefficient = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) * coefficient, rtol=1e-15)
    np.testing.assert_allclose(clipped["b"], np.array([[12.0]]) * coefficient, rtol=1e-15)
    plain, _ = optax.clip_by_global_norm(6.5).update(grads, optax.EmptyState())
    # optax divides by the norm itself: larger by a factor 1 + 1e-6 / 13.
    np.testing.assert_allclose(plain["a"] / clipped["a"], 1 + 1e-6 / 13.0, rtol=1e-12)
    unclipped, _ = clip(grads, optax.EmptyState())  # same shapes: no recompile
    assert clip._cache_size() == 1
    np.testing.assert_array_equal(unclipped["a"], clipped["a"])


def test_jax_clip_below_the_threshold_is_the_identity():
    grads = {"a": jnp.array([3.0, 4.0])}
    clipped, _ = optim.clip_by_global_norm_torch(10.0).update(grads, optax.EmptyState())
    np.testing.assert_array_equal(clipped["a"], grads["a"])


@pytest.mark.parametrize(("factory", "argument", "value", "expected"), [
    (lambda v: optim.adagrad_torch(0.1, lr_decay=v), "lr_decay", -0.1, ">= 0"),
    (lambda v: optim.adagrad_torch(0.1, eps=v), "eps", float("nan"), ">= 0"),
    (lambda v: optim.adagrad_torch(0.1, initial_accumulator_value=v),
     "initial_accumulator_value", -1.0, ">= 0"),
    (lambda v: optim.adagrad_torch(v), "learning_rate", "0.1", ">= 0"),
    (lambda v: optim.rmsprop_torch(0.1, momentum=v), "momentum", -0.9, ">= 0"),
    (lambda v: optim.rmsprop_torch(0.1, weight_decay=v), "weight_decay", float("inf"),
     ">= 0"),
    (lambda v: optim.sgd_torch(0.1, dampening=v), "dampening", -0.5, ">= 0"),
    (lambda v: optim.cosine_annealing_schedule(0.1, 10, eta_min=v), "eta_min", -1e-3,
     ">= 0"),
])
def test_optim_factories_reject_bad_numbers(factory, argument, value, expected):
    with pytest.raises(ValueError, match=re.escape(f"{argument} must be a finite float "
                                                   f"{expected}, got {value!r}")):
        factory(value)


@pytest.mark.parametrize(("momentum", "dampening"), [(0.0, 0.0), (0.9, 0.5)])
def test_sgd_torch_nesterov_needs_momentum_and_no_dampening(momentum, dampening):
    with pytest.raises(ValueError, match=re.escape(
            f"nesterov=True needs momentum > 0 and dampening 0 (as torch), got "
            f"momentum={momentum!r}, dampening={dampening!r}")):
        optim.sgd_torch(0.1, momentum=momentum, dampening=dampening, nesterov=True)


def test_sgd_torch_dampens_all_but_the_first_step():
    """b = g, then b = 0.9 b + 0.5 g, as torch's SGD(momentum=0.9, dampening=0.5)."""
    sgd = optim.sgd_torch(1.0, momentum=0.9, dampening=0.5)
    params = {"w": jnp.zeros(2)}
    state = sgd.init(params)
    steps = []
    for g in ([1.0, 2.0], [4.0, -2.0]):
        update, state = sgd.update({"w": jnp.array(g)}, state, params)
        steps.append(np.asarray(update["w"]))
    np.testing.assert_allclose(steps[0], [-1.0, -2.0], rtol=1e-15)
    np.testing.assert_allclose(steps[1], [-(0.9 * 1.0 + 0.5 * 4.0), -(0.9 * 2.0 - 0.5 * 2.0)],
                               rtol=1e-15)


@pytest.mark.parametrize("t_max", [0, 2.5, True])
def test_cosine_annealing_rejects_bad_t_max(t_max):
    with pytest.raises(ValueError, match=re.escape(f"t_max must be a positive int, "
                                                   f"got {t_max!r}")):
        optim.cosine_annealing_schedule(0.1, t_max)
