"""Float64 parity, exact: from the same weights, `tbptt_jax` and `tbptt_torch` give the same
per-update losses, per-update gradients and parameters after every update (and the same
returned carry), to 1e-10 relative (SPEC §3).

The matrix crosses every axis the semantics of SPEC §1 has: cell (Elman, GRU, LSTM) x
depth (1, 2 layers) x k2 = k1 or k2 > k1 (not a multiple) x reduction (mean, sum) x tail
(partial, drop) x resets (none, ~10% random) x optimizer (SGD, Adam). T = 17 is not a
multiple of k1, so the two tails differ, and with k2 > k1 the first window is clipped at
step 0. A second, smaller matrix has k2 > 3 k1, where several windows are clipped.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from parity_tests.harness import (
    CELLS,
    QUANTITIES,
    Trajectory,
    assert_parity,
    compare,
    make_models,
    optimizer_pair,
    random_sequences,
    run_both,
)

RTOL = 1e-10
LENGTH, BATCH, INPUTS, HIDDEN, OUTPUTS = 17, 3, 3, 6, 2
RESET_RATE = 0.1
OPTIMIZERS = {"sgd": 0.05, "adam": 0.02}  # learning rates


def _case_id(cell, num_layers, k1, k2, reduction, tail, resets, optimizer):
    ks = f"k1=k2={k1}" if k1 == k2 else f"k1={k1},k2={k2}"
    return "-".join([cell, f"{num_layers}layer", ks, reduction, tail,
                     "resets" if resets else "no-resets", optimizer])


SETTINGS = (((4, 4), (4, 7)), ("mean", "sum"), ("partial", "drop"), (False, True),
            tuple(OPTIMIZERS))
# Six rows of (ks, reduction, tail, resets, optimizer) choices in which every pair of
# settings meets (a strength-2 covering array, checked by `test_default_rows_cover_all_pairs`).
# Each cell and depth runs these by default; the other 26 of the 32 are marked slow
# (`pytest -m slow`), since every case costs a JAX compile of about 5 s.
DEFAULT_ROWS = ((0, 0, 0, 0, 0), (0, 1, 1, 1, 1), (1, 0, 1, 1, 0), (1, 1, 0, 1, 1),
                (1, 1, 1, 0, 0), (0, 0, 1, 0, 1))


def _matrix_case(cell, num_layers, row):
    (k1, k2), *rest = (choices[index] for choices, index in zip(SETTINGS, row, strict=True))
    marks = () if row in DEFAULT_ROWS else (pytest.mark.slow,)
    return pytest.param(cell, num_layers, k1, k2, *rest, marks=marks,
                        id=_case_id(cell, num_layers, k1, k2, *rest))


MATRIX = [_matrix_case(cell, num_layers, row)
          for cell, num_layers in itertools.product(CELLS, (1, 2))
          for row in itertools.product(*(range(len(choices)) for choices in SETTINGS))]


def test_default_rows_cover_all_pairs():
    """Every pair of settings of the five binary axes meets in some default row."""
    for i, j in itertools.combinations(range(len(SETTINGS)), 2):
        assert {(row[i], row[j]) for row in DEFAULT_ROWS} == {(0, 0), (0, 1), (1, 0), (1, 1)}

LONG_OVERLAP = [
    pytest.param(cell, num_layers, 2, 7, "sum", tail, True, "adam",
                 id=_case_id(cell, num_layers, 2, 7, "sum", tail, True, "adam"))
    for cell, num_layers, tail in itertools.product(CELLS, (1, 2), ("partial", "drop"))
]


def _check_case(cell, num_layers, k1, k2, reduction, tail, resets, optimizer
                ) -> dict[str, float]:
    """Runs one case in both frameworks, asserts parity; returns the largest differences."""
    models = make_models(cell, INPUTS, HIDDEN, OUTPUTS, num_layers=num_layers, seed=1)
    xs, ys, reset_mask = random_sequences(LENGTH, BATCH, INPUTS, OUTPUTS, seed=2,
                                          reset_rate=RESET_RATE if resets else 0.0)
    if resets:
        assert reset_mask.sum() >= 3  # the seed gives resets to exercise
    jax_run, torch_run = run_both(
        models, optimizer_pair(optimizer, OPTIMIZERS[optimizer]), xs, ys, k1=k1, k2=k2,
        reduction=reduction, tail=tail, resets=reset_mask)

    updates = math.ceil(LENGTH / k1) if tail == "partial" else LENGTH // k1
    assert jax_run.losses.shape == (updates,)
    assert np.all(np.isfinite(jax_run.losses))
    largest = assert_parity(jax_run, torch_run, RTOL)
    # The run trained: every parameter moved.
    assert all(np.any(jax_run.params[key][-1] != np.asarray(initial))
               for key, initial in models.params.items())
    return largest


@pytest.mark.parametrize(
    "cell, num_layers, k1, k2, reduction, tail, resets, optimizer", MATRIX)
def test_float64_parity(cell, num_layers, k1, k2, reduction, tail, resets, optimizer):
    _check_case(cell, num_layers, k1, k2, reduction, tail, resets, optimizer)


@pytest.mark.parametrize(
    "cell, num_layers, k1, k2, reduction, tail, resets, optimizer", LONG_OVERLAP)
def test_float64_parity_long_overlap(cell, num_layers, k1, k2, reduction, tail, resets,
                                     optimizer):
    """k2 = 3.5 k1: the first three windows are clipped at step 0, each at its own length."""
    _check_case(cell, num_layers, k1, k2, reduction, tail, resets, optimizer)


def test_assert_parity_names_the_first_divergence():
    """The harness's failure names the first update, quantity and key, and the gap."""
    rng = np.random.default_rng(0)
    grads = {"rnn.weight_hh_l0": rng.standard_normal((3, 4, 4)),
             "head.bias": rng.standard_normal((3, 2))}
    params = {key: 1 + value for key, value in grads.items()}
    expected = Trajectory(np.array([1.0, 0.5, 0.25]), grads, params, (np.ones((1, 3, 4)),))
    assert compare(expected, expected) == dict.fromkeys(QUANTITIES, 0.0)

    bias = grads["head.bias"].copy()
    bias[1, 0] += 2e-6 * np.abs(bias[1]).max()
    later = {key: value.copy() for key, value in params.items()}
    later["rnn.weight_hh_l0"][2] *= 1 + 1e-3
    actual = expected._replace(grads={**grads, "head.bias": bias}, params=later)
    with pytest.raises(AssertionError, match=r"first at update 1: grad 'head.bias' differs by "
                                             r"2e-06 relative"):
        assert_parity(actual, expected, RTOL)
    assert compare(actual, expected)["param"] == pytest.approx(1e-3)
    # Against the key's scale over the whole run, the same gap is smaller (update 1's bias
    # is not the largest the key reaches), never larger.
    assert compare(actual, expected, scale="trajectory")["grad"] <= 2e-6 * (1 + 1e-12)
