"""Audit a hand-written PyTorch TBPTT loop: is it the TBPTT(k1, k2) you meant?

FILE:FUNCTION names a function `loop(model, optimizer, xs, ys, k)` (with a `k2` parameter
too for a loop whose windows overlap). The audit runs it once on an instrumented model
(its own small LSTM, or yours with --model), float64 data (random, shaped for the model, or
yours with --data) and plain SGD, runs tbptt_torch.tbptt_train_step from the same weights,
and prints the verdict: CORRECT (the same updates after the same steps, the same gradients
to 1e-10, and the reduction, tail policy and clipping the loop implements) or WRONG, with
each mistake in plain words and the update and time step where it first shows. The loop may
update the weights itself (p.data.add_(p.grad, alpha=-lr)) instead of calling
optimizer.step(), compute any mean or sum of per-step losses, and clip the gradient. It
judges behaviour, never the loop's source. Files are run as `python FILE` runs them, their
own folder first on the import path. Needs PyTorch (not JAX). Exit status: 0 correct, 1
wrong, 2 the loop could not be audited, an argument is wrong or PyTorch is not installed.

Examples:
  tbptt audit examples/audit_loops.py:per_step_loop --k1 4 --reduction sum --tail drop
  tbptt audit tests/fixtures/word_language_model.py:loop \\
      --model tests/fixtures/word_language_model.py:make_model --k1 5 \\
      --reduction mean --tail partial --clip-grad-norm 0.25
"""

from __future__ import annotations

import argparse
import sys

from tbptt_cli import frameworks

LOSSES = ("mse", "l1", "cross_entropy", "nll")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="FILE:FUNCTION",
                        help="a Python file (or MODULE) and the loop function in it")
    intent = parser.add_argument_group("the TBPTT the loop is meant to implement")
    intent.add_argument("--k1", type=int, default=4,
                        help="steps between updates, passed to the loop as k (default 4)")
    intent.add_argument("--k2", type=int, default=None,
                        help="steps each update backpropagates through (default k1)")
    intent.add_argument("--reduction", choices=("mean", "sum"), default=None,
                        help="the loss over an update's steps (default: report the loop's)")
    intent.add_argument("--tail", choices=("partial", "drop"), default=None,
                        help="train a last shorter chunk or not (default: report the loop's)")
    intent.add_argument("--clip-grad-norm", type=float, default=None, metavar="MAX_NORM",
                        help="the max norm each update's gradient is clipped to, as "
                             "tbptt_train_step(..., clip_grad_norm=) (default: report the "
                             "loop's clipping)")
    setup = parser.add_argument_group("the model and data the loop runs on")
    setup.add_argument("--model", metavar="FILE:NAME", default=None,
                       help="a callable of no arguments returning your nn.Module, with "
                            "forward(x, carry) -> (preds, carry) (default: the audit's own "
                            "model, from the options below)")
    setup.add_argument("--data", metavar="FILE:NAME|FILE.npz", default=None,
                       help="your data: a callable of no arguments returning (xs, ys), or an "
                            ".npz file holding the arrays xs and ys, [T, B, ...], floats or "
                            "integer ids (default: random data shaped for the model)")
    setup.add_argument("--vocab-size", type=int, default=None,
                       help="random data of token ids [T, B] below this, each target the "
                            "next token (default: the size of the model's first "
                            "nn.Embedding, if it has one)")
    setup.add_argument("--loss", metavar="NAME|FILE:NAME", default=None,
                       help=f"the per-term loss the loop computes, one of {', '.join(LOSSES)} "
                            f"or loss_fn(preds, targets) -> losses[t, b] (default: found from "
                            f"the gradients)")
    setup.add_argument("--cell", choices=("elman", "gru", "lstm"), default="lstm",
                       help="the audit's own model: its recurrent cell (default lstm)")
    setup.add_argument("--input-size", type=int, default=2,
                       help="the audit's own model: input features (default 2)")
    setup.add_argument("--hidden-size", type=int, default=4,
                       help="the audit's own model: hidden units (default 4)")
    setup.add_argument("--num-layers", type=int, default=1,
                       help="the audit's own model: layers (default 1)")
    setup.add_argument("--length", "-T", type=int, default=None,
                       help="T of the random data (default: 5 updates or more, T %% k1 != 0)")
    setup.add_argument("--batch-size", type=int, default=None,
                       help="B of the random data (default k2 + 1)")
    setup.add_argument("--seed", type=int, default=0,
                       help="seeds the weights and the random data (default 0)")
    setup.add_argument("--lr", type=float, default=0.05,
                       help="learning rate of the SGD optimizer handed to the loop (default "
                            "0.05)")


def run(args: argparse.Namespace) -> int:
    problem = frameworks.missing(("torch",))
    if problem is not None:
        print(f"tbptt audit: {problem}", file=sys.stderr)
        return 2
    from tbptt.loading import load_data, load_object
    from tbptt_torch.audit import AuditError, audit

    try:
        loop = load_object(args.target, what="FUNCTION")
        if not callable(loop):
            raise ValueError(f"{args.target!r} must name the loop function, got "
                             f"{type(loop).__name__}")
        model_factory = None if args.model is None else load_object(args.model)
        loss = args.loss
        if loss is not None and loss not in LOSSES:
            loss = load_object(loss)
        xs = ys = None
        if args.data is not None:
            xs, ys = load_data(args.data, option="--data")
        verdict = audit(loop, k1=args.k1, k2=args.k2, reduction=args.reduction, tail=args.tail,
                        clip_grad_norm=args.clip_grad_norm, cell=args.cell,
                        input_size=args.input_size, hidden_size=args.hidden_size,
                        num_layers=args.num_layers, length=args.length,
                        batch_size=args.batch_size, seed=args.seed, lr=args.lr,
                        model_factory=model_factory, xs=xs, ys=ys, vocab_size=args.vocab_size,
                        loss_fn=loss)
    except (AuditError, ValueError) as exc:
        print(f"tbptt audit: {exc}", file=sys.stderr)
        return 2
    print(f"audit of {args.target}")
    print(verdict)
    return 0 if verdict.correct else 1
