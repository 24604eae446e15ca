"""The trainers beyond one array in, one array out: the JAX trainer built once and composed
(jit, scan over epochs, vmap over seeds and learning rates), structured data, loss masks,
per-update keys, carries of any structure, token models, and a step that lowers for GPU
and TPU.

Float64 throughout; "equal" means equal to the last bit unless a tolerance is given.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch import nn

import tbptt_jax
import tbptt_torch
from tbptt_parity._harness import (
    assert_parity,
    make_models,
    random_sequences,
    run_both,
    run_jax,
    run_torch,
    tree_difference,
)

T, B, IN, H, OUT = 12, 3, 2, 5, 2
F64 = jnp.float64


def jax_losses(out: Any) -> np.ndarray:
    return np.asarray(out[3]["loss"])


@pytest.fixture(scope="module")
def lstm():
    return make_models("lstm", IN + 1, H, OUT, seed=3)


@pytest.fixture(scope="module")
def data():
    xs, ys, resets = random_sequences(T, B, IN + 1, OUT, seed=3, reset_rate=0.1)
    return xs, ys, resets


# Structured data: a dict of inputs and a dict of targets, against the same data packed into
# one array. The model reads obs and flag; the loss weighs each step's error by w.

def pack(xs, ys):
    return xs, np.concatenate([ys, np.linspace(0.5, 1.5, T * B).reshape(T, B, 1)], -1)


def structured(xs, ys):
    return ({"obs": xs[..., :IN], "flag": xs[..., IN]},
            {"y": ys[..., :OUT], "w": np.linspace(0.5, 1.5, T * B).reshape(T, B)})


def jax_structured_apply(model):
    def apply(params, carry, xs, resets=None):
        return model.apply(params, carry, jnp.concatenate(
            [xs["obs"], xs["flag"][..., None]], -1), resets)
    return apply


def jax_structured_loss(preds, ys):
    return ys["w"] * tbptt_jax.losses.mse(preds, ys["y"])


def jax_packed_loss(preds, ys):
    return ys[..., OUT] * tbptt_jax.losses.mse(preds, ys[..., :OUT])


class StructuredTorch(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def initial_carry(self, batch_size):
        return self.inner.initial_carry(batch_size)

    def forward(self, xs, carry, resets=None):
        return self.inner(torch.cat([xs["obs"], xs["flag"][..., None]], -1), carry, resets)


def torch_structured_loss(preds, ys):
    return ys["w"] * tbptt_torch.losses.mse(preds, ys["y"])


def torch_packed_loss(preds, ys):
    return ys[..., OUT] * tbptt_torch.losses.mse(preds, ys[..., :OUT])


@pytest.mark.parametrize("k2", [4, 7])
def test_jax_structured_data_trains_as_the_same_data_packed(lstm, data, k2):
    xs, ys, resets = data
    optimizer = optax.adam(0.01)
    common = dict(optimizer=optimizer, k1=4, k2=k2, resets=resets)
    carry = lstm.jax_model.initial_carry(B, F64)
    packed = tbptt_jax.tbptt_train_step(lstm.params, optimizer.init(lstm.params), carry,
                                        *pack(xs, ys), apply_fn=lstm.jax_model.apply,
                                        loss_fn=jax_packed_loss, **common)
    apply = jax_structured_apply(lstm.jax_model)
    whole = tbptt_jax.tbptt_train_step(lstm.params, optimizer.init(lstm.params), carry,
                                       *structured(xs, ys), apply_fn=apply,
                                       loss_fn=jax_structured_loss, **common)
    np.testing.assert_array_equal(jax_losses(whole), jax_losses(packed))
    assert tree_difference(whole[0], packed[0]) == 0.0
    # The same structured stream in two calls: its overlap travels as a dict of the inputs.
    inputs, targets = structured(xs, ys)
    params, opt_state, losses = lstm.params, optimizer.init(lstm.params), []
    for lo, hi in ((0, 8), (8, T)):
        params, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
            params, opt_state, carry,
            *jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (inputs, targets)),
            apply_fn=apply, loss_fn=jax_structured_loss, **{**common, "resets": resets[lo:hi]})
        losses.append(np.asarray(metrics["loss"]))
        if k2 > 4:
            assert set(carry.xs) == {"obs", "flag"} and carry.xs["flag"].shape == (k2 - 4, B)
    np.testing.assert_allclose(np.concatenate(losses), jax_losses(whole), rtol=1e-13)
    assert tree_difference(params, whole[0]) <= 1e-13  # another program's rounding


def test_torch_structured_data_trains_as_the_same_data_packed(lstm, data):
    xs, ys, resets = data
    runs = []
    for wrap, loss_fn, (inputs, targets) in (
            (lambda m: m, torch_packed_loss, pack(xs, ys)),
            (StructuredTorch, torch_structured_loss, structured(xs, ys))):
        model = make_models("lstm", IN + 1, H, OUT, seed=3).torch_model
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        carry, losses = tbptt_torch.tbptt_train_step(
            wrap(model), optimizer, None, inputs, targets, loss_fn=loss_fn, k1=4, k2=7,
            resets=resets)
        runs.append((losses.numpy(), {k: v.detach().numpy() for k, v in
                                      model.state_dict().items()}, carry))
    (packed_losses, packed_params, _), (losses, params, carry) = runs
    np.testing.assert_array_equal(losses, packed_losses)
    assert tree_difference(params, packed_params) == 0.0
    assert set(carry.xs) == {"obs", "flag"} and tuple(carry.xs["flag"].shape) == (3, B)


def test_torch_structured_stream_in_segments_trains_as_one_call(lstm, data):
    xs, ys, resets = data
    inputs, targets = structured(xs, ys)
    runs = []
    for bounds in ((0, T), (0, 8, T)):
        model = make_models("lstm", IN + 1, H, OUT, seed=3).torch_model
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        carry, losses = None, []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            carry, segment_losses = tbptt_torch.tbptt_train_step(
                StructuredTorch(model), optimizer, carry,
                *jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (inputs, targets)),
                loss_fn=torch_structured_loss, k1=4, k2=7, resets=resets[lo:hi])
            losses.append(segment_losses.numpy())
        runs.append((np.concatenate(losses), tbptt_torch.to_jax(model), carry))
    (whole, whole_params, whole_carry), (streamed, params, carry) = runs
    np.testing.assert_array_equal(streamed, whole)
    assert tree_difference(params, whole_params) == 0.0
    assert tree_difference(carry.state, whole_carry.state) == 0.0
    for name in ("obs", "flag"):
        np.testing.assert_array_equal(carry.xs[name].numpy(), whole_carry.xs[name].numpy())


# Structured predictions: the model returns a dict, the loss reads it.

def split_preds(preds):
    return {"first": preds[..., :1], "rest": preds[..., 1:]}


def jax_loss_of_split(preds, ys):
    return ys["w"] * tbptt_jax.losses.mse(
        jnp.concatenate([preds["first"], preds["rest"]], -1), ys["y"])


def torch_loss_of_split(preds, ys):
    return ys["w"] * tbptt_torch.losses.mse(
        torch.cat([preds["first"], preds["rest"]], -1), ys["y"])


class SplitTorch(StructuredTorch):
    def forward(self, xs, carry, resets=None):
        preds, carry = super().forward(xs, carry, resets)
        return split_preds(preds), carry


def test_the_parity_harness_takes_structured_data(lstm, data):
    """tbptt_parity's run_jax and run_torch take structured xs and ys as the trainers do:
    JAX and torch trajectories on the dicts agree to 1e-10, with resets, k2 > k1 and a mask."""
    xs, ys, resets = data
    inputs, targets = structured(xs, ys)
    mask = np.ones((T, B))
    mask[2:5, 1] = 0.0
    common = dict(k1=4, k2=7, resets=resets, mask=mask)
    optimizer = optax.adam(0.01)
    jax_run = run_jax(lstm.params, lstm.jax_model.initial_carry(B, F64), inputs, targets,
                      apply_fn=jax_structured_apply(lstm.jax_model),
                      loss_fn=jax_structured_loss, optimizer=optimizer, **common)
    model = make_models("lstm", IN + 1, H, OUT, seed=3).torch_model
    torch_run = run_torch(StructuredTorch(model), torch.optim.Adam(model.parameters(), lr=0.01),
                          None, inputs, targets, loss_fn=torch_structured_loss, **common)
    assert jax_run.losses.shape == (3,)
    assert_parity(jax_run, torch_run._replace(grads={
        name.removeprefix("inner."): grad for name, grad in torch_run.grads.items()},
        params={name.removeprefix("inner."): p for name, p in torch_run.params.items()}),
        1e-10)


# One JAX case (a compile each): "drop" runs both window paths and the dropped tail's advance.
@pytest.mark.parametrize(("framework", "tail"),
                         [("jax", "drop"), ("torch", "partial"), ("torch", "drop")])
def test_structured_predictions_train_as_one_array(lstm, data, framework, tail):
    xs, ys, resets = data
    inputs, targets = structured(xs, ys)
    common = dict(k1=5, k2=8, resets=resets, tail=tail)  # T=12: a tail of 2 steps
    runs = []
    for split in (False, True):
        if framework == "jax":
            plain = jax_structured_apply(lstm.jax_model)

            def apply(params, carry, xs, resets=None, plain=plain, split=split):
                carry, preds = plain(params, carry, xs, resets)
                return carry, split_preds(preds) if split else preds

            optimizer = optax.adam(0.01)
            params, _, _, metrics = tbptt_jax.tbptt_train_step(
                lstm.params, optimizer.init(lstm.params), lstm.jax_model.initial_carry(B, F64),
                inputs, targets,
                apply_fn=apply, loss_fn=jax_loss_of_split if split else jax_structured_loss,
                optimizer=optimizer, **common)
            runs.append((jax_losses((None, None, None, metrics)), params))
        else:
            model = make_models("lstm", IN + 1, H, OUT, seed=3).torch_model
            _, losses = tbptt_torch.tbptt_train_step(
                (SplitTorch if split else StructuredTorch)(model),
                torch.optim.Adam(model.parameters(), lr=0.01), None, inputs, targets,
                loss_fn=torch_loss_of_split if split else torch_structured_loss, **common)
            runs.append((losses.numpy(), tbptt_torch.to_jax(model)))
    (expected, expected_params), (losses, params) = runs
    assert losses.shape == ((3,) if tail == "partial" else (2,))
    np.testing.assert_array_equal(losses, expected)
    # JAX compiles the two models apart, and XLA may order a sum differently in each.
    assert tree_difference(params, expected_params) <= (1e-14 if framework == "jax" else 0.0)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_structure_whose_leaves_disagree_names_the_leaf(lstm, data, framework):
    xs, ys, _ = data
    bad_xs, bad_ys = structured(xs, ys)
    bad_xs["obs"] = bad_xs["obs"][:-1]  # leaves go in key order: flag, then obs
    message = "xs['obs'] must have the [T, B] of xs['flag'], expected (12, 3), got (11, 3)"
    with pytest.raises(ValueError, match=re.escape(message)):
        if framework == "jax":
            tbptt_jax.tbptt_train_step(
                lstm.params, optax.sgd(0.1).init(lstm.params), None, bad_xs, bad_ys,
                apply_fn=jax_structured_apply(lstm.jax_model), loss_fn=jax_structured_loss,
                optimizer=optax.sgd(0.1), k1=4)
        else:
            model = StructuredTorch(make_models("lstm", IN + 1, H, OUT, seed=3).torch_model)
            tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                         None, bad_xs, bad_ys, loss_fn=torch_structured_loss,
                                         k1=4)


# Loss masks.

@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["bool", "weights"])
def test_masks_train_alike_in_both_frameworks(reduction, kind):
    models = make_models("gru", IN, H, OUT, seed=4)
    xs, ys, _ = random_sequences(14, B, IN, OUT, seed=4)
    rng = np.random.default_rng(4)
    mask = rng.random((14, B)) < 0.7 if kind == "bool" else rng.uniform(0, 2, (14, B))
    mask[4:8] = 0  # the second update (k1=4) owns nothing: no step, NaN loss, in both
    from tbptt_parity._harness import optimizer_pair
    jax_run, torch_run = run_both(models, optimizer_pair("adam", 0.05), xs, ys, k1=4, k2=6,
                                  reduction=reduction, mask=mask)
    assert np.isnan(jax_run.losses[1]) and np.isnan(torch_run.losses[1])
    assert not np.isnan(np.delete(jax_run.losses, 1)).any()
    np.testing.assert_allclose(jax_run.losses, torch_run.losses, rtol=1e-10)
    for name in jax_run.params:
        np.testing.assert_allclose(jax_run.params[name], torch_run.params[name], rtol=1e-10,
                                   atol=1e-12, err_msg=name)
        # The empty update changed nothing.
        np.testing.assert_array_equal(jax_run.params[name][1], jax_run.params[name][0])


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_masked_term_adds_nothing_even_with_a_nan_target(framework):
    models = make_models("lstm", IN, H, OUT, seed=5)
    xs, ys, _ = random_sequences(8, B, IN, OUT, seed=5)
    mask = np.ones((8, B), bool)
    mask[2, 1] = mask[6, 0] = False
    poisoned = ys.copy()
    poisoned[2, 1] = poisoned[6, 0] = np.nan
    results = []
    for targets in (ys, poisoned):
        if framework == "jax":
            optimizer = optax.sgd(0.1)
            out = tbptt_jax.tbptt_train_step(
                models.params, optimizer.init(models.params), None, xs, targets,
                apply_fn=models.jax_model.apply, loss_fn=tbptt_jax.losses.mse,
                optimizer=optimizer, k1=4, mask=mask)
            results.append((jax_losses(out), out[0]))
        else:
            model = make_models("lstm", IN, H, OUT, seed=5).torch_model
            _, losses = tbptt_torch.tbptt_train_step(
                model, torch.optim.SGD(model.parameters(), lr=0.1), None, xs, targets,
                loss_fn=tbptt_torch.losses.mse, k1=4, mask=mask)
            results.append((losses.numpy(), tbptt_torch.to_jax(model)))
    (clean_losses, clean_params), (losses, params) = results
    np.testing.assert_array_equal(losses, clean_losses)
    assert tree_difference(params, clean_params) == 0.0


# The JAX trainer built once.

class Setup(NamedTuple):
    trainer: tbptt_jax.Trainer
    state: tbptt_jax.TBPTTState
    xs: np.ndarray
    ys: np.ndarray


def setup(k1=4, k2=6, optimizer=None, key=None) -> Setup:
    models = make_models("lstm", IN, H, OUT, seed=6)
    xs, ys, _ = random_sequences(T, B, IN, OUT, seed=6)
    trainer = tbptt_jax.trainer(models.jax_model.apply, tbptt_jax.losses.mse,
                                optimizer or optax.adam(0.02), k1=k1, k2=k2)
    return Setup(trainer, trainer.init(models.params, xs, key=key), xs, ys)


def test_the_trainer_steps_as_tbptt_train_step_and_compiles_once():
    from tbptt_jax._trainer import _jitted_step

    run = setup()
    state, first = run.trainer.step(run.state, run.xs, run.ys)
    compiled = _jitted_step._cache_size()
    state, second = run.trainer.step(state, run.xs, run.ys)
    assert _jitted_step._cache_size() == compiled
    assert int(state.updates) == 6 and int(state.overlap_steps) == 2
    models = make_models("lstm", IN, H, OUT, seed=6)
    optimizer = run.trainer.step.keywords["config"].optimizer
    params, opt_state, carry, one = tbptt_jax.tbptt_train_step(
        models.params, optimizer.init(models.params), None, run.xs, run.ys,
        apply_fn=models.jax_model.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer,
        k1=4, k2=6)
    _, _, _, two = tbptt_jax.tbptt_train_step(
        params, opt_state, carry, run.xs, run.ys, apply_fn=models.jax_model.apply,
        loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=4, k2=6)
    np.testing.assert_array_equal(np.asarray(first["loss"]), np.asarray(one["loss"]))
    np.testing.assert_array_equal(np.asarray(second["loss"]), np.asarray(two["loss"]))


def test_the_step_composes_with_jit_and_a_scan_over_epochs():
    run = setup()

    def epochs(state):
        return jax.lax.scan(lambda s, _: run.trainer.step(s, run.xs, run.ys), state, None,
                            length=3)

    scanned, metrics = jax.jit(epochs)(run.state)
    state, losses = run.state, []
    for _ in range(3):
        state, step_metrics = run.trainer.step(state, run.xs, run.ys)
        losses.append(np.asarray(step_metrics["loss"]))
    np.testing.assert_allclose(np.asarray(metrics["loss"]), np.stack(losses), rtol=1e-13)
    assert tree_difference(scanned.params, state.params) <= 1e-13


def test_the_step_composes_with_vmap_over_seeds_and_learning_rates():
    models = make_models("lstm", IN, H, OUT, seed=6)
    xs, ys, _ = random_sequences(T, B, IN, OUT, seed=6)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=0.02)
    trainer = tbptt_jax.trainer(models.jax_model.apply, tbptt_jax.losses.mse, optimizer,
                                k1=4, k2=6)
    seeds = [models.jax_model.init(jax.random.key(seed)) for seed in range(3)]
    rates = jnp.array([0.01, 0.02, 0.05])
    states = []
    for params, rate in zip(seeds, rates, strict=True):
        state = trainer.init(params, xs)
        state.opt_state.hyperparams["learning_rate"] = rate
        states.append(state)
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    vmapped, metrics = jax.vmap(lambda s: trainer.step(s, xs, ys))(batched)
    for index, state in enumerate(states):
        alone, alone_metrics = trainer.step(state, xs, ys)
        np.testing.assert_allclose(np.asarray(metrics["loss"][index]),
                                   np.asarray(alone_metrics["loss"]), rtol=1e-12)
        assert tree_difference(jax.tree.map(lambda leaf, i=index: leaf[i], vmapped.params),
                               alone.params) <= 1e-12


def test_raising_on_a_non_finite_loss_under_a_jit_is_a_clear_error():
    models = make_models("elman", IN, H, OUT, seed=7)
    xs, ys, _ = random_sequences(T, B, IN, OUT, seed=7)
    optimizer = optax.sgd(0.1)

    def train(params):
        return tbptt_jax.tbptt_train_step(
            params, optimizer.init(params), models.jax_model.initial_carry(B, F64), xs, ys,
            apply_fn=models.jax_model.apply, loss_fn=tbptt_jax.losses.mse,
            optimizer=optimizer, k1=4)

    with pytest.raises(ValueError, match=re.escape(
            "on_nonfinite='raise' needs the call's results, which a jax.jit, vmap or lax.scan "
            "around tbptt_train_step hides")):
        jax.jit(train)(models.params)


# Keys per update (dropout).

def dropout_apply(model):
    def apply(params, carry, xs, *, key):
        carry, preds = model.apply(params, carry, xs)
        keep = jax.random.bernoulli(key, 0.8, preds.shape)
        return carry, jnp.where(keep, preds / 0.8, 0.0)
    return apply


def test_a_stream_in_segments_sees_the_keys_of_one_call():
    models = make_models("lstm", IN, H, OUT, seed=8)
    xs, ys, _ = random_sequences(16, B, IN, OUT, seed=8)
    trainer = tbptt_jax.trainer(dropout_apply(models.jax_model), tbptt_jax.losses.mse,
                                optimizer=optax.adam(0.02), k1=4, k2=6)
    key, zero = jax.random.key(11), models.jax_model.initial_carry(B, F64)
    whole, whole_metrics = trainer.step(trainer.init(models.params, xs, zero, key=key), xs, ys)
    state, losses = trainer.init(models.params, xs, zero, key=key), []
    for lo in (0, 8):
        state, metrics = trainer.step(state, xs[lo:lo + 8], ys[lo:lo + 8])
        losses.append(np.asarray(metrics["loss"]))
    np.testing.assert_allclose(np.concatenate(losses), np.asarray(whole_metrics["loss"]),
                               rtol=1e-13)
    assert tree_difference(state.params, whole.params) <= 1e-13
    # The one-call form counts updates from updates_done.
    params, opt_state, carry, first = tbptt_jax.tbptt_train_step(
        models.params, optax.adam(0.02).init(models.params),
        models.jax_model.initial_carry(B, F64), xs[:8], ys[:8],
        apply_fn=trainer.step.keywords["config"].apply_fn, loss_fn=tbptt_jax.losses.mse,
        optimizer=trainer.step.keywords["config"].optimizer, k1=4, k2=6, key=key)
    *_, second = tbptt_jax.tbptt_train_step(
        params, opt_state, carry, xs[8:], ys[8:],
        apply_fn=trainer.step.keywords["config"].apply_fn, loss_fn=tbptt_jax.losses.mse,
        optimizer=trainer.step.keywords["config"].optimizer, k1=4, k2=6, key=key,
        updates_done=2)
    np.testing.assert_allclose(
        np.concatenate([np.asarray(first["loss"]), np.asarray(second["loss"])]),
        np.asarray(whole_metrics["loss"]), rtol=1e-13)
    # Another key drops other units.
    _, other = trainer.step(trainer.init(models.params, xs, zero, key=jax.random.key(12)), xs, ys)
    assert not np.array_equal(np.asarray(other["loss"]), np.asarray(whole_metrics["loss"]))


# Carries, dtypes and models of any kind.

class HC(NamedTuple):
    h: torch.Tensor
    c: torch.Tensor


CARRIES = {  # how a model may hold an LSTM's (h, c): pack, unpack
    "dict": (lambda h, c: {"h": h, "c": c}, lambda carry: (carry["h"], carry["c"])),
    "list": (lambda h, c: [h, c], tuple),
    "namedtuple": (HC, tuple),
}


class TokenLSTM(nn.Module):
    """An LSTM with an embedding in front (token ids in, no `.rnn`), whose carry has the
    structure `CARRIES[kind]` gives it."""

    def __init__(self, kind: str, vocabulary: int = 7):
        super().__init__()
        self.pack, self.unpack = CARRIES[kind]
        self.embed = nn.Embedding(vocabulary, IN)
        self.lstm = nn.LSTM(IN, H)
        self.out = nn.Linear(H, vocabulary)

    def forward(self, tokens, carry):
        hidden, (h, c) = self.lstm(self.embed(tokens), tuple(self.unpack(carry)))
        return self.out(hidden), self.pack(h, c)


@pytest.mark.parametrize("kind", list(CARRIES))
def test_torch_trains_a_token_model_with_a_carry_of_its_own_structure(kind):
    runs = []
    for structure in ("namedtuple", kind):
        torch.manual_seed(0)
        model = TokenLSTM(structure).double()
        tokens = torch.randint(0, 7, (9, B), generator=torch.Generator().manual_seed(1))
        zeros = torch.zeros(1, B, H, dtype=torch.float64)
        carry, losses = tbptt_torch.tbptt_train_step(
            model, torch.optim.SGD(model.parameters(), lr=0.1),
            model.pack(zeros, zeros.clone()), tokens[:-1], tokens[1:],
            loss_fn=tbptt_torch.losses.cross_entropy, k1=4, k2=6)
        runs.append((losses, carry))
    (reference, _), (losses, carry) = runs
    assert losses.shape == (2,) and bool(torch.isfinite(losses).all())
    torch.testing.assert_close(losses, reference, rtol=0, atol=0)
    assert type(carry.state) is type(CARRIES[kind][0](zeros, zeros))
    assert not any(part.requires_grad for part in CARRIES[kind][1](carry.state))
    assert carry.xs.dtype == torch.int64 and tuple(carry.xs.shape) == (2, B)


def test_torch_rejects_a_loss_that_is_not_per_step_and_sequence():
    models = make_models("lstm", IN, H, OUT, seed=9)
    xs, ys, _ = random_sequences(8, B, IN, OUT, seed=9)
    model = models.torch_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(
            "loss_fn must return per-step, per-sequence losses [t, b], expected shape (4, 3) "
            "for 4 steps, got (4, 3, 2)")):
        tbptt_torch.tbptt_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                                     xs, ys, loss_fn=lambda p, t: (p - t) ** 2, k1=4)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_a_none_carry_follows_the_params_dtype():
    models = make_models("gru", IN, H, OUT, seed=10, dtype=np.float32)
    xs, ys, _ = random_sequences(8, B, IN, OUT, seed=10, dtype=np.float32)
    optimizer = optax.sgd(0.1)
    _, _, carry, metrics = tbptt_jax.tbptt_train_step(
        models.params, optimizer.init(models.params), None, xs, ys,
        apply_fn=models.jax_model.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer,
        k1=4)
    assert carry.dtype == jnp.float32 and metrics["loss"].dtype == jnp.float32
    # The model's own default is the default float type, as its init's: they agree.
    assert lstm_default_dtypes() == {jnp.dtype(F64)}


def lstm_default_dtypes():
    model = tbptt_jax.models.lstm(IN, H, OUT)
    return {leaf.dtype for leaf in jax.tree.leaves(
        (model.init(jax.random.key(0)), model.initial_carry(B)))}


# Every cell's step lowers for GPU and TPU, with no CPU-only kernel in it.

@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_every_cells_step_lowers_for_gpu_and_tpu(cell):
    models = make_models(cell, IN, H, OUT, seed=13, dtype=np.float32)
    xs, ys, resets = random_sequences(T, B, IN, OUT, seed=13, dtype=np.float32, reset_rate=0.2)
    trainer = tbptt_jax.trainer(models.jax_model.apply, tbptt_jax.losses.mse,
                                optax.adam(0.01), k1=4, k2=7)
    state = trainer.init(models.params, xs, resets=True)
    exported = jax.export.export(jax.jit(trainer.step), platforms=["cuda", "tpu"])(
        state, xs, ys, resets=resets)
    assert exported.platforms == ("cuda", "tpu")
    text = exported.mlir_module()
    assert "tbptt_lstm" not in text  # the compiled CPU kernels stay on the CPU
    assert "stablehlo.while" in text  # the updates' scan, and the held windows'
