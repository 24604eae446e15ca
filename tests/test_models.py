"""The JAX models against their torch twins (SPEC §2), for Elman, GRU and LSTM, 1 and 2 layers.

Checked: parameter names, shapes and order equal the torch `state_dict()`; fresh weights are
drawn as torch draws them, U(-1/sqrt(H), 1/sqrt(H)); the carry has torch's layout; `apply`
equals a Python loop over `step` and, from torch's weights in float64, torch's forward to
1e-12, with and without resets; a reset replaces the carry by a select, so a NaN in a reset
row cannot reach its outputs; bad constructor arguments raise a `ValueError`.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tbptt_jax import models as jax_models
from tbptt_torch import models as torch_models
from tbptt_torch import to_jax

TWINS = {
    "elman": (jax_models.elman, torch_models.ElmanModel),
    "gru": (jax_models.gru, torch_models.GRUModel),
    "lstm": (jax_models.lstm, torch_models.LSTMModel),
}
CONFIGS = [pytest.param(cell, layers, id=f"{cell}-L{layers}")
           for cell in TWINS for layers in (1, 2)]
INPUT, HIDDEN, OUTPUT, BATCH, STEPS = 3, 4, 2, 3, 7
EXACT = {"rtol": 1e-12, "atol": 1e-12}


def make_pair(cell: str, num_layers: int, seed: int = 0,
              sizes: tuple[int, int, int] = (INPUT, HIDDEN, OUTPUT)):
    jax_factory, torch_class = TWINS[cell]
    torch.manual_seed(seed)
    torch_model = torch_class(*sizes, num_layers=num_layers).double()
    return jax_factory(*sizes, num_layers=num_layers), torch_model


@functools.cache
def jitted(cell: str, num_layers: int):
    """The JAX model with its `apply` and `step` jitted, compiled once per shape and worker."""
    model = TWINS[cell][0](INPUT, HIDDEN, OUTPUT, num_layers=num_layers)
    return jax.jit(model.apply), jax.jit(model.step)


def random_carry(cell: str, num_layers: int, seed: int) -> np.ndarray | tuple:
    rng = np.random.default_rng(seed)
    shape = (num_layers, BATCH, HIDDEN)
    if cell == "lstm":
        return (rng.normal(size=shape), rng.normal(size=shape))
    return rng.normal(size=shape)


def to_torch(carry):
    if isinstance(carry, tuple):
        return tuple(torch.tensor(np.asarray(part)) for part in carry)
    return torch.tensor(np.asarray(carry))


def to_numpy(carry):
    if isinstance(carry, tuple):
        return tuple(np.asarray(part.detach()) if isinstance(part, torch.Tensor)
                     else np.asarray(part) for part in carry)
    return np.asarray(carry.detach()) if isinstance(carry, torch.Tensor) else np.asarray(carry)


def assert_carry_close(actual, expected, **tolerance):
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert isinstance(actual, tuple) == isinstance(expected, tuple)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **tolerance)


def example_resets() -> np.ndarray:
    """Resets at step 0 (row 1), mid-sequence (rows 0 and 2 at different steps), and a step
    where every row restarts."""
    resets = np.zeros((STEPS, BATCH), bool)
    resets[0, 1] = resets[2, 0] = resets[4, 2] = True
    resets[5, :] = True
    return resets


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
def test_param_names_shapes_and_order_are_the_torch_state_dict(cell, num_layers):
    jax_model, torch_model = make_pair(cell, num_layers)
    torch_shapes = {name: tuple(t.shape) for name, t in torch_model.state_dict().items()}
    assert list(jax_model.param_shapes().items()) == list(torch_shapes.items())

    # Shapes and dtypes of `init` without running it: eval_shape compiles nothing. (Its dict
    # comes back in pytree order, sorted by key; the order is `param_shapes`'s.)
    params = jax.eval_shape(jax_model.init, jax.random.PRNGKey(0))
    assert sorted(params) == sorted(torch_shapes)
    assert {name: p.shape for name, p in params.items()} == torch_shapes
    # By default, JAX's default float type: float64 here, where the tests turn x64 on.
    assert {p.dtype for p in params.values()} == {jnp.dtype(jnp.float64)}
    params32 = jax.eval_shape(functools.partial(jax_model.init, dtype=jnp.float32),
                              jax.random.PRNGKey(0))
    assert {p.dtype for p in params32.values()} == {jnp.dtype(jnp.float32)}

    gates = {"elman": 1, "gru": 3, "lstm": 4}[cell]
    expected = {}
    for layer in range(num_layers):
        expected[f"rnn.weight_ih_l{layer}"] = (gates * HIDDEN, INPUT if layer == 0 else HIDDEN)
        expected[f"rnn.weight_hh_l{layer}"] = (gates * HIDDEN, HIDDEN)
        expected[f"rnn.bias_ih_l{layer}"] = (gates * HIDDEN,)
        expected[f"rnn.bias_hh_l{layer}"] = (gates * HIDDEN,)
    expected["head.weight"] = (OUTPUT, HIDDEN)
    expected["head.bias"] = (OUTPUT,)
    assert list(torch_shapes.items()) == list(expected.items())


def check_uniform(values: np.ndarray, bound: float, label: str) -> None:
    """`values` look like independent draws of U(-bound, bound).

    The tolerances are 5 to 6 standard errors for n draws (or the DKW bound at probability
    1e-6), so a correct draw fails far less than once in a million, while a wrong bound
    (e.g. 1/sqrt(fan_in) of the input side, or a normal draw) is off by many standard errors.
    """
    n = values.size
    assert np.all(np.abs(values) <= bound * (1 + 1e-6)), f"{label}: draws outside ±{bound}"
    # The extremes come close to the bound: P(max < bound*(1 - 40/n)) ~ exp(-20).
    assert values.max() >= bound * (1 - 40 / n), f"{label}: max {values.max()} << {bound}"
    assert values.min() <= -bound * (1 - 40 / n), f"{label}: min {values.min()} >> -{bound}"
    # Mean 0 with standard error bound/sqrt(3n).
    assert abs(values.mean()) <= 5 * bound / math.sqrt(3 * n), f"{label}: mean {values.mean()}"
    # Variance bound²/3; the sample variance has standard error bound² * sqrt(4 / (45 n)).
    assert abs(values.var() - bound**2 / 3) <= 6 * bound**2 * math.sqrt(4 / (45 * n)), (
        f"{label}: variance {values.var()} vs {bound**2 / 3}")
    # Uniform shape: the empirical CDF stays within DKW's bound of the uniform CDF.
    ordered = np.sort(values)
    cdf = (ordered + bound) / (2 * bound)
    gap = np.max(np.maximum(np.arange(1, n + 1) / n - cdf, cdf - np.arange(n) / n))
    assert gap <= math.sqrt(math.log(2 / 1e-6) / (2 * n)), f"{label}: KS distance {gap}"


@pytest.mark.parametrize("cell", list(TWINS))
def test_init_draws_uniformly_within_one_over_sqrt_hidden_as_torch(cell):
    # About 10k (Elman) to 75k (LSTM) draws: the statistics mean something. Two layers for
    # the LSTM cover every kind of parameter; one elsewhere keeps the compile short (each
    # parameter's draw compiles on its own).
    sizes = (48, 64, 40)
    jax_model, torch_model = make_pair(cell, 2 if cell == "lstm" else 1, sizes=sizes)
    bound = 1 / math.sqrt(64)
    init = jax.jit(jax_model.init)
    params = {name: np.asarray(p, np.float64)
              for name, p in init(jax.random.PRNGKey(3)).items()}
    torch_params = {name: t.numpy() for name, t in torch_model.state_dict().items()}
    for source, drawn in (("jax", params), ("torch", torch_params)):
        pooled = np.concatenate([p.ravel() for p in drawn.values()])
        assert pooled.size >= 9000
        check_uniform(pooled, bound, f"{source} {cell}")
        for name, p in drawn.items():
            assert np.all(np.abs(p) <= bound * (1 + 1e-6)), f"{source} {name}"
        # The head is as wide a draw as the recurrent layers (nn.Linear's default init).
        check_uniform(drawn["head.weight"].ravel(), bound, f"{source} {cell} head.weight")
    # Every parameter has its own key: no two tensors share draws.
    firsts = [p.ravel()[:8].tobytes() for p in params.values()]
    assert len(set(firsts)) == len(firsts)
    # Deterministic in the key, different for another key.
    again = init(jax.random.PRNGKey(3))
    other = init(jax.random.PRNGKey(4))
    for name, p in params.items():
        np.testing.assert_array_equal(np.asarray(again[name], np.float64), p)
        assert not np.array_equal(np.asarray(other[name], np.float64), p), name


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
def test_initial_carry_has_the_torch_layout(cell, num_layers):
    jax_model, torch_model = make_pair(cell, num_layers)
    shape = (num_layers, 5, HIDDEN)
    carry = jax_model.initial_carry(5, jnp.float32)
    carry64 = jax_model.initial_carry(5)  # the default float type, as init's default
    torch_carry = torch_model.initial_carry(5)
    if cell == "lstm":
        assert isinstance(carry, tuple) and isinstance(torch_carry, tuple)
        assert len(carry) == len(torch_carry) == 2
        parts = [*carry, *carry64, *torch_carry]
        # h and c are distinct tensors in torch: writing one must not write the other.
        assert torch_carry[0].data_ptr() != torch_carry[1].data_ptr()
    else:
        assert not isinstance(carry, tuple) and not isinstance(torch_carry, tuple)
        parts = [carry, carry64, torch_carry]
    for part in parts:
        assert tuple(part.shape) == shape
        assert np.all(np.asarray(part) == 0)
    assert {p.dtype for p in jax.tree.leaves(carry)} == {jnp.dtype(jnp.float32)}
    assert {p.dtype for p in jax.tree.leaves(carry64)} == {jnp.dtype(jnp.float64)}
    assert {p.dtype for p in jax.tree.leaves(torch_carry)} == {torch.float64}


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
def test_apply_equals_torch_forward_in_float64(cell, num_layers):
    _, torch_model = make_pair(cell, num_layers, seed=1)
    apply, _ = jitted(cell, num_layers)
    params = {name: jnp.asarray(p) for name, p in to_jax(torch_model).items()}
    assert {p.dtype for p in params.values()} == {jnp.dtype(jnp.float64)}
    xs = np.random.default_rng(2).normal(size=(STEPS, BATCH, INPUT))
    carry = random_carry(cell, num_layers, seed=3)
    jax_carry = jax.tree.map(jnp.asarray, carry)
    resets = example_resets()

    outputs = {}
    for name, step_resets in (("plain", None), ("reset", resets)):
        new_carry, ys = apply(params, jax_carry, jnp.asarray(xs),
                              None if step_resets is None else jnp.asarray(step_resets))
        with torch.no_grad():
            torch_ys, torch_carry = torch_model(
                torch.tensor(xs), to_torch(carry),
                None if step_resets is None else torch.tensor(step_resets))
        assert ys.shape == (STEPS, BATCH, OUTPUT) and ys.dtype == jnp.float64
        assert jax.tree.structure(new_carry) == jax.tree.structure(jax_carry)
        np.testing.assert_allclose(np.asarray(ys), torch_ys.numpy(), **EXACT)
        assert_carry_close(new_carry, torch_carry, **EXACT)
        outputs[name] = np.asarray(ys)

    # The resets change the outputs of exactly the rows and steps they reach.
    differs = np.max(np.abs(outputs["plain"] - outputs["reset"]), axis=-1) > 1e-9
    first_reset = np.argmax(resets, axis=0)
    expected = np.arange(STEPS)[:, None] >= first_reset[None, :]
    np.testing.assert_array_equal(differs, expected)


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
def test_apply_equals_a_loop_over_step(cell, num_layers):
    _, torch_model = make_pair(cell, num_layers, seed=4)
    apply, step = jitted(cell, num_layers)
    params = {name: jnp.asarray(p) for name, p in to_jax(torch_model).items()}
    xs = jnp.asarray(np.random.default_rng(5).normal(size=(STEPS, BATCH, INPUT)))
    carry = jax.tree.map(jnp.asarray, random_carry(cell, num_layers, seed=6))
    resets = jnp.asarray(example_resets())

    final, ys = apply(params, carry, xs, resets)
    looped = carry
    for t in range(STEPS):
        looped, y = step(params, looped, xs[t], resets[t])
        np.testing.assert_allclose(np.asarray(ys[t]), np.asarray(y), **EXACT)
    assert_carry_close(final, looped, **EXACT)


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
@pytest.mark.parametrize("with_resets", [False, True])
@pytest.mark.parametrize("sizes", [(INPUT, HIDDEN, OUTPUT), (INPUT, HIDDEN, 9)],
                         ids=["narrow-output", "wide-output"])
def test_apply_backward_equals_autodiff_of_the_step_loop(cell, num_layers, with_resets, sizes):
    """The kernels' hand-written backward pass against JAX's autodiff of the plain steps:
    the vector-Jacobian product with respect to params, carry and xs, with cotangents on
    both outputs (the final carry too: a window split at the hand-off feeds it on). With an
    output wider than the hidden state the readout's weight gradient is formed by
    `_kernels.project`'s own backward (the GRU's input projection's always is), with a
    narrower one by autodiff: both are held here."""
    jax_model, torch_model = make_pair(cell, num_layers, seed=10, sizes=sizes)
    params = {name: jnp.asarray(p) for name, p in to_jax(torch_model).items()}
    rng = np.random.default_rng(11)
    xs = jnp.asarray(rng.normal(size=(STEPS, BATCH, sizes[0])))
    carry = jax.tree.map(jnp.asarray, random_carry(cell, num_layers, seed=12))
    resets = jnp.asarray(example_resets()) if with_resets else None

    def looped(params, carry, xs):
        ys = []
        for t in range(STEPS):
            carry, y = jax_model.step(params, carry, xs[t], None if resets is None else resets[t])
            ys.append(y)
        return carry, jnp.stack(ys)

    def kernel(params, carry, xs):
        return jax_model.apply(params, carry, xs, resets)

    out, kernel_vjp = jax.vjp(kernel, params, carry, xs)
    expected_out, loop_vjp = jax.vjp(looped, params, carry, xs)
    cotangent = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), out)
    assert_carry_close(out, expected_out, **EXACT)
    got, expected = kernel_vjp(cotangent), loop_vjp(cotangent)
    for name in params:
        np.testing.assert_allclose(got[0][name], expected[0][name], err_msg=name, **EXACT)
    assert_carry_close(got[1], expected[1], **EXACT)
    np.testing.assert_allclose(got[2], expected[2], **EXACT)


def nan_carry(cell: str, num_layers: int, row: int):
    carry = random_carry(cell, num_layers, seed=7)
    for part in (carry if isinstance(carry, tuple) else (carry,)):
        part[:, row, :] = np.nan
    return carry


@pytest.mark.parametrize(("cell", "num_layers"), CONFIGS)
def test_a_reset_replaces_the_carry_so_a_nan_cannot_leak(cell, num_layers):
    jax_model, torch_model = make_pair(cell, num_layers, seed=8)
    apply, _ = jitted(cell, num_layers)
    params = {name: jnp.asarray(p) for name, p in to_jax(torch_model).items()}
    xs = np.random.default_rng(9).normal(size=(STEPS, BATCH, INPUT))
    zero = jax_model.initial_carry(BATCH, jnp.float64)

    # A NaN in row 0's carry, reset before step 0: row 0 runs as from the zero carry.
    carry = nan_carry(cell, num_layers, row=0)
    resets = np.zeros((STEPS, BATCH), bool)
    resets[0, 0] = True
    _, ys = apply(params, jax.tree.map(jnp.asarray, carry), jnp.asarray(xs),
                  jnp.asarray(resets))
    with torch.no_grad():
        torch_ys, _ = torch_model(torch.tensor(xs), to_torch(carry), torch.tensor(resets))
        fresh, _ = torch_model(torch.tensor(xs))
    for out in (np.asarray(ys), torch_ys.numpy()):
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[:, 0], fresh.numpy()[:, 0], **EXACT)

    # A NaN input at step 2 of row 0, reset before step 3: the NaN stops at the reset, and
    # from there row 0 runs as it does without the NaN (the reset forgets what came before).
    xs_nan = xs.copy()
    xs_nan[2, 0, :] = np.nan
    resets = np.zeros((STEPS, BATCH), bool)
    resets[3, 0] = True
    _, ys = apply(params, zero, jnp.asarray(xs_nan), jnp.asarray(resets))
    _, clean = apply(params, zero, jnp.asarray(xs), jnp.asarray(resets))
    with torch.no_grad():
        torch_ys, _ = torch_model(torch.tensor(xs_nan), None, torch.tensor(resets))
    clean = np.asarray(clean)
    for out in (np.asarray(ys), torch_ys.numpy()):
        assert np.all(np.isnan(out[2, 0]))
        assert np.all(np.isfinite(out[3:])) and np.all(np.isfinite(out[:, 1:]))
        np.testing.assert_allclose(out[3:], clean[3:], **EXACT)
        np.testing.assert_allclose(out[:, 1:], clean[:, 1:], **EXACT)


@pytest.mark.parametrize(("argument", "value"), [
    ("input_size", 0), ("hidden_size", -1), ("output_size", 2.5), ("num_layers", True),
    ("num_layers", "2"), ("num_layers", 0),
])
@pytest.mark.parametrize("cell", list(TWINS))
def test_invalid_sizes_raise_a_value_error_naming_them(cell, argument, value):
    sizes = {"input_size": 3, "hidden_size": 4, "output_size": 2, "num_layers": 1}
    sizes[argument] = value
    message = re.escape(f"{argument} must be a positive int, got {value!r}")
    jax_factory, torch_class = TWINS[cell]
    num_layers = sizes.pop("num_layers")
    with pytest.raises(ValueError, match=message):
        jax_factory(*sizes.values(), num_layers=num_layers)
    with pytest.raises(ValueError, match=message):
        torch_class(*sizes.values(), num_layers=num_layers)


def test_an_unknown_cell_raises_a_value_error():
    with pytest.raises(ValueError, match=re.escape(
            "cell must be one of ('elman', 'gru', 'lstm'), got 'rnn'")):
        jax_models.RecurrentModel("rnn", 3, 4, 2)
