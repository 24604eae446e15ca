"""Checkpoints of a JAX TBPTT run: the whole training state, saved and restored bit for bit.

`save(directory, step, state)` writes a `TrainState` (parameters, optimizer state, the
carry, the position in the stream, RNG keys and JSON metadata) as `<directory>/<step>/`,
and `restore(directory, like)` reads the latest step back with the same pytree types,
dtypes and bits. The carry may be an `OverlapCarry` (k2 > k1), whose overlap buffer travels
with it, so a stream resumed from a checkpoint continues exactly as if it had never stopped
(SPEC §1: streaming is exact). One process or every process of a `jax.distributed` run
calls them alike: orbax's `CheckpointManager` keeps the steps (which exist, the latest,
`max_to_keep`) and, on several processes, has each write the shards its devices hold and
waits for all at its barriers.

A step holds the arrays, written by orbax (`arrays/`), and `manifest.json`: every leaf's
path, shape, dtype and SHA-256, the SHA-256 of every file in `arrays/`, and a digest of the
manifest itself. orbax writes the step as `<step>.orbax-checkpoint-tmp/` and renames it to
`<step>/` once every process has written; just before, the first process writes the
manifest and syncs every file to disk (which orbax leaves out), so a run killed mid-save
leaves the earlier steps as they were and no half-written step among them. Every file is
checked before orbax reads it: a truncated or corrupted step raises `CheckpointError`
naming the file and what is wrong (orbax alone would raise tensorstore's errors, or none
for a damaged JSON file), a missing one `FileNotFoundError`; neither is ever a silent
fresh start. orbax is imported by this module's functions, not with `tbptt_jax`
(`pip install tbptt[checkpoint]`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tbptt.checks import check_int
from tbptt.stream import OverlapCarry

FORMAT = "tbptt_jax.checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays"  # the step's one orbax item
UNFINISHED = ".orbax-checkpoint-tmp"  # orbax's mark of a step being written, or killed so
# The groups of a TrainState that `restore` rebuilds from `like`; the carry describes itself,
# since its structure changes along a stream (a model carry, then an OverlapCarry).
_LIKE_GROUPS = ("params", "opt_state", "rng")
_PYTHON_SCALARS = {"bool": bool, "int": int, "float": float}


class TrainState(NamedTuple):
    """Everything a TBPTT run needs to continue: what `save` writes and `restore` returns.

    `params`, `opt_state` and `rng` may be any pytrees of arrays (jax or numpy), typed or
    raw PRNG keys and Python numbers, with None and empty nodes (optax's `EmptyState`)
    anywhere. `carry` is built of arrays, tuples, lists, dicts with str keys and
    `OverlapCarry`, or is None (the model's zero carry).
    """

    params: Any  # the model's parameters, e.g. a flat dict of arrays
    opt_state: Any  # optimizer.init(params), or what tbptt_train_step returned
    carry: Any = None  # the carry to continue the stream with; an OverlapCarry if k2 > k1
    position: int = 0  # how far into the stream training has got, in the caller's unit
    rng: Any = None  # a jax.random key (typed or raw), a pytree of them, or None
    metadata: Mapping[str, Any] | None = None  # JSON-serialisable, e.g. a loss history


class CheckpointError(Exception):
    """A checkpoint exists but cannot be restored: it is truncated or corrupted."""


def all_steps(directory: str | Path) -> list[int]:
    """The saved steps in `directory`, oldest first; [] if there is none, or no directory.

    A step whose save never finished (`<step>.orbax-checkpoint-tmp/`) does not count.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        return []
    with _manager(directory) as manager:
        return sorted(manager.all_steps())


def latest_step(directory: str | Path) -> int | None:
    """The newest saved step in `directory`, or None when there is none (nor the directory)."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def save(directory: str | Path, step: int, state: TrainState, *,
         max_to_keep: int | None = None) -> Path:
    """Writes `state` as `<directory>/<step>/`, atomically; returns that path.

    Args:
      directory: where the steps live, one subdirectory each; created if missing.
      step: the checkpoint's number, above every step already saved (e.g. the count of
        segments trained).
      state: the `TrainState` to write.
      max_to_keep: once the step is written, delete all but this many newest steps
        (None keeps all).

    When this returns, the step is complete and synced to disk. On several processes (a
    `jax.distributed` run), every process calls `save` with the same arguments: arrays
    split over processes are written shard by shard, each by a process that holds it,
    the rest by the first process.
    """
    step = check_int("step", step, minimum=0)
    if max_to_keep is not None:
        check_int("max_to_keep", max_to_keep)
    if not isinstance(state, TrainState):
        raise ValueError(f"state must be a tbptt_jax.checkpoint.TrainState, got "
                         f"{type(state).__name__}")
    position = check_int("state.position", state.position, minimum=0)
    metadata = _check_metadata(state.metadata)
    directory = Path(directory).absolute()
    latest = latest_step(directory)
    if latest is not None and step <= latest:
        raise ValueError(f"step must be greater than the latest step saved in {directory}, "
                         f"{latest}; got {step}")
    leaves: list[dict[str, Any]] = []
    arrays: dict[str, Any] = {}
    groups = {name: _encode_like_group(name, getattr(state, name), leaves, arrays)
              for name in _LIKE_GROUPS}
    carry = _encode_carry(state.carry, "carry", leaves, arrays)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "position": position,
                "metadata": metadata, "groups": groups, "carry": carry, "leaves": leaves}
    _check_same_on_every_process(manifest)
    with _manager(directory, writing=True, max_to_keep=max_to_keep) as manager:
        manager.save(step, args=_orbax().args.Composite(**{
            ARRAYS: _orbax().StepSave(arrays, manifest)}), force=True)
    if jax.process_index() == 0:
        _fsync(directory)  # the rename into place, on disk
    return directory / str(step)


def restore(directory: str | Path, like: TrainState, *, step: int | None = None
            ) -> TrainState:
    """Reads a step back, exactly as it was saved.

    Args:
      directory: where `save` wrote the steps.
      like: a `TrainState` whose `params`, `opt_state` and `rng` have the structure
        (optax's NamedTuple states, None leaves), shapes and dtypes of the saved ones,
        e.g. the fresh state of the run; arrays or `jax.ShapeDtypeStruct`s. Its other
        fields are ignored: the carry, position and metadata come from the checkpoint.
      step: the step to read; the latest by default.

    Returns:
      The saved `TrainState`: each leaf of the type it was saved as (jax array, numpy
      array, typed key, Python number) with its dtype and bits. On several processes,
      every process calls `restore` and gets the whole state (an array that was split
      over processes, whole), its jax arrays on its default device: place them on the
      mesh again with `tbptt_jax.sharding.shard_state`.

    Raises:
      FileNotFoundError: `directory` holds no step, or not `step`.
      CheckpointError: the step is truncated or corrupted.
      ValueError: `like` does not describe the saved state.
    """
    if not isinstance(like, TrainState):
        raise ValueError(f"like must be a tbptt_jax.checkpoint.TrainState, got "
                         f"{type(like).__name__}")
    directory = Path(directory).absolute()
    steps = all_steps(directory)
    if step is None:
        if not steps:
            raise FileNotFoundError(_nothing_to_restore(directory))
        step = steps[-1]
    step = check_int("step", step, minimum=0)
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; the saved "
                                f"steps are {steps}")
    path = directory / str(step)
    manifest = _read_manifest(path)
    like_trees = {name: _flatten(name, getattr(like, name)) for name in _LIKE_GROUPS}
    for name, (paths_and_leaves, _) in like_trees.items():
        _check_like(path, name, manifest["groups"][name], paths_and_leaves, manifest["leaves"])
    for name, expected in manifest["files"].items():
        _check_file(path, name, expected)
    stored = _read_arrays(directory, step, manifest["leaves"])
    values = [_decode_leaf(path, record, array)
              for record, array in zip(manifest["leaves"], stored, strict=True)]
    restored = {name: jax.tree_util.tree_unflatten(
                    treedef, [values[i] for i in manifest["groups"][name]["leaves"]])
                for name, (_, treedef) in like_trees.items()}
    return TrainState(params=restored["params"], opt_state=restored["opt_state"],
                      carry=_decode_carry(manifest["carry"], values),
                      position=manifest["position"], rng=restored["rng"],
                      metadata=manifest["metadata"])


@functools.cache
def _orbax() -> SimpleNamespace:
    """orbax, and the handler of a step's one item with its arguments (defined here, since
    orbax is imported when first needed)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:
        raise ImportError("tbptt_jax.checkpoint needs orbax-checkpoint: "
                          "pip install 'tbptt[checkpoint]'") from error

    class StepHandler(ocp.CheckpointHandler):
        """A step's arrays, written by orbax's PyTree handler (each process the shards it
        holds) into the item's directory `arrays/`, and its manifest beside them. orbax
        calls `finalize` on the first process once every process has written, before it
        renames the step into place: the manifest is written then, with the SHA-256 of
        every file, and every file synced to disk."""

        def __init__(self) -> None:
            self._arrays = ocp.PyTreeCheckpointHandler()
            self._manifest: dict[str, Any] | None = None
            self._wrote_arrays = False

        def save(self, directory, args):
            self._manifest, self._wrote_arrays = args.manifest, bool(args.arrays)
            if args.arrays:  # orbax cannot save an empty tree
                self._arrays.save(directory, args=ocp.args.PyTreeSave(args.arrays))

        def finalize(self, directory):
            if self._wrote_arrays:
                self._arrays.finalize(directory)
            _write_manifest(Path(directory), self._manifest)

        def restore(self, directory, args):
            if not args.restore_args:
                return {}
            return self._arrays.restore(directory, args=ocp.args.PyTreeRestore(
                restore_args=args.restore_args))

        def close(self):
            self._arrays.close()

    @ocp.args.register_with_handler(StepHandler, for_save=True)
    @dataclasses.dataclass
    class StepSave(ocp.args.CheckpointArgs):
        arrays: dict[str, Any]  # the stored arrays by leaf index, zero-size ones left out
        manifest: dict[str, Any]  # the manifest but its "files" and digest

    @ocp.args.register_with_handler(StepHandler, for_restore=True)
    @dataclasses.dataclass
    class StepRestore(ocp.args.CheckpointArgs):
        restore_args: dict[str, Any]  # ocp.RestoreArgs by leaf index

    return SimpleNamespace(ocp=ocp, args=ocp.args, StepHandler=StepHandler, StepSave=StepSave,
                           StepRestore=StepRestore)


def _manager(directory: Path, *, writing: bool = False, max_to_keep: int | None = None
             ) -> Any:
    """orbax's `CheckpointManager` of `directory`, a step's one item its `StepHandler`.

    Synchronous, so that `save` returns with the step in place. Made for each call (the
    functions of this module take a directory, not a manager), it lists the steps there.
    One for `writing` also creates the directory and removes what killed saves left, and
    waits for the other processes to do the same; one for reading waits for no one, so
    that one process alone may list the steps.
    """
    namespace = _orbax()
    ocp = namespace.ocp
    options = ocp.CheckpointManagerOptions(
        create=writing, cleanup_tmp_directories=writing, lightweight_initialize=True,
        enable_async_checkpointing=False, save_root_metadata=False,
        preservation_policy=(None if max_to_keep is None else
                             ocp.checkpoint_managers.LatestN(max_to_keep)))
    return ocp.CheckpointManager(directory, options=options, item_names=(ARRAYS,),
                                 item_handlers={ARRAYS: namespace.StepHandler()})


def _write_manifest(item: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest beside the item's files, with their SHA-256, and syncs the step."""
    step = item.parent
    files = {f"{ARRAYS}/{path.relative_to(item).as_posix()}": _file_sha256(path)
             for path in sorted(item.rglob("*")) if path.is_file()}
    manifest = {**manifest, "files": files}
    manifest["digest"] = _digest(manifest)
    (step / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _sync_tree(step)


def _check_same_on_every_process(manifest: dict[str, Any]) -> None:
    """On several processes, raises unless all pass the same state: the first one's is
    written, and the others would be lost without a word."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    rows = [_digest({key: value for key, value in manifest.items() if key != "leaves"}),
            *(record["sha256"] for record in manifest["leaves"])]
    digests = np.stack([np.frombuffer(bytes.fromhex(row), np.uint8) for row in rows])
    every = np.asarray(multihost_utils.process_allgather(digests))  # [processes, rows, 32]
    for process, theirs in enumerate(every):
        differ = np.flatnonzero(np.any(theirs != every[0], axis=1))
        if differ.size:
            what = ("its position, metadata or structure" if differ[0] == 0 else
                    f"state.{manifest['leaves'][differ[0] - 1]['path']}")
            raise ValueError(f"state: every process must save the same state, but process "
                             f"{process} differs from process 0 in {what}")


def _nothing_to_restore(directory: Path) -> str:
    if not directory.exists():
        return f"no checkpoint to restore: {directory} does not exist"
    unfinished = sorted(p.name for p in directory.iterdir() if UNFINISHED in p.name)
    message = f"no checkpoint in {directory}"
    if unfinished:
        message += (f"; only saves that never finished: {unfinished} (a run killed mid-save "
                    "leaves these; they hold nothing to restore)")
    return message


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{file} is missing: {path} is not a complete "
                              f"{FORMAT} checkpoint") from error
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{file} cannot be read, the checkpoint is truncated or "
                              f"corrupted ({type(error).__name__}: {error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint format version {manifest.get('version')!r}, "
                              f"this tbptt_jax reads version {VERSION}")
    if manifest.get("digest") != _digest(manifest):
        raise CheckpointError(f"{file} does not match its digest, the checkpoint is corrupted")
    return manifest


def _check_file(path: Path, name: str, expected: str) -> None:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file} is missing, the checkpoint is incomplete")
    if _file_sha256(file) != expected:
        raise CheckpointError(f"{file} ({file.stat().st_size} bytes) does not match the "
                              "SHA-256 in the manifest, the checkpoint is truncated or corrupted")


def _read_arrays(directory: Path, step: int, records: list[dict[str, Any]]
                 ) -> list[np.ndarray]:
    """The stored array of every leaf, whole on every process, each checked against its
    manifest record."""
    namespace = _orbax()
    path = directory / str(step)
    to_read = {str(i): namespace.ocp.RestoreArgs(restore_type=np.ndarray)
               for i, record in enumerate(records) if math.prod(record["stored_shape"])}
    try:
        with _manager(directory) as manager:
            read = manager.restore(step, args=namespace.args.Composite(**{
                ARRAYS: namespace.StepRestore(to_read)}))[ARRAYS]
    except Exception as error:  # its files passed their hashes; orbax may still refuse
        raise CheckpointError(f"{path / ARRAYS}: orbax cannot read the arrays "
                              f"({type(error).__name__}: {error})") from error
    stored = []
    for i, record in enumerate(records):
        dtype, shape = np.dtype(record["stored_dtype"]), tuple(record["stored_shape"])
        array = read.get(str(i), np.zeros(shape, dtype))
        if array.shape != shape or array.dtype != dtype or _sha256(array) != record["sha256"]:
            raise CheckpointError(
                f"{path}: {record['path']} does not match the manifest (expected "
                f"{dtype.name}{list(shape)} with SHA-256 {record['sha256'][:12]}..., got "
                f"{array.dtype.name}{list(array.shape)} with {_sha256(array)[:12]}...), "
                "the checkpoint is corrupted")
        stored.append(array)
    return stored


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":  # only POSIX can open a directory to sync it
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(root: Path) -> None:
    """fsyncs every file and directory under `root`, so the rename publishes whole files."""
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(root)


def _digest(manifest: Mapping[str, Any]) -> str:
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _check_metadata(metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise ValueError(f"state.metadata must be a dict with str keys or None, got "
                         f"{type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"state.metadata must be JSON-serialisable: {error}") from error


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _dtype_name(leaf: Any) -> str:
    """A leaf's dtype as the manifest writes it: `float32`, `key<fry>`, or a Python type."""
    if isinstance(leaf, bool | int | float) and not isinstance(leaf, np.generic):
        return type(leaf).__name__
    return str(leaf.dtype) if _is_key(leaf) else np.dtype(leaf.dtype).name


def _whole(array: jax.Array) -> np.ndarray:
    """An array's whole value on this process; one split over processes is gathered."""
    if array.is_fully_addressable:
        return np.asarray(array)
    if array.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _encode_leaf(path: str, leaf: Any, leaves: list[dict[str, Any]],
                 arrays: dict[str, Any]) -> int:
    """Appends one leaf's record (and its array) and returns its index.

    An array split over processes goes to orbax as it is, each process writing its shards;
    any other as a numpy array, written by the first process. The manifest has the SHA-256
    of the whole value, which every process computes.
    """
    split = None  # an array split over processes
    if isinstance(leaf, bool | int | float) and not isinstance(leaf, np.generic):
        kind, stored = "python", np.asarray(leaf)
    elif _is_key(leaf) or isinstance(leaf, jax.Array):
        kind = "key" if _is_key(leaf) else "jax"
        data = jax.random.key_data(leaf) if kind == "key" else leaf
        stored, split = _whole(data), None if data.is_fully_addressable else data
    elif isinstance(leaf, np.ndarray):
        kind, stored = "numpy", leaf
    elif isinstance(leaf, np.generic):
        kind, stored = "numpy_scalar", np.asarray(leaf)
    else:
        raise ValueError(f"state.{path}: a checkpoint holds arrays, PRNG keys and Python "
                         f"numbers, got {type(leaf).__name__}")
    index = len(leaves)
    leaves.append({"path": path, "kind": kind, "dtype": _dtype_name(leaf),
                   "shape": list(np.shape(leaf)), "stored_dtype": stored.dtype.name,
                   "stored_shape": list(stored.shape), "sha256": _sha256(stored),
                   "impl": str(jax.random.key_impl(leaf)) if kind == "key" else None})
    if stored.size:  # orbax refuses zero-size arrays; the manifest alone restores them
        arrays[str(index)] = stored if split is None else split
    return index


def _flatten(group: str, tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """`([(path, leaf), ...], treedef)`, paths written like `params['head.bias']`."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(group + jax.tree_util.keystr(p), leaf) for p, leaf in with_paths], treedef


def _encode_like_group(group: str, tree: Any, leaves: list[dict[str, Any]],
                       arrays: dict[str, Any]) -> dict[str, Any]:
    paths_and_leaves, treedef = _flatten(group, tree)
    indices = [_encode_leaf(path, leaf, leaves, arrays) for path, leaf in paths_and_leaves]
    # The treedef is written for people reading the manifest; `restore` takes `like`'s.
    return {"leaves": indices, "treedef": str(treedef)}


def _encode_carry(node: Any, path: str, leaves: list[dict[str, Any]],
                  arrays: dict[str, Any]) -> Any:
    """The carry as JSON: its structure, with `{"leaf": index}` in place of each array."""
    if node is None:
        return None
    if isinstance(node, OverlapCarry):
        return {"OverlapCarry": [_encode_carry(getattr(node, field), f"{path}.{field}", leaves,
                                               arrays) for field in OverlapCarry._fields]}
    if type(node) in (tuple, list):
        return {type(node).__name__: [_encode_carry(child, f"{path}[{i}]", leaves, arrays)
                                      for i, child in enumerate(node)]}
    if type(node) is dict and all(isinstance(key, str) for key in node):
        return {"dict": [[key, _encode_carry(child, f"{path}[{key!r}]", leaves, arrays)]
                         for key, child in node.items()]}
    if isinstance(node, jax.Array | np.ndarray | np.generic | numbers.Number):
        return {"leaf": _encode_leaf(path, node, leaves, arrays)}
    raise ValueError(f"state.{path}: a checkpoint's carry is built of arrays, tuples, lists, "
                     f"dicts with str keys and OverlapCarry, got {type(node).__name__}")


def _decode_carry(node: Any, values: list[Any]) -> Any:
    if node is None:
        return None
    (kind, content), = node.items()
    if kind == "leaf":
        return values[content]
    if kind == "OverlapCarry":
        return OverlapCarry(*(_decode_carry(child, values) for child in content))
    if kind == "dict":
        return {key: _decode_carry(child, values) for key, child in content}
    children = [_decode_carry(child, values) for child in content]
    return tuple(children) if kind == "tuple" else children


def _check_like(path: Path, group: str, saved: Mapping[str, Any],
                like: list[tuple[str, Any]], records: list[dict[str, Any]]) -> None:
    """Raises if `like`'s leaves in `group` are not the saved ones, path for path."""
    saved_records = [records[i] for i in saved["leaves"]]
    saved_paths = [record["path"] for record in saved_records]
    like_paths = [leaf_path for leaf_path, _ in like]
    if saved_paths != like_paths:
        missing = [p for p in saved_paths if p not in like_paths]
        unexpected = [p for p in like_paths if p not in saved_paths]
        raise ValueError(f"like.{group} does not have the structure of {group} in {path}: "
                         f"missing {missing}, unexpected {unexpected} (saved as "
                         f"{saved['treedef']})")
    for record, (leaf_path, leaf) in zip(saved_records, like, strict=True):
        expected = f"{record['dtype']}{record['shape']}"
        got = f"{_dtype_name(leaf)}{list(np.shape(leaf))}"
        if got != expected:
            raise ValueError(f"like.{leaf_path}: {path} holds "
                             f"{expected}, like has {got}")


def _decode_leaf(path: Path, record: Mapping[str, Any], stored: np.ndarray) -> Any:
    """A leaf as it was saved, from its stored array."""
    kind = record["kind"]
    if kind == "python":
        return _PYTHON_SCALARS[record["dtype"]](stored.item())
    if kind == "numpy":
        return stored
    if kind == "numpy_scalar":
        return stored[()]
    if kind == "key":
        return jax.random.wrap_key_data(jnp.asarray(stored), impl=record["impl"])
    leaf = jnp.asarray(stored)
    if leaf.dtype != stored.dtype:
        raise ValueError(f"{path}: {record['path']} is {stored.dtype.name}, which this JAX "
                         f"turns into {leaf.dtype.name}; enable jax_enable_x64 to restore it")
    return leaf
