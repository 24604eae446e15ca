"""Audit a hand-written PyTorch TBPTT loop: is it the TBPTT(k1, k2) you meant?

FILE:FUNCTION names a function `loop(model, optimizer, xs, ys, k)` (with a `k2` parameter
too for a loop whose windows overlap). The audit runs it once on an instrumented model,
plain SGD and float64 data, runs tbptt_torch.tbptt_train_step from the same weights, and
prints the verdict: CORRECT (the same updates after the same steps, the same gradients to
1e-10, and the reduction and tail policy the loop implements) or WRONG, with each mistake
in plain words and the update and time step where it first shows. It judges behaviour,
never the loop's source. Exit status: 0 correct, 1 wrong, 2 the loop could not be audited.

Example:
  tbptt audit examples/audit_loops.py:per_step_loop --k1 4 --reduction sum --tail drop
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="FILE:FUNCTION",
                        help="a Python file and the loop function in it")
    intent = parser.add_argument_group("the TBPTT the loop is meant to implement")
    intent.add_argument("--k1", type=int, default=4,
                        help="steps between updates, passed to the loop as k (default 4)")
    intent.add_argument("--k2", type=int, default=None,
                        help="steps each update backpropagates through (default k1)")
    intent.add_argument("--reduction", choices=("mean", "sum"), default=None,
                        help="the loss over an update's steps (default: report the loop's)")
    intent.add_argument("--tail", choices=("partial", "drop"), default=None,
                        help="train a last shorter chunk or not (default: report the loop's)")
    setup = parser.add_argument_group("the model and data the loop runs on")
    setup.add_argument("--cell", choices=("elman", "gru", "lstm"), default="lstm")
    setup.add_argument("--input-size", type=int, default=2)
    setup.add_argument("--hidden-size", type=int, default=4)
    setup.add_argument("--num-layers", type=int, default=1)
    setup.add_argument("--length", "-T", type=int, default=None,
                       help="sequence length T (default: 5 updates or more, T %% k1 != 0)")
    setup.add_argument("--batch-size", type=int, default=None, help="B (default k2 + 1)")
    setup.add_argument("--seed", type=int, default=0)
    setup.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")


def load_loop(target: str):
    """The function FUNCTION of the Python file FILE, for FILE:FUNCTION."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise ValueError(f"FILE:FUNCTION expected, e.g. examples/audit_loops.py:per_step_loop, "
                         f"got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise ValueError(f"FILE must be an existing Python file, got {path_text!r}")
    spec = importlib.util.spec_from_file_location(f"_tbptt_audit_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path_text!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # the file's own imports, as python FILE
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    loop = getattr(module, name, None)
    if not callable(loop):
        raise ValueError(f"{path_text} has no function {name!r}")
    return loop


def run(args: argparse.Namespace) -> int:
    from tbptt_torch.audit import AuditError, audit

    try:
        loop = load_loop(args.target)
        verdict = audit(loop, k1=args.k1, k2=args.k2, reduction=args.reduction, tail=args.tail,
                        cell=args.cell, input_size=args.input_size,
                        hidden_size=args.hidden_size, num_layers=args.num_layers,
                        length=args.length, batch_size=args.batch_size, seed=args.seed,
                        lr=args.lr)
    except (AuditError, ValueError) as exc:
        print(f"tbptt audit: {exc}", file=sys.stderr)
        return 2
    print(f"audit of {args.target}")
    print(verdict)
    return 0 if verdict.correct else 1
