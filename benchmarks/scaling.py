"""Data-parallel scaling: TBPTT throughput against the number of devices, both frameworks.

For each device count n, one measurement in fresh processes: JAX runs `tbptt_train_step`
in one process on a mesh of n devices (`tbptt_jax.sharding`), torch runs
`tbptt_torch.tbptt_train_step` under DDP in n ranks (`torchrun`, gloo on CPU, NCCL on
CUDA). The batch grows with the devices (weak scaling: `PER_DEVICE_BATCH` sequences per
device), so perfect scaling keeps the time per call flat and multiplies the throughput
(sequence-steps per second) by n. Each measurement is one compile or warm-up call, then
the median of `repeats` timed calls; on torch a call's time is the slowest rank's.

On a machine without accelerators the "devices" are XLA's virtual CPU devices
(`JAX_NUM_CPU_DEVICES`) and torch ranks of one thread each, all sharing the machine's
cores: up to the number of cores, more devices put idle cores to work (one JAX device
already uses them all: XLA's pool, and the LSTM's compiled loops split over it; one torch
rank has one thread); beyond it they only add collectives and partitioning. The results
file says so. Run it where the devices are real for scaling proper.

    python -m benchmarks.scaling                    # writes benchmarks/results/scaling-<machine>.*
    python -m benchmarks.scaling --devices 1 2 4 --frameworks jax --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG = {"cell": "lstm", "input_size": 16, "hidden_size": 128, "output_size": 16,
          "steps": 200, "k1": 50}
PER_DEVICE_BATCH = 32
FRAMEWORKS = ("jax", "torch")
TIMEOUT_S = 900


def _data(batch: int, rows: slice) -> tuple[Any, Any]:
    """Inputs `[T, B, I]` of the whole batch's `rows`, and as targets the inputs 3 steps back."""
    import numpy as np

    rng = np.random.default_rng(0)
    xs = rng.standard_normal((CONFIG["steps"], batch, CONFIG["input_size"]), dtype=np.float32)
    return xs[:, rows], np.roll(xs, 3, axis=0)[:, rows]


def _sizes() -> tuple[int, int, int]:
    return CONFIG["input_size"], CONFIG["hidden_size"], CONFIG["output_size"]


def measure_jax(devices: int, repeats: int) -> dict[str, Any]:
    """One JAX measurement on the first `devices` devices of this process."""
    import jax
    import optax

    from tbptt_jax import losses, models, sharding, tbptt_train_step

    available = jax.devices()
    if len(available) < devices:
        raise RuntimeError(f"asked for {devices} devices, JAX sees {len(available)}")
    mesh = sharding.data_mesh(available[:devices])
    model = models.lstm(*_sizes())
    optimizer = optax.adam(1e-3)
    batch = devices * PER_DEVICE_BATCH
    params = model.init(jax.random.key(0))
    params, opt_state, carry = sharding.shard_state(mesh, params, optimizer.init(params),
                                                    model.initial_carry(batch))
    xs, ys, _ = sharding.shard_batch(mesh, *_data(batch, slice(None)))

    def call() -> float:
        nonlocal params, opt_state, carry
        start = time.perf_counter()
        params, opt_state, carry, metrics = tbptt_train_step(
            params, opt_state, carry, xs, ys, apply_fn=model.apply, loss_fn=losses.mse,
            optimizer=optimizer, k1=CONFIG["k1"])
        jax.block_until_ready((params, opt_state, carry, metrics))
        return time.perf_counter() - start

    first = call()
    times = [call() for _ in range(repeats)]
    return {"devices": devices, "device_kind": available[0].device_kind, "batch": batch,
            "first_call_s": first, "times_s": times}


def measure_torch(repeats: int) -> dict[str, Any] | None:
    """One torch measurement as a rank of a torchrun job; rank 0 returns it."""
    import torch
    import torch.distributed as dist

    from tbptt_torch import distributed, losses, models, tbptt_train_step

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cpu")
    options: dict[str, Any] = {}
    if cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        options["device_ids"] = [local_rank]
    else:
        torch.set_num_threads(1)  # the ranks share the cores; more threads only contend
    torch.manual_seed(0)
    model = models.LSTMModel(*_sizes()).to(device)
    trained = distributed.data_parallel(model, reduction="mean", **options)
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    batch = world_size * PER_DEVICE_BATCH
    xs, ys = (torch.from_numpy(a.copy()).to(device)
              for a in _data(batch, distributed.rank_rows(batch)))
    carry = None

    def call() -> float:
        nonlocal carry
        dist.barrier()
        start = time.perf_counter()
        carry, _ = tbptt_train_step(trained, optimizer, carry, xs, ys, loss_fn=losses.mse,
                                    k1=CONFIG["k1"])
        if cuda:
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the call ends with its last rank
        return float(elapsed)

    first = call()
    times = [call() for _ in range(repeats)]
    kind = torch.cuda.get_device_name(device) if cuda else "cpu"
    dist.destroy_process_group()
    if rank:
        return None
    return {"devices": world_size, "device_kind": kind, "batch": batch, "first_call_s": first,
            "times_s": times}


def _spawn(framework: str, devices: int, repeats: int, accelerator: bool) -> dict[str, Any]:
    """Runs one measurement in fresh processes and returns what it wrote."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                            os.environ.get("PYTHONPATH", "")])}
        worker = ["-m", "benchmarks.scaling", "--measure", framework, "--repeats", str(repeats),
                  "--devices", str(devices), "--result", str(result)]
        if framework == "jax":
            if not accelerator:
                env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
                env.pop("XLA_FLAGS", None)
            command = [sys.executable, *worker]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(devices), *worker]
            env.setdefault("OMP_NUM_THREADS", "1")
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if done.returncode != 0 or not result.exists():
            return {"devices": devices, "status": "failed",
                    "error": (done.stderr or done.stdout)[-2000:]}
        measured = json.loads(result.read_text())
    median = statistics.median(measured["times_s"])
    steps = CONFIG["steps"] * measured["batch"]
    return {**measured, "status": "ok", "median_s": median,
            "sequence_steps_per_s": steps / median}


def _accelerators() -> tuple[int, str | None]:
    """(number of GPUs torch sees, their name), without importing jax here."""
    try:
        import torch
    except ImportError:
        return 0, None
    if not torch.cuda.is_available():
        return 0, None
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def default_device_counts(accelerators: int) -> list[int]:
    """1, 2, 4, ... up to the GPUs there are; 1, 2, 4 virtual devices on a CPU machine."""
    most = accelerators if accelerators else 4
    counts, n = [], 1
    while n <= most:
        counts.append(n)
        n *= 2
    return counts


def run(out_dir: str | Path = ROOT / "benchmarks" / "results", *,
        devices: Sequence[int] | None = None, frameworks: Sequence[str] = FRAMEWORKS,
        repeats: int = 5) -> dict[str, Any]:
    """Measures every (framework, device count) and writes `scaling-<machine>.json/.md`.

    Args:
      out_dir: where the results file and its table go.
      devices: the device counts; default `default_device_counts`.
      frameworks: any of "jax" and "torch".
      repeats: timed calls per measurement (after one compile or warm-up call).

    Returns:
      The results: `machine`, `config`, `note` and per framework a list of measurements
      (`devices`, `batch`, `median_s`, `sequence_steps_per_s`, `speedup`, `efficiency`).
    """
    unknown = [name for name in frameworks if name not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"frameworks must be among {FRAMEWORKS}, got {unknown}")
    accelerators, gpu = _accelerators()
    counts = list(devices) if devices else default_device_counts(accelerators)
    machine_name = "cuda" if accelerators else "cpu"
    results: dict[str, Any] = {
        "tbptt": _git_describe(),
        "machine": {"name": machine_name, "platform": platform.platform(),
                    "logical_cores": os.cpu_count(), "gpus": accelerators, "gpu": gpu,
                    "load_average_before": os.getloadavg()},
        "config": {**CONFIG, "per_device_batch": PER_DEVICE_BATCH, "repeats": repeats,
                   "optimizer": "adam", "dtype": "float32", "scaling": "weak"},
        "note": _note(accelerators),
        "frameworks": {},
    }
    for framework in frameworks:
        rows = [_spawn(framework, n, repeats, accelerators > 0) for n in counts]
        base = next((row for row in rows if row["status"] == "ok" and row["devices"] == 1),
                    None)
        for row in rows:
            if base is not None and row["status"] == "ok":
                row["speedup"] = row["sequence_steps_per_s"] / base["sequence_steps_per_s"]
                row["efficiency"] = row["speedup"] / row["devices"]
        results["frameworks"][framework] = rows
    results["machine"]["load_average_after"] = os.getloadavg()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"scaling-{machine_name}.json").write_text(json.dumps(results, indent=1))
    (out_dir / f"scaling-{machine_name}.md").write_text(render(results))
    return results


def _git_describe() -> str | None:
    """The commit measured, with "-dirty" when the working tree had changes."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _note(accelerators: int) -> str:
    if accelerators:
        return (f"{accelerators} GPU(s); JAX on a mesh of the first n, torch DDP over NCCL "
                "with n ranks.")
    cores = os.cpu_count()
    return (f"CPU only, {cores} logical cores: JAX's devices are XLA virtual CPU devices and "
            f"torch's ranks are 1-thread processes, all on the same {cores} cores. These "
            "figures are not scaling over real devices. One JAX device already runs on "
            "every core (XLA's thread pool; the LSTM's compiled loops split the batch over "
            "it), so JAX's speed-up is over a baseline that uses them all, while n devices "
            "run n slices of the batch side by side; one torch rank has one thread, so "
            "torch's speed-up up to the number of cores is the cores put to work. Beyond "
            "the cores, more devices only add partitioning and collectives.")


def render(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per framework and device count."""
    config = results["config"]
    lines = [
        f"# Data-parallel scaling on `{results['machine']['name']}`",
        "",
        results["note"],
        "",
        f"{config['cell'].upper()} I{config['input_size']} H{config['hidden_size']}, "
        f"T = {config['steps']} steps per call, k1 = k2 = {config['k1']}, Adam, float32; "
        f"{config['per_device_batch']} sequences per device (weak scaling); median of "
        f"{config['repeats']} calls after one warm-up. Load average before / after: "
        f"{_load(results['machine']['load_average_before'])} / "
        f"{_load(results['machine']['load_average_after'])}. Code: `{results['tbptt']}`.",
        "",
        "| framework | devices | device | batch | time per call | sequence-steps/s | "
        "speed-up | efficiency |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for framework, rows in results["frameworks"].items():
        for row in rows:
            if row["status"] != "ok":
                lines.append(f"| {framework} | {row['devices']} | failed | | | | | |")
                continue
            lines.append(
                f"| {framework} | {row['devices']} | {row['device_kind']} | {row['batch']} | "
                f"{row['median_s'] * 1e3:.1f} ms | {row['sequence_steps_per_s']:,.0f} | "
                f"{row.get('speedup', float('nan')):.2f}x | "
                f"{row.get('efficiency', float('nan')):.0%} |")
    return "\n".join(lines) + "\n"


def _load(load: Sequence[float]) -> str:
    return " ".join(f"{value:.1f}" for value in load)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--devices", type=int, nargs="+", default=None)
    parser.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS),
                        choices=FRAMEWORKS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure == "jax":
        args.result.write_text(json.dumps(measure_jax(args.devices[0], args.repeats)))
        return 0
    if args.measure == "torch":
        measured = measure_torch(args.repeats)
        if measured is not None:
            args.result.write_text(json.dumps(measured))
        return 0
    results = run(args.out, devices=args.devices, frameworks=args.frameworks,
                  repeats=args.repeats)
    sys.stdout.write(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
