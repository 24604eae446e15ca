"""Audit a hand-written PyTorch TBPTT loop: is it the TBPTT(k1, k2) you meant?

`audit(loop, k1=4, ...)` runs `loop(model, optimizer, xs, ys, k)` once on an instrumented
model (the audit's own small one, or yours), float64 data (random, shaped for the model:
float features or token ids; or yours) and a plain SGD optimizer, and reads back what the loop
did: which time steps each update's loss covers and with what weight per term (whatever the
loss: squared error, cross-entropy, NLL, a sum, a mean, a mask), how far back each loss term's
gradient reaches, whether the carry handed from chunk to chunk is detached and is the state
the previous chunk reached, the order of `backward()`, the updates (by `step()` or by the loop
itself, as `p.data.add_(p.grad, alpha=-lr)`) and `zero_grad()`, and whether the gradient was
clipped. It then runs the reference, `tbptt_torch.tbptt_train_step` over the plan of
`tbptt.plan`, each update from the loop's own weights, and compares the gradients update by
update.

The verdict is **correct** when the loop makes the same updates after the same steps as
the intended TBPTT(k1, k2) with the same gradients (float64, 1e-10 relative), and says which
reduction, tail policy and clipping the loop implements; otherwise it is **wrong**, with each
finding in plain words and the update and time step where it first shows. Nothing here reads
the loop's source: a loop the audit has never seen is judged by its behaviour alone.

The package is split by concern: `_run` (the `audit` entry point, the model and the data),
`_trace` (the instrumentation that records the loop), `_calls` (what the record shows of the
calls), `_losses` and `_terms` (the loss and what each update trained), `_analysis` (the TBPTT
implemented and the findings), `_reference` (the gradients of `tbptt_train_step`),
`_verdict` (the public types) and `_report` (the text).
"""

from tbptt_torch.audit._run import audit, default_length
from tbptt_torch.audit._trace import AuditError
from tbptt_torch.audit._verdict import (
    FINDING_KINDS,
    RTOL,
    AuditVerdict,
    Finding,
    ObservedUpdate,
    Tbptt,
)

__all__ = ["FINDING_KINDS", "RTOL", "AuditError", "AuditVerdict", "Finding", "ObservedUpdate",
           "Tbptt", "audit", "default_length"]
