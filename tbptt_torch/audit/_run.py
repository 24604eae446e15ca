"""`audit`: it runs the loop once on an instrumented model, plain SGD and float64 data, and
hands what it recorded to the analysis, which compares it with the reference.

The model is the audit's own small `tbptt_torch.models` model, or the user's (an instance or
a factory); the data random float features, random token ids for a model that embeds tokens,
or the user's own. Dropout is switched off in the user's model (its every `nn.Dropout` and
the dropout between the layers of `nn.RNN/GRU/LSTM`), so that the loop and the reference
compute the same gradients.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from tbptt.checks import REDUCTIONS, TAILS, check_choice, check_int, check_k
from tbptt_torch import models
from tbptt_torch.audit import _losses
from tbptt_torch.audit._analysis import Analysis, Intent
from tbptt_torch.audit._losses import Loss
from tbptt_torch.audit._reference import reference_gradients
from tbptt_torch.audit._trace import AuditError, Recorder, RecordingSGD, in_steps
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
    clip_grad_norm: float | None = None,
    cell: str = "lstm",
    input_size: int = 2,
    hidden_size: int = 4,
    num_layers: int = 1,
    length: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    lr: float = 0.05,
    model: nn.Module | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    xs: Any = None,
    ys: Any = None,
    vocab_size: int | None = None,
    loss_fn: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mask: Any = None,
) -> AuditVerdict:
    """Runs `loop` on an instrumented model and judges it against TBPTT(k1, k2).

    Args:
      loop: `loop(model, optimizer, xs, ys, k)`; it also gets `k2=` and `mask=` when it has
        parameters of those names. It gets the model, an SGD optimizer it may use or not (an
        update of its own, `p.data.add_(p.grad, alpha=-lr)` and the like, counts as well),
        `xs[T, B, ...]` and `ys[T, B, ...]`, floats in float64 (the default dtype is float64
        while it runs) or integer ids, and `k = k1`. Its loss may be any mean, sum or masked
        sum of per-step losses: squared or absolute error for float targets, cross-entropy of
        logits or `nn.NLLLoss` of log-probabilities for class targets; another goes in
        `loss_fn`.
      k1, k2: the TBPTT the loop is meant to implement (k2 defaults to k1).
      reduction, tail: the intended reduction ("mean"/"sum") and tail ("partial"/"drop");
        None reports what the loop implements without judging it.
      clip_grad_norm: the max norm the loop is meant to clip each update's gradient to,
        as `tbptt_train_step(..., clip_grad_norm=)`; None reports the loop's clipping.
      cell, input_size, hidden_size, num_layers: the audit's own `tbptt_torch.models` model
        (output size 1), handed over when no `model` or `model_factory` is given. It takes a
        chunk `x[t, B, I]` or one step `x[B, I]`; `carry=None` is the zero carry.
      length: T of the random data (default: five updates or more, with T % k1 != 0).
      batch_size: B of the random data (default k2 + 1, which tells every mean and sum apart).
      seed: seeds the weights and the data.
      lr: the learning rate of the SGD optimizer handed to the loop.
      model: your own `nn.Module` with `forward(x, carry) -> (preds, carry)`, called as the
        loop calls it; it is copied, not changed. Predictions may be `[t, B, ...]`, flattened
        `[t * B, ...]`, or `[B, ...]` for one step. The zero carry the reference starts from
        is `initial_carry(B)` or `init_hidden(B)` if it has one, else the zeros of the carry
        `model(xs[:1], None)` returns.
      model_factory: instead of `model`, a function returning a fresh one.
      xs, ys: your own data (numpy or torch, `[T, B, ...]`); default: random data shaped for
        the model, integer token ids `[T, B]` (each `ys[t] = xs[t + 1]`, the next token) for
        a model with an `nn.Embedding`, float features otherwise.
      vocab_size: the token ids of the random data are below it (default: the size of the
        model's first `nn.Embedding`).
      loss_fn: the per-term loss the loop computes, `loss_fn(preds, targets) -> losses[t,
        b]`, or "mse", "l1", "cross_entropy", "nll"; default: found from the gradients.
      mask: the intended weights of the loss terms `[T, B]` (bool or non-negative floats), as
        SPEC's mask; default: the loop's own (terms it weighs 0) are reported.

    Returns:
      An `AuditVerdict`; `str(verdict)` is the report.

    Raises:
      ValueError: for a bad argument, or `AuditError` when the loop calls the model in a
        way the audit cannot follow (not on slices of xs), or computes a loss it does not
        know without `loss_fn`.
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
    seed = check_int("seed", seed, minimum=0)
    _check_positive("lr", lr)
    if clip_grad_norm is not None:
        _check_positive("clip_grad_norm", clip_grad_norm)
    if model is not None and model_factory is not None:
        raise ValueError("pass model or model_factory, not both")
    if model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model_factory is not None and not callable(model_factory):
        raise ValueError(f"model_factory must be a callable returning an nn.Module, got "
                         f"{type(model_factory).__name__}")
    if (xs is None) != (ys is None):
        raise ValueError("pass xs and ys together, or neither for random data")
    if xs is not None and (length is not None or batch_size is not None):
        raise ValueError("length and batch_size shape the random data: with xs and ys given, "
                         "leave them out")
    if vocab_size is not None:
        check_int("vocab_size", vocab_size, minimum=2)
    loss = _loss(loss_fn)
    length = default_length(k1, k2) if length is None else check_int("length", length)
    batch_size = k2 + 1 if batch_size is None else check_int("batch_size", batch_size)

    with torch.random.fork_rng(devices=[]), _float64():
        torch.manual_seed(seed)
        own = model is None and model_factory is None
        if own:
            built = CELLS[cell](input_size, hidden_size, 1, num_layers=num_layers)
        else:
            built = copy.deepcopy(model) if model is not None else model_factory()
            if not isinstance(built, nn.Module):
                raise ValueError(f"model_factory must return a torch.nn.Module, got "
                                 f"{type(built).__name__}")
        built = built.double()
        dropouts = _without_dropout(built)
        generator = torch.Generator().manual_seed(seed)
        if xs is None:
            xs, ys, described = _random_data(built, own, length, batch_size, input_size,
                                             vocab_size, generator)
        else:
            xs, ys = _as_data("xs", xs), _as_data("ys", ys)
            _check_data(xs, ys)
            described = ("", " (given)")
        initial_carry = _zero_carry(built, xs)
        intent = Intent(k1, k2, reduction, tail, clip_grad_norm, _mask(mask, xs), loss)
        reference_model = copy.deepcopy(built)
        recorder = Recorder(built, xs, adds_time_axis=isinstance(built, models.RecurrentModel))
        optimizer = RecordingSGD(built.parameters(), lr, recorder)
        extra = _extra_arguments(loop, k2, intent.mask)
        error = None
        try:
            with recorder.watching():
                loop(built, optimizer, xs.clone(), ys.clone(), k1, **extra)
        except AuditError:
            raise
        except Exception as exc:  # the loop's own failure is part of the verdict
            error = exc
        recorder.finish(crashed=error is not None)
        if not recorder.forwards and error is None:
            raise AuditError("the loop never called model(x, carry): the audit sees only calls "
                             "of the model itself (not of its parts, such as model.rnn)")

        analysis = Analysis(recorder, xs, ys, intent, error)
        analysis.run()

        def reference(semantics: Tbptt, loss: Loss, mask: torch.Tensor | None
                      ) -> list[dict[str, torch.Tensor]]:
            return reference_gradients(reference_model, initial_carry, xs, ys, semantics, loss,
                                       mask, [u.weights_after for u in analysis.applied], lr)

        setup = _setup(built, own, cell, dropouts, xs, ys, described, lr, k1, extra)
        return analysis.verdict(reference, setup)


def _check_positive(name: str, value: object) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")


def _loss(loss_fn: Any) -> Loss | None:
    if loss_fn is None:
        return None
    if isinstance(loss_fn, str):
        check_choice("loss_fn", loss_fn, tuple(_losses.KNOWN))
        return _losses.KNOWN[loss_fn]
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be one of {tuple(_losses.KNOWN)} or a callable "
                         f"loss_fn(preds, targets) -> losses[t, b], got {loss_fn!r}")
    return Loss(getattr(loss_fn, "__name__", type(loss_fn).__name__), loss_fn)


def _extra_arguments(loop: Loop, k2: int, mask: torch.Tensor | None) -> dict[str, Any]:
    try:
        names = inspect.signature(loop).parameters
    except (TypeError, ValueError):  # a callable without a signature to read
        names = {}
    extra: dict[str, Any] = {"k2": k2} if "k2" in names else {}
    if "mask" in names and mask is not None:
        extra["mask"] = mask.clone()
    return extra


def _without_dropout(model: nn.Module) -> int:
    """Switches dropout off in `model`; the number of modules that had it on."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            count += 1
        elif isinstance(module, nn.RNNBase) and module.dropout > 0:
            module.dropout = 0.0
            count += 1
    return count


def _as_data(name: str, array: Any) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(array)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be an array [T, B, ...], got {type(array).__name__}"
                         ) from error
    if tensor.is_floating_point():
        return tensor.detach().to(torch.float64).clone()
    if tensor.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return tensor.detach().to(torch.int64).clone()
    raise ValueError(f"{name} must hold floats or integer ids, got {tensor.dtype}")


def _check_data(xs: torch.Tensor, ys: torch.Tensor) -> None:
    if xs.ndim < 2 or ys.ndim < 2:
        raise ValueError(f"xs and ys must be time-major [T, B, ...]; got xs of shape "
                         f"{list(xs.shape)} and ys of shape {list(ys.shape)}")
    if xs.shape[0] == 0 or xs.shape[1] == 0:
        raise ValueError(f"xs must hold at least one step of one sequence, got shape "
                         f"{list(xs.shape)}")
    if xs.shape[:2] != ys.shape[:2]:
        raise ValueError(f"ys must have the [T, B] of xs, expected {list(xs.shape[:2])}, got "
                         f"{list(ys.shape[:2])}")


def _mask(mask: Any, xs: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    weights = torch.as_tensor(mask).detach().to(torch.float64)
    if tuple(weights.shape) != tuple(xs.shape[:2]):
        raise ValueError(f"mask must have the [T, B] of xs, expected {list(xs.shape[:2])}, got "
                         f"{list(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("mask must hold non-negative finite weights (or bools)")
    return weights.clone()


def _embedding(model: nn.Module) -> nn.Embedding | None:
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _input_features(model: nn.Module, input_size: int) -> int:
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            return module.input_size
        if isinstance(module, nn.Linear):
            return module.in_features
    return input_size


def _zero_carry(model: nn.Module, xs: torch.Tensor) -> Callable[[int], Any]:
    """The zero carry for a batch, as the model makes it, or as zeros like the carry it
    returns when called with none."""
    for name in ("initial_carry", "init_hidden"):
        method = getattr(model, name, None)
        if callable(method):
            return method
    probe = copy.deepcopy(model)
    try:
        with torch.no_grad():
            _, carry = probe(xs[:1], None)
    except Exception as error:  # a user's model may fail in any way without a carry
        raise AuditError(f"the audit needs the zero carry to start the reference from: the "
                         f"model has no initial_carry(batch_size) or init_hidden(batch_size), "
                         f"and model(xs[:1], None) raised {type(error).__name__}: {error}. "
                         f"Give the model an initial_carry(batch_size) method") from error

    def zeros(_: int) -> Any:
        return _zeros_like(carry)

    return zeros


def _zeros_like(carry: Any) -> Any:
    if isinstance(carry, torch.Tensor):
        return torch.zeros_like(carry)
    if isinstance(carry, (tuple, list)):
        return type(carry)(_zeros_like(part) for part in carry)
    if isinstance(carry, dict):
        return {key: _zeros_like(part) for key, part in carry.items()}
    return carry


def _step_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The shape of the model's prediction for one step of one batch, `[...]`."""
    probe = copy.deepcopy(model)
    try:
        with torch.no_grad():
            preds, _ = probe(x, _zero_carry(probe, x)(x.shape[1]))
        return tuple(in_steps(preds, 1, x.shape[1])(preds).shape[2:])
    except Exception as error:  # a user's model may fail in any way on data not its own
        raise AuditError(f"the model fails on the random data the audit made for it, x of "
                         f"shape {list(x.shape)} ({type(error).__name__}: {error}): pass your "
                         f"own data (xs and ys; tbptt audit --data FILE:NAME), or the input "
                         f"size or vocabulary size it takes") from error


def _random_data(model: nn.Module, own: bool, length: int, batch_size: int, input_size: int,
                 vocab_size: int | None, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str]]:
    """Random xs and ys for `model`, and how the report describes them."""
    embedding = _embedding(model)
    if vocab_size is None and embedding is None:
        features = input_size if own else _input_features(model, input_size)
        xs = torch.randn(length, batch_size, features, generator=generator)
        shape = (1,) if own else _step_shape(model, xs[:1])
        return xs, torch.randn(length, batch_size, *shape, generator=generator), ("", "")
    vocab = vocab_size or embedding.num_embeddings
    stream = torch.randint(vocab, (length + 1, batch_size), generator=generator)
    # Distinct rows, so every chunk the loop feeds the model is found at one place of xs.
    seen: set[bytes] = set()
    for t in range(length):
        for _ in range(100):
            key = stream[t].numpy().tobytes()
            if key not in seen:
                break
            stream[t] = torch.randint(vocab, (batch_size,), generator=generator)
        seen.add(stream[t].numpy().tobytes())
    xs = stream[:-1]
    classes = _step_shape(model, xs[:1])
    if classes and classes[-1] == vocab:
        return xs, stream[1:].clone(), (f" token ids < {vocab}", " the next tokens")
    ys = torch.randint(classes[-1] if classes else vocab, (length, batch_size),
                       generator=generator)
    return xs, ys, (f" token ids < {vocab}", f" class ids < {classes[-1] if classes else vocab}")


def _setup(model: nn.Module, own: bool, cell: str, dropouts: int, xs: torch.Tensor,
           ys: torch.Tensor, described: tuple[str, str], lr: float, k1: int,
           extra: dict[str, Any]) -> str:
    if own:
        rnn = model.rnn
        cell_name = {"elman": "Elman", "gru": "GRU", "lstm": "LSTM"}[cell]
        name = (f"{cell_name}({rnn.input_size} -> {rnn.hidden_size} x {rnn.num_layers} "
                f"layer(s) -> 1)")
    else:
        name = type(model).__name__ + (f" (dropout off in {dropouts} module"
                                       f"{'s' if dropouts > 1 else ''})" if dropouts else "")
    given = f"k={k1}" + "".join(f", {key}={value}" for key, value in extra.items()
                                if key != "mask") + (", mask" if "mask" in extra else "")
    return (f"{name}, float64; xs [{', '.join(map(str, xs.shape))}]{described[0]}, ys "
            f"[{', '.join(map(str, ys.shape))}]{described[1]}; SGD lr={lr}; the loop got "
            f"{given}")
