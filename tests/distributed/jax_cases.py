"""The JAX training runs that the distributed tests compare across device counts.

Each case trains a model (an LSTM, a tuple carry, unless the case names another cell) with
Adam for 20 updates: a stream of four calls of 5 updates, so the carry (an `OverlapCarry`
when k2 > k1) travels from one call to the next sharded as the trainer returned it, and
the later calls must not compile. With k2 > k1 the stream starts as if restored mid-way,
from an `OverlapCarry` holding its first k2 - k1 steps, so every call has the same shapes.
The sequences have resets. `train` runs a case on one device (`mesh=None`, the reference)
or data parallel on a mesh; the worker scripts run it in processes with several devices,
the tests in the pytest process with one.

The mesh is one "data" axis of `Auto` type unless the case names another kind (`MESHES`):
one `Explicit` axis (the batch's split in every array's type), or a 2 x 2 mesh mixing the
two, the batch split over its "data" axis and replicated over "model". The cases named
"<cell> on <mesh>" run in float64 with k2 > k1, each cell on each kind of mesh; all but
the GRU's run under `jax.set_mesh(mesh)`, as JAX's sharding guide does, the GRU's without.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType

from tbptt_jax import OverlapCarry, checkpoint, losses, models, sharding, tbptt_train_step
from tbptt_jax._trainer import _jitted_step

BATCH = 8  # divisible by 4 devices and by 2 processes x 2 devices
CALL_STEPS = (20, 20, 20, 20)
INPUT, HIDDEN, OUTPUT = 3, 16, 2

CASES: dict[str, dict[str, Any]] = {
    "k2=k1,sum,float32": {"k1": 4, "k2": 4, "reduction": "sum", "dtype": "float32"},
    "k2>k1,mean,float32": {"k1": 4, "k2": 7, "reduction": "mean", "dtype": "float32"},
    "k2=k1,sum,float64": {"k1": 4, "k2": 4, "reduction": "sum", "dtype": "float64"},
    "k2>k1,mean,float64": {"k1": 4, "k2": 7, "reduction": "mean", "dtype": "float64"},
}
# The kinds of mesh: the type of the batch's axis, then that of the other axis, if any.
MESHES = {"auto": (AxisType.Auto,), "explicit": (AxisType.Explicit,),
          "explicit+auto": (AxisType.Explicit, AxisType.Auto),
          "auto+explicit": (AxisType.Auto, AxisType.Explicit)}
CASES.update({f"{cell} on {mesh}": {"k1": 4, "k2": 7, "reduction": "mean", "dtype": "float64",
                                    "cell": cell, "mesh": mesh, "set_mesh": cell != "gru"}
              for mesh in MESHES for cell in ("lstm", "gru", "elman")})


def make_mesh(case: str) -> jax.sharding.Mesh:
    """The case's mesh over every device (of every process), the batch on "data"."""
    types = MESHES[CASES[case].get("mesh", "auto")]
    if len(types) == 1:
        return sharding.data_mesh(axis_type=types[0])
    return jax.make_mesh((2, len(jax.devices()) // 2), (sharding.DATA, "model"), types)


def data(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xs `[T, B, I]`, ys `[T, B, O]` and resets `[T, B]` of the whole stream, T = 88."""
    rng = np.random.default_rng(6)
    steps = sum(CALL_STEPS) + 8
    xs = rng.standard_normal((steps, BATCH, INPUT)).astype(dtype)
    ys = np.tanh(xs[..., :OUTPUT] + np.roll(xs[..., :OUTPUT], 3, axis=0)).astype(dtype)
    resets = rng.random((steps, BATCH)) < 0.04
    resets[[1, 13, 30, 50, 70], [2, 1, 6, 0, 3]] = True  # some in the overlap and each call
    return xs, ys, resets


def train(case: str, mesh: jax.sharding.Mesh | None = None, *, local: bool = False,
          checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """Trains one case; on `mesh` data parallel (each process feeding its rows if `local`).

    With `checkpoint_dir`, the sharded run is saved after its second call and goes on from
    what is restored (`save_and_restore`), as a run resumed after a stop would.

    Returns the losses of the 20 updates, the final parameters and the final carry (its
    whole batch, gathered from every process), as numpy, and, on a mesh, what the
    sharded run left where: the sharding specs of the outputs and the compile count.
    """
    config = CASES[case]
    dtype = config["dtype"]
    model = getattr(models, config.get("cell", "lstm"))(INPUT, HIDDEN, OUTPUT)
    optimizer = optax.adam(1e-2)
    params = model.init(jax.random.key(0), jnp.dtype(dtype))
    opt_state = optimizer.init(params)
    xs, ys, resets = data(dtype)
    rows = sharding.process_rows(mesh, BATCH) if local else slice(None)
    carry = jax.tree.map(lambda part: np.asarray(part)[:, rows],
                         model.initial_carry(BATCH, jnp.dtype(dtype)))
    overlap = config["k2"] - config["k1"]
    if overlap:
        carry = OverlapCarry(carry, xs[:overlap, rows], resets[:overlap, rows])
        xs, ys, resets = xs[overlap:], ys[overlap:], resets[overlap:]
    if mesh is not None:
        params, opt_state, carry = sharding.shard_state(mesh, params, opt_state, carry,
                                                        local=local)
        placed = [leaf.sharding for leaf in jax.tree.leaves(carry)]

    step_losses, compiles, kept = [], [], []
    bounds = np.cumsum((0, *CALL_STEPS))
    for call, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if call == 2 and checkpoint_dir is not None:
            params, opt_state, carry = save_and_restore(checkpoint_dir, mesh, params,
                                                        opt_state, carry)
        steps = slice(start, stop)
        batch = xs[steps, rows], ys[steps, rows], resets[steps, rows]
        if mesh is not None:
            batch = sharding.shard_batch(mesh, *batch, local=local)
        params, opt_state, carry, metrics = tbptt_train_step(
            params, opt_state, carry, batch[0], batch[1], resets=batch[2],
            apply_fn=model.apply, loss_fn=losses.mse, optimizer=optimizer, k1=config["k1"],
            k2=config["k2"], reduction=config["reduction"])
        step_losses.append(np.asarray(metrics["loss"]))
        compiles.append(_jitted_step._cache_size())
        if mesh is not None:  # the carry comes back as it went in, to the last None
            kept.append([leaf.sharding for leaf in jax.tree.leaves(carry)] == placed)

    state = getattr(carry, "state", carry)
    result = {
        "loss": np.concatenate(step_losses),
        "params": {name: np.asarray(value) for name, value in params.items()},
        "carry": [np.asarray(part) for part in jax.tree.leaves(_gather(state))],
    }
    if mesh is not None:
        specs = {name: tuple(value.sharding.spec) for name, value in params.items()}
        specs.update({f"opt_state.{i}": tuple(leaf.sharding.spec)
                      for i, leaf in enumerate(jax.tree.leaves(opt_state))})
        specs.update({f"carry.{i}": tuple(leaf.sharding.spec)
                      for i, leaf in enumerate(jax.tree.leaves(carry))})
        result["specs"] = specs
        result["compiles"] = compiles
        result["carry kept its sharding"] = kept
        result["carry types"] = [str(jax.typeof(leaf)) for leaf in jax.tree.leaves(carry)]
    return result


def save_and_restore(directory: Path, mesh: jax.sharding.Mesh, params: Any, opt_state: Any,
                     carry: Any) -> tuple[Any, Any, Any]:
    """Checkpoints a sharded run and restores it, placed on the mesh again, as
    docs/distributed.md shows: `tbptt_jax.checkpoint` on every process (each writing the
    shards it holds), the state restored whole and placed with `shard_state`."""
    checkpoint.save(directory, 2, checkpoint.TrainState(params, opt_state, carry, position=2))
    restored = checkpoint.restore(directory, checkpoint.TrainState(params, opt_state))
    return sharding.shard_state(mesh, restored.params, restored.opt_state, restored.carry)


def _gather(tree: Any) -> Any:
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
