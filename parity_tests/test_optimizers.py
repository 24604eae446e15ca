"""The optimizer table of docs/optimizers.md, proven: each row is an optax expression and a
`torch.optim` expression that train the same model on the same data along the same
trajectory, update by update, over 50 updates (SPEC §3).

Float64: per-update losses, gradients and parameters agree to 1e-10 relative, with and
without global-norm clipping (torch's `clip_grad_norm=` of the trainer, optax's
`tbptt_jax.optim.clip_by_global_norm_torch` first in the chain). By default the rows not in
`SLOW_ONLY` run on a two-layer LSTM (those in `CLIPPED_BY_DEFAULT` also clipped); the cross
of every row with Elman, GRU and LSTM at 1 and 2 layers, clipped and not, is marked slow.
Float32: a few rows to 1e-5 relative after 50 updates, each key against its scale over the
run (as in test_parity_float32.py). Learning-rate schedules step the torch scheduler once per
optimizer step (`optimizer.register_step_post_hook`), as optax advances its count.

Where torch and optax differ by design, the tests at the end run the plain optax
expression against torch and assert the gap: that it is real (far above 1e-10) and has the
size the formulas predict, measured at the first update where it appears.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from parity_tests.harness import (
    CELLS,
    ModelTriple,
    OptimizerPair,
    Trajectory,
    assert_parity,
    compare,
    make_models,
    random_sequences,
    relative_difference,
    run_jax,
    run_torch,
)
from tbptt_jax import losses as jax_losses
from tbptt_jax import optim
from tbptt_torch import losses as torch_losses

RTOL64, RTOL32 = 1e-10, 1e-5
UPDATES, K1, BATCH, INPUTS, HIDDEN, OUTPUTS = 50, 2, 3, 3, 6, 2
# Unclipped, the global gradient norms of these runs range from 0.02 to 1.2, with medians
# of 0.27 to 0.46 over the cells and depths: this clips part of the updates, not all (each
# clipped case asserts it).
MAX_NORM = 0.3
WEIGHT_DECAY = 1e-2
WARMUP, COSINE_STEPS = 10, 40


def _with_scheduler(make_optimizer: Callable[[Any], torch.optim.Optimizer],
                    make_scheduler: Callable[[torch.optim.Optimizer], Any]
                    ) -> Callable[[Any], torch.optim.Optimizer]:
    """An optimizer factory whose scheduler steps after every optimizer step, so update u
    (0-based) runs with the rate after u scheduler steps, as optax's schedule(count=u)."""
    def make(parameters: Any) -> torch.optim.Optimizer:
        optimizer = make_optimizer(parameters)
        scheduler = make_scheduler(optimizer)
        optimizer.register_step_post_hook(lambda *_: scheduler.step())
        return optimizer
    return make


def _sequential_warmup_cosine(optimizer: torch.optim.Optimizer) -> Any:
    lr = torch.optim.lr_scheduler
    return lr.SequentialLR(optimizer, [
        lr.LinearLR(optimizer, start_factor=0.1, total_iters=WARMUP),
        lr.CosineAnnealingLR(optimizer, T_max=COSINE_STEPS, eta_min=1e-4),
    ], milestones=[WARMUP])


# name -> (optax expression, torch expression); docs/optimizers.md shows the same table.
ROWS: dict[str, OptimizerPair] = {
    "sgd": OptimizerPair(
        optax.sgd(0.05),
        lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "momentum": OptimizerPair(
        optax.sgd(0.05, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    "nesterov": OptimizerPair(
        optax.sgd(0.05, momentum=0.9, nesterov=True),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-weight-decay": OptimizerPair(
        optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(0.05, momentum=0.9)),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=WEIGHT_DECAY)),
    "sgd-dampening": OptimizerPair(
        optim.sgd_torch(0.05, momentum=0.9, dampening=0.5, weight_decay=WEIGHT_DECAY),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, dampening=0.5,
                                   weight_decay=WEIGHT_DECAY)),
    "adam": OptimizerPair(
        optax.adam(0.01, b1=0.9, b2=0.999, eps=1e-8),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.999), eps=1e-8)),
    "adam-l2": OptimizerPair(
        optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.adam(0.01)),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=WEIGHT_DECAY)),
    "adamw": OptimizerPair(
        optax.adamw(0.01, weight_decay=WEIGHT_DECAY),
        lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=WEIGHT_DECAY)),
    "rmsprop": OptimizerPair(
        optax.rmsprop(0.003, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        lambda ps: torch.optim.RMSprop(ps, lr=0.003, alpha=0.99, eps=1e-8)),
    "rmsprop-centered": OptimizerPair(
        optax.rmsprop(0.003, decay=0.99, eps=1e-8, eps_in_sqrt=False, centered=True),
        lambda ps: torch.optim.RMSprop(ps, lr=0.003, alpha=0.99, eps=1e-8, centered=True)),
    "rmsprop-momentum": OptimizerPair(
        optax.rmsprop(0.001, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.9),
        lambda ps: torch.optim.RMSprop(ps, lr=0.001, momentum=0.9)),
    "rmsprop-torch": OptimizerPair(
        optim.rmsprop_torch(0.001, momentum=0.9, centered=True, weight_decay=WEIGHT_DECAY),
        lambda ps: torch.optim.RMSprop(ps, lr=0.001, momentum=0.9, centered=True,
                                       weight_decay=WEIGHT_DECAY)),
    "adagrad": OptimizerPair(
        optim.adagrad_torch(0.05),
        lambda ps: torch.optim.Adagrad(ps, lr=0.05)),
    "adagrad-options": OptimizerPair(
        optim.adagrad_torch(0.05, lr_decay=0.02, weight_decay=WEIGHT_DECAY,
                            initial_accumulator_value=0.1, eps=1e-6),
        lambda ps: torch.optim.Adagrad(ps, lr=0.05, lr_decay=0.02, weight_decay=WEIGHT_DECAY,
                                       initial_accumulator_value=0.1, eps=1e-6)),
    "adam-constant": OptimizerPair(
        optax.adam(optax.constant_schedule(0.01)),
        _with_scheduler(lambda ps: torch.optim.Adam(ps, lr=0.01),
                        lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0))),
    "adam-warmup": OptimizerPair(
        optax.adam(optim.float_count(
            optax.linear_schedule(0.001, 0.01, transition_steps=WARMUP))),
        _with_scheduler(lambda ps: torch.optim.Adam(ps, lr=0.01),
                        lambda opt: torch.optim.lr_scheduler.LinearLR(
                            opt, start_factor=0.1, total_iters=WARMUP))),
    "sgd-cosine": OptimizerPair(
        optax.sgd(optax.cosine_decay_schedule(0.1, decay_steps=UPDATES, alpha=0.01)),
        _with_scheduler(lambda ps: torch.optim.SGD(ps, lr=0.1),
                        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                            opt, T_max=UPDATES, eta_min=0.001))),
    "adam-warmup-cosine": OptimizerPair(
        optax.adam(optim.float_count(optax.warmup_cosine_decay_schedule(
            0.001, 0.01, warmup_steps=WARMUP, decay_steps=WARMUP + COSINE_STEPS,
            end_value=1e-4))),
        _with_scheduler(lambda ps: torch.optim.Adam(ps, lr=0.01), _sequential_warmup_cosine)),
    "rmsprop-momentum-warmup": OptimizerPair(
        optim.rmsprop_torch(optim.float_count(
            optax.linear_schedule(0.0001, 0.001, transition_steps=WARMUP)), momentum=0.9),
        _with_scheduler(lambda ps: torch.optim.RMSprop(ps, lr=0.001, momentum=0.9),
                        lambda opt: torch.optim.lr_scheduler.LinearLR(
                            opt, start_factor=0.1, total_iters=WARMUP))),
    "sgd-cosine-periodic": OptimizerPair(
        optax.sgd(optim.cosine_annealing_schedule(0.1, t_max=20, eta_min=0.001)),
        _with_scheduler(lambda ps: torch.optim.SGD(ps, lr=0.1),
                        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                            opt, T_max=20, eta_min=0.001))),
}
# Rows the default run checks with clipping too (every row is clipped under -m slow), and
# rows it leaves to -m slow altogether (their schedules are proven rate by rate below).
CLIPPED_BY_DEFAULT = ("nesterov", "adamw", "rmsprop")
SLOW_ONLY = ("momentum", "adam-l2", "rmsprop-centered", "rmsprop-momentum", "adagrad",
             "adam-constant", "adam-warmup", "sgd-cosine", "sgd-cosine-periodic")


class Models(NamedTuple):
    triple: ModelTriple
    xs: np.ndarray  # [UPDATES * K1, BATCH, INPUTS]
    ys: np.ndarray  # [UPDATES * K1, BATCH, OUTPUTS]


def _models(cell: str, num_layers: int, dtype: Any = np.float64) -> Models:
    xs, ys, _ = random_sequences(UPDATES * K1, BATCH, INPUTS, OUTPUTS, dtype=dtype, seed=1)
    return Models(make_models(cell, INPUTS, HIDDEN, OUTPUTS, num_layers=num_layers,
                              dtype=dtype), xs, ys)


def _norms(grads: dict[str, np.ndarray]) -> np.ndarray:
    """The global L2 norm of each update's gradient: [U]."""
    return np.sqrt(sum(np.sum(g.reshape(g.shape[0], -1).astype(np.float64) ** 2, axis=1)
                       for g in grads.values()))


def _torch_clipped(grads: dict[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """Each update's gradient scaled as `clip_grad_norm_` scales it (`grads`: key ->
    [U, *shape]), for comparing a JAX trace (which records the gradient before the optax
    chain) with the torch trainer's `p.grad` (clipped in place before the step)."""
    coefficient = np.minimum(max_norm / (_norms(grads) + optim.TORCH_CLIP_EPS), 1.0)
    return {key: (g * coefficient.reshape(-1, *[1] * (g.ndim - 1))).astype(g.dtype)
            for key, g in grads.items()}


def run_pair(models: Models, jax_optimizer: optax.GradientTransformation,
             torch_optimizer: Callable[[Any], torch.optim.Optimizer],
             clip: float | None = None, clip_jax_grads: bool = True
             ) -> tuple[Trajectory, Trajectory]:
    """(JAX, torch) trajectories of 50 updates from the same weights; with `clip`, torch's
    trainer clips by `clip_grad_norm=clip` and JAX runs `jax_optimizer` as given (put the
    clipping in it). The JAX gradients are then reported clipped as torch's are, unless
    `clip_jax_grads` is False."""
    triple = models.triple
    torch_model = copy.deepcopy(triple.torch_model)
    jax_run = run_jax(triple.params, triple.jax_model.initial_carry(BATCH, models.xs.dtype),
                      models.xs, models.ys, apply_fn=triple.jax_model.apply,
                      loss_fn=jax_losses.mse, optimizer=jax_optimizer, k1=K1)
    torch_run = run_torch(torch_model, torch_optimizer(torch_model.parameters()), None,
                          models.xs, models.ys, loss_fn=torch_losses.mse, k1=K1,
                          clip_grad_norm=clip)
    if clip is not None and clip_jax_grads:
        jax_run = jax_run._replace(grads=_torch_clipped(jax_run.grads, clip))
    return jax_run, torch_run


def run_row(models: Models, row: str, clip: bool) -> tuple[Trajectory, Trajectory]:
    pair = ROWS[row]
    if not clip:
        return run_pair(models, pair.optax, pair.torch)
    return run_pair(models, optax.chain(optim.clip_by_global_norm_torch(MAX_NORM), pair.optax),
                    pair.torch, clip=MAX_NORM)


def _case(cell: str, num_layers: int, row: str, clip: bool) -> Any:
    default = ((cell, num_layers) == ("lstm", 2) and row not in SLOW_ONLY
               and (not clip or row in CLIPPED_BY_DEFAULT))
    return pytest.param(cell, num_layers, row, clip, marks=() if default else (pytest.mark.slow,),
                        id=f"{cell}-{num_layers}layer-{row}" + ("-clipped" if clip else ""))


CASES = [_case(cell, num_layers, row, clip)
         for cell, num_layers, row, clip in itertools.product(CELLS, (1, 2), ROWS, (False, True))]


@pytest.mark.parametrize("cell, num_layers, row, clip", CASES)
def test_float64_parity_over_50_updates(cell, num_layers, row, clip):
    models = _models(cell, num_layers)
    jax_run, torch_run = run_row(models, row, clip)
    assert jax_run.losses.shape == (UPDATES,)
    assert_parity(jax_run, torch_run, RTOL64)
    if clip:  # both branches ran: some updates clipped (to norm MAX_NORM), some not
        norms = _norms(torch_run.grads)
        assert np.any(np.abs(norms / MAX_NORM - 1) < 1e-5) and np.any(norms < 0.99 * MAX_NORM)
    # The run went somewhere: every parameter moved far beyond the tolerance.
    for key, initial in models.triple.params.items():
        assert relative_difference(jax_run.params[key][-1], np.asarray(initial)) > 1e-4, key


FLOAT32_ROWS = ("momentum", "adamw", "rmsprop-centered", "adagrad", "adam-warmup-cosine")
FLOAT32_DEFAULT = (("momentum", False), ("adamw", True))


@pytest.mark.parametrize("row, clip", [
    pytest.param(row, clip, marks=() if (row, clip) in FLOAT32_DEFAULT else (pytest.mark.slow,),
                 id=row + ("-clipped" if clip else ""))
    for row, clip in [*((row, False) for row in FLOAT32_ROWS), ("adamw", True),
                      ("nesterov", True)]])
def test_float32_parity_after_50_updates(row, clip):
    models = _models("lstm", 2, np.float32)
    jax_run, torch_run = run_row(models, row, clip)
    for run in (jax_run, torch_run):
        assert run.losses.dtype == np.float32
        assert all(p.dtype == np.float32 for p in run.params.values())
    assert_parity(jax_run, torch_run, RTOL32, scale="trajectory")


# --- Schedules, compared as learning rates: optax's schedule(u) is the rate of update u
# (0-based), torch's is the optimizer's lr after u scheduler steps.

SCHEDULE_ROWS = {
    "constant": (optax.constant_schedule(0.01),
                 lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)),
    "linear-warmup": (optim.float_count(
        optax.linear_schedule(0.001, 0.01, transition_steps=WARMUP)),
                      lambda opt: torch.optim.lr_scheduler.LinearLR(
                          opt, start_factor=0.1, total_iters=WARMUP)),
    "cosine": (optax.cosine_decay_schedule(0.01, decay_steps=COSINE_STEPS, alpha=0.01),
               lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                   opt, T_max=COSINE_STEPS, eta_min=1e-4)),
    "cosine-periodic": (optim.cosine_annealing_schedule(0.01, t_max=COSINE_STEPS,
                                                        eta_min=1e-4),
                        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(
                            opt, T_max=COSINE_STEPS, eta_min=1e-4)),
    "warmup-cosine": (optim.float_count(optax.warmup_cosine_decay_schedule(
        0.001, 0.01, warmup_steps=WARMUP, decay_steps=WARMUP + COSINE_STEPS, end_value=1e-4)),
        _sequential_warmup_cosine),
}


def torch_rates(make_scheduler: Callable[[torch.optim.Optimizer], Any], steps: int,
                lr: float = 0.01) -> np.ndarray:
    """The rate each of `steps` updates runs with: [steps]."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(optimizer)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(rates)


def optax_rates(schedule: Callable[[Any], Any], steps: int) -> np.ndarray:
    """The rate of each of `steps` updates, evaluated as optax's optimizers do, at the int32
    count: [steps]."""
    return np.array([float(schedule(jnp.int32(count))) for count in range(steps)])


@pytest.mark.parametrize("name, steps", [
    ("constant", 100), ("linear-warmup", 100), ("cosine", COSINE_STEPS + 1),
    ("warmup-cosine", WARMUP + COSINE_STEPS + 1), ("cosine-periodic", 100)])
def test_schedule_rates_match(name, steps):
    """Rate by rate over `steps` updates (the cosines up to their end; see below for after)."""
    schedule, make_scheduler = SCHEDULE_ROWS[name]
    np.testing.assert_allclose(optax_rates(schedule, steps), torch_rates(make_scheduler, steps),
                               rtol=1e-13, atol=0)


def test_cosine_decay_matches_torch_only_until_t_max():
    """torch's CosineAnnealingLR is periodic: past T_max it climbs back towards the initial
    rate, while `optax.cosine_decay_schedule` stays at its end value."""
    schedule, make_scheduler = SCHEDULE_ROWS["cosine"]
    optax_lr, torch_lr = optax_rates(schedule, 100), torch_rates(make_scheduler, 100)
    np.testing.assert_allclose(optax_lr[:COSINE_STEPS + 1], torch_lr[:COSINE_STEPS + 1],
                               rtol=1e-13, atol=0)
    np.testing.assert_allclose(optax_lr[COSINE_STEPS + 1:], 1e-4, rtol=1e-15)
    # One step past T_max torch has risen by (lr - eta_min)(1 - cos(pi / T_max)) / 2.
    rise = (0.01 - 1e-4) * (1 - np.cos(np.pi / COSINE_STEPS)) / 2
    np.testing.assert_allclose(torch_lr[COSINE_STEPS + 1] - 1e-4, rise, rtol=1e-9)
    np.testing.assert_allclose(torch_lr[2 * COSINE_STEPS], 0.01, rtol=1e-12)


def test_stepping_the_scheduler_before_the_update_is_off_by_one():
    """Stepping the torch scheduler before each optimizer step (not after) runs update u
    with optax's schedule(u + 1): the warm-up ends one update early."""
    schedule, make_scheduler = SCHEDULE_ROWS["linear-warmup"]
    shifted = torch_rates(make_scheduler, 21)[1:]
    np.testing.assert_allclose(shifted, optax_rates(lambda c: schedule(c + 1), 20), rtol=1e-13)
    gaps = np.abs(shifted - optax_rates(schedule, 20)) / 0.01
    np.testing.assert_allclose(gaps[:WARMUP], 0.09, rtol=1e-12)  # one warm-up step, 0.9/10
    assert np.all(gaps[WARMUP:] < 1e-13)


# --- By-design differences: the plain optax expression against torch, and the gap.


def _head(run: Trajectory, updates: int) -> Trajectory:
    """The first `updates` updates of a trajectory (without the carry)."""
    return Trajectory(run.losses[:updates], {k: v[:updates] for k, v in run.grads.items()},
                      {k: v[:updates] for k, v in run.params.items()}, None)


def _step(run: Trajectory, initial: np.ndarray, key: str, update: int) -> np.ndarray:
    """The change update `update` made to parameter `key`."""
    previous = initial if update == 0 else run.params[key][update - 1]
    return run.params[key][update] - previous


def test_optax_clip_by_global_norm_divides_by_the_norm_alone():
    """`optax.clip_by_global_norm` scales by max_norm / norm, torch by max_norm / (norm +
    1e-6): at the first clipped update the SGD step of optax is larger by exactly the factor
    1 + 1e-6 / norm, and the trajectories part from there."""
    models = _models("lstm", 2)
    plain = optax.chain(optax.clip_by_global_norm(MAX_NORM), ROWS["sgd"].optax)
    jax_run, torch_run = run_pair(models, plain, ROWS["sgd"].torch, clip=MAX_NORM,
                                  clip_jax_grads=False)
    norms = _norms(jax_run.grads)  # before clipping
    first = int(np.argmax(norms > MAX_NORM))
    assert_parity(_head(jax_run, first), _head(torch_run, first), RTOL64)
    factor = 1 + 1e-6 / norms[first]
    for key, initial in models.triple.params.items():
        jax_step = _step(jax_run, np.asarray(initial), key, first)
        torch_step = _step(torch_run, np.asarray(initial), key, first)
        # Steps are differences of parameters, exact to about 1e-16 absolute.
        np.testing.assert_allclose(jax_step, torch_step * factor, rtol=1e-12, atol=2e-16,
                                   err_msg=key)
        gap = np.max(np.abs(jax_step - torch_step)) / np.max(np.abs(torch_step))
        np.testing.assert_allclose(gap, factor - 1, rtol=1e-3, err_msg=key)
    gaps = compare(jax_run, torch_run)
    assert 1e-9 < gaps["param"] < 1e-5, gaps


def test_optax_rmsprop_default_puts_eps_inside_the_root():
    """`optax.rmsprop`'s default `eps_in_sqrt=True` divides by sqrt(v + eps), torch by
    sqrt(v) + eps: already the first step differs, as the formulas predict."""
    models = _models("lstm", 2)
    jax_run, torch_run = run_pair(models, optax.rmsprop(0.003, decay=0.99, eps=1e-8),
                                  ROWS["rmsprop"].torch)
    # Same loss and gradient at the first update; its step differs.
    assert compare(_head(jax_run, 1), _head(torch_run, 1))["grad"] <= RTOL64
    for key, initial in models.triple.params.items():
        g = jax_run.grads[key][0]
        v = 0.01 * g ** 2
        np.testing.assert_allclose(_step(jax_run, np.asarray(initial), key, 0),
                                   -0.003 * g / np.sqrt(v + 1e-8), rtol=1e-10, atol=2e-16)
        np.testing.assert_allclose(_step(torch_run, np.asarray(initial), key, 0),
                                   -0.003 * g / (np.sqrt(v) + 1e-8), rtol=1e-10, atol=2e-16)
    gaps = compare(jax_run, torch_run)
    assert gaps["param"] > 1e-6, gaps


def test_optax_adagrad_puts_eps_inside_the_root_and_starts_at_0_1():
    """`optax.adagrad` divides by sqrt(s + eps) with s starting at 0.1 (eps 1e-7); torch by
    sqrt(s) + eps with s starting at 0 (eps 1e-10). With torch's start and eps, optax still
    differs by the placement of eps; `tbptt_jax.optim.adagrad_torch` is exact (table row)."""
    models = _models("lstm", 2)
    torch_adagrad = ROWS["adagrad"].torch
    for jax_optimizer, start, eps, at_least in (
            (optax.adagrad(0.05), 0.1, 1e-7, 1e-2),
            (optax.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-10), 0.0, 1e-10, 1e-7)):
        jax_run, torch_run = run_pair(models, jax_optimizer, torch_adagrad)
        assert compare(_head(jax_run, 1), _head(torch_run, 1))["grad"] <= RTOL64
        for key, initial in models.triple.params.items():
            g = jax_run.grads[key][0]
            np.testing.assert_allclose(_step(jax_run, np.asarray(initial), key, 0),
                                       -0.05 * g / np.sqrt(start + g ** 2 + eps),
                                       rtol=1e-10, atol=2e-16, err_msg=key)
            np.testing.assert_allclose(_step(torch_run, np.asarray(initial), key, 0),
                                       -0.05 * g / (np.abs(g) + 1e-10),
                                       rtol=1e-10, atol=2e-16, err_msg=key)
        assert compare(jax_run, torch_run)["param"] > at_least


def test_optax_rmsprop_momentum_applies_the_rate_before_the_trace():
    """Under a schedule, `optax.rmsprop(..., momentum=)` keeps each buffered step at the rate
    it was taken with (b = m b + lr_u d), torch rescales the buffer (b = m b + d, step
    lr_u b): equal at the first update, apart from the second by m (lr_0 - lr_1) d_0."""
    models = _models("lstm", 2)
    schedule = optim.float_count(optax.linear_schedule(0.0001, 0.001, transition_steps=WARMUP))
    plain = optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False, momentum=0.9)
    jax_run, torch_run = run_pair(models, plain, ROWS["rmsprop-momentum-warmup"].torch)
    assert_parity(_head(jax_run, 1), _head(torch_run, 1), RTOL64)
    lr0, lr1 = 0.0001, 0.0001 + 0.0009 / WARMUP
    for key, initial in models.triple.params.items():
        g = jax_run.grads[key][0]
        d0 = g / (np.sqrt(0.01 * g ** 2) + 1e-8)
        # Update 1 starts from the same parameters, so the steps differ by m (lr1 - lr0) d0
        # up to the (1e-10 relative) difference of the two second gradients.
        gap = _step(jax_run, np.asarray(initial), key, 1) - _step(torch_run, np.asarray(initial),
                                                                   key, 1)
        np.testing.assert_allclose(gap, 0.9 * (lr1 - lr0) * d0, rtol=1e-6, atol=1e-15,
                                   err_msg=key)
    assert compare(jax_run, torch_run)["param"] > 1e-4


def test_optax_linear_schedule_runs_in_float32():
    """Called with optax's int32 count, `optax.linear_schedule` computes in float32 even with
    x64 on: its rates are torch's rounded to float32, and an Adam run parts from torch's at
    the first update. `tbptt_jax.optim.float_count` is exact (table rows)."""
    plain = optax.linear_schedule(0.001, 0.01, transition_steps=WARMUP)
    rates = optax_rates(plain, 20)
    torch_lr = torch_rates(SCHEDULE_ROWS["linear-warmup"][1], 20)
    gaps = np.abs(rates / torch_lr - 1)
    assert 1e-8 < np.max(gaps) < 1e-6  # float32 arithmetic: a few float32 roundings
    np.testing.assert_array_equal(rates[WARMUP:], np.float32(0.01))  # the end too
    models = _models("lstm", 2)
    jax_run, torch_run = run_pair(models, optax.adam(plain), ROWS["adam-warmup"].torch)
    for key, initial in models.triple.params.items():
        np.testing.assert_allclose(_step(jax_run, np.asarray(initial), key, 0),
                                   _step(torch_run, np.asarray(initial), key, 0)
                                   * rates[0] / torch_lr[0], rtol=1e-12, atol=2e-16,
                                   err_msg=key)
    assert 1e-10 < compare(jax_run, torch_run)["param"] < 1e-5


def report() -> str:
    """The measured gaps of docs/optimizers.md as Markdown: every row on the two-layer LSTM
    (float64, plain and clipped; float32), then each by-design difference run as plain optax.
    `python -m parity_tests.test_optimizers` prints it."""
    lines = ["| row | float64 loss / grad / param | clipped float64 param | float32 param |",
             "|---|---|---|---|"]
    models64, models32 = _models("lstm", 2), _models("lstm", 2, np.float32)
    for row in ROWS:
        plain = compare(*run_row(models64, row, False))
        clipped = compare(*run_row(models64, row, True))
        single = compare(*run_row(models32, row, False), scale="trajectory")
        lines.append(f"| {row} | {plain['loss']:.1e} / {plain['grad']:.1e} / "
                     f"{plain['param']:.1e} | {clipped['param']:.1e} | {single['param']:.1e} |")
    schedule = optax.linear_schedule(0.0001, 0.001, transition_steps=WARMUP)
    differences = {
        "optax.clip_by_global_norm(0.3) + sgd vs clip_grad_norm=0.3": (
            optax.chain(optax.clip_by_global_norm(MAX_NORM), ROWS["sgd"].optax),
            ROWS["sgd"].torch, MAX_NORM),
        "optax.rmsprop(eps_in_sqrt=True) vs RMSprop": (
            optax.rmsprop(0.003, decay=0.99, eps=1e-8), ROWS["rmsprop"].torch, None),
        "optax.rmsprop defaults (decay 0.9) vs RMSprop defaults (alpha 0.99)": (
            optax.rmsprop(0.003), ROWS["rmsprop"].torch, None),
        "optax.adagrad defaults vs Adagrad defaults": (
            optax.adagrad(0.05), ROWS["adagrad"].torch, None),
        "optax.adagrad(initial 0, eps 1e-10) vs Adagrad": (
            optax.adagrad(0.05, initial_accumulator_value=0.0, eps=1e-10),
            ROWS["adagrad"].torch, None),
        "optax.rmsprop(schedule, momentum=0.9) vs RMSprop + LinearLR": (
            optax.rmsprop(optim.float_count(schedule), decay=0.99, eps=1e-8,
                          eps_in_sqrt=False, momentum=0.9),
            ROWS["rmsprop-momentum-warmup"].torch, None),
        "optax.adam(linear_schedule) (float32 rates) vs Adam + LinearLR": (
            optax.adam(optax.linear_schedule(0.001, 0.01, transition_steps=WARMUP)),
            ROWS["adam-warmup"].torch, None),
        "optax.sgd(cosine_decay_schedule(T=20)) vs SGD + CosineAnnealingLR(T_max=20)": (
            optax.sgd(optax.cosine_decay_schedule(0.1, decay_steps=20, alpha=0.01)),
            ROWS["sgd-cosine-periodic"].torch, None),
        "optax.adamw defaults (weight_decay 1e-4) vs AdamW defaults (1e-2)": (
            optax.adamw(0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01), None),
    }
    lines += ["", "| plain optax vs torch | loss | param |", "|---|---|---|"]
    for name, (jax_optimizer, torch_optimizer, clip) in differences.items():
        gaps = compare(*run_pair(models64, jax_optimizer, torch_optimizer, clip,
                                 clip_jax_grads=False))
        lines.append(f"| {name} | {gaps['loss']:.1e} | {gaps['param']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import jax

    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(1)
    print(report())
