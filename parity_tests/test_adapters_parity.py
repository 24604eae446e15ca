"""Parity of the adapters with torch: a torch model converted to a flax.linen, flax.nnx or
Equinox cell computes the torch model's outputs and carry, and trains the same way.

Forward: from the torch model's weights and a random carry, the converted model's outputs
and final carry equal torch's (float64, 1e-10 relative). Training: the converted model and
the torch model, from the same weights and carry, trained by the two trainers with Adam
(TBPTT(2, 3) with resets, three updates), give the same losses, gradients, parameters and
final carry (1e-10 relative, compared in the torch layout), provided the torch model keeps
the bias entries the library folds away at zero (`redundant_torch_entries`). Without that
they part: torch trains both halves of a folded bias, the library the one sum, and a test
measures that gap.
"""

from __future__ import annotations

import copy
import functools
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
from parity_tests.harness import (
    Trajectory,
    assert_parity,
    make_models,
    optimizer_pair,
    random_sequences,
    relative_difference,
    run_torch,
    to_numpy,
)
from tbptt_jax import adapters

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

IN, H, OUT, B, T = 3, 5, 2, 3, 6  # input, hidden, output sizes; batch; steps
F64 = jnp.float64
RTOL = 1e-10


def _linen(cell: Any) -> adapters.CellAdapter:
    return adapters.linen(cell, input_size=IN, readout=nn.Dense(OUT, param_dtype=F64))


def _nnx(cell: Any) -> adapters.CellAdapter:
    return adapters.nnx(cell, nnx.Linear(H, OUT, rngs=nnx.Rngs(2), param_dtype=F64))


def _equinox(cell_class: Any) -> adapters.CellAdapter:
    keys = jax.random.split(jax.random.key(3))
    return adapters.equinox(cell_class(IN, H, dtype=F64, key=keys[0]),
                            eqx.nn.Linear(H, OUT, dtype=F64, key=keys[1]))


def _nnx_cell(cell_class: Any, **options: Any) -> Any:
    return cell_class(IN, H, rngs=nnx.Rngs(1), param_dtype=F64, **options)


# name -> (the torch cell it matches, a factory of its float64 adapter with a readout; the
# factories are cached, so tests sharing an adapter share the trainer's compiled program)
ADAPTERS: dict[str, tuple[str, Callable[[], adapters.CellAdapter]]] = {
    "linen-LSTMCell": ("lstm", lambda: _linen(nn.LSTMCell(H, param_dtype=F64))),
    "linen-OptimizedLSTMCell": ("lstm", lambda: _linen(nn.OptimizedLSTMCell(H, param_dtype=F64))),
    "linen-GRUCell": ("gru", lambda: _linen(nn.GRUCell(H, param_dtype=F64))),
    "linen-SimpleCell": ("elman", lambda: _linen(nn.SimpleCell(H, param_dtype=F64))),
    "nnx-LSTMCell": ("lstm", lambda: _nnx(_nnx_cell(nnx.LSTMCell))),
    "nnx-OptimizedLSTMCell": ("lstm", lambda: _nnx(_nnx_cell(nnx.OptimizedLSTMCell))),
    "nnx-GRUCell": ("gru", lambda: _nnx(_nnx_cell(nnx.GRUCell))),
    "nnx-SimpleCell": ("elman", lambda: _nnx(_nnx_cell(nnx.SimpleCell, dtype=F64))),
    "equinox-LSTMCell": ("lstm", lambda: _equinox(eqx.nn.LSTMCell)),
    "equinox-GRUCell": ("gru", lambda: _equinox(eqx.nn.GRUCell)),
}
ADAPTERS = {name: (kind, functools.cache(make)) for name, (kind, make) in ADAPTERS.items()}
OPTIMIZERS = optimizer_pair("adam", 0.05)


def _default_run(*names: str) -> list[Any]:
    """Every adapter, those not in `names` under -m slow (each compile of the JAX trainer
    costs seconds, a linen LSTM's eight Dense layers the most)."""
    return [name if name in names else pytest.param(name, marks=pytest.mark.slow)
            for name in ADAPTERS]


def _torch_model(name: str, seed: int = 0) -> torch.nn.Module:
    """The torch model, drawn by torch; nnx's GRU has no b_hn, so it is zeroed there."""
    model = make_models(ADAPTERS[name][0], IN, H, OUT, dtype=np.float64, seed=seed).torch_model
    if name == "nnx-GRUCell":
        with torch.no_grad():
            model.rnn.bias_hh_l0[2 * H:] = 0.0
    return model


def _random_torch_carry(kind: str, seed: int) -> Any:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(1, B, H, generator=generator, dtype=torch.float64)
    return (h, torch.randn(1, B, H, generator=generator, dtype=torch.float64)) \
        if kind == "lstm" else h


def _jax(tree: Any) -> Any:
    return jax.tree.map(lambda t: jnp.asarray(t.detach().numpy()), tree)


@pytest.mark.parametrize("name", _default_run("linen-LSTMCell", "linen-GRUCell", "nnx-GRUCell",
                                              "equinox-LSTMCell", "equinox-GRUCell"))
def test_converted_model_computes_torchs_outputs(name):
    kind, make = ADAPTERS[name]
    adapter, model = make(), _torch_model(name)
    params = adapter.from_torch_layout(tbptt_torch.to_jax(model))
    xs, _, _ = random_sequences(T, B, IN, OUT, seed=1)
    torch_carry = _random_torch_carry(kind, seed=2)
    with torch.no_grad():
        expected, expected_carry = model(torch.from_numpy(xs), torch_carry)
    carry, ys = adapter.apply(params, adapter.carry_from_torch(_jax(torch_carry)), xs)
    assert relative_difference(ys, expected.numpy()) < RTOL
    for ours, theirs in zip(jax.tree.leaves(adapter.carry_to_torch(carry)),
                            jax.tree.leaves(to_numpy(expected_carry)), strict=True):
        assert relative_difference(ours, theirs) < RTOL

    # And back: the library's weights, converted to torch, give the library's outputs.
    back = tbptt_torch.load_jax(copy.deepcopy(model), adapter.to_torch_layout(params))
    with torch.no_grad():
        again, _ = back(torch.from_numpy(xs), torch_carry)
    assert relative_difference(again.numpy(), ys) < RTOL


def _freeze_redundant(model: torch.nn.Module, adapter: adapters.CellAdapter) -> None:
    """Keeps the entries the library folds away at their value (zero) under torch's training:
    their gradient is masked, so Adam's moments and steps for them stay zero."""
    parameters = dict(model.named_parameters())
    for key, mask in adapter.redundant_torch_entries().items():
        keep = torch.from_numpy(~mask).to(parameters[key].dtype)
        parameters[key].register_hook(lambda grad, keep=keep: grad * keep)


def _run_adapter(adapter: adapters.CellAdapter, params: Any, carry: Any, xs: np.ndarray,
                 ys: np.ndarray, *, optimizer: optax.GradientTransformation, **options: Any
                 ) -> Trajectory:
    """`tbptt_jax.tbptt_train_step` on the adapter, its trajectory in the torch layout."""
    options["resets"] = None if options.get("resets") is None else jnp.asarray(options["resets"])
    _, _, carry, metrics = tbptt_jax.tbptt_train_step(
        params, optimizer.init(params), carry, jnp.asarray(xs), jnp.asarray(ys),
        apply_fn=adapter.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer,
        trace=True, **options)
    updates = metrics["loss"].shape[0]

    def stacked(tree: Any) -> dict[str, np.ndarray]:
        layouts = [adapter.to_torch_layout(jax.tree.map(lambda a, u=u: a[u], tree))
                   for u in range(updates)]
        return {key: np.stack([np.asarray(layout[key]) for layout in layouts])
                for key in layouts[0]}

    if isinstance(carry, tbptt_jax.OverlapCarry):
        carry = carry._replace(state=adapter.carry_to_torch(carry.state))
    else:
        carry = adapter.carry_to_torch(carry)
    return Trajectory(np.asarray(metrics["loss"]), stacked(metrics["grads"]),
                      stacked(metrics["params"]), to_numpy(carry))


def _both(name: str, *, freeze: bool) -> tuple[Trajectory, Trajectory]:
    """The converted model and the torch model trained from the same weights and carry."""
    kind, make = ADAPTERS[name]
    adapter = make()
    model = _torch_model(name, seed=3)
    # Start both from the split the conversion makes, so the frozen torch model starts equal.
    params = adapter.from_torch_layout(tbptt_torch.to_jax(model))
    tbptt_torch.load_jax(model, adapter.to_torch_layout(params))
    if freeze:
        _freeze_redundant(model, adapter)
    xs, ys, resets = random_sequences(T, B, IN, OUT, reset_rate=0.2, seed=4)
    torch_carry = _random_torch_carry(kind, seed=5)
    options = dict(k1=2, k2=3, resets=resets)
    ours = _run_adapter(adapter, params, adapter.carry_from_torch(_jax(torch_carry)), xs, ys,
                        optimizer=OPTIMIZERS.optax, **options)
    theirs = run_torch(model, OPTIMIZERS.torch(model.parameters()), torch_carry, xs, ys,
                       loss_fn=tbptt_torch.losses.mse, **options)
    return ours, theirs


@pytest.mark.parametrize("name", _default_run("linen-GRUCell", "nnx-GRUCell", "equinox-LSTMCell"))
def test_converted_model_trains_as_torch(name):
    ours, theirs = _both(name, freeze=True)
    assert ours.losses.shape == (3,)
    assert_parity(ours, theirs, RTOL, names=(name, "torch"))


def test_a_torch_model_training_both_folded_biases_parts_from_the_library():
    """The trap the frozen entries avoid: torch steps b_ih and b_hh by the same gradient, so
    their sum moves twice as far as the library's one bias. The first update's loss and
    gradient still agree; torch's first Adam step then moves the folded entries of
    b_hh by about the learning rate (0.05) where the library has nothing to move, and the
    losses part from the second update on."""
    ours, theirs = _both("equinox-LSTMCell", freeze=False)
    mask = ADAPTERS["equinox-LSTMCell"][1]().redundant_torch_entries()["rnn.bias_hh_l0"]
    assert relative_difference(ours.losses[0], theirs.losses[0]) < RTOL
    assert relative_difference(ours.grads["rnn.weight_ih_l0"][0],
                               theirs.grads["rnn.weight_ih_l0"][0]) < RTOL
    assert np.all(ours.params["rnn.bias_hh_l0"][0][mask] == 0.0)
    assert 0.04 < float(np.max(np.abs(theirs.params["rnn.bias_hh_l0"][0][mask]))) <= 0.05
    assert relative_difference(ours.losses[1:], theirs.losses[1:]) > 1e-4
