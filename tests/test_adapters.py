"""The adapters (`tbptt_jax.adapters`), in JAX alone.

(a) A plain JAX function `(params, carry, xs[, resets]) -> (carry, ys)` trains as it is.
For each library cell: (b) the adapter's scan equals a Python loop over the library's own
cell, resets included, batch-major too; (c) converted from the torch layout it computes
what the bundled `tbptt_jax.models` model computes on those weights (an implementation
written apart from the library's); (d) the conversions round-trip, the carry's too;
(e) trained by `tbptt_train_step` (k2 > k1, resets, a second streamed call) it follows
the bundled model's trajectory when the torch entries it folds away are kept at zero
(under -m slow: parity_tests/test_adapters_parity.py holds it to torch by default);
(f) every conversion it cannot do exactly is a clear `ValueError`; (g) `tbptt_jax` imports
without flax and equinox.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tbptt_jax
from tbptt_jax import adapters

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

IN, H, OUT, B, T = 3, 4, 2, 3, 9  # input, hidden, output sizes; batch; steps
F64 = jnp.float64
ROOT = Path(__file__).resolve().parents[1]


def _linen(cell: Any) -> adapters.CellAdapter:
    return adapters.linen(cell, input_size=IN, readout=nn.Dense(OUT, param_dtype=F64))


def _nnx(make_cell: Callable[..., Any]) -> adapters.CellAdapter:
    return adapters.nnx(make_cell(IN, H, rngs=nnx.Rngs(1), param_dtype=F64),
                        nnx.Linear(H, OUT, rngs=nnx.Rngs(2), param_dtype=F64))


def _equinox(cell_class: Any) -> adapters.CellAdapter:
    keys = jax.random.split(jax.random.key(3))
    return adapters.equinox(cell_class(IN, H, dtype=F64, key=keys[0]),
                            eqx.nn.Linear(H, OUT, dtype=F64, key=keys[1]))


# name -> (the torch cell it matches, a factory of its float64 adapter with a readout; the
# factories are cached, so tests sharing an adapter share the trainer's compiled program)
ADAPTERS: dict[str, tuple[str, Callable[[], adapters.CellAdapter]]] = {
    "linen-LSTMCell": ("lstm", lambda: _linen(nn.LSTMCell(H, param_dtype=F64))),
    "linen-OptimizedLSTMCell": ("lstm", lambda: _linen(nn.OptimizedLSTMCell(H, param_dtype=F64))),
    "linen-GRUCell": ("gru", lambda: _linen(nn.GRUCell(H, param_dtype=F64))),
    "linen-SimpleCell": ("elman", lambda: _linen(nn.SimpleCell(H, param_dtype=F64))),
    "nnx-LSTMCell": ("lstm", lambda: _nnx(nnx.LSTMCell)),
    "nnx-OptimizedLSTMCell": ("lstm", lambda: _nnx(nnx.OptimizedLSTMCell)),
    "nnx-GRUCell": ("gru", lambda: _nnx(nnx.GRUCell)),
    # nnx's SimpleCell computes in float32 unless told (dtype=float32 by default).
    "nnx-SimpleCell": ("elman", lambda: _nnx(
        lambda *args, **kw: nnx.SimpleCell(*args, dtype=F64, **kw))),
    "equinox-LSTMCell": ("lstm", lambda: _equinox(eqx.nn.LSTMCell)),
    "equinox-GRUCell": ("gru", lambda: _equinox(eqx.nn.GRUCell)),
}
# The tests that compile most run for these by default, for every cell under -m slow.
ONE_PER_LIBRARY = ("linen-LSTMCell", "nnx-GRUCell", "equinox-GRUCell")
ADAPTERS = {name: (kind, functools.cache(make)) for name, (kind, make) in ADAPTERS.items()}
BUNDLED = {"lstm": tbptt_jax.models.lstm, "gru": tbptt_jax.models.gru,
           "elman": tbptt_jax.models.elman}


def _torch_layout(name: str, seed: int = 0) -> dict[str, jax.Array]:
    """Random torch-layout weights for the adapter `name` can hold exactly (nnx's GRU has no
    b_hn, so it is zero there)."""
    kind = ADAPTERS[name][0]
    params = BUNDLED[kind](IN, H, OUT).init(jax.random.key(seed), F64)
    if name == "nnx-GRUCell":
        params["rnn.bias_hh_l0"] = params["rnn.bias_hh_l0"].at[2 * H:].set(0.0)
    return params


def _canonical(adapter: adapters.CellAdapter, params: dict[str, jax.Array]
               ) -> dict[str, jax.Array]:
    """The same model with every folded bias moved into bias_ih (the split `to_torch_layout`
    makes)."""
    mask = adapter.redundant_torch_entries()["rnn.bias_hh_l0"]
    b_hh = params["rnn.bias_hh_l0"]
    return {**params, "rnn.bias_ih_l0": params["rnn.bias_ih_l0"] + jnp.where(mask, b_hh, 0.0),
            "rnn.bias_hh_l0": jnp.where(mask, 0.0, b_hh)}


def _data(seed: int = 0, reset_rate: float = 0.25):
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.standard_normal((T, B, IN)))
    ys = jnp.asarray(rng.standard_normal((T, B, OUT)))
    resets = jnp.asarray(rng.random((T, B)) < reset_rate)
    return xs, ys, resets


def _random_carry(adapter: adapters.CellAdapter, seed: int) -> Any:
    carry = adapter.initial_carry(B, F64)
    leaves, treedef = jax.tree.flatten(carry)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape, F64)
                                        for k, leaf in zip(keys, leaves, strict=True)])


def _max_gap(a: Any, b: Any) -> float:
    gaps = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y)))),
                        a, b)
    return max(jax.tree.leaves(gaps))


def _freeze(mask: dict[str, Any]) -> optax.GradientTransformation:
    """Zeroes the gradient of the masked entries, so Adam never moves them (zero moments)."""

    def update(updates, state, params=None):
        del params
        return {k: jnp.where(mask[k], 0.0, g) if k in mask else g
                for k, g in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# (a) a plain function


def _plain_gru(params: dict[str, Any], carry: dict[str, jax.Array], xs: jax.Array,
               resets: jax.Array | None = None) -> tuple[dict[str, jax.Array], jax.Array]:
    """A user's own GRU: nested params, a dict carry, written step by step."""

    def step(carry, inputs):
        x, reset = inputs
        h = carry["h"] if reset is None else jnp.where(reset[:, None], 0.0, carry["h"])
        w, u = params["gates"]["w"], params["gates"]["u"]
        b = {name: bias[None, :] for name, bias in params["gates"]["b"].items()}
        r = jax.nn.sigmoid(x @ w["r"] + h @ u["r"] + b["r"])
        z = jax.nn.sigmoid(x @ w["z"] + h @ u["z"] + b["z"])
        n = jnp.tanh(x @ w["n"] + b["n"] + r * (h @ u["n"] + b["hn"]))
        h = (1 - z) * n + z * h
        return {"h": h}, h @ params["out"]["w"] + params["out"]["b"][None, :]

    return jax.lax.scan(step, carry, (xs, resets))


def _plain_from_torch(p: dict[str, jax.Array]) -> dict[str, Any]:
    w = dict(zip("rzn", jnp.split(p["rnn.weight_ih_l0"], 3), strict=True))
    u = dict(zip("rzn", jnp.split(p["rnn.weight_hh_l0"], 3), strict=True))
    b_ih = dict(zip("rzn", jnp.split(p["rnn.bias_ih_l0"], 3), strict=True))
    b_hh = dict(zip("rzn", jnp.split(p["rnn.bias_hh_l0"], 3), strict=True))
    return {"gates": {"w": {g: w[g].T for g in "rzn"}, "u": {g: u[g].T for g in "rzn"},
                      "b": {"r": b_ih["r"] + b_hh["r"], "z": b_ih["z"] + b_hh["z"],
                            "n": b_ih["n"], "hn": b_hh["n"]}},
            "out": {"w": p["head.weight"].T, "b": p["head.bias"]}}


def test_plain_function_trains_as_it_is():
    """A plain apply_fn with its own parameter tree and a dict carry goes to the trainer
    unchanged, and trains as the bundled GRU with the same weights (whose r and z hidden
    biases, which the plain function folds into one, are held at zero)."""
    model = tbptt_jax.models.gru(IN, H, OUT)
    mask = {"rnn.bias_hh_l0": np.repeat([True, True, False], H)}
    torch_params = model.init(jax.random.key(0), F64)
    torch_params["rnn.bias_hh_l0"] = jnp.where(mask["rnn.bias_hh_l0"], 0.0,
                                               torch_params["rnn.bias_hh_l0"])
    xs, ys, resets = _data()
    adam = optax.adam(0.05)
    frozen_adam = optax.chain(_freeze(mask), optax.adam(0.05))
    options = dict(loss_fn=tbptt_jax.losses.mse, k1=3, resets=resets, trace=True)
    plain = _plain_from_torch(torch_params)
    _, _, carry, metrics = tbptt_jax.tbptt_train_step(
        plain, adam.init(plain), {"h": jnp.zeros((B, H), F64)}, xs, ys,
        apply_fn=_plain_gru, optimizer=adam, **options)
    _, _, reference_carry, reference = tbptt_jax.tbptt_train_step(
        torch_params, frozen_adam.init(torch_params), model.initial_carry(B, F64), xs, ys,
        apply_fn=model.apply, optimizer=frozen_adam, **options)

    assert metrics["loss"].shape == (3,)
    np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-12, atol=0)
    for u in range(3):
        expected = _plain_from_torch(jax.tree.map(lambda a, u=u: a[u], reference["params"]))
        assert _max_gap(jax.tree.map(lambda a, u=u: a[u], metrics["params"]), expected) < 1e-12
    assert _max_gap(carry["h"], reference_carry[0]) < 1e-12


def test_plain_function_needs_an_explicit_carry():
    xs, ys, _ = _data()
    params = _plain_from_torch(tbptt_jax.models.gru(IN, H, OUT).init(jax.random.key(0), F64))
    with pytest.raises(ValueError, match="carry: None means the model's zero carry"):
        tbptt_jax.tbptt_train_step(params, optax.sgd(0.1).init(params), None, xs, ys,
                                   apply_fn=_plain_gru, loss_fn=tbptt_jax.losses.mse,
                                   optimizer=optax.sgd(0.1), k1=3)


def test_plain_function_with_a_wrong_carry_is_refused():
    xs, ys, _ = _data()
    params = _plain_from_torch(tbptt_jax.models.gru(IN, H, OUT).init(jax.random.key(0), F64))
    with pytest.raises(ValueError, match="the model fails on the carry"):
        tbptt_jax.tbptt_train_step(params, optax.sgd(0.1).init(params),
                                   {"h": jnp.zeros((B, H + 1), F64)}, xs, ys,
                                   apply_fn=_plain_gru, loss_fn=tbptt_jax.losses.mse,
                                   optimizer=optax.sgd(0.1), k1=3)


# (b) scan equals loop, over the library's own cell


def _library_step(adapter: Any, params: Any, carry: Any, x: jax.Array) -> tuple[Any, Any]:
    """One step of the library's cell and readout, called as the library documents."""
    name = type(adapter).__name__
    if name == "LinenAdapter":
        carry, h = adapter.cell.apply({"params": params["cell"]}, carry, x)
        return carry, adapter.readout.apply({"params": params["readout"]}, h)
    if name == "NnxAdapter":
        cell, readout = adapter.modules(params)
        carry, h = cell(carry, x)
        return carry, readout(h)
    cell, readout = adapter.modules(params)
    carry = jax.vmap(cell)(x, carry)
    h = carry[0] if isinstance(carry, tuple) else carry
    return carry, jax.vmap(readout)(h)


@pytest.mark.parametrize("name", [name if name in ONE_PER_LIBRARY else
                                  pytest.param(name, marks=pytest.mark.slow) for name in ADAPTERS])
def test_scan_equals_loop(name):
    adapter = ADAPTERS[name][1]()
    params = adapter.init(jax.random.key(0))
    xs, _, resets = _data(1)
    carry = _random_carry(adapter, 5)
    final, ys = adapter.apply(params, carry, xs, resets)

    initial = adapter.initial_carry(B, F64)
    loop_ys = []
    for t in range(T):
        carry = jax.tree.map(lambda h, h0, t=t: jnp.where(resets[t][:, None], h0, h),
                             carry, initial)
        carry, y = _library_step(adapter, params, carry, xs[t])
        loop_ys.append(y)
    assert ys.shape == (T, B, OUT)
    assert _max_gap(ys, jnp.stack(loop_ys)) < 1e-13
    assert _max_gap(final, carry) < 1e-13


@pytest.mark.parametrize("name", ["equinox-LSTMCell"])
def test_batch_major_is_time_major_transposed(name):
    adapter = ADAPTERS[name][1]()
    params = adapter.init(jax.random.key(0))
    xs, _, resets = _data(2)
    carry = _random_carry(adapter, 6)
    final, ys = adapter.apply(params, carry, xs, resets)
    final_bm, ys_bm = adapter.apply(params, carry, jnp.swapaxes(xs, 0, 1), resets.T,
                                    time_major=False)
    assert ys_bm.shape == (B, T, OUT)
    assert _max_gap(ys_bm, jnp.swapaxes(ys, 0, 1)) == 0.0
    assert _max_gap(final_bm, final) == 0.0


def test_a_reset_hides_a_nan_carry():
    """A NaN in a finished sequence's carry does not reach its next episode (a select)."""
    adapter = ADAPTERS["linen-LSTMCell"][1]()
    params = adapter.init(jax.random.key(0))
    xs, _, _ = _data(3)
    carry = jax.tree.map(lambda leaf: leaf.at[1].set(jnp.nan), _random_carry(adapter, 7))
    resets = jnp.zeros((T, B), bool).at[0, 1].set(True)
    _, ys = adapter.apply(params, carry, xs, resets)
    _, fresh = adapter.apply(params, adapter.initial_carry(B, F64), xs)
    assert bool(jnp.all(jnp.isfinite(ys)))
    assert _max_gap(ys[:, 1], fresh[:, 1]) == 0.0


# (c) converted from the torch layout: the bundled model's outputs


@pytest.mark.parametrize("name", ADAPTERS)
def test_converted_model_computes_the_bundled_models_outputs(name):
    kind, make = ADAPTERS[name]
    adapter = make()
    model = BUNDLED[kind](IN, H, OUT)
    torch_params = _torch_layout(name)
    params = adapter.from_torch_layout(torch_params)
    assert jax.tree.structure(params) == jax.tree.structure(adapter.init(jax.random.key(0)))
    xs, _, resets = _data(4)
    torch_carry = jax.tree.map(lambda leaf: leaf[None], _random_carry(adapter, 8))
    if kind == "lstm" and type(adapter).__name__ != "EquinoxAdapter":
        torch_carry = torch_carry[::-1]  # flax's (c, h) drawn; torch's order is (h, c)
    final, ys = adapter.apply(params, adapter.carry_from_torch(torch_carry), xs, resets)
    expected_final, expected = model.apply(torch_params, torch_carry, xs, resets)
    assert _max_gap(ys, expected) < 1e-13
    assert _max_gap(adapter.carry_to_torch(final), expected_final) < 1e-13


# (d) round trips


@pytest.mark.parametrize("name", ADAPTERS)
def test_conversions_round_trip(name):
    adapter = ADAPTERS[name][1]()
    params = adapter.init(jax.random.key(0))
    torch_params = adapter.to_torch_layout(params)
    assert _max_gap(adapter.from_torch_layout(torch_params), params) == 0.0
    mask = adapter.redundant_torch_entries()["rnn.bias_hh_l0"]
    assert bool(jnp.all(torch_params["rnn.bias_hh_l0"][mask] == 0.0))

    canonical = _canonical(adapter, _torch_layout(name))
    assert _max_gap(adapter.to_torch_layout(adapter.from_torch_layout(canonical)),
                    canonical) == 0.0

    carry = _random_carry(adapter, 9)
    assert _max_gap(adapter.carry_from_torch(adapter.carry_to_torch(carry)), carry) == 0.0
    torch_carry = adapter.carry_to_torch(carry)
    assert jax.tree.map(jnp.shape, torch_carry) == jax.tree.map(
        jnp.shape, tbptt_jax.models.lstm(IN, H, OUT).initial_carry(B)
        if ADAPTERS[name][0] == "lstm" else tbptt_jax.models.gru(IN, H, OUT).initial_carry(B))


def test_flax_lstm_carry_order_is_c_then_h():
    """flax keeps (c, h), torch (h, c): the conversion swaps them, equinox's is torch's."""
    h, c = jnp.full((1, B, H), 1.0), jnp.full((1, B, H), 2.0)
    flax_carry = ADAPTERS["linen-LSTMCell"][1]().carry_from_torch((h, c))
    assert float(flax_carry[0][0, 0]) == 2.0 and float(flax_carry[1][0, 0]) == 1.0
    nnx_carry = ADAPTERS["nnx-LSTMCell"][1]().carry_from_torch((h, c))
    assert float(nnx_carry[0][0, 0]) == 2.0 and float(nnx_carry[1][0, 0]) == 1.0
    eqx_carry = ADAPTERS["equinox-LSTMCell"][1]().carry_from_torch((h, c))
    assert float(eqx_carry[0][0, 0]) == 1.0 and float(eqx_carry[1][0, 0]) == 2.0


def test_redundant_entries_name_the_folded_biases():
    def blocks(name):
        return ADAPTERS[name][1]().redundant_torch_entries()["rnn.bias_hh_l0"].reshape(
            -1, H).all(axis=1).tolist()

    assert blocks("linen-LSTMCell") == [True, True, True, True]
    assert blocks("linen-GRUCell") == [True, True, False]  # hn keeps its own bias
    assert blocks("nnx-GRUCell") == [True, True, True]  # no b_hn at all
    assert blocks("equinox-GRUCell") == [True, True, False]  # bias_n
    assert blocks("linen-SimpleCell") == [True]


def test_modules_hold_the_trained_params():
    for name in ("nnx-GRUCell", "equinox-GRUCell"):
        adapter = ADAPTERS[name][1]()
        params = adapter.from_torch_layout(_torch_layout(name, seed=4))
        xs, _, _ = _data(5)
        carry = _random_carry(adapter, 10)
        _, ys = adapter.apply(params, carry, xs)
        cell, readout = adapter.modules(params)
        rebuilt = (adapters.nnx if name.startswith("nnx") else adapters.equinox)(cell, readout)
        _, rebuilt_ys = rebuilt.apply(rebuilt.init(jax.random.key(1)), carry, xs)
        assert _max_gap(rebuilt_ys, ys) == 0.0


# (e) the trainer


def _per_update(adapter: adapters.CellAdapter, stacked: Any, updates: int
                ) -> dict[str, np.ndarray]:
    layouts = [adapter.to_torch_layout(jax.tree.map(lambda a, u=u: a[u], stacked))
               for u in range(updates)]
    return {k: np.stack([layout[k] for layout in layouts]) for k in layouts[0]}


@pytest.mark.slow  # parity_tests/test_adapters_parity.py holds the trainer to torch by default
@pytest.mark.parametrize("name", ADAPTERS)
def test_trainer_follows_the_bundled_model_with_folded_entries_frozen(name):
    kind, make = ADAPTERS[name]
    adapter = make()
    model = BUNDLED[kind](IN, H, OUT)
    mask = adapter.redundant_torch_entries()
    torch_params = _canonical(adapter, _torch_layout(name, seed=1))
    params = adapter.from_torch_layout(torch_params)
    xs, ys, resets = _data(6)
    options = dict(loss_fn=tbptt_jax.losses.mse, k1=2, k2=3, trace=True)
    adam = optax.adam(0.05)
    frozen_adam = optax.chain(_freeze(mask), optax.adam(0.05))

    ours, theirs = [], []
    state, opt_state = adapter.initial_carry(B, F64), adam.init(params)
    ref_state, ref_opt_state = model.initial_carry(B, F64), frozen_adam.init(torch_params)
    ref_params = torch_params
    for segment in (slice(0, 4), slice(4, T)):  # two calls of one stream
        params, opt_state, state, metrics = tbptt_jax.tbptt_train_step(
            params, opt_state, state, xs[segment], ys[segment], apply_fn=adapter.apply,
            optimizer=adam, resets=resets[segment], **options)
        ref_params, ref_opt_state, ref_state, reference = tbptt_jax.tbptt_train_step(
            ref_params, ref_opt_state, ref_state, xs[segment], ys[segment],
            apply_fn=model.apply, optimizer=frozen_adam, resets=resets[segment], **options)
        ours.append(metrics)
        theirs.append(reference)

    for metrics, reference in zip(ours, theirs, strict=True):
        updates = metrics["loss"].shape[0]
        np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-12, atol=0)
        expected_grads = {k: np.where(mask[k], 0.0, g) if k in mask else np.asarray(g)
                          for k, g in reference["grads"].items()}
        assert _max_gap(_per_update(adapter, metrics["grads"], updates), expected_grads) < 1e-12
        assert _max_gap(_per_update(adapter, metrics["params"], updates),
                        dict(reference["params"])) < 1e-12
    assert isinstance(state, tbptt_jax.OverlapCarry)
    assert _max_gap(adapter.carry_to_torch(state.state), ref_state.state) < 1e-12


def test_same_adapter_does_not_recompile():
    from tbptt_jax._trainer import _jitted_step

    adapter = ADAPTERS["equinox-LSTMCell"][1]()
    params = adapter.init(jax.random.key(0))
    optimizer = optax.sgd(0.01)
    xs, ys, _ = _data(7)
    step = dict(apply_fn=adapter.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=3)
    params, opt_state, carry, _ = tbptt_jax.tbptt_train_step(
        params, optimizer.init(params), adapter.initial_carry(B), xs, ys, **step)
    compiled = _jitted_step._cache_size()
    _, _, _, metrics = tbptt_jax.tbptt_train_step(params, opt_state, carry, xs, ys, **step)
    assert _jitted_step._cache_size() == compiled
    assert metrics["loss"].shape == (3,)


# (f) what cannot convert exactly


def test_nnx_gru_refuses_a_nonzero_b_hn():
    adapter = ADAPTERS["nnx-GRUCell"][1]()
    torch_params = tbptt_jax.models.gru(IN, H, OUT).init(jax.random.key(0), F64)
    largest = float(jnp.max(jnp.abs(torch_params["rnn.bias_hh_l0"][2 * H:])))
    with pytest.raises(ValueError, match=rf"rnn\.bias_hh_l0\[8:12\] \(b_hn.*flax\.nnx\.GRUCell "
                                         rf"has no b_hn.*largest magnitude is {largest:.6g}"):
        adapter.from_torch_layout(torch_params)


@pytest.mark.parametrize("change, message", [
    (lambda p: {k: v for k, v in p.items() if k != "head.bias"}, r"missing \['head.bias'\]"),
    (lambda p: {**p, "rnn.weight_ih_l1": p["rnn.weight_hh_l0"]},
     r"unexpected \['rnn.weight_ih_l1'\].*one recurrent layer"),
    (lambda p: {**p, "rnn.weight_hh_l0": p["rnn.weight_hh_l0"][:, :-1]},
     r"params\['rnn.weight_hh_l0'\] must have shape \(16, 4\), got \(16, 3\)"),
    (lambda p: list(p.values()), "params must be a dict keyed as the torch state_dict"),
])
def test_wrong_torch_layout_is_refused(change, message):
    adapter = ADAPTERS["linen-LSTMCell"][1]()
    with pytest.raises(ValueError, match=message):
        adapter.from_torch_layout(change(_torch_layout("linen-LSTMCell")))


class _MyCell(nn.Module):
    features: int

    @nn.compact
    def __call__(self, carry, x):
        h = jnp.tanh(nn.Dense(self.features)(x) + carry)
        return h, h

    def initialize_carry(self, key, input_shape):
        return jnp.zeros((*input_shape[:-1], self.features))


@pytest.mark.parametrize("make, message", [
    (lambda: adapters.linen(_MyCell(H), input_size=IN),
     "converts flax.linen LSTMCell, OptimizedLSTMCell, GRUCell and SimpleCell; got cell of "
     "type _MyCell"),
    (lambda: adapters.linen(nn.LSTMCell(H, activation_fn=jax.nn.relu), input_size=IN),
     "cell.activation_fn must be tanh for torch's lstm"),
    (lambda: adapters.linen(nn.GRUCell(H, gate_fn=jax.nn.hard_sigmoid), input_size=IN),
     "cell.gate_fn must be sigmoid for torch's gru"),
    (lambda: adapters.linen(nn.SimpleCell(H, residual=True), input_size=IN),
     "cell.residual must be False"),
    (lambda: adapters.linen(nn.SimpleCell(H), input_size=IN,
                            readout=nn.Sequential([nn.Dense(OUT)])),
     "readout must be flax.linen.Dense, got Sequential"),
    (lambda: adapters.nnx(nnx.SimpleCell(IN, H, residual=True, rngs=nnx.Rngs(0))),
     "cell.residual must be False"),
    (lambda: adapters.equinox(eqx.nn.GRUCell(IN, H, key=jax.random.key(0)),
                              eqx.nn.MLP(H, OUT, 4, 1, key=jax.random.key(1))),
     "readout must be equinox.nn.Linear"),
])
def test_cells_without_a_torch_twin_are_refused(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make().to_torch_layout({})


def test_custom_cells_train_without_conversion():
    """A cell of one's own needs no torch twin to be trained."""
    adapter = adapters.linen(_MyCell(H), input_size=IN)
    params = jax.tree.map(lambda p: p.astype(F64), adapter.init(jax.random.key(0)))
    xs, _, resets = _data(8)
    optimizer = optax.sgd(0.1)
    new_params, _, _, metrics = tbptt_jax.tbptt_train_step(
        params, optimizer.init(params), adapter.initial_carry(B, F64), xs,
        jnp.zeros((T, B, H)), apply_fn=adapter.apply, loss_fn=tbptt_jax.losses.mse,
        optimizer=optimizer, k1=3, resets=resets)
    assert metrics["loss"].shape == (3,)
    assert bool(jnp.all(jnp.isfinite(metrics["loss"])))
    reference = adapter.apply(params, adapter.initial_carry(B, F64), xs[:3], resets[:3])[1]
    np.testing.assert_allclose(metrics["loss"][0], jnp.mean(reference ** 2), rtol=1e-12)
    assert _max_gap(new_params, params) > 0.0


def test_biasless_modules_convert_only_zero_biases():
    keys = jax.random.split(jax.random.key(0))
    adapter = adapters.equinox(eqx.nn.LSTMCell(IN, H, use_bias=False, dtype=F64, key=keys[0]),
                               eqx.nn.Linear(H, OUT, use_bias=False, dtype=F64, key=keys[1]))
    torch_params = _torch_layout("equinox-LSTMCell")
    with pytest.raises(ValueError, match="the torch biases that make the cell's bias must be "
                                         "zero.*use_bias=False"):
        adapter.from_torch_layout(torch_params)
    zero = {k: (jnp.zeros_like(v) if k.startswith("rnn.bias") else v)
            for k, v in torch_params.items()}
    with pytest.raises(ValueError, match=r"head.bias must be zero .*use_bias=False"):
        adapter.from_torch_layout(zero)
    zero["head.bias"] = jnp.zeros_like(zero["head.bias"])
    assert _max_gap(adapter.to_torch_layout(adapter.from_torch_layout(zero)), zero) == 0.0


def test_wrong_torch_carry_and_resets_are_refused():
    adapter = ADAPTERS["linen-LSTMCell"][1]()
    with pytest.raises(ValueError, match=r"carry must be torch's LSTM carry \(h, c\)"):
        adapter.carry_from_torch(jnp.zeros((1, B, H)))
    with pytest.raises(ValueError, match=r"carry\[1\] must have torch's shape \[num_layers=1, "
                                         r"B, H=4\], got \(2, 3, 4\)"):
        adapter.carry_from_torch((jnp.zeros((1, B, H)), jnp.zeros((2, B, H))))
    params = adapter.init(jax.random.key(0))
    xs, _, resets = _data(9)
    with pytest.raises(ValueError, match=r"resets must be bool .* \(9, 3\) \(time-major\), "
                                         r"got bool of shape \(3, 9\)"):
        adapter.apply(params, adapter.initial_carry(B), xs, resets.T)


def test_adapter_arguments_are_checked():
    with pytest.raises(ValueError, match="input_size must be a positive int, got 0"):
        adapters.linen(nn.LSTMCell(H), input_size=0)
    with pytest.raises(ValueError, match="cell must be a flax.linen Module, got LSTMCell"):
        adapters.linen(eqx.nn.LSTMCell(IN, H, key=jax.random.key(0)), input_size=IN)
    with pytest.raises(ValueError, match="cell must be a flax.nnx Module, got LSTMCell"):
        adapters.nnx(nn.LSTMCell(H))
    with pytest.raises(ValueError, match="cell must be an equinox Module, got Linear"):
        adapters.equinox(nnx.Linear(IN, H, rngs=nnx.Rngs(0)))


# (g) without flax and equinox

WITHOUT_FLAX = """
import importlib.abc
import sys


class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "equinox"):
            raise ImportError(f"{name} is blocked for this test")
        return None


sys.meta_path.insert(0, Unimportable())
import tbptt_jax

assert "adapters" in tbptt_jax.__all__
try:
    tbptt_jax.adapters.linen(None, input_size=1)
except ImportError as error:
    print("ImportError:", error)
"""


def test_tbptt_jax_imports_without_flax_and_equinox():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(WITHOUT_FLAX)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ImportError: flax is blocked for this test"
