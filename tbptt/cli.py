"""The `tbptt` command: one subcommand per module of `tbptt.commands`.

Each module of `tbptt.commands` is a subcommand named after it (`train`, `bench`, `parity`,
`audit`, ...). A module gives its one-line summary as the first line of its docstring, its
full help as the docstring, and two functions: `add_arguments(parser)` to declare its
options and `run(args) -> int` to do the work and return the exit status. Modules import
JAX or PyTorch inside `run`, never at the top, so `tbptt --help` is instant and a
subcommand that needs one framework works where only that one is installed.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import tbptt.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbptt",
        description="Truncated backpropagation through time, TBPTT(k1, k2), in JAX and "
        "PyTorch with proven parity.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(tbptt.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tbptt.commands.{info.name}")
        doc = (module.__doc__ or "").strip()
        subparser = subparsers.add_parser(
            info.name.replace("_", "-"),
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
