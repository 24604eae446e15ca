"""Audit a hand-written PyTorch TBPTT loop: is it the TBPTT(k1, k2) you meant?

`audit(loop, k1=4, ...)` runs `loop(model, optimizer, xs, ys, k)` once on an instrumented
model, plain SGD and float64 data (see `tbptt_torch._audit_trace`), and reads back what the
loop did: which time steps each update's loss covers and with what weight, how far back each
loss term's gradient reaches, whether the carry handed from chunk to chunk is detached and
is the state the previous chunk reached, and the order of `backward()`, `step()` and
`zero_grad()`. It then runs the reference, `tbptt_torch.tbptt_train_step` over the plan of
`tbptt.plan`, from the same starting weights and compares the gradients update by update.

The verdict is **correct** when the loop makes the same updates after the same steps as
the intended TBPTT(k1, k2) with the same gradients (float64, 1e-10 relative), and says which
reduction and tail policy the loop implements; otherwise it is **wrong**, with each finding
in plain words and the update and time step where it first shows. Nothing here reads the
loop's source: a loop the audit has never seen is judged by its behaviour alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tbptt.checks import REDUCTIONS, TAILS, check_choice, check_int, check_k
from tbptt.schedule import plan
from tbptt_torch import losses, models
from tbptt_torch._audit_trace import AuditError, Forward, Recorder, RecordingSGD
from tbptt_torch._trainer import tbptt_train_step

__all__ = ["FINDING_KINDS", "AuditError", "AuditVerdict", "Finding", "ObservedUpdate", "Tbptt",
           "audit"]

Loop = Callable[..., Any]
CELLS = {"elman": models.ElmanModel, "gru": models.GRUModel, "lstm": models.LSTMModel}
RTOL = 1e-10  # gradients of the loop against the reference, float64 (SPEC §3)
_WEIGHT_RTOL = 1e-9  # a loss weight read back from the gradient, against 1, 1/B, 1/(nB), 1/n

FINDING_KINDS = (
    "loop_raised",             # the loop raised; the finding says why
    "not_detached",            # the carry crosses a chunk boundary attached to its graph
    "carry_reset",             # a chunk starts from the zero carry instead of the carry
    "wrong_handoff",           # a chunk starts from a state other than the one reached
    "step_before_backward",    # step() comes before the backward() of its loss
    "zero_grad_before_step",   # zero_grad() clears the gradient before step() uses it
    "gradients_accumulate",    # zero_grad() missing between updates
    "loss_not_reset",          # backward() of an update goes into earlier updates' loss
    "gradient_never_applied",  # a backward() is never followed by step()
    "wrong_update_steps",      # the updates own other steps than TBPTT(k1) gives them
    "truncation_too_short",    # a loss term's gradient stops after the window start
    "truncation_too_long",     # a loss term's gradient reaches before the window start
    "tail_dropped",            # the last T % k1 steps never trained (partial intended)
    "tail_trained",            # the last T % k1 steps trained (drop intended)
    "wrong_reduction",         # summed where a mean was intended, or the reverse
    "wrong_loss",              # a step's loss is not squared error against its target
    "no_update",               # step() never applied a gradient
    "gradient_modified",       # p.grad changed between backward() and step() (clipping?)
    "gradients_differ",        # everything above as intended, yet the gradients differ
)


@dataclass(frozen=True)
class Tbptt:
    """A TBPTT(k1, k2) as SPEC §1 defines it, with the loss's treatment of the batch.

    `reduction` is over the loss steps of an update ("mean": divided by their number);
    `batch` says whether the per-step loss averages or sums over the batch (the reference
    trains with `loss_fn = mse / B` for a summed loss with averaged batch, and so on).
    `tail` is None where T is a multiple of k1, so the tail policy cannot show.
    """

    k1: int
    k2: int
    reduction: str
    tail: str | None
    batch: str = "mean"

    def __str__(self) -> str:
        tail = "either" if self.tail is None else repr(self.tail)
        return (f"TBPTT(k1={self.k1}, k2={self.k2}, reduction={self.reduction!r}, "
                f"tail={tail})")

    def loss_scale(self, batch_size: int) -> float:
        """The factor on `losses.mse` that makes SPEC's reduction give this loss."""
        if self.reduction == "sum":
            return 1.0 if self.batch == "sum" else 1.0 / batch_size
        return float(batch_size) if self.batch == "sum" else 1.0


@dataclass(frozen=True)
class Finding:
    """One thing the loop does differently from the intended TBPTT.

    `update` is the 1-based update where it first shows (for a finding about the order of
    calls, the n-th step() call, counting those that applied nothing), `step` the 0-based
    time step of `xs` where it shows; either is None where it does not apply.
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
    """One step() call of the loop that applied a gradient, as the audit measured it."""

    index: int  # 1-based among the updates that applied a gradient
    after_step: int  # the last time step the model had run when step() came
    loss_steps: tuple[int, ...]  # the time steps whose loss this update's gradient holds
    window_start: int | None  # the earliest step its gradient reaches (None: no loss)
    weight: float | None  # the weight of each loss term (None: terms weighted unequally)
    accumulated: bool  # p.grad still held an earlier update's gradient
    gradient_difference: float | None = None  # against the reference, relative


@dataclass(frozen=True)
class AuditVerdict:
    """What `audit` found. `str(verdict)` is the report `tbptt audit` prints."""

    correct: bool
    implements: Tbptt | None  # the TBPTT the loop implements, when it implements one
    intended: dict[str, Any]  # k1, k2, reduction, tail as given (None: not given)
    findings: tuple[Finding, ...]
    updates: tuple[ObservedUpdate, ...]
    reference: Tbptt | None  # what the gradients were compared with
    max_gradient_difference: float | None
    error: str | None  # what the loop raised, if it raised
    setup: str
    planned_updates: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(finding.kind for finding in self.findings)

    def __str__(self) -> str:
        return self.report()

    def report(self) -> str:
        intended = ", ".join(f"{key}={value!r}" for key, value in self.intended.items()
                             if value is not None)
        lines = [f"setup      {self.setup}", f"intended   TBPTT({intended})"]
        if self.updates:
            lines += ["", "update  after step  loss steps  window from  term weight  "
                          "gradient vs reference"]
            for u in self.updates:
                steps = _span(u.loss_steps)
                weight = "unequal" if u.weight is None else f"{u.weight:.6g}"
                diff = "-" if u.gradient_difference is None else f"{u.gradient_difference:.1e}"
                start = "-" if u.window_start is None else str(u.window_start)
                extra = "  (+ earlier gradients)" if u.accumulated else ""
                lines.append(f"{u.index:>6}  {u.after_step:>10}  {steps:>10}  {start:>11}  "
                             f"{weight:>11}  {diff:>21}{extra}")
            lines.append("")
        if self.reference is not None:
            lines.append(f"reference  tbptt_train_step with {self.reference}: "
                         f"{self.planned_updates} updates")
        if self.implements is not None:
            lines.append(f"implements {self.implements}, the per-step loss "
                         f"{'averaged' if self.implements.batch == 'mean' else 'summed'} "
                         f"over the batch")
        lines += [textwrap.fill(note, width=100, initial_indent="note       ",
                                subsequent_indent=" " * 11, break_on_hyphens=False)
                  for note in self.notes]
        if self.correct:
            lines.append(f"verdict    CORRECT: the same {len(self.updates)} updates after the "
                         f"same steps as the reference, gradients within "
                         f"{self.max_gradient_difference:.1e} (tolerance {RTOL:.0e})")
        else:
            lines.append("verdict    WRONG")
            lines += [textwrap.fill(str(finding), width=100, initial_indent="  - ",
                                    subsequent_indent="    ", break_on_hyphens=False)
                      for finding in self.findings]
        return "\n".join(lines)


def _steps(lo: int, hi: int) -> str:
    """'step 3' or 'steps 0-3' for the time steps [lo, hi)."""
    return f"step {lo}" if hi - lo == 1 else f"steps {lo}-{hi - 1}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def _named(steps: tuple[int, ...]) -> str:
    """'no step', 'step 3' or 'steps 0-3' for a tuple of time steps."""
    if not steps:
        return "no step"
    return f"step {steps[0]}" if len(steps) == 1 else f"steps {_span(steps)}"


def _span(steps: tuple[int, ...]) -> str:
    if not steps:
        return "none"
    if len(steps) == 1:
        return str(steps[0])
    if list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"{steps[0]}-{steps[-1]}"
    return ",".join(map(str, steps))


@contextlib.contextmanager
def _float64() -> Iterator[None]:
    """Loops often make their own carry with `torch.zeros(...)`: let it be float64 too."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def default_length(k1: int, k2: int) -> int:
    """T for the audit: at least five updates and a full overlap, and T % k1 != 0 (k1 > 1)
    so the tail policy shows."""
    if k1 == 1:
        return max(5, k2 + 2)
    length = max(5 * k1, k2 + 2 * k1) + max(1, k1 // 2)
    return length + 1 if length % k1 == 0 else length


def audit(
    loop: Loop,
    *,
    k1: int = 4,
    k2: int | None = None,
    reduction: str | None = None,
    tail: str | None = None,
    cell: str = "lstm",
    input_size: int = 2,
    hidden_size: int = 4,
    num_layers: int = 1,
    length: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    lr: float = 0.05,
    model_factory: Callable[[], nn.Module] | None = None,
) -> AuditVerdict:
    """Runs `loop` on an instrumented model and judges it against TBPTT(k1, k2).

    Args:
      loop: `loop(model, optimizer, xs, ys, k)`, or `loop(model, optimizer, xs, ys, k, k2)`
        when it has a parameter named `k2`. It gets a model with `model(x, carry) ->
        (preds, carry)` for a chunk `x[t, B, I]` (preds `[t, B, 1]`) or a step `x[B, I]`
        (preds `[B, 1]`), `carry=None` meaning the zero carry and `model.initial_carry(B)`
        giving it; an SGD optimizer; `xs[T, B, I]` and `ys[T, B, 1]` in float64 (the
        default dtype is float64 while it runs); and `k = k1`. Its loss must be squared
        error (`nn.MSELoss`, `F.mse_loss`, `(out - y) ** 2` summed or averaged).
      k1, k2: the TBPTT the loop is meant to implement (k2 defaults to k1).
      reduction, tail: the intended reduction ("mean"/"sum") and tail ("partial"/"drop");
        None reports what the loop implements without judging it.
      cell, input_size, hidden_size, num_layers: the `tbptt_torch.models` model handed over.
      length: T (default: five updates or more, with T % k1 != 0 so the tail shows).
      batch_size: B (default k2 + 1, which tells every mean and sum apart).
      seed: seeds the weights and the data.
      lr: the SGD learning rate of both runs.
      model_factory: instead of `cell`, a function returning a fresh `nn.Module` with
        `forward(xs, carry) -> (preds, carry)`, `initial_carry(batch_size)` and output
        size 1; called twice (the loop's model and the reference's), seeded alike.

    Returns:
      An `AuditVerdict`; `str(verdict)` is the report.

    Raises:
      ValueError: for a bad argument, or `AuditError` when the loop calls the model in a
        way the audit cannot follow (not on slices of xs).
    """
    if not callable(loop):
        raise ValueError(f"loop must be a callable loop(model, optimizer, xs, ys, k), got "
                         f"{type(loop).__name__}")
    k1, k2 = check_k(k1, k2)
    for name, value, choices in (("reduction", reduction, REDUCTIONS), ("tail", tail, TAILS)):
        if value is not None:
            check_choice(name, value, choices)
    check_choice("cell", cell, tuple(CELLS))
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        check_int(name, value)
    length = default_length(k1, k2) if length is None else check_int("length", length)
    batch_size = k2 + 1 if batch_size is None else check_int("batch_size", batch_size)
    seed = check_int("seed", seed, minimum=0)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")

    def factory() -> nn.Module:
        if model_factory is not None:
            return model_factory()
        return CELLS[cell](input_size, hidden_size, 1, num_layers=num_layers)

    with torch.random.fork_rng(devices=[]), _float64():
        torch.manual_seed(seed)
        model = factory().double()
        if not callable(getattr(model, "initial_carry", None)):
            raise ValueError("model_factory must return a module with initial_carry(batch_size)"
                             f", got {type(model).__name__} without one")
        initial = copy.deepcopy(model.state_dict())
        generator = torch.Generator().manual_seed(seed)
        features = _input_features(model, input_size)
        xs = torch.randn(length, batch_size, features, generator=generator)
        ys = torch.randn(length, batch_size, 1, generator=generator)
        recorder = Recorder(model, xs, ys, losses.mse)
        optimizer = RecordingSGD(model.parameters(), lr, recorder)
        try:
            takes_k2 = "k2" in inspect.signature(loop).parameters
        except (TypeError, ValueError):  # a callable without a signature to read
            takes_k2 = False
        extra = {"k2": k2} if takes_k2 else {}
        error = None
        try:
            with recorder.watching():
                loop(model, optimizer, xs.clone(), ys.clone(), k1, **extra)
        except AuditError:
            raise
        except Exception as exc:  # the loop's own failure is part of the verdict
            error = exc
        recorder.finish(crashed=error is not None)
        if not recorder.forwards and error is None:
            raise AuditError("the loop never called model(x, carry): the audit sees only calls "
                             "of the model itself (not of model.rnn or model.head)")

        analysis = _Analysis(recorder, length, batch_size, k1, k2, reduction, tail, error)
        analysis.run()

        def reference(semantics: Tbptt) -> list[dict[str, torch.Tensor]]:
            return _reference_gradients(factory, initial, xs, ys, semantics, lr)

        return analysis.verdict(reference, _setup(model, cell, model_factory, xs, lr, k1,
                                                  extra))


def _input_features(model: nn.Module, input_size: int) -> int:
    rnn = getattr(model, "rnn", None)
    return rnn.input_size if isinstance(rnn, nn.RNNBase) else input_size


def _setup(model: nn.Module, cell: str, model_factory: Any, xs: torch.Tensor, lr: float,
           k1: int, extra: dict[str, int]) -> str:
    rnn = getattr(model, "rnn", None)
    if model_factory is None and isinstance(rnn, nn.RNNBase):
        cell_name = {"elman": "Elman", "gru": "GRU", "lstm": "LSTM"}[cell]
        name = (f"{cell_name}({rnn.input_size} -> {rnn.hidden_size} x {rnn.num_layers} "
                f"layer(s) -> 1)")
    else:
        name = type(model).__name__
    given = f"k={k1}" + "".join(f", {key}={value}" for key, value in extra.items())
    return (f"{name}, float64; xs [{', '.join(map(str, xs.shape))}], ys "
            f"[{xs.shape[0]}, {xs.shape[1]}, 1]; SGD lr={lr}; the loop got {given}")


def _reference_gradients(factory: Callable[[], nn.Module], initial: dict[str, torch.Tensor],
                         xs: torch.Tensor, ys: torch.Tensor, semantics: Tbptt, lr: float
                         ) -> list[dict[str, torch.Tensor]]:
    """The gradient of every update of `tbptt_train_step` from the same weights."""
    model = factory().double()
    model.load_state_dict(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scale = semantics.loss_scale(xs.shape[1])
    grads: list[dict[str, torch.Tensor]] = []

    def record(_: int, __: torch.Tensor, trained: nn.Module) -> None:
        grads.append({name: p.grad.detach().clone() for name, p in trained.named_parameters()})

    tbptt_train_step(model, optimizer, None, xs, ys,
                     loss_fn=lambda p, t: losses.mse(p, t) * scale, k1=semantics.k1,
                     k2=semantics.k2, reduction=semantics.reduction,
                     tail=semantics.tail or "partial", on_update=record)
    return grads


def _relative(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in expected.values())
    gap = max(float((actual[name] - g).abs().max()) for name, g in expected.items())
    return gap / scale if scale > 0 else gap


class _Analysis:
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
                        f"{_steps(source.lo, source.hi)} returned, still attached "
                        f"to the graph that an earlier backward() already went through, so "
                        f"the gradient of update {update} flows back across the chunk "
                        f"boundary at step {forward.lo}, through every step since step "
                        f"{reach} ({_plural(forward.lo - reach, 'step')} before its chunk)")
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
        span = _span(tuple(covered))
        return f"step {span}" if len(covered) == 1 else f"steps {span}"

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
                    message = (f"update {u + 1} trains the loss of {_named(obs.loss_steps)}, "
                               f"applied after step {obs.after_step}; {k} trains "
                               f"{_named(want_steps)} there")
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
                             f"{want.window_start} ({_plural(t - wrong[t] + 1, 'step')} instead "
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
                         f"the last {remainder} steps ({_span(extra.loss_steps)}) are trained "
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
