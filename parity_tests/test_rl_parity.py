"""The RL update is the same in both frameworks: the recurrent actor-critic of examples/rl and
its PPO loss, trained by the JAX trainer and by the torch trainer on recorded rollouts.

`data/rl_rollouts.npz` holds two consecutive rollouts of 8 gymnax MemoryChain environments
(32 steps each) as the example's training loop handed them to its trainer: structured xs
(observations, previous actions) and ys (actions, old log-probabilities, advantages,
returns), the episode starts as resets, the weights that collected the first rollout, and
the config (`python -m examples.rl.memory_chain --record parity_tests/data/rl_rollouts.npz
--iterations 2 --num-envs 8` wrote it). From those weights, in float64, both trainers run
TBPTT(8, 32) over the two rollouts as one stream (the second call's first windows reach
back into the first rollout through the overlap), with the example's optimizer (global-norm
clipping, then Adam): 8 updates whose losses, gradients and parameters, and the carry
handed on, agree to 1e-10 (SPEC §3). Whatever produced the data, the update is proven the
same.

With the example's own step size and clipping, neither the PPO ratio clip nor the gradient
clipping acts within these 8 updates, so the default run takes a 10x larger step and a
5x tighter gradient clip, under which both act; two controls show it (the torch side
without either diverges). The example's own settings run with `-m slow`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import torch

import tbptt_jax
import tbptt_torch
from examples.rl.agent import ActorCritic, ppo_loss
from examples.rl.memory_chain import Config, make_optimizer
from examples.rl.torch_agent import TorchActorCritic
from examples.rl.torch_agent import ppo_loss as torch_ppo_loss
from parity_tests.harness import Trajectory, assert_parity, compare, tree_difference

RTOL = 1e-10
DATA = Path(__file__).parent / "data" / "rl_rollouts.npz"


class Recorded:
    """The recorded batch in float64 (ints stay ints): rollout i's `xs`, `ys`, `resets`."""

    def __init__(self, path: Path) -> None:
        data = np.load(path)
        self.config = Config(**json.loads(str(data["config"])))

        def group(name: str) -> dict[str, np.ndarray]:
            return {key.split("/", 1)[1]: _float64(data[key]) for key in data.files
                    if key.startswith(f"{name}/")}

        self.params = group("params")
        self.xs, self.ys, self.resets = group("xs"), group("ys"), data["resets"]
        self.rollouts = self.resets.shape[0]

    def rollout(self, index: int) -> tuple[dict, dict, np.ndarray]:
        return ({key: value[index] for key, value in self.xs.items()},
                {key: value[index] for key, value in self.ys.items()}, self.resets[index])


def _float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if np.issubdtype(array.dtype, np.floating) else array


# Both clips at work: some updates' gradients are clipped, some not, and some PPO ratios
# leave [1 - clip, 1 + clip].
BOTH_CLIPS = {"learning_rate": 0.03, "max_grad_norm": 0.1}


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    data = Recorded(DATA)
    data.config = dataclasses.replace(data.config, **BOTH_CLIPS)
    return data


def agent(config: Config) -> ActorCritic:
    return ActorCritic(obs_size=3, num_actions=2, hidden_size=config.hidden_size)


def train_jax(recorded: Recorded) -> tuple[Trajectory, Any]:
    config = recorded.config
    model = agent(config)
    optimizer, loss_fn = make_optimizer(config), ppo_loss(config.clip, config.value_coef,
                                                          config.entropy_coef)
    params = {key: jax.numpy.asarray(value) for key, value in recorded.params.items()}
    opt_state, carry, records = optimizer.init(params), None, []
    for index in range(recorded.rollouts):
        xs, ys, resets = recorded.rollout(index)
        params, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
            params, opt_state, carry, xs, ys, apply_fn=model.apply, loss_fn=loss_fn,
            optimizer=optimizer, k1=config.k1, k2=config.k2, resets=resets, trace=True)
        records.append(metrics)
    stacked = {name: {key: np.concatenate([np.asarray(r[name][key]) for r in records])
                      for key in params} for name in ("grads", "params")}
    losses = np.concatenate([np.asarray(r["loss"]) for r in records])
    return Trajectory(losses, stacked["grads"], stacked["params"], None), carry


def norms(grads: dict[str, np.ndarray]) -> np.ndarray:
    """Each update's global gradient norm (`grads`: key -> [U, *shape])."""
    return np.sqrt(sum((grad.reshape(grad.shape[0], -1) ** 2).sum(1)
                       for grad in grads.values()))


def clipped(trajectory: Trajectory, max_norm: float) -> Trajectory:
    """The JAX trace records each update's gradient before the optax chain clips it, the
    torch trainer's `p.grad` after `clip_grad_norm_`: the JAX one scaled as torch's."""
    scale = np.minimum(max_norm / (norms(trajectory.grads) + tbptt_jax.optim.TORCH_CLIP_EPS),
                       1.0)
    return trajectory._replace(grads={
        key: grad * scale.reshape(-1, *[1] * (grad.ndim - 1))
        for key, grad in trajectory.grads.items()})


def train_torch(recorded: Recorded, *, clip: float | None = None,
                clip_grad_norm: float | None = None) -> tuple[Trajectory, Any]:
    """The torch twin; `clip` and `clip_grad_norm` override the config's (the controls)."""
    config = recorded.config
    model = TorchActorCritic(3, 2, config.hidden_size).double()
    tbptt_torch.load_jax(model, recorded.params)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    loss_fn = torch_ppo_loss(config.clip if clip is None else clip, config.value_coef,
                             config.entropy_coef)
    grads: list[dict[str, np.ndarray]] = []
    params: list[dict[str, np.ndarray]] = []

    def record(index: int, loss: torch.Tensor, model: torch.nn.Module) -> None:
        grads.append({k: p.grad.numpy().copy() for k, p in model.named_parameters()})
        params.append({k: p.detach().numpy().copy() for k, p in model.named_parameters()})

    carry, losses = None, []
    for index in range(recorded.rollouts):
        xs, ys, resets = recorded.rollout(index)
        carry, rollout_losses = tbptt_torch.tbptt_train_step(
            model, optimizer, carry, xs, ys, loss_fn=loss_fn, k1=config.k1, k2=config.k2,
            resets=resets, on_update=record,
            clip_grad_norm=config.max_grad_norm if clip_grad_norm is None else clip_grad_norm)
        losses.append(rollout_losses.numpy())

    def stacked(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.stack([r[key] for r in records]) for key in records[0]}

    return Trajectory(np.concatenate(losses), stacked(grads), stacked(params), None), carry


@pytest.fixture(scope="module")
def jax_run(recorded):
    return train_jax(recorded)


def test_the_recorded_batch_is_what_the_example_trains_on(recorded):
    config = recorded.config
    assert recorded.rollouts == 2 and recorded.resets.shape == (2, config.rollout_steps, 8)
    assert recorded.xs["prev_action"].dtype == np.int32
    assert set(recorded.ys) == {"action", "old_logp", "advantage", "return"}
    # Episodes start inside the rollouts, and windows reach across them: TBPTT(8, 32) over
    # episodes of memory_length + 1 steps.
    assert recorded.resets[:, 1:].any() and config.k2 - config.k1 > config.memory_length
    assert dataclasses.replace(config, iterations=Config().iterations, num_envs=32,
                               seeds=Config().seeds, **BOTH_CLIPS) == dataclasses.replace(
        Config(), **BOTH_CLIPS)


def assert_trained_alike(recorded: Recorded, jax_run: tuple[Trajectory, Any]) -> None:
    jax_trajectory, jax_carry = jax_run
    torch_trajectory, torch_carry = train_torch(recorded)
    assert jax_trajectory.losses.shape == (8,)
    assert_parity(clipped(jax_trajectory, recorded.config.max_grad_norm), torch_trajectory,
                  RTOL)
    # The stream continues alike: the state at the overlap's start and the overlap's
    # structured inputs and resets.
    assert tree_difference(jax_carry.state, torch_carry.state) <= RTOL
    for key in ("obs", "prev_action"):
        np.testing.assert_array_equal(np.asarray(jax_carry.xs[key]),
                                      torch_carry.xs[key].numpy())
    np.testing.assert_array_equal(np.asarray(jax_carry.resets), torch_carry.resets.numpy())


def test_jax_and_torch_train_the_recorded_rollouts_alike(recorded, jax_run):
    assert_trained_alike(recorded, jax_run)
    # Some updates' gradients are clipped, some not.
    gradient_norms = norms(jax_run[0].grads)
    assert (gradient_norms > recorded.config.max_grad_norm).any()
    assert (gradient_norms < recorded.config.max_grad_norm).any()


@pytest.mark.slow
def test_jax_and_torch_train_the_recorded_rollouts_alike_as_the_example_does():
    recorded = Recorded(DATA)
    assert_trained_alike(recorded, train_jax(recorded))


@pytest.mark.parametrize("control", ["no ratio clip", "no gradient clipping"])
def test_a_different_update_diverges_on_the_same_data(recorded, jax_run, control):
    options = {"clip": 1e9} if control == "no ratio clip" else {"clip_grad_norm": 1e9}
    torch_trajectory, _ = train_torch(recorded, **options)
    largest = compare(jax_run[0], torch_trajectory)
    assert largest["param"] > 1e-6
