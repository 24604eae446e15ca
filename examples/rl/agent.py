"""The recurrent actor-critic and its per-step loss, in JAX, as the TBPTT trainer takes them.

Inputs and targets are structured, time-major (`[T, B, ...]` leaves):
`xs = {"obs": float[T, B, O], "prev_action": int[T, B]}` and
`ys = {"action": int[T, B], "old_logp": [T, B], "advantage": [T, B], "return": [T, B]}`.
The agent is the bundled GRU (`tbptt_jax.models.gru`) over each step's observation and
one-hot previous action, its linear readout giving the policy's logits and the value, so
its parameters are those of `tbptt_torch.models.GRUModel` and `torch_agent.py` is its twin.
Episode starts come as the trainer's `resets`. The memoryless agent is the same network with
its carry reset before every step and the previous action hidden: a policy of the current
observation alone, of the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

import tbptt_jax

Array = jax.Array


@dataclass(frozen=True)
class ActorCritic:
    """A GRU actor-critic over `xs = {"obs": [T, B, obs_size], "prev_action": [T, B]}`.

    `prev_action` holds an action id, or `num_actions` where there is none (an episode's
    first step). `apply` returns `{"logits": [T, B, num_actions], "value": [T, B]}`.

    Attributes:
      obs_size: O, features of an observation.
      num_actions: A, discrete actions.
      hidden_size: H, units of the GRU.
      memory: False for the memoryless agent (carry reset every step, previous action hidden).
    """

    obs_size: int
    num_actions: int
    hidden_size: int
    memory: bool = True

    @property
    def core(self) -> tbptt_jax.models.RecurrentModel:
        # The readout's first A outputs are the policy's logits, the last one the value.
        return tbptt_jax.models.gru(self.obs_size + self.num_actions + 1, self.hidden_size,
                                    self.num_actions + 1)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.core.param_shapes()

    def init(self, key: Array, dtype: Any = None) -> dict[str, Array]:
        return self.core.init(key, dtype)

    def initial_carry(self, batch_size: int, dtype: Any = None) -> Array:
        return self.core.initial_carry(batch_size, dtype)

    def apply(self, params: dict[str, Array], carry: Array, xs: dict[str, Array],
              resets: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """`(carry, {"logits", "value"})` over a time-major chunk; `resets` bool `[T, B]`."""
        obs, prev_action = xs["obs"], xs["prev_action"]
        if not self.memory:
            prev_action = jnp.full_like(prev_action, self.num_actions)
            resets = jnp.ones(prev_action.shape, bool)
        inputs = jnp.concatenate(
            [obs, jax.nn.one_hot(prev_action, self.num_actions + 1, dtype=obs.dtype)], -1)
        carry, out = self.core.apply(params, carry, inputs, resets)
        return carry, {"logits": out[..., :self.num_actions], "value": out[..., -1]}


def ppo_loss(clip: float = 0.2, value_coef: float = 0.5, entropy_coef: float = 0.01
             ) -> Callable[[dict[str, Array], dict[str, Array]], Array]:
    """PPO's per-step loss `[t, b]`: the clipped policy-gradient surrogate, plus
    `value_coef` times the squared value error over 2, minus `entropy_coef` times the
    policy's entropy. The trainer averages it over the steps and sequences an update owns.

        r = exp(log pi(a) - old_logp)
        loss = -min(r A, clip(r, 1 - clip, 1 + clip) A) + value_coef (v - R)^2 / 2
               - entropy_coef H(pi)
    """
    def loss(preds: dict[str, Array], ys: dict[str, Array]) -> Array:
        log_probs = jax.nn.log_softmax(preds["logits"])
        log_prob = jnp.take_along_axis(log_probs, ys["action"][..., None], -1)[..., 0]
        ratio = jnp.exp(log_prob - ys["old_logp"])
        advantage = ys["advantage"]
        policy = -jnp.minimum(ratio * advantage,
                              jnp.clip(ratio, 1 - clip, 1 + clip) * advantage)
        value = 0.5 * (preds["value"] - ys["return"]) ** 2
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, -1)
        return policy + value_coef * value - entropy_coef * entropy

    return loss
