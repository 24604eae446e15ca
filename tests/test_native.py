"""The compiled LSTM kernels (`tbptt_jax._native`, `tbptt_jax/csrc/lstm.cc`).

Checked: they build and register on this machine (the CI machine has a C++ compiler), once:
a second build finds the cached library; the LSTM layer on CPU runs them (the lowered
program calls them) and equals the pure-JAX layer, values and vector-Jacobian products
with respect to every input, in float64 to 1e-12 and in float32 to float32 rounding, over
shapes that exercise the kernels' edges (one step, one row, a batch split unevenly over
the threads, hidden sizes that are not a whole number of vectors, weights big enough that
the threads split the hidden units instead), with resets at step 0 and mid-window; a NaN
reaches the outputs until a reset, as in the pure layer; a gradient of a gradient and
`vmap` (which run the pure loops) give the pure layer's, and so does a layer in bfloat16 or
float16 (the kernels take float32 and float64 only); with `TBPTT_JAX_NATIVE=0`, or
where the build fails (a warning says why), the layer runs the pure-JAX loops and trains
the same. A C++ harness checks that the loops give the same results however XLA's pool
delivers their helper threads, and built for narrower vectors (SSE2, AVX2) as for this CPU.
"""

from __future__ import annotations

import ast
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tbptt_jax import _kernels, _native
from tbptt_jax import models as jax_models

TOLERANCE = {jnp.float64: {"rtol": 1e-12, "atol": 1e-12},
             jnp.float32: {"rtol": 2e-5, "atol": 2e-6}}
# The threads split the batch, except where W_hh passes 768 KiB (H > 221 in float32, H > 156
# in float64): then they split the hidden units and meet at a barrier each step.
SHAPES = [pytest.param(1, 1, 4, id="T1-B1-H4"), pytest.param(5, 3, 20, id="T5-B3-H20"),
          pytest.param(6, 33, 37, id="T6-B33-H37"), pytest.param(4, 5, 200, id="T4-B5-H200")]


def test_the_kernels_build_once_and_register_here():
    assert _native.available()
    library = _native.build()
    built_at = library.stat().st_mtime_ns
    assert _native.build() == library and library.stat().st_mtime_ns == built_at
    assert library.parent == _native.cache_dir()


def layer_inputs(steps: int, batch: int, hidden: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(scale=scale, size=shape), dtype)

    resets = rng.random((steps, batch)) < 0.2
    resets[0, 0] = True
    return (normal(4 * hidden, hidden, scale=hidden ** -0.5), normal(4 * hidden, scale=0.1),
            normal(4 * hidden, scale=0.1), normal(steps, batch, 4 * hidden),
            (normal(batch, hidden), normal(batch, hidden)), jnp.asarray(resets))


@pytest.mark.parametrize(("steps", "batch", "hidden"), SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_resets", [False, True], ids=["no-resets", "resets"])
def test_the_compiled_layer_equals_the_pure_jax_layer(steps, batch, hidden, dtype, with_resets):
    w_hh, b_hh, b_ih, x_proj, carry, resets = layer_inputs(steps, batch, hidden, dtype)
    resets = resets if with_resets else None
    compiled, pure = _kernels.layer("lstm", native=True), _kernels.layer("lstm", native=False)

    def run(layer):
        return jax.jit(lambda *args: jax.vjp(lambda *a: layer(*a, resets), *args))(
            w_hh, b_hh, b_ih, x_proj, carry)

    (got, got_vjp), (expected, expected_vjp) = run(compiled), run(pure)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **TOLERANCE[dtype])
    rng = np.random.default_rng(1)
    cotangent = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), dtype), got)
    for a, e in zip(jax.tree.leaves(got_vjp(cotangent)),
                    jax.tree.leaves(expected_vjp(cotangent)), strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, e, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
def test_a_nan_propagates_as_in_the_pure_layer_until_a_reset(dtype):
    """The trainer's non-finite check needs a NaN to reach the loss: the float32 kernels
    clamp their exp and tanh arguments by comparisons a NaN fails, so it passes through."""
    w_hh, b_hh, b_ih, x_proj, carry, _ = layer_inputs(6, 3, 20, dtype)
    x_proj = x_proj.at[2, 0].set(jnp.nan)
    resets = jnp.zeros((6, 3), bool).at[4, 0].set(True)
    (_, got), (_, expected) = (
        jax.jit(_kernels.layer("lstm", native=native))(w_hh, b_hh, b_ih, x_proj, carry, resets)
        for native in (True, False))
    got = np.asarray(got)
    assert np.all(np.isnan(got[2:4, 0])) and np.all(np.isfinite(got[:2]))
    assert np.all(np.isfinite(got[4:])) and np.all(np.isfinite(got[:, 1:]))
    np.testing.assert_allclose(got, expected, **TOLERANCE[dtype])


def test_a_gradient_of_a_gradient_and_vmap_run_the_pure_loops():
    """The kernels have no derivative or batching rules of their own: a gradient of a
    gradient (differentiating through a training step) and `vmap` over an ensemble's
    weights run the pure loops, and give what they give; the batched layer is the layer of
    each ensemble member."""
    w_hh, b_hh, b_ih, x_proj, carry, resets = layer_inputs(5, 3, 20, jnp.float64)
    ensemble = jnp.stack([w_hh, 0.5 * w_hh, -w_hh])

    def transformed(layer):
        def loss(w, x):
            (h, c), hs = layer(w, b_hh, b_ih, x, carry, resets)
            return jnp.sum(jnp.sin(hs)) + jnp.sum(h * c)

        gradient = jax.grad(loss, argnums=(0, 1))
        curvature = jax.grad(lambda w, x: sum(jnp.sum(g ** 2) for g in gradient(w, x)),
                             argnums=(0, 1))
        batched = jax.vmap(lambda w: layer(w, b_hh, b_ih, x_proj, carry, resets))
        return jax.jit(lambda: (curvature(w_hh, x_proj), batched(ensemble)))()

    compiled = _kernels.layer("lstm", native=True)
    got, expected = transformed(compiled), transformed(_kernels.layer("lstm", native=False))
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, **TOLERANCE[jnp.float64])
    _, batched_hs = got[1]
    for member, weights in enumerate(ensemble):
        _, hs = compiled(weights, b_hh, b_ih, x_proj, carry, resets)
        np.testing.assert_allclose(batched_hs[member], hs, **TOLERANCE[jnp.float64])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_a_layer_in_another_precision_runs_the_pure_loops(dtype):
    """The kernels are compiled for float32 and float64 only. An LSTM in bfloat16 or float16
    on CPU runs the pure-JAX loops (before, it reached the kernel and failed at run time:
    "float32 or float64 only"): its program calls no kernel, and its values and gradients
    are `layer(native=False)`'s, bit for bit. Operands that mix precisions are not taken
    either."""
    w_hh, b_hh, b_ih, x_proj, carry, resets = layer_inputs(5, 3, 20, dtype)

    def value_and_gradients(layer):
        def loss(w_hh, x_proj, carry):
            (h, c), hs = layer(w_hh, b_hh, b_ih, x_proj, carry, resets)
            return jnp.sum(jnp.sin(hs.astype(jnp.float32))) + jnp.sum((h * c).astype(jnp.float32))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    default = value_and_gradients(_kernels.layer("lstm"))
    assert "tbptt_lstm" not in default.lower(w_hh, x_proj, carry).as_text()
    got, expected = default(w_hh, x_proj, carry), value_and_gradients(
        _kernels.layer("lstm", native=False))(w_hh, x_proj, carry)
    assert jax.tree.leaves(got)[1].dtype == dtype and np.isfinite(float(got[0]))
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(e, np.float32))

    in_float32 = [operand.astype(jnp.float32) for operand in (w_hh, b_hh, b_ih, x_proj)]
    assert _native.takes(*in_float32) and not _native.takes(*in_float32[:3], x_proj)


def lowered_lstm_program() -> str:
    model = jax_models.lstm(3, 8, 2)
    params = model.init(jax.random.PRNGKey(0))
    carry = model.initial_carry(4)
    return jax.jit(model.apply).lower(params, carry, jnp.zeros((5, 4, 3), jnp.float32)).as_text()


def test_the_lstm_layer_on_cpu_calls_the_compiled_kernels():
    assert "tbptt_lstm_forward" in lowered_lstm_program()


FALLBACK = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, optax
    from tbptt_jax import _native, losses, models, tbptt_train_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        print("available", _native.available())
    print("warned", [str(w.message) for w in caught])
    model = models.lstm(3, 8, 2)
    params = model.init(jax.random.PRNGKey(0))
    print("calls", "tbptt_lstm_forward" in jax.jit(model.apply).lower(
        params, model.initial_carry(4), jnp.zeros((5, 4, 3))).as_text())
    optimizer = optax.adam(1e-2)
    xs = jax.random.normal(jax.random.PRNGKey(1), (40, 4, 3))
    ys = jax.random.normal(jax.random.PRNGKey(2), (40, 4, 2))
    _, _, _, info = tbptt_train_step(params, optimizer.init(params), None, xs, ys,
                                     apply_fn=model.apply, loss_fn=losses.mse,
                                     optimizer=optimizer, k1=10)
    print("losses", [float(loss) for loss in info["loss"]])
""")


def run_fallback(**environment: str) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **environment}
    done = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


@pytest.fixture(scope="module")
def native_run() -> dict[str, str]:
    return run_fallback()


def test_turned_off_the_layer_runs_the_pure_loops_and_trains_the_same(native_run):
    off = run_fallback(TBPTT_JAX_NATIVE="0")
    assert (off["available"], off["warned"], off["calls"]) == ("False", "[]", "False")
    assert (native_run["available"], native_run["calls"]) == ("True", "True")
    np.testing.assert_allclose(ast.literal_eval(off["losses"]),
                               ast.literal_eval(native_run["losses"]), rtol=1e-5)


def test_a_failed_build_warns_and_falls_back_to_the_pure_loops(tmp_path, native_run):
    failed = run_fallback(CXX="false", TBPTT_CACHE_DIR=str(tmp_path))
    assert (failed["available"], failed["calls"]) == ("False", "False")
    assert "compiled LSTM kernels are unavailable" in failed["warned"]
    assert "false --version failed" in failed["warned"]
    assert not list(tmp_path.glob("*.so"))
    np.testing.assert_allclose(ast.literal_eval(failed["losses"]),
                               ast.literal_eval(native_run["losses"]), rtol=1e-5)


def _run_harness(tmp_path: Path, target: str | None = None) -> np.ndarray:
    """Builds `tests/native/helpers_harness.cc` with the library's flags, for this CPU or
    for the x86 `-march` target given, runs it, checks that every way of delivering the
    helper threads gave the single-thread results bit for bit, and returns those."""
    name = f"helpers_harness_{target or 'native'}"
    flags = [flag for flag in _native.FLAGS if flag not in ("-shared", "-fPIC")]
    if target:
        flags = [f"-march={target}" if flag == "-march=native" else flag for flag in flags]
    command = [_native._compiler(), *flags, "-isystem", jax.ffi.include_dir(),
               f'-DLSTM_SOURCE="{_native.SOURCE}"',
               str(Path(__file__).parent / "native" / "helpers_harness.cc"),
               "-o", str(tmp_path / name), "-lpthread"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    done = subprocess.run([str(tmp_path / name), str(tmp_path / f"{name}.bin")],
                          capture_output=True, text=True, timeout=120)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(lines) == 21 and lines[-1] == "ok"
    assert all(line.endswith(": same") for line in lines[:-1])
    return np.fromfile(tmp_path / f"{name}.bin", dtype=np.float32)


@pytest.fixture(scope="module")
def native_harness_results(tmp_path_factory) -> np.ndarray:
    if not _native.available():
        pytest.skip("no compiled kernels here")
    return _run_harness(tmp_path_factory.mktemp("harness"))


def test_the_loops_give_the_same_results_however_their_helper_threads_come(
        native_harness_results):
    """The C++ harness `tests/native/helpers_harness.cc` runs both loops with their helper
    tasks on threads of their own, dropped, run inline by the caller, run after the call
    has returned, and started too late to be waited for; for a batch split and a unit
    split, 2 and 3 threads. Every way must give the single-thread results bit for bit (a
    helper that came late must neither take a part nor touch the finished call)."""
    assert native_harness_results.size > 0 and np.isfinite(native_harness_results).all()


# What `-march=x86-64-v3` (AVX2) compiles for, as /proc/cpuinfo names it.
X86_64_V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


def _x86_targets_this_cpu_runs() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cpu_flags = set(_native._cpu_features().split())
    return ["x86-64", *(["x86-64-v3"] if X86_64_V3_FLAGS <= cpu_flags else [])]


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3"])
def test_the_loops_built_for_narrower_vectors_give_the_same_results(
        tmp_path, native_harness_results, target):
    """`lstm.cc` takes its vector width and register count from the target (AVX-512, AVX2,
    SSE2, NEON), and sizes its matrix-product kernel by them. Built for SSE2 (16-byte
    vectors) and AVX2 (32 bytes), where this CPU runs them, the loops must give this CPU's
    native build's results to float32 rounding, and the thread deliveries their
    single-thread results bit for bit. Multiply-adds fuse only where the target has FMA, so
    over the harness's six steps the builds differ by a few 1e-6 (up to 4.4e-6 seen on
    gate gradients near zero); a wrong lane or panel would be off by ~0.1."""
    if target not in _x86_targets_this_cpu_runs():
        pytest.skip(f"this CPU does not run -march={target}")
    np.testing.assert_allclose(_run_harness(tmp_path, target), native_harness_results,
                               rtol=1e-4, atol=2e-5)
