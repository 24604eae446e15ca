"""Float32 parity over a realistic run: 50 updates of SGD with Nesterov momentum or Adam at
ordinary learning rates, and the two trainers still agree on every update's loss, gradient
and parameters to 1e-5 relative (SPEC §3), for every cell and depth, k2 = k1 and k2 > k1.

Each key is measured against the largest magnitude it reaches over the run
(`scale="trajectory"` of `parity_tests.harness`). Measured against each update's own
magnitude instead, a tensor passing near zero (the readout bias crossing zero, a small
gradient near a minimum, ~100 times below the key's size over the run) is not pinned down
to 1e-5 by float32 itself: there each framework alone is 5e-6 to 1.3e-5 away from the same
run in float64, while the two float64 runs agree to 1e-14, so no two float32
implementations could be held closer than that.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from parity_tests.harness import (
    CELLS,
    ModelTriple,
    Trajectory,
    assert_parity,
    make_models,
    optimizer_pair,
    random_sequences,
    relative_difference,
    run_both,
)

RTOL = 1e-5
UPDATES = 50
BATCH, INPUTS, HIDDEN, OUTPUTS = 3, 3, 8, 2
OPTIMIZERS = {"nesterov": 0.05, "adam": 1e-2}  # learning rates; Nesterov with momentum 0.9

CASES = [
    pytest.param(cell, num_layers, k1, k2, optimizer,
                 id=f"{cell}-{num_layers}layer-k1={k1},k2={k2}-{optimizer}")
    for cell, num_layers, (k1, k2), optimizer in itertools.product(
        CELLS, (1, 2), ((4, 4), (4, 7)), OPTIMIZERS)
]


def run_case(cell, num_layers, k1, k2, optimizer, dtype=np.float32
             ) -> tuple[ModelTriple, Trajectory, Trajectory]:
    """The models and the (JAX, torch) trajectories of one case, 50 updates long."""
    models = make_models(cell, INPUTS, HIDDEN, OUTPUTS, num_layers=num_layers, dtype=dtype,
                         seed=3)
    xs, ys, _ = random_sequences(UPDATES * k1, BATCH, INPUTS, OUTPUTS, dtype=dtype, seed=3)
    return models, *run_both(models, optimizer_pair(optimizer, OPTIMIZERS[optimizer]), xs, ys,
                             k1=k1, k2=k2, reduction="mean", tail="partial")


@pytest.mark.parametrize("cell, num_layers, k1, k2, optimizer", CASES)
def test_float32_parity_after_50_updates(cell, num_layers, k1, k2, optimizer):
    models, jax_run, torch_run = run_case(cell, num_layers, k1, k2, optimizer)

    assert jax_run.losses.shape == (UPDATES,)
    for run in (jax_run, torch_run):  # nothing was silently promoted to float64
        assert run.losses.dtype == np.float32
        assert all(p.dtype == np.float32 for p in (*run.params.values(), *run.grads.values()))
    assert_parity(jax_run, torch_run, RTOL, scale="trajectory")
    # A realistic run: every parameter travels far beyond the tolerance, and it learns.
    for key, initial in models.params.items():
        assert relative_difference(jax_run.params[key][-1], np.asarray(initial)) > 100 * RTOL
    assert np.mean(jax_run.losses[-10:]) < np.mean(jax_run.losses[:10])
