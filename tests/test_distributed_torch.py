"""PyTorch TBPTT under DistributedDataParallel gives the losses, parameters and carry of one
process on the whole batch.

One `torchrun --standalone --nproc_per_node 2` job (gloo on localhost, a free port of its
own choosing) runs every case of `distributed/torch_cases.py`, each rank training its own
rows and keeping its own carry across four calls; this process trains the same streams
on the whole batch. Agreement is to 1e-5 (float32) and 1e-10 (float64) relative to each
tensor's largest magnitude. The cases cover k2 = k1 and k2 > k1 with resets, both
reductions (the "sum" one through `data_parallel`'s summing hook), DDP's `static_graph`
and `find_unused_parameters`, and plain DDP under "sum", which trains as the whole batch
with the learning rate halved. Each rank checkpoints after the second call
(`tbptt_torch.checkpoint`, a file per rank) and the run goes on in a fresh model restored
from it, as docs/distributed.md shows.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tbptt_torch import distributed

HERE = Path(__file__).parent / "distributed"
ROOT = Path(__file__).parent.parent
JOB_TIMEOUT_S = 240  # the job takes ~12 s of CPU; the rest is room for a loaded machine
WORLD_SIZE = 2

_spec = importlib.util.spec_from_file_location("torch_cases", HERE / "torch_cases.py")
torch_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_cases)

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


@functools.cache
def reference(case: str) -> dict[str, Any]:
    # Plain DDP averages the two ranks' summed-loss gradients: half the batch's gradient.
    scale = 1 / WORLD_SIZE if torch_cases.CASES[case].get("plain_ddp") else 1.0
    return torch_cases.train(case, learning_rate_scale=scale)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every rank's results of one torchrun job over all cases."""
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(WORLD_SIZE), str(HERE / "torch_worker.py"), str(out)]
    with open(out / "job.log", "w") as log:
        # A session of its own, so a hung job is ended with its ranks, not only torchrun.
        job = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            code = job.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            code = "timed out"
    if code != 0:
        pytest.fail(f"torchrun job: {code}\n{(out / 'job.log').read_text()[-4000:]}")
    results = []
    for rank in range(WORLD_SIZE):
        with open(out / f"rank{rank}.pkl", "rb") as file:
            results.append({**pickle.load(file), "out": out})
    return results


def ranks_dir(ranks: list[dict[str, Any]]) -> Path:
    return ranks[0]["out"]


@pytest.mark.parametrize("case", list(torch_cases.CASES))
def test_two_ranks_match_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    expected = reference(case)
    tolerance = TOLERANCE[torch_cases.CASES[case]["dtype"]]
    for rank, result in enumerate(ranks):
        assert result["world_size"] == WORLD_SIZE
        got = result["results"][case]
        lo, hi = got["rows"]
        assert (lo, hi) == (rank * 4, rank * 4 + 4)
        pairs = [("loss", got["loss"], expected["loss"])]
        pairs += [(f"params[{name!r}]", got["params"][name], value)
                  for name, value in expected["params"].items()]
        # Each rank's carry is that of its own rows of the batch.
        pairs += [(f"carry[{i}]", mine, whole[:, lo:hi])
                  for i, (mine, whole) in enumerate(zip(got["carry"], expected["carry"],
                                                        strict=True))]
        assert len(got["loss"]) == 20
        # The run went on from this rank's checkpoint, in a model restored from it.
        assert (ranks_dir(ranks) / "checkpoints" / case / f"rank{rank}.pt").is_file()
        for what, actual, wanted in pairs:
            assert actual.shape == wanted.shape, what
            error = np.max(np.abs(actual - wanted)) / np.max(np.abs(wanted))
            assert error <= tolerance, f"{case}, rank {rank}: {what} is {error:.2e} off"


def test_rank_rows_are_equal_contiguous_shares() -> None:
    assert [distributed.rank_rows(12, rank, 3) for rank in range(3)] == [
        slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ValueError, match="batch_size must be a multiple of the world size 4 "):
        distributed.rank_rows(10, 0, 4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size = 2\), got 2"):
        distributed.rank_rows(8, 2, 2)


def test_data_parallel_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        distributed.data_parallel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reduction must be one of"):
        distributed.data_parallel(torch.nn.Linear(2, 2), reduction="max")
