"""Where the JAX trainer's time goes: one suite configuration's `jax` call under
`jax.profiler`, its XLA operations summed by name, per update, largest first.

The trace's events are read back from the `*.trace.json.gz` the profiler writes; each
event is one run of one operation (a fusion, a matrix product, a custom call) on one of
XLA's threads, so the per-thread sums show how busy each thread was as well.

    .venv/bin/python benchmarks/profile_ops.py word-LM lstm
    .venv/bin/python benchmarks/profile_ops.py L lstm --steps 500 --top 15
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", choices=sorted(suite.CONFIGS))
    parser.add_argument("cell", choices=sorted(suite.TORCH_MODELS))
    parser.add_argument("--steps", type=int, help="T (default: the suite's CPU default)")
    parser.add_argument("--calls", type=int, default=3, help="profiled calls, after a warm one")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    config = suite.CONFIGS[args.config]
    steps = args.steps or suite.CPU_STEPS.get(config.name, config.steps)
    config = suite.replace(config, steps=steps)
    implementation = suite.JaxImplementation(suite.make_problem(config, args.cell))
    implementation.call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.calls):
                implementation.call()
        by_name, by_thread = op_times(Path(trace_dir))
    per_update = 1e3 * args.calls * suite.updates_of(config)  # microseconds -> ms, per update
    print(f"{config.name} {args.cell} T={steps}: XLA operations, ms per update "
          f"(summed over threads: {sum(by_name.values()) / per_update:.1f})")
    for name, total in sorted(by_name.items(), key=lambda item: -item[1])[:args.top]:
        print(f"  {total / per_update:8.2f}  {name}")
    print("per thread: " + ", ".join(f"{total / per_update:.1f}"
                                     for total in sorted(by_thread.values(), reverse=True)))


if __name__ == "__main__":
    main()
