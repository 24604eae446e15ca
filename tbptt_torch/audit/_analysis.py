"""The analysis behind `tbptt_torch.audit`: it turns a recorded run of the loop (`_trace`) into
observed updates and findings, and compares each update's gradient with the reference's.

It reads, in order: what the loop called and when (`_calls`: the carry, the order of
`backward()`, `zero_grad()` and the updates, clipping, where it raised); the loss the loop
computes and what each update trained (`_terms`); and here, from those, the TBPTT the loop
implements, every way it differs from the intended one (the update steps, the window, the
tail, the reduction, the mask, the clipping), the learning rate of its updates, and the
verdict against the reference's gradients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tbptt.schedule import plan
from tbptt_torch.audit._calls import CallFindings, relative
from tbptt_torch.audit._losses import WEIGHT_RTOL, Loss
from tbptt_torch.audit._report import named_steps, plural, span
from tbptt_torch.audit._terms import LossTerms, Target
from tbptt_torch.audit._trace import Recorder, UpdateCall
from tbptt_torch.audit._verdict import RTOL, AuditVerdict, Finding, ObservedUpdate, Tbptt

Reference = Callable[[Tbptt, Loss, "torch.Tensor | None"], list[dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class Intent:
    """What the loop is meant to implement; None where the user did not say."""

    k1: int
    k2: int
    reduction: str | None
    tail: str | None
    clip_grad_norm: float | None
    mask: torch.Tensor | None  # [T, B] non-negative weights of the loss terms
    loss: Loss | None


def _furthest(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    """The parameter whose gradient is furthest from the expected one."""
    return max(expected, key=lambda name: float((actual[name] - expected[name]).abs().max()))


class Analysis(CallFindings, LossTerms):
    """Turns a recorded run into observed updates and findings (see `audit`)."""

    def __init__(self, recorder: Recorder, xs: torch.Tensor, ys: torch.Tensor, intent: Intent,
                 error: Exception | None) -> None:
        self.rec, self.xs, self.ys = recorder, xs, ys
        self.T, self.B = xs.shape[0], xs.shape[1]
        self.intent = intent
        self.k1, self.k2, self.reduction, self.tail = (intent.k1, intent.k2, intent.reduction,
                                                       intent.tail)
        self.error = error
        self.findings: dict[str, Finding] = {}
        self.updates: list[ObservedUpdate] = []
        self.applied = [u for u in recorder.updates if u.applied]
        self.implements: Tbptt | None = None
        self.notes: list[str] = []
        self.loss: Loss | None = None
        self._target = Target("ys")
        self._term_cache: dict[tuple[str, int, Target], torch.Tensor | None] = {}
        self._reach: dict[int, int] = {}
        self._weights: list[tuple[int, float | None, int]] = []  # (steps, weight, unmasked)
        self._reaches: list[dict[int, int]] = []  # loss step -> earliest step reached
        self._terms: list[dict[int, torch.Tensor]] = []  # loss step -> weights [B]
        self._norms: list[tuple[UpdateCall, float, float]] = []  # (update, norm, factor)
        self._clip: float | None = None  # the max norm the loop clips to
        self._factors: list[tuple[float | None, float]] = []  # (factor, mask sum) per update

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
        self._gradient_changes()
        if self.error is not None:
            self._crash_findings()
        self._identify_loss()
        self._observe_updates()
        if self.error is None and self.applied:
            self._schedule_findings()
            self._clip_findings()
        self._rate_notes()

    # -- against the plan of TBPTT(k1, k2) ------------------------------------------------

    def _expected_weight(self, reduction: str, batch: str, steps: int, unmasked: int) -> float:
        if reduction == "mean" and batch == "mean":
            return 1.0 / unmasked  # SPEC's mean: over the terms the mask keeps
        per_batch = 1.0 if batch == "sum" else 1.0 / self.B
        return per_batch / steps if reduction == "mean" else per_batch

    def _batch_and_reduction(self) -> list[tuple[str, str]]:
        """(reduction, batch) pairs whose weights match every update's."""
        if self.intent.mask is not None:  # SPEC's: sum(w * l), or sum(w * l) / sum(w)
            factors = [(f, total) for f, total in self._factors if total]
            return [(r, r) for r, want in (("sum", lambda total: 1.0),
                                           ("mean", lambda total: 1.0 / total))
                    if factors and all(f is not None and math.isclose(f, want(total),
                                                                      rel_tol=WEIGHT_RTOL)
                                       for f, total in factors)]
        fits = []
        for reduction in ("sum", "mean"):
            for batch in ("sum", "mean"):
                if self._weights and all(
                        w is not None and math.isclose(
                            w, self._expected_weight(reduction, batch, n, m),
                            rel_tol=WEIGHT_RTOL)
                        for n, w, m in self._weights if n and m):
                    fits.append((reduction, batch))
        return fits

    def _masked(self) -> bool:
        return any(u.masked_terms for u in self.updates)

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
        return Tbptt(k1, k1 + overlap, reduction, tail, batch, self._clip, self._masked())

    def _schedule_findings(self) -> None:
        self._mask_factors()
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
                    message = (f"update {u + 1} trains the loss of "
                               f"{named_steps(obs.loss_steps)}, applied after step "
                               f"{obs.after_step}; {k} trains {named_steps(want_steps)} there")
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

    def _mask_factors(self) -> None:
        """With a mask given, each update's term weights must be one factor times the mask
        over its loss steps: the factor says the reduction (1: a sum; 1 / the mask's sum
        over those steps: SPEC's mean); a term weighted otherwise is a finding."""
        mask = self.intent.mask
        if mask is None:
            return
        for u, (obs, terms) in enumerate(zip(self.updates, self._terms, strict=True), start=1):
            if not obs.loss_steps:
                self._factors.append((None, 0.0))
                continue
            got = torch.stack([terms[t] for t in obs.loss_steps])
            given = mask[list(obs.loss_steps)].to(got.dtype)
            square = float((given * given).sum())
            factor = float((got * given).sum()) / square if square else 0.0
            self._factors.append((factor, float(given.sum())))
            misfit = (got - factor * given).abs()
            if float(misfit.max()) > 1e-8 * float(got.abs().max()):
                row, b = divmod(int(misfit.argmax()), self.B)
                t = obs.loss_steps[row]
                self.add("wrong_mask",
                         f"the loss terms of update {u} are not weighted as the mask given: "
                         f"the term of step {t}, sequence {b} weighs {float(got[row, b]):.3g} "
                         f"where the mask, times {factor:.3g} as the other terms, gives it "
                         f"{factor * float(given[row, b]):.3g}", u, t)

    def _reduction_findings(self) -> None:
        if self.reduction is None or not self._weights:
            return
        if all(n <= 1 for n, _, _ in self._weights) and self.intent.mask is None:
            return  # one loss step per update: mean and sum are the same
        fits = self._batch_and_reduction()
        if not fits or any(fit[0] == self.reduction for fit in fits):
            if not fits and self.intent.mask is not None:
                if "wrong_mask" not in self.findings:
                    u = next(i for i, (f, _) in enumerate(self._factors, 1) if f is not None)
                    factor, total = self._factors[u - 1]
                    self.add("wrong_reduction",
                             f"the loss of update {u} is the mask-weighted sum of its terms "
                             f"times {factor:.6g}, neither the sum (times 1) nor SPEC's mean "
                             f"(times 1/{total:.6g}, one over the mask's sum)", u)
            elif not fits:
                u = next(i for i, (n, _, _) in enumerate(self._weights, 1) if n)
                n, weight, unmasked = self._weights[u - 1]
                if (self.reduction == "mean" and weight is not None and unmasked < n * self.B
                        and math.isclose(weight, 1 / (n * self.B), rel_tol=WEIGHT_RTOL)):
                    self.add("wrong_reduction",
                             f"the masked loss of update {u} is divided by all {n * self.B} "
                             f"terms of its {n} steps, not by the {unmasked} terms the mask "
                             f"keeps: divide the masked sum by the sum of the mask", u)
                else:
                    self.add("wrong_reduction",
                             f"the loss weights of update {u} fit neither a mean nor a sum "
                             f"over its {n} steps (each term weighs {weight})", u)
            return
        if self.intent.mask is not None:
            u = next(i for i, (f, _) in enumerate(self._factors, 1) if f is not None)
            total = self._factors[u - 1][1]
            if self.reduction == "mean":
                message = (f"the loss of update {u} is the mask-weighted sum of its terms "
                           f"where SPEC's mean was intended: divide it by the sum of the mask "
                           f"over those terms ({total:.6g})")
            else:
                message = (f"the loss of update {u} is the mask-weighted sum of its terms "
                           f"divided by the sum of the mask over them ({total:.6g}), where "
                           f"the sum was intended")
            self.add("wrong_reduction", message, u)
            return
        u = next(i for i, (m, _, _) in enumerate(self._weights, 1) if m > 1)
        n, weight, unmasked = self._weights[u - 1]
        sequences = f"{self.B} sequences"
        if self.reduction == "mean":
            mean = 1.0 / unmasked
            message = (f"the loss is summed over the steps of each update where a mean was "
                       f"intended: each loss term of update {u} weighs {weight:.6g}, in the mean "
                       f"over its {n} steps and {sequences} one weighs {mean:.6g}, so its "
                       f"gradient is {weight / mean:.6g}x the mean's (divide the loss by the "
                       f"number of terms, or reduce it with a mean over the chunk)")
        else:
            message = (f"the loss is averaged over the steps of each update where a sum was "
                       f"intended: each loss term of update {u} weighs {weight:.6g}, in the sum "
                       f"over its {n} steps and {sequences} one weighs 1, so its gradient is "
                       f"1/{1 / weight:.6g} of the sum's")
        self.add("wrong_reduction", message, u)

    def _clip_findings(self) -> None:
        intended = self.intent.clip_grad_norm
        clipped = [(u, norm, f) for u, norm, f in self._norms if f < 1]
        if intended is None:
            if self._clip is not None:
                self.notes.append(
                    f"the loop clips the gradient's global norm to {self._clip:.6g} between "
                    f"backward() and the update (clip_grad_norm_; at {len(clipped)} of "
                    f"{len(self._norms)} updates the norm was above it), and the reference "
                    f"clips alike; say clip_grad_norm={self._clip:.6g} (tbptt audit "
                    f"--clip-grad-norm {self._clip:.6g}) if that is meant, and it is judged too")
            return
        if self._clip is not None and not math.isclose(self._clip, intended, rel_tol=1e-6):
            update, norm, factor = clipped[0]
            self.add("wrong_clipping",
                     f"the gradient of update {update.index + 1} (norm {norm:.4g}) is clipped "
                     f"to norm {factor * norm:.4g}: the loop clips to max norm "
                     f"{self._clip:.6g} where clip_grad_norm={intended:g} was intended",
                     update.index + 1, update.progress - 1)
        elif self._clip is None and "gradient_modified" not in self.findings:
            over = next(((u, norm) for u, norm, f in self._norms if norm > intended), None)
            if over is not None:
                update, norm = over
                self.add("wrong_clipping",
                         f"the gradient of update {update.index + 1} has norm {norm:.4g}, "
                         f"above clip_grad_norm={intended:g}, and is applied unclipped: call "
                         f"torch.nn.utils.clip_grad_norm_(model.parameters(), {intended:g}) "
                         f"between backward() and the update", update.index + 1,
                         update.progress - 1)

    def _rate_notes(self) -> None:
        """How the loop moves the weights: the learning rate of each update."""
        if not self.applied:
            return
        rates = [u.lr for u in self.applied]
        own = all(u.kind == "own" for u in self.applied)
        if any(rate is None for rate in rates):
            first = next(n for n, rate in enumerate(rates, 1) if rate is None)
            self.notes.append(
                f"update {first} moves the weights by other than a plain SGD step along "
                f"p.grad (momentum, weight decay or an adaptive optimizer?); every update is "
                f"still judged by the gradient it applies, each from the weights the loop had")
        elif any(not math.isclose(rate, rates[0], rel_tol=1e-9) for rate in rates):
            changes = [f"lr={rates[0]:.6g} at update 1"] + [
                f"{rate:.6g} from update {n}" for n, (before, rate)
                in enumerate(zip(rates, rates[1:], strict=False), start=2)
                if not math.isclose(rate, before, rel_tol=1e-9)]
            self.notes.append(f"the learning rate changes: {', '.join(changes)}; each update "
                              f"is judged by the gradient it applies")
        elif own:
            self.notes.append(f"the loop updates the weights itself (no optimizer.step()): "
                              f"plain SGD steps along p.grad with lr={rates[0]:.6g}")

    # -- the numbers ----------------------------------------------------------------------

    def verdict(self, reference: Reference, setup: str) -> AuditVerdict:
        target = self._reference_semantics()
        max_diff, planned = None, 0
        if target is not None and self.loss is not None:
            expected = reference(target, self.loss, self._reference_mask())
            planned = len(expected)
            diffs = []
            for u, (obs, update, grads) in enumerate(
                    zip(self.updates, self.applied, expected, strict=False), start=1):
                diff = relative(update.grads, grads)
                diffs.append(diff)
                self.updates[u - 1] = dataclasses.replace(obs, gradient_difference=diff)
            if diffs:
                max_diff = max(diffs)
            first_bad = next((u for u, d in enumerate(diffs, 1) if d > RTOL), None)
            if first_bad is not None and not self.findings:
                name = _furthest(self.applied[first_bad - 1].grads, expected[first_bad - 1])
                self.add("gradients_differ",
                         f"the gradient of update {first_bad} differs from the reference's by "
                         f"{diffs[first_bad - 1]:.1e} (relative), most in {name}, though every "
                         f"step, window and weight the audit measures is as intended and the "
                         f"reference starts that update from the loop's own weights: a "
                         f"parameter left out of backward() (requires_grad=False), a gradient "
                         f"hook, or a model that changes between calls?", first_bad)
            elif first_bad is not None:
                self.notes.append(f"against the reference the gradients first differ at "
                                  f"update {first_bad} ({diffs[first_bad - 1]:.1e} relative)")
        correct = (not self.findings and self.error is None and self.implements is not None
                   and max_diff is not None and max_diff <= RTOL
                   and len(self.updates) == planned)
        return AuditVerdict(
            correct=correct, implements=self.implements,
            intended={"k1": self.k1, "k2": self.k2, "reduction": self.reduction,
                      "tail": self.tail, "clip_grad_norm": self.intent.clip_grad_norm},
            findings=tuple(self.findings.values()), updates=tuple(self.updates),
            reference=target, max_gradient_difference=max_diff,
            error=(None if self.error is None
                   else f"{type(self.error).__name__}: {' '.join(str(self.error).split())}"),
            setup=setup, planned_updates=planned, notes=tuple(self.notes),
            loss=None if self.loss is None else self.loss.name)

    def _reference_semantics(self) -> Tbptt | None:
        """The intended TBPTT, its unstated reduction, tail, batch, clipping and mask taken
        from the loop."""
        observed = self.implements
        fits = self._batch_and_reduction()
        reduction = self.reduction or (observed.reduction if observed else None) or (
            fits[0][0] if fits else "mean")
        # Where the loop's reduction is not the intended one, the reference is SPEC's: a mean
        # over every term or a sum over every term.
        batch = next((b for r, b in fits if r == reduction), reduction)
        tail = self.tail or (observed.tail if observed else None) or "partial"
        clip = self.intent.clip_grad_norm if self.intent.clip_grad_norm is not None else (
            self._clip)
        masked = self.intent.mask is not None or self._masked()
        return Tbptt(self.k1, self.k2, reduction, tail, batch, clip, masked)

    def _reference_mask(self) -> torch.Tensor | None:
        """The weights `[T, B]` of the reference's loss terms: the mask given, or the one the
        loop applies (its terms of weight 0)."""
        if self.intent.mask is not None:
            return self.intent.mask
        if not self._masked():
            return None
        mask = torch.ones(self.T, self.B, dtype=torch.float64)
        for terms in self._terms:
            for t, w in terms.items():
                mask[t] = (w != 0).to(mask.dtype)
        return mask

