"""Checking a port of one's own: a torch module and a JAX apply function, trained from the
same weights on the same data, compared update by update.

`compare` copies the torch module's weights into JAX `params` keyed by its `state_dict()`
names (`tbptt_torch.to_jax`), so the JAX apply function reads `params["gru.weight_hh_l0"]`
and so on; it runs `tbptt_jax.tbptt_train_step` and `tbptt_torch.tbptt_train_step` with the
same TBPTT(k1, k2), loss and optimizer, and measures, for every update, the relative gap
of the loss, of every parameter's gradient and of every parameter after the update (torch
is the reference: each gap is measured against the torch tensor's scale, see `_harness`).
The `Report` lists the updates up to the first one where a gap exceeds the tolerance and
names the parameter whose gradient (or, if the gradients agree, whose value) is furthest
apart there. `load_port` and `random_data` serve the `tbptt parity` command: a port named
by file or module, and data shaped for it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

import tbptt_jax
import tbptt_torch
from tbptt.checks import REDUCTIONS, TAILS, check_choice, check_int, check_k
from tbptt.loading import load_object
from tbptt_parity._harness import (
    OPTIMIZERS,
    SCALES,
    OptimizerPair,
    Trajectory,
    _gaps,
    _leaves,
    optimizer_pair,
    run_jax,
    run_torch,
    to_numpy,
)

LOSSES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "mse": (tbptt_jax.losses.mse, tbptt_torch.losses.mse),
    "cross_entropy": (tbptt_jax.losses.cross_entropy, tbptt_torch.losses.cross_entropy),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# SPEC §3: exact in float64; float32 rounding, measured against each tensor's largest
# magnitude over the run (a tensor passing near zero is not held to its own tiny size).
DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-5}
DEFAULT_SCALE = {"float64": "update", "float32": "trajectory"}


class UpdateGaps(NamedTuple):
    """How far the two trainers are apart at one update."""

    update: int  # 1-based
    jax_loss: float
    torch_loss: float
    loss: float  # relative gap of the losses
    grads: dict[str, float]  # parameter name -> relative gap of this update's gradient
    params: dict[str, float]  # parameter name -> relative gap of the parameter after it

    def largest(self, quantity: str) -> tuple[str | None, float]:
        """`(name, gap)` of the parameter furthest apart in "grads" or "params"."""
        gaps = getattr(self, quantity)
        if not gaps:
            return None, 0.0
        name = max(gaps, key=lambda key: _order(gaps[key]))
        return name, gaps[name]


def _order(gap: float) -> float:
    return math.inf if math.isnan(gap) else gap


@dataclass(frozen=True)
class Report:
    """What `compare` found. `ok` when every update (and the returned carry) agreed.

    On divergence, `update` is the first update (1-based) where a gap exceeds `rtol`;
    `parameter` the parameter with the largest gradient gap there (or the largest parameter
    gap, if the gradients agree; None if only the loss differs); `quantity` says which
    ("grad", "param", "loss", or "carry" when only the returned carry differs, `parameter`
    then naming its leaf) and `gap` how large it is. `rows` hold the updates compared, up to
    and including the divergent one.
    """

    rows: tuple[UpdateGaps, ...]
    updates: int  # updates trained
    rtol: float
    scale: str
    settings: dict[str, Any]  # k1, k2, dtype, loss, optimizer, reduction, tail
    carry_gap: float | None  # the returned carries' gap; None when not compared
    update: int | None = None
    quantity: str | None = None
    parameter: str | None = None
    gap: float | None = None

    @property
    def ok(self) -> bool:
        return self.quantity is None

    def largest_gaps(self) -> dict[str, float]:
        """The largest gap of the loss, the gradients and the parameters over `rows`."""
        return {"loss": max((_order(r.loss) for r in self.rows), default=0.0),
                "grad": max((_order(r.largest("grads")[1]) for r in self.rows), default=0.0),
                "param": max((_order(r.largest("params")[1]) for r in self.rows), default=0.0)}

    def format(self, verbose: bool = False) -> str:
        """The report as text: settings, one row per update (with every parameter's gaps
        when `verbose`, and always at the divergent update), and the verdict."""
        s = self.settings
        lines = [f"port check: TBPTT(k1={s['k1']}, k2={s['k2']}), {self.updates} updates, "
                 f"{s['dtype']}, loss {s['loss']}, optimizer {s['optimizer']}, reduction "
                 f"{s['reduction']}, tail {s['tail']}",
                 f"tolerance {self.rtol:g} relative (scale: {self.scale}); gaps are "
                 "|jax - torch| over the torch tensor's largest magnitude",
                 "",
                 f"{'update':>6}{'jax loss':>20}{'torch loss':>20}{'loss gap':>11}"
                 f"{'grad gap':>11}{'param gap':>11}  largest grad gap in"]
        for row in self.rows:
            grad_key, grad_gap = row.largest("grads")
            _, param_gap = row.largest("params")
            lines.append(f"{row.update:>6}{row.jax_loss:>20.12g}{row.torch_loss:>20.12g}"
                         f"{row.loss:>11.1e}{grad_gap:>11.1e}{param_gap:>11.1e}  {grad_key}")
            if verbose or (not self.ok and row.update == self.update):
                for key in sorted(row.grads, key=lambda k: -_order(row.grads[k])):
                    lines.append(f"{'':>6}  {key:<32} grad gap {row.grads[key]:.1e}, "
                                 f"param gap {row.params[key]:.1e}")
        lines.append("")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """One line: OK with the largest gaps, or where and how far the port diverged."""
        if self.ok:
            largest = ", ".join(f"{q} {v:.1e}" for q, v in self.largest_gaps().items())
            carry = "" if self.carry_gap is None else f", carry {self.carry_gap:.1e}"
            return (f"OK: the port agrees with torch over all {self.updates} updates to "
                    f"{self.rtol:g} (largest gaps: {largest}{carry})")
        if self.quantity == "carry":
            return (f"DIVERGED in the carry returned after update {self.updates}: leaf "
                    f"{self.parameter} differs by {self.gap:.2e} relative (tolerance "
                    f"{self.rtol:g}); every update agreed")
        row = self.rows[-1]
        loss = f"the loss by {row.loss:.2e}"
        if self.quantity == "loss":
            return (f"DIVERGED at update {self.update}: {loss} relative (tolerance "
                    f"{self.rtol:g}); every gradient and parameter agreed")
        what = "the gradient of" if self.quantity == "grad" else "parameter"
        return (f"DIVERGED at update {self.update}: {what} {self.parameter!r} differs by "
                f"{self.gap:.2e} relative (tolerance {self.rtol:g}); {loss}")

    def __str__(self) -> str:
        return self.format()


def compare(torch_model: nn.Module, apply_fn: Callable[..., Any], *, xs: Any, ys: Any,
            k1: int, k2: int | None = None,
            loss_fn: str | tuple[Callable[..., Any], Callable[..., Any]] = "mse",
            optimizer: str | OptimizerPair | tuple[Any, Any] = "sgd", lr: float = 0.05,
            updates: int | None = None, dtype: str = "float64", rtol: float | None = None,
            scale: str | None = None, reduction: str = "mean", tail: str = "partial",
            resets: Any = None, carry: Any = None, jax_carry: Any = None) -> Report:
    """Trains `torch_model` and its JAX port from the same weights and data; reports the
    first update and parameter where they part.

    Args:
      torch_model: an `nn.Module` with `forward(xs, carry[, resets]) -> (preds, carry)` over
        a time-major chunk. It is not modified: a copy, cast to `dtype`, is trained. Every
        `state_dict()` entry must be a parameter (buffers would not be trained alike).
      apply_fn: the JAX port, `(params, carry, xs[, resets]) -> (carry, preds)`, reading
        `params` by the torch module's `state_dict()` names.
      xs: inputs `[T, B, ...]` (numpy, torch or JAX): floats, cast to `dtype`, or integer
        token ids `[T, B]` for a model that embeds them.
      ys: targets `[T, B, ...]`: floats for "mse", integer class labels `[T, B]` for
        "cross_entropy".
      k1, k2: TBPTT(k1, k2), as in `tbptt_jax.tbptt_train_step`.
      loss_fn: "mse", "cross_entropy", or a pair `(jax loss, torch loss)`, each
        `(preds, targets) -> losses[t, b]`.
      optimizer: "sgd", "nesterov" or "adam" at learning rate `lr`; or a pair
        `(optax transformation, parameters -> torch optimizer)` (an `OptimizerPair`).
      lr: the learning rate of a named optimizer.
      updates: train this many updates on the first steps of `xs` (default: all of it).
      dtype: "float64" (default; the port should agree to rounding) or "float32".
      rtol: the tolerance on every relative gap; default 1e-10 in float64, 1e-5 in float32.
      scale: "update" measures each tensor against its own size at that update, "trajectory"
        against the largest size its name reaches over the run; default "update" in
        float64, "trajectory" in float32.
      reduction, tail, resets: as in `tbptt_jax.tbptt_train_step`; `resets` bool `[T, B]`.
      carry: the torch carry before the first step (tensors or numpy arrays); default the
        module's `initial_carry(B)`.
      jax_carry: the JAX carry before the first step; default `carry` as JAX arrays, for a
        port that keeps torch's carry layout.

    Returns:
      A `Report`; `print(report)` shows it, `report.ok` says whether the port agreed.
    """
    if not isinstance(torch_model, nn.Module):
        raise ValueError(f"torch_model must be a torch.nn.Module, got "
                         f"{type(torch_model).__name__}")
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable (params, carry, xs) -> (carry, preds), "
                         f"got {type(apply_fn).__name__}")
    k1, k2 = check_k(k1, k2)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("tail", tail, TAILS)
    check_choice("dtype", dtype, tuple(DTYPES))
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 < rtol < math.inf:
        raise ValueError(f"rtol must be a positive finite number, got {rtol!r}")
    scale = DEFAULT_SCALE[dtype] if scale is None else scale
    check_choice("scale", scale, SCALES)
    jax_loss, torch_loss = _loss_pair(loss_fn)
    optimizers = _optimizer_pair(optimizer, lr)
    xs, ys, resets = _sequences(xs, ys, resets, k1, updates, tail, np.dtype(dtype))

    model = copy.deepcopy(torch_model).to(DTYPES[dtype])
    buffers = sorted(set(model.state_dict()) - {name for name, _ in model.named_parameters()})
    if buffers:
        raise ValueError(f"torch_model: compare trains every state_dict() entry, so it must "
                         f"hold parameters only; it has the buffers {buffers}")
    torch_carry = _torch_carry(model, carry, xs.shape[1], DTYPES[dtype])
    if jax_carry is None:
        jax_carry = to_numpy(torch_carry)
    options = dict(k1=k1, k2=k2, reduction=reduction, tail=tail, on_nonfinite="skip")

    # float64 needs JAX's 64-bit mode; turned on for this call only.
    x64 = jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()
    with x64:
        params = {name: jnp.asarray(array) for name, array in tbptt_torch.to_jax(model).items()}
        jax_run = run_jax(params, jax.tree.map(jnp.asarray, jax_carry), xs, ys,
                          apply_fn=apply_fn, loss_fn=jax_loss, optimizer=optimizers.optax,
                          resets=resets, **options)
    torch_run = run_torch(model, optimizers.torch(model.parameters()), torch_carry, xs, ys,
                          loss_fn=torch_loss, resets=resets, **options)

    settings = {"k1": k1, "k2": k2, "dtype": dtype, "loss": _name(loss_fn),
                "optimizer": f"{optimizer} lr={lr:g}" if isinstance(optimizer, str)
                else "custom", "reduction": reduction, "tail": tail}
    return _report(jax_run, torch_run, rtol, scale, settings)


def _report(jax_run: Trajectory, torch_run: Trajectory, rtol: float, scale: str,
            settings: dict[str, Any]) -> Report:
    """Groups the harness's gaps by update and stops at the first update beyond `rtol`."""
    if len(jax_run.losses) != len(torch_run.losses):
        raise ValueError(f"the trainers made different numbers of updates: JAX "
                         f"{len(jax_run.losses)}, torch {len(torch_run.losses)}")
    carries_alike = _same_layout(jax_run.carry, torch_run.carry)
    if not carries_alike:
        jax_run, torch_run = jax_run._replace(carry=None), torch_run._replace(carry=None)
    per_update: list[dict[str, dict[str, float]]] = [
        {"loss": {}, "grad": {}, "param": {}} for _ in torch_run.losses]
    carry_gaps: dict[str, float] = {}
    for gap in _gaps(jax_run, torch_run, scale):
        if gap.update is None:
            carry_gaps[gap.key] = gap.gap
        else:
            per_update[gap.update][gap.quantity][gap.key or ""] = gap.gap
    rows: list[UpdateGaps] = []
    divergence = None
    for u, found in enumerate(per_update):
        rows.append(UpdateGaps(u + 1, float(jax_run.losses[u]), float(torch_run.losses[u]),
                               found["loss"][""], found["grad"], found["param"]))
        if _beyond(rows[-1], rtol):
            divergence = rows[-1]
            break

    base = dict(rows=tuple(rows), updates=len(torch_run.losses), rtol=rtol, scale=scale,
                settings=settings)
    if divergence is not None:
        grad_key, grad_gap = divergence.largest("grads")
        param_key, param_gap = divergence.largest("params")
        if not grad_gap <= rtol:
            found = ("grad", grad_key, grad_gap)
        elif not param_gap <= rtol:
            found = ("param", param_key, param_gap)
        else:
            found = ("loss", None, divergence.loss)
        return Report(**base, carry_gap=None, update=divergence.update, quantity=found[0],
                      parameter=found[1], gap=found[2])
    carry_gap = max(carry_gaps.values(), default=0.0) if carries_alike else None
    if carry_gap is not None and not carry_gap <= rtol:
        leaf = max(carry_gaps, key=lambda key: _order(carry_gaps[key]))
        return Report(**base, carry_gap=carry_gap, quantity="carry", parameter=leaf,
                      gap=carry_gap)
    return Report(**base, carry_gap=carry_gap)


def _beyond(row: UpdateGaps, rtol: float) -> bool:
    # `not gap <= rtol` so that a NaN gap counts as beyond.
    return any(not gap <= rtol for gap in (row.loss, *row.grads.values(), *row.params.values()))


def _same_layout(a: Any, b: Any) -> bool:
    """Whether two carries (nested tuples of numpy arrays) have the same leaves and shapes."""
    if a is None or b is None:
        return False
    a_leaves, b_leaves = _leaves(a), _leaves(b)
    return list(a_leaves) == list(b_leaves) and all(
        (x is None) == (y is None) and np.shape(x) == np.shape(y)
        for x, y in zip(a_leaves.values(), b_leaves.values(), strict=True))


def _name(choice: Any) -> str:
    return choice if isinstance(choice, str) else "custom"


def _loss_pair(loss_fn: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if isinstance(loss_fn, str):
        check_choice("loss_fn", loss_fn, tuple(LOSSES))
        return LOSSES[loss_fn]
    if (isinstance(loss_fn, tuple) and len(loss_fn) == 2 and callable(loss_fn[0])
            and callable(loss_fn[1])):
        return loss_fn
    raise ValueError(f"loss_fn must be one of {tuple(LOSSES)} or a pair (jax loss, torch "
                     f"loss), got {loss_fn!r}")


def _optimizer_pair(optimizer: Any, lr: float) -> OptimizerPair:
    if isinstance(optimizer, str):
        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        return optimizer_pair(optimizer, lr)
    if (isinstance(optimizer, tuple) and len(optimizer) == 2
            and isinstance(optimizer[0], optax.GradientTransformation)
            and callable(optimizer[1])):
        return OptimizerPair(*optimizer)
    raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)} or a pair (optax "
                     f"transformation, parameters -> torch optimizer), got {optimizer!r}")


def _as_numpy(name: str, array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    try:
        return np.asarray(array)
    except Exception as error:  # anything numpy cannot read as an array
        raise ValueError(f"{name} must be an array, got {type(array).__name__}") from error


def _sequences(xs: Any, ys: Any, resets: Any, k1: int, updates: int | None, tail: str,
               dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """xs, ys (and resets) as numpy, floats cast to `dtype`, cut to `updates` updates."""
    xs, ys = _as_numpy("xs", xs), _as_numpy("ys", ys)
    if xs.ndim < 2 or ys.ndim < 2:
        raise ValueError(f"xs and ys must be time-major [T, B, ...]; got xs of shape "
                         f"{xs.shape} and ys of shape {ys.shape}")
    if np.issubdtype(xs.dtype, np.integer):
        xs = xs.astype(np.int32)  # token ids; int32 needs no 64-bit mode in JAX
    elif np.issubdtype(xs.dtype, np.floating):
        xs = xs.astype(dtype)
    else:
        raise ValueError(f"xs must be floats or integer token ids, got {xs.dtype}")
    if np.issubdtype(ys.dtype, np.floating):
        ys = ys.astype(dtype)
    elif np.issubdtype(ys.dtype, np.integer):
        ys = ys.astype(np.int32)  # class labels; int32 needs no 64-bit mode in JAX
    else:
        raise ValueError(f"ys must be floats or integer class labels, got {ys.dtype}")
    if resets is not None:
        resets = _as_numpy("resets", resets)
    if updates is not None:
        updates = check_int("updates", updates)
        needed = updates * k1 if tail == "drop" else (updates - 1) * k1 + 1
        if xs.shape[0] < needed:
            raise ValueError(f"updates={updates} of k1={k1} (tail={tail!r}) need xs of at "
                             f"least {needed} steps, got {xs.shape[0]}")
        steps = slice(0, updates * k1)
        xs, ys = xs[steps], ys[steps]
        resets = None if resets is None else resets[steps]
    return xs, ys, resets


def _torch_carry(model: nn.Module, carry: Any, batch_size: int, dtype: torch.dtype) -> Any:
    if carry is None:
        initial_carry = getattr(model, "initial_carry", None)
        if initial_carry is None:
            raise ValueError("carry: the torch module has no initial_carry(batch_size) "
                             "method, so pass the carry before the first step")
        return initial_carry(batch_size)

    def to_torch(part: Any) -> Any:
        if isinstance(part, tuple):
            return tuple(to_torch(p) for p in part)
        return torch.as_tensor(_as_numpy("carry", part)).to(dtype)

    return to_torch(carry)


def load_port(torch_factory: str, jax_apply: str, *, seed: int = 0
              ) -> tuple[nn.Module, Callable[..., Any]]:
    """The torch module and the JAX apply function that the specs (see `load_object`) name.

    `torch_factory` names a callable of no arguments returning the `nn.Module` (a class
    whose arguments all have defaults will do); it is called with torch seeded by `seed`,
    without touching the global torch RNG, so its initial weights are reproducible.
    """
    factory, apply_fn = load_object(torch_factory), load_object(jax_apply)
    if not callable(factory):
        raise ValueError(f"{torch_factory!r} must name a callable returning a torch module, "
                         f"got {type(factory).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory()
        except Exception as error:  # the user's code may fail in any way
            raise ValueError(f"{torch_factory!r}: calling it raised {type(error).__name__}: "
                             f"{' '.join(str(error).split())}") from error
    if not isinstance(model, nn.Module):
        raise ValueError(f"{torch_factory!r} must return a torch.nn.Module, got "
                         f"{type(model).__name__}")
    if not callable(apply_fn):
        raise ValueError(f"{jax_apply!r} must name the JAX apply function, got "
                         f"{type(apply_fn).__name__}")
    return model, apply_fn


def random_data(torch_model: nn.Module, *, steps: int, batch_size: int, loss_fn: str = "mse",
                input_size: int | None = None, vocab_size: int | None = None, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Random `(xs, ys)` shaped for `torch_model`.

    xs are token ids `[steps, B]` below `vocab_size` for a model that embeds tokens
    (`vocab_size` defaults to the size of its first `nn.Embedding`, when `input_size` is not
    given), else features `[steps, B, input_size]` ~ N(0, 1), `input_size` defaulting to that
    of the module's first recurrent or linear layer. ys are ~ N(0, 1) of the model's output
    shape for "mse", class labels `[steps, B]` below its number of outputs for
    "cross_entropy". The output shape is found by running the module on one step from its
    `initial_carry(B)`, as `forward(xs, carry)` is called in training.
    """
    steps, batch_size = check_int("steps", steps), check_int("batch_size", batch_size)
    check_choice("loss_fn", loss_fn, tuple(LOSSES))
    if vocab_size is None and input_size is None:
        embedding = next((m for m in torch_model.modules() if isinstance(m, nn.Embedding)),
                         None)
        vocab_size = None if embedding is None else embedding.num_embeddings
    rng = np.random.default_rng(seed)
    if vocab_size is not None:
        vocab_size = check_int("vocab_size", vocab_size)
        xs = rng.integers(0, vocab_size, (steps, batch_size))
        first = torch.zeros(1, batch_size, dtype=torch.int64)
        described = f"token ids of shape [1, {batch_size}] (is vocab_size right?)"
    else:
        input_size = check_int("input_size", _input_size(torch_model) if input_size is None
                               else input_size)
        xs = rng.standard_normal((steps, batch_size, input_size))
        first = torch.zeros(1, batch_size, input_size, dtype=torch.float64)
        described = f"xs of shape [1, {batch_size}, {input_size}] (is input_size right?)"
    probe = copy.deepcopy(torch_model).double()
    carry = _torch_carry(probe, None, batch_size, torch.float64)
    with torch.no_grad():
        try:
            preds, _ = probe(first, carry)
        except Exception as error:  # a user's module may fail in any way on a wrong size
            raise ValueError(f"the torch module fails on {described}: "
                             f"{type(error).__name__}: {error}") from error
    output_shape = tuple(preds.shape[2:])
    if loss_fn == "cross_entropy":
        return xs, rng.integers(0, output_shape[-1], (steps, batch_size))
    return xs, rng.standard_normal((steps, batch_size, *output_shape))


def _input_size(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            return module.input_size
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ValueError("input_size: the torch module has no nn.RNN/GRU/LSTM or nn.Linear to "
                     "read it from; pass it")
