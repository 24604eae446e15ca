"""The parity machinery: train a JAX model and its torch twin from the same weights and find
where their training trajectories part (the parity tests' harness and `tbptt_parity.compare`).

A *trajectory* is what one call of a trainer did, update by update: the loss of every
update, the gradient every update applied, and the parameters after every update, keyed by
the torch `state_dict()` names (which the `tbptt_jax` models share). `run_jax` and
`run_torch` record one from either trainer; `compare_trajectories` reduces two of them to
the largest relative difference per quantity; `assert_parity` fails naming the first
update, quantity and parameter key that diverged. Nothing here is specific to the bundled
models beyond `make_models`: a port of one's own (a torch module and a JAX `apply_fn` with
the same parameter names) goes through `run_jax`, `run_torch` and `assert_parity`
unchanged, and `tbptt_parity.compare` wraps them in one call.

Relative difference, per tensor: `max|a - b| / max(max|b|, tiny)`, the largest
element-wise gap over the largest magnitude of the reference tensor `b` (`tiny` the
smallest normal number of the dtype, so an all-zero reference needs an exact match). Each
tensor is measured against its own scale, so a small bias is not hidden behind a large
weight matrix, and an element near zero does not blow the measure up. By default the
scale is that of the tensor at that update; `scale="trajectory"` takes the largest
magnitude the key reaches over all updates instead (see `assert_parity`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn

import tbptt_jax
import tbptt_torch
from tbptt.tree import leaves, map_leaves

QUANTITIES = ("loss", "grad", "param", "carry")

CELLS: dict[str, tuple[Callable[..., Any], type[nn.Module]]] = {
    "elman": (tbptt_jax.models.elman, tbptt_torch.models.ElmanModel),
    "gru": (tbptt_jax.models.gru, tbptt_torch.models.GRUModel),
    "lstm": (tbptt_jax.models.lstm, tbptt_torch.models.LSTMModel),
}

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class ModelTriple(NamedTuple):
    """One model in both frameworks, holding the same weights."""

    jax_model: Any  # a `tbptt_jax.models.RecurrentModel`
    torch_model: nn.Module  # its `tbptt_torch.models` twin
    params: dict[str, jax.Array]  # the torch model's weights as JAX `params`


class Trajectory(NamedTuple):
    """What one trainer call did, update by update (U updates)."""

    losses: np.ndarray  # shape=[U]
    grads: dict[str, np.ndarray]  # key -> [U, *shape]: the gradient each update applied
    params: dict[str, np.ndarray]  # key -> [U, *shape]: the parameters after each update
    carry: Any  # the returned carry, its leaves numpy arrays (None inside stays None)
    opt_state: Any = None  # the optax state after the call (JAX only)


class OptimizerPair(NamedTuple):
    """The same optimizer in both frameworks."""

    optax: optax.GradientTransformation
    torch: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]  # parameters -> it


class Divergence(NamedTuple):
    """Where two trajectories first differ by more than the tolerance."""

    update: int | None  # 0-based update index; None for the carry returned after all updates
    quantity: str  # "loss", "grad", "param" or "carry"
    key: str | None  # the parameter key (the carry's leaf index for "carry"); None for loss
    gap: float  # the relative difference found there


def make_models(cell: str, input_size: int, hidden_size: int, output_size: int, *,
                num_layers: int = 1, dtype: Any = np.float64, seed: int = 0) -> ModelTriple:
    """Builds a `tbptt_torch` model initialised by torch (seeded, without touching the global
    torch RNG), casts it to `dtype` (float32 or float64), and the matching `tbptt_jax` model
    with the same weights as `params`."""
    jax_factory, torch_class = CELLS[cell]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch_model = torch_class(input_size, hidden_size, output_size, num_layers)
    torch_model = torch_model.to(_TORCH_DTYPES[np.dtype(dtype)])
    params = {name: jnp.asarray(array) for name, array in tbptt_torch.to_jax(torch_model).items()}
    jax_model = jax_factory(input_size, hidden_size, output_size, num_layers=num_layers)
    return ModelTriple(jax_model, torch_model, params)


def random_sequences(length: int, batch_size: int, input_size: int, output_size: int, *,
                     dtype: Any = np.float64, reset_rate: float = 0.0, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Inputs `xs[T, B, I]` ~ N(0, 1), targets `ys[T, B, O]` that depend on past inputs (a
    smoothed, squashed projection of them, so there is something to learn), and resets
    `[T, B]` drawn with probability `reset_rate` (None when it is 0)."""
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((length, batch_size, input_size))
    mixing = rng.standard_normal((input_size, output_size)) / np.sqrt(input_size)
    smoothed = np.zeros((batch_size, input_size))
    ys = np.empty((length, batch_size, output_size))
    for t in range(length):
        smoothed = 0.7 * smoothed + 0.3 * xs[t]
        ys[t] = np.tanh(smoothed @ mixing)
    resets = rng.random((length, batch_size)) < reset_rate if reset_rate > 0 else None
    return xs.astype(dtype), ys.astype(dtype), resets


# The optimizers `optimizer_pair` builds in both frameworks, with their options' defaults.
OPTIMIZERS: dict[str, dict[str, float]] = {
    "sgd": {}, "nesterov": {"momentum": 0.9}, "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8}}


def optimizer_pair(name: str, learning_rate: float, **options: float) -> OptimizerPair:
    """Matching optax and torch optimizers: "sgd"; "nesterov" (SGD with `momentum`, default
    0.9, and Nesterov's correction); "adam" (`b1`, `b2`, `eps` as optax names them)."""
    defaults = OPTIMIZERS
    if name not in defaults:
        raise ValueError(f"optimizer must be one of {tuple(defaults)}, got {name!r}")
    unknown = set(options) - set(defaults[name])
    if unknown:
        raise ValueError(f"{name} takes the options {sorted(defaults[name])}, "
                         f"got {sorted(unknown)}")
    hyper = {**defaults[name], **options}
    if name == "sgd":
        return OptimizerPair(optax.sgd(learning_rate),
                             lambda ps: torch.optim.SGD(ps, lr=learning_rate))
    if name == "nesterov":
        return OptimizerPair(
            optax.sgd(learning_rate, momentum=hyper["momentum"], nesterov=True),
            lambda ps: torch.optim.SGD(ps, lr=learning_rate, momentum=hyper["momentum"],
                                       nesterov=True))
    return OptimizerPair(
        optax.adam(learning_rate, b1=hyper["b1"], b2=hyper["b2"], eps=hyper["eps"]),
        lambda ps: torch.optim.Adam(ps, lr=learning_rate, betas=(hyper["b1"], hyper["b2"]),
                                    eps=hyper["eps"]))


def to_numpy(tree: Any) -> Any:
    """A carry or data (tensors or JAX arrays in tuples, NamedTuples such as `OverlapCarry`,
    lists or dicts) as plain tuples and dicts of numpy copies, so that trees of both
    frameworks, and a reference's plain tuples, compare alike."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return {key: to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return tuple(to_numpy(part) for part in tree)
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy().copy()
    return np.asarray(tree)


def _to_torch(tree: Any) -> Any:
    """Data as torch tensors, leaf by leaf (a copy: the caller's arrays stay theirs)."""
    return map_leaves(lambda leaf: torch.from_numpy(np.array(leaf)), tree)


def run_jax(params: Any, carry: Any, xs: Any, ys: Any, *, apply_fn: Callable[..., Any],
            loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
            opt_state: Any = None, **options: Any) -> Trajectory:
    """Runs `tbptt_jax.tbptt_train_step` once with `trace=True` and records its trajectory.

    `xs` and `ys` may be structured (pytrees of `[T, B, ...]` arrays), as the trainer takes
    them; `options` are the trainer's (`k1`, `k2`, `reduction`, `tail`, `resets`, `mask`,
    ...); `opt_state` defaults to `optimizer.init(params)`.
    """
    if opt_state is None:
        opt_state = optimizer.init(params)
    for name in ("resets", "mask"):
        if options.get(name) is not None:
            options[name] = jnp.asarray(options[name])
    _, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
        params, opt_state, carry, jax.tree.map(jnp.asarray, xs),
        jax.tree.map(jnp.asarray, ys), apply_fn=apply_fn,
        loss_fn=loss_fn, optimizer=optimizer, trace=True, **options)
    updates = metrics["loss"].shape[0]

    def stacked(name: str) -> dict[str, np.ndarray]:
        if name in metrics:
            return {key: np.asarray(value) for key, value in metrics[name].items()}
        return {key: np.zeros((updates, *np.shape(value))) for key, value in params.items()}

    return Trajectory(np.asarray(metrics["loss"]), stacked("grads"), stacked("params"),
                      to_numpy(carry), opt_state)


def run_torch(model: nn.Module, optimizer: torch.optim.Optimizer, carry: Any, xs: Any, ys: Any,
              *, loss_fn: Callable[..., Any], **options: Any) -> Trajectory:
    """Runs `tbptt_torch.tbptt_train_step` once (training `model` in place) and records its
    trajectory: after each optimizer step, `p.grad` (still that update's gradient) and `p`
    of every `named_parameters()` entry.

    `xs`, `ys`, `options["resets"]` and `options["mask"]` may be numpy arrays, `xs` and
    `ys` structured (nested tuples, lists and dicts of them); `options` are the trainer's.
    """
    grads: list[dict[str, np.ndarray]] = []
    params: list[dict[str, np.ndarray]] = []

    def record(update_index: int, loss: torch.Tensor, model: nn.Module) -> None:
        named = list(model.named_parameters())
        grads.append({key: p.grad.detach().numpy().copy() for key, p in named})
        params.append({key: p.detach().numpy().copy() for key, p in named})

    for name in ("resets", "mask"):
        if options.get(name) is not None:
            options[name] = _to_torch(options[name])
    carry, losses = tbptt_torch.tbptt_train_step(
        model, optimizer, carry, _to_torch(xs), _to_torch(ys), loss_fn=loss_fn,
        on_update=record, **options)

    def stacked(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.stack([r[key] for r in records]) if records
                else np.zeros((0, *p.shape)) for key, p in model.named_parameters()}

    return Trajectory(losses.detach().numpy().copy(), stacked(grads), stacked(params),
                      to_numpy(carry))


def run_both(models: ModelTriple, optimizers: OptimizerPair, xs: np.ndarray, ys: np.ndarray,
             *, jax_loss: Callable[..., Any] = tbptt_jax.losses.mse,
             torch_loss: Callable[..., Any] = tbptt_torch.losses.mse, **options: Any
             ) -> tuple[Trajectory, Trajectory]:
    """Trains both models of `models` from their shared weights and the zero carry with the
    same options; returns `(jax trajectory, torch trajectory)`. The torch model trained is
    a copy, so `models` can be reused."""
    batch_size, dtype = xs.shape[1], models.params["head.bias"].dtype
    jax_run = run_jax(models.params, models.jax_model.initial_carry(batch_size, dtype), xs, ys,
                      apply_fn=models.jax_model.apply, loss_fn=jax_loss,
                      optimizer=optimizers.optax, **options)
    torch_model = copy.deepcopy(models.torch_model)
    torch_run = run_torch(torch_model, optimizers.torch(torch_model.parameters()), None, xs, ys,
                          loss_fn=torch_loss, **options)
    return jax_run, torch_run


def relative_difference(actual: Any, expected: Any, scale_of: Any = None) -> float:
    """`max|a - b| / max(max|b|, tiny)` over two arrays of one shape (see the module doc).

    `scale_of` (default: `expected`) is the array whose largest magnitude sets the scale.
    Equal entries (including NaN against NaN, inf against the same inf) count as no gap; any
    other non-finite gap makes the difference infinite. Empty arrays differ by 0.
    """
    a, b = np.asarray(actual), np.asarray(expected)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if a.size == 0:
        return 0.0
    dtype = np.result_type(a, b)
    tiny = np.finfo(dtype if np.issubdtype(dtype, np.floating) else np.float64).tiny
    a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    gap = np.where(same, 0.0, np.abs(a - b))
    if not np.all(np.isfinite(gap)):
        return float("inf")
    reference = b if scale_of is None else np.asarray(scale_of, np.float64)
    finite = np.abs(reference[np.isfinite(reference)])
    scale = max(float(finite.max()) if finite.size else 0.0, float(tiny))
    return float(gap.max() / scale)


def tree_difference(actual: Any, expected: Any) -> float:
    """The largest `relative_difference` over the leaves of two pytrees with the same leaves
    in the same order (carries, optimizer states, params; torch tensors or JAX arrays, so
    a torch carry compares with a JAX one), each leaf against its own scale."""
    a_leaves, b_leaves = jax.tree.leaves(actual), jax.tree.leaves(expected)
    if len(a_leaves) != len(b_leaves):
        raise ValueError(f"different numbers of leaves: {len(a_leaves)} and {len(b_leaves)}")
    return max((relative_difference(to_numpy(a), to_numpy(b))
                for a, b in zip(a_leaves, b_leaves, strict=True)), default=0.0)


def _leaves(carry: Any) -> dict[str, Any]:
    """The carry's leaves by their paths (`[0][1]`; `[]` for a carry that is one array)."""
    return {path or "[]": leaf for path, leaf in leaves(carry)}


def _check_structure(actual: Trajectory, expected: Trajectory) -> None:
    if actual.losses.shape != expected.losses.shape:
        raise AssertionError(f"different numbers of updates: {actual.losses.shape[0]} and "
                             f"{expected.losses.shape[0]}")
    for quantity, a, b in (("grad", actual.grads, expected.grads),
                           ("param", actual.params, expected.params)):
        if set(a) != set(b):
            raise AssertionError(f"{quantity} keys differ: {sorted(a)} and {sorted(b)}")
        for key in b:
            if a[key].shape != b[key].shape:
                raise AssertionError(f"{quantity} {key!r} shapes differ: {a[key].shape} and "
                                     f"{b[key].shape}")
    if (actual.carry is None) != (expected.carry is None):
        raise AssertionError("only one trajectory has a carry")
    if expected.carry is not None:
        a_leaves, b_leaves = _leaves(actual.carry), _leaves(expected.carry)
        if list(a_leaves) != list(b_leaves):
            raise AssertionError(f"carry structures differ: {list(a_leaves)} and "
                                 f"{list(b_leaves)}")


SCALES = ("update", "trajectory")


def _gaps(actual: Trajectory, expected: Trajectory, scale: str) -> Iterable[Divergence]:
    """Every relative difference, in the order training produced them: update by update
    (loss, then each gradient, then each parameter), then the returned carry."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")

    def gap(a: np.ndarray, b: np.ndarray, u: int) -> float:
        return relative_difference(a[u], b[u], None if scale == "update" else b)

    for u in range(expected.losses.shape[0]):
        yield Divergence(u, "loss", None, gap(actual.losses, expected.losses, u))
        for key in expected.grads:
            yield Divergence(u, "grad", key, gap(actual.grads[key], expected.grads[key], u))
        for key in expected.params:
            yield Divergence(u, "param", key, gap(actual.params[key], expected.params[key], u))
    if expected.carry is not None:
        a_leaves = _leaves(actual.carry)
        for key, b_leaf in _leaves(expected.carry).items():
            yield Divergence(None, "carry", key, relative_difference(a_leaves[key], b_leaf))


def compare_trajectories(actual: Trajectory, expected: Trajectory, scale: str = "update"
                         ) -> dict[str, float]:
    """The largest relative difference of each quantity (loss, grad, param, carry) over all
    updates and parameter keys, `expected` giving the scale (see `assert_parity`)."""
    _check_structure(actual, expected)
    largest = dict.fromkeys(QUANTITIES, 0.0)
    for gap in _gaps(actual, expected, scale):
        largest[gap.quantity] = max(largest[gap.quantity], gap.gap)
    return largest


def first_divergence(actual: Trajectory, expected: Trajectory, rtol: float,
                     scale: str = "update") -> Divergence | None:
    """The first (update, quantity, key) whose relative difference exceeds `rtol`."""
    _check_structure(actual, expected)
    return next((gap for gap in _gaps(actual, expected, scale) if not gap.gap <= rtol), None)


def assert_parity(actual: Trajectory, expected: Trajectory, rtol: float, *,
                  scale: str = "update", names: tuple[str, str] = ("jax", "torch")
                  ) -> dict[str, float]:
    """Asserts that two trajectories agree to `rtol` relative everywhere; returns
    `compare_trajectories`.

    `scale="update"` measures each update's tensor against its own largest magnitude (the
    strictest); `scale="trajectory"` against the largest magnitude that key (or the loss)
    reaches over the whole trajectory, so a gradient or parameter passing near zero at one
    update is not measured against its own near-zero size. The failure message names the
    first update (0-based), the quantity and the parameter key that diverged, the size of
    the gap, and the largest gap of every quantity.
    """
    largest = compare_trajectories(actual, expected, scale)
    divergence = first_divergence(actual, expected, rtol, scale)
    if divergence is not None:
        where = ("in the carry returned after the last update" if divergence.update is None
                 else f"at update {divergence.update}")
        what = divergence.quantity + ("" if divergence.key is None else f" {divergence.key!r}")
        summary = ", ".join(f"{q} {v:.3g}" for q, v in largest.items())
        raise AssertionError(
            f"{names[0]} and {names[1]} diverge first {where}: {what} differs by "
            f"{divergence.gap:.3g} relative (tolerance {rtol:g}, scale {scale!r}); largest "
            f"relative differences: {summary}")
    return largest
