"""The RL example (examples/rl/memory_chain.py), run small: a recurrent actor-critic trained
with TBPTT inside one jitted, seed-vmapped loop learns gymnax's MemoryChain, and the
memoryless agent of the same size does not; the results file, its table and the plot it
writes; docs/rl.md shows the committed results file's table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from examples.rl import memory_chain
from examples.rl.memory_chain import Config, main, make_train, summary

ROOT = Path(__file__).resolve().parents[1]


def test_the_recurrent_agent_learns_and_the_memoryless_one_does_not(tmp_path):
    out, plot = tmp_path / "results.json", tmp_path / "plot.png"
    # memory_length 10 (episodes of 11 steps), TBPTT(8, 24): learnt in about 30 rollouts.
    assert main(["--iterations", "60", "--seeds", "2", "--memory-length", "10", "--k2", "24",
                 "--out", str(out), "--plot", str(plot)]) == 0
    results = json.loads(out.read_text())
    recurrent, memoryless = (np.asarray(results["agents"][name]["returns"])
                             for name in ("recurrent", "memoryless"))
    assert recurrent.shape == memoryless.shape == (2, 60)
    # Each seed: the recurrent agent answers right nearly always over the last 10 rollouts
    # (about 90 episodes each); the memoryless one can only guess, for a return of 0.
    assert recurrent[:, -10:].mean(1).min() >= 0.9
    assert np.abs(memoryless[:, -10:].mean(1)).max() <= 0.2
    assert recurrent[:, :5].mean() <= 0.3  # it was not right from the start
    for agent in results["agents"].values():
        assert agent["env_steps"] == 2 * 60 * 32 * 32 and agent["us_per_env_step"] > 0
    assert out.with_suffix(".md").read_text() == summary(results)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_docs_show_the_committed_results():
    results = json.loads(memory_chain.RESULTS.read_text())
    assert Config(**results["config"]) == Config()
    page = (ROOT / "docs" / "rl.md").read_text()
    assert summary(results) in page
    assert memory_chain.RESULTS.with_suffix(".md").read_text() == summary(results)
    assert memory_chain.PLOT.exists()


@pytest.mark.slow
def test_each_seed_of_the_vmapped_run_is_the_run_of_that_seed_alone():
    config = dataclasses.replace(Config(), memory_length=10, iterations=4, seeds=2)
    train = make_train(config, memory=True)
    keys = jax.random.split(jax.random.key(0), config.seeds)
    _, together = jax.jit(jax.vmap(train))(keys)
    for seed in range(config.seeds):
        _, alone = jax.jit(train)(keys[seed])
        for name in ("returns", "episodes", "loss"):
            np.testing.assert_allclose(np.asarray(together[name][seed]),
                                       np.asarray(alone[name]), rtol=1e-5, err_msg=name)
