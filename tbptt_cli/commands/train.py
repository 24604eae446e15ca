"""Train a character-level language model with TBPTT(k1, k2), in JAX and PyTorch side by side.

The text is the Python standard library's own source (its public top-level modules, read
in sorted order: nothing is downloaded and the data is the same on every run of a given
Python), or a file of your own with --text. It is cut into --batch parallel contiguous
streams, one-hot encoded (newline and printable ASCII; other characters share one symbol),
and fed time-major to next-character prediction with cross-entropy. The stream is fed a
segment at a time: each call of `tbptt_train_step` runs --updates-per-call updates and
returns the carry the next call continues from.

With --framework both (the default), JAX and PyTorch train the same model from the same
initial weights (drawn by JAX, copied into torch) with the same Adam settings, and the run
fails (exit status 1) if their losses part by more than floating-point rounding explains:
each of the first --checked-updates updates within --rtol relative, and the mean losses of
the last 10 updates within 1e-2. --framework jax or torch trains one, and needs only that
framework installed (JAX draws the weights when it trains, torch when it trains alone). On
a terminal, a progress bar on stderr shows each framework's loss and throughput. The run
prints the losses side by side, each framework's wall time (JAX's compiling calls apart)
and a sample of text from the trained model (JAX's when JAX trained), and writes into
--out a JSON log (configuration, versions, every update's loss per framework, timings,
the parity check, the sample) and, where matplotlib is installed, a loss-curve PNG (the
frameworks overlaid, and their relative difference, when both ran).

Exit status: 0 on success, 1 if the frameworks' losses part, 2 on a bad option or a
framework --framework needs that is not installed (one line says which).

Examples:

    tbptt train                                  # LSTM on the stdlib, both frameworks
    tbptt train --text notes.txt --cell gru --hidden 256 --framework jax --out runs/gru
    tbptt train --k1 25 --k2 50 --updates 100 --dtype float64
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from tbptt.checks import check_int, check_k
from tbptt_cli import frameworks
from tbptt_cli.char_lm import CELL_NAMES
from tbptt_cli.char_lm.plot import PLOT_NAME
from tbptt_cli.char_lm.record import LOG_NAME
from tbptt_cli.text import DEFAULT_STDLIB_CHARS

# What each --framework trains.
FRAMEWORKS = {"both": ("jax", "torch"), "jax": ("jax",), "torch": ("torch",)}


def add_arguments(parser: argparse.ArgumentParser, *, default_out: str | None = "tbptt-train"
                  ) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--text", metavar="FILE", default=None,
                      help="train on this UTF-8 text file (default: the source of the Python "
                           "standard library)")
    data.add_argument("--chars", type=int, default=None,
                      help="characters of text to read; training uses as many whole calls "
                           f"as they give (default: {DEFAULT_STDLIB_CHARS:,} of the standard "
                           "library, all of a --text file)")
    data.add_argument("--batch", type=int, default=32,
                      help="parallel streams B (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--cell", choices=tuple(CELL_NAMES), default="lstm",
                       help="recurrent cell (default: %(default)s)")
    model.add_argument("--hidden", type=int, default=128,
                       help="hidden size H of each layer (default: %(default)s)")
    model.add_argument("--layers", type=int, default=1,
                       help="stacked recurrent layers (default: %(default)s)")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="precision of weights and arithmetic (default: %(default)s)")
    training = parser.add_argument_group("training")
    training.add_argument("--framework", choices=tuple(FRAMEWORKS), default="both",
                          help="which framework(s) train; with both their losses are "
                               "compared. The initial weights are drawn by JAX whenever JAX "
                               "trains (copied into torch with both), by torch when torch "
                               "trains alone; each needs only its own framework installed "
                               "(default: %(default)s)")
    training.add_argument("--k1", type=int, default=50,
                          help="steps between updates (default: %(default)s)")
    training.add_argument("--k2", type=int, default=None,
                          help="steps each update backpropagates through, >= k1 "
                               "(default: k1)")
    training.add_argument("--updates", type=int, default=None,
                          help="updates to train; the text must hold batch * (updates * k1 "
                               "+ 1) characters (default: as many whole calls as the text "
                               "gives)")
    training.add_argument("--updates-per-call", type=int, default=10,
                          help="TBPTT updates per call of tbptt_train_step; a call feeds "
                               "k1 * updates-per-call steps of every stream (default: "
                               "%(default)s)")
    training.add_argument("--lr", type=float, default=1e-2,
                          help="Adam learning rate (default: %(default)s)")
    training.add_argument("--seed", type=int, default=0,
                          help="seed of the initial weights (jax.random.key(seed), or "
                               "torch.manual_seed(seed) for torch alone) and of the sampling "
                               "(default: %(default)s)")
    training.add_argument("--jax-devices", type=int, default=1,
                          help="split the batch over this many JAX devices, data parallel "
                               "(tbptt_jax.sharding; the same updates); on a CPU each becomes "
                               "an XLA CPU device, so slices of the batch run side by side, "
                               "which is faster than one device at small sizes "
                               "(default: %(default)s)")
    training.add_argument("--torch-threads", type=int, default=1,
                          help="torch.set_num_threads: at these sizes a second thread gains "
                               "little, and on a busy machine torch's OpenMP threads wait on "
                               "each other (we saw small ops run about 100x slower) "
                               "(default: %(default)s)")
    check = parser.add_argument_group("parity check (--framework both)")
    check.add_argument("--rtol", type=float, default=1e-4,
                       help="largest relative difference of the frameworks' losses allowed "
                            "in each of the first --checked-updates updates (default: "
                            "%(default)s)")
    check.add_argument("--checked-updates", type=int, default=50,
                       help="updates held to --rtol; float32 rounding differences grow with "
                            "training, so later ones are only reported (default: "
                            "%(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", default=default_out,
                        help=f"directory for {LOG_NAME} and {PLOT_NAME} (the PNG where "
                             f"matplotlib is installed), created if needed"
                             + (" (default: %(default)s)" if default_out else
                                " (default: write no files)"))
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr (it is drawn on a terminal only)")
    output.add_argument("--print-every", type=int, default=20,
                        help="every how many updates the loss table shows a row (default: "
                             "%(default)s)")
    output.add_argument("--prompt", default="def ",
                        help="text the sample starts from, one character or more (default: "
                             "%(default)r)")
    output.add_argument("--sample-length", type=int, default=300,
                        help="characters to sample, 0 for none (default: %(default)s)")
    output.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature, > 0; lower is greedier (default: "
                             "%(default)s)")


def check_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first option that is wrong, what it must be and what it
    is."""
    for name in ("hidden", "layers", "batch", "updates_per_call", "checked_updates",
                 "jax_devices", "torch_threads", "print_every"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("chars", "updates"):
        if getattr(args, name) is not None:
            check_int(f"--{name}", getattr(args, name))
    check_int("--sample-length", args.sample_length, minimum=0)
    check_k(args.k1, args.k2)
    if "jax" in FRAMEWORKS[args.framework] and args.batch % args.jax_devices:
        raise ValueError(f"--batch must split evenly over --jax-devices = {args.jax_devices}, "
                         f"got {args.batch}")
    for name in ("lr", "rtol", "temperature"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.sample_length and not args.prompt:
        raise ValueError("--prompt must hold one character or more to sample from, got ''")


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as error:
        print(f"tbptt train: error: {error}", file=sys.stderr)
        return 2
    needs = FRAMEWORKS[args.framework]
    problem = frameworks.missing(needs)
    if problem is not None:
        others = [name for name in needs if frameworks.import_error(name) is None]
        instead = f", or train with --framework {others[0]}" if others else ""
        print(f"tbptt train: error: --framework {args.framework} {problem}{instead}",
              file=sys.stderr)
        return 2
    try:
        return _train(args)
    except ValueError as error:  # the text is too short for the run asked for, and the like
        print(f"tbptt train: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None, *, prog: str | None = None,
         default_out: str | None = None) -> int:
    """`tbptt train` as a script of its own (examples/char_lm.py)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_out=default_out)
    return run(parser.parse_args(argv))


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from tbptt_cli import char_lm, text
    from tbptt_cli.char_lm import plot, record, report
    from tbptt_cli.progress import Progress

    names = FRAMEWORKS[args.framework]
    # Each framework's module is imported only when it trains: the other may be absent.
    jax_side = importlib.import_module("tbptt_cli.char_lm._jax") if "jax" in names else None
    torch_side = (importlib.import_module("tbptt_cli.char_lm._torch") if "torch" in names
                  else None)

    k2 = args.k1 if args.k2 is None else args.k2
    segment_length = args.k1 * args.updates_per_call
    data = text.streams(args.text, batch_size=args.batch, k1=args.k1,
                        updates_per_call=args.updates_per_call, updates=args.updates,
                        num_chars=args.chars)
    corpus, inputs, targets = data.corpus, data.inputs, data.targets
    steps, updates, calls, used = len(inputs), data.updates, data.calls, data.characters
    print(f"text      {used:,} characters of {corpus.describe()}, Python "
          f"{sys.version.split()[0]}")
    per_call = ("" if updates % args.updates_per_call == 0 else "up to ")
    print(f"data      {args.batch} streams x {steps} steps, vocabulary {text.VOCAB_SIZE}, "
          f"{calls} calls x {per_call}{args.updates_per_call} updates = {updates} updates of "
          f"TBPTT(k1={args.k1}, k2={k2})")

    precision = (jax_side.precision(args.dtype) if jax_side is not None
                 else contextlib.nullcontext())
    with precision:
        # The weight rule: JAX draws them whenever it trains, and torch gets a copy.
        params = jax_model = torch_model = None
        described = []
        if jax_side is not None:
            jax_devices = jax_side.devices(args.jax_devices)
            jax_model = jax_side.build_model(args.cell, args.hidden, args.layers)
            params = jax_side.init(jax_model, seed=args.seed, dtype=args.dtype)
            parameters = sum(value.size for value in params.values())
            described.append(jax_side.describe(jax_devices))
        if torch_side is not None:
            torch_side.set_threads(args.torch_threads)
            torch_model = torch_side.build_model(args.cell, args.hidden, args.layers,
                                                 seed=args.seed, dtype=args.dtype,
                                                 params=params)
            parameters = torch_side.parameter_count(torch_model)
            described.append(torch_side.describe())
        print(f"model     {CELL_NAMES[args.cell]}, {args.layers} layer(s) of {args.hidden}, "
              f"{parameters:,} parameters, {args.dtype}; Adam lr={args.lr}, "
              f"betas={char_lm.BETAS}, eps={char_lm.EPS}")
        print(f"devices   {', '.join(described)}")
        sys.stdout.flush()

        train = dict(k1=args.k1, k2=k2, segment_length=segment_length, lr=args.lr)
        runs: dict[str, char_lm.Run] = {}
        for name in names:
            progress = None if args.no_progress else Progress(
                name, updates, steps_per_update=args.k1)
            on_call = None if progress is None else progress.update
            if name == "jax":
                params, runs[name] = jax_side.train(
                    jax_model, params, inputs, targets, dtype=args.dtype,
                    devices=jax_devices, on_call=on_call, **train)
            else:
                runs[name] = torch_side.train(torch_model, inputs, targets, on_call=on_call,
                                              **train)
            if progress is not None:
                progress.close()

        print()
        print(report.loss_table({name: run.losses for name, run in runs.items()},
                                args.print_every))
        print()
        for name, run in runs.items():
            print(report.first_and_last(name, run.losses))

        print("\nwall time")
        compiling = {"jax": report.jax_compiling_calls(k2 > args.k1), "torch": 0}
        for name, run in runs.items():
            print(report.timing(name, run.seconds, compiling[name]))

        sampled = None
        if args.sample_length:
            if jax_side is not None:
                source, step = "JAX", jax_side.sampler(jax_model, params)
            else:
                source, step = "torch", torch_side.sampler(torch_model)
            print(f"\nsample from the trained {source} model (temperature "
                  f"{args.temperature}, seed {args.seed}):")
            sampled = char_lm.sample(step, args.prompt, args.sample_length,
                                     temperature=args.temperature, seed=args.seed)
            print(sampled)

        parity = None
        if len(runs) == 2:
            parity = report.parity_check(runs["jax"].losses, runs["torch"].losses,
                                         checked_updates=args.checked_updates, rtol=args.rtol)
            report.print_parity(parity)

        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            config = {**vars(args), "k2": k2, "segment_length": segment_length}
            config.pop("run", None)  # the subcommand's function, set by tbptt_cli.cli
            versions = char_lm.versions()
            for side in (jax_side, torch_side):
                if side is not None:
                    versions.update(side.versions())
            record.write_log(
                out / record.LOG_NAME, config=config, versions=versions,
                data={"source": corpus.describe(), "characters": used, "streams": args.batch,
                      "steps": steps, "vocabulary": text.VOCAB_SIZE, "calls": calls,
                      "updates": updates},
                model={"cell": args.cell, "layers": args.layers, "hidden": args.hidden,
                       "parameters": int(parameters), "dtype": args.dtype},
                runs=runs, compiling_calls=compiling, parity=parity, sample=sampled)
            no_plot = plot.unavailable()
            if no_plot is None:
                plot.plot_losses(
                    {name: np.asarray(run.losses) for name, run in runs.items()},
                    out / plot.PLOT_NAME,
                    title=f"{CELL_NAMES[args.cell]} {args.layers}x{args.hidden} on "
                          f"{corpus.name()}, TBPTT(k1={args.k1}, k2={k2}), {args.dtype}",
                    tolerance=None if parity is None else (args.checked_updates, args.rtol))
                print(f"\nwrote {out / record.LOG_NAME} and {out / plot.PLOT_NAME}")
            else:
                print(f"\nwrote {out / record.LOG_NAME} (no {plot.PLOT_NAME}: {no_plot})")
    return 0 if parity is None or parity["ok"] else 1
