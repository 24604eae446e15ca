"""SPEC §4 as a matrix: every kind of bad input gets a clear error, and changes nothing.

Each kind (`MATRIX`) runs against both trainers (`tbptt_jax.tbptt_train_step` and
`tbptt_torch.tbptt_train_step` on the same one-layer LSTM) and, where it applies, against
`tbptt_torch.load_jax`, `tbptt_parity.compare` and the checkpoint loaders. A run is
"clear" when it raises the kind's exception (a `ValueError` unless said otherwise) whose
message names the argument; the test also asserts the exact text, which states the
expected and the actual value. Afterwards the JAX parameters and optimizer state passed in,
the torch model's `state_dict()` and optimizer state (made non-trivial by one valid call
first), the caller's arrays and the checkpoint files must be exactly as they were, or the
run is "mutated"; one that raises nothing is "silent".

`python tests/test_bad_input.py` prints the matrix's counts (clear / unclear / silent /
mutated) and every run that is not clear.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import tbptt_jax
import tbptt_parity
import tbptt_torch
from tbptt.stream import NonFiniteLossError
from tbptt_jax import checkpoint as jax_checkpoint
from tbptt_jax import losses as jax_losses
from tbptt_jax import models as jax_models
from tbptt_jax.checkpoint import CheckpointError as JaxCheckpointError
from tbptt_torch import checkpoint as torch_checkpoint
from tbptt_torch import losses as torch_losses
from tbptt_torch import models as torch_models
from tbptt_torch.checkpoint import CheckpointError as TorchCheckpointError

STEPS, BATCH, INPUT, HIDDEN, OUTPUT = 5, 2, 2, 3, 1
XS = np.random.default_rng(0).normal(size=(STEPS, BATCH, INPUT))
YS = np.random.default_rng(1).normal(size=(STEPS, BATCH, OUTPUT))
JAX_OPTIMIZER = optax.adam(1e-2)  # one object: a new one would be a new static argument


def torch_lstm() -> torch_models.LSTMModel:
    torch.manual_seed(0)
    return torch_models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()


class JaxTrainer:
    """`tbptt_jax.tbptt_train_step` with valid defaults that a case overrides."""

    dtype_prefix = ""
    OverlapCarry = tbptt_jax.OverlapCarry
    losses = jax_losses

    def __init__(self, workdir: Path) -> None:
        self.model = jax_models.lstm(INPUT, HIDDEN, OUTPUT)
        self.params = {name: jnp.asarray(p) for name, p in tbptt_torch.to_jax(torch_lstm()).items()}
        self.opt_state = JAX_OPTIMIZER.init(self.params)
        self.before = jax.tree.map(np.array, (self.params, self.opt_state))

    def array(self, value: Any) -> Any:
        return jax.tree.map(jnp.asarray, value)

    def call(self, **overrides: Any) -> Any:
        kwargs = {"params": self.params, "opt_state": self.opt_state,
                  "carry": self.model.initial_carry(BATCH, jnp.float64), "xs": XS, "ys": YS,
                  "apply_fn": self.model.apply, "loss_fn": jax_losses.mse,
                  "optimizer": JAX_OPTIMIZER, "k1": 2, **overrides}
        return tbptt_jax.tbptt_train_step(**kwargs)

    def assert_unchanged(self) -> None:
        after = jax.tree.map(np.asarray, (self.params, self.opt_state))
        assert jax.tree.structure(after) == jax.tree.structure(self.before)
        for old, new in zip(jax.tree.leaves(self.before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(new, old)


def assert_same_state(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)


def assert_same_optimizer(optimizer: torch.optim.Optimizer, before: dict[str, Any]) -> None:
    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for index, entries in before["state"].items():
        assert entries.keys() == after["state"][index].keys()
        for key, value in entries.items():
            torch.testing.assert_close(after["state"][index][key], value, rtol=0, atol=0,
                                       msg=f"optimizer state {index} {key}")


class TorchTrainer:
    """`tbptt_torch.tbptt_train_step` with valid defaults that a case overrides."""

    dtype_prefix = "torch."
    OverlapCarry = tbptt_torch.OverlapCarry
    losses = torch_losses

    def __init__(self, workdir: Path) -> None:
        self.model = torch_lstm()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        # One valid call first, so the optimizer has state (step, moments) to lose.
        self.call()
        self.before = (copy.deepcopy(self.model.state_dict()),
                       copy.deepcopy(self.optimizer.state_dict()))

    def array(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(torch.tensor(part) for part in value)
        return torch.tensor(value)

    def call(self, **overrides: Any) -> Any:
        kwargs = {"model": self.model, "optimizer": self.optimizer, "carry": None,
                  "xs": torch.tensor(XS), "ys": torch.tensor(YS), "loss_fn": torch_losses.mse,
                  "k1": 2, **overrides}
        return tbptt_torch.tbptt_train_step(**kwargs)

    def assert_unchanged(self) -> None:
        assert_same_state(self.model, self.before[0])
        assert_same_optimizer(self.optimizer, self.before[1])


class LoadJax:
    """`tbptt_torch.load_jax(model, params)`: JAX weights into a torch model."""

    dtype_prefix = "torch."

    def __init__(self, workdir: Path) -> None:
        self.model = torch_lstm()
        self.before = copy.deepcopy(self.model.state_dict())
        # Every entry differs from the model's, so a partial copy would show.
        self.params = {name: np.full(tuple(t.shape), 0.25) for name, t in self.before.items()}

    def call(self, **overrides: Any) -> Any:
        kwargs = {"model": self.model, "params": self.params, **overrides}
        return tbptt_torch.load_jax(**kwargs)

    def assert_unchanged(self) -> None:
        assert_same_state(self.model, self.before)


class Compare:
    """`tbptt_parity.compare`: a torch model against its JAX port."""

    dtype_prefix = ""

    def __init__(self, workdir: Path) -> None:
        self.model = torch_lstm()
        self.before = copy.deepcopy(self.model.state_dict())

    def call(self, **overrides: Any) -> Any:
        kwargs = {"torch_model": self.model,
                  "apply_fn": jax_models.lstm(INPUT, HIDDEN, OUTPUT).apply, "xs": XS, "ys": YS,
                  "k1": 2, **overrides}
        return tbptt_parity.compare(**kwargs)

    def assert_unchanged(self) -> None:
        assert_same_state(self.model, self.before)


class JaxCheckpoint:
    """`tbptt_jax.checkpoint.restore(directory, like)` of a run saved once per session."""

    dtype_prefix = ""

    def __init__(self, workdir: Path) -> None:
        self.directory = workdir / "jax"
        self.like = self.state()
        if not self.directory.exists():
            jax_checkpoint.save(self.directory, 1, self.like)
        self.before = jax.tree.map(np.array, self.like)

    @staticmethod
    def state() -> jax_checkpoint.TrainState:
        params = {name: jnp.asarray(p) for name, p in tbptt_torch.to_jax(torch_lstm()).items()}
        return jax_checkpoint.TrainState(params, JAX_OPTIMIZER.init(params))

    def call(self, **overrides: Any) -> Any:
        kwargs = {"directory": self.directory, "like": self.like, **overrides}
        return jax_checkpoint.restore(**kwargs)

    def assert_unchanged(self) -> None:
        after = jax.tree.map(np.asarray, self.like)
        for old, new in zip(jax.tree.leaves(self.before), jax.tree.leaves(after), strict=True):
            np.testing.assert_array_equal(new, old)


class TorchCheckpoint:
    """`tbptt_torch.checkpoint.restore(path, model=, optimizer=)` of a run saved once per
    session, into a fresh model and optimizer (whose state must stay as it was)."""

    dtype_prefix = "torch."

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "torch.pt"
        if not self.path.exists():
            trainer = TorchTrainer(workdir)
            torch_checkpoint.save(self.path, model=trainer.model, optimizer=trainer.optimizer,
                                  carry=None, position=1)
        torch.manual_seed(1)
        self.model = torch_models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.before = (copy.deepcopy(self.model.state_dict()),
                       copy.deepcopy(self.optimizer.state_dict()))

    def call(self, **overrides: Any) -> Any:
        kwargs = {"path": self.path, "model": self.model, "optimizer": self.optimizer,
                  **overrides}
        return torch_checkpoint.restore(**kwargs)

    def assert_unchanged(self) -> None:
        assert_same_state(self.model, self.before[0])
        assert_same_optimizer(self.optimizer, self.before[1])


TARGETS = {"jax": JaxTrainer, "torch": TorchTrainer, "load_jax": LoadJax, "compare": Compare,
           "jax_checkpoint": JaxCheckpoint, "torch_checkpoint": TorchCheckpoint}
TRAINERS = {"jax": JaxTrainer, "torch": TorchTrainer}
Overrides = Callable[[Any], dict[str, Any]]


class Bad(NamedTuple):
    """One kind of bad input: for each target it applies to, the arguments that replace
    valid ones (`overrides(target)`), and the exact text its error must hold ("{t}" stands
    for "torch." where torch prints its dtypes). The message must name `argument` (by
    default its first word)."""

    name: str
    overrides: dict[str, Overrides]
    messages: dict[str, str]
    error: type[Exception] | tuple[type[Exception], ...] = ValueError
    argument: str = ""

    def names(self, message: str) -> str:
        return self.argument or re.split(r"[\s:\[.,]", message, maxsplit=1)[0]


def both(name: str, overrides: Overrides, message: str | tuple[str, str],
         error: type[Exception] = ValueError, argument: str = "") -> Bad:
    """A kind run against both trainers; `message` one text, or (JAX's, torch's)."""
    jax_message, torch_message = (message, message) if isinstance(message, str) else message
    return Bad(name, {"jax": overrides, "torch": overrides},
               {"jax": jax_message, "torch": torch_message}, error, argument)


def each(name: str, error: type[Exception] = ValueError, argument: str = "",
         **targets: tuple[Overrides, str]) -> Bad:
    """A kind whose arguments differ by target: `target=(overrides, message)`."""
    return Bad(name, {target: pair[0] for target, pair in targets.items()},
               {target: pair[1] for target, pair in targets.items()}, error, argument)


BAD_K = [0, -1, 2.5, True, "3", None]


def lstm_carry(layers: int, batch: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.zeros((layers, batch, hidden)), np.zeros((layers, batch, hidden)))


def carry_message(got: str) -> str:
    """Both trainers describe a carry as dtype[shape] per tensor, the LSTM's as a pair."""
    return ("carry must match the model and batch size 2: expected "
            f"('float64[1, 2, 3]', 'float64[1, 2, 3]'), got {got}")


def losses_message(got: str) -> tuple[str, str]:
    """JAX traces loss_fn on one step; torch checks it on the first window (k1=2)."""
    return tuple(f"loss_fn must return per-step, per-sequence losses [t, b], expected shape "
                 f"({steps}, 2) for {steps} step{'s' * (steps > 1)}, got {got(steps)}"
                 for steps in (1, 2))


def loss_fails(ys: str, error: Callable[[int], str]) -> tuple[str, str]:
    return tuple(f"ys of shape {ys} does not fit loss_fn with the model's predictions of "
                 f"shape float64[{steps}, 2, 1] for {steps} step{'s' * (steps > 1)}: "
                 f"{error(steps)}" for steps in (1, 2))


def model_fails(error: str, xs: str = "(5, 2, 2)") -> str:
    return ("the model fails on the carry ('float64[1, 2, 3]', 'float64[1, 2, 3]') and xs of "
            f"shape {xs}: {error}")


def overlap(t: Any, xs: Any, resets: Any = None, state: Any = None) -> Any:
    """An OverlapCarry of the target's framework from numpy parts."""
    state = lstm_carry(1, BATCH, HIDDEN) if state is None else state
    return t.OverlapCarry(t.array(state), t.array(xs), None if resets is None else t.array(resets))


class Failing(torch.nn.Module):
    """The LSTM, with a forward that fails or returns something other than it should."""

    def __init__(self, model: torch.nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.model, self.wrong = model, forward

    def forward(self, xs, carry=None):
        return self.wrong(*self.model(xs, carry))


class NoParameters(torch.nn.Module):
    def forward(self, xs, carry=None):
        return xs, carry


def failing_apply(t: Any, wrong: Callable[..., Any]) -> dict[str, Any]:
    """The target's model with its output passed through `wrong(preds, carry)`."""
    if isinstance(t, JaxTrainer):
        def apply(params, carry, xs):
            carry, preds = t.model.apply(params, carry, xs)
            preds, carry = wrong(preds, carry)
            return carry, preds
        return {"apply_fn": apply}
    return {"model": Failing(t.model, wrong), "carry": t.array(lstm_carry(1, BATCH, HIDDEN))}


def float32_model(t: Any) -> dict[str, Any]:
    if isinstance(t, JaxTrainer):
        params = {name: p.astype(jnp.float32) for name, p in t.params.items()}
        return {"params": params, "opt_state": JAX_OPTIMIZER.init(params)}
    model = torch_lstm().float()
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2),
            "carry": t.array(lstm_carry(1, BATCH, HIDDEN))}


def mixed_model(t: Any) -> dict[str, Any]:
    if isinstance(t, JaxTrainer):
        params = {**t.params, "head.bias": t.params["head.bias"].astype(jnp.float32)}
        return {"params": params, "opt_state": JAX_OPTIMIZER.init(params)}
    model = torch_lstm()
    model.head.float()
    return {"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)}


def other_optimizer(t: Any) -> dict[str, Any]:
    """An optimizer (state) made for another model's parameters."""
    if isinstance(t, JaxTrainer):
        return {"opt_state": JAX_OPTIMIZER.init({"weight": jnp.zeros((2, 2))})}
    other = torch.nn.Linear(2, 2).double()
    return {"optimizer": torch.optim.Adam(other.parameters(), lr=1e-2)}


def one_of(value: Any) -> Callable[[Any], Any]:
    """An override whose value is `value` for JAX and its torch tensor for torch."""
    return lambda t: t.array(value)


# In the first update's steps: torch trains in place, so a later update's error would come
# after earlier updates were applied, as documented.
NAN_XS = np.where(np.arange(STEPS)[:, None, None] == 1, np.nan, XS)
NONFINITE = ("update 0 of this call (counting from 0) has a non-finite loss (nan)",
             NonFiniteLossError)
JAX_PARAMS = list(jax_models.lstm(INPUT, HIDDEN, OUTPUT).param_shapes())
TORCH_KEYS = list(torch_lstm().state_dict())


def truncated(workdir: Path, name: str) -> Path:
    """A copy of a saved checkpoint with its largest file cut short."""
    source = {"jax": JaxCheckpoint, "torch": TorchCheckpoint}[name](workdir)
    copy_to = workdir / f"truncated-{name}-{len(list(workdir.iterdir()))}"
    if name == "torch":
        copy_to.write_bytes(source.path.read_bytes()[:-100])
        return copy_to
    shutil.copytree(source.directory, copy_to)
    largest = max((f for f in copy_to.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return copy_to


MATRIX = [
    # Truncation lengths.
    *[both(f"k1={value!r}", lambda t, v=value: {"k1": v},
           f"k1 must be a positive int, got {value!r}") for value in BAD_K],
    *[both(f"k2={value!r}", lambda t, v=value: {"k1": 1, "k2": v},
           f"k2 must be a positive int, got {value!r}") for value in BAD_K if value is not None],
    both("k2<k1", lambda t: {"k1": 3, "k2": 2}, "k2 must be >= k1 (k1=3), got k2=2"),
    # Choices.
    *[both(f"{name}={value!r}", lambda t, n=name, v=value: {n: v},
           f"{name} must be one of {choices}, got {value!r}")
      for name, choices, values in (("reduction", ("mean", "sum"), ["avg", None, "Mean"]),
                                    ("tail", ("partial", "drop"), ["keep", None]),
                                    ("on_nonfinite", ("raise", "skip"), ["ignore", True]))
      for value in values],
    # Sequences.
    both("ys-other-T", lambda t: {"ys": t.array(YS[:4])},
         "ys must have the [T, B] of xs, expected (5, 2), got (4, 2)"),
    both("ys-other-B", lambda t: {"ys": t.array(np.zeros((STEPS, 3, OUTPUT)))},
         "ys must have the [T, B] of xs, expected (5, 2), got (5, 3)"),
    both("xs-not-time-major", lambda t: {"xs": t.array(np.zeros(STEPS))},
         "xs and ys must be time-major [T, B, ...]; got xs of shape (5,) and ys of shape "
         "(5, 2, 1)"),
    both("empty-T", lambda t: {"xs": t.array(XS[:0]), "ys": t.array(YS[:0])},
         "xs must hold at least one step of one sequence, got shape (0, 2, 2)"),
    both("empty-B", lambda t: {"xs": t.array(XS[:, :0]), "ys": t.array(YS[:, :0])},
         "xs must hold at least one step of one sequence, got shape (5, 0, 2)"),
    both("xs-None", lambda t: {"xs": None},
         "xs must hold at least one [T, B, ...] array, got none"),
    both("ys-empty-dict", lambda t: {"ys": {}},
         "ys must hold at least one [T, B, ...] array, got none"),
    both("xs-str", lambda t: {"xs": "abc"},
         "xs must be arrays (numpy or the framework's) in tuples, lists or dicts; got str at xs"),
    both("ys-leaf-str", lambda t: {"ys": {"y": t.array(YS), "note": "x"}},
         "ys must be arrays (numpy or the framework's) in tuples, lists or dicts; got str at "
         "ys['note']"),
    both("xs-leaves-other-T", lambda t: {"xs": {"a": t.array(XS), "b": t.array(XS[:4])}},
         "xs['b'] must have the [T, B] of xs['a'], expected (5, 2), got (4, 2)"),
    both("ys-leaves-other-B", lambda t: {"ys": (t.array(YS), t.array(YS[:, :1]))},
         "ys[1] must have the [T, B] of xs, expected (5, 2), got (5, 1)"),
    both("xs-leaf-not-time-major", lambda t: {"xs": (t.array(XS), t.array(np.zeros(STEPS)))},
         "xs and ys must be time-major [T, B, ...]; got xs[0] of shape (5, 2, 2) and xs[1] of "
         "shape (5,) and ys of shape (5, 2, 1)"),
    both("xs-wrong-features", lambda t: {"xs": t.array(np.zeros((STEPS, BATCH, 4)))},
         model_fails("", xs="(5, 2, 4)"), argument="xs"),
    both("xs-NaN", lambda t: {"xs": t.array(NAN_XS)}, NONFINITE[0], NONFINITE[1],
         argument="loss"),
    both("ys-NaN", lambda t: {"ys": t.array(np.where(np.arange(STEPS)[:, None, None] == 0,
                                                     np.nan, YS))},
         NONFINITE[0], NONFINITE[1], argument="loss"),
    # Targets the loss cannot read.
    both("ys-other-features", lambda t: {"ys": t.array(np.zeros((STEPS, BATCH, 3)))},
         loss_fails("float64[5, 2, 3]", lambda steps: (
             f"mse: preds and targets must have one shape, got ({steps}, 2, 1) and "
             f"({steps}, 2, 3)"))),
    both("ys-float-class-ids", lambda t: {"ys": t.array(np.zeros((STEPS, BATCH))),
                                          "loss_fn": t.losses.cross_entropy},
         "ys must be integer class ids for a loss_fn that takes class ids "
         "(loss_fn.class_axis), got float64"),
    # loss_fn itself.
    both("loss_fn-not-callable", lambda t: {"loss_fn": 3},
         "loss_fn must be callable (preds, targets) -> losses[t, b], got int"),
    both("loss_fn-[t,b,O]-sum", lambda t: {"loss_fn": lambda p, y: (p - y) ** 2,
                                           "reduction": "sum"},
         losses_message(lambda steps: f"({steps}, 2, 1)")),
    both("loss_fn-scalar", lambda t: {"loss_fn": lambda p, y: ((p - y) ** 2).sum()},
         losses_message(lambda steps: "()")),
    both("loss_fn-[t]", lambda t: {"loss_fn": lambda p, y: ((p - y) ** 2).sum((1, 2))},
         losses_message(lambda steps: f"({steps},)")),
    both("loss_fn-float", lambda t: {"loss_fn": lambda p, y: 1.0},
         (losses_message(lambda steps: "")[0] + "()", losses_message(lambda s: "float")[1])),
    both("loss_fn-raises", lambda t: {"loss_fn": lambda p, y: 1 / 0},
         loss_fails("float64[5, 2, 1]", lambda steps: "division by zero")),
    # The carry.
    both("carry-wrong-B", lambda t: {"carry": t.array(lstm_carry(1, 3, HIDDEN))},
         carry_message("('float64[1, 3, 3]', 'float64[1, 3, 3]')")),
    both("carry-wrong-H", lambda t: {"carry": t.array(lstm_carry(1, BATCH, 4))},
         carry_message("('float64[1, 2, 4]', 'float64[1, 2, 4]')")),
    both("carry-wrong-layers", lambda t: {"carry": t.array(lstm_carry(2, BATCH, HIDDEN))},
         carry_message("('float64[2, 2, 3]', 'float64[2, 2, 3]')")),
    both("carry-lstm-bare-tensor", lambda t: {"carry": t.array(np.zeros((1, BATCH, HIDDEN)))},
         carry_message("float64[1, 2, 3]")),
    both("carry-list", lambda t: {"carry": list(t.array(lstm_carry(1, BATCH, HIDDEN)))},
         carry_message("['float64[1, 2, 3]', 'float64[1, 2, 3]']")),
    both("carry-dict", lambda t: {"carry": dict(zip("ch", t.array(lstm_carry(1, BATCH, HIDDEN)),
                                                    strict=True))},
         carry_message("{'c': 'float64[1, 2, 3]', 'h': 'float64[1, 2, 3]'}")),
    both("carry-str", lambda t: {"carry": "zeros"},
         "carry must be arrays (numpy or the framework's) in tuples, lists or dicts, or None "
         "for the model's zero carry; got str at carry"),
    both("carry-leaf-int", lambda t: {"carry": (t.array(np.zeros((1, BATCH, HIDDEN))), 0)},
         "carry must be arrays (numpy or the framework's) in tuples, lists or dicts, or None "
         "for the model's zero carry; got int at carry[1]"),
    both("carry-wrong-dtype",
         lambda t: {"carry": t.array(tuple(np.float32(c) for c in lstm_carry(1, BATCH, HIDDEN)))},
         "params, carry and xs must share one floating-point dtype; got params float64, "
         "carry float32, xs float64", argument="carry"),
    both("carry-NaN", lambda t: {"carry": t.array(tuple(np.full((1, BATCH, HIDDEN), np.nan)
                                                        for _ in range(2)))},
         "update 0 of this call (counting from 0) has a non-finite loss (nan)",
         NonFiniteLossError, argument="loss"),
    # Dtypes.
    both("xs-float32", lambda t: {"xs": t.array(np.float32(XS))},
         "params, carry and xs must share one floating-point dtype; got params float64, "
         "carry float64, xs float32", argument="xs"),
    both("params-float32", float32_model,
         "params, carry and xs must share one floating-point dtype; got params float32, "
         "carry float64, xs float64"),
    both("params-mixed-dtypes", mixed_model,
         "params, carry and xs must share one floating-point dtype; got params "
         "float32/float64, carry float64, xs float64"),
    # Resets.
    both("resets-wrong-shape", lambda t: {"resets": t.array(np.zeros((STEPS, 3), bool))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}bool of shape (5, 3)"),
    both("resets-float", lambda t: {"resets": t.array(np.zeros((STEPS, BATCH)))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}float64 of shape (5, 2)"),
    both("resets-int", lambda t: {"resets": t.array(np.zeros((STEPS, BATCH), np.int64))},
         "resets must be bool of shape [T, B] = (5, 2), got {t}int64 of shape (5, 2)"),
    both("resets-list-wrong-T", lambda t: {"resets": [[False, False]] * 4},
         "resets must be bool of shape [T, B] = (5, 2), got {t}bool of shape (4, 2)"),
    both("resets-str", lambda t: {"resets": "none"},
         "resets must be arrays (numpy or the framework's) in tuples, lists or dicts; got str "
         "at resets"),
    # Masks: [T, B], bool or float weights that are finite and >= 0.
    both("mask-wrong-shape", lambda t: {"mask": t.array(np.ones((STEPS, BATCH, 1)))},
         "mask must be bool or float weights of shape [T, B] = (5, 2), got {t}float64 of "
         "shape (5, 2, 1)"),
    both("mask-int", lambda t: {"mask": t.array(np.ones((STEPS, BATCH), np.int64))},
         "mask must be bool or float weights of shape [T, B] = (5, 2), got {t}int64 of shape "
         "(5, 2)"),
    both("mask-negative", lambda t: {"mask": t.array(np.where(np.eye(STEPS, BATCH) > 0, -1.0,
                                                              1.0))},
         "mask must hold finite weights >= 0, got -1.0 at [t, b] = (0, 0)"),
    both("mask-NaN", lambda t: {"mask": t.array(np.where(np.arange(STEPS)[:, None] == 3,
                                                         np.nan, np.ones((STEPS, BATCH))))},
         "mask must hold finite weights >= 0, got nan at [t, b] = (3, 0)"),
    both("mask-inf", lambda t: {"mask": t.array(np.full((STEPS, BATCH), np.inf))},
         "mask must hold finite weights >= 0, got inf at [t, b] = (0, 0)"),
    both("mask-str", lambda t: {"mask": "padding"},
         "mask must be arrays (numpy or the framework's) in tuples, lists or dicts; got str at "
         "mask"),
    # The overlap a k2 > k1 stream carries.
    both("overlap-too-long", lambda t: {"k2": 3, "carry": overlap(t, XS[:2])},
         "carry: an OverlapCarry holds at most k2 - k1 = 1 steps, got 2 (was it made with "
         "other k1, k2?)"),
    both("overlap-with-k1=k2", lambda t: {"carry": overlap(t, XS[:1])},
         "carry: an OverlapCarry holds at most k2 - k1 = 0 steps, got 1"),
    both("overlap-wrong-B", lambda t: {"k2": 4, "carry": overlap(t, np.zeros((1, 3, INPUT)))},
         "carry: the OverlapCarry's xs must have shape [1, 2, 2] (n steps, then the batch and "
         "features of xs), got [1, 3, 2]"),
    both("overlap-wrong-dtype", lambda t: {"k2": 4, "carry": overlap(t, np.float32(XS[:1]))},
         "carry: the OverlapCarry's xs must have the dtype of xs, {t}float64, got {t}float32"),
    both("overlap-resets-wrong-B",
         lambda t: {"k2": 4, "resets": t.array(np.zeros((STEPS, BATCH), bool)),
                    "carry": overlap(t, XS[:1], np.zeros((1, 3), bool))},
         "carry: the OverlapCarry's resets must be bool of shape [1, 2], got {t}bool of shape "
         "[1, 3]"),
    both("overlap-resets-float",
         lambda t: {"k2": 4, "carry": overlap(t, XS[:1], np.zeros((1, BATCH)))},
         "carry: the OverlapCarry's resets must be bool of shape [1, 2], got {t}float64 of "
         "shape [1, 2]"),
    both("overlap-state-wrong-H",
         lambda t: {"k2": 4, "carry": overlap(t, XS[:1], state=lstm_carry(1, BATCH, 4))},
         carry_message("('float64[1, 2, 4]', 'float64[1, 2, 4]')")),
    # The model, the optimizer and what they return.
    each("model-not-a-model", argument="",
         jax=(lambda t: {"apply_fn": 3},
              "apply_fn must be callable (params, carry, xs) -> (carry, preds), got int"),
         torch=(lambda t: {"model": 3}, "model must be a torch.nn.Module, got int")),
    both("model-raises", lambda t: failing_apply(t, lambda preds, carry: 1 / 0),
         model_fails("division by zero"), argument="model"),
    both("model-returns-None", lambda t: failing_apply(t, lambda preds, carry: None),
         model_fails("cannot unpack non-iterable NoneType object"), argument="model"),
    both("model-changes-the-carry",
         lambda t: failing_apply(t, lambda preds, carry: (preds, carry[0])),
         "carry must keep its structure and shapes through the model: got ('float64[1, 2, 3]', "
         "'float64[1, 2, 3]'), the model returns float64[1, 2, 3]"),
    each("optimizer-of-another-kind",
         jax=(lambda t: {"optimizer": "adam"},
              "optimizer must be an optax.GradientTransformation, got str"),
         torch=(lambda t: {"optimizer": "adam"},
                "optimizer must be a torch.optim.Optimizer, got str")),
    each("optimizer-of-other-params",
         jax=(other_optimizer, "opt_state must have the structure and shapes of "
                               "optimizer.init(params): expected (ScaleByAdamState(count="),
         torch=(other_optimizer, "optimizer must update model.parameters(), but 2 of the "
                                 "tensors it updates are not the model's")),
    # One trainer's own arguments.
    each("params-missing-key", jax=(lambda t: {"params": {k: v for k, v in t.params.items()
                                                          if k != "head.bias"}},
                                    f"params must have the keys {JAX_PARAMS}; missing "
                                    "['head.bias'], unexpected []")),
    each("params-unexpected-key", jax=(lambda t: {"params": {**t.params, "rnn.weight_ih_l1":
                                                             jnp.zeros((12, 3))}},
                                       "missing [], unexpected ['rnn.weight_ih_l1']")),
    each("params-wrong-shape", jax=(lambda t: {"params": {**t.params, "head.weight":
                                                          jnp.zeros((HIDDEN, OUTPUT))}},
                                    "params['head.weight'] must have shape (1, 3), got (3, 1)")),
    each("params-gru-sized", jax=(lambda t: {"params": {**t.params, "rnn.bias_hh_l0":
                                                        jnp.zeros(3 * HIDDEN)}},
                                  "params['rnn.bias_hh_l0'] must have shape (12,), got (9,)")),
    each("params-not-a-dict", jax=(lambda t: {"params": list(t.params.values())},
                                   "params must be a dict of arrays, got list")),
    each("updates_done=-1", jax=(lambda t: {"updates_done": -1},
                                 "updates_done must be an int >= 0, got -1")),
    each("key-str", jax=(lambda t: {"key": "seed"}, "key must be a PRNG key "
                                                     "(jax.random.key(seed) or "
                                                     "jax.random.PRNGKey(seed)) or None, got str")),
    each("model-without-parameters",
         torch=(lambda t: {"model": NoParameters()},
                "model must have parameters to train, got a NoParameters with none")),
    each("on_update-not-callable",
         torch=(lambda t: {"on_update": 3},
                "on_update must be callable f(update_index, loss, model) or None, got int")),
    *[each(f"clip_grad_norm={value!r}",
           torch=(lambda t, v=value: {"clip_grad_norm": v},
                  f"clip_grad_norm must be a finite float > 0 (the max norm) or None, got "
                  f"{value!r}")) for value in (0.0, -1, float("inf"), "1")],
    each("undo_nonfinite_steps=1",
         torch=(lambda t: {"undo_nonfinite_steps": 1},
                "undo_nonfinite_steps must be True or False, got 1")),
    # Weights across the boundary (load_jax).
    each("load-missing-key", load_jax=(lambda t: {"params": {k: v for k, v in t.params.items()
                                                             if k != "rnn.weight_hh_l0"}},
                                       f"params must have the keys {TORCH_KEYS}; missing "
                                       "['rnn.weight_hh_l0'], unexpected []")),
    each("load-unexpected-key", load_jax=(lambda t: {"params": {**t.params,
                                                                "head.scale": np.ones(1)}},
                                          "missing [], unexpected ['head.scale']")),
    each("load-transposed", load_jax=(lambda t: {"params": {
        **t.params, "rnn.weight_ih_l0": np.zeros((INPUT, 4 * HIDDEN))}},
        "params['rnn.weight_ih_l0'] must have shape (12, 2), got (2, 12)")),
    each("load-extra-axis", load_jax=(lambda t: {"params": {**t.params,
                                                            "head.bias": np.zeros((1, 1))}},
                                      "params['head.bias'] must have shape (1,), got (1, 1)")),
    each("load-not-a-dict", load_jax=(lambda t: {"params": list(t.params.values())},
                                      "params must be a dict of arrays keyed as the model's "
                                      "state_dict(), got list")),
    each("load-not-a-model", load_jax=(lambda t: {"model": t.params},
                                       "model must be a torch.nn.Module, got dict")),
    # The parity check's own arguments.
    *[each(f"compare-{name}", compare=(lambda t, o=overrides: o, message))
      for name, overrides, message in (
          ("k1=0", {"k1": 0}, "k1 must be a positive int, got 0"),
          ("dtype", {"dtype": "float16"},
           "dtype must be one of ('float32', 'float64'), got 'float16'"),
          ("rtol", {"rtol": -1.0}, "rtol must be a positive finite number, got -1.0"),
          ("loss_fn", {"loss_fn": "l1"}, "loss_fn must be one of ('mse', 'cross_entropy')"),
          ("optimizer", {"optimizer": "lbfgs"}, "optimizer must be one of ('sgd', "),
          ("torch_model", {"torch_model": 3}, "torch_model must be a torch.nn.Module, got int"),
          ("xs-not-time-major", {"xs": np.zeros(STEPS)},
           "xs and ys must be time-major [T, B, ...]; got xs of shape (5,) and ys of shape "
           "(5, 2, 1)"),
          ("xs-str", {"xs": np.array([["a"]])}, "xs must be floats or integer token ids, got "
                                                "<U1"),
          ("ys-other-T", {"ys": YS[:4]},
           "ys must have the [T, B] of xs, expected (5, 2), got (4, 2)"),
          ("resets-float", {"resets": np.zeros((STEPS, BATCH))},
           "resets must be bool of shape [T, B] = (5, 2), got float64 of shape (5, 2)"),
      )],
    # Checkpoints: missing, damaged, or not fitting what they are restored into.
    each("checkpoint-missing", error=FileNotFoundError, argument="checkpoint",
         jax_checkpoint=(lambda t: {"directory": t.directory.parent / "none"},
                         "no checkpoint to restore"),
         torch_checkpoint=(lambda t: {"path": t.path.parent / "none.pt"},
                           "no checkpoint to restore")),
    each("checkpoint-truncated", error=(JaxCheckpointError, TorchCheckpointError),
         argument="checkpoint",
         jax_checkpoint=(lambda t: {"directory": truncated(t.directory.parent, "jax")}, ""),
         torch_checkpoint=(lambda t: {"path": truncated(t.path.parent, "torch")},
                           "the file is truncated")),
    each("checkpoint-other-model",
         jax_checkpoint=(lambda t: {"like": t.like._replace(params={
             **t.like.params, "head.weight": jnp.zeros((2, HIDDEN))})},
             "like.params['head.weight']: "),
         torch_checkpoint=(lambda t: {"model": torch_models.LSTMModel(INPUT, HIDDEN, 2).double()},
                           "model does not fit ")),
    each("checkpoint-other-optimizer",
         jax_checkpoint=(lambda t: {"like": t.like._replace(
             opt_state=optax.sgd(0.1).init(t.like.params))},
             "like.opt_state does not have the structure of opt_state"),
         torch_checkpoint=(lambda t: {"optimizer": torch.optim.SGD(t.model.parameters(),
                                                                   lr=0.1)},
                           "optimizer does not fit ")),
    each("checkpoint-like-not-a-state",
         jax_checkpoint=(lambda t: {"like": t.like.params},
                         "like must be a tbptt_jax.checkpoint.TrainState, got dict"),
         torch_checkpoint=(lambda t: {"model": "lstm"},
                           "model must be a torch.nn.Module, got str")),
]


class Outcome(NamedTuple):
    verdict: str  # "clear", "unclear", "silent" or "mutated"
    error: BaseException | None


def _snapshot(value: Any) -> list[Any]:
    """Copies of the caller's mutable arrays and the bytes of the files `value` names."""
    if isinstance(value, dict):
        return [part for key in sorted(value, key=str) for part in _snapshot(value[key])]
    if isinstance(value, (tuple, list)):
        return [part for item in value for part in _snapshot(item)]
    if isinstance(value, np.ndarray):
        return [value.copy()]
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, Path) and value.exists():
        files = sorted(value.rglob("*")) if value.is_dir() else [value]
        return [(str(f), f.read_bytes()) for f in files if f.is_file()]
    return []


def _same(before: list[Any], after: list[Any]) -> bool:
    if len(before) != len(after):
        return False
    for old, new in zip(before, after, strict=True):
        if isinstance(old, torch.Tensor):
            old, new = old.numpy(), new.numpy()
        if isinstance(old, np.ndarray):
            if old.shape != new.shape or not np.array_equal(
                    old, new, equal_nan=old.dtype.kind in "fc"):
                return False
        elif old != new:
            return False
    return True


def run(target: str, bad: Bad, workdir: Path) -> Outcome:
    """Runs one kind of bad input against one target and judges what happened: "mutated"
    if anything it was given changed (parameters, optimizer state, the caller's arrays,
    files), else "silent" if nothing was raised, else "clear" if the error is of the kind's
    type and names the argument, else "unclear"."""
    subject = TARGETS[target](workdir)
    overrides = bad.overrides[target](subject)
    watched = [overrides, XS, YS, getattr(subject, "params", None),
               getattr(subject, "path", None), getattr(subject, "directory", None)]
    before = _snapshot(watched)
    error = None
    try:
        subject.call(**overrides)
    except Exception as raised:  # judged below, whatever it is
        error = raised
    try:
        subject.assert_unchanged()
        changed = not _same(before, _snapshot(watched))
    except AssertionError:
        changed = True
    message = bad.messages[target].replace("{t}", subject.dtype_prefix)
    if changed:
        return Outcome("mutated", error)
    if error is None:
        return Outcome("silent", None)
    if not isinstance(error, bad.error) or bad.names(message) not in str(error):
        return Outcome("unclear", error)
    return Outcome("clear", error)


MATRIX_RUNS = [pytest.param(target, bad, id=f"{target}-{bad.name}")
               for bad in MATRIX for target in bad.overrides]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_input")


@pytest.mark.parametrize(("target", "bad"), MATRIX_RUNS)
def test_bad_input_gets_a_clear_error_and_changes_nothing(target, bad, workdir):
    outcome = run(target, bad, workdir)
    message = bad.messages[target].replace("{t}", TARGETS[target].dtype_prefix)
    assert outcome.verdict == "clear", f"{outcome.verdict}: {outcome.error!r}"
    assert message in str(outcome.error)


def test_the_matrix_covers_sixty_kinds_against_both_trainers():
    assert sum({"jax", "torch"} <= set(bad.overrides) for bad in MATRIX) >= 60


def counts(workdir: Path) -> dict[str, int]:
    """The matrix's verdicts, counted (what `python tests/test_bad_input.py` prints)."""
    tally = dict.fromkeys(("clear", "unclear", "silent", "mutated"), 0)
    for bad in MATRIX:
        for target in bad.overrides:
            outcome = run(target, bad, workdir)
            tally[outcome.verdict] += 1
            if outcome.verdict != "clear":
                print(f"{outcome.verdict:8} {target}-{bad.name}: {outcome.error!r}"[:300])
    return tally


def test_load_jax_copies_jax_arrays_into_the_model_dtype_and_to_jax_round_trips():
    model = torch_lstm()
    params = jax_models.lstm(INPUT, HIDDEN, OUTPUT).param_shapes()
    values = {name: jnp.asarray(np.random.default_rng(2).normal(size=shape), jnp.float32)
              for name, shape in params.items()}
    assert tbptt_torch.load_jax(model, values) is model
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float64
        np.testing.assert_array_equal(tensor.numpy(), np.asarray(values[name], np.float64))
    exported = tbptt_torch.to_jax(model)
    assert list(exported) == list(params)
    for name, array in exported.items():
        assert isinstance(array, np.ndarray) and array.dtype == np.float64
        np.testing.assert_array_equal(array, np.asarray(values[name], np.float64))
    # The export is a copy: changing it leaves the model alone.
    exported["head.bias"][...] = 7.0
    assert model.state_dict()["head.bias"].item() != 7.0


@pytest.mark.parametrize("framework", list(TRAINERS))
def test_numpy_integers_are_accepted_for_k1_and_k2(framework, tmp_path):
    """k1 and k2 read from numpy or a config are ints too; they train as plain ints do."""
    plain = TRAINERS[framework](tmp_path).call(k1=2, k2=3)
    numpy_ints = TRAINERS[framework](tmp_path).call(k1=np.int64(2), k2=np.int32(3))
    losses = (lambda out: np.asarray(out[3]["loss"])) if framework == "jax" else (
        lambda out: out[1].numpy())
    np.testing.assert_array_equal(losses(numpy_ints), losses(plain))


@pytest.mark.parametrize("framework", list(TRAINERS))
def test_numpy_and_list_data_train_as_arrays_do(framework, tmp_path):
    """Both trainers take xs, ys, resets and mask as numpy arrays or nested lists too."""
    resets = np.zeros((STEPS, BATCH), bool)
    resets[3, 1] = True
    mask = np.ones((STEPS, BATCH))
    mask[4, 0] = 0.0
    losses = (lambda out: np.asarray(out[3]["loss"])) if framework == "jax" else (
        lambda out: out[1].numpy())
    trainer = TRAINERS[framework](tmp_path)
    native = losses(trainer.call(xs=trainer.array(XS), ys=trainer.array(YS),
                                 resets=trainer.array(resets), mask=trainer.array(mask)))
    plain = losses(TRAINERS[framework](tmp_path).call(xs=XS, ys=YS.tolist(), resets=resets,
                                              mask=mask.tolist()))
    np.testing.assert_array_equal(plain, native)


@pytest.mark.parametrize("framework", list(TRAINERS))
def test_a_numpy_carry_trains_as_the_framework_arrays_do(framework, tmp_path):
    """torch takes a numpy carry as JAX does (it used to reject it, or stack a list)."""
    losses = (lambda out: np.asarray(out[3]["loss"])) if framework == "jax" else (
        lambda out: out[1].numpy())
    carry = tuple(np.random.default_rng(3).normal(size=(2, 1, BATCH, HIDDEN)))
    trainer = TRAINERS[framework](tmp_path)
    native = losses(trainer.call(carry=trainer.array(carry)))
    plain = losses(TRAINERS[framework](tmp_path).call(carry=carry))
    np.testing.assert_array_equal(plain, native)


def test_a_none_carry_is_the_zero_carry_in_both_frameworks(tmp_path):
    """carry=None starts from the model's zero carry, in JAX as in torch."""
    trainer = JaxTrainer(tmp_path)
    explicit = trainer.call()
    implicit = trainer.call(carry=None)
    np.testing.assert_array_equal(np.asarray(implicit[3]["loss"]), np.asarray(explicit[3]["loss"]))


def test_jax_none_carry_needs_a_model_that_knows_its_zero_carry(tmp_path):
    trainer = JaxTrainer(tmp_path)
    with pytest.raises(ValueError, match=re.escape(
            "carry: None means the model's zero carry, but apply_fn is not the apply of a "
            "model with initial_carry(batch_size, dtype); pass the carry explicitly")):
        trainer.call(carry=None, apply_fn=lambda params, carry, xs: trainer.model.apply(
            params, carry, xs))
    trainer.assert_unchanged()


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)  # as conftest.py sets it for the tests
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        tally = counts(Path(directory))
    print(" / ".join(tally) + ": " + " / ".join(str(n) for n in tally.values()))
