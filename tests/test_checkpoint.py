"""Checkpoint and resume, in both frameworks: exact round trips, clear errors, real kills.

A checkpoint round trip gives back every leaf with its type, dtype and bits, the carry
(with an OverlapCarry's overlap and resets) included. A missing checkpoint is a
`FileNotFoundError`, a truncated or corrupted one a `CheckpointError` naming the file,
never a fresh start; a save that fails part-way leaves the previous checkpoint as it was.
Last, `tests/checkpoint_worker.py` trains in a subprocess, is killed with SIGKILL after
three checkpoints (with a fourth segment trained and not saved), resumes, and ends with the
same bits as a run never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import tbptt_jax
import tbptt_torch
from tbptt_jax import checkpoint as jax_checkpoint
from tbptt_jax.checkpoint import CheckpointError as JaxCheckpointError
from tbptt_jax.checkpoint import TrainState
from tbptt_torch import checkpoint as torch_checkpoint
from tbptt_torch.checkpoint import CheckpointError as TorchCheckpointError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "checkpoint_worker.py"
BATCH, INPUT, HIDDEN, OUTPUT, OVERLAP = 3, 2, 4, 2, 2
JAX_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


def same_bits(restored, saved) -> None:
    """Asserts two pytrees have one structure (node types included), leaf types, dtypes
    and bytes."""
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                            jax.tree.leaves(saved), strict=True):
        where = jax.tree_util.keystr(path)
        assert type(a) is type(b), where
        if isinstance(b, bool | int | float):
            assert a == b, where
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where


def jax_array(shape, dtype=np.float64, seed: int = 0) -> jax.Array:
    """Random values put on the device; made in numpy, so no kernel is compiled for them."""
    values = np.random.default_rng(seed).normal(size=shape) * 10
    return jnp.asarray(values.astype(dtype))


def jax_params(hidden: int = HIDDEN, dtype=np.float64, seed: int = 0) -> dict[str, jax.Array]:
    shapes = tbptt_jax.models.lstm(INPUT, hidden, OUTPUT).param_shapes()
    return {name: jax_array(shape, dtype, seed + i) for i, (name, shape) in
            enumerate(shapes.items())}


def jax_state(carry, position: int = 7, seed: int = 0) -> TrainState:
    """A state with every kind of leaf: float64 params, Adam's int32 count, optax's empty
    states, typed and raw keys, a None, a numpy array, Python numbers."""
    params = jax_params(seed=seed)
    # The structure of the optimizer's state, filled with values other than its zeros.
    opt_state = jax.tree.map(lambda leaf: jax_array(leaf.shape, leaf.dtype, seed + 1),
                             jax.eval_shape(JAX_OPTIMIZER.init, params))
    rng = {"typed": jax.random.key(seed), "raw": jax.random.PRNGKey(seed + 1), "none": None,
           "numpy": np.arange(3, dtype=np.uint32), "count": 5, "temperature": 0.5}
    return TrainState(params, opt_state, carry, position, rng,
                      {"losses": [0.1, 1 / 3], "note": "é"})


def lstm_carry() -> tuple[jax.Array, jax.Array]:
    return jax_array((1, BATCH, HIDDEN), seed=1), jax_array((1, BATCH, HIDDEN), seed=2)


JAX_CARRIES = {
    "none": None,
    "elman": jax_array((1, BATCH, HIDDEN)),
    "lstm": lstm_carry(),
    "overlap_with_resets": tbptt_jax.OverlapCarry(
        lstm_carry(), jax_array((OVERLAP, BATCH, INPUT)),
        jnp.asarray(np.array([[True, False, False], [False, False, True]]))),
    "empty_overlap": tbptt_jax.OverlapCarry(
        lstm_carry(), jax_array((0, BATCH, INPUT)), None),
    "containers": {"layers": [jax_array((2, 2), np.float32), np.arange(3, dtype=np.int8)],
                   "pair": (jax_array(()), None)},
}


@pytest.mark.parametrize("carry", JAX_CARRIES.values(), ids=JAX_CARRIES.keys())
def test_jax_round_trip_gives_back_every_type_dtype_and_bit(tmp_path, carry):
    state = jax_state(carry)
    jax_checkpoint.save(tmp_path, 3, state)
    # `like` is the fresh state of a run: other values, the same structure.
    restored = jax_checkpoint.restore(tmp_path, like=jax_state(None, position=0, seed=9))
    same_bits(restored[:-1], state[:-1])
    assert restored.position == 7 and isinstance(restored.position, int)
    assert restored.metadata == {"losses": [0.1, 1 / 3], "note": "é"}


def test_jax_keeps_max_to_keep_steps_and_restores_latest_or_a_given_one(tmp_path):
    for step in (1, 2, 3):
        jax_checkpoint.save(tmp_path, step, jax_state(None, position=10 * step),
                            max_to_keep=2)
    assert jax_checkpoint.all_steps(tmp_path) == [2, 3]
    assert jax_checkpoint.latest_step(tmp_path) == 3
    like = jax_state(None, position=0)
    assert jax_checkpoint.restore(tmp_path, like).position == 30
    assert jax_checkpoint.restore(tmp_path, like, step=2).position == 20
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 1 .* \[2, 3\]"):
        jax_checkpoint.restore(tmp_path, like, step=1)
    with pytest.raises(ValueError, match="step must be greater than the latest step saved in "
                                         ".*, 3; got 3"):
        jax_checkpoint.save(tmp_path, 3, like)


def test_jax_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    like = jax_state(None)
    missing = tmp_path / "run"
    assert jax_checkpoint.latest_step(missing) is None
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(missing))} does not exist"):
        jax_checkpoint.restore(missing, like)
    # What a save killed before orbax renamed it into place leaves.
    (missing / "4.orbax-checkpoint-tmp-1754").mkdir(parents=True)
    assert jax_checkpoint.latest_step(missing) is None
    with pytest.raises(FileNotFoundError, match=r"only saves that never finished: "
                                                r"\['4.orbax-checkpoint-tmp-1754'\]"):
        jax_checkpoint.restore(missing, like)


def largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def damage_jax(step_dir: Path, how: str) -> tuple[Path, str]:
    """Damages one file of a saved step; returns it and the error expected."""
    manifest = step_dir / "manifest.json"
    if how == "truncated_arrays":
        file = largest_array_file(step_dir)
        file.write_bytes(file.read_bytes()[:-7])
        return file, "does not match the SHA-256 in the manifest"
    if how == "flipped_byte_in_arrays":
        file = largest_array_file(step_dir)
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
        return file, "does not match the SHA-256 in the manifest"
    if how == "missing_arrays_file":
        file = step_dir / "arrays" / "_METADATA"
        file.unlink()
        return file, "is missing, the checkpoint is incomplete"
    if how == "truncated_manifest":
        manifest.write_bytes(manifest.read_bytes()[:100])
        return manifest, "cannot be read, the checkpoint is truncated or corrupted"
    # A byte that keeps the JSON valid: the position 7 becomes 8.
    text = manifest.read_text()
    assert text.count('"position": 7') == 1
    manifest.write_text(text.replace('"position": 7', '"position": 8'))
    return manifest, "does not match its digest, the checkpoint is corrupted"


@pytest.mark.parametrize("how", ["truncated_arrays", "flipped_byte_in_arrays",
                                 "missing_arrays_file", "truncated_manifest",
                                 "edited_manifest"])
def test_jax_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, how):
    jax_checkpoint.save(tmp_path, 1, jax_state(JAX_CARRIES["overlap_with_resets"]))
    file, message = damage_jax(tmp_path / "1", how)
    with pytest.raises(JaxCheckpointError, match=message) as raised:
        jax_checkpoint.restore(tmp_path, like=jax_state(None))
    assert str(file) in str(raised.value)


def test_jax_like_that_does_not_fit_is_a_clear_error(tmp_path):
    jax_checkpoint.save(tmp_path, 1, jax_state(None))
    state = jax_state(None)
    wider = jax_params(hidden=HIDDEN + 1)
    with pytest.raises(ValueError, match=r"like.params\['head.weight'\]: .* holds "
                                         r"float64\[2, 4\], like has float64\[2, 5\]"):
        jax_checkpoint.restore(tmp_path, state._replace(params=wider))
    with pytest.raises(ValueError, match=r"like.params\['head.bias'\]: .* holds "
                                         r"float64\[2\], like has float32\[2\]"):
        jax_checkpoint.restore(tmp_path, state._replace(params=jax_params(dtype=np.float32)))
    sgd_state = jax.eval_shape(optax.sgd(0.1, momentum=0.9).init, state.params)
    with pytest.raises(ValueError, match=r"like.opt_state does not have the structure of "
                                         r"opt_state in .*: missing "
                                         r"\[.opt_state\[1\]\[0\].count."):
        jax_checkpoint.restore(tmp_path, state._replace(opt_state=sgd_state))


def test_jax_save_that_fails_before_the_rename_leaves_the_last_step(tmp_path, monkeypatch):
    jax_checkpoint.save(tmp_path, 1, jax_state(None, position=1))

    def disk_full(path):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(jax_checkpoint, "_sync_tree", disk_full)
        with pytest.raises(OSError, match="No space left"):
            jax_checkpoint.save(tmp_path, 2, jax_state(None, position=2))
    # orbax's temporary directory, never renamed into place.
    assert [p.name for p in tmp_path.iterdir() if p.name != "1"] == ["2.orbax-checkpoint-tmp"]
    assert jax_checkpoint.all_steps(tmp_path) == [1]
    assert jax_checkpoint.restore(tmp_path, jax_state(None)).position == 1
    # The next save of that step replaces what the failed one left.
    jax_checkpoint.save(tmp_path, 2, jax_state(None, position=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    assert jax_checkpoint.restore(tmp_path, jax_state(None)).position == 2


class NotACarry(tuple):
    pass


@pytest.mark.parametrize("field, value, message", [
    ("metadata", {"when": object()}, "state.metadata must be JSON-serialisable"),
    ("metadata", ["losses"], "state.metadata must be a dict with str keys or None, got list"),
    ("position", -1, "state.position must be an int >= 0, got -1"),
    ("carry", NotACarry((jnp.zeros(2),)), "state.carry: a checkpoint's carry is built of "
                                          "arrays, .* got NotACarry"),
    ("rng", "seed", "state.rng: a checkpoint holds arrays, PRNG keys and Python numbers, "
                    "got str"),
])
def test_jax_bad_state_is_refused_before_anything_is_written(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        jax_checkpoint.save(tmp_path / "run", 1, jax_state(None)._replace(**{field: value}))
    assert not (tmp_path / "run").exists()


def torch_run(carry_kind: str = "overlap"):
    """A float64 LSTM and Adam after one TBPTT(3, 5) call with resets, and its carry."""
    torch.manual_seed(0)
    model = tbptt_torch.models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(6, BATCH, INPUT, generator=generator, dtype=torch.float64)
    ys = torch.randn(6, BATCH, OUTPUT, generator=generator, dtype=torch.float64)
    resets = torch.rand(6, BATCH, generator=generator) < 0.3
    carry, _ = tbptt_torch.tbptt_train_step(model, optimizer, None, xs, ys, resets=resets,
                                            loss_fn=tbptt_torch.losses.mse, k1=3, k2=5)
    assert isinstance(carry, tbptt_torch.OverlapCarry) and carry.resets is not None
    carries = {"overlap": carry, "none": None, "lstm": carry.state, "elman": carry.state[0],
               "overlap_without_resets": carry._replace(resets=None),
               "containers": {"layers": [carry.xs, carry.resets], "pair": (None,)}}
    return model, optimizer, carries[carry_kind]


def torch_fresh():
    model = tbptt_torch.models.LSTMModel(INPUT, HIDDEN, OUTPUT).double()
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def assert_same_tensors(restored, saved) -> None:
    if isinstance(saved, torch.Tensor):
        assert restored.dtype == saved.dtype and restored.shape == saved.shape
        assert restored.numpy().tobytes() == saved.numpy().tobytes()
        return
    assert type(restored) is type(saved)
    if isinstance(saved, dict):
        assert list(restored) == list(saved)
        for key in saved:
            assert_same_tensors(restored[key], saved[key])
    elif isinstance(saved, tuple | list):
        assert len(restored) == len(saved)
        for a, b in zip(restored, saved, strict=True):
            assert_same_tensors(a, b)
    else:
        assert restored == saved


@pytest.mark.parametrize("carry_kind", ["overlap", "none", "lstm", "elman",
                                        "overlap_without_resets", "containers"])
def test_torch_round_trip_gives_back_the_state_and_the_random_generators(tmp_path,
                                                                        carry_kind):
    model, optimizer, carry = torch_run(carry_kind)
    path = torch_checkpoint.save(tmp_path / "run" / "checkpoint.pt", model=model,
                                 optimizer=optimizer, carry=carry, position=7,
                                 metadata={"losses": [0.1, 1 / 3]})
    # What the generators draw next, after the save.
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    fresh_model, fresh_optimizer = torch_fresh()
    restored = torch_checkpoint.restore(path, model=fresh_model, optimizer=fresh_optimizer)
    assert_same_tensors(fresh_model.state_dict(), model.state_dict())
    assert_same_tensors(fresh_optimizer.state_dict(), optimizer.state_dict())
    assert_same_tensors(restored.carry, carry)
    assert restored.position == 7 and restored.metadata == {"losses": [0.1, 1 / 3]}
    redraws = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(redraws[0], draws[0]) and redraws[1] == draws[1]
    np.testing.assert_array_equal(redraws[2], draws[2])


def test_torch_saves_a_carry_view_without_the_storage_under_it(tmp_path):
    model, optimizer, carry = torch_run()
    # The overlap of a long call is a view of its whole xs: 10000 steps, 240 kB of float64.
    long_xs = torch.zeros(10000, BATCH, INPUT, dtype=torch.float64)
    long_xs[-OVERLAP:] = carry.xs
    carry = carry._replace(xs=long_xs[-OVERLAP:])
    path = torch_checkpoint.save(tmp_path / "c.pt", model=model, optimizer=optimizer,
                                 carry=carry, position=1)
    assert path.stat().st_size < 60_000
    restored = torch_checkpoint.restore(path, model=model, optimizer=optimizer)
    assert restored.carry.xs.untyped_storage().nbytes() == OVERLAP * BATCH * INPUT * 8
    assert torch.equal(restored.carry.xs, carry.xs)


def damage_torch(path: Path, how: str) -> str:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
        return "does not end with the tbptt_torch.checkpoint trailer: the file is truncated"
    if how == "flipped_byte":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        return "the archive does not match the SHA-256 in its trailer; the file is corrupted"
    if how == "cut_to_a_few_bytes":
        path.write_bytes(data[:10])
        return "is 10 bytes, shorter than a checkpoint's 60-byte trailer: truncated"
    torch.save({"model": {}}, path)  # a plain torch.save in place of a checkpoint
    return "does not end with the tbptt_torch.checkpoint trailer"


@pytest.mark.parametrize("how", ["truncated", "flipped_byte", "cut_to_a_few_bytes",
                                 "plain_torch_save"])
def test_torch_damaged_checkpoint_is_a_clear_error_and_leaves_the_model(tmp_path, how):
    model, optimizer, carry = torch_run()
    path = torch_checkpoint.save(tmp_path / "c.pt", model=model, optimizer=optimizer,
                                 carry=carry, position=1)
    message = damage_torch(path, how)
    fresh_model, fresh_optimizer = torch_fresh()
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(TorchCheckpointError, match=message) as raised:
        torch_checkpoint.restore(path, model=fresh_model, optimizer=fresh_optimizer)
    assert str(path) in str(raised.value)
    assert_same_tensors(dict(fresh_model.state_dict()), before)


def test_torch_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    model, optimizer = torch_fresh()
    with pytest.raises(FileNotFoundError, match="no checkpoint to restore: "
                       f"{re.escape(str(tmp_path / 'c.pt'))} does not exist"):
        torch_checkpoint.restore(tmp_path / "c.pt", model=model, optimizer=optimizer)


def test_torch_save_that_fails_midway_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    model, optimizer, carry = torch_run()
    path = torch_checkpoint.save(tmp_path / "c.pt", model=model, optimizer=optimizer,
                                 carry=carry, position=1)
    old = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, file):
        real_save(obj, file)  # a whole archive written, the failure comes after it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        torch_checkpoint.save(path, model=model, optimizer=optimizer, carry=carry, position=2)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    fresh_model, fresh_optimizer = torch_fresh()
    assert torch_checkpoint.restore(path, model=fresh_model,
                                    optimizer=fresh_optimizer).position == 1


def test_torch_checkpoint_that_does_not_fit_is_refused_before_loading(tmp_path):
    model, optimizer, carry = torch_run()
    path = torch_checkpoint.save(tmp_path / "c.pt", model=model, optimizer=optimizer,
                                 carry=carry, position=1)
    wider = tbptt_torch.models.LSTMModel(INPUT, HIDDEN + 1, OUTPUT).double()
    with pytest.raises(ValueError, match=r"model does not fit .*c.pt: rnn.weight_ih_l0 is "
                                         r"torch.float64\[16, 2\] there, torch.float64\[20, 2\]"):
        torch_checkpoint.restore(path, model=wider, optimizer=torch.optim.Adam(
            wider.parameters()))
    fresh_model, _ = torch_fresh()
    before = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    with pytest.raises(ValueError, match="optimizer does not fit .*: it was saved from Adam, "
                                         "got SGD"):
        torch_checkpoint.restore(path, model=fresh_model,
                                 optimizer=torch.optim.SGD(fresh_model.parameters(), lr=0.1))
    assert_same_tensors(dict(fresh_model.state_dict()), before)


@pytest.mark.parametrize("argument, value, message", [
    ("metadata", {"when": object()}, "metadata must be JSON-serialisable"),
    ("position", 1.5, "position must be an int >= 0, got 1.5"),
    ("carry", NotACarry((torch.zeros(2),)), "carry: a checkpoint's carry is built of "
                                            "tensors, .* got NotACarry"),
])
def test_torch_bad_state_is_refused_before_anything_is_written(tmp_path, argument, value,
                                                              message):
    model, optimizer = torch_fresh()
    arguments = {"model": model, "optimizer": optimizer, "carry": None, "position": 0,
                 argument: value}
    with pytest.raises(ValueError, match=message):
        torch_checkpoint.save(tmp_path / "run" / "c.pt", **arguments)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    """The workers' environment: one JAX compilation cache for the three runs, so only the
    first compiles (a cached executable is the one the compiler would produce again)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def start_worker(framework: str, workdir: Path, env: dict[str, str], *options: str,
                 processes: int = 1) -> list[subprocess.Popen]:
    """Starts a run: one worker process, or `processes` JAX processes of one CPU device each
    joined on localhost (each logging to `stderr-<i>.txt`)."""
    workdir.mkdir(exist_ok=True)
    if processes == 1:
        commands = {"stderr.txt": []}
    else:
        env = {**env, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
        port = str(free_port())
        commands = {f"stderr-{i}.txt": ["--processes", str(processes), "--process-id", str(i),
                                        "--port", port] for i in range(processes)}
    run = []
    for log, extra in commands.items():
        with (workdir / log).open("w") as stderr:
            run.append(subprocess.Popen(
                [sys.executable, "-W", "error", str(WORKER), framework, str(workdir), *options,
                 *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
    return run


def logs(workdir: Path) -> str:
    return "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}"
                     for log in sorted(workdir.glob("stderr*.txt")))


def finish(run: list[subprocess.Popen], workdir: Path) -> None:
    try:
        for process in run:
            assert process.wait(timeout=600) == 0, logs(workdir)
    finally:
        for process in run:  # the others of a failed run would wait for it forever
            if process.poll() is None:
                process.kill()
                process.wait()


def kill_when_stalled(run: list[subprocess.Popen], workdir: Path) -> None:
    """Waits until every process of the run has trained a segment it will not save, then
    SIGKILLs them."""
    markers = ["stalled"] if len(run) == 1 else [f"stalled-{i}" for i in range(len(run))]
    try:
        deadline = time.monotonic() + 600
        while not all((workdir / marker).exists() for marker in markers):
            assert all(process.poll() is None for process in run), (
                f"a worker exited early: {logs(workdir)}")
            assert time.monotonic() < deadline, "the worker never reached its stall"
            time.sleep(0.05)
    finally:
        for process in run:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert [process.returncode for process in run] == [-signal.SIGKILL] * len(run)


def assert_same_final_state(uninterrupted: Path, interrupted: Path) -> None:
    with np.load(uninterrupted / "final.npz") as expected, \
            np.load(interrupted / "final.npz") as resumed:
        assert int(expected["started_at"]) == 0 and int(resumed["started_at"]) == 3
        assert sorted(resumed.files) == sorted(expected.files)
        for name in expected.files:
            if name == "started_at":
                continue
            assert resumed[name].dtype == expected[name].dtype, name
            assert resumed[name].shape == expected[name].shape, name
            assert resumed[name].tobytes() == expected[name].tobytes(), name
        # Six segments of one update each, every loss finite: the runs trained.
        losses = expected["losses"]
        assert losses.shape == (6,) and np.all(np.isfinite(losses))
        assert losses[-1] != losses[0]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_a_run_killed_and_resumed_ends_bitwise_identical_to_an_uninterrupted_one(
        tmp_path, worker_env, framework):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    reference = start_worker(framework, uninterrupted, worker_env)
    if framework == "jax":
        # The later runs then find its compiled programs in the cache; torch has nothing
        # to share, so its reference runs beside the interrupted run.
        finish(reference, uninterrupted)

    killed = start_worker(framework, interrupted, worker_env, "--stall-after", "3")
    kill_when_stalled(killed, interrupted)
    assert sorted(p.name for p in interrupted.glob("saved-*")) == [
        "saved-1", "saved-2", "saved-3"]
    assert not (interrupted / "final.npz").exists()
    finish(start_worker(framework, interrupted, worker_env), interrupted)
    finish(reference, uninterrupted)
    assert_same_final_state(uninterrupted, interrupted)


def test_two_jax_processes_killed_and_resumed_end_bitwise_identical_to_an_uninterrupted_run(
        tmp_path, worker_env):
    """The run of `test_a_run_killed...` on two processes joined by jax.distributed, the
    batch split over their devices: both save every segment to one directory and restore
    from it; both are killed after the third save, with a fourth segment trained."""
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    finish(start_worker("jax", uninterrupted, worker_env, processes=2), uninterrupted)

    killed = start_worker("jax", interrupted, worker_env, "--stall-after", "3", processes=2)
    kill_when_stalled(killed, interrupted)
    assert sorted(p.name for p in interrupted.glob("saved-*")) == [
        f"saved-{step}-{process}" for step in (1, 2, 3) for process in (0, 1)]
    assert jax_checkpoint.all_steps(interrupted / "checkpoints") == [2, 3]
    # Each process wrote the shards of the carry its device holds.
    arrays = interrupted / "checkpoints" / "3" / "arrays"
    assert sorted(p.name for p in arrays.glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]
    assert not (interrupted / "final.npz").exists()
    finish(start_worker("jax", interrupted, worker_env, processes=2), interrupted)
    assert_same_final_state(uninterrupted, interrupted)


def test_the_manifest_is_plain_json_a_person_can_read(tmp_path):
    path = jax_checkpoint.save(tmp_path, 5, jax_state(JAX_CARRIES["overlap_with_resets"]))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["position"] == 7 and manifest["step"] == 5
    assert list(manifest["carry"]) == ["OverlapCarry"]
    records = {record["path"]: record for record in manifest["leaves"]}
    assert records["params['head.weight']"]["dtype"] == "float64"
    assert records["params['head.weight']"]["shape"] == [OUTPUT, HIDDEN]
    assert records["opt_state[1][0].count"]["dtype"] == "int32"
    assert records["rng['typed']"]["dtype"] == "key<fry>"
    assert records["carry.resets"]["shape"] == [OVERLAP, BATCH]


def test_tbptt_jax_imports_without_orbax_and_save_says_what_to_install(tmp_path):
    source = f"""
import importlib.abc, sys

class NoOrbax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "orbax":
            raise ImportError("orbax is blocked for this test")

sys.meta_path.insert(0, NoOrbax())
import numpy as np
import tbptt_jax
from tbptt_jax import checkpoint
try:
    checkpoint.save({str(tmp_path)!r}, 1, checkpoint.TrainState({{"w": np.ones(2)}}, ()))
except ImportError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-W", "error", "-c", source], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("tbptt_jax.checkpoint needs orbax-checkpoint: "
                                     "pip install 'tbptt[checkpoint]'")
    assert list(tmp_path.iterdir()) == []
