"""The loss the loop computes and what each update trained: the per-term loss (and its
target) whose gradient the loop's loss puts on every prediction, each update's loss steps, the
weight of each loss term, the terms a mask leaves out and how far back each term's gradient
reaches. A part of `Analysis` (`_analysis`), whose state it reads and whose findings it adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tbptt_torch.audit import _losses
from tbptt_torch.audit._losses import WEIGHT_RTOL, Loss
from tbptt_torch.audit._trace import AuditError, Forward
from tbptt_torch.audit._verdict import ObservedUpdate


@dataclass(frozen=True)
class Target:
    """What a loss term of step t is computed against: `ys[t + shift]`, or `xs[t]`."""

    source: str  # "ys" or "xs"
    shift: int = 0

    def name(self, t: int) -> str:
        return f"{self.source}[{t + self.shift}]"



class LossTerms:
    """Reads the loss and each update's terms (see the module doc); `Analysis` holds the
    state: `rec`, `xs`, `ys`, `B`, `intent`, `applied`, `findings`, and what this fills in:
    `loss`, `_target`, `updates`, `_weights`, `_reaches`, `_terms`."""

    def _targets(self, forward: Forward, target: Target) -> torch.Tensor | None:
        lo, hi = forward.lo + target.shift, forward.hi + target.shift
        source = self.xs if target.source == "xs" else self.ys
        if lo < 0 or hi > self.T:
            return None
        return source[lo:hi]

    def _term_gradient(self, loss: Loss, forward: Forward, target: Target
                       ) -> torch.Tensor | None:
        key = (loss.name, forward.index, target)
        if key not in self._term_cache:
            targets = self._targets(forward, target)
            try:
                grad = None if targets is None else _losses.term_gradient(loss, forward.preds,
                                                                          targets)
            except (ValueError, RuntimeError, IndexError):  # a loss that does not apply
                grad = None
            self._term_cache[key] = grad
        return self._term_cache[key]

    def _fits(self, loss: Loss, target: Target, regular: bool = False) -> bool:
        """Whether every gradient on the predictions is `loss`'s term gradient against
        `target` times a weight per term; `regular`: and, within each backward(), every term
        that has one weighs the same, positive (a mean or a sum, masked or not). With one
        output per step any gradient is a multiple of any loss's, so only the weights tell
        the target apart."""
        for burst in self.rec.bursts:
            every = []
            for f, grad in burst.pred_grads.items():
                term = self._term_gradient(loss, self.rec.forwards[f], target)
                if term is None or term.shape != grad.shape:
                    return False
                w, fits = _losses.weights(grad, term)
                if not fits:
                    return False
                every.append(w.flatten())
            if regular and every:
                weights = torch.cat(every)
                weights = weights[weights != 0]
                if len(weights) and not (bool((weights > 0).all()) and bool(torch.allclose(
                        weights, weights[0], rtol=WEIGHT_RTOL, atol=0))):
                    return False
        return True

    def _identify_loss(self) -> None:
        """Finds the per-term loss, and its target, whose gradient the loop's loss puts on
        every prediction; a target other than ys[t] is a finding."""
        given = self.intent.loss
        tried = _losses.candidates(self.ys, given)
        if not any(burst.pred_grads for burst in self.rec.bursts):
            self.loss = tried[0]  # nothing to tell the losses apart: the reference's
            return
        known = _losses.candidates(self.ys, None)
        # A mask given weighs the terms unequally on purpose: only the fit can tell.
        regular = self.intent.mask is None
        for loss in tried:
            if self._fits(loss, Target("ys"), regular):
                self.loss = loss
                return
        if given is not None:
            other = next((loss for loss in known if self._fits(loss, Target("ys"), regular)),
                         None)
            if other is not None:
                self.loss = other
                self.add("wrong_loss", f"the loop's loss is {other.name} of each step, not the "
                                       f"loss_fn given ({given.name})", 1, 0)
                return
        shifts = [Target("ys", -1), Target("ys", 1)]
        if self.xs.shape == self.ys.shape and self.xs.dtype == self.ys.dtype:
            shifts.insert(0, Target("xs"))
        for target in shifts:
            for loss in (*tried, *known):
                if self._fits(loss, target, regular):
                    self.loss, self._target = loss, target
                    self._wrong_target_finding()
                    return
        for loss in tried:  # against ys[t], with weights per term the analysis reports
            if self._fits(loss, Target("ys")):
                self.loss = loss
                return
        names = ", ".join(loss.name for loss in tried)
        kind = "float" if torch.is_floating_point(self.ys) else "integer class"
        raise AuditError(
            f"the gradient the loop's loss puts on the predictions fits none of the per-term "
            f"losses the audit {'was given' if given else 'knows for ' + kind + ' targets'} "
            f"({names}), against ys[t] or a target one step off: pass loss_fn, the loss your "
            f"loop computes as loss_fn(preds, targets) -> losses[t, b] (tbptt audit --loss "
            f"FILE:NAME), so the audit can read the weight of each term")

    def _wrong_target_finding(self) -> None:
        first_burst = next(b for b in self.rec.bursts if b.pred_grads)
        f = min(first_burst.pred_grads)
        forward, grad = self.rec.forwards[f], first_burst.pred_grads[f]
        row = next(r for r in range(grad.shape[0]) if bool(grad[r].ne(0).any()))
        t = forward.lo + row
        update = next((u.index + 1 for u in self.rec.updates
                       if first_burst.index in u.pending), len(self.rec.updates) + 1)
        target = self._target
        if target.source == "xs":
            what, why = ("the input of that step itself", f"the targets are not shifted (for "
                         f"next-step prediction, the target of step {t} is the input of step "
                         f"{t + 1})")
        elif target.shift < 0:
            what, why = "the target of the step before", "the targets lag one step behind"
        else:
            what, why = "the target of the next step", "the targets are one step ahead"
        self.add("wrong_loss",
                 f"the loss of step {t} is computed against {target.name(t)}, {what}, not "
                 f"ys[{t}]: {why}", update, t)

    def _weights_of(self, forward: Forward, grad: torch.Tensor) -> torch.Tensor:
        term = self._term_gradient(self.loss, forward, self._target)
        if term is None or term.shape != grad.shape:
            return torch.zeros(grad.shape[:2], dtype=grad.dtype)
        return _losses.weights(grad, term)[0]

    def _observe_updates(self) -> None:
        forwards = self.rec.forwards
        applied_before: set[int] = set()
        for index, update in enumerate(self.applied, start=1):
            own = [b for b in update.pending if b not in applied_before]
            applied_before |= set(update.pending)
            accumulated = len(own) < len(update.pending)
            combined: dict[int, torch.Tensor] = {}
            for b in own:
                for f, grad in self.rec.bursts[b].pred_grads.items():
                    combined[f] = combined[f] + grad if f in combined else grad
            terms: dict[int, list[torch.Tensor]] = {}
            reaches: dict[int, int] = {}
            silent: dict[int, int] = {}  # steps whose predictions got a zero gradient
            for f, grad in combined.items():
                w = self._weights_of(forwards[f], grad) if self.loss else None
                for row in range(grad.shape[0]):
                    t = forwards[f].lo + row
                    if not bool(grad[row].ne(0).any()):
                        silent.setdefault(t, f)
                        continue
                    terms.setdefault(t, []).append(w[row] if w is not None
                                                   else torch.zeros(self.B))
                    reaches[t] = min(reaches.get(t, t), self.reach(f))
            if reaches:
                self._masked_steps(terms, reaches, silent)
            every = torch.cat([w for t in sorted(terms) for w in terms[t]]) if terms else None
            weight, masked = None, 0
            if every is not None:
                nonzero = every[every != 0]
                masked = int((every == 0).sum())
                if len(nonzero) and bool(torch.allclose(nonzero, nonzero[0], rtol=WEIGHT_RTOL,
                                                        atol=0)):
                    weight = float(nonzero[0])
                elif self.intent.mask is None and len(nonzero):
                    self.add("wrong_loss",
                             f"the loss terms of update {index} weigh unequally (from "
                             f"{float(nonzero.min()):.3g} to {float(nonzero.max()):.3g} per "
                             f"term, read from the gradient on the predictions): its loss is "
                             f"not a mean or sum of the per-step {self.loss.name} against "
                             f"{self._target.name(0).replace('[0]', '[t]')} (another loss? "
                             f"pass it as loss_fn; weights per step or sequence? pass them as "
                             f"mask)",
                             update.index + 1, update.progress - 1)
            loss_steps = tuple(sorted(terms))
            self._weights.append((len(loss_steps), weight,
                                  len(loss_steps) * self.B - masked))
            self._reaches.append(reaches)
            self._terms.append({t: sum(ws) for t, ws in terms.items()})
            self.updates.append(ObservedUpdate(
                index, update.progress - 1, loss_steps,
                min(reaches.values()) if reaches else None, weight, accumulated,
                masked_terms=masked, lr=update.lr))

    def _masked_steps(self, terms: dict[int, list[torch.Tensor]], reaches: dict[int, int],
                      silent: dict[int, int]) -> None:
        """Adds to an update's loss steps those whose every term weighs 0 (a mask): inside
        its loss steps, and, where a mask is given that masks whole steps, at their ends."""
        def add(t: int) -> None:
            terms[t] = [torch.zeros(self.B, dtype=torch.float64)]
            reaches[t] = self.reach(silent[t])

        for t in range(min(reaches), max(reaches)):
            if t not in reaches and t in silent:
                add(t)
        mask = self.intent.mask
        if mask is None:
            return
        for step, edge in ((-1, min(reaches)), (1, max(reaches))):
            t = edge + step
            while t in silent and t not in reaches and not bool(mask[t].ne(0).any()):
                add(t)
                t += step

