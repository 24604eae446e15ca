"""Compile time of the JAX trainer for the TBPTT(k1, k2) recipe, against TBPTT(k2, k2).

The forum's recipe updates often and backpropagates far (k1 of 1-5 steps, k2 of 35-100).
For each (k1, k2) this times, in one process, JAX's first call of `tbptt_train_step` on a
fresh sequence (compile and run), its second call with the same shapes (run only), the
median of seven more (the steady state), and one call of the torch trainer on the same
model and data; then a stream fed in three segments (its calls' times show whether a later
call compiles again). One configuration: an LSTM, I=4, H=64, B=8, T=400, float32, Adam,
torch on one thread.

Writes `<out>/<name>.json` (versions, machine, every time) and `<out>/<name>.md` (the
table). Run from the checkout:

    .venv/bin/python -m benchmarks.compile_time
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import torch

import tbptt_jax
import tbptt_torch
from benchmarks import suite

RESULTS_DIR = Path(__file__).resolve().parent / "results"
INPUT, HIDDEN, BATCH, STEPS = 4, 64, 8, 400
RECIPES = ((50, 50), (5, 50), (1, 35), (35, 35), (2, 100), (100, 100))
STREAM = (5, 50, (100, 100, 100))  # k1, k2, segment lengths
STEADY_CALLS = 7  # after the second call; their median is the steady-state time


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def _problem(seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray, tbptt_torch.models.LSTMModel]:
    torch.manual_seed(seed)
    torch_model = tbptt_torch.models.LSTMModel(INPUT, HIDDEN, INPUT)
    rng = np.random.default_rng(seed)
    xs = rng.standard_normal((STEPS, BATCH, INPUT), dtype=np.float32)
    return tbptt_torch.to_jax(torch_model), xs, np.roll(xs, 3, axis=0), torch_model


def measure_recipe(k1: int, k2: int) -> dict[str, float]:
    """JAX's first and second call, the median of its next STEADY_CALLS, and the torch
    trainer's call, for one (k1, k2)."""
    weights, xs, ys, torch_model = _problem()
    model = tbptt_jax.models.lstm(INPUT, HIDDEN, INPUT)
    optimizer = optax.adam(1e-3)  # one object for both calls: the same program
    params = jax.tree.map(jax.numpy.asarray, weights)

    def jax_call():
        return tbptt_jax.tbptt_train_step(
            params, optimizer.init(params), None, xs, ys, apply_fn=model.apply,
            loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=k1, k2=k2)

    first, second = _timed(jax_call), _timed(jax_call)
    steady = float(np.median([_timed(jax_call) for _ in range(STEADY_CALLS)]))
    torch_optimizer = torch.optim.Adam(torch_model.parameters(), lr=1e-3)
    torch_seconds = _timed(lambda: tbptt_torch.tbptt_train_step(
        torch_model, torch_optimizer, None, torch.from_numpy(xs), torch.from_numpy(ys),
        loss_fn=tbptt_torch.losses.mse, k1=k1, k2=k2)[1])
    return {"k1": k1, "k2": k2, "jax_first_s": first, "jax_second_s": second,
            "jax_steady_s": steady, "torch_s": torch_seconds}


def measure_stream(k1: int, k2: int, segments: Sequence[int]) -> dict[str, Any]:
    """Each call's time for one stream fed in segments (the first call compiles)."""
    weights, xs, ys, _ = _problem(seed=1)
    model = tbptt_jax.models.lstm(INPUT, HIDDEN, INPUT)
    optimizer = optax.adam(1e-3)
    params = jax.tree.map(jax.numpy.asarray, weights)
    state = [params, optimizer.init(params), None]
    seconds, start = [], 0
    for length in segments:
        def call(lo=start, hi=start + length):
            state[:] = tbptt_jax.tbptt_train_step(
                *state, xs[lo:hi], ys[lo:hi], apply_fn=model.apply,
                loss_fn=tbptt_jax.losses.mse, optimizer=optimizer, k1=k1, k2=k2)[:3]
            return state
        seconds.append(_timed(call))
        start += length
    return {"k1": k1, "k2": k2, "segments": list(segments), "call_s": seconds}


def render(results: dict[str, Any]) -> str:
    rows = {(r["k1"], r["k2"]): r for r in results["recipes"]}
    environment = results["environment"]
    versions = environment["versions"]
    lines = [f"# JAX compile time for the TBPTT(k1, k2) recipe ({environment['machine']['cpu']}, "
             f"{environment['machine']['logical_cores']} cores)", "",
             f"LSTM I={INPUT} H={HIDDEN} B={BATCH} T={STEPS}, float32, Adam; jax "
             f"{versions['jax']}, torch {versions['torch']} "
             f"({environment['threads']['torch_intra_op']} thread); revision "
             f"{versions['tbptt']}.", "",
             "| k1, k2 | JAX first call | JAX second call | JAX steady (median) | torch "
             "trainer | first call / TBPTT(k2, k2)'s |", "|---|---:|---:|---:|---:|---:|"]
    for (k1, k2), row in rows.items():
        same = rows.get((k2, k2))
        ratio = f"{row['jax_first_s'] / same['jax_first_s']:.2f}" if same else ""
        lines.append(f"| {k1}, {k2} | {row['jax_first_s']:.2f} s | {row['jax_second_s']:.3f} s "
                     f"| {row['jax_steady_s']:.3f} s | {row['torch_s']:.3f} s | {ratio} |")
    stream = results["stream"]
    lines += ["", f"A stream of TBPTT({stream['k1']}, {stream['k2']}) in segments of "
              f"{stream['segments']} steps, each call: "
              + ", ".join(f"{s:.3f} s" for s in stream["call_s"]), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    parser.add_argument("--name", default="compile-time", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {"environment": suite.environment("cpu"), "recipes": [], "stream": None}
    for k1, k2 in RECIPES:
        results["recipes"].append(measure_recipe(k1, k2))
        print(results["recipes"][-1], file=sys.stderr, flush=True)
    results["stream"] = measure_stream(*STREAM)
    suite.write_results(results, args.out, args.name)
    (args.out / f"{args.name}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
