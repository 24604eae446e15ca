"""What both trainers share and neither framework is needed for: the TBPTT update schedule."""

from tbptt.schedule import REDUCTIONS, TAILS, Schedule, Update, check_choice, check_k, plan

__all__ = ["REDUCTIONS", "TAILS", "Schedule", "Update", "check_choice", "check_k", "plan"]
