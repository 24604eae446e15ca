"""The framework-free core that both trainers stand on: the TBPTT update schedule, every
argument check, the types a stream carries, nested containers for the torch side, and the
helpers that cut long streams and variable-length sequences into time-major batches.

Nothing here imports JAX or PyTorch (numpy at most): `tbptt_jax` and `tbptt_torch` build on
it and never on each other.
"""

from tbptt.checks import (
    ON_NONFINITE,
    REDUCTIONS,
    TAILS,
    check_choice,
    check_int,
    check_k,
    check_overlap,
    takes_class_ids,
)
from tbptt.data import (
    batchify,
    next_step_pairs,
    pad_batch,
    resets_from_episodes,
    segments,
)
from tbptt.schedule import Schedule, Update, plan, run_window
from tbptt.stream import NonFiniteLossError, OverlapCarry

__all__ = ["ON_NONFINITE", "REDUCTIONS", "TAILS", "NonFiniteLossError", "OverlapCarry",
           "Schedule", "Update", "batchify", "check_choice", "check_int", "check_k",
           "check_overlap", "next_step_pairs", "pad_batch", "plan", "resets_from_episodes",
           "run_window", "segments", "takes_class_ids"]
