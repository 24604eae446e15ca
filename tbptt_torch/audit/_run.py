"""`audit`: it runs the loop once on an instrumented model, plain SGD and float64 data, and
hands what it recorded to the analysis, which compares it with the reference.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tbptt.checks import REDUCTIONS, TAILS, check_choice, check_int, check_k
from tbptt_torch import losses, models
from tbptt_torch.audit._analysis import Analysis
from tbptt_torch.audit._reference import reference_gradients
from tbptt_torch.audit._trace import AuditError, Recorder, RecordingSGD
from tbptt_torch.audit._verdict import AuditVerdict, Tbptt

Loop = Callable[..., Any]
CELLS = {"elman": models.ElmanModel, "gru": models.GRUModel, "lstm": models.LSTMModel}


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

        analysis = Analysis(recorder, length, batch_size, k1, k2, reduction, tail, error)
        analysis.run()

        def reference(semantics: Tbptt) -> list[dict[str, torch.Tensor]]:
            return reference_gradients(factory, initial, xs, ys, semantics, lr)

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
