"""Checkpoints of a PyTorch TBPTT run: the whole training state in one file, written safely.

`save(path, model=..., optimizer=..., carry=..., position=...)` writes the model's and the
optimizer's `state_dict()`, the carry (an `OverlapCarry` with its overlap buffer when
k2 > k1), the position in the stream, the random number generators (torch's CPU and CUDA
generators, Python's `random`, numpy's global one) and JSON metadata; `restore(path, ...)`
loads them back into the model and optimizer and returns the rest, bit for bit, so a stream
resumed from a checkpoint continues exactly as if it had never stopped (SPEC §1: streaming
is exact).

`torch.save(obj, path)` alone truncates the old file before writing the new one, so a run
killed mid-save loses both. `save` writes to a temporary file in the same directory,
flushes and fsyncs it, renames it over `path` (atomic on POSIX and Windows) and fsyncs the
directory: `path` always holds either the old checkpoint or the new one, whole. The file is
`torch.save`'s archive followed by a trailer (a magic string, the format version, the
archive's length and its SHA-256), so `restore` tells a truncated or corrupted file
(`CheckpointError`, naming the path and what is wrong) from a missing one
(`FileNotFoundError`), and never starts afresh silently. It loads with `weights_only=True`:
the file holds only tensors and plain Python containers (the carry's `OverlapCarry` is
stored as a tagged tuple), nothing that unpickling could run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import nn

from tbptt.checks import check_int
from tbptt_torch._trainer import OverlapCarry

FORMAT = "tbptt_torch.checkpoint"
VERSION = 1
MAGIC = b"tbptt-torch-ckpt"
# magic, format version, archive length in bytes, archive SHA-256
_TRAILER = struct.Struct(f"<{len(MAGIC)}sIQ32s")


class Restored(NamedTuple):
    """What `restore` hands back besides the model and optimizer it loads in place."""

    carry: Any  # the carry to continue the stream with; an OverlapCarry if k2 > k1
    position: int  # how far into the stream training had got, in the caller's unit
    metadata: dict[str, Any] | None  # what was passed to `save`


class CheckpointError(Exception):
    """A checkpoint file exists but cannot be restored: it is truncated or corrupted."""


def save(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         carry: Any, position: int, metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes the training state to `path`, replacing any checkpoint there atomically.

    Args:
      path: the checkpoint file; its directory is created if missing.
      model: the model; its `state_dict()` is saved.
      optimizer: the optimizer; its `state_dict()` is saved.
      carry: what `tbptt_train_step` returned (None, a tensor, a tuple of them, an
        `OverlapCarry`); tensors, tuples, lists, dicts with str keys and `OverlapCarry`.
      position: how far into the stream training has got (e.g. segments trained), >= 0.
      metadata: JSON-serialisable dict (e.g. a loss history), or None.

    Returns:
      `path`. When this returns, the file is complete and synced to disk; if it raises,
      the checkpoint that was at `path` is still there, untouched.
    """
    _check_types(model, optimizer)
    payload = {
        "format": FORMAT, "version": VERSION,
        "model": model.state_dict(),
        "optimizer_class": type(optimizer).__qualname__,
        "optimizer": optimizer.state_dict(),
        "carry": _encode_carry(carry, "carry"),
        "position": check_int("position", position, minimum=0),
        "metadata": _check_metadata(metadata),
        "rng": _rng_state(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, payload)
    return path


def restore(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
            restore_rng: bool = True, map_location: Any = None) -> Restored:
    """Loads a checkpoint into `model` and `optimizer` and returns the rest of the state.

    Args:
      path: a file written by `save`.
      model: a model of the saved architecture; its parameters and buffers are replaced.
      optimizer: an optimizer of the saved class over `model`'s parameters; its state and
        hyperparameters are replaced.
      restore_rng: also set torch's CPU (and, where present, CUDA) generators, Python's
        `random` and numpy's global generator to their saved states.
      map_location: passed to `torch.load`, e.g. "cpu" to load a GPU run's tensors on CPU.

    Returns:
      `Restored(carry, position, metadata)`.

    Raises:
      FileNotFoundError: there is no file at `path`.
      CheckpointError: the file is truncated, corrupted or not a tbptt_torch checkpoint.
      ValueError: the checkpoint does not fit `model` or `optimizer` (checked before
        anything is loaded).
    """
    _check_types(model, optimizer)
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no checkpoint to restore: {path} does not exist") from error
    archive = _check_trailer(path, data)
    try:
        payload = torch.load(io.BytesIO(archive), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{path}: torch.load(weights_only=True) refuses its contents "
                              f"({error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')!r}, "
                              f"this tbptt_torch reads version {VERSION}")
    _check_model(path, model, payload["model"])
    _check_optimizer(path, optimizer, payload["optimizer_class"], payload["optimizer"])
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if restore_rng:
        _set_rng_state(payload["rng"])
    return Restored(_decode_carry(payload["carry"]), payload["position"], payload["metadata"])


class _HashingWriter:
    """A write-only file that hashes and counts what `torch.save` streams through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.size, self.sha256 = file, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            writer = _HashingWriter(file)
            torch.save(payload, writer)
            file.write(_TRAILER.pack(MAGIC, VERSION, writer.size, writer.sha256.digest()))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # The old checkpoint at `path` was never touched; only the temporary file goes.
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is on disk too.
    if os.name == "posix":
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _check_trailer(path: Path, data: bytes) -> bytes:
    """The archive inside a checkpoint file, after checking its length and SHA-256."""
    if len(data) < _TRAILER.size:
        raise CheckpointError(f"{path} is {len(data)} bytes, shorter than a checkpoint's "
                              f"{_TRAILER.size}-byte trailer: truncated, or not written by "
                              f"{FORMAT}.save")
    magic, version, size, digest = _TRAILER.unpack(data[-_TRAILER.size:])
    if magic != MAGIC:
        raise CheckpointError(f"{path} does not end with the {FORMAT} trailer: the file is "
                              f"truncated, or was not written by {FORMAT}.save")
    if version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this "
                              f"tbptt_torch reads version {VERSION}")
    if size != len(data) - _TRAILER.size:
        raise CheckpointError(f"{path}: the trailer records a {size}-byte archive, the file "
                              f"holds {len(data) - _TRAILER.size} bytes before it; the file "
                              "is corrupted")
    archive = data[:size]
    if hashlib.sha256(archive).digest() != digest:
        raise CheckpointError(f"{path}: the archive does not match the SHA-256 in its "
                              "trailer; the file is corrupted")
    return archive


def _check_metadata(metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
        raise ValueError(f"metadata must be a dict with str keys or None, got "
                         f"{type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from error


def _encode_carry(node: Any, path: str) -> Any:
    """The carry as tensors in tagged tuples, which `weights_only` loading accepts."""
    if node is None:
        return None
    if isinstance(node, torch.Tensor):
        # A carry's tensors are often views (an OverlapCarry's xs slices the whole
        # sequence): a copy saves the view's elements, not the storage under it.
        return ("tensor", node.detach().clone())
    if isinstance(node, OverlapCarry):
        return ("OverlapCarry", [_encode_carry(getattr(node, field), f"{path}.{field}")
                                 for field in OverlapCarry._fields])
    if type(node) in (tuple, list):
        return (type(node).__name__, [_encode_carry(child, f"{path}[{i}]")
                                      for i, child in enumerate(node)])
    if type(node) is dict and all(isinstance(key, str) for key in node):
        return ("dict", [(key, _encode_carry(child, f"{path}[{key!r}]"))
                         for key, child in node.items()])
    raise ValueError(f"{path}: a checkpoint's carry is built of tensors, tuples, lists, dicts "
                     f"with str keys and OverlapCarry, got {type(node).__name__}")


def _decode_carry(node: Any) -> Any:
    if node is None:
        return None
    kind, content = node
    if kind == "tensor":
        return content
    if kind == "OverlapCarry":
        return OverlapCarry(*map(_decode_carry, content))
    if kind == "dict":
        return {key: _decode_carry(child) for key, child in content}
    children = [_decode_carry(child) for child in content]
    return tuple(children) if kind == "tuple" else children


def _check_types(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")


def _check_model(path: Path, model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    if missing or unexpected:
        raise ValueError(f"model does not fit {path}: the checkpoint lacks {missing} and has "
                         f"{unexpected} that the model lacks")
    for name, tensor in expected.items():
        if saved[name].shape != tensor.shape or saved[name].dtype != tensor.dtype:
            raise ValueError(f"model does not fit {path}: {name} is "
                             f"{saved[name].dtype}{list(saved[name].shape)} there, "
                             f"{tensor.dtype}{list(tensor.shape)} in the model")


def _check_optimizer(path: Path, optimizer: torch.optim.Optimizer, saved_class: str,
                     saved: Mapping[str, Any]) -> None:
    if type(optimizer).__qualname__ != saved_class:
        raise ValueError(f"optimizer does not fit {path}: it was saved from {saved_class}, "
                         f"got {type(optimizer).__qualname__}")
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    if sizes != saved_sizes:
        raise ValueError(f"optimizer does not fit {path}: its parameter groups hold "
                         f"{saved_sizes} parameters there, {sizes} in the optimizer")


def _rng_state() -> dict[str, Any]:
    name, keys, index, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's keys are uint32; int64 is a tensor dtype every torch version serialises.
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), index, has_gauss, gauss),
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    # Generator states are CPU byte tensors, wherever map_location put the rest.
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        # A run resumed on fewer GPUs sets the generators of the GPUs it has.
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    random.setstate(state["python"])
    name, keys, index, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), index, has_gauss, gauss))
