"""The LSTM layer's two loops as compiled CPU kernels, called from XLA (`jax.ffi`).

`csrc/lstm.cc` runs all the steps of a window's forward recurrence, or of its reverse one,
in one call (see its header for why that is faster than XLA's per-step kernels, and for
the exact semantics, which are `tbptt_jax._kernels`'). This module compiles it with the
host's C++ compiler the first time a process asks (`-O3 -march=native`: this machine's own
vector instructions), keeps the library in a cache keyed by everything that went into it,
and registers its two functions with XLA for the CPU platform. Each call is wrapped so that a
batch sharded over devices stays sharded, every device running its own rows
(`custom_partitioning` on `Auto` mesh axes, `shard_map` on `Explicit` ones).

`available()` says whether the kernels are there, `takes(...)` whether they take a layer's
operands (float32 or float64). Where they cannot be built (no compiler, a jaxlib without
the FFI headers) `available()` says why once, as a warning, and the layer keeps its
pure-JAX loops; `TBPTT_JAX_NATIVE=0` turns them off. The cache is
`$TBPTT_CACHE_DIR`, else `$XDG_CACHE_HOME/tbptt`, else `~/.cache/tbptt`.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

Array = jax.Array

SOURCE = Path(__file__).parent / "csrc" / "lstm.cc"
# This CPU's own vector instructions; on x86, 512-bit vectors where it has them (GCC
# otherwise splits the kernels' 64-byte vectors in two: the product ran at 84 instead of
# 133-144 GFLOP/s on one core of the development machine).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", *(
    ("-march=native", "-mprefer-vector-width=512")
    if platform.machine().lower() in ("x86_64", "amd64") else ("-mcpu=native",)))
TARGETS = {"tbptt_lstm_forward": "TbpttLstmForward", "tbptt_lstm_backward": "TbpttLstmBackward"}


class NativeBuildError(RuntimeError):
    """The kernels could not be compiled or loaded here."""


def cache_dir() -> Path:
    if os.environ.get("TBPTT_CACHE_DIR"):
        return Path(os.environ["TBPTT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tbptt"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise NativeBuildError("no C++ compiler found (set CXX, or install g++ or clang)")
    return compiler


def _cpu_features() -> str:
    """What `-march=native` compiles for: the CPU's flags, so a shared cache never hands a
    library to a machine that lacks its instructions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build() -> Path:
    """Compiles `csrc/lstm.cc` into the cache unless a library built from the same source,
    compiler, flags, jaxlib and CPU is there; returns its path."""
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        raise NativeBuildError(f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.4.38)")
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise NativeBuildError(f"{compiler} --version failed: {error}") from error
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), version, " ".join(FLAGS), importlib.metadata.version("jaxlib"),
        _cpu_features(),
    ]).encode()).hexdigest()[:16]
    directory = cache_dir()
    library = directory / f"tbptt_lstm-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (pytest -n)
    # each get a whole library.
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / library.name
        command = [compiler, *FLAGS, "-isystem", include, str(SOURCE), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    return library


@cache
def available() -> bool:
    """Whether the compiled kernels are built, loaded and registered with XLA (once per
    process; False with `TBPTT_JAX_NATIVE=0` or where they cannot be built, with a
    warning that says why)."""
    if os.environ.get("TBPTT_JAX_NATIVE", "1") == "0":
        return False
    try:
        library = ctypes.CDLL(str(build()))
    except (NativeBuildError, OSError) as error:
        warnings.warn(f"tbptt_jax: the compiled LSTM kernels are unavailable, using the "
                      f"pure-JAX loops: {error}", RuntimeWarning, stacklevel=2)
        return False
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    return True


# The element types `lstm.cc` is compiled for.
ELEMENT_TYPES = ("float32", "float64")


def takes(*operands: Array) -> bool:
    """Whether the kernels take these operands: all of one element type, float32 or
    float64. Any other (bfloat16, float16, or a mix) runs the pure-JAX loops."""
    element_types = {jnp.dtype(operand.dtype).name for operand in operands}
    return len(element_types) == 1 and element_types <= set(ELEMENT_TYPES)


def _like(array: Array, shape: tuple[int, ...] | None = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape if shape is None else shape, array.dtype)


def _batch_axis(sharding) -> str | tuple | None:
    """The mesh axis (or axes) that dimension 1 of a `[T, B, ...]` operand is split over."""
    spec = getattr(sharding, "spec", PartitionSpec())
    return spec[1] if len(spec) > 1 else None


def _partitioned(kernel, operand_layouts: tuple[str, ...], result_layouts: tuple[str, ...],
                 rule: str):
    """`kernel` wrapped so that it is split along the batch only: the operands and results
    are laid out as the layouts say (a letter per axis, "b" the batch), every batch axis
    follows the first operand's, the rest is replicated.

    Where the batch is split over `Explicit` mesh axes, its sharding is in the operands'
    types and the results' types must say it too (the pure loops' do, and `lax.cond`
    between the two wants one type): the kernel runs under `shard_map` over those axes,
    each device on its own rows. Elsewhere (`Auto` axes, or no mesh) the types say
    nothing, and XLA's partitioner asks `custom_partitioning` where the batch is."""
    wrapped = custom_partitioning(kernel)

    def shardings(mesh, arg_shapes, layouts):
        batch = _batch_axis(arg_shapes[0].sharding)
        return tuple(NamedSharding(mesh, PartitionSpec(*(batch if axis == "b" else None
                                                         for axis in layout)))
                     for layout in layouts)

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, result_layouts)

    def partition(mesh, arg_shapes, result_shape):
        return (mesh, kernel, shardings(mesh, arg_shapes, result_layouts),
                shardings(mesh, arg_shapes, operand_layouts))

    wrapped.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                          need_replication_factors=("t", "g", "h"))

    def call(*operands):
        typed = jax.typeof(operands[0]).sharding
        batch = typed.spec[1]
        if batch is None:
            return wrapped(*operands)
        axes = (batch,) if isinstance(batch, str) else tuple(batch)

        def specs(layouts):
            return tuple(PartitionSpec(*(batch if axis == "b" else None for axis in layout))
                         for layout in layouts)

        def per_device(*local):
            # shard_map's type check wants a primitive's operands to vary over the same
            # axes: the weights, the same on every device, are cast to varying.
            local = [part if "b" in layout else jax.lax.pcast(part, axes, to="varying")
                     for part, layout in zip(local, operand_layouts, strict=True)]
            return kernel(*local)

        return jax.shard_map(per_device, mesh=typed.mesh, in_specs=specs(operand_layouts),
                             out_specs=specs(result_layouts), axis_names=set(axes))(*operands)

    return call


def _forward_kernel(x_proj, w_hh, bias, h0, c0, resets):
    steps, batch, hidden = x_proj.shape[0], x_proj.shape[1], h0.shape[1]
    per_step = _like(h0, (steps, batch, hidden))
    return jax.ffi.ffi_call("tbptt_lstm_forward", (per_step, per_step, _like(x_proj)),
                            input_output_aliases={0: 2})(x_proj, w_hh, bias, h0, c0, resets)


def _backward_kernel(acts, w_hh, hs, cs, c0, resets, dhs, dh, dc):
    # hs is not read: passed so that XLA keeps its buffer until the reverse loop. Once the
    # output layer's weight gradient had read hs, XLA reused that buffer for the output
    # layer's other product (dh, the same shape), which then had to wait for the first: the
    # word LM's two largest products ran one after the other instead of side by side, and
    # its step was 10-20% slower than with the pure loops (NOTES.md, change 26).
    return jax.ffi.ffi_call("tbptt_lstm_backward", (_like(acts), _like(dh), _like(dc)),
                            input_output_aliases={0: 0})(acts, w_hh, hs, cs, c0, resets, dhs,
                                                         dh, dc)


_forward = _partitioned(
    _forward_kernel, ("tbg", "gh", "g", "bh", "bh", "tb"), ("tbh", "tbh", "tbg"),
    "t b g, g h, g, b h, b h, t b -> t b h, t b h, t b g")
_backward = _partitioned(
    _backward_kernel, ("tbg", "gh", "tbh", "tbh", "bh", "tb", "tbh", "bh", "bh"),
    ("tbg", "bh", "bh"), "t b g, g h, t b h, t b h, b h, t b, t b h, b h, b h -> t b g, b h, b h")


def _resets_or_none(resets: Array | None, x_proj: Array) -> Array:
    # zeros_like keeps x_proj's sharding, which an explicit mesh puts in the type.
    return jnp.zeros_like(x_proj[..., 0], bool) if resets is None else resets


def lstm_forward(w_hh: Array, bias: Array, x_proj: Array, h0: Array, c0: Array,
                 resets: Array | None) -> tuple[Array, Array, Array]:
    """Every step of the window: `(hs, cs, activations)`, `[T, B, H]`, `[T, B, H]` and the
    gates i, f, g, o `[T, B, 4H]` (in `x_proj`'s buffer, which XLA may then reuse)."""
    return _forward(x_proj, w_hh, bias, h0, c0, _resets_or_none(resets, x_proj))


def lstm_backward(w_hh: Array, activations: Array, hs: Array, cs: Array, c0: Array,
                  resets: Array | None, dhs: Array, dh: Array, dc: Array
                  ) -> tuple[Array, Array, Array]:
    """The reverse loop: `(d_gates [T, B, 4H], dh0, dc0)` from the forward's activations and
    cell states, the gradients flowing into hs, and those into the carry after the last
    step. `hs`, the forward's hidden states, is not read (see `_backward_kernel`)."""
    return _backward(activations, w_hh, hs, cs, c0, _resets_or_none(resets, activations), dhs,
                     dh, dc)
