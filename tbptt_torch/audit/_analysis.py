"""The analysis behind `tbptt_torch.audit`: it turns a recorded run of the loop (`_trace`) into
observed updates and findings, and compares each update's gradient with the reference's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from tbptt.schedule import plan
from tbptt_torch.audit._report import named_steps, plural, span, step_range
from tbptt_torch.audit._trace import Forward, Recorder
from tbptt_torch.audit._verdict import RTOL, AuditVerdict, Finding, ObservedUpdate, Tbptt

_WEIGHT_RTOL = 1e-9  # a loss weight read back from the gradient, against 1, 1/B, 1/(nB), 1/n


def _relative(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in expected.values())
    gap = max(float((actual[name] - g).abs().max()) for name, g in expected.items())
    return gap / scale if scale > 0 else gap


class Analysis:
    """Turns a recorded run into observed updates and findings (see `audit`)."""

    def __init__(self, recorder: Recorder, length: int, batch_size: int, k1: int, k2: int,
                 reduction: str | None, tail: str | None, error: Exception | None) -> None:
        self.rec, self.T, self.B = recorder, length, batch_size
        self.k1, self.k2, self.reduction, self.tail = k1, k2, reduction, tail
        self.error = error
        self.findings: dict[str, Finding] = {}
        self.updates: list[ObservedUpdate] = []
        self.applied = [s for s in recorder.steps if s.applied]
        self.implements: Tbptt | None = None
        self.notes: list[str] = []
        self._reach: dict[int, int] = {}
        self._weights: list[tuple[int, float | None]] = []  # (loss steps, weight) per update
        self._reaches: list[dict[int, int]] = []  # loss step -> earliest step reached

    def add(self, kind: str, message: str, update: int | None = None,
            step: int | None = None) -> None:
        if kind not in self.findings:  # the first place each finding shows
            self.findings[kind] = Finding(kind, message, update, step)

    def reach(self, index: int) -> int:
        """The earliest time step the gradient of forward `index`'s outputs reaches."""
        chain = []  # iterative: an undetached per-step loop links a chain T calls long
        while index not in self._reach:
            carry = self.rec.forwards[index].carry_in
            if carry.kind == "attached" and carry.source is not None:
                chain.append(index)
                index = carry.source
            else:
                self._reach[index] = self.rec.forwards[index].lo
        for linked in chain:
            self._reach[linked] = self._reach[index]
        return self._reach[index]

    def run(self) -> None:
        self._carry_findings()
        self._order_findings()
        if self.error is not None:
            self._crash_findings()
        self._observe_updates()
        if self.error is None and self.applied:
            self._schedule_findings()

    # -- the carry from chunk to chunk --------------------------------------------------

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
            carry, update = forward.carry_in, forward.steps_before + 1
            if carry.kind == "attached" and carry.source is not None:
                source = forwards[carry.source]
                # A chunk boundary is a step() between the two forwards; an attached carry
                # within one update is the window's own recurrence.
                if (source.steps_before < forward.steps_before
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

    # -- backward(), step(), zero_grad() --------------------------------------------------

    def _order_findings(self) -> None:
        steps, bursts = self.rec.steps, self.rec.bursts
        applied_before: set[int] = set()
        for n, step in enumerate(steps):
            next_event = steps[n + 1].event if n + 1 < len(steps) else math.inf
            own_forwards = set(step.forwards_since_step)
            late = [b for b in bursts if step.event < b.event < next_event
                    and own_forwards & set(b.pred_grads)]
            position = max(step.progress - 1, 0)
            if late:
                applies = "no gradient" if not step.applied else "an older gradient"
                later = next((m + 1 for m in range(n + 1, len(steps))
                              if set(steps[m].pending) & {b.index for b in late}), None)
                fate = ("never applied" if later is None
                        else f"applied by step() #{later}, after the model has moved on")
                self.add("step_before_backward",
                         f"step() #{n + 1} comes after the forward of "
                         f"{self._steps_of(own_forwards)} but before the backward() of their "
                         f"loss: it applies {applies}, and the gradient of that loss is {fate}",
                         n + 1, position)
            elif not step.since_step:
                what = ("comes before any backward()" if n == 0
                        else "follows no backward() since the previous step()")
                self.add("step_before_backward",
                         f"step() #{n + 1} {what}, so it applies "
                         f"{'no gradient' if not step.applied else 'a gradient already applied'}"
                         f"; each later step() applies the gradient of the chunk before it",
                         n + 1, position)
            elif not step.applied:
                self.add("zero_grad_before_step",
                         f"zero_grad() is called between backward() and step(): the gradient "
                         f"of the loss of {self._steps_of(own_forwards)} is cleared "
                         f"before step() #{n + 1} could apply it, so that step() changes "
                         f"nothing", n + 1, position)
            produced = bursts[step.pending[-1]].grads_after if step.pending else None
            if produced is not None and _relative(step.grads, produced) > RTOL:
                self.add("gradient_modified",
                         f"step() #{n + 1} applies a gradient other than the one backward() "
                         f"produced: it was changed in between, by "
                         f"{_relative(step.grads, produced):.2g} relative (gradient clipping or "
                         f"scaling?). The reference is plain TBPTT; audit the loop without it",
                         n + 1, position)
            if step.applied and set(step.pending) & applied_before:
                self.add("gradients_accumulate",
                         f"the gradient applied by step() #{n + 1} still holds the gradient an "
                         f"earlier step() already applied: zero_grad() is not called between "
                         f"that step() and this update's backward(), so gradients accumulate "
                         f"across updates", n + 1, position)
            applied_before |= set(step.pending)
        last_step = steps[-1].event if steps else -1
        unapplied = [b for b in bursts if b.event > last_step and not b.crashed]
        if unapplied and self.error is None and "step_before_backward" not in self.findings:
            covered = {f for b in unapplied for f in b.pred_grads}
            trained = [self.rec.forwards[f].hi for s in steps if s.applied
                       for b in s.pending for f in self.rec.bursts[b].pred_grads]
            if covered and min(self.rec.forwards[f].lo for f in covered) >= max(trained,
                                                                               default=0):
                # Only steps after the last update: the tail the loop does not train, which
                # the tail policy accounts for; the backward() there is wasted work only.
                self.notes.append(f"the backward() of {self._steps_of(covered)} is computed "
                                  f"but never applied (no step() follows it)")
            else:
                self.add("gradient_never_applied",
                         f"the gradient of the last backward() (the loss of "
                         f"{self._steps_of(covered)}) is never applied: no step() follows it",
                         len(steps) + 1, max(self.rec.forwards[f].hi for f in covered) - 1
                         if covered else None)
        if self.error is None and not self.applied:
            if not steps:
                self.add("no_update", "the loop never called optimizer.step()")
            elif not self.findings:
                self.add("no_update", "no step() applied any gradient: the weights never change")
            else:
                self.notes.append("no step() applied any gradient: the weights never change")

    def _steps_of(self, forwards: set[int]) -> str:
        covered = sorted({t for f in forwards
                          for t in range(self.rec.forwards[f].lo, self.rec.forwards[f].hi)})
        if not covered:
            return "no steps"
        text = span(tuple(covered))
        return f"step {text}" if len(covered) == 1 else f"steps {text}"

    def _crash_findings(self) -> None:
        error = self.error
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        # PyTorch's autograd errors run on with advice; their first clause names the failure.
        message = text.split(". ")[0].split(" (")[0].split(": [")[0]
        update = len(self.rec.steps) + 1
        progress = max((f.hi for f in self.rec.forwards), default=0)
        backward_error = ("backward through the graph a second time" in message
                          or "modified by an inplace operation" in message)
        why = ""
        if backward_error:
            if "not_detached" in self.findings:
                why = ("; backward() went back into a graph an earlier backward() had freed or "
                       "whose weights step() had changed, because the hidden state is not "
                       "detached")
            elif ("step_before_backward" in self.findings
                  and "modified by an inplace operation" in message):
                why = ("; step() changed the weights that the graph of the loss still needed, "
                       "because step() comes before backward()")
            else:
                self.add("loss_not_reset",
                         f"backward() of update {update} went back into the graph of an "
                         f"earlier update although the hidden state was detached at every "
                         f"chunk boundary: the loss still holds the terms of earlier updates, "
                         f"so the running loss is not reset after backward()", update,
                         max(progress - 1, 0))
                why = "; the loss still holds an earlier update's terms (not reset)"
        self.findings = {"loop_raised": Finding(
            "loop_raised", f"the loop raised {type(error).__name__}: {message}{why}", update,
            max(progress - 1, 0)), **self.findings}

    # -- what each update trained ---------------------------------------------------------

    def _observe_updates(self) -> None:
        forwards = self.rec.forwards
        applied_before: set[int] = set()
        for index, step in enumerate(self.applied, start=1):
            own = [b for b in step.pending if b not in applied_before]
            applied_before |= set(step.pending)
            accumulated = len(own) < len(step.pending)
            weights: list[torch.Tensor] = []
            reaches: dict[int, int] = {}
            for b in own:
                for f, grad in self.rec.bursts[b].pred_grads.items():
                    self._terms(forwards[f], grad, index, weights, reaches)
            weight = None
            if weights:
                every = torch.cat([w.flatten() for w in weights])
                if bool(torch.allclose(every, every[0], rtol=_WEIGHT_RTOL, atol=0)):
                    weight = float(every[0])
                else:
                    self.add("wrong_loss",
                             f"the loss terms of update {index} weigh unequally (from "
                             f"{float(every.min()):.3g} to {float(every.max()):.3g} per term, "
                             f"read from the gradient on the predictions): its loss is not a "
                             f"mean or sum of the squared errors against ys at the same steps "
                             f"(a shifted target, another loss, or weights per step?)",
                             index, step.progress - 1)
            loss_steps = tuple(sorted(reaches))
            self._weights.append((len(loss_steps), weight))
            self._reaches.append(reaches)
            self.updates.append(ObservedUpdate(
                index, step.progress - 1, loss_steps,
                min(reaches.values()) if reaches else None, weight, accumulated))

    def _terms(self, forward: Forward, grad: torch.Tensor, update: int,
               weights: list[torch.Tensor], reaches: dict[int, int]) -> None:
        """Reads the weight of each loss term of `forward` from the gradient on its preds."""
        term = forward.term_grad
        for row in range(forward.hi - forward.lo):
            g, g0 = grad[row], term[row]
            if not bool(g.ne(0).any()):
                continue
            t = forward.lo + row
            w = (g * g0).sum(-1) / (g0 * g0).sum(-1)  # [B]
            residual = float((g - w[:, None] * g0).abs().max())
            if residual > 1e-8 * float(g.abs().max()):
                self.add("wrong_loss",
                         f"the gradient reaching the prediction of step {t} is not that of the "
                         f"squared error against ys[{t}]: the loss of step {t} uses another "
                         f"target or another loss", update, t)
            weights.append(w)
            reaches[t] = min(reaches.get(t, t), self.reach(forward.index))

    # -- against the plan of TBPTT(k1, k2) ------------------------------------------------

    def _batch_and_reduction(self) -> list[tuple[str, str]]:
        """(reduction, batch) pairs whose weights match every update's."""
        fits = []
        for reduction in ("sum", "mean"):
            for batch in ("sum", "mean"):
                def expected(n: int, reduction=reduction, batch=batch) -> float:
                    per_batch = 1.0 if batch == "sum" else 1.0 / self.B
                    return per_batch / n if reduction == "mean" else per_batch
                if self._weights and all(
                        w is not None and math.isclose(w, expected(n), rel_tol=_WEIGHT_RTOL)
                        for n, w in self._weights if n):
                    fits.append((reduction, batch))
        return fits

    def _observed_tbptt(self) -> Tbptt | None:
        updates = self.updates
        if not updates or any(u.accumulated or not u.loss_steps for u in updates):
            return None
        spans = [(u.loss_steps[0], u.loss_steps[-1] + 1) for u in updates]
        if any(len(u.loss_steps) != b - a for u, (a, b) in zip(updates, spans, strict=True)):
            return None
        if spans[0][0] != 0 or any(spans[i + 1][0] != spans[i][1]
                                   for i in range(len(spans) - 1)):
            return None
        k1 = spans[0][1]
        if any(b - a != k1 for a, b in spans[:-1]) or spans[-1][1] - spans[-1][0] > k1:
            return None
        end = spans[-1][1]
        if end == self.T:
            tail = None if self.T % k1 == 0 else "partial"
        elif end == self.T // k1 * k1:
            tail = "drop"
        else:
            return None
        overlap = max(a - min(reach.values())
                      for (a, _), reach in zip(spans, self._reaches, strict=True))
        for (a, _), reach in zip(spans, self._reaches, strict=True):
            if set(reach.values()) != {max(0, a - overlap)}:
                return None
        if any(u.after_step != b - 1 for u, (_, b) in zip(updates, spans, strict=True)):
            return None
        fits = self._batch_and_reduction()
        if not fits:
            return None
        # With one loss step per update mean and sum coincide: the intended one is named.
        reduction, batch = ([fit for fit in fits if fit[0] == self.reduction] or fits)[0]
        return Tbptt(k1, k1 + overlap, reduction, tail, batch)

    def _schedule_findings(self) -> None:
        self.implements = self._observed_tbptt()
        observed_tail = self.implements.tail if self.implements else None
        counted = "drop" if len(self.updates) == self.T // self.k1 else "partial"
        tail = self.tail or observed_tail or counted
        schedule = plan(self.T, self.k1, self.k2, tail=tail)
        planned = schedule.updates
        k = f"TBPTT(k1={self.k1}, k2={self.k2})"
        for u, (obs, reach) in enumerate(zip(self.updates, self._reaches, strict=False)):
            if u >= len(planned):
                break
            want = planned[u]
            want_steps = tuple(range(want.loss_start, want.loss_stop))
            if obs.loss_steps != want_steps or obs.after_step != want.loss_stop - 1:
                if obs.loss_steps == want_steps:
                    message = (f"update {u + 1} is applied after the model ran step "
                               f"{obs.after_step}, though its loss ends at step "
                               f"{want.loss_stop - 1}: the forward of the steps between ran "
                               f"with the weights before this update")
                else:
                    ends = [x.after_step for x in self.updates[:6]]
                    want_ends = [x.loss_stop - 1 for x in planned[:6]]
                    message = (f"update {u + 1} trains the loss of {named_steps(obs.loss_steps)}, "
                               f"applied after step {obs.after_step}; {k} trains "
                               f"{named_steps(want_steps)} there")
                    if ends != want_ends:
                        message += (f". The loop's updates come after steps "
                                    f"{', '.join(map(str, ends))}, ... instead of "
                                    f"{', '.join(map(str, want_ends))}, ...")
                self.add("wrong_update_steps", message, u + 1, obs.after_step)
                break
            too_short = {t: r for t, r in reach.items() if r > want.window_start}
            too_long = {t: r for t, r in reach.items() if r < want.window_start}
            for kind, wrong, word in (("truncation_too_short", too_short, "only"),
                                      ("truncation_too_long", too_long, "")):
                if wrong:  # the loss step where the window is furthest off
                    t = max(sorted(wrong), key=lambda t: abs(wrong[t] - want.window_start))
                    self.add(kind,
                             f"the gradient of the loss at step {t} reaches back {word} to "
                             f"step {wrong[t]}".replace("  ", " ") +
                             f", but {k} backpropagates update {u + 1} from step "
                             f"{want.window_start} ({plural(t - wrong[t] + 1, 'step')} instead "
                             f"of {t - want.window_start + 1})", u + 1, t)
        if "wrong_update_steps" not in self.findings:
            self._count_findings(planned, tail)
        self._reduction_findings()

    def _count_findings(self, planned: tuple, tail: str) -> None:
        remainder = self.T % self.k1
        done = len(self.updates)
        if done < len(planned):
            missing = planned[done]
            if (done == len(planned) - 1 and remainder and tail == "partial"
                    and missing.loss_stop - missing.loss_start == remainder):
                self.add("tail_dropped",
                         f"the last {remainder} steps ({missing.loss_start}-{self.T - 1}) are "
                         f"never trained: the loop makes {done} updates, tail='partial' makes "
                         f"{len(planned)}, the last owning those steps", done + 1,
                         missing.loss_start)
            else:
                self.add("wrong_update_steps",
                         f"the loop makes {done} updates where TBPTT(k1={self.k1}) makes "
                         f"{len(planned)}: the steps from {missing.loss_start} on are never "
                         f"trained", done + 1, missing.loss_start)
        elif done > len(planned):
            extra = self.updates[len(planned)]
            if tail == "drop" and remainder and len(planned) + 1 == done:
                self.add("tail_trained",
                         f"the last {remainder} steps ({span(extra.loss_steps)}) are trained "
                         f"by a shorter update {done}, but tail='drop' leaves them untrained",
                         done, extra.loss_steps[0] if extra.loss_steps else None)
            else:
                self.add("wrong_update_steps",
                         f"the loop makes {done} updates where TBPTT(k1={self.k1}) makes "
                         f"{len(planned)}", len(planned) + 1, extra.after_step)

    def _reduction_findings(self) -> None:
        if self.reduction is None or not self._weights:
            return
        if all(n <= 1 for n, _ in self._weights):
            return  # one loss step per update: mean and sum are the same
        fits = self._batch_and_reduction()
        if not fits or any(fit[0] == self.reduction for fit in fits):
            if not fits:
                u = next(i for i, (n, w) in enumerate(self._weights, 1) if n)
                self.add("wrong_reduction",
                         f"the loss weights of update {u} fit neither a mean nor a sum over "
                         f"its {self._weights[u - 1][0]} steps (each term weighs "
                         f"{self._weights[u - 1][1]})", u)
            return
        u = next(i for i, (m, _) in enumerate(self._weights, 1) if m > 1)
        n, weight = self._weights[u - 1]
        sequences = f"{self.B} sequences"
        if self.reduction == "mean":
            mean = 1.0 / (n * self.B)
            message = (f"the loss is summed over the steps of each update where a mean was "
                       f"intended: each loss term of update {u} weighs {weight:.6g}, in the mean "
                       f"over its {n} steps and {sequences} one weighs {mean:.6g}, so its "
                       f"gradient is {weight / mean:.6g}x the mean's (divide the loss by the "
                       f"number of terms, or use nn.MSELoss() on the chunk)")
        else:
            message = (f"the loss is averaged over the steps of each update where a sum was "
                       f"intended: each loss term of update {u} weighs {weight:.6g}, in the sum "
                       f"over its {n} steps and {sequences} one weighs 1, so its gradient is "
                       f"1/{1 / weight:.6g} of the sum's")
        self.add("wrong_reduction", message, u)

    # -- the numbers ----------------------------------------------------------------------

    def verdict(self, reference: Callable[[Tbptt], list[dict[str, torch.Tensor]]],
                setup: str) -> AuditVerdict:
        target = self._reference_semantics()
        max_diff, planned = None, 0
        if target is not None:
            expected = reference(target)
            planned = len(expected)
            diffs = []
            for u, (obs, step, grads) in enumerate(
                    zip(self.updates, self.applied, expected, strict=False), start=1):
                diff = _relative(step.grads, grads)
                diffs.append(diff)
                self.updates[u - 1] = dataclasses.replace(obs, gradient_difference=diff)
            if diffs:
                max_diff = max(diffs)
            first_bad = next((u for u, d in enumerate(diffs, 1) if d > RTOL), None)
            if first_bad is not None and not self.findings:
                cause = ("" if first_bad == 1 else
                         f"; the gradients before it matched, so the weights update "
                         f"{first_bad} starts from differ: does the loop change the learning "
                         f"rate, the optimizer or the weights between updates?")
                self.add("gradients_differ",
                         f"the gradient of update {first_bad} differs from the reference's by "
                         f"{diffs[first_bad - 1]:.1e} (relative) though every step, window and "
                         f"weight the audit measures is as intended{cause}", first_bad)
            elif first_bad is not None:
                self.notes.append(f"against the reference the gradients first differ at "
                                  f"update {first_bad} ({diffs[first_bad - 1]:.1e} relative)")
        correct = (not self.findings and self.error is None and self.implements is not None
                   and max_diff is not None and max_diff <= RTOL
                   and len(self.updates) == planned)
        return AuditVerdict(
            correct=correct, implements=self.implements,
            intended={"k1": self.k1, "k2": self.k2, "reduction": self.reduction,
                      "tail": self.tail},
            findings=tuple(self.findings.values()), updates=tuple(self.updates),
            reference=target, max_gradient_difference=max_diff,
            error=None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            setup=setup, planned_updates=planned, notes=tuple(self.notes))

    def _reference_semantics(self) -> Tbptt | None:
        """The intended TBPTT, its unstated reduction, tail and batch taken from the loop."""
        observed = self.implements
        fits = self._batch_and_reduction()
        reduction = self.reduction or (observed.reduction if observed else None) or (
            fits[0][0] if fits else "mean")
        # Where the loop's reduction is not the intended one, the reference is SPEC's: a mean
        # over every term or a sum over every term.
        batch = next((b for r, b in fits if r == reduction), reduction)
        tail = self.tail or (observed.tail if observed else None) or "partial"
        return Tbptt(self.k1, self.k2, reduction, tail, batch)
