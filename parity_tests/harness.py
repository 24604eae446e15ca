"""The parity tests' harness: the machinery of `tbptt_parity` under the names the tests use.

It lives in `tbptt_parity._harness` so that an installed `tbptt` carries it (for
`tbptt_parity.compare` and the `tbptt parity` command); this module keeps the tests' imports
as they were, with `compare` the trajectory comparison (`compare_trajectories` there).
"""

from tbptt_parity._harness import (
    CELLS,
    QUANTITIES,
    SCALES,
    Divergence,
    ModelTriple,
    OptimizerPair,
    Trajectory,
    assert_parity,
    first_divergence,
    make_models,
    optimizer_pair,
    random_sequences,
    relative_difference,
    run_both,
    run_jax,
    run_torch,
    to_numpy,
    tree_difference,
)
from tbptt_parity._harness import compare_trajectories as compare

__all__ = ["CELLS", "QUANTITIES", "SCALES", "Divergence", "ModelTriple", "OptimizerPair",
           "Trajectory", "assert_parity", "compare", "first_divergence", "make_models",
           "optimizer_pair", "random_sequences", "relative_difference", "run_both", "run_jax",
           "run_torch", "to_numpy", "tree_difference"]
