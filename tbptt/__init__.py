"""What both trainers share and neither framework is needed for: the TBPTT update schedule
and the argument checks."""

from tbptt.checks import (
    ON_NONFINITE,
    REDUCTIONS,
    TAILS,
    check_choice,
    check_int,
    check_k,
    check_overlap,
)
from tbptt.schedule import Schedule, Update, plan, run_window

__all__ = ["ON_NONFINITE", "REDUCTIONS", "TAILS", "Schedule", "Update", "check_choice",
           "check_int", "check_k", "check_overlap", "plan", "run_window"]
