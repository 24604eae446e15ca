"""The L target's denominator, probed beside the L calls: how fast this machine multiplies
matrices while the LSTM trains, and how that moves.

The suite (`suite.matmul_rate`) measures the float32 matrix-product rate once, before the
benchmarks, as the best of 5 products per library; the L target compares JAX's median L
call against it. On a machine whose speed moves from second to second, that pits a best
case against a median. This script measures both sides in the same rounds: each round
times one `size`^3 product in numpy, JAX and torch, then one call of the L configuration's
`jax` and `torch-fused` implementations (from the same weights and data, as in the suite).
It writes `<out>/<name>.json` (every round) and `<out>/<name>.md`: each rate's median and
range, and JAX's median L rate against the best probe median and the best single product.

    .venv/bin/python -m benchmarks.probe                  # 20 rounds of L (T=500), ~1 min
    .venv/bin/python -m benchmarks.probe --rounds 40 --cell gru
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import suite

LIBRARIES = ("numpy", "jax", "torch")


def probe(config: suite.Config, cell: str, *, rounds: int, size: int) -> dict[str, Any]:
    """Every round's product rates and L-call rates (GFLOP/s), and their summary."""
    problem = suite.make_problem(config, cell)
    calls = {name: suite.IMPLEMENTATION_CLASSES[name](problem) for name in ("jax", "torch-fused")}
    products = suite.matrix_products(size)
    for fn in (*products.values(), *(implementation.call for implementation in calls.values())):
        fn()  # compile, warm up
    product_flops, call_flops = 2 * size ** 3, suite.flops_per_call(config, cell)
    per_round = []
    for _ in range(rounds):
        entry = {f"product {name}": product_flops / suite.timed(fn) / 1e9
                 for name, fn in products.items()}
        entry.update({f"call {name}": call_flops / suite.timed(implementation.call) / 1e9
                      for name, implementation in calls.items()})
        per_round.append(entry)
    medians = {key: statistics.median(entry[key] for entry in per_round) for key in per_round[0]}
    best_median = max(medians[f"product {name}"] for name in LIBRARIES)
    best_product = max(entry[f"product {name}"] for entry in per_round for name in LIBRARIES)
    return {
        "config": config.name, "cell": cell, "spec": asdict(config), "size": size,
        "rounds": per_round, "medians": medians,
        "ranges": {key: [min(e[key] for e in per_round), max(e[key] for e in per_round)]
                   for key in per_round[0]},
        "jax_over_best_product_median": medians["call jax"] / best_median,
        "jax_over_best_single_product": medians["call jax"] / best_product,
    }


def render_markdown(results: dict[str, Any]) -> str:
    spec = results["spec"]
    lines = [
        "# The matrix-product rate beside the L calls",
        "",
        f"Written by `benchmarks/probe.py` ({results['written']}); command "
        f"`{' '.join(results['command'])}`.",
        "",
        f"- machine: {results['environment']['machine']['cpu']}, "
        f"{results['environment']['machine']['physical_cores']} physical cores; "
        f"tbptt {results['environment']['versions']['tbptt']}",
        f"- {len(results['rounds'])} rounds, each: one {results['size']}^3 float32 product in "
        f"numpy, JAX and torch, then one call of {results['config']} {results['cell']} "
        f"(I={spec['input_size']} H={spec['hidden_size']} B={spec['batch']} T={spec['steps']} "
        f"k1={spec['k1']}) through `jax` and `torch-fused`; rates in GFLOP/s",
        "",
        "| rate | median | lowest | highest |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, median in results["medians"].items():
        low, high = results["ranges"][key]
        lines.append(f"| {key} | {median:.0f} | {low:.0f} | {high:.0f} |")
    lines += [
        "",
        f"JAX's median {results['config']} {results['cell']} rate over the best library's "
        f"median product rate: **{results['jax_over_best_product_median']:.2f}**; over the "
        f"best single product of the run: {results['jax_over_best_single_product']:.2f}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="L", choices=sorted(suite.CONFIGS))
    parser.add_argument("--cell", default="lstm", choices=sorted(suite.TORCH_MODELS))
    parser.add_argument("--steps", type=int, help="T (default: the suite's CPU default)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048, help="n of the n^3 product")
    parser.add_argument("--out", type=Path, default=suite.RESULTS_DIR)
    parser.add_argument("--name", default="probe-cpu")
    args = parser.parse_args(argv)
    suite.prepare_process("cpu", suite.physical_cores())
    results = probe(suite.default_config(args.config, args.steps), args.cell,
                    rounds=args.rounds, size=args.size)
    command = [".venv/bin/python -m benchmarks.probe", *(sys.argv[1:] if argv is None else argv)]
    results.update(environment=suite.environment("cpu"), command=command,
                   written=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    suite.write_results(results, args.out, args.name)
    (args.out / f"{args.name}.md").write_text(render_markdown(results))
    print(render_markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
