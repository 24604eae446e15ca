"""Where the JAX trainer's time goes: one suite configuration's `jax` call under
`jax.profiler`, its XLA operations summed by name, per update, largest first.

The trace's events are read back from the `*.trace.json.gz` the profiler writes; each
event is one run of one operation (a fusion, a matrix product, a custom call) on one of
XLA's threads, so the per-thread sums show how busy each thread was as well.

    .venv/bin/python -m benchmarks.profile_ops word-LM lstm
    .venv/bin/python -m benchmarks.profile_ops L lstm --steps 1000 --top 15

It runs the configuration as the suite does (`suite.prepare_process`: torch's threads, one
XLA CPU device per core with JAX on the first).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
from pathlib import Path

import jax

from benchmarks import suite


def op_times(trace_dir: Path) -> tuple[dict[str, float], dict[int, float]]:
    """Microseconds per operation name and per thread id, over the trace's XLA events."""
    (trace_file,) = trace_dir.rglob("*.trace.json.gz")
    events = json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]
    by_name: dict[str, float] = collections.defaultdict(float)
    by_thread: dict[int, float] = collections.defaultdict(float)
    for event in events:
        if event.get("ph") != "X" or "hlo_op" not in event.get("args", {}):
            continue
        by_name[event["name"]] += event["dur"]
        by_thread[event["tid"]] += event["dur"]
    return by_name, by_thread


def report(config: suite.Config, cell: str, *, calls: int, top: int) -> list[str]:
    """The `top` operations of `calls` profiled calls (after a warm one), ms per update,
    and each thread's total."""
    implementation = suite.JaxImplementation(suite.make_problem(config, cell))
    implementation.call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                implementation.call()
        by_name, by_thread = op_times(Path(trace_dir))
    per_update = 1e3 * calls * suite.updates_of(config)  # microseconds -> ms, per update
    lines = [f"{config.name} {cell} T={config.steps}: XLA operations, ms per update "
             f"(summed over threads: {sum(by_name.values()) / per_update:.1f})"]
    lines += [f"  {total / per_update:8.2f}  {name}"
              for name, total in sorted(by_name.items(), key=lambda item: -item[1])[:top]]
    lines.append("per thread: " + ", ".join(f"{total / per_update:.1f}" for total in
                                            sorted(by_thread.values(), reverse=True)))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=sorted(suite.CONFIGS))
    parser.add_argument("cell", choices=sorted(suite.TORCH_MODELS))
    parser.add_argument("--steps", type=int, help="T (default: the suite's CPU default)")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls, after a warm one")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    suite.prepare_process("cpu", suite.physical_cores())
    config = suite.default_config(args.config, args.steps)
    print("\n".join(report(config, args.cell, calls=args.calls, top=args.top)))


if __name__ == "__main__":
    main()
