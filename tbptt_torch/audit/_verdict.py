"""The audit's verdict: what the loop implements, each finding, and each observed update.

These are the public types `tbptt_torch.audit` returns (`AuditVerdict`, `Finding`,
`ObservedUpdate`, `Tbptt`), the kinds of finding it knows and the tolerance it compares
gradients to. `str(verdict)` is the report `tbptt audit` prints (`_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tbptt_torch.audit._report import format_report

RTOL = 1e-10  # gradients of the loop against the reference, float64 (SPEC §3)

FINDING_KINDS = (
    "loop_raised",             # the loop raised; the finding quotes it and says why
    "not_detached",            # the carry crosses a chunk boundary attached to its graph
    "carry_reset",             # a chunk starts from the zero carry instead of the carry
    "wrong_handoff",           # a chunk starts from a state other than the one reached
    "step_before_backward",    # an update comes before the backward() of its loss
    "zero_grad_before_step",   # zero_grad() clears the gradient before the update uses it
    "gradients_accumulate",    # zero_grad() missing between updates
    "loss_not_reset",          # backward() of an update goes into earlier updates' loss
    "gradient_never_applied",  # a backward() is never followed by an update
    "wrong_update_steps",      # the updates own other steps than TBPTT(k1) gives them
    "truncation_too_short",    # a loss term's gradient stops after the window start
    "truncation_too_long",     # a loss term's gradient reaches before the window start
    "tail_dropped",            # the last T % k1 steps never trained (partial intended)
    "tail_trained",            # the last T % k1 steps trained (drop intended)
    "wrong_reduction",         # summed where a mean was intended, or the reverse
    "wrong_loss",              # a step's loss is against another target, or weighted oddly
    "wrong_mask",              # the loss terms are weighted otherwise than the mask given
    "wrong_clipping",          # clipped to another max norm than intended, or not clipped
    "no_update",               # the weights never changed
    "gradient_modified",       # p.grad changed between backward() and the update, and not
                               # by clipping its global norm
    "gradients_differ",        # everything above as intended, yet the gradients differ
)

@dataclass(frozen=True)
class Tbptt:
    """A TBPTT(k1, k2) as SPEC §1 defines it, with the loss's treatment of the batch.

    `reduction` is over the loss steps of an update ("mean": divided by their number);
    `batch` says whether the per-step loss averages or sums over the batch (the reference
    trains with `loss_fn = mse / B` for a summed loss with averaged batch, and so on).
    `tail` is None where T is a multiple of k1, so the tail policy cannot show.
    `clip_grad_norm` is the max norm each update's gradient is clipped to, as
    `tbptt_train_step(..., clip_grad_norm=)` and `torch.nn.utils.clip_grad_norm_` clip.
    `masked`: some loss terms weigh 0 (a loss mask); the mean is then over the others.
    """

    k1: int
    k2: int
    reduction: str
    tail: str | None
    batch: str = "mean"
    clip_grad_norm: float | None = None
    masked: bool = False

    def __str__(self) -> str:
        tail = "either" if self.tail is None else repr(self.tail)
        clip = "" if self.clip_grad_norm is None else f", clip_grad_norm={self.clip_grad_norm:g}"
        return (f"TBPTT(k1={self.k1}, k2={self.k2}, reduction={self.reduction!r}, "
                f"tail={tail}{clip})" + (" with a loss mask" if self.masked else ""))

    def term_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """The weight of each loss term `[n, B]` of an update whose terms `mask` weighs."""
        steps, batch = mask.shape[:2]
        if self.reduction == "mean" and self.batch == "mean":
            total = mask.sum()
            return mask / total if float(total) > 0 else torch.zeros_like(mask)
        if self.reduction == "mean":
            return mask / steps
        return mask / batch if self.batch == "mean" else mask


@dataclass(frozen=True)
class Finding:
    """One thing the loop does differently from the intended TBPTT.

    `update` is the 1-based update where it first shows: the n-th update of the weights,
    whether by `optimizer.step()` or by the loop itself, counting those that changed nothing;
    `step` the 0-based time step of `xs` where it shows; either is None where it does not
    apply.
    """

    kind: str
    message: str
    update: int | None = None
    step: int | None = None

    def __str__(self) -> str:
        where = []
        if self.update is not None:
            where.append(f"update {self.update}")
        if self.step is not None:
            where.append(f"step {self.step}")
        return f"[{self.kind}] " + (f"({', '.join(where)}) " if where else "") + self.message


@dataclass(frozen=True)
class ObservedUpdate:
    """One update of the weights (a step() or the loop's own) that applied a gradient, as the
    audit measured it."""

    index: int  # 1-based among the updates that applied a gradient
    after_step: int  # the last time step the model had run when the update came
    loss_steps: tuple[int, ...]  # the time steps whose loss this update's gradient holds
    window_start: int | None  # the earliest step its gradient reaches (None: no loss)
    weight: float | None  # the weight of each loss term (None: terms weighted unequally)
    accumulated: bool  # p.grad still held an earlier update's gradient
    gradient_difference: float | None = None  # against the reference, relative
    masked_terms: int = 0  # loss terms inside its steps that weigh 0
    lr: float | None = None  # the plain-SGD learning rate of its change of the weights


@dataclass(frozen=True)
class AuditVerdict:
    """What `audit` found. `str(verdict)` is the report `tbptt audit` prints."""

    correct: bool
    implements: Tbptt | None  # the TBPTT the loop implements, when it implements one
    intended: dict[str, Any]  # k1, k2, reduction, tail, clip_grad_norm (None: not given)
    findings: tuple[Finding, ...]
    updates: tuple[ObservedUpdate, ...]
    reference: Tbptt | None  # what the gradients were compared with
    max_gradient_difference: float | None
    error: str | None  # what the loop raised, if it raised
    setup: str
    planned_updates: int = 0
    notes: tuple[str, ...] = field(default=())
    loss: str | None = None  # the per-term loss the loop computes, as the audit found it

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(finding.kind for finding in self.findings)

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        return format_report(self, RTOL)
