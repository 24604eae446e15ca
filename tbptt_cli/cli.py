"""The `tbptt` command: one subcommand per module of `tbptt_cli.commands`.

Each module of `tbptt_cli.commands` is a subcommand named after it (`train`, `bench`,
`parity`, `audit`, ...). A module gives its one-line summary as the first line of its
docstring, its full help as the docstring, and two functions: `add_arguments(parser)` to
declare its options and `run(args) -> int` to do the work and return the exit status. A
module with `PASS_THROUGH = True` gets its arguments unparsed, as `args.arguments` (its
`--help` too), for a command that owns its parser elsewhere. Modules import JAX or PyTorch
inside `run`, never at the top, so `tbptt --help` is instant and a subcommand that needs
one framework works where only that one is installed.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import tbptt_cli.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbptt",
        description="Truncated backpropagation through time, TBPTT(k1, k2), in JAX and "
        "PyTorch with proven parity.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(tbptt_cli.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tbptt_cli.commands.{info.name}")
        doc = (module.__doc__ or "").strip()
        subparser = subparsers.add_parser(
            info.name.replace("_", "-"),
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=not getattr(module, "PASS_THROUGH", False),
        )
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run,
                               pass_through=getattr(module, "PASS_THROUGH", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.pass_through:
        args.arguments = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
