"""The instrumentation behind `tbptt_torch.audit`: it records what a training loop does.

A `Recorder` attaches to the model (forward pre/post hooks, a tensor hook on every
prediction, a post-accumulate hook on every parameter, `zero_grad`) and hands the loop a
`RecordingSGD`. It never reads the loop's source; it sees only behaviour:

- every forward call: which time steps of `xs` it ran (found by value, so a copy of a slice
  is recognised too), and where its carry came from: the model's zero carry, a carry a
  previous call returned and still attached to that call's graph, the detached value of one,
  or something else;
- every gradient burst (the hook firings of one or more `backward()` calls between two other
  events): which forward calls' predictions received gradient, and that gradient;
- every `step()` and `zero_grad()`: when it came and which gradient bursts `p.grad` held.

While the loop runs, a torch function mode notes every `detach()` called on a carry the model
returned, so a `detach()` whose result is discarded shows up. The carry itself is handed back
untouched (no wrapper, no view), so `detach_()` and everything else behave as without the
audit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AuditError(ValueError):
    """The loop could not be audited (it did not call the model as the audit expects)."""


class _DetachWatch(TorchFunctionMode):
    """Notes `detach()` calls on the carries the audited model returned."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach and args:
            source = self.recorder.returned_by(args[0])
            if source is not None:
                self.recorder.detach_calls.add(source)
        return func(*args, **(kwargs or {}))


@dataclass
class CarryIn:
    """Where a forward call's carry came from.

    kind: "initial" (None: the model's zero carry), "zero" (an explicit zero tensor),
    "attached" (the carry a previous call returned, still in that call's graph),
    "detached" (the value a previous call returned, cut from its graph), or "other" (a
    value the model never returned, or a graph the audit cannot trace).
    """

    kind: str
    source: int | None = None  # the forward call whose returned carry this is
    detach_called: bool = False  # detach() was called on that returned carry


@dataclass
class Forward:
    """One call of the model: it ran the time steps `[lo, hi)`."""

    index: int
    lo: int
    hi: int
    carry_in: CarryIn
    steps_before: int  # step() calls made before this forward
    event: int  # position in the event list
    term_grad: torch.Tensor | None = None  # d loss_fn(preds, ys) / d preds per term
    carry_out: tuple[torch.Tensor, ...] = ()  # detached copy of the carry it returned


@dataclass
class Burst:
    """The gradient of one or more back-to-back `backward()` calls."""

    index: int
    event: int
    pred_grads: dict[int, torch.Tensor] = field(default_factory=dict)  # forward -> dL/dpreds
    crashed: bool = False  # the loop raised while this backward ran
    grads_after: dict[str, torch.Tensor] = field(default_factory=dict)  # p.grad as it left it


@dataclass
class StepCall:
    """One `optimizer.step()`: the gradient it applied and which bursts made it."""

    index: int
    event: int
    grads: dict[str, torch.Tensor]  # p.grad when step() was called (zeros where None)
    applied: bool  # some gradient was non-zero
    pending: tuple[int, ...]  # bursts whose gradient p.grad held
    since_step: tuple[int, ...]  # bursts since the previous step()
    progress: int  # time steps the model had run when step() was called
    forwards_since_step: tuple[int, ...]


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that tells the recorder about every `step()` and `zero_grad()`."""

    def __init__(self, params: Any, lr: float, recorder: Recorder) -> None:
        super().__init__(params, lr=lr)
        self._recorder = recorder

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._recorder.on_step()
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._recorder.on_zero_grad()
        super().zero_grad(set_to_none)


def _parts(carry: Any) -> tuple[torch.Tensor, ...]:
    return tuple(carry) if isinstance(carry, (tuple, list)) else (carry,)


class Recorder:
    """Instruments `model` and records the behaviour of a loop run on it (see module doc)."""

    def __init__(self, model: nn.Module, xs: torch.Tensor, ys: torch.Tensor,
                 loss_fn: LossFn) -> None:
        self.model, self.xs, self.ys, self.loss_fn = model, xs, ys, loss_fn
        self.rows = {xs[t].numpy().tobytes(): t for t in range(xs.shape[0])}
        self.names = [name for name, _ in model.named_parameters()]
        self.forwards: list[Forward] = []
        self.bursts: list[Burst] = []
        self.steps: list[StepCall] = []
        self.events: list[tuple[str, int]] = []
        self.detach_calls: set[int] = set()
        self._burst: Burst | None = None
        self._pending: list[int] = []
        self._since_step: list[int] = []
        self._forwards_since_step: list[int] = []
        self._nodes: dict[int, tuple[Any, int]] = {}  # id(grad_fn) -> (node kept alive, fwd)
        self._returned: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (carry part, fwd)
        self._open: dict[str, Any] = {}
        model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        model.register_forward_hook(self._post_forward, with_kwargs=True)
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda param, name=name: self._on_param_grad(name, param))
        model_zero_grad = model.zero_grad

        def zero_grad(set_to_none: bool = True) -> None:
            self.on_zero_grad()
            model_zero_grad(set_to_none)

        model.zero_grad = zero_grad  # type: ignore[method-assign]

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Run the loop inside this, so `detach()` calls on returned carries are seen."""
        with _DetachWatch(self):
            yield

    def returned_by(self, tensor: Any) -> int | None:
        """The forward call that returned this very tensor object as (part of) its carry."""
        entry = self._returned.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    # -- events --------------------------------------------------------------------------

    def _grads(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for name, p in zip(self.names, self.model.parameters(), strict=True)}

    def _close_burst(self) -> None:
        if self._burst is not None:
            self.bursts.append(self._burst)
            self._pending.append(self._burst.index)
            self._since_step.append(self._burst.index)
            self._burst = None

    def _event(self, kind: str, index: int) -> int:
        self._close_burst()
        self.events.append((kind, index))
        return len(self.events) - 1

    def _open_burst(self) -> Burst:
        if self._burst is None:
            self._burst = Burst(len(self.bursts), len(self.events), grads_after=self._grads())
            self.events.append(("backward", self._burst.index))
        return self._burst

    def _on_param_grad(self, name: str, param: torch.Tensor) -> None:
        # Taken as backward() leaves it, before anything (clipping) may change it.
        self._open_burst().grads_after[name] = param.grad.detach().clone()

    def _on_pred_grad(self, forward: int, grad: torch.Tensor) -> None:
        burst = self._open_burst()
        grad = grad.detach().clone()
        if forward in burst.pred_grads:
            burst.pred_grads[forward] = burst.pred_grads[forward] + grad
        else:
            burst.pred_grads[forward] = grad

    def on_step(self) -> None:
        self._close_burst()
        grads = self._grads()
        applied = any(bool(g.ne(0).any()) for g in grads.values())
        index = len(self.steps)
        event = self._event("step", index)
        self.steps.append(StepCall(
            index, event, grads, applied, tuple(self._pending) if applied else (),
            tuple(self._since_step), max((f.hi for f in self.forwards), default=0),
            tuple(self._forwards_since_step)))
        self._since_step, self._forwards_since_step = [], []

    def on_zero_grad(self) -> None:
        self._event("zero_grad", len(self.events))
        self._pending = []

    def finish(self, crashed: bool) -> None:
        """Ends the recording; `crashed`: the loop raised (inside a backward(), if one ran)."""
        if crashed and self._burst is not None:
            self._burst.crashed = True
        self._close_burst()

    # -- the model -----------------------------------------------------------------------

    def _steps_of(self, x: torch.Tensor) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise AuditError(f"the loop must call model(x, carry) with x a chunk [t, B, I] or "
                             f"a step [B, I] of xs, got {type(x).__name__}"
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else ''}")
        found = [self.rows.get(row.detach().to(self.xs.dtype).numpy().tobytes())
                 for row in x]
        if found and all(t is not None for t in found):
            lo = found[0]
            if found == list(range(lo, lo + len(found))):
                return lo, lo + len(found)
        raise AuditError(f"the loop called the model on inputs that are not consecutive steps "
                         f"of xs (steps found: {found}); pass slices of xs as they are")

    def _find_source(self, node: Any) -> int | None:
        """The forward call whose returned carry `node`'s graph leads to, if any."""
        seen, frontier = set(), [node]
        while frontier and len(seen) < 10_000:
            current = frontier.pop()
            if current is None or id(current) in seen:
                continue
            seen.add(id(current))
            if id(current) in self._nodes:
                return self._nodes[id(current)][1]
            frontier.extend(next_node for next_node, _ in current.next_functions)
        return None

    def _carry_in(self, carry: Any) -> CarryIn:
        if carry is None:
            return CarryIn("initial")
        kinds = []
        for part in _parts(carry):
            source = self.returned_by(part)
            if source is not None:  # detached in place (detach_()) if it has no graph now
                kind = "attached" if part.grad_fn is not None else "detached"
            elif part.grad_fn is not None:
                source = self._find_source(part.grad_fn)
                kind = "attached" if source is not None else "other"
            else:
                source = self._match_value(part, len(kinds))
                kind = "detached" if source is not None else (
                    "zero" if not bool(part.ne(0).any()) else "other")
            kinds.append((kind, source))
        for wanted in ("attached", "other", "zero", "detached"):
            for kind, source in kinds:
                if kind == wanted:
                    return CarryIn(kind, source, source in self.detach_calls)
        raise AssertionError(f"unexpected carry kinds {kinds}")

    def _match_value(self, part: torch.Tensor, position: int) -> int | None:
        for forward in reversed(self.forwards):
            if position < len(forward.carry_out):
                candidate = forward.carry_out[position]
                if candidate.shape == part.shape and torch.equal(candidate, part.detach()):
                    return forward.index
        return None

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not args:
            raise AuditError("the loop must call model(x, carry) with x positional")
        x, rest = args[0], list(args[1:])
        carry = rest[0] if rest else kwargs.get("carry")
        one_step = isinstance(x, torch.Tensor) and x.ndim == 2
        if one_step:
            x = x.unsqueeze(0)
        lo, hi = self._steps_of(x)
        index = len(self.forwards)
        event = self._event("forward", index)
        carry_in = self._carry_in(carry)
        self.forwards.append(Forward(index, lo, hi, carry_in, len(self.steps), event))
        self._forwards_since_step.append(index)
        self._open = {"index": index, "one_step": one_step}
        return (x, *rest), kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        index, one_step = self._open["index"], self._open["one_step"]
        forward = self.forwards[index]
        preds, carry = output
        with torch.enable_grad():
            probe = preds.detach().clone().requires_grad_(True)
            terms = self.loss_fn(probe, self.ys[forward.lo:forward.hi])
            (forward.term_grad,) = torch.autograd.grad(terms.sum(), probe)
        if preds.requires_grad:
            preds.register_hook(lambda grad, i=index: self._on_pred_grad(i, grad))
        parts = _parts(carry)
        forward.carry_out = tuple(part.detach().clone() for part in parts)
        for part in parts:
            self._returned[id(part)] = (part, index)
            if part.grad_fn is not None:
                self._nodes[id(part.grad_fn)] = (part.grad_fn, index)
        return (preds[0] if one_step else preds), carry
