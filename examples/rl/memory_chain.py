"""A recurrent actor-critic trained with TBPTT on gymnax's MemoryChain, the whole training
loop (rollouts and updates) one compiled program, vmapped over seeds.

MemoryChain (bsuite's memory task): an episode shows a random context bit at its start,
then `memory_length` steps of nothing useful, then asks for the bit; the right action is
worth +1, the wrong one -1, every other step 0. A policy of the current observation alone
can only guess (expected return 0); one that remembers scores 1.

Each iteration collects a rollout of `rollout_steps` steps from `num_envs` environments
with `lax.scan` (episode starts become the trainer's `resets`), computes advantages (GAE)
with the values the policy saw, and trains on it with one `trainer.step`: TBPTT(k1, k2),
one PPO update per k1 steps, each backpropagating through k2 steps. The trainer's state
(its carry, and the k2 - k1 steps of overlap) streams from one rollout's call to the
next, so an update near a rollout's start backpropagates into the previous rollout's
steps. All iterations are a `lax.scan`; the run is `jax.jit(jax.vmap(train))` over seeds.

Run (writes the results file, its table and the plot of return against environment steps):

    .venv/bin/python -m examples.rl.memory_chain
    .venv/bin/python -m examples.rl.memory_chain --help

`--record PATH` instead writes two consecutive rollouts of an untrained agent (the parity
tests' recorded batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tbptt_jax
from examples.rl.agent import ActorCritic, ppo_loss

Array = jax.Array
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "memory_chain.json"
PLOT = HERE.parents[1] / "docs" / "images" / "rl_memory_chain.png"


@dataclasses.dataclass(frozen=True)
class Config:
    """What a run trains: the task, the agent, TBPTT and PPO."""

    memory_length: int = 20  # steps from the context to the question
    num_envs: int = 32  # environments per seed, the trainer's batch B
    rollout_steps: int = 32  # steps per rollout, one trainer.step's T
    iterations: int = 300  # rollouts (and trainer.step calls) per seed
    seeds: int = 8
    k1: int = 8  # steps each update owns: rollout_steps / k1 updates per rollout
    k2: int = 32  # steps each update backpropagates through: its k1 and 24 before them,
    # more than an episode (memory_length + 1 steps), so every loss step's gradient reaches
    # back to its episode's context
    hidden_size: int = 32
    learning_rate: float = 3e-3
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01

    @property
    def env_steps(self) -> int:
        """Environment steps per seed."""
        return self.iterations * self.rollout_steps * self.num_envs


def make_env(config: Config) -> tuple[Any, Any]:
    env, params = gymnax.make("MemoryChain-bsuite")
    return env, params.replace(memory_length=config.memory_length)


def make_agent(config: Config, memory: bool) -> ActorCritic:
    env, env_params = make_env(config)
    return ActorCritic(env.observation_space(env_params).shape[0], env.num_actions,
                       config.hidden_size, memory)


def make_optimizer(config: Config) -> optax.GradientTransformation:
    # torch's clip_grad_norm_ exactly (it divides by norm + 1e-6), so that the torch twin
    # trains the same (docs/optimizers.md); then Adam.
    return optax.chain(tbptt_jax.optim.clip_by_global_norm_torch(config.max_grad_norm),
                       optax.adam(config.learning_rate))


def make_trainer(config: Config, agent: ActorCritic) -> tbptt_jax.Trainer:
    return tbptt_jax.trainer(
        agent.apply, ppo_loss(config.clip, config.value_coef, config.entropy_coef),
        make_optimizer(config), k1=config.k1, k2=config.k2)


class Transition(NamedTuple):
    """One step of every environment, as the rollout's `lax.scan` stacks it to `[T, B]`."""

    obs: Array  # [B, O]: what the agent saw
    prev_action: Array  # [B], int32: its previous action, num_actions at an episode's start
    first: Array  # [B], bool: the step starts an episode (the trainer's resets)
    action: Array  # [B], int32
    log_prob: Array  # [B]: log pi(action) of the policy that acted
    value: Array  # [B]: the value it estimated
    reward: Array  # [B]
    done: Array  # [B], bool: the episode ended with this step


class Runner(NamedTuple):
    """What one iteration hands the next."""

    train: tbptt_jax.TBPTTState  # the trainer's stream: params, optimizer state, carry, overlap
    env_state: Any
    obs: Array  # [B, O]
    prev_action: Array  # [B], int32
    first: Array  # [B], bool
    act_carry: Array  # [1, B, H]: the acting policy's carry
    episode_return: Array  # [B]: reward so far in each environment's episode
    key: Array


def advantages(rollout: Transition, last_value: Array, gamma: float, gae_lambda: float
               ) -> tuple[Array, Array]:
    """GAE(gamma, lambda) advantages and the returns (advantages + values), `[T, B]` each;
    no bootstrapping across an episode's end."""
    def back(carry, step):
        next_advantage, next_value = carry
        reward, value, done = step
        live = 1.0 - done.astype(value.dtype)
        delta = reward + gamma * next_value * live - value
        advantage = delta + gamma * gae_lambda * live * next_advantage
        return (advantage, value), advantage

    _, advantage = jax.lax.scan(back, (jnp.zeros_like(last_value), last_value),
                                (rollout.reward, rollout.value, rollout.done), reverse=True)
    return advantage, advantage + rollout.value


def make_train(config: Config, memory: bool, *, record: bool = False
               ) -> Callable[[Array], tuple[Any, dict[str, Array]]]:
    """`train(key) -> (runner, metrics)`: a whole training run of one seed, pure and
    traceable (jit and vmap it). `metrics` holds per-iteration `[iterations]` arrays:
    "returns" (summed returns of the episodes finished in the rollout), "episodes" (their
    number) and "loss" (the mean of the rollout's update losses). With `record`, it also
    holds each rollout's structured `xs`, `ys` and `resets`, as the trainer got them, and
    the `params` that collected it."""
    env, env_params = make_env(config)
    agent = make_agent(config, memory)
    trainer = make_trainer(config, agent)
    dtype = jnp.float32
    batch = config.num_envs
    step_env = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def inputs(obs: Array, prev_action: Array) -> dict[str, Array]:
        return {"obs": obs[None], "prev_action": prev_action[None]}

    def env_step(runner: Runner, _) -> tuple[Runner, tuple[Transition, Array]]:
        """One step of every environment; also the return of each episode it ends (else 0)."""
        params = runner.train.params
        act_carry, out = agent.apply(params, runner.act_carry,
                                     inputs(runner.obs, runner.prev_action), runner.first[None])
        logits, value = out["logits"][0], out["value"][0]
        key, act_key, env_key = jax.random.split(runner.key, 3)
        action = jax.random.categorical(act_key, logits).astype(jnp.int32)
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], -1)[:, 0]
        obs, env_state, reward, terminated, truncated, _ = step_env(
            jax.random.split(env_key, batch), runner.env_state, action, env_params)
        reward = reward.astype(dtype)
        done = terminated | truncated
        transition = Transition(runner.obs, runner.prev_action, runner.first, action, log_prob,
                                value, reward, done)
        episode_return = runner.episode_return + reward
        runner = runner._replace(
            env_state=env_state, obs=obs.astype(dtype),
            prev_action=jnp.where(done, agent.num_actions, action), first=done,
            act_carry=act_carry, episode_return=jnp.where(done, 0.0, episode_return), key=key)
        return runner, (transition, jnp.where(done, episode_return, 0.0))

    def iteration(runner: Runner, _) -> tuple[Runner, dict[str, Array]]:
        runner, (rollout, finished) = jax.lax.scan(env_step, runner, None,
                                                   length=config.rollout_steps)
        _, out = agent.apply(runner.train.params, runner.act_carry,
                             inputs(runner.obs, runner.prev_action), runner.first[None])
        advantage, returns = advantages(rollout, out["value"][0], config.gamma,
                                        config.gae_lambda)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        xs = {"obs": rollout.obs, "prev_action": rollout.prev_action}
        ys = {"action": rollout.action, "old_logp": rollout.log_prob, "advantage": advantage,
              "return": returns}
        train_state, train_metrics = trainer.step(runner.train, xs, ys, resets=rollout.first)
        metrics = {"returns": finished.sum(), "episodes": rollout.done.sum(),
                   "loss": train_metrics["loss"].mean()}
        if record:
            metrics.update(xs=xs, ys=ys, resets=rollout.first, params=runner.train.params)
        return runner._replace(train=train_state), metrics

    def train(key: Array) -> tuple[Runner, dict[str, Array]]:
        init_key, reset_key, key = jax.random.split(key, 3)
        params = agent.init(init_key, dtype)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(
            jax.random.split(reset_key, batch), env_params)
        obs = obs.astype(dtype)
        prev_action = jnp.full((batch,), agent.num_actions, jnp.int32)
        # resets=True: the state holds the overlap's resets from the first call on, so it
        # keeps one structure through the scan.
        state = trainer.init(params, inputs(obs, prev_action), resets=True)
        runner = Runner(state, env_state, obs, prev_action, jnp.ones((batch,), bool),
                        agent.initial_carry(batch, dtype), jnp.zeros((batch,), dtype), key)
        return jax.lax.scan(iteration, runner, None, length=config.iterations)

    return train


def run(config: Config, memory: bool) -> dict[str, Any]:
    """Compiles and runs `config.seeds` seeds of one agent; returns what the results file
    holds for it: per-seed mean episode return of each iteration, compile and run times."""
    train = jax.jit(jax.vmap(make_train(config, memory)))
    keys = jax.random.split(jax.random.key(0), config.seeds)
    start = time.perf_counter()
    compiled = train.lower(keys).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    _, metrics = jax.block_until_ready(compiled(keys))
    run_s = time.perf_counter() - start
    returns = np.asarray(metrics["returns"]) / np.maximum(np.asarray(metrics["episodes"]), 1)
    steps = config.env_steps * config.seeds
    return {"memory": memory, "returns": returns.round(6).tolist(),
            "loss": np.asarray(metrics["loss"]).round(6).tolist(),
            "compile_s": round(compile_s, 3), "run_s": round(run_s, 3),
            "env_steps": steps, "us_per_env_step": round(1e6 * run_s / steps, 4)}


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "jax": jax.__version__,
            "jax_platform": jax.devices()[0].platform, "gymnax": _version("gymnax"),
            "optax": optax.__version__, "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "system": platform.platform(), "load_average": os.getloadavg()}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _dumps(results: dict[str, Any]) -> str:
    """The results as JSON, each list of numbers (a seed's curve) on one line."""
    return re.sub(r"\[[^\[\]{}]*\]", lambda match: json.dumps(json.loads(match.group(0))),
                  json.dumps(results, indent=1)) + "\n"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)



def record(config: Config, path: Path) -> None:
    """Writes `config.iterations` consecutive rollouts of the recurrent agent, as its trainer
    got them, with the weights the first was collected with and the config, to an npz file
    (the parity tests' recorded batch)."""
    _, metrics = jax.jit(make_train(config, memory=True, record=True))(jax.random.key(0))
    arrays = {f"params/{name}": np.asarray(value[0])
              for name, value in metrics["params"].items()}
    for group in ("xs", "ys"):
        arrays.update({f"{group}/{name}": np.asarray(value)
                       for name, value in metrics[group].items()})
    arrays["resets"] = np.asarray(metrics["resets"])
    arrays["config"] = np.asarray(json.dumps(dataclasses.asdict(config)))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)


AGENTS = {"recurrent": True, "memoryless": False}
REACHED = 0.9  # the return the table counts environment steps to


def summary(results: dict[str, Any]) -> str:
    """The results file as the Markdown table docs/rl.md shows."""
    config = Config(**results["config"])
    steps = config.rollout_steps * config.num_envs
    tail = max(1, config.iterations // 10)
    parameters = sum(math.prod(shape) for shape in
                     make_agent(config, memory=True).param_shapes().values())
    lines = [
        f"MemoryChain-bsuite, memory_length={config.memory_length}: {config.seeds} seeds x "
        f"{config.iterations} rollouts of {config.num_envs} environments x "
        f"{config.rollout_steps} steps ({config.env_steps:,} environment steps per seed); "
        f"both agents a GRU of {config.hidden_size} with {parameters:,} parameters, "
        f"TBPTT(k1={config.k1}, k2={config.k2}). "
        f"JAX {results['environment']['jax']} on {results['environment']['cpus']} CPU "
        f"cores ({results['environment']['cpu']}).",
        "",
        f"| agent | mean return, first {tail} rollouts | mean return, last {tail} rollouts "
        f"(seeds' range) | environment steps to a mean return of {REACHED} | compile s | "
        "run s | us per environment step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, agent in results["agents"].items():
        returns = np.asarray(agent["returns"])  # [seeds, iterations]
        last = returns[:, -tail:].mean(1)
        reached = np.flatnonzero(returns.mean(0) >= REACHED)
        lines.append(
            f"| {name} | {returns[:, :tail].mean():.3f} | {last.mean():.3f} "
            f"({last.min():.3f} to {last.max():.3f}) | "
            f"{f'{(reached[0] + 1) * steps:,}' if reached.size else 'never'} | "
            f"{agent['compile_s']:.1f} | {agent['run_s']:.1f} | {agent['us_per_env_step']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Mean return against environment steps, each agent's mean over seeds and its range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = Config(**results["config"])
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, agent in results["agents"].items():
        returns = np.asarray(agent["returns"])
        steps = np.arange(1, returns.shape[1] + 1) * config.rollout_steps * config.num_envs
        axes.plot(steps, returns.mean(0), label=f"{name} (mean of {returns.shape[0]} seeds)")
        axes.fill_between(steps, returns.min(0), returns.max(0), alpha=0.25)
    axes.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("environment steps (per seed)")
    axes.set_ylabel("mean episode return")
    axes.set_ylim(-1.05, 1.05)
    axes.set_title(f"MemoryChain (memory_length={config.memory_length}), "
                   f"TBPTT(k1={config.k1}, k2={config.k2})")
    axes.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m examples.rl.memory_chain",
        description="Trains a recurrent and a memoryless actor-critic with TBPTT on gymnax's "
                    "MemoryChain; writes the results file, its table and the plot.")
    parser.add_argument("--iterations", type=int, default=defaults.iterations,
                        help="rollouts (and trainer calls) per seed")
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--num-envs", type=int, default=defaults.num_envs)
    parser.add_argument("--memory-length", type=int, default=defaults.memory_length)
    parser.add_argument("--k1", type=int, default=defaults.k1)
    parser.add_argument("--k2", type=int, default=defaults.k2)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="the results file (JSON); its table goes beside it as .md")
    parser.add_argument("--plot", type=Path, default=PLOT, help="the plot (PNG)")
    parser.add_argument("--record", type=Path, default=None,
                        help="write --iterations rollouts of an untrained agent to this npz "
                             "file instead of training")
    args = parser.parse_args(argv)
    config = dataclasses.replace(defaults, iterations=args.iterations, seeds=args.seeds,
                                 num_envs=args.num_envs, memory_length=args.memory_length,
                                 k1=args.k1, k2=args.k2)
    if args.record is not None:
        record(config, args.record)
        print(f"wrote {args.record}")
        return 0
    results = {"config": dataclasses.asdict(config), "environment": environment(),
               "agents": {}}
    for name, memory in AGENTS.items():
        results["agents"][name] = run(config, memory)
        agent = results["agents"][name]
        print(f"{name}: compile {agent['compile_s']:.1f} s, run {agent['run_s']:.1f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dumps(results))
    table = summary(results)
    args.out.with_suffix(".md").write_text(table)
    plot(results, args.plot)
    print(table)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
