"""Check a JAX port of a torch model: train both from the same weights, compare every update.

    tbptt parity FILE.py:TORCH_FACTORY FILE.py:JAX_APPLY [options]

TORCH_FACTORY names a callable of no arguments that returns your torch module (the class
itself, if its arguments have defaults); the module runs `forward(xs, carry) -> (preds,
carry)` over time-major `xs[T, B, ...]` and has `initial_carry(batch_size)`. JAX_APPLY
names your port, `apply(params, carry, xs) -> (carry, preds)`, which reads `params` by the
module's `state_dict()` names (`params["gru.weight_hh_l0"]`, ...) and takes the carry in
torch's layout. Either may be `package.module:NAME` instead of a file; a file is run as
`python FILE` runs it, its own folder first on the import path.

The module is built with torch seeded by --seed, its weights are copied to JAX, and both
are trained with TBPTT(k1, k2) on the same data (random data shaped for the module: token
ids for a module with an nn.Embedding or with --vocab-size, float features otherwise; or
your own, from --data) for --updates updates, with the same loss and optimizer. The report
shows, per update, both losses, the relative gap of the losses and the largest gradient
and parameter gaps; it stops at the first update where a gap exceeds the tolerance and
names the parameter whose gradient is furthest apart there, with every parameter's gaps.

Needs both JAX and PyTorch installed. Exit status: 0 if the port agrees at every update, 1
if it diverges, 2 on bad arguments or a framework that is not installed.

Example (examples/port_check.py holds a GRU forecaster, its port, and a wrong port):

    tbptt parity examples/port_check.py:Forecaster examples/port_check.py:forecaster_apply
"""

from __future__ import annotations

import argparse
import sys

from tbptt_cli import frameworks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("torch_factory", metavar="TORCH_FACTORY",
                        help="FILE.py:NAME or MODULE:NAME of a callable of no arguments that "
                             "returns the torch module")
    parser.add_argument("jax_apply", metavar="JAX_APPLY",
                        help="FILE.py:NAME or MODULE:NAME of the JAX apply function "
                             "(params, carry, xs) -> (carry, preds)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="FILE.py:NAME|FILE.npz", default=None,
                      help="a callable of no arguments returning (xs[T, B, ...], ys) as "
                           "numpy arrays, or an .npz file holding the arrays xs and ys (xs "
                           "floats, or integer token ids [T, B]); default: random data "
                           "shaped for the module (xs ~ N(0, 1), or token ids; ys ~ N(0, 1) "
                           "of the module's output shape for mse, class labels for "
                           "cross_entropy)")
    data.add_argument("--steps", type=int, default=20,
                      help="time steps T of the random data (default: %(default)s)")
    data.add_argument("--batch", type=int, default=4,
                      help="sequences B of the random data (default: %(default)s)")
    data.add_argument("--input-size", type=int, default=None,
                      help="features of each input step of the random data (default: the "
                           "input size of the module's first nn.RNN/GRU/LSTM or nn.Linear)")
    data.add_argument("--vocab-size", type=int, default=None,
                      help="random data of integer token ids [T, B] below this, for a "
                           "module that embeds tokens (default: the size of the module's "
                           "first nn.Embedding, if it has one)")
    training = parser.add_argument_group("training")
    training.add_argument("--k1", type=int, default=5,
                          help="steps between updates (default: %(default)s)")
    training.add_argument("--k2", type=int, default=None,
                          help="steps each update backpropagates through, >= k1 "
                               "(default: k1)")
    training.add_argument("--updates", type=int, default=None,
                          help="updates to train and compare (default: all the data gives)")
    training.add_argument("--loss", choices=("mse", "cross_entropy"), default="mse",
                          help="per-step loss; cross_entropy takes the module's outputs as "
                               "logits (default: %(default)s)")
    training.add_argument("--optimizer", choices=("sgd", "nesterov", "adam"), default="sgd",
                          help="optimizer, the same in optax and torch (nesterov: SGD with "
                               "momentum 0.9 and Nesterov's correction) (default: %(default)s)")
    training.add_argument("--lr", type=float, default=0.05,
                          help="learning rate (default: %(default)s)")
    training.add_argument("--reduction", choices=("mean", "sum"), default="mean",
                          help="how an update's per-step losses combine (default: "
                               "%(default)s)")
    training.add_argument("--tail", choices=("partial", "drop"), default="partial",
                          help="train a last chunk shorter than k1, or drop it (default: "
                               "%(default)s)")
    training.add_argument("--seed", type=int, default=0,
                          help="seed of the module's initial weights and of the random data "
                               "(default: %(default)s)")
    check = parser.add_argument_group("comparison")
    check.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                       help="precision of both runs; float64 shows a port's mistakes "
                            "clear of rounding (default: %(default)s)")
    check.add_argument("--rtol", type=float, default=None,
                       help="largest relative gap allowed for the loss, every gradient and "
                            "every parameter (default: 1e-10 in float64, 1e-5 in float32)")
    check.add_argument("--scale", choices=("update", "trajectory"), default=None,
                       help="measure each tensor against its size at that update, or "
                            "against the largest size it reaches over the run (default: "
                            "update in float64, trajectory in float32)")
    check.add_argument("-v", "--verbose", action="store_true",
                       help="list every parameter's gradient and parameter gaps at every "
                            "update, not only at the divergent one")


def run(args: argparse.Namespace) -> int:
    problem = frameworks.missing(("jax", "torch"))
    if problem is not None:
        print(f"tbptt parity: error: {problem}", file=sys.stderr)
        return 2
    import numpy as np

    import tbptt_parity
    from tbptt.loading import load_data

    try:
        model, apply_fn = tbptt_parity.load_port(args.torch_factory, args.jax_apply,
                                                 seed=args.seed)
        if args.data is None:
            xs, ys = tbptt_parity.random_data(model, steps=args.steps, batch_size=args.batch,
                                              loss_fn=args.loss, input_size=args.input_size,
                                              vocab_size=args.vocab_size, seed=args.seed)
        else:
            xs, ys = load_data(args.data, option="--data")
        report = tbptt_parity.compare(
            model, apply_fn, xs=xs, ys=ys, k1=args.k1, k2=args.k2, loss_fn=args.loss,
            optimizer=args.optimizer, lr=args.lr, updates=args.updates, dtype=args.dtype,
            rtol=args.rtol, scale=args.scale, reduction=args.reduction, tail=args.tail)
    except ValueError as error:
        print(f"tbptt parity: error: {error}", file=sys.stderr)
        return 2
    print(f"torch   {args.torch_factory} ({type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"jax     {args.jax_apply}")
    tokens = " token ids" if np.issubdtype(np.asarray(xs).dtype, np.integer) else ""
    print(f"data    xs {list(np.shape(xs))}{tokens}, ys {list(np.shape(ys))}"
          + (f" from {args.data}" if args.data else f", random (seed {args.seed})"))
    print(report.format(verbose=args.verbose))
    return 0 if report.ok else 1

