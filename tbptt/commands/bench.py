"""Benchmark the JAX and PyTorch TBPTT trainers against each other (benchmarks/suite.py).

Runs every chosen configuration (S, M, M-k2, L, char-rnn, word-LM) for every chosen cell
(Elman, GRU, LSTM) through every chosen implementation (jax, jax-dp: the batch split over
the cores as XLA CPU devices, torch-hand, torch-fused, torch-ignite, torch-compile;
torch-cudnn on CUDA), all from the same initial weights and data, interleaved, with
warm-up and repeats; then the streamed-memory check (T = 1e4 vs 1e6 steps; 1e5 on a CPU
by default, see --memory-steps). Writes <out>/<name>.json (versions, machine, thread
counts, settings, every repeat), and from it <out>/<name>.md (the table, ratios and
targets) and PNG plots.

Needs a source checkout (the `benchmarks/` folder beside the packages), JAX and PyTorch;
Ignite is optional (its implementation is reported as skipped without it).

Examples:
  tbptt bench                                   # the full matrix, 5-20 min on 2 idle cores
  tbptt bench --quick                           # a reduced matrix, a couple of minutes
  tbptt bench --configs S M --cells lstm --implementations jax torch-fused --repeats 5
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

CONFIG_NAMES = ("S", "M", "M-k2", "L", "char-rnn", "word-LM")
CELL_NAMES = ("elman", "gru", "lstm")
IMPLEMENTATION_NAMES = ("jax", "jax-dp", "torch-hand", "torch-fused", "torch-ignite",
                        "torch-compile", "torch-cudnn")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="*", choices=CONFIG_NAMES, default=None,
                        metavar="CONFIG", help=f"configurations to run, of {CONFIG_NAMES} "
                        "(default: all; none, to run only the memory check)")
    parser.add_argument("--cells", nargs="+", choices=CELL_NAMES, default=list(CELL_NAMES),
                        metavar="CELL", help="recurrent cells (default: all three)")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATION_NAMES,
                        default=None, metavar="IMPL",
                        help=f"implementations, of {IMPLEMENTATION_NAMES} (default: all that "
                        "apply to the device; torch-cudnn only on CUDA)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per implementation, medians reported (default 5; "
                        "3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls after the first (compiling) call (default 1)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiply every configuration's sequence length T by this "
                        "(rounded to a multiple of k1, at least 2*k1); the steps run are "
                        "recorded (default 1; 0.1 with --quick)")
    parser.add_argument("--steps", nargs="+", default=[], metavar="CONFIG=T",
                        help="set one configuration's sequence length, e.g. L=500 (overrides "
                        "--scale for it)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both frameworks run (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameters and data type (default float32; TF32 is always off)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: the number of physical cores)")
    parser.add_argument("--memory-steps", nargs=2, type=int, default=None,
                        metavar=("SHORT", "LONG"),
                        help="streamed lengths of the memory check (default 10000 1000000 on "
                        "CUDA, 10000 100000 on a CPU, 1000 10000 with --quick)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the streamed-memory check")
    parser.add_argument("--compile-allow-rnn", action="store_true",
                        help="torch-compile with dynamo's experimental allow_rnn=True (by "
                        "default dynamo skips the models' forward: nn.RNN/GRU/LSTM unsupported)")
    parser.add_argument("--scaling", action="store_true",
                        help="also run benchmarks/scaling.py (throughput vs devices)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced matrix: T scaled by 0.1, 3 repeats, a short memory "
                        "check, a smaller matrix-product probe")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results of the checkout)")
    parser.add_argument("--name", default=None,
                        help="results file stem (default: cpu, cpu-quick, cuda-float32, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")


def _suite():
    """benchmarks.suite, from the checkout this package lives in when not importable."""
    try:
        return importlib.import_module("benchmarks.suite")
    except ModuleNotFoundError as error:
        root = Path(__file__).resolve().parents[2]
        if error.name not in ("benchmarks", "benchmarks.suite") or \
                not (root / "benchmarks" / "suite.py").is_file():
            raise
        sys.path.insert(0, str(root))
        return importlib.import_module("benchmarks.suite")


def run(args: argparse.Namespace) -> int:
    try:
        suite = _suite()
    except ModuleNotFoundError as error:
        print(f"tbptt bench needs a source checkout with benchmarks/ and both frameworks: "
              f"{error}", file=sys.stderr)
        return 2
    return suite.run(args)
