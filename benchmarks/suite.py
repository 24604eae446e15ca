"""The benchmark suite: JAX's TBPTT trainer against four PyTorch ways of doing the same work.

A *benchmark* is one configuration (`CONFIGS`: S, M, M-k2, L, char-rnn, word-LM,
word-LM-tokens, recipe, recipe-k2) with one
cell (Elman, GRU, LSTM). For it, torch draws the initial weights once; every
implementation starts from a copy of them (JAX's through `tbptt_torch.to_jax`) and trains
on the same float32 data with Adam (lr 1e-3), TBPTT(k1, k2), mean reduction, partial tail.
One *call* trains on the whole T-step sequence: all its updates.

- `jax`: one call of `tbptt_jax.tbptt_train_step` (one compiled program), timed to
  `block_until_ready`;
- `jax-dp`: the same call with the batch split over every device of the platform
  (`tbptt_jax.sharding`): on a CPU, `tbptt bench` makes each physical core an XLA CPU
  device, so the sequences run data parallel, one core each, instead of every small
  per-step kernel being split over the cores; skipped with one device, or where the
  batch does not divide (S);
- `torch-hand`: the per-step hand loop of SPEC §0 (mean reduction, partial tail);
- `torch-fused`: one call of `tbptt_torch.tbptt_train_step` (fused nn.RNN/GRU/LSTM per window);
- `torch-ignite`: Ignite's `create_supervised_tbptt_trainer`, one `Engine.run` over the batch;
- `torch-compile`: `tbptt_torch.tbptt_train_step` on `torch.compile(model)`; failures and
  graph breaks are recorded, not hidden;
- `torch-cudnn` (CUDA only): a bare loop of nn.RNN/GRU/LSTM calls over the windows, with no
  trainer around it: the cuDNN baseline.

Protocol: every implementation's first call is timed on its own (compile time for JAX and
torch.compile); then `warmup` untimed calls each; then `repeats` timed calls each,
interleaved and rotated so that drift hits every implementation alike; medians are
reported. The first warm-up call of each also measures its peak memory (with no warm-up,
none is reported). The first call's per-update losses
of every implementation are compared with JAX's (`loss_max_rel_diff`), so a table row is
only as good as the evidence that it did the same work.

`run_suite` returns the results dict (schema `SCHEMA`) that `write_results` saves and
`benchmarks.report` renders; `main(argv)` is the command line (`python -m benchmarks.suite`,
or `tbptt bench` from a checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import tbptt_jax
import tbptt_torch
from examples.word_lm.jax_lm import WordLM as JaxWordLM
from examples.word_lm.torch_lm import WordLM
from tbptt.schedule import plan
from tbptt_jax import _native, sharding

SCHEMA = "tbptt-bench/1"
LEARNING_RATE = 1e-3
ROOT = Path(__file__).resolve().parent
RESULTS_DIR = ROOT / "results"
REFERENCE = "jax"  # the implementation every ratio and loss comparison is taken against
IMPLEMENTATIONS = ("jax", "jax-dp", "torch-hand", "torch-fused", "torch-ignite", "torch-compile",
                   "torch-cudnn")
CELLS = ("elman", "gru", "lstm")
GATES = {"elman": 1, "gru": 3, "lstm": 4}


@dataclass(frozen=True)
class Config:
    """One benchmark configuration.

    `task="regression"`: real targets `[T, B, output_size]`, mean squared error.
    `task="classification"`: next-token labels `[T, B]` over `output_size` classes,
    cross-entropy; the input is the one-hot token when `input_size == output_size`, else
    a fixed (untrained) `input_size`-wide embedding of it.
    `task="tokens"`: the same labels, the input the token ids `[T, B]` themselves, and the
    model examples/word_lm's (word_language_model's `RNNModel` and its JAX port): a
    trained `input_size`-wide embedding lookup, the recurrent stack, an `output_size`-word
    decoder; dropout off.
    """

    name: str
    input_size: int
    hidden_size: int
    output_size: int
    num_layers: int
    batch: int
    steps: int  # T of one call
    k1: int
    k2: int
    task: str
    about: str


CONFIGS: dict[str, Config] = {config.name: config for config in (
    Config("S", 1, 16, 1, 1, 1, 2000, 10, 10, "regression",
           "latency: one tiny sequence, 200 updates"),
    Config("M", 16, 128, 16, 1, 32, 1000, 50, 50, "regression", "medium"),
    Config("M-k2", 16, 128, 16, 1, 32, 1000, 50, 100, "regression",
           "M with k2 = 2*k1: every window after the first recomputes 50 steps of overlap"),
    Config("L", 64, 512, 64, 1, 32, 1000, 50, 50, "regression", "compute-bound"),
    Config("char-rnn", 65, 128, 65, 2, 50, 500, 50, 50, "classification",
           "2 layers, one-hot characters of a 65-symbol vocabulary"),
    Config("word-LM", 200, 200, 10000, 2, 20, 350, 35, 35, "classification",
           "2 layers, 200-wide word embeddings in, a 10000-word softmax out"),
    Config("word-LM-tokens", 200, 200, 10000, 2, 20, 350, 35, 35, "tokens",
           "word-LM as word_language_model runs it: token ids in, a trained embedding"),
    Config("recipe", 4, 64, 4, 1, 8, 400, 2, 100, "regression",
           "the forum's TBPTT(k1, k2) recipe: update every 2 steps, backpropagate 100"),
    Config("recipe-k2", 4, 64, 4, 1, 8, 400, 100, 100, "regression",
           "the recipe's model and data with k1 = k2 = 100: its compile time's yardstick"),
)}


def default_config(name: str, steps: int | None = None) -> Config:
    """Configuration `name` with T = `steps`, else as the default CPU run has it
    (`CPU_STEPS`, for the tools that run one configuration the suite's way)."""
    return replace(CONFIGS[name], steps=steps or CPU_STEPS.get(name, CONFIGS[name].steps))


def scaled(config: Config, scale: float) -> Config:
    """`config` with T multiplied by `scale`, rounded to a multiple of k1, at least 2*k1."""
    steps = max(2 * config.k1, round(config.steps * scale / config.k1) * config.k1)
    return replace(config, steps=steps)


def updates_of(config: Config) -> int:
    return len(plan(config.steps, config.k1, config.k2).updates)


def flops_per_call(config: Config, cell: str) -> int:
    """Matrix-product FLOPs of one call's training: 3x the forward's (the backward computes
    the input gradient and the weight gradient, each as costly as the forward), over every
    step of every window (the overlap of k2 > k1 is recomputed, so it counts). Per step and
    sequence the forward is `2 * G*H * (I_l + H)` per layer l (G = 1, 3, 4 gates for Elman,
    GRU, LSTM; I_l = I for the first layer, H above) plus `2 * H * O` for the readout.
    Element-wise work (gates, losses, the optimizer) is left out."""
    gates_h = GATES[cell] * config.hidden_size
    per_step = sum(
        2 * gates_h * ((config.input_size if layer == 0 else config.hidden_size)
                       + config.hidden_size)
        for layer in range(config.num_layers))
    per_step += 2 * config.hidden_size * config.output_size
    window_steps = sum(u.window_length for u in plan(config.steps, config.k1, config.k2).updates)
    return 3 * per_step * config.batch * window_steps


# --- the shared starting point of a benchmark -------------------------------------------

TORCH_MODELS = {"elman": tbptt_torch.models.ElmanModel, "gru": tbptt_torch.models.GRUModel,
                "lstm": tbptt_torch.models.LSTMModel}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class Problem:
    """What every implementation of one benchmark starts from."""

    config: Config
    cell: str
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    model: torch.nn.Module  # the initial torch model, weights drawn by torch
    weights: dict[str, np.ndarray]  # the same weights, float32, for JAX
    xs: np.ndarray  # float32 [T, B, I], or int64 token ids [T, B] (task "tokens")
    ys: np.ndarray  # float32 [T, B, O] (regression) or int64 labels [T, B]
    compile_allow_rnn: bool = False  # torch-compile: let dynamo trace nn.RNN/GRU/LSTM


def make_problem(config: Config, cell: str, *, seed: int = 0, device: str = "cpu",
                 dtype: str = "float32", compile_allow_rnn: bool = False) -> Problem:
    torch.manual_seed(seed)
    if config.task == "tokens":
        model = WordLM(cell, config.output_size, config.input_size, config.hidden_size,
                       config.num_layers)
    else:
        model = TORCH_MODELS[cell](config.input_size, config.hidden_size, config.output_size,
                                   config.num_layers)
    weights = tbptt_torch.to_jax(model)
    rng = np.random.default_rng(seed)
    shape = (config.steps, config.batch)
    if config.task == "regression":
        xs = rng.standard_normal((*shape, config.input_size), dtype=np.float32)
        # Recall the input three steps back: a target the recurrence has to carry.
        ys = np.roll(xs, 3, axis=0)[..., :config.output_size].copy()
    else:
        tokens = rng.integers(0, config.output_size, (config.steps + 1, config.batch))
        if config.task == "tokens":
            xs = tokens[:-1]
        elif config.input_size == config.output_size:
            xs = np.eye(config.output_size, dtype=np.float32)[tokens[:-1]]
        else:
            embedding = rng.standard_normal((config.output_size, config.input_size),
                                            dtype=np.float32)
            xs = embedding[tokens[:-1]]
        ys = tokens[1:].astype(np.int64)
    return Problem(config, cell, device, dtype, model, weights, xs, ys, compile_allow_rnn)


# --- the implementations ----------------------------------------------------------------

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _detach(carry: Any) -> Any:
    return tuple(part.detach() for part in carry) if isinstance(carry, tuple) else carry.detach()


class Implementation:
    """One way of training a `Problem`: `call()` trains on the whole sequence once (all
    updates, synchronized); `losses()` gives that call's per-update losses `[U]`."""

    name = ""

    @staticmethod
    def skip_reason(problem: Problem) -> str | None:
        """Why this implementation cannot run `problem`, or None."""
        return None

    def call(self) -> None:
        raise NotImplementedError

    def losses(self) -> np.ndarray:
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """Anything worth recording beside the times (e.g. torch.compile's graph breaks)."""
        return {}


class JaxImplementation(Implementation):
    name = "jax"

    def __init__(self, problem: Problem) -> None:
        config = problem.config
        if config.task == "tokens":
            self.model = JaxWordLM(problem.cell, config.output_size, config.input_size,
                                   config.hidden_size, config.num_layers)
        else:
            factory = getattr(tbptt_jax.models, problem.cell)
            self.model = factory(config.input_size, config.hidden_size, config.output_size,
                                 num_layers=config.num_layers)
        dtype = JAX_DTYPES[problem.dtype]
        self.params = {name: jnp.asarray(value, dtype) for name, value in problem.weights.items()}
        self.optimizer = optax.adam(LEARNING_RATE)
        self.opt_state = self.optimizer.init(self.params)
        self.carry = self.model.initial_carry(config.batch, dtype)
        self.xs = (jnp.asarray(problem.xs, jnp.int32) if config.task == "tokens"
                   else jnp.asarray(problem.xs, dtype))
        if config.task == "regression":
            self.ys, self.loss_fn = jnp.asarray(problem.ys, dtype), tbptt_jax.losses.mse
        else:
            self.ys = jnp.asarray(problem.ys, jnp.int32)
            self.loss_fn = tbptt_jax.losses.cross_entropy
        self.k1, self.k2 = config.k1, config.k2
        self._losses = None

    def call(self) -> None:
        self.params, self.opt_state, _, metrics = tbptt_jax.tbptt_train_step(
            self.params, self.opt_state, self.carry, self.xs, self.ys,
            apply_fn=self.model.apply, loss_fn=self.loss_fn, optimizer=self.optimizer,
            k1=self.k1, k2=self.k2)
        self._losses = jax.block_until_ready(metrics["loss"])
        jax.block_until_ready(self.params)

    def losses(self) -> np.ndarray:
        return np.asarray(self._losses, np.float64)


def platform_devices(device: str) -> list[Any]:
    """JAX's devices of the suite's platform ("cpu" or "cuda")."""
    return jax.devices("cpu" if device == "cpu" else "gpu")


class JaxDataParallel(JaxImplementation):
    """`jax` on a data mesh of every device of the platform: the batch split over them, the
    parameters and optimizer state replicated, the gradient all-reduced (the same update as
    `jax`'s, to float32 rounding)."""

    name = "jax-dp"

    @staticmethod
    def skip_reason(problem: Problem) -> str | None:
        devices = len(platform_devices(problem.device))
        if devices < 2:
            return f"one {problem.device} device: nothing to split the batch over"
        if problem.config.batch % devices:
            return f"batch {problem.config.batch} does not split over {devices} devices"
        return None

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        mesh = sharding.data_mesh(platform_devices(problem.device))
        self.params, self.opt_state, self.carry = sharding.shard_state(
            mesh, self.params, self.opt_state, self.carry)
        self.xs, self.ys, _ = sharding.shard_batch(mesh, self.xs, self.ys)


class _TorchImplementation(Implementation):
    """A fresh copy of the problem's torch model and a fresh Adam, on its device."""

    def __init__(self, problem: Problem) -> None:
        self.device = problem.device
        self.config = problem.config
        dtype = TORCH_DTYPES[problem.dtype]
        self.model = copy.deepcopy(problem.model).to(device=problem.device, dtype=dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LEARNING_RATE)
        self.xs = (torch.from_numpy(problem.xs).to(device=problem.device)
                   if problem.config.task == "tokens"
                   else torch.from_numpy(problem.xs).to(device=problem.device, dtype=dtype))
        if problem.config.task == "regression":
            self.ys = torch.from_numpy(problem.ys).to(device=problem.device, dtype=dtype)
            self.loss_fn = tbptt_torch.losses.mse
        else:
            self.ys = torch.from_numpy(problem.ys).to(device=problem.device)
            self.loss_fn = tbptt_torch.losses.cross_entropy
        self._losses: list[torch.Tensor] = []

    def losses(self) -> np.ndarray:
        return torch.stack([torch.as_tensor(loss) for loss in self._losses]).double().cpu().numpy()


def _k2_reason(problem: Problem) -> str | None:
    if problem.config.k2 != problem.config.k1:
        return "k2 > k1: this loop (as written by users) has no overlap"
    return None


class TorchHand(_TorchImplementation):
    """The per-step loop of SPEC §0, with the mean reduction and partial tail of the others."""

    name = "torch-hand"
    skip_reason = staticmethod(_k2_reason)

    def call(self) -> None:
        model, optimizer, k1 = self.model, self.optimizer, self.config.k1
        steps = self.xs.shape[0]
        carry = model.initial_carry(self.xs.shape[1])
        losses, chunk = [], []
        for t in range(steps):
            pred, carry = model(self.xs[t:t + 1], carry)
            chunk.append(self.loss_fn(pred, self.ys[t:t + 1]))
            if (t + 1) % k1 == 0 or t == steps - 1:
                loss = torch.cat(chunk).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.detach())
                chunk = []
                carry = _detach(carry)
        _sync(self.device)
        self._losses = losses


class TorchFused(_TorchImplementation):
    """`tbptt_torch.tbptt_train_step`: one fused nn.RNN/GRU/LSTM call per window."""

    name = "torch-fused"

    def _model(self) -> torch.nn.Module:
        return self.model

    def call(self) -> None:
        _, losses = tbptt_torch.tbptt_train_step(
            self._model(), self.optimizer, None, self.xs, self.ys, loss_fn=self.loss_fn,
            k1=self.config.k1, k2=self.config.k2)
        _sync(self.device)
        self._losses = list(losses)


class TorchCompile(TorchFused):
    """`tbptt_torch.tbptt_train_step` on `torch.compile(model)`.

    With dynamo's defaults (`allow_rnn=False`) dynamo refuses nn.RNN/GRU/LSTM and skips the
    model's whole forward, which then runs eagerly; `allow_rnn = True` (the hint dynamo
    gives, "experimental") makes it trace the recurrent layer. Which one ran, what dynamo
    refused, its graph breaks and the graphs it compiled are recorded in `notes()`.
    """

    name = "torch-compile"
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.allow_rnn = problem.compile_allow_rnn
        # Each benchmark compiles a new model; earlier ones would fill dynamo's
        # recompile limit for the shared forward and silently fall back to eager.
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._dynamo.config.allow_rnn = self.allow_rnn
        self.compiled = torch.compile(self.model)

    def _model(self) -> torch.nn.Module:
        return self.compiled

    def notes(self) -> dict[str, Any]:
        counters = torch._dynamo.utils.counters
        return {
            "allow_rnn": self.allow_rnn,
            "graph_breaks": int(sum(counters.get("graph_break", {}).values())),
            "graph_break_reasons": sorted({_first_line(reason)
                                           for reason in counters.get("graph_break", {})}),
            "unsupported": sorted({_first_line(reason)
                                   for reason in counters.get("unimplemented", {})}),
            "compiled_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
        }


def _first_line(text: Any) -> str:
    return str(text).strip().splitlines()[0][:200] if str(text).strip() else ""


class TorchIgnite(_TorchImplementation):
    """Ignite's `create_supervised_tbptt_trainer`: one `Engine.run` over the one batch."""

    name = "torch-ignite"

    @staticmethod
    def skip_reason(problem: Problem) -> str | None:
        if _ignite() is None:
            return "pytorch-ignite is not installed"
        return _k2_reason(problem)

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        tbptt_events, create_trainer = _ignite()
        per_term = self.loss_fn

        def loss_fn(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return per_term(preds, targets).mean()

        self.trainer = create_trainer(self.model, self.optimizer, loss_fn,
                                      tbtt_step=self.config.k1, device=self.device)
        self.trainer.add_event_handler(tbptt_events.TIME_ITERATION_COMPLETED,
                                       lambda engine: self._losses.append(engine.state.output))

    def call(self) -> None:
        self._losses = []
        self.trainer.run([(self.xs, self.ys)], max_epochs=1)
        _sync(self.device)


class TorchCudnn(_TorchImplementation):
    """The bare cuDNN baseline: nn.RNN/GRU/LSTM over each window, a loss, a step."""

    name = "torch-cudnn"

    @staticmethod
    def skip_reason(problem: Problem) -> str | None:
        if problem.device != "cuda":
            return "cuDNN needs --device cuda"
        if problem.config.task == "tokens":
            return "the bare loop runs a tbptt_torch.models model's .rnn and .head only"
        return _k2_reason(problem)

    def call(self) -> None:
        model, optimizer, k1 = self.model, self.optimizer, self.config.k1
        carry = model.initial_carry(self.xs.shape[1])
        losses = []
        for start in range(0, self.xs.shape[0], k1):
            hidden, carry = model.rnn(self.xs[start:start + k1], carry)
            loss = self.loss_fn(model.head(hidden), self.ys[start:start + k1]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            carry = _detach(carry)
        _sync(self.device)
        self._losses = losses


IMPLEMENTATION_CLASSES: dict[str, type[Implementation]] = {
    cls.name: cls for cls in (JaxImplementation, JaxDataParallel, TorchHand, TorchFused,
                              TorchIgnite, TorchCompile, TorchCudnn)}


def _ignite() -> tuple[Any, Callable[..., Any]] | None:
    """(Tbptt_Events, create_supervised_tbptt_trainer), or None without Ignite."""
    try:
        with warnings.catch_warnings():
            # Importing Ignite imports torch.distributed.optim, whose torch.jit use warns.
            warnings.simplefilter("ignore", DeprecationWarning)
            from ignite.contrib.engines import Tbptt_Events, create_supervised_tbptt_trainer
    except ImportError:
        return None
    return Tbptt_Events, create_supervised_tbptt_trainer


# --- measuring --------------------------------------------------------------------------

def timed(fn: Callable[[], None]) -> float:
    """Seconds `fn()` took."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _proc_status(field: str) -> int | None:
    """A `VmHWM`/`VmRSS`-like field of /proc/self/status in bytes (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> None:
    """Hands freed heap pages back to the OS, so RSS measures what is live."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _jax_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def peak_memory(implementation: Implementation, device: str) -> dict[str, Any]:
    """Peak memory of one call: the host's peak-RSS growth over the RSS before it (after
    freed heap pages went back to the OS), and on CUDA the device's peak allocation
    (torch's, reset before the call; JAX's allocator cannot be reset, so its peak is the
    process's peak so far)."""
    gc.collect()
    _malloc_trim()
    resettable = _reset_peak_rss()
    before = _proc_status("VmRSS")
    torch_before = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch_before = torch.cuda.memory_allocated()
    implementation.call()
    result: dict[str, Any] = {"host_rss_before_bytes": before, "host_peak_growth_bytes": None}
    peak = _proc_status("VmHWM")
    if resettable and peak is not None and before is not None:
        result["host_peak_growth_bytes"] = peak - before
    if device == "cuda":
        if isinstance(implementation, JaxImplementation):
            result["device_peak_bytes"] = _jax_peak_bytes()
            result["device_peak_is_process_peak"] = True
        else:
            result["device_peak_bytes"] = torch.cuda.max_memory_allocated() - torch_before
    return result


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _max_rel_diff(losses: np.ndarray, reference: np.ndarray) -> float | None:
    if losses.shape != reference.shape:
        return None
    scale = np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(losses - reference) / scale))


def run_benchmark(problem: Problem, implementations: Sequence[str], *, repeats: int,
                  warmup: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times every implementation on `problem` by the protocol of this module's docstring.

    Returns the benchmark's results entry (see `SCHEMA`); an implementation that cannot run
    is `{"status": "skipped", "reason": ...}`, one that raised `{"status": "failed", ...}`.
    """
    config = problem.config
    entries: dict[str, dict[str, Any]] = {}
    runners: dict[str, Implementation] = {}
    for name in implementations:
        cls = IMPLEMENTATION_CLASSES[name]
        reason = cls.skip_reason(problem)
        if reason is not None:
            entries[name] = {"status": "skipped", "reason": reason}
            continue
        try:
            runners[name] = cls(problem)
        except Exception as error:  # a broken implementation is a result, not a crash
            entries[name] = {"status": "failed", "stage": "setup", "error": _error(error)}

    def attempt(name: str, stage: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as error:  # likewise: recorded, and the others run on
            entries[name] = {"status": "failed", "stage": stage, "error": _error(error),
                             **runners[name].notes()}
            del runners[name]
            log(f"    {name} failed ({stage}): {_error(error)[:200]}")
            return None

    for name in list(runners):
        seconds = attempt(name, "first call", lambda name=name: timed(runners[name].call))
        if seconds is not None:
            entries[name] = {"status": "ok", "first_call_s": seconds,
                             "first_losses": runners[name].losses().tolist()}
    # The first warm-up call of each implementation also measures its peak memory.
    for round_ in range(warmup):
        for name in list(runners):
            if round_ == 0:
                memory = attempt(name, "warm-up", lambda name=name: peak_memory(
                    runners[name], problem.device))
                if memory is not None:
                    entries[name]["peak_memory"] = memory
            else:
                attempt(name, "warm-up", runners[name].call)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats):
        order = list(runners)
        shift = repeat % len(order) if order else 0
        for name in order[shift:] + order[:shift]:
            if name in runners:
                seconds = attempt(name, f"repeat {repeat}",
                                  lambda name=name: timed(runners[name].call))
                if seconds is not None:
                    times[name].append(seconds)
    updates = updates_of(config)
    flops = flops_per_call(config, problem.cell)
    reference = entries.get(REFERENCE, {}).get("first_losses")
    for name, runner in runners.items():
        entry = entries[name]
        median = statistics.median(times[name])
        entry.update({
            "times_s": times[name],
            "median_s": median,
            "update_s": median / updates,
            "steps_per_s": config.steps * config.batch / median,
            "compile_s": max(0.0, entry["first_call_s"] - median),
            "gflops": flops / median / 1e9,
            "loss_max_rel_diff": (None if reference is None else
                                  _max_rel_diff(np.asarray(entry["first_losses"]),
                                                np.asarray(reference))),
            **runner.notes(),
        })
    runners.clear()  # frees the models and compiled programs before the next benchmark
    gc.collect()
    return {
        "config": config.name, "cell": problem.cell, "spec": asdict(config),
        "updates": updates, "flops_per_call": flops, "reference": REFERENCE,
        "implementations": {name: entries[name] for name in implementations if name in entries},
    }


def matrix_products(size: int, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """One float32 product of two `size x size` matrices per library (numpy on a CPU only,
    JAX, torch), each a call that returns once the product is done."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    products = {}
    if device == "cpu":
        products["numpy"] = lambda: np.matmul(a, b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    product = jax.jit(jnp.matmul)
    products["jax"] = lambda: product(ja, jb).block_until_ready()
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)

    def torch_product() -> None:
        torch.mm(ta, tb)
        _sync(device)

    products["torch"] = torch_product
    return products


def matmul_rate(size: int, *, device: str = "cpu", repeats: int = 5) -> dict[str, Any]:
    """The float32 matrix-product rate of this machine: the best of `repeats` products of
    two `size x size` matrices in numpy (CPU), JAX and torch, as GFLOP/s."""
    flops = 2 * size ** 3

    def best(fn: Callable[[], None]) -> float:
        fn()
        return flops / min(timed(fn) for _ in range(repeats)) / 1e9

    rates = {name: best(fn) for name, fn in matrix_products(size, device).items()}
    return {"size": size, "dtype": "float32", "gflops": rates, "best_gflops": max(rates.values())}


# --- the machine and the software -------------------------------------------------------

def physical_cores() -> int:
    """Physical cores (not hardware threads): psutil's count, else /proc/cpuinfo's."""
    with contextlib.suppress(ImportError):
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return count
    cores = set()
    with contextlib.suppress(OSError):
        physical = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "physical id":
                physical = value
            elif key == "core id":
                cores.add((physical, value))
    return len(cores) or os.cpu_count() or 1


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(device: str) -> dict[str, Any]:
    """Versions, machine, thread counts and precision settings, for the results file."""
    machine = {
        "platform": platform.platform(), "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_cpu_devices": len(jax.devices("cpu")),
    }
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    versions = {name: _version(name) for name in ("numpy", "jax", "jaxlib", "optax", "torch",
                                                   "pytorch-ignite")}
    versions["python"] = platform.python_version()
    versions["tbptt"] = _git_commit()
    threads = {
        "torch_intra_op": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
        # XLA's CPU client sizes its own pool to the logical cores; it takes no setting.
        "jax_cpu": os.cpu_count(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    precision = {
        "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "torch_cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
    }
    # Asked before any run, so that a first build of the compiled LSTM kernels (once per
    # machine, then cached) is not counted as a JAX compile time.
    kernels = {"jax_lstm": "compiled" if _native.available() else "pure JAX"}
    return {"machine": machine, "versions": versions, "threads": threads,
            "precision": precision, "kernels": kernels}


def prepare_process(device: str, torch_threads: int) -> None:
    """The process as the suite runs: torch on `torch_threads` threads; on a CPU one XLA
    device per physical core (for jax-dp), JAX's default device the first; true float32."""
    torch.set_num_threads(torch_threads)
    if device == "cpu":
        sharding.request_cpu_devices(physical_cores())
    jax.config.update("jax_default_device", platform_devices(device)[0])
    pin_precision()


def pin_precision() -> None:
    """True float32 in both frameworks: no TF32 in torch's matmuls or cuDNN, and XLA's
    highest matmul precision (on CPU these are what happens anyway)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    jax.config.update("jax_default_matmul_precision", "highest")


# --- the whole suite --------------------------------------------------------------------

def run_suite(configs: Sequence[Config], cells: Sequence[str], implementations: Sequence[str],
              *, repeats: int = 5, warmup: int = 1, device: str = "cpu",
              dtype: str = "float32", seed: int = 0, matmul_size: int | None = 2048,
              memory_steps: tuple[int, int] | None = (10_000, 1_000_000),
              full_steps: dict[str, int] | None = None, compile_allow_rnn: bool = False,
              command: Sequence[str] = (),
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs every (config, cell) benchmark, the matrix-product probe and the memory check.

    Args:
      configs: the configurations, T already as it should run.
      cells: of "elman", "gru", "lstm".
      implementations: of `IMPLEMENTATIONS`, in the order to report them.
      repeats, warmup: timed and untimed calls per implementation after the first.
      device, dtype: where and in what precision both frameworks run.
      seed: of the initial weights and the data.
      matmul_size: n of the n x n matrix-product probe; None skips it.
      memory_steps: (short, long) streamed lengths of `benchmarks.memory`; None skips it.
      full_steps: each configuration's unscaled T, recorded beside the T that ran.
      compile_allow_rnn: torch-compile with dynamo's experimental `allow_rnn = True`.
      command: the command line, recorded.

    Returns:
      The results dict (schema `SCHEMA`), ready for `write_results`.
    """
    _check_positive("repeats", repeats)
    _check_positive("warmup", warmup, minimum=0)
    for name in implementations:
        if name not in IMPLEMENTATION_CLASSES:
            raise ValueError(f"implementations: expected names of {IMPLEMENTATIONS}, got {name!r}")
    for cell in cells:
        if cell not in CELLS:
            raise ValueError(f"cells: expected names of {CELLS}, got {cell!r}")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        **environment(device),
        "settings": {"repeats": repeats, "warmup": warmup, "device": device, "dtype": dtype,
                     "seed": seed, "optimizer": f"adam(lr={LEARNING_RATE})",
                     "reduction": "mean", "tail": "partial",
                     "implementations": list(implementations), "cells": list(cells),
                     "compile_allow_rnn": compile_allow_rnn,
                     "full_steps": dict(full_steps or {})},
        "matmul": None,
        "benchmarks": [],
        "memory_scaling": None,
    }
    if matmul_size is not None:
        results["matmul"] = matmul_rate(matmul_size, device=device)
        log(f"matrix product {matmul_size}^3: {results['matmul']['best_gflops']:.1f} GFLOP/s")
    for config in configs:
        for cell in cells:
            log(f"{config.name} {cell}: T={config.steps} B={config.batch} "
                f"k1={config.k1} k2={config.k2}")
            problem = make_problem(config, cell, seed=seed, device=device, dtype=dtype,
                                   compile_allow_rnn=compile_allow_rnn)
            entry = run_benchmark(problem, implementations, repeats=repeats, warmup=warmup,
                                  log=log)
            for name, result in entry["implementations"].items():
                if result["status"] == "ok":
                    log(f"    {name:14s} {result['median_s'] * 1e3:10.2f} ms/call "
                        f"(first {result['first_call_s']:.2f} s)")
            results["benchmarks"].append(entry)
    if memory_steps is not None:
        from benchmarks import memory

        results["memory_scaling"] = memory.run(steps=memory_steps, device=device,
                                               torch_threads=torch.get_num_threads(), log=log)
    results["wall_s"] = time.perf_counter() - started
    return results


def write_results(results: dict[str, Any], out_dir: Path, name: str) -> Path:
    """Writes `<out_dir>/<name>.json` and returns its path."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


# The default run on a CPU (no --scale, --steps or --quick) shortens L and word-LM and
# streams the memory check over 10^5 steps, so that the whole suite takes 5-20 minutes
# on two idle cores; `--steps L=1000 word-LM=350 --memory-steps 10000 1000000`
# runs the full figures.
CPU_STEPS = {"L": 500, "word-LM": 175, "word-LM-tokens": 175}
CPU_MEMORY_STEPS = (10_000, 100_000)


def _check_positive(name: str, value: Any, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _parse_steps(items: Sequence[str]) -> dict[str, int]:
    steps = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in CONFIGS or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--steps: expected CONFIG=T with CONFIG of {tuple(CONFIGS)} and T "
                             f"a positive int, got {item!r}")
        steps[name] = int(value)
    return steps


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """`run_suite`'s arguments from the command line's options, each checked."""
    quick = args.quick
    scale = args.scale if args.scale is not None else (0.1 if quick else 1.0)
    cpu_budget = args.scale is None and not quick and args.device == "cpu"
    repeats = args.repeats if args.repeats is not None else (3 if quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    _check_positive("--repeats", repeats)
    _check_positive("--warmup", warmup, minimum=0)
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device on this machine")
    memory_steps = None
    if not args.no_memory:
        memory_steps = tuple(args.memory_steps or (
            (1000, 10_000) if quick else CPU_MEMORY_STEPS if args.device == "cpu"
            else (10_000, 1_000_000)))
        if not 0 < memory_steps[0] < memory_steps[1]:
            raise ValueError(f"--memory-steps: expected 0 < SHORT < LONG, got {memory_steps}")
    steps = {**(CPU_STEPS if cpu_budget else {}), **_parse_steps(args.steps)}
    names = list(CONFIGS) if args.configs is None else args.configs
    configs = [replace(CONFIGS[name], steps=steps[name]) if name in steps
               else scaled(CONFIGS[name], scale) for name in names]
    return {
        "configs": configs, "cells": args.cells,
        "implementations": args.implementations or [
            name for name in IMPLEMENTATIONS if name != "torch-cudnn" or args.device == "cuda"],
        "repeats": repeats, "warmup": warmup, "device": args.device, "dtype": args.dtype,
        "seed": args.seed, "matmul_size": 1024 if quick else 2048,
        "memory_steps": memory_steps,
        "full_steps": {config.name: CONFIGS[config.name].steps for config in configs},
        "compile_allow_rnn": args.compile_allow_rnn,
    }


def run(args: argparse.Namespace) -> int:
    """Runs the suite as the options say, writes the JSON and the report."""
    from benchmarks import report

    try:
        options = _options(args)
        threads = args.torch_threads if args.torch_threads is not None else physical_cores()
        _check_positive("--torch-threads", threads)
    except ValueError as error:
        print(f"tbptt bench: {error}", file=sys.stderr)
        return 2
    prepare_process(args.device, threads)  # the results record the devices and threads
    name = args.name or (f"{args.device}{'-quick' if args.quick else ''}"
                         + ("" if args.dtype == "float32" else f"-{args.dtype}"))
    results = run_suite(**options, command=sys.argv,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.scaling:
        results["scaling"] = _scaling(args.out or RESULTS_DIR)
    out_dir = args.out or RESULTS_DIR
    path = write_results(results, out_dir, name)
    written = report.render(path)
    print(f"wrote {path}")
    for item in written:
        print(f"wrote {item}")
    return 0


def _scaling(out_dir: Path) -> dict[str, Any]:
    """benchmarks/scaling.py's results (throughput vs devices), when that module exists."""
    try:
        from benchmarks import scaling
    except ImportError as error:
        return {"status": "skipped", "reason": f"benchmarks.scaling: {error}"}
    return scaling.run(out_dir)


USAGE = """Benchmark the JAX and PyTorch TBPTT trainers against each other.

Runs every chosen configuration (S, M, M-k2, L, char-rnn, word-LM, recipe, recipe-k2) for
every chosen cell
(Elman, GRU, LSTM) through every chosen implementation (jax, jax-dp: the batch split over
the cores as XLA CPU devices, torch-hand, torch-fused, torch-ignite, torch-compile;
torch-cudnn on CUDA), all from the same initial weights and data, interleaved, with
warm-up and repeats; then the streamed-memory check (T = 1e4 vs 1e6 steps; 1e5 on a CPU
by default, see --memory-steps). Writes <out>/<name>.json (versions, machine, thread
counts, settings, every repeat), and from it <out>/<name>.md (the table, ratios and
targets) and PNG plots. Needs JAX and PyTorch; Ignite is optional (its implementation is
reported as skipped without it).

Examples:
  tbptt bench                                   # the full matrix, 5-20 min on 2 idle cores
  tbptt bench --quick                           # a reduced matrix, a couple of minutes
  tbptt bench --configs S M --cells lstm --implementations jax torch-fused --repeats 5
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="*", choices=tuple(CONFIGS), default=None,
                        metavar="CONFIG", help=f"configurations to run, of {tuple(CONFIGS)} "
                        "(default: all; none, to run only the memory check)")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS),
                        metavar="CELL", help="recurrent cells (default: all three)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                        default=None, metavar="IMPL",
                        help=f"implementations, of {IMPLEMENTATIONS} (default: all that "
                        "apply to the device; torch-cudnn only on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation, medians reported (default 5; "
                        "3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the first (compiling) call (default 1)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply every configuration's sequence length T by this "
                        "(rounded to a multiple of k1, at least 2*k1); the steps run are "
                        "recorded (default 1; 0.1 with --quick)")
    parser.add_argument("--steps", nargs="+", default=[], metavar="CONFIG=T",
                        help="set one configuration's sequence length, e.g. L=500 (overrides "
                        "--scale for it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both frameworks run (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameters and data type (default float32; TF32 is always off)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: the number of physical cores)")
    parser.add_argument("--memory-steps", nargs=2, type=int, default=None,
                        metavar=("SHORT", "LONG"),
                        help="streamed lengths of the memory check (default 10000 1000000 on "
                        "CUDA, 10000 100000 on a CPU, 1000 10000 with --quick)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the streamed-memory check")
    parser.add_argument("--compile-allow-rnn", action="store_true",
                        help="torch-compile with dynamo's experimental allow_rnn=True (by "
                        "default dynamo skips the models' forward: nn.RNN/GRU/LSTM unsupported)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run benchmarks/scaling.py (throughput vs devices)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced matrix: T scaled by 0.1, 3 repeats, a short memory "
                        "check, a smaller matrix-product probe")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results of the checkout)")
    parser.add_argument("--name", default=None,
                        help="results file stem (default: cpu, cpu-quick, cuda-float32, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m benchmarks.suite"
         ) -> int:
    """The suite's command line (also `tbptt bench`, which hands its arguments here)."""
    parser = argparse.ArgumentParser(prog=prog, description=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
