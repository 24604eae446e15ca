"""Data-parallel JAX TBPTT gives the losses, parameters and carry of one device.

Each sharded run happens in a subprocess (`distributed/jax_worker.py`), since the number
of CPU devices is fixed when jax is imported: 4 virtual devices in one process, and 2
processes x 2 devices joined by `jax.distributed.initialize` over gloo on localhost, each
feeding its own rows of the batch. The reference is the same stream trained in this
process on one device with the whole batch (`distributed/jax_cases.py`): LSTM, Adam, 20
updates, resets in every call, k2 = k1 and k2 > k1. Each sharded run is checkpointed
after its second call and resumed from the restored state (`tbptt_jax.checkpoint`, on
every process), so the match also proves the checkpoint route of docs/distributed.md. Each
cell also runs on every kind of mesh, `Auto`, `Explicit` and the two mixed, the LSTM with
its compiled kernels and without, its carry coming back placed as it went in. Agreement is
to 1e-10 (float64) and 1e-4 (float32) relative to each tensor's largest magnitude. float64
is the exact check; in float32 this run's `weight_hh_l0` is sensitive to rounding: inputs
moved by 1-3 ulp moved it by 0.9-7e-5 after the 20 updates (k2 > k1, on one device, with
the pure-JAX loops and the compiled ones alike), and a different summation order of the
gradient across devices moves it as much.
The compiled 4-device programs must all-reduce the gradient and gather no activations
across devices.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import tbptt_jax
from tbptt_jax import losses, models, sharding

HERE = Path(__file__).parent / "distributed"
ROOT = Path(__file__).parent.parent
WORKER_TIMEOUT_S = 240  # a run takes ~15 s; the rest is room for a loaded machine

_spec = importlib.util.spec_from_file_location("jax_cases", HERE / "jax_cases.py")
jax_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jax_cases)

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}
SLOW = pytest.mark.slow
# By default one case per layout, together covering both k2 settings and both dtypes
# (each costs a subprocess and a compile of ~5 s); every case of each with -m slow.
FOUR_DEVICES = [
    "k2>k1,mean,float32",
    pytest.param("k2=k1,sum,float64", marks=SLOW),
    pytest.param("k2=k1,sum,float32", marks=SLOW),
    pytest.param("k2>k1,mean,float64", marks=SLOW),
]
TWO_PROCESSES = [
    "k2=k1,sum,float64",
    pytest.param("k2>k1,mean,float32", marks=SLOW),
    pytest.param("k2=k1,sum,float32", marks=SLOW),
    pytest.param("k2>k1,mean,float64", marks=SLOW),
]
# Every cell on every kind of mesh (`jax_cases.MESHES`), the LSTM with its compiled kernels
# and with the pure-JAX loops (the other cells have only these): one worker run per kernel
# path, its cases one after the other. By default the cases that cover each cell, each
# path, and each kind of mesh with an Explicit axis; the rest with -m slow.
CELLS_ON_MESHES = {
    "compiled": ["lstm on explicit", "gru on explicit", "elman on explicit",
                 "lstm on auto+explicit"],
    "pure": ["lstm on explicit", "lstm on explicit+auto"],
}
CELLS_ON_MESHES_SLOW = {
    "compiled": [f"{cell} on {mesh}" for mesh in jax_cases.MESHES
                 for cell in ("lstm", "gru", "elman")
                 if f"{cell} on {mesh}" not in CELLS_ON_MESHES["compiled"]],
    "pure": [f"lstm on {mesh}" for mesh in jax_cases.MESHES
             if f"lstm on {mesh}" not in CELLS_ON_MESHES["pure"]],
}


@functools.cache
def reference(case: str) -> dict[str, Any]:
    return jax_cases.train(case)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def run_workers(out: Path, case: str, *, devices: int, processes: int,
                xla_flags: str | None = None, native: bool = True) -> list[dict[str, Any]]:
    """Runs the worker in `processes` processes of `devices` CPU devices; their results.

    `case` may name several cases, separated by ';'; `native=False` turns off the LSTM's
    compiled kernels."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not native:
        env["TBPTT_JAX_NATIVE"] = "0"
    env.pop("XLA_FLAGS", None)  # a forced device count there would override the worker's
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    port = free_port()
    workers = []
    for process in range(processes):
        log = open(out / f"process{process}.log", "w")  # closed in the finally below
        command = [sys.executable, str(HERE / "jax_worker.py"), str(out), "--devices",
                   str(devices), "--cases", case, "--process-id", str(process),
                   "--num-processes", str(processes), "--port", str(port)]
        workers.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
    failures = []
    try:
        for process, (worker, _) in enumerate(workers):
            try:
                code = worker.wait(timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                code = "timed out"
            if code != 0:
                failures.append(process)
    finally:
        for worker, log in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
    if failures:
        logs = "\n".join(f"--- process {process}:\n" + (out / f"process{process}.log")
                         .read_text()[-3000:] for process in failures)
        pytest.fail(f"worker processes {failures} failed:\n{logs}")
    results = []
    for process in range(processes):
        with open(out / f"process{process}.pkl", "rb") as file:
            results.append(pickle.load(file))
    return results


def assert_matches(got: dict[str, Any], expected: dict[str, Any], case: str) -> None:
    tolerance = TOLERANCE[jax_cases.CASES[case]["dtype"]]
    pairs = [("loss", got["loss"], expected["loss"])]
    pairs += [(f"params[{name!r}]", got["params"][name], value)
              for name, value in expected["params"].items()]
    pairs += [(f"carry[{i}]", a, b)
              for i, (a, b) in enumerate(zip(got["carry"], expected["carry"], strict=True))]
    for what, actual, wanted in pairs:
        assert actual.shape == wanted.shape, what
        error = np.max(np.abs(actual - wanted)) / np.max(np.abs(wanted))
        assert error <= tolerance, f"{case}: {what} is {error:.2e} from one device's"
    assert len(got["loss"]) == 20


def assert_data_parallel(got: dict[str, Any]) -> None:
    """Parameters and optimizer state replicated, carry split by sequence, one compile."""
    for name, spec in got["specs"].items():
        expected = (None, "data") if name.startswith("carry.") else ()
        while spec and spec[-1] is None:  # an Explicit axis's spec names every dimension
            spec = spec[:-1]
        assert spec == expected, f"{name} has sharding {spec}, expected {expected}"
    assert got["compiles"] == [got["compiles"][0]] * len(got["compiles"])


def compiled_programs(dump: Path) -> list[str]:
    """The optimized programs of the trainer's step that XLA wrote under `dump`."""
    programs = sorted(dump.glob("*jit__step*cpu_after_optimizations.txt"))
    assert programs, f"XLA wrote no optimized program of the trainer's step under {dump}"
    return [program.read_text() for program in programs]


def assert_no_gathered_activations(dump: Path) -> None:
    """The compiled data-parallel program all-reduces the gradient and gathers nothing.

    An all-gather there means some step (typically a reshape of `[T, B, ...]` into
    `[T * B, ...]` before a weight-gradient product: XLA cannot keep the merged axis split)
    copies the whole batch's activations to every device, and every device then computes
    the whole batch's product. Contracting over T and B without the reshape
    (`jnp.einsum("tbg,tbh->gh", ...)`) leaves each device its share and one all-reduce.
    """
    for text in compiled_programs(dump):
        gathers = [line.strip()[:160] for line in text.splitlines() if "all-gather(" in line]
        assert not gathers, "a program gathers across devices:\n" + "\n".join(gathers)
        assert "all-reduce(" in text


@pytest.mark.parametrize("case", FOUR_DEVICES)
def test_four_devices_match_one(tmp_path: Path, case: str) -> None:
    dump = tmp_path / "xla"
    (result,) = run_workers(tmp_path, case, devices=4, processes=1, xla_flags=(
        f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit__step"))
    assert_no_gathered_activations(dump)
    assert result["devices"] == 4
    assert result["uneven batch"] == (
        "xs: the batch size must be a multiple of the 4 devices on the mesh axis 'data' (each "
        "device takes an equal share of the sequences), got 6")
    got = result["results"][case]
    assert_data_parallel(got)
    assert_matches(got, reference(case), case)
    # tbptt_jax.checkpoint's step: the run went on from it after its second call.
    assert (tmp_path / "checkpoints" / case / "2" / "manifest.json").is_file()


@pytest.mark.parametrize("case", TWO_PROCESSES)
def test_two_processes_match_one(tmp_path: Path, case: str) -> None:
    results = run_workers(tmp_path, case, devices=2, processes=2)
    for result in results:
        assert result["devices"] == 4
        assert result["differing state"] == (
            "state: every process must save the same state, but process 1 differs from "
            "process 0 in state.params['w']")
        got = result["results"][case]
        assert_data_parallel(got)
        assert_matches(got, reference(case), case)
    assert not (tmp_path / "differing").exists()
    # tbptt_jax.checkpoint's step, with both processes' shards: the run went on from it.
    step = tmp_path / "checkpoints" / case / "2"
    assert (step / "manifest.json").is_file()
    assert sorted(p.name for p in (step / "arrays").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]


@pytest.mark.parametrize("kernels, cases", [
    *(pytest.param(kernels, cases, id=kernels) for kernels, cases in CELLS_ON_MESHES.items()),
    *(pytest.param(kernels, cases, marks=SLOW, id=f"{kernels}, the rest")
      for kernels, cases in CELLS_ON_MESHES_SLOW.items()),
])
def test_every_kind_of_mesh_matches_one_device(tmp_path: Path, kernels: str,
                                               cases: list[str]) -> None:
    dump = tmp_path / "xla"
    (result,) = run_workers(tmp_path, ";".join(cases), devices=4, processes=1,
                            native=kernels == "compiled", xla_flags=(
        f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit__step"))
    assert result["compiled kernels"] == (kernels == "compiled")
    assert_no_gathered_activations(dump)
    with_kernels = [text for text in compiled_programs(dump) if "tbptt_lstm_forward" in text]
    lstm_cases = [case for case in cases if case.startswith("lstm")]
    assert len(with_kernels) == (len(lstm_cases) if kernels == "compiled" else 0)
    for case in cases:
        got = result["results"][case]
        assert_data_parallel(got)
        assert all(got["carry kept its sharding"]), case
        explicit = jax_cases.MESHES[jax_cases.CASES[case]["mesh"]][0] == AxisType.Explicit
        assert all(("8@data" in typed) == explicit for typed in got["carry types"]), (
            case, got["carry types"])
        assert_matches(got, reference(case), case)


def test_process_rows_is_the_whole_batch_on_one_process() -> None:
    assert sharding.process_rows(sharding.data_mesh(), 8) == slice(0, 8)


def test_bad_arguments_are_named() -> None:
    mesh = sharding.data_mesh()
    xs = np.zeros((5, 4, 3), np.float32)
    with pytest.raises(ValueError, match=r"axis must name an axis of the mesh \('data',\), "
                                         r"got 'batch'"):
        sharding.shard_batch(mesh, xs, xs, axis="batch")
    with pytest.raises(ValueError, match="carry: pass the carry to shard"):
        sharding.shard_state(mesh, {}, (), None)
    with pytest.raises(ValueError, match=r"carry must have a batch axis 1, got an array of "
                                         r"shape \(4,\)"):
        sharding.shard_state(mesh, {}, (), np.zeros(4))
    with pytest.raises(ValueError, match="devices must name at least one device"):
        sharding.data_mesh([])
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        sharding.request_cpu_devices(0)
    with pytest.raises(ValueError, match="axis_type must be AxisType.Auto or "
                                         "AxisType.Explicit, got 'explicit'"):
        sharding.data_mesh(axis_type="explicit")


def test_a_carry_not_split_like_the_batch_on_an_explicit_mesh_is_named() -> None:
    """On an Explicit mesh the batch's split is in the types, and a carry that lacks it
    cannot enter the layer's scan: the trainer says so before anything runs."""
    mesh = sharding.data_mesh(axis_type=AxisType.Explicit)
    model, optimizer = models.lstm(3, 5, 2), optax.sgd(0.1)
    params = model.init(jax.random.key(0), jnp.float64)
    xs, ys, _ = sharding.shard_batch(mesh, np.zeros((6, 4, 3)), np.zeros((6, 4, 2)))
    message = (r"carry must be split over the batch as xs is on a mesh with Explicit axes: "
               r"xs is float64\[6,4@data,3\], the carry has \['float64\[1,4,5\]', "
               r"'float64\[1,4,5\]'\]; place it as the batch, e.g. with "
               r"jax.device_put\(carry, P\(None, 'data'\)\)")
    for carry in (None, model.initial_carry(4, jnp.float64)):
        with pytest.raises(ValueError, match=message):
            tbptt_jax.tbptt_train_step(params, optimizer.init(params), carry, xs, ys,
                                       apply_fn=model.apply, loss_fn=losses.mse,
                                       optimizer=optimizer, k1=3)


def test_sequences_split_over_time_on_an_explicit_mesh_are_named() -> None:
    """JAX's sharding guide splits axis 0, the batch of its examples; here it is time."""
    mesh = sharding.data_mesh(axis_type=AxisType.Explicit)
    model, optimizer = models.lstm(3, 5, 2), optax.sgd(0.1)
    params = model.init(jax.random.key(0), jnp.float64)
    xs, ys = (jax.device_put(np.zeros((6, 4, size)), jax.NamedSharding(mesh, jax.P("data")))
              for size in (3, 2))
    with pytest.raises(ValueError, match=r"xs must be split over its batch axis \(1\), not its "
                                         r"time axis \(0\): got float64\[6@data,4,3\]; place "
                                         r"it with P\(None, 'data'\)"):
        tbptt_jax.tbptt_train_step(params, optimizer.init(params), None, xs, ys,
                                   apply_fn=model.apply, loss_fn=losses.mse,
                                   optimizer=optimizer, k1=3)


def test_cpu_devices_asked_for_after_the_backends_started_change_nothing() -> None:
    before = jax.devices("cpu")  # starts the backends, if nothing had
    sharding.request_cpu_devices(len(before) + 1)
    assert jax.devices("cpu") == before


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_one_device_mesh_places_as_documented(axis_type: AxisType) -> None:
    mesh = sharding.data_mesh(axis_type=axis_type)
    assert mesh.axis_names == ("data",) and mesh.axis_types == (axis_type,)
    params, opt_state, carry = sharding.shard_state(
        mesh, {"w": np.ones((2, 3))}, (np.zeros(()),), (np.zeros((1, 4, 5)),) * 2)
    xs, ys, resets = sharding.shard_batch(mesh, np.ones((6, 4, 3)), np.ones((6, 4, 2)))
    # Written as the trainer returns them: an Explicit axis's spec names every dimension.
    explicit = axis_type == AxisType.Explicit
    assert tuple(params["w"].sharding.spec) == ((None, None) if explicit else ())
    assert tuple(opt_state[0].sharding.spec) == ()
    assert tuple(carry[1].sharding.spec) == ((None, "data", None) if explicit else
                                             (None, "data"))
    assert tuple(xs.sharding.spec) == tuple(carry[1].sharding.spec)
    assert str(jax.typeof(xs)) == ("float64[6,4@data,3]" if explicit else "float64[6,4,3]")
    assert resets is None and isinstance(ys, jax.Array)
    np.testing.assert_array_equal(np.asarray(params["w"]), np.ones((2, 3)))
