"""A real training run that checkpoints after every segment and resumes from the latest one.

`tests/test_checkpoint.py` runs it as a subprocess, kills it with SIGKILL part-way and runs
it again to finish, then holds its final state to that of a run never interrupted. It
trains an LSTM with TBPTT(3, 5), so the carry holds an overlap, on one stream fed segment
by segment, with episode resets, and adds noise to each segment's inputs drawn from the run's
RNG (a JAX key in the state; torch's global generator), so a resumed run must restore the
RNG too to end with the same bits.

    python tests/checkpoint_worker.py {jax,torch} WORKDIR [--stall-after N]
    python tests/checkpoint_worker.py jax WORKDIR --processes 2 --process-id I --port PORT

It checkpoints to WORKDIR (`checkpoints/` for JAX, `checkpoint.pt` for torch) and, after
saving segment n, creates `WORKDIR/saved-<n>`. With `--stall-after N` it trains segment
N + 1 after saving segment N, creates `WORKDIR/stalled` and sleeps until killed, the state
of segment N + 1 never saved. Finishing, it writes `WORKDIR/final.npz`: every array of the
final state, the loss of every update of the run, and the position it started from.

With `--processes 2` (JAX only) the same run is one of two processes joined by
`jax.distributed.initialize` on localhost, the batch split over one CPU device each
(`tbptt_jax.sharding`): both save every segment and restore from the same directory, each
writing its own shards. Each marks what it did with its index (`saved-<n>-<i>`,
`stalled-<i>`); process 0 writes `final.npz` with the whole final state.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

SEGMENTS, SEGMENT_STEPS, BATCH, INPUT, HIDDEN, OUTPUT = 6, 3, 4, 3, 8, 2
K1, K2, NOISE = 3, 5, 0.1


def stream() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole stream, `xs[T, B, I]`, `ys[T, B, O]`, `resets[T, B]`, float64."""
    rng = np.random.default_rng(0)
    steps = SEGMENTS * SEGMENT_STEPS
    return (rng.normal(size=(steps, BATCH, INPUT)), rng.normal(size=(steps, BATCH, OUTPUT)),
            rng.random((steps, BATCH)) < 0.1)


def segment(arrays: tuple[np.ndarray, ...], index: int) -> tuple[np.ndarray, ...]:
    return tuple(a[index * SEGMENT_STEPS:(index + 1) * SEGMENT_STEPS] for a in arrays)


def run_jax(workdir: Path, stall_after: int | None, processes: int = 1, process_id: int = 0,
            port: int | None = None) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import tbptt_jax
    from tbptt_jax import checkpoint, sharding

    jax.config.update("jax_enable_x64", True)
    if processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{port}", num_processes=processes,
                                   process_id=process_id, initialization_timeout=60)
    mesh = sharding.data_mesh() if processes > 1 else None
    model = tbptt_jax.models.lstm(INPUT, HIDDEN, OUTPUT)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    params = model.init(jax.random.PRNGKey(0), jnp.float64)
    # Split over processes, the carry must be placed, so it cannot start as None.
    carry = None if mesh is None else model.initial_carry(BATCH, jnp.float64)
    state = checkpoint.TrainState(params, optimizer.init(params), carry, 0,
                                  jax.random.key(1), {"losses": []})
    directory = workdir / "checkpoints"
    if checkpoint.latest_step(directory) is not None:
        state = checkpoint.restore(directory, like=state)
    if mesh is not None:  # restored whole on every process: placed on the mesh again
        state = state._replace(**dict(zip(("params", "opt_state", "carry"), sharding.shard_state(
            mesh, state.params, state.opt_state, state.carry), strict=True)))
    started_at = state.position

    data = stream()
    while state.position < SEGMENTS:
        xs, ys, resets = segment(data, state.position)
        rng, noise_key = jax.random.split(state.rng)
        xs = np.asarray(xs + NOISE * jax.random.normal(noise_key, xs.shape, jnp.float64))
        if mesh is not None:
            xs, ys, resets = sharding.shard_batch(mesh, xs, ys, resets)
        params, opt_state, carry, metrics = tbptt_jax.tbptt_train_step(
            state.params, state.opt_state, state.carry, jnp.asarray(xs), jnp.asarray(ys),
            apply_fn=model.apply, loss_fn=tbptt_jax.losses.mse, optimizer=optimizer,
            k1=K1, k2=K2, resets=jnp.asarray(resets))
        losses = state.metadata["losses"] + np.asarray(metrics["loss"]).tolist()
        state = checkpoint.TrainState(params, opt_state, carry, state.position + 1, rng,
                                      {"losses": losses})
        if stall_after is not None and state.position == stall_after + 1:
            stall(workdir, process_id if processes > 1 else None)
        checkpoint.save(directory, state.position, state, max_to_keep=2)
        suffix = f"-{process_id}" if processes > 1 else ""
        (workdir / f"saved-{state.position}{suffix}").touch()

    arrays = (state.params, state.opt_state, state.carry, jax.random.key_data(state.rng))
    if mesh is not None:
        from jax.experimental import multihost_utils

        arrays = multihost_utils.process_allgather(arrays, tiled=True)
        jax.distributed.shutdown()
        if process_id:
            return
    leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
    final = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}
    write_final(workdir, final, state.metadata["losses"], started_at)


def run_torch(workdir: Path, stall_after: int | None) -> None:
    import torch

    import tbptt_torch
    from tbptt_torch import checkpoint

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tbptt_torch.models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    carry, position, metadata = None, 0, {"losses": []}
    path = workdir / "checkpoint.pt"
    if path.exists():
        carry, position, metadata = checkpoint.restore(path, model=model, optimizer=optimizer)
    started_at = position

    data = stream()
    while position < SEGMENTS:
        xs, ys, resets = (torch.from_numpy(a) for a in segment(data, position))
        xs = xs + NOISE * torch.randn(xs.shape, dtype=torch.float64)
        carry, losses = tbptt_torch.tbptt_train_step(
            model, optimizer, carry, xs, ys, loss_fn=tbptt_torch.losses.mse, k1=K1, k2=K2,
            resets=resets)
        position += 1
        metadata = {"losses": metadata["losses"] + losses.tolist()}
        if stall_after is not None and position == stall_after + 1:
            stall(workdir)
        checkpoint.save(path, model=model, optimizer=optimizer, carry=carry,
                        position=position, metadata=metadata)
        (workdir / f"saved-{position}").touch()

    final = {f"model.{name}": tensor.numpy() for name, tensor in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        final.update({f"optimizer.{index}.{name}": value.numpy()
                      for name, value in state.items()})
    final.update({f"carry.state[{i}]": part.numpy() for i, part in enumerate(carry.state)})
    final.update({"carry.xs": carry.xs.numpy(), "carry.resets": carry.resets.numpy(),
                  "torch_rng": torch.get_rng_state().numpy()})
    write_final(workdir, final, metadata["losses"], started_at)


def stall(workdir: Path, process_id: int | None = None) -> None:
    """Announces that a segment was trained but not saved, and waits to be killed."""
    (workdir / ("stalled" if process_id is None else f"stalled-{process_id}")).touch()
    while True:
        time.sleep(1)


def write_final(workdir: Path, final: dict[str, np.ndarray], losses: list[float],
                started_at: int) -> None:
    np.savez(workdir / "final.npz", **final, losses=np.asarray(losses),
             started_at=np.asarray(started_at))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("framework", choices=("jax", "torch"))
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--processes", type=int, default=1, help="JAX processes in the run")
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--port", type=int, default=None, help="process 0's port")
    args = parser.parse_args()
    if args.framework == "torch":
        if args.processes != 1:
            parser.error("--processes: the torch run is one process")
        run_torch(args.workdir, args.stall_after)
    else:
        run_jax(args.workdir, args.stall_after, args.processes, args.process_id, args.port)


if __name__ == "__main__":
    main()
