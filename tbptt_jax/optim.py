"""optax transformations that reproduce `torch.optim` exactly where plain optax does not.

Most torch optimizers have an exact optax twin built from stock optax (the table in
docs/optimizers.md, proven by parity_tests/test_optimizers.py). These are the places where
the two differ by design, each with the torch behaviour as an optax transformation:

- `clip_by_global_norm_torch`: `torch.nn.utils.clip_grad_norm_` scales by
  `max_norm / (norm + 1e-6)` (capped at 1); `optax.clip_by_global_norm` by `max_norm / norm`.
- `scale_by_rss_torch`, `adagrad_torch`: torch's Adagrad adds `eps` outside the square root
  (`g / (sqrt(s) + eps)`), starts the sum at 0 and decays the learning rate as
  `lr / (1 + (t - 1) lr_decay)`; `optax.adagrad` adds `eps` inside (`g / sqrt(s + eps)`)
  and starts the sum at 0.1.
- `rmsprop_torch`: torch's RMSprop accumulates the momentum buffer before the learning rate
  scales it and adds an L2 `weight_decay` to the gradient; `optax.rmsprop` scales first, so
  the two part once the learning rate changes (a schedule).
- `sgd_torch`: torch's SGD `dampening` (optax's momentum trace has none), the first step
  taking the gradient undamped as torch does.
- `cosine_annealing_schedule`: `torch.optim.lr_scheduler.CosineAnnealingLR` is periodic
  (it rises again after `T_max` steps); `optax.cosine_decay_schedule` stays at its end.
- `float_count`: optax's polynomial schedules (`linear_schedule`, the warm-up of
  `warmup_cosine_decay_schedule`) divide the int32 step count, which JAX does in float32
  even with x64 on, so a float64 run gets float32 learning rates; torch's are Python floats.

Every factory is a small closure returning an `optax.GradientTransformation` (or a
schedule), so it composes with `optax.chain` like any optax piece.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "TORCH_CLIP_EPS",
    "adagrad_torch",
    "clip_by_global_norm_torch",
    "cosine_annealing_schedule",
    "float_count",
    "rmsprop_torch",
    "scale_by_rss_torch",
    "sgd_torch",
]

# The constant `torch.nn.utils.clip_grad_norm_` adds to the norm before dividing.
TORCH_CLIP_EPS = 1e-6

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _check_number(name: str, value: object, *, minimum: float = 0.0,
                  inclusive: bool = True) -> float:
    """`value` as a float if it is a finite real number (not a bool) >= (or >) `minimum`."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < minimum
            or (not inclusive and value == minimum)):
        raise ValueError(f"{name} must be a finite float {bound}, got {value!r}")
    return float(value)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Scales the updates by `min(max_norm / (norm + 1e-6), 1)`, as
    `torch.nn.utils.clip_grad_norm_(parameters, max_norm)` scales the gradients.

    `norm` is the global L2 norm over every leaf. `optax.clip_by_global_norm` divides by
    `norm` itself, so with clipping active its updates are larger by a factor
    `1 + 1e-6 / norm` (a relative gap of about `1e-6 / norm`; docs/optimizers.md).

    Args:
      max_norm: the largest global norm, a finite float > 0.

    Returns:
      A stateless `optax.GradientTransformation`; updates keep their shapes and dtypes.
    """
    max_norm = _check_number("max_norm", max_norm, inclusive=False)

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        # Multiplied by the capped coefficient, as torch does, never divided by the norm.
        coefficient = jnp.minimum(max_norm / (norm + TORCH_CLIP_EPS), 1.0)
        return jax.tree.map(lambda g: g * coefficient.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_rss_torch(initial_accumulator_value: float = 0.0,
                       eps: float = 1e-10) -> optax.GradientTransformation:
    """Scales by the root of the running sum of squares, eps outside the root, as
    `torch.optim.Adagrad` does: `s = s + g**2; update = g / (sqrt(s) + eps)`.

    Args:
      initial_accumulator_value: the sum's start value (torch's default 0; optax's 0.1).
      eps: added to `sqrt(s)` (torch's default 1e-10).

    Returns:
      An `optax.GradientTransformation` whose state is `optax.ScaleByRssState` (the sum,
      one array per leaf, of the leaf's shape).
    """
    initial_accumulator_value = _check_number("initial_accumulator_value",
                                              initial_accumulator_value)
    eps = _check_number("eps", eps)

    def init_fn(params):
        return optax.ScaleByRssState(
            sum_of_squares=optax.tree.full_like(params, initial_accumulator_value))

    def update_fn(updates, state, params=None):
        del params
        sums = jax.tree.map(lambda s, g: s + g * g, state.sum_of_squares, updates)
        updates = jax.tree.map(lambda g, s: g / (jnp.sqrt(s) + eps), updates, sums)
        return updates, optax.ScaleByRssState(sum_of_squares=sums)

    return optax.GradientTransformation(init_fn, update_fn)


def adagrad_torch(learning_rate: float, *, lr_decay: float = 0.0, weight_decay: float = 0.0,
                  initial_accumulator_value: float = 0.0,
                  eps: float = 1e-10) -> optax.GradientTransformation:
    """The twin of `torch.optim.Adagrad(params, lr, lr_decay, weight_decay,
    initial_accumulator_value, eps)`, with torch's defaults.

    Update t (1-based): `g = g + weight_decay * p; s = s + g**2;
    p = p - lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)`.

    Returns:
      An `optax.GradientTransformation` (a chain: L2 decay, `scale_by_rss_torch`, the
      learning rate as a schedule over the 0-based count, which is t - 1).
    """
    learning_rate = _check_number("learning_rate", learning_rate)
    lr_decay = _check_number("lr_decay", lr_decay)
    weight_decay = _check_number("weight_decay", weight_decay)

    def schedule(count: jax.Array) -> jax.Array:
        return learning_rate / (1.0 + count * lr_decay)

    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        scale_by_rss_torch(initial_accumulator_value, eps),
        optax.scale_by_learning_rate(schedule if lr_decay else learning_rate),
    )


def rmsprop_torch(learning_rate: ScalarOrSchedule, *, alpha: float = 0.99, eps: float = 1e-8,
                  weight_decay: float = 0.0, momentum: float = 0.0,
                  centered: bool = False) -> optax.GradientTransformation:
    """The twin of `torch.optim.RMSprop(params, lr, alpha, eps, weight_decay, momentum,
    centered)`, with torch's defaults, for a constant learning rate or a schedule.

    Update: `g = g + weight_decay * p; v = alpha v + (1 - alpha) g**2`; centered also keeps
    `m = alpha m + (1 - alpha) g` and uses `v - m**2`; `d = g / (sqrt(v [- m**2]) + eps)`;
    with momentum `b = momentum b + d; p = p - lr b`, else `p = p - lr d`.

    `optax.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=...,
    momentum=...)` is the same for a constant learning rate, but it applies the learning
    rate before the momentum trace (`b = momentum b + lr d`), so under a schedule each
    buffered step keeps the rate it was taken with; torch rescales the whole buffer.

    Returns:
      An `optax.GradientTransformation` (a chain of optax pieces in torch's order).
    """
    weight_decay = _check_number("weight_decay", weight_decay)
    momentum = _check_number("momentum", momentum)
    scale = optax.scale_by_stddev if centered else optax.scale_by_rms
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        scale(decay=alpha, eps=eps, initial_scale=0.0, eps_in_sqrt=False),
        optax.trace(decay=momentum) if momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


class TraceTorchState(NamedTuple):
    """State of `sgd_torch`'s momentum buffer."""

    count: jax.Array  # shape=(), dtype=int32: the updates taken so far
    trace: Any  # the momentum buffer, a pytree shaped like the params


def _trace_torch(momentum: float, dampening: float,
                 nesterov: bool) -> optax.GradientTransformation:
    """torch's SGD momentum: `b = g` at the first update, then `b = momentum b + (1 -
    dampening) g`; the step is `g + momentum b` (Nesterov) or `b`."""
    def init_fn(params):
        return TraceTorchState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0
        trace = jax.tree.map(
            lambda g, b: jnp.where(first, g, momentum * b + (1 - dampening) * g),
            updates, state.trace)
        if nesterov:
            updates = jax.tree.map(lambda g, b: g + momentum * b, updates, trace)
        else:
            updates = trace
        return updates, TraceTorchState(optax.safe_increment(state.count), trace)

    return optax.GradientTransformation(init_fn, update_fn)


def sgd_torch(learning_rate: ScalarOrSchedule, *, momentum: float = 0.0,
              dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False) -> optax.GradientTransformation:
    """The twin of `torch.optim.SGD(params, lr, momentum, dampening, weight_decay,
    nesterov)`, with torch's defaults.

    Update: `g = g + weight_decay * p`; with momentum, `b = g` at the first update and
    `b = momentum b + (1 - dampening) g` after, then `d = g + momentum b` (Nesterov) or
    `d = b`; `p = p - lr d`. Without dampening this is `optax.chain(
    optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum, nesterov))`.

    Returns:
      An `optax.GradientTransformation`; its momentum state is a `TraceTorchState`.
    """
    momentum = _check_number("momentum", momentum)
    dampening = _check_number("dampening", dampening)
    weight_decay = _check_number("weight_decay", weight_decay)
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening 0 (as torch), got "
                         f"momentum={momentum!r}, dampening={dampening!r}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        _trace_torch(momentum, dampening, nesterov) if momentum else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )


def cosine_annealing_schedule(learning_rate: float, t_max: int,
                              eta_min: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """torch's `CosineAnnealingLR(optimizer, T_max=t_max, eta_min)` over the 0-based count:
    `eta_min + (lr - eta_min) (1 + cos(pi count / t_max)) / 2`, periodic like torch's (it
    climbs back to `lr` between `t_max` and `2 t_max` steps).

    For `count <= t_max` this is `optax.cosine_decay_schedule(lr, t_max,
    alpha=eta_min / lr)`; after that optax stays at `eta_min`.
    """
    learning_rate = _check_number("learning_rate", learning_rate)
    eta_min = _check_number("eta_min", eta_min)
    if isinstance(t_max, bool) or not isinstance(t_max, numbers.Integral) or t_max < 1:
        raise ValueError(f"t_max must be a positive int, got {t_max!r}")

    def schedule(count: jax.Array) -> jax.Array:
        return eta_min + (learning_rate - eta_min) * (1.0 + jnp.cos(jnp.pi * count / t_max)) / 2

    return schedule


def float_count(schedule: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """`schedule` evaluated at the step count cast to JAX's default float (float64 with x64
    on), so that the learning rate has that precision.

    optax's optimizers call a schedule with their int32 count, and `int32 / int` is float32
    in JAX whatever x64 says: `optax.linear_schedule(0.001, 0.01, 10)(jnp.int32(0))` is
    float32 0.001, 1.6e-7 relative from float64's. Wrapped, it equals torch's `LinearLR`
    rates to 1e-15.
    """
    def wrapped(count: jax.Array) -> jax.Array:
        return schedule(jnp.asarray(count, dtype=jnp.result_type(float)))

    return wrapped
