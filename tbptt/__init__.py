"""The framework-free core that both trainers stand on: the TBPTT update schedule, every
argument check, the types a stream carries, and nested containers for the torch side.

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
from tbptt.schedule import Schedule, Update, plan, run_window
from tbptt.stream import NonFiniteLossError, OverlapCarry

__all__ = ["ON_NONFINITE", "REDUCTIONS", "TAILS", "NonFiniteLossError", "OverlapCarry",
           "Schedule", "Update", "check_choice", "check_int", "check_k", "check_overlap", "plan",
           "run_window", "takes_class_ids"]
