"""What the loop called, and when: the carry handed from call to call, the order of
`backward()`, `zero_grad()` and the updates, what happened to the gradient between
`backward()` and its update (clipped, or changed otherwise), and where and why the loop
raised. A part of `Analysis` (`_analysis`), whose state it reads and whose findings it adds.
"""

from __future__ import annotations

import math

import torch

from tbptt_torch.audit._report import plural, span, step_range
from tbptt_torch.audit._trace import UpdateCall
from tbptt_torch.audit._verdict import RTOL, Finding

_CLIP_EPS = 1e-6  # clip_grad_norm_ scales by max_norm / (norm + 1e-6)


def relative(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in expected.values())
    gap = max(float((actual[name] - g).abs().max()) for name, g in expected.items())
    return gap / scale if scale > 0 else gap



def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grads.values()))



def _call(update: UpdateCall) -> str:
    """How a finding names an update: by its step() call, or as the loop's own."""
    n = update.index + 1
    return f"step() #{n}" if update.kind == "step" else f"the loop's own update #{n}"



class CallFindings:
    """The findings about calls (see the module doc); `Analysis` holds the state they use:
    `rec` (the record), `findings`, `applied` (the updates that changed the weights),
    `notes`, `error`, `_norms` (per applied update: its gradient's norm and the factor it
    was scaled by before the update) and `_clip` (the max norm the loop clips to)."""

    def _first_burst(self) -> dict[int, int]:
        """forward -> the event of the first backward that reached its predictions."""
        first: dict[int, int] = {}
        for burst in self.rec.bursts:
            for forward in burst.pred_grads:
                first.setdefault(forward, burst.event)
        return first

    def _carry_findings(self) -> None:
        first_backward = self._first_burst()
        forwards = self.rec.forwards
        for forward in forwards:
            carry, update = forward.carry_in, forward.updates_before + 1
            if carry.kind == "attached" and carry.source is not None:
                source = forwards[carry.source]
                # A chunk boundary is an update between the two forwards; an attached carry
                # within one update is the window's own recurrence.
                if (source.updates_before < forward.updates_before
                        and first_backward.get(source.index, math.inf) < forward.event):
                    reach = self.reach(forward.index)
                    message = (
                        f"the hidden state is not detached at step {forward.lo}: the forward "
                        f"from step {forward.lo} starts from the carry the forward of "
                        f"{step_range(source.lo, source.hi)} returned, still attached "
                        f"to the graph that an earlier backward() already went through, so "
                        f"the gradient of update {update} flows back across the chunk "
                        f"boundary at step {forward.lo}, through every step since step "
                        f"{reach} ({plural(forward.lo - reach, 'step')} before its chunk)")
                    if carry.detach_called:
                        message += (". detach() was called on that carry, but its result was "
                                    "not used: detach() returns a new tensor, so assign it "
                                    "(h = h.detach(), or h.detach_() in place)")
                    self.add("not_detached", message, update, forward.lo)
            elif carry.kind in ("initial", "zero") and forward.lo > 0:
                self.add("carry_reset",
                         f"the forward from step {forward.lo} starts from the zero carry "
                         f"instead of the state the model reached at step {forward.lo}: the "
                         f"hidden state is reset rather than carried over", update, forward.lo)
            elif carry.kind == "detached" and carry.source is not None:
                source = forwards[carry.source]
                if source.hi != forward.lo:
                    self.add("wrong_handoff",
                             f"the forward from step {forward.lo} starts from the state the "
                             f"model reached after step {source.hi - 1}, not the state at step "
                             f"{forward.lo}", update, forward.lo)
            elif carry.kind == "other":
                self.add("wrong_handoff",
                         f"the forward from step {forward.lo} starts from a carry the model "
                         f"never returned (not the state reached at step {forward.lo}, "
                         f"detached, nor the zero carry)", update, forward.lo)

    # -- backward(), the updates, zero_grad() ---------------------------------------------

    def _order_findings(self) -> None:
        updates, bursts = self.rec.updates, self.rec.bursts
        applied_before: set[int] = set()
        for n, update in enumerate(updates):
            next_event = updates[n + 1].event if n + 1 < len(updates) else math.inf
            own_forwards = set(update.forwards_since_update)
            late = [b for b in bursts if update.event < b.event < next_event
                    and own_forwards & set(b.pred_grads)]
            position = max(update.progress - 1, 0)
            name = _call(update)
            if late:
                applies = "no gradient" if not update.applied else "an older gradient"
                later = next((updates[m] for m in range(n + 1, len(updates))
                              if set(updates[m].pending) & {b.index for b in late}), None)
                fate = ("never applied" if later is None
                        else f"applied by {_call(later)}, after the model has moved on")
                self.add("step_before_backward",
                         f"{name} comes after the forward of "
                         f"{self._steps_of(own_forwards)} but before the backward() of their "
                         f"loss: it applies {applies}, and the gradient of that loss is {fate}",
                         n + 1, position)
            elif not update.since_update:
                what = ("comes before any backward()" if n == 0
                        else "follows no backward() since the previous update")
                self.add("step_before_backward",
                         f"{name} {what}, so it applies "
                         f"{'no gradient' if not update.applied else 'a gradient already applied'}"
                         f"; each later update applies the gradient of the chunk before it",
                         n + 1, position)
            elif not update.applied:
                self._zero_grad_before_update(update.kind, n + 1, own_forwards, position,
                                              raised=update.crashed and update.grads_none)
            if update.applied and set(update.pending) & applied_before:
                self.add("gradients_accumulate",
                         f"the gradient applied by {name} still holds the gradient an earlier "
                         f"update already applied: zero_grad() is not called between that "
                         f"update and this update's backward(), so gradients accumulate "
                         f"across updates", n + 1, position)
            applied_before |= set(update.pending)
        last_update = updates[-1].event if updates else -1
        unapplied = [b for b in bursts if b.event > last_update and not b.crashed]
        if unapplied and self.error is None and "step_before_backward" not in self.findings:
            covered = {f for b in unapplied for f in b.pred_grads}
            trained = [self.rec.forwards[f].hi for u in updates if u.applied
                       for b in u.pending for f in self.rec.bursts[b].pred_grads]
            if covered and min(self.rec.forwards[f].lo for f in covered) >= max(trained,
                                                                               default=0):
                # Only steps after the last update: the tail the loop does not train, which
                # the tail policy accounts for; the backward() there is wasted work only.
                self.notes.append(f"the backward() of {self._steps_of(covered)} is computed "
                                  f"but never applied (no update follows it)")
            else:
                self.add("gradient_never_applied",
                         f"the gradient of the last backward() (the loss of "
                         f"{self._steps_of(covered)}) is never applied: no update follows it",
                         len(updates) + 1, max(self.rec.forwards[f].hi for f in covered) - 1
                         if covered else None)
        if self.error is None and not self.applied:
            if not updates:
                self.add("no_update", "the loop never updated the weights: it called no "
                                      "optimizer.step() and changed no parameter itself")
            elif not self.findings:
                self.add("no_update", "no update applied any gradient: the weights never "
                                      "change")
            else:
                self.notes.append("no update applied any gradient: the weights never change")

    def _zero_grad_before_update(self, kind: str, n: int, forwards: set[int], position: int,
                                 raised: bool) -> None:
        if kind == "step":
            message = (f"zero_grad() is called between backward() and step(): the gradient of "
                       f"the loss of {self._steps_of(forwards)} is cleared before step() #{n} "
                       f"could apply it, so that step() changes nothing")
        else:
            fate = ("p.grad is None there, and the update raised" if raised
                    else "so that update changes nothing")
            message = (f"zero_grad() is called between backward() and the loop's own update of "
                       f"the weights: the gradient of the loss of {self._steps_of(forwards)} is "
                       f"cleared before update {n} could apply it; {fate}")
        self.add("zero_grad_before_step", message, n, position)

    def _cleared_then_raised(self) -> bool:
        """The loop raised after a zero_grad() that came between a backward() and any update,
        with every p.grad None: an update of its own read a gradient that was not there (an
        in-place op on None fails before any write into the weights could be seen)."""
        kinds = [kind for kind, _ in self.rec.events]
        if self.rec.raised_in is not None or not kinds or kinds[-1] != "zero_grad":
            return False
        last_backward = max((i for i, kind in enumerate(kinds) if kind == "backward"),
                            default=-1)
        last_update = max((i for i, kind in enumerate(kinds) if kind == "update"), default=-1)
        return last_backward > last_update and self.rec.grads_none_at_end

    def _steps_of(self, forwards: set[int]) -> str:
        covered = sorted({t for f in forwards
                          for t in range(self.rec.forwards[f].lo, self.rec.forwards[f].hi)})
        if not covered:
            return "no steps"
        text = span(tuple(covered))
        return f"step {text}" if len(covered) == 1 else f"steps {text}"

    def _gradient_changes(self) -> None:
        """What happened to each applied gradient between backward() and its update: nothing,
        a clipping of its global norm (`clip_grad_norm_`), or something else."""
        changed: list[tuple[UpdateCall, float]] = []
        for update in self.applied:
            produced = self.rec.bursts[update.pending[-1]].grads_after if update.pending else None
            if produced is None:
                continue
            norm = _norm(produced)
            if relative(update.grads, produced) <= RTOL:
                self._norms.append((update, norm, 1.0))
                continue
            square = sum(float((g * g).sum()) for g in produced.values())
            factor = sum(float((update.grads[k] * g).sum()) for k, g in produced.items()) / (
                square or 1.0)
            scaled = {name: factor * g for name, g in produced.items()}
            if 0 < factor < 1 and relative(update.grads, scaled) <= RTOL:
                self._norms.append((update, norm, factor))
            else:
                changed.append((update, relative(update.grads, produced)))
        clipped = [(u, norm, f) for u, norm, f in self._norms if f < 1]
        if clipped and not changed:
            bounds = [f * (norm + _CLIP_EPS) for _, norm, f in clipped]
            largest = max(norm for _, norm, f in self._norms if f == 1) if any(
                f == 1 for *_, f in self._norms) else 0.0
            if (max(bounds) - min(bounds) <= 1e-6 * max(bounds)
                    and largest <= max(bounds) * (1 + 1e-9)):
                self._clip = bounds[0]
                return
            changed = [(u, 1 - f) for u, _, f in clipped]
            reason = (f"scaled by {clipped[0][2]:.3g}, where the other updates are scaled "
                      f"otherwise: no single max norm of clip_grad_norm_ explains it")
        else:
            reason = ("not by clipping its global norm (clip_grad_norm_ scales every "
                      "gradient by one factor below 1)")
        if changed:
            update, gap = changed[0]
            self.add("gradient_modified",
                     f"{_call(update)} applies a gradient other than the one backward() "
                     f"produced: it was changed in between, by {gap:.2g} relative, {reason}",
                     update.index + 1, max(update.progress - 1, 0))

    def _crash_findings(self) -> None:
        error = self.error
        message = " ".join(str(error).split())  # the whole message, on one line
        crashed = next((u for u in self.rec.updates if u.crashed), None)
        update = crashed.index + 1 if crashed is not None else len(self.rec.updates) + 1
        progress = max((f.hi for f in self.rec.forwards), default=0)
        backward_error = ("backward through the graph a second time" in message
                          or "modified by an inplace operation" in message)
        if backward_error:
            if "not_detached" in self.findings:
                why = ("backward() went back into a graph an earlier backward() had freed or "
                       "whose weights an update had changed, because the hidden state is not "
                       "detached")
            elif ("step_before_backward" in self.findings
                  and "modified by an inplace operation" in message):
                why = ("the update changed the weights that the graph of the loss still "
                       "needed, because it comes before backward()")
            else:
                self.add("loss_not_reset",
                         f"backward() of update {update} went back into the graph of an "
                         f"earlier update although the hidden state was detached at every "
                         f"chunk boundary: the loss still holds the terms of earlier updates, "
                         f"so the running loss is not reset after backward()", update,
                         max(progress - 1, 0))
                why = "the loss still holds an earlier update's terms (not reset)"
        elif self._cleared_then_raised():
            self._zero_grad_before_update("own", update, set(self.rec.left_open),
                                          max(progress - 1, 0), raised=True)
            why = ("every p.grad is None there: zero_grad() set them so after backward() and "
                   "before the loop's own update of the weights, which read them")
        elif crashed is not None and crashed.grads_none:
            why = (f"the loop's own update #{update} read p.grad, which is None: "
                   + ("zero_grad() set it so after backward()"
                      if "zero_grad_before_step" in self.findings
                      else "no backward() ran since the gradients were cleared"))
        elif crashed is not None:
            why = f"it raised in the loop's own update #{update} of the weights"
        else:
            why = f"it raised {self._where_raised()}"
        self.findings = {"loop_raised": Finding(
            "loop_raised", f'the loop raised {type(error).__name__}: "{message}"; {why}',
            update, max(progress - 1, 0)), **self.findings}

    def _where_raised(self) -> str:
        forwards = self.rec.forwards
        if self.rec.raised_in == "forward":
            return f"in the model's forward of {step_range(forwards[-1].lo, forwards[-1].hi)}"
        if self.rec.raised_in == "backward":
            return f"in the backward() of update {len(self.rec.updates) + 1}"
        if not self.rec.events:
            return "before it called the model"
        kind, index = self.rec.events[-1]
        last = {"forward": lambda: ("the forward of "
                                    f"{step_range(forwards[index].lo, forwards[index].hi)}"),
                "backward": lambda: "a backward()",
                "update": lambda: f"update {index + 1}",
                "zero_grad": lambda: "a zero_grad()"}[kind]()
        return f"after {last}, the last call the audit saw"

