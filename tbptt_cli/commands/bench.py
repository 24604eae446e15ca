"""Benchmark the JAX and PyTorch TBPTT trainers against each other (needs a source checkout).

`tbptt bench [OPTIONS]` is `python -m benchmarks.suite [OPTIONS]`: the suite lives in the
checkout's `benchmarks/` folder, which is not installed with the package, and owns its
options (`tbptt bench --help` lists them). It needs both JAX and PyTorch; without either, or
from an installed package without the checkout, the command says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

from tbptt_cli import frameworks

# The suite parses its own options: the `tbptt` command hands them over unparsed.
PASS_THROUGH = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """None of its own: every option belongs to the suite."""


def _suite() -> ModuleType:
    """benchmarks.suite, importable as it is or from the checkout this package lives in."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "benchmarks" / "suite.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    return importlib.import_module("benchmarks.suite")


def run(args: argparse.Namespace) -> int:
    problem = frameworks.missing(("jax", "torch"))
    if problem is not None:
        print(f"tbptt bench: error: {problem}", file=sys.stderr)
        return 2
    try:
        suite = _suite()
    except ModuleNotFoundError as error:
        print(f"tbptt bench: needs the source checkout (benchmarks/ beside the packages) "
              f"({error}); run it from a checkout, where `python -m benchmarks.suite` is the "
              f"same command", file=sys.stderr)
        return 2
    return suite.main(args.arguments, prog="tbptt bench")
