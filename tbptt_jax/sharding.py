"""Data-parallel TBPTT over a device mesh: where each of the trainer's arguments lives.

`tbptt_train_step` needs no separate data-parallel version. Its compiled program follows
the shardings of its arguments (`jax.jit`'s "computation follows data"), so it runs data
parallel once they are placed as here: the sequences of the batch split over a `data`
mesh axis (xs, ys and resets `[T, B, ...]` on their axis 1, the carry on its batch axis),
the parameters and optimizer state replicated on every device. The loss and gradient are
then those of the full batch, whatever the number of devices (XLA inserts the all-reduce
of the gradient and of the loss); the parameters, optimizer state and carry come back with
the same shardings, so the next call neither moves data nor recompiles.

On several processes (one per host, after `jax.distributed.initialize`), each process
holds the rows `process_rows(mesh, B)` of the batch and passes `local=True`: its rows
become its part of one global array (`jax.make_array_from_process_local_data`).

The mesh's axes may be `Auto` (XLA chooses where intermediates live: `data_mesh()`'s
default, and `Mesh`'s) or `Explicit` (the split is part of each array's type,
`float32[T,B@data,I]`, and JAX asks where an ambiguous result goes: `jax.make_mesh`'s
default), or a mix; the trainer runs on each, with or without `jax.set_mesh`, and the
placements here are written as it returns them, so its results go back in unchanged.

On one multi-core CPU, `request_cpu_devices` (before JAX's first operation) makes the cores
devices of their own, so the same placement splits the batch over them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tbptt.stream import OverlapCarry

Array = jax.Array

DATA = "data"


def request_cpu_devices(count: int) -> None:
    """Asks XLA for `count` CPU devices, so that one machine's cores can share out the
    batch (each device runs its slice on its own core; one device instead splits each
    per-step kernel over the cores, which at small sizes leaves them idle). XLA fixes the
    number when JAX's backends start, at the first JAX operation of the process: after
    that this changes nothing, and `jax.devices("cpu")` says what there is."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    with contextlib.suppress(RuntimeError):  # the backends have started: keep what is there
        jax.config.update("jax_num_cpu_devices", count)


def data_mesh(devices: Sequence[jax.Device] | None = None, *, axis: str = DATA,
              axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A one-axis mesh for data parallelism.

    Args:
      devices: the devices to split the batch over; default `jax.devices()`, every device
        of every process, in process order (so each process's rows are contiguous).
      axis: the name of the mesh axis the batch is split over.
      axis_type: `AxisType.Auto` (XLA decides where intermediates live; what `Mesh`
        builds by default) or `AxisType.Explicit` (the split is part of every array's
        type, `float32[T,B@data,I]`; what `jax.make_mesh` builds by default). The trainer
        gives the same results on either.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty sequence")
    if axis_type not in (AxisType.Auto, AxisType.Explicit):
        raise ValueError(f"axis_type must be AxisType.Auto or AxisType.Explicit, got "
                         f"{axis_type!r}")
    return Mesh(np.array(devices), (axis,), axis_types=(axis_type,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def _spec(mesh: Mesh, ndim: int, batch_axis: int | None, axis: str) -> PartitionSpec:
    """The spec of an array of `ndim` dimensions, split over `axis` on `batch_axis` (or
    replicated), written as `tbptt_train_step` returns it, so that its results passed back
    in are the same arguments to `jax.jit` (an equal layout written otherwise, `P()` for
    `P(None, None)`, is another signature). A layout that the type describes (a mesh with
    `Explicit` axes, and a split, if any, over one of them) names every dimension; one that
    XLA chose (`Auto` axes) drops the trailing Nones."""
    entries = [None] * ndim
    if batch_axis is not None:
        entries[batch_axis] = axis
    typed = AxisType.Explicit in mesh.axis_types and (
        batch_axis is None or mesh.axis_types[mesh.axis_names.index(axis)] == AxisType.Explicit)
    if not typed:
        while entries and entries[-1] is None:
            entries.pop()
    return PartitionSpec(*entries)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 1, *, axis: str = DATA
                   ) -> NamedSharding:
    """The sharding of an array of `ndim` dimensions split over `axis` on `batch_axis`.

    For xs `[T, B, ...]`, ys and resets `batch_axis` is 1; for the carry of a
    `tbptt_jax.models` model (`[num_layers, B, H]`) it is 1 as well.
    """
    _check_axis(mesh, axis)
    if not 0 <= batch_axis < ndim:
        raise ValueError(f"batch_axis must be in [0, {ndim}) for an array of {ndim} "
                         f"dimensions, got {batch_axis}")
    return NamedSharding(mesh, _spec(mesh, ndim, batch_axis, axis))


def process_rows(mesh: Mesh, batch_size: int, *, axis: str = DATA) -> slice:
    """The rows of a global batch of `batch_size` sequences that this process feeds.

    With `local=True`, each process passes exactly these rows of xs, ys, resets and the
    carry; they are the rows its own devices hold.
    """
    sharding = batch_sharding(mesh, 2, 1, axis=axis)
    _check_divisible("the batch size", batch_size, mesh.shape[axis], "devices", axis)
    indices = sharding.addressable_devices_indices_map((1, batch_size)).values()
    rows = sorted({index[1].indices(batch_size)[:2] for index in indices})
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in zip(rows[:-1], rows[1:], strict=True)):
        raise ValueError(f"mesh: this process's devices hold rows {rows} of the batch, which "
                         "are not contiguous; build the mesh with data_mesh() (devices in "
                         "process order)")
    return slice(start, stop)


def shard_state(mesh: Mesh, params: Any, opt_state: Any, carry: Any, *,
                carry_batch_axis: int = 1, local: bool = False, axis: str = DATA
                ) -> tuple[Any, Any, Any]:
    """Places parameters and optimizer state replicated and the carry split by sequence.

    Args:
      mesh: e.g. `data_mesh()`.
      params: the model's parameters (a pytree), the same on every process.
      opt_state: `optimizer.init(params)`, the same on every process.
      carry: the carry before the first step, e.g. `model.initial_carry(B)`, or an
        `OverlapCarry` (a stream restored mid-way with k2 > k1): its state is split on
        `carry_batch_axis`, its inputs `[n, B, ...]` and resets `[n, B]` on axis 1.
      carry_batch_axis: the batch axis of the carry's leaves; 1 for `tbptt_jax.models`
        (`[num_layers, B, H]`), 0 for a carry of shape `[B, H]`.
      local: False when every process passes the whole batch's carry; True when each
        passes only its rows `process_rows(mesh, B)`.
      axis: the mesh axis the batch is split over.

    Returns:
      `(params, opt_state, carry)` placed on the mesh, ready for `tbptt_train_step`.
    """
    if carry is None:
        raise ValueError("carry: pass the carry to shard, e.g. model.initial_carry(B); None "
                         "would leave the trainer to build an unsharded one")
    _check_axis(mesh, axis)

    def everywhere(leaf: Any) -> Array:
        return _place(leaf, NamedSharding(mesh, _spec(mesh, np.ndim(leaf), None, axis)), False)

    params, opt_state = jax.tree.map(everywhere, params), jax.tree.map(everywhere, opt_state)
    if isinstance(carry, OverlapCarry):
        state = _shard_tree(mesh, carry.state, carry_batch_axis, local, axis, "carry.state")
        xs = _shard_tree(mesh, carry.xs, 1, local, axis, "carry.xs")
        resets = None if carry.resets is None else _shard_tree(
            mesh, carry.resets, 1, local, axis, "carry.resets")
        return params, opt_state, OverlapCarry(state, xs, resets)
    return params, opt_state, _shard_tree(mesh, carry, carry_batch_axis, local, axis, "carry")


def shard_batch(mesh: Mesh, xs: Any, ys: Any, resets: Any = None, *, local: bool = False,
                axis: str = DATA) -> tuple[Array, Array, Array | None]:
    """Splits one call's sequences over the mesh: xs, ys and resets `[T, B, ...]` on axis 1.

    Args:
      mesh: e.g. `data_mesh()`.
      xs, ys: time-major `[T, B, ...]`; with `local=True`, this process's rows only,
        `[T, B / process_count, ...]` (the rows `process_rows(mesh, B)` of the batch).
      resets: optional bool `[T, B]` (or this process's rows of it).
      local: whether each process passes only its own rows (several processes), or every
        process the whole batch (one process; or several that all read the same data).
      axis: the mesh axis the batch is split over.

    Returns:
      `(xs, ys, resets)` as global arrays split by sequence; resets stays None if None.
    """
    _check_axis(mesh, axis)
    xs = _shard_tree(mesh, xs, 1, local, axis, "xs")
    ys = _shard_tree(mesh, ys, 1, local, axis, "ys")
    if resets is not None:
        resets = _shard_tree(mesh, resets, 1, local, axis, "resets")
    return xs, ys, resets


def _shard_tree(mesh: Mesh, tree: Any, batch_axis: int, local: bool, axis: str,
                name: str) -> Any:
    def shard(leaf: Any) -> Array:
        ndim = np.ndim(leaf)
        if ndim <= batch_axis:
            raise ValueError(f"{name} must have a batch axis {batch_axis}, got an array of "
                             f"shape {np.shape(leaf)}")
        devices = _local_shards(mesh, axis) if local else mesh.shape[axis]
        rows = np.shape(leaf)[batch_axis]
        what = "this process's rows" if local else "the batch size"
        _check_divisible(f"{name}: {what}", rows, devices,
                         "devices of this process" if local else "devices", axis)
        return _place(leaf, batch_sharding(mesh, ndim, batch_axis, axis=axis), local)

    return jax.tree.map(shard, tree)


def _place(leaf: Any, sharding: NamedSharding, local: bool) -> Array:
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf
    if local:
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    if jax.process_count() > 1:
        # Every process holds the whole value; each keeps the pieces its devices hold.
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.device_put(leaf, sharding)


def _local_shards(mesh: Mesh, axis: str) -> int:
    """How many of the batch's shares this process's devices hold."""
    position = mesh.axis_names.index(axis)
    return len({index[position] for index, device in np.ndenumerate(mesh.devices)
                if device.process_index == jax.process_index()})


def _check_axis(mesh: Mesh, axis: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must name an axis of the mesh {mesh.axis_names}, got {axis!r}")


def _check_divisible(what: str, rows: int, devices: int, of: str, axis: str) -> None:
    if rows % devices:
        raise ValueError(f"{what} must be a multiple of the {devices} {of} on the mesh axis "
                         f"{axis!r} (each device takes an equal share of the sequences), got "
                         f"{rows}")
