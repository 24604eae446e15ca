"""The instrumentation behind `tbptt_torch.audit`: it records what a training loop does.

A `Recorder` attaches to the model (forward pre/post hooks, a tensor hook on every
prediction, a post-accumulate hook on every parameter, `zero_grad`) and hands the loop a
`RecordingSGD`. It never reads the loop's source; it sees only behaviour:

- every forward call: which time steps of `xs` it ran (found by value, so a copy of a slice
  is recognised too; float features or integer token ids alike), its predictions (read as
  `[t, B, ...]` whether the model returns them so, flattened to `[t * B, ...]`, or as one
  step `[B, ...]`), and where its carry came from: the zero carry, a carry a previous call
  returned and still attached to that call's graph, the detached value of one, or something
  else;
- every gradient burst (the hook firings of one or more `backward()` calls between two other
  events): which forward calls' predictions received gradient, and that gradient;
- every update of the weights, by `optimizer.step()` or by the loop itself
  (`p.data.add_(p.grad, alpha=-lr)`, `p -= lr * p.grad` under `no_grad`, a `torch.optim`
  functional call, an optimizer of its own): when it came, the gradient `p.grad` held then,
  which gradient bursts made it, and how the weights moved;
- every `zero_grad()`.

While the loop runs, a torch function mode notes every `detach()` called on a carry the model
returned, so a `detach()` whose result is discarded shows up, and every in-place write into a
parameter, so an update of the loop's own is seen as it starts, even one that changes nothing
or raises. A weight change the mode does not see is still found: the weights are compared with
their last known values at every event. The carry itself is handed back untouched (no wrapper,
no view), so `detach_()` and everything else behave as without the audit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_NOT_WRITES = frozenset({"requires_grad_", "detach_", "share_memory_", "retain_grad",
                         "register_hook"})
_INPLACE_OPERATORS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__",
                                "__idiv__", "__ipow__", "__setitem__"})


class AuditError(ValueError):
    """The loop could not be audited (it did not call the model as the audit expects)."""


class _Watch(TorchFunctionMode):
    """Notes `detach()` calls on returned carries and in-place writes into parameters."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.detach and args:
            source = self.recorder.returned_by(args[0])
            if source is not None:
                self.recorder.detach_calls.add(source)
        elif args and _writes(func) and self.recorder.writes_parameter(args[0]):
            self.recorder.on_parameter_write()
        return func(*args, **(kwargs or {}))


def _writes(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    return name in _INPLACE_OPERATORS or (
        name.endswith("_") and not name.startswith("__") and name not in _NOT_WRITES)


def leaves(carry: Any) -> tuple[torch.Tensor, ...]:
    """The tensors of a carry: a tensor, or tuples, lists and dicts of them, in order."""
    if isinstance(carry, torch.Tensor):
        return (carry,)
    if isinstance(carry, (tuple, list)):
        return tuple(leaf for part in carry for leaf in leaves(part))
    if isinstance(carry, dict):
        return tuple(leaf for key in sorted(carry) for leaf in leaves(carry[key]))
    return ()


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
    updates_before: int  # updates of the weights (step() or the loop's own) before it
    event: int  # position in the event list
    preds: torch.Tensor | None = None  # its predictions, detached, as [hi - lo, B, ...]
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
class UpdateCall:
    """One update of the weights: a `step()` call, or the loop's own change of them.

    `grads` is `p.grad` when it came (zeros where None; after clipping, if the loop clips),
    `moved` the change of the weights it made, `lr` the plain-SGD learning rate that change
    fits (`moved == -lr * grads`), None when it fits none (momentum, Adam, weight decay, or
    no change at all).
    """

    index: int
    event: int
    kind: str  # "step" (optimizer.step()) or "own" (the loop changed the weights itself)
    grads: dict[str, torch.Tensor]
    grads_none: bool  # every p.grad was None (zero_grad() sets them so)
    applied: bool  # the weights changed
    pending: tuple[int, ...]  # bursts whose gradient p.grad held (when applied)
    since_update: tuple[int, ...]  # bursts since the previous update
    progress: int  # time steps the model had run when it came
    forwards_since_update: tuple[int, ...]
    moved: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_after: dict[str, torch.Tensor] = field(default_factory=dict)
    lr: float | None = None
    crashed: bool = False  # the loop raised during it


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
        self._recorder.in_step = True  # its own writes into the weights are this step
        try:
            super().step()
        finally:
            self._recorder.in_step = False
        self._recorder.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._recorder.on_zero_grad()
        super().zero_grad(set_to_none)


class Recorder:
    """Instruments `model` and records the behaviour of a loop run on it (see module doc).

    `adds_time_axis`: the model (one of the audit's own) takes chunks only, so a one-step call
    `model(x[B, ...], carry)` is run as the chunk `x[None]` and its predictions handed back
    without the time axis. A model of the user's own is called exactly as the loop calls it.
    """

    def __init__(self, model: nn.Module, xs: torch.Tensor, *, adds_time_axis: bool) -> None:
        self.model, self.xs, self.adds_time_axis = model, xs, adds_time_axis
        self.B = xs.shape[1]
        self.rows: dict[bytes, list[int]] = {}
        for t in range(xs.shape[0]):
            self.rows.setdefault(_key(xs[t]), []).append(t)
        self.params = dict(model.named_parameters())
        self.forwards: list[Forward] = []
        self.bursts: list[Burst] = []
        self.updates: list[UpdateCall] = []
        self.events: list[tuple[str, int]] = []
        self.detach_calls: set[int] = set()
        self.first_carry: Any = None  # the carry of the loop's first model call
        self.in_step = False
        self._step: UpdateCall | None = None  # the step() call in progress
        self.raised_in: str | None = None  # "forward", "backward" or "update" (see finish)
        self.grads_none_at_end = False  # every p.grad was None when the loop ended
        self.left_open: tuple[int, ...] = ()  # forward calls after the last update
        self._burst: Burst | None = None
        self._own: dict[str, Any] | None = None  # the loop's own update, while it runs
        self._pending: list[int] = []
        self._since_update: list[int] = []
        self._forwards_since_update: list[int] = []
        self._weights = self._snapshot()  # the weights as last recorded
        self._storages = {p.untyped_storage().data_ptr() for p in self.params.values()}
        self._nodes: dict[int, tuple[Any, int]] = {}  # id(grad_fn) -> (node kept alive, fwd)
        self._returned: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (carry part, fwd)
        self._open: dict[str, Any] | None = None
        model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        model.register_forward_hook(self._post_forward, with_kwargs=True)
        for name, p in self.params.items():
            p.register_post_accumulate_grad_hook(
                lambda param, name=name: self._on_param_grad(name, param))
        model_zero_grad = model.zero_grad

        def zero_grad(set_to_none: bool = True) -> None:
            self.on_zero_grad()
            model_zero_grad(set_to_none)

        model.zero_grad = zero_grad  # type: ignore[method-assign]

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Run the loop inside this, so `detach()` calls and writes into weights are seen."""
        with _Watch(self):
            yield

    def returned_by(self, tensor: Any) -> int | None:
        """The forward call that returned this very tensor object as (part of) its carry."""
        entry = self._returned.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def writes_parameter(self, target: Any) -> bool:
        """Whether an in-place operation on `target` writes into a parameter's storage."""
        if self.in_step:
            return False
        targets = target if isinstance(target, (list, tuple)) else (target,)
        return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr()
                   in self._storages for t in targets)

    # -- events --------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.params.items()}

    def _grads(self) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for name, p in self.params.items()}

    def _close_burst(self) -> None:
        if self._burst is not None:
            self.bursts.append(self._burst)
            self._pending.append(self._burst.index)
            self._since_update.append(self._burst.index)
            self._burst = None

    def _sync(self) -> None:
        """Closes what the last event left open: a gradient burst, an update of the loop's
        own; and records, as an update of the loop's own, a change of the weights no hook
        or write saw (made between two events)."""
        self._close_burst()
        if self._own is None and any(not torch.equal(p, self._weights[name])
                                     for name, p in self.params.items()):
            self._open_own()
        if self._own is not None:
            self._close_own()

    def _event(self, kind: str, index: int) -> int:
        self._sync()
        self.events.append((kind, index))
        return len(self.events) - 1

    def _open_burst(self, from_predictions: bool) -> Burst:
        if self._burst is None:
            self._sync()
            # Before backward() adds to them: gradients cleared other than by zero_grad()
            # (p.grad = None, p.grad.zero_()) no longer hold what earlier bursts made.
            if from_predictions and all(p.grad is None or not bool(p.grad.ne(0).any())
                                        for p in self.params.values()):
                self._pending = []
            self._burst = Burst(len(self.bursts), len(self.events), grads_after=self._grads())
            self.events.append(("backward", self._burst.index))
        return self._burst

    def _on_param_grad(self, name: str, param: torch.Tensor) -> None:
        # Taken as backward() leaves it, before anything (clipping) may change it.
        self._open_burst(from_predictions=False).grads_after[name] = param.grad.detach().clone()

    def _on_pred_grad(self, forward: int, grad: torch.Tensor) -> None:
        burst = self._open_burst(from_predictions=True)
        grad = grad.detach().clone()
        if forward in burst.pred_grads:
            burst.pred_grads[forward] = burst.pred_grads[forward] + grad
        else:
            burst.pred_grads[forward] = grad

    def _new_update(self, kind: str, grads: dict[str, torch.Tensor], grads_none: bool
                    ) -> UpdateCall:
        index = len(self.updates)
        event = len(self.events)
        self.events.append(("update", index))
        return UpdateCall(index, event, kind, grads, grads_none, False, (),
                          tuple(self._since_update), max((f.hi for f in self.forwards),
                                                         default=0),
                          tuple(self._forwards_since_update))

    def _finish_update(self, update: UpdateCall) -> None:
        """Measures how `update` moved the weights and files it."""
        after = self._snapshot()
        update.moved = {name: after[name] - self._weights[name] for name in after}
        update.weights_after = after
        update.applied = any(bool(d.ne(0).any()) for d in update.moved.values())
        update.pending = tuple(self._pending) if update.applied else ()
        update.lr = _sgd_rate(update.moved, update.grads)
        self.updates.append(update)
        self._weights = after
        self._since_update, self._forwards_since_update = [], []

    def on_step(self) -> None:
        self._sync()
        grads_none = all(p.grad is None for p in self.params.values())
        self._step = self._new_update("step", self._grads(), grads_none)

    def after_step(self) -> None:
        self._finish_update(self._step)

    def on_parameter_write(self) -> None:
        if self._own is None:
            self._sync()
            self._open_own()

    def _open_own(self) -> None:
        grads_none = all(p.grad is None for p in self.params.values())
        self._own = {"update": self._new_update("own", self._grads(), grads_none)}

    def _close_own(self) -> None:
        own, self._own = self._own, None
        self._finish_update(own["update"])

    def on_zero_grad(self) -> None:
        self._event("zero_grad", len(self.events))
        self._pending = []

    def finish(self, crashed: bool) -> None:
        """Ends the recording; `crashed`: the loop raised, in what was open at that moment."""
        if crashed:
            if self._open is not None:
                self.raised_in = "forward"
            elif self._burst is not None:
                self._burst.crashed = True
                self.raised_in = "backward"
            elif self._own is not None:
                self._own["update"].crashed = True
                self.raised_in = "update"
        self._sync()
        self.grads_none_at_end = all(p.grad is None for p in self.params.values())
        self.left_open = tuple(self._forwards_since_update)  # forwards after the last update

    # -- the model -----------------------------------------------------------------------

    def _steps_of(self, x: Any) -> tuple[int, int]:
        if (not isinstance(x, torch.Tensor) or x.ndim != self.xs.ndim
                or tuple(x.shape[1:]) != tuple(self.xs.shape[1:])):
            shape = f"{list(x.shape)}" if isinstance(x, torch.Tensor) else ""
            raise AuditError(f"the loop must call model(x, carry) with x a chunk "
                             f"{_shape('t', self.xs)} or a step {_shape(None, self.xs)} of xs, "
                             f"got {type(x).__name__}{shape}")
        candidates = [self.rows.get(_key(row.detach().to(self.xs.dtype)), []) for row in x]
        starts = [lo for lo in candidates[0]
                  if all(lo + i in found for i, found in enumerate(candidates))]
        if not starts:
            found = [c[0] if len(c) == 1 else (c or None) for c in candidates]
            raise AuditError(f"the loop called the model on inputs that are not consecutive "
                             f"steps of xs (steps found: {found}); pass slices of xs as they "
                             f"are")
        # Repeated rows (token data can repeat): the chunk that goes on where the last ended.
        follows = self.forwards[-1].hi if self.forwards else 0
        lo = follows if follows in starts else starts[0]
        return lo, lo + x.shape[0]

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
        for part in leaves(carry):
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
        return CarryIn("other")  # a carry with no tensor in it

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
        carry = rest[0] if rest else kwargs.get(
            "carry", next(iter(kwargs.values())) if len(kwargs) == 1 else None)
        one_step = isinstance(x, torch.Tensor) and x.ndim == self.xs.ndim - 1
        lo, hi = self._steps_of(x.unsqueeze(0) if one_step else x)
        if one_step and self.adds_time_axis:
            x = x.unsqueeze(0)
        index = len(self.forwards)
        event = self._event("forward", index)
        if not self.forwards:
            self.first_carry = carry
        carry_in = self._carry_in(carry)
        self.forwards.append(Forward(index, lo, hi, carry_in, len(self.updates), event))
        self._forwards_since_update.append(index)
        self._open = {"index": index, "one_step": one_step}
        return (x, *rest), kwargs

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        index, one_step = self._open["index"], self._open["one_step"]
        self._open = None
        forward = self.forwards[index]
        if not (isinstance(output, (tuple, list)) and len(output) == 2
                and isinstance(output[0], torch.Tensor)):
            raise AuditError(f"the model must return (preds, carry), got "
                             f"{type(output).__name__}")
        preds, carry = output
        if one_step and not self.adds_time_axis:
            preds_in_steps = preds.unsqueeze(0)  # a step's predictions [B, ...]
        else:
            preds_in_steps = preds
        steps = in_steps(preds_in_steps, forward.hi - forward.lo, self.B)
        forward.preds = steps(preds_in_steps.detach()).clone()
        if preds.requires_grad:
            lift = one_step and not self.adds_time_axis
            preds.register_hook(lambda grad, i=index: self._on_pred_grad(
                i, steps(grad.unsqueeze(0) if lift else grad)))
        parts = leaves(carry)
        forward.carry_out = tuple(part.detach().clone() for part in parts)
        for part in parts:
            self._returned[id(part)] = (part, index)
            if part.grad_fn is not None:
                self._nodes[id(part.grad_fn)] = (part.grad_fn, index)
        return (preds[0] if one_step and self.adds_time_axis else preds), carry


def _key(row: torch.Tensor) -> bytes:
    return row.contiguous().numpy().tobytes()


def _shape(steps: str | None, xs: torch.Tensor) -> str:
    names = ["B"] + (["I"] if xs.ndim == 3 else [f"d{i}" for i in range(2, xs.ndim)])
    return "[" + ", ".join(([steps] if steps else []) + names) + "]"


def in_steps(preds: torch.Tensor, steps: int, batch: int
              ) -> Callable[[torch.Tensor], torch.Tensor]:
    """How to read a forward's predictions (or their gradient) as `[steps, batch, ...]`."""
    if preds.ndim >= 2 and tuple(preds.shape[:2]) == (steps, batch):
        return lambda tensor: tensor
    if preds.ndim >= 1 and preds.shape[0] == steps * batch:
        rest = tuple(preds.shape[1:])
        return lambda tensor: tensor.reshape(steps, batch, *rest)
    raise AuditError(f"the model returned predictions of shape {list(preds.shape)} for "
                     f"{steps} step(s) of {batch} sequences: the audit reads them as "
                     f"[{steps}, {batch}, ...] (time-major) or [{steps * batch}, ...] (the "
                     f"same, flattened)")


def _sgd_rate(moved: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> float | None:
    """The lr of `moved == -lr * grads` if the move is a plain SGD step of that gradient."""
    square = sum(float((g * g).sum()) for g in grads.values())
    if square == 0:
        return None
    lr = -sum(float((moved[name] * g).sum()) for name, g in grads.items()) / square
    size = max(float(d.abs().max()) for d in moved.values())
    misfit = max(float((moved[name] + lr * g).abs().max()) for name, g in grads.items())
    return lr if lr > 0 and misfit <= 1e-9 * size else None
