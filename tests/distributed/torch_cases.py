"""The PyTorch training runs that the distributed tests compare across ranks.

Each case trains an LSTM for 20 updates: a stream of four calls of 5 updates, each rank
keeping its own carry (an `OverlapCarry` when k2 > k1) for its own rows from one call to
the next, with resets in every call. `train` runs a case in one process on the whole
batch (`world_size=1`, the reference) or on this rank's rows under DDP, checkpointed and
resumed mid-stream; the worker script runs it under `torchrun`, the tests in the pytest
process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbptt_torch import checkpoint, distributed, losses, models, tbptt_train_step

BATCH = 8
CALL_STEPS = (20, 20, 20, 20)
INPUT, HIDDEN, OUTPUT = 3, 16, 2

CASES: dict[str, dict[str, Any]] = {
    "k2=k1,sum,float32": {"k1": 4, "k2": 4, "reduction": "sum", "dtype": "float32"},
    "k2>k1,mean,float32": {"k1": 4, "k2": 7, "reduction": "mean", "dtype": "float32"},
    "k2=k1,sum,float64": {"k1": 4, "k2": 4, "reduction": "sum", "dtype": "float64"},
    "k2>k1,mean,float64": {"k1": 4, "k2": 7, "reduction": "mean", "dtype": "float64"},
    # DDP's options for graphs that change or leave parameters unused change nothing here.
    "k2>k1,sum,float64,static_graph": {"k1": 4, "k2": 7, "reduction": "sum",
                                       "dtype": "float64", "ddp": {"static_graph": True}},
    "k2>k1,mean,float64,find_unused_parameters": {
        "k1": 4, "k2": 7, "reduction": "mean", "dtype": "float64",
        "ddp": {"find_unused_parameters": True}},
    # Plain DDP (no summing hook) under reduction="sum" averages the ranks' gradients: with
    # SGD it trains as the whole batch does with the learning rate divided by the ranks.
    "k2=k1,sum,float64,plain DDP,SGD": {"k1": 4, "k2": 4, "reduction": "sum",
                                        "dtype": "float64", "plain_ddp": True, "sgd": True},
}


def data(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xs `[T, B, I]`, ys `[T, B, O]` and resets `[T, B]` of the whole stream, T = 80."""
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((sum(CALL_STEPS), BATCH, INPUT)).astype(dtype)
    ys = np.tanh(xs[..., :OUTPUT] + np.roll(xs[..., :OUTPUT], 3, axis=0)).astype(dtype)
    resets = rng.random(xs.shape[:2]) < 0.04
    resets[[13, 30, 50, 70], [1, 6, 0, 3]] = True  # some in each call, on both ranks' rows
    return xs, ys, resets


def build(case: str, world_size: int, *, learning_rate_scale: float = 1.0, seed: int = 0
          ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """(model, the model as trained: DDP-wrapped when world_size > 1, optimizer)."""
    config = CASES[case]
    torch.manual_seed(seed)
    model = models.LSTMModel(INPUT, HIDDEN, OUTPUT).to(getattr(torch, config["dtype"]))
    learning_rate = 1e-2 * learning_rate_scale
    # Over the model's own parameters, which DDP trains in place (it wraps, never copies).
    optimizer = (torch.optim.SGD(model.parameters(), lr=learning_rate) if config.get("sgd")
                 else torch.optim.Adam(model.parameters(), lr=learning_rate))
    return model, wrap(case, model, world_size), optimizer


def wrap(case: str, model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    config = CASES[case]
    if world_size == 1:
        return model
    options = config.get("ddp", {})
    if config.get("plain_ddp"):
        return torch.nn.parallel.DistributedDataParallel(model, **options)
    return distributed.data_parallel(model, reduction=config["reduction"], **options)


def train(case: str, world_size: int = 1, *, learning_rate_scale: float = 1.0,
          checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Trains one case, under DDP on this rank's rows when `world_size > 1`.

    With `checkpoint_dir`, each rank saves its state (`tbptt_torch.checkpoint`, one file per
    rank: the same weights, its own carry) after the second call, and the run goes on in a
    fresh model and optimizer (other initial weights) restored from it, wrapped anew.

    Returns the full batch's losses of the 20 updates (reduced over ranks), the final
    parameters and this process's rows of the final carry, as numpy.
    """
    config = CASES[case]
    model, trained, optimizer = build(case, world_size, learning_rate_scale=learning_rate_scale)
    rows = distributed.rank_rows(BATCH) if world_size > 1 else slice(None)
    xs, ys, resets = (torch.from_numpy(array[:, rows].copy()) for array in data(config["dtype"]))

    # A bare DDP wrapper hides its module's initial_carry: the carry is passed explicitly.
    carry = (model.initial_carry(xs.shape[1]) if config.get("plain_ddp") and world_size > 1
             else None)
    step_losses, start = [], 0
    for call, steps in enumerate(CALL_STEPS):
        if call == 2 and checkpoint_dir is not None:
            path = Path(checkpoint_dir) / f"rank{torch.distributed.get_rank()}.pt"
            checkpoint.save(path, model=model, optimizer=optimizer, carry=carry, position=call)
            model, _, optimizer = build(case, 1, learning_rate_scale=learning_rate_scale,
                                        seed=1)
            carry = checkpoint.restore(path, model=model, optimizer=optimizer).carry
            trained = wrap(case, model, world_size)
        window = slice(start, start + steps)
        carry, call_losses = tbptt_train_step(
            trained, optimizer, carry, xs[window], ys[window], resets=resets[window],
            loss_fn=losses.mse, k1=config["k1"], k2=config["k2"],
            reduction=config["reduction"])
        if world_size > 1:
            call_losses = distributed.reduce_losses(call_losses, config["reduction"])
        step_losses.append(call_losses.numpy())
        start += steps
    state = getattr(carry, "state", carry)
    return {
        "loss": np.concatenate(step_losses),
        "params": {name: value.detach().numpy().copy()
                   for name, value in model.state_dict().items()},
        "carry": [part.numpy().copy() for part in state],
        "rows": (rows.start or 0, rows.stop or BATCH),
    }
