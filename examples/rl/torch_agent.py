"""The PyTorch twins of `agent.py`: the recurrent actor-critic (a `tbptt_torch.models.GRUModel`
reading the same structured inputs, so its `state_dict()` is the JAX agent's params) and the
per-step PPO loss, for `tbptt_torch.tbptt_train_step`. The parity tests train both on
recorded rollouts and hold them to 1e-10 in float64 (parity_tests/test_rl_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import tbptt_torch

Tensor = torch.Tensor


class TorchActorCritic(tbptt_torch.models.GRUModel):
    """`forward({"obs": [T, B, O], "prev_action": [T, B]}, carry, resets)` ->
    `({"logits": [T, B, A], "value": [T, B]}, carry)`, as `agent.ActorCritic.apply`."""

    def __init__(self, obs_size: int, num_actions: int, hidden_size: int) -> None:
        super().__init__(obs_size + num_actions + 1, hidden_size, num_actions + 1)
        self.num_actions = num_actions

    def forward(self, xs: dict[str, Tensor], carry: Tensor | None = None,
                resets: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        obs = xs["obs"]
        inputs = torch.cat([obs, F.one_hot(xs["prev_action"].long(),
                                           self.num_actions + 1).to(obs.dtype)], -1)
        out, carry = super().forward(inputs, carry, resets)
        return {"logits": out[..., :self.num_actions], "value": out[..., -1]}, carry


def ppo_loss(clip: float = 0.2, value_coef: float = 0.5, entropy_coef: float = 0.01
             ) -> Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]:
    """`agent.ppo_loss` in torch: per-step losses `[t, b]`."""
    def loss(preds: dict[str, Tensor], ys: dict[str, Tensor]) -> Tensor:
        log_probs = torch.log_softmax(preds["logits"], -1)
        log_prob = log_probs.gather(-1, ys["action"].long()[..., None])[..., 0]
        ratio = torch.exp(log_prob - ys["old_logp"])
        advantage = ys["advantage"]
        policy = -torch.minimum(ratio * advantage,
                                torch.clamp(ratio, 1 - clip, 1 + clip) * advantage)
        value = 0.5 * (preds["value"] - ys["return"]) ** 2
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return policy + value_coef * value - entropy_coef * entropy

    return loss
