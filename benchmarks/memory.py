"""The streamed-memory check: TBPTT's memory must not grow with the length of the stream.

Each framework trains the M configuration's LSTM (I16 H128 B32, k1 = k2 = 50) on a stream
of `steps` steps fed as consecutive segments of `SEGMENT` steps, each call continuing from
the carry the previous one returned, as a real stream is trained. The data of each segment
is drawn when it is needed, so nothing of length T is ever held. Each (framework, steps)
runs in a fresh Python process, whose peak resident set size (`VmHWM`) is the figure
compared: T = 10^6 should peak within 1.1x of T = 10^4. The process also samples its RSS
through the stream (a plot shows whether it creeps) and, on CUDA, reports the device's
peak allocation.

    python -m benchmarks.memory --framework jax --steps 10000      # one run, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONFIG = {"cell": "lstm", "input_size": 16, "hidden_size": 128, "output_size": 16,
          "batch": 32, "k1": 50}
SEGMENT = 1000  # steps per call of tbptt_train_step
SAMPLES = 50  # RSS samples per stream
FRAMEWORKS = ("jax", "torch")
ROOT = Path(__file__).resolve().parent.parent


def _status_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _segment(index: int, length: int) -> tuple[Any, Any]:
    """Segment `index` of the stream: inputs `[length, B, I]` and, as targets, the inputs
    three steps back (the first three steps of each segment repeat its own start)."""
    import numpy as np

    rng = np.random.default_rng(index)
    xs = rng.standard_normal((length, CONFIG["batch"], CONFIG["input_size"]), dtype=np.float32)
    return xs, np.roll(xs, 3, axis=0)


def _trainer(framework: str, device: str) -> tuple[Callable[[Any, Any], float], Callable[[], Any]]:
    """(train(xs, ys) -> last loss, device_peak_bytes()) for one framework's stream."""
    sizes = (CONFIG["input_size"], CONFIG["hidden_size"], CONFIG["output_size"])
    if framework == "jax":
        import jax
        import jax.numpy as jnp
        import optax

        import tbptt_jax

        if device == "cpu":
            jax.config.update("jax_default_device", jax.devices("cpu")[0])
        model = tbptt_jax.models.lstm(*sizes)
        optimizer = optax.adam(1e-3)
        state = {"params": model.init(jax.random.key(0))}
        state["opt_state"] = optimizer.init(state["params"])
        state["carry"] = model.initial_carry(CONFIG["batch"])

        def train(xs: Any, ys: Any) -> float:
            state["params"], state["opt_state"], state["carry"], metrics = \
                tbptt_jax.tbptt_train_step(
                    state["params"], state["opt_state"], state["carry"], jnp.asarray(xs),
                    jnp.asarray(ys), apply_fn=model.apply, loss_fn=tbptt_jax.losses.mse,
                    optimizer=optimizer, k1=CONFIG["k1"])
            return float(metrics["loss"][-1])

        def device_peak() -> Any:
            stats = jax.devices()[0].memory_stats()
            return None if not stats else stats.get("peak_bytes_in_use")

        return train, device_peak

    import torch

    import tbptt_torch

    torch.manual_seed(0)
    model = tbptt_torch.models.LSTMModel(*sizes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"carry": None}

    def train(xs: Any, ys: Any) -> float:
        state["carry"], losses = tbptt_torch.tbptt_train_step(
            model, optimizer, state["carry"], torch.from_numpy(xs).to(device),
            torch.from_numpy(ys).to(device), loss_fn=tbptt_torch.losses.mse, k1=CONFIG["k1"])
        return float(losses[-1])

    def device_peak() -> Any:
        return torch.cuda.max_memory_allocated() if device == "cuda" else None

    return train, device_peak


def stream(framework: str, steps: int, *, device: str = "cpu") -> dict[str, Any]:
    """Trains one framework on a `steps`-step stream in this process; its memory figures."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    if steps < 1 or steps % CONFIG["k1"]:
        raise ValueError(f"steps must be a positive multiple of k1 = {CONFIG['k1']}, got {steps}")
    train, device_peak = _trainer(framework, device)
    segments = [(start, min(SEGMENT, steps - start)) for start in range(0, steps, SEGMENT)]
    every = max(1, len(segments) // SAMPLES)
    samples, loss = [], float("nan")
    started = time.perf_counter()
    for index, (start, length) in enumerate(segments):
        loss = train(*_segment(index, length))
        if index % every == 0 or index == len(segments) - 1:
            samples.append((start + length, _status_bytes("VmRSS")))
    return {
        "framework": framework, "steps": steps, "segment": SEGMENT, "device": device,
        "seconds": time.perf_counter() - started,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent process
        # across fork and exec, so a child's would never be below its parent's.
        "peak_rss_bytes": _status_bytes("VmHWM"),
        "rss_samples": samples, "device_peak_bytes": device_peak(), "last_loss": loss,
    }


def measure(framework: str, steps: int, *, device: str = "cpu",
            torch_threads: int | None = None) -> dict[str, Any]:
    """`stream` in a fresh Python process, so its peak RSS is this stream's alone."""
    command = [sys.executable, "-m", "benchmarks.memory", "--framework", framework,
               "--steps", str(steps), "--device", device]
    if torch_threads is not None:
        command += ["--torch-threads", str(torch_threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"framework": framework, "steps": steps, "status": "failed",
                "error": done.stderr[-2000:]}
    return {"status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def run(steps: Sequence[int] = (10_000, 1_000_000), *, frameworks: Sequence[str] = FRAMEWORKS,
        device: str = "cpu", torch_threads: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every framework at every length, each in its own process; the peak ratio of the
    longest stream to the shortest per framework (`ratio`, the target is <= 1.1)."""
    runs: dict[str, dict[str, Any]] = {}
    ratio: dict[str, float | None] = {}
    for framework in frameworks:
        runs[framework] = {}
        for length in steps:
            log(f"memory: {framework} streamed over {length} steps")
            result = measure(framework, length, device=device, torch_threads=torch_threads)
            runs[framework][str(length)] = result
            if result["status"] == "ok":
                log(f"    peak RSS {result['peak_rss_bytes'] / 2**20:.1f} MiB "
                    f"in {result['seconds']:.1f} s")
        short, long = runs[framework][str(min(steps))], runs[framework][str(max(steps))]
        ratio[framework] = (long["peak_rss_bytes"] / short["peak_rss_bytes"]
                            if short["status"] == long["status"] == "ok" else None)
    return {"config": {**CONFIG, "k2": CONFIG["k1"], "segment": SEGMENT},
            "steps": sorted(steps), "runs": runs, "ratio": ratio}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=FRAMEWORKS, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_threads is not None and args.framework == "torch":
        import torch

        torch.set_num_threads(args.torch_threads)
    print(json.dumps(stream(args.framework, args.steps, device=args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
