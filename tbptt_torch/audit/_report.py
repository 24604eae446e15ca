"""The audit's report as text: the lines `str(AuditVerdict)` and `tbptt audit` print, and the
small phrases (a span of steps, a plural) the findings' messages are written with.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbptt_torch.audit._verdict import AuditVerdict


def format_report(verdict: AuditVerdict, tolerance: float) -> str:
    """The report of `verdict`; `tolerance` is the relative gradient tolerance it was held to."""
    intended = ", ".join(f"{key}={value!r}" for key, value in verdict.intended.items()
                         if value is not None)
    lines = [f"setup      {verdict.setup}", f"intended   TBPTT({intended})"]
    if verdict.updates:
        lines += ["", "update  after step  loss steps  window from  term weight  "
                      "gradient vs reference"]
        for u in verdict.updates:
            steps = span(u.loss_steps)
            weight = "unequal" if u.weight is None else f"{u.weight:.6g}"
            diff = "-" if u.gradient_difference is None else f"{u.gradient_difference:.1e}"
            start = "-" if u.window_start is None else str(u.window_start)
            extra = "  (+ earlier gradients)" if u.accumulated else ""
            lines.append(f"{u.index:>6}  {u.after_step:>10}  {steps:>10}  {start:>11}  "
                         f"{weight:>11}  {diff:>21}{extra}")
        lines.append("")
    if verdict.reference is not None:
        lines.append(f"reference  tbptt_train_step with {verdict.reference}: "
                     f"{verdict.planned_updates} updates")
    if verdict.implements is not None:
        loss = verdict.loss or "loss"
        masked = sum(u.masked_terms for u in verdict.updates)
        lines.append(f"implements {verdict.implements}, the per-step {loss} "
                     f"{'averaged' if verdict.implements.batch == 'mean' else 'summed'} "
                     f"over the batch" + (f", {plural(masked, 'term')} masked (weight 0)"
                                          if verdict.implements.masked else ""))
    lines += [textwrap.fill(note, width=100, initial_indent="note       ",
                            subsequent_indent=" " * 11, break_on_hyphens=False)
              for note in verdict.notes]
    if verdict.correct:
        lines.append(f"verdict    CORRECT: the same {len(verdict.updates)} updates after the "
                     f"same steps as the reference, gradients within "
                     f"{verdict.max_gradient_difference:.1e} (tolerance {tolerance:.0e})")
    else:
        lines.append("verdict    WRONG")
        lines += [textwrap.fill(str(finding), width=100, initial_indent="  - ",
                                subsequent_indent="    ", break_on_hyphens=False)
                  for finding in verdict.findings]
    return "\n".join(lines)


def step_range(lo: int, hi: int) -> str:
    """'step 3' or 'steps 0-3' for the time steps [lo, hi)."""
    return f"step {lo}" if hi - lo == 1 else f"steps {lo}-{hi - 1}"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def named_steps(steps: tuple[int, ...]) -> str:
    """'no step', 'step 3' or 'steps 0-3' for a tuple of time steps."""
    if not steps:
        return "no step"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {span(steps)}"


def span(steps: tuple[int, ...]) -> str:
    if not steps:
        return "none"
    if len(steps) == 1:
        return str(steps[0])
    if list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}"
    return ",".join(map(str, steps))

