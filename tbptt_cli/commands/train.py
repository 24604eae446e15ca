"""Train a character-level language model with TBPTT(k1, k2), in JAX and PyTorch side by side.

The text is the Python standard library's own source (its public top-level modules, read
in sorted order: nothing is downloaded and the data is the same on every run of a given
Python), or a file of your own with --text. It is cut into --batch parallel contiguous
streams, one-hot encoded (newline and printable ASCII; other characters share one symbol),
and fed time-major to next-character prediction with cross-entropy. The stream is fed a
segment at a time: each call of `tbptt_train_step` runs --updates-per-call updates and
returns the carry the next call continues from.

With --framework both (the default), JAX and PyTorch train the same model from the same
initial weights (drawn by torch, copied to JAX) with the same Adam settings, and the run
fails (exit status 1) if their losses part by more than floating-point rounding explains:
each of the first --checked-updates updates within --rtol relative, and the mean losses of
the last 10 updates within 1e-2. A progress bar on stderr shows each framework's loss and
throughput. The run prints both losses side by side, each framework's wall time (JAX's
compiling calls apart) and a sample of text from the trained model, and writes into --out
a JSON log (configuration, versions, every update's loss per framework, timings, the
parity check, the sample) and a loss-curve PNG (both frameworks overlaid, and their
relative difference, when both ran).

Examples:

    tbptt train                                  # LSTM on the stdlib, both frameworks
    tbptt train --text notes.txt --cell gru --hidden 256 --framework jax --out runs/gru
    tbptt train --k1 25 --k2 50 --updates 100 --dtype float64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# How close the two runs' final losses (mean of the last 10 updates) must be; see
# `parity_check`.
FINAL_RTOL = 1e-2
# Characters of the standard library read when neither --chars nor --updates says.
DEFAULT_STDLIB_CHARS = 330_000
LOG_NAME, PLOT_NAME = "train_log.json", "loss_curve.png"
CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "elman": "Elman RNN"}


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
    training.add_argument("--framework", choices=("both", "jax", "torch"), default="both",
                          help="which framework(s) train; with both their losses are "
                               "compared (default: %(default)s)")
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
                          help="seed of the initial weights and of the sampling (default: "
                               "%(default)s)")
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
                        help=f"directory for {LOG_NAME} and {PLOT_NAME}, created if needed"
                             + (" (default: %(default)s)" if default_out else
                                " (default: write no files)"))
    output.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr")
    output.add_argument("--print-every", type=int, default=20,
                        help="every how many updates the loss table shows a row (default: "
                             "%(default)s)")
    output.add_argument("--prompt", default="def ",
                        help="text the sample starts from (default: %(default)r)")
    output.add_argument("--sample-length", type=int, default=300,
                        help="characters to sample, 0 for none (default: %(default)s)")
    output.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature, > 0; lower is greedier (default: "
                             "%(default)s)")


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, or None."""
    for name in ("hidden", "layers", "k1", "batch", "updates_per_call", "checked_updates",
                 "jax_devices", "torch_threads", "print_every"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.batch % args.jax_devices:
        return (f"--batch must split evenly over --jax-devices = {args.jax_devices}, "
                f"got {args.batch}")
    for name in ("chars", "updates"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.sample_length < 0:
        return f"--sample-length must be >= 0, got {args.sample_length}"
    if args.k2 is not None and args.k2 < args.k1:
        return f"--k2 must be >= --k1 = {args.k1}, got {args.k2}"
    if not args.lr > 0:
        return f"--lr must be > 0, got {args.lr}"
    if not args.rtol > 0:
        return f"--rtol must be > 0, got {args.rtol}"
    if not args.temperature > 0:
        return f"--temperature must be > 0, got {args.temperature}"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem is not None:
        print(f"tbptt train: error: {problem}", file=sys.stderr)
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
    from tbptt_cli.progress import Progress

    k2 = args.k1 if args.k2 is None else args.k2
    segment_length = args.k1 * args.updates_per_call
    if args.updates is not None:
        steps = args.updates * args.k1
        chars = args.chars or args.batch * (steps + 1)
    else:
        chars = args.chars or (DEFAULT_STDLIB_CHARS if args.text is None else None)
    corpus = (text.load_corpus(chars) if args.text is None
              else text.read_corpus(args.text, chars))
    if args.updates is None:
        calls = (len(corpus.text) // args.batch - 1) // segment_length
        if calls < 1:
            raise ValueError(f"{len(corpus.text)} characters are too few for one call: "
                             f"{args.batch} streams of {segment_length} steps need "
                             f"{args.batch * (segment_length + 1)}")
        steps = calls * segment_length
    updates = steps // args.k1
    calls = -(-updates // args.updates_per_call)
    inputs, targets = text.make_streams(text.encode(corpus.text), args.batch, steps)
    used = args.batch * (steps + 1)
    print(f"text      {used:,} characters of {corpus.describe()}, Python "
          f"{sys.version.split()[0]}")
    per_call = ("" if updates % args.updates_per_call == 0 else "up to ")
    print(f"data      {args.batch} streams x {steps} steps, vocabulary {text.VOCAB_SIZE}, "
          f"{calls} calls x {per_call}{args.updates_per_call} updates = {updates} updates of "
          f"TBPTT(k1={args.k1}, k2={k2})")

    with char_lm.precision(args.dtype):
        jax_devices = char_lm.jax_devices(args.jax_devices)
        char_lm.set_torch_threads(args.torch_threads)
        models = char_lm.build_models(args.cell, args.hidden, args.layers, seed=args.seed,
                                      dtype=args.dtype)
        parameters = sum(p.size for p in models.params.values())
        print(f"model     {CELL_NAMES[args.cell]}, {args.layers} layer(s) of {args.hidden}, "
              f"{parameters:,} parameters, {args.dtype}; Adam lr={args.lr}, "
              f"betas={char_lm.BETAS}, eps={char_lm.EPS}")
        print(f"devices   {char_lm.describe_devices(jax_devices)}")
        sys.stdout.flush()

        train = dict(k1=args.k1, k2=k2, segment_length=segment_length, lr=args.lr)
        runs: dict[str, char_lm.Run] = {}
        for name in ("jax", "torch"):
            if args.framework not in ("both", name):
                continue
            progress = None if args.no_progress else Progress(
                name, updates, steps_per_update=args.k1)
            on_call = None if progress is None else progress.update
            if name == "jax":
                params, runs[name] = char_lm.train_jax(
                    models.jax_model, models.params, inputs, targets, dtype=args.dtype,
                    devices=jax_devices, on_call=on_call, **train)
            else:
                runs[name] = char_lm.train_torch(models.torch_model, inputs, targets,
                                                 on_call=on_call, **train)
            if progress is not None:
                progress.close()
        if "jax" not in runs:  # sample with the JAX model all the same, from torch's weights
            params = char_lm.weights(models.torch_model)

        losses = {name: run.losses for name, run in runs.items()}
        print()
        print(loss_table(losses, args.print_every))
        print()
        for name, run in runs.items():
            first, last = run.losses[:10].mean(), run.losses[-10:].mean()
            print(f"{name:<6}mean loss of the first 10 updates {first:.4f} "
                  f"({first / math.log(2):.3f} bits/char), of the last 10 {last:.4f} "
                  f"({last / math.log(2):.3f} bits/char)")

        print("\nwall time")
        compiling = jax_compiling_calls(k2 > args.k1)
        for name, run in runs.items():
            print(timing(name, run.seconds, compiling if name == "jax" else 0))

        sampled = None
        if args.sample_length:
            source = "JAX" if "jax" in runs else "torch (weights moved to JAX)"
            print(f"\nsample from the trained {source} model (temperature "
                  f"{args.temperature}, seed {args.seed}):")
            sampled = char_lm.sample(models.jax_model, params, args.prompt,
                                     args.sample_length, temperature=args.temperature,
                                     seed=args.seed)
            print(sampled)

        parity = None
        if len(runs) == 2:
            parity = parity_check(runs["jax"].losses, runs["torch"].losses,
                                  checked_updates=args.checked_updates, rtol=args.rtol)
            print_parity(parity)

        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            log = {
                "argv": sys.argv,
                "config": {**vars(args), "k2": k2, "segment_length": segment_length},
                "versions": char_lm.versions(),
                "data": {"source": corpus.describe(), "characters": used,
                         "streams": args.batch, "steps": steps,
                         "vocabulary": text.VOCAB_SIZE, "calls": calls, "updates": updates},
                "model": {"cell": args.cell, "layers": args.layers, "hidden": args.hidden,
                          "parameters": int(parameters), "dtype": args.dtype},
                "runs": {name: {"losses": [float(x) for x in run.losses],
                                "call_seconds": run.seconds,
                                "compiling_calls": compiling if name == "jax" else 0,
                                "seconds": sum(run.seconds)}
                         for name, run in runs.items()},
                "parity": parity,
                "sample": sampled,
            }
            log["config"].pop("run", None)  # the subcommand's function, set by tbptt_cli.cli
            (out / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n")
            plot_losses({name: np.asarray(run.losses) for name, run in runs.items()},
                        out / PLOT_NAME,
                        title=f"{CELL_NAMES[args.cell]} {args.layers}x{args.hidden} on "
                              f"{corpus.name()}, TBPTT(k1={args.k1}, k2={k2}), {args.dtype}",
                        tolerance=None if parity is None else (args.checked_updates,
                                                               args.rtol))
            print(f"\nwrote {out / LOG_NAME} and {out / PLOT_NAME}")
    return 0 if parity is None or parity["ok"] else 1


def jax_compiling_calls(overlap: bool) -> int:
    """JAX calls that compile: the first, and with k2 > k1 the second too (the first to
    carry an overlap in)."""
    return 2 if overlap else 1


def loss_table(runs: dict[str, Any], every: int) -> str:
    """Every `every`-th update's losses (and the last), side by side, with bits/char."""
    names = list(runs)
    header = f"{'update':>6}" + "".join(f"{name + ' loss':>13}" for name in names)
    if len(names) == 2:
        header += f"{'abs diff':>11}{'rel diff':>11}"
    lines = [header + f"{'bits/char':>11}"]
    count = len(runs[names[0]])
    for u in sorted({*range(0, count, every), count - 1}):
        losses = [float(runs[name][u]) for name in names]
        line = f"{u + 1:>6}" + "".join(f"{loss:>13.6f}" for loss in losses)
        if len(names) == 2:
            diff = abs(losses[0] - losses[1])
            line += f"{diff:>11.1e}{diff / abs(losses[1]):>11.1e}"
        lines.append(line + f"{losses[0] / math.log(2):>11.3f}")
    return "\n".join(lines)


def timing(name: str, seconds: list[float], compiling_calls: int) -> str:
    """One framework's wall time, the calls that compiled apart from the rest."""
    def calls(first: int, last: int) -> str:
        return f"call {first}" if first == last else f"calls {first}-{last}"

    compiling_calls = min(compiling_calls, len(seconds))
    parts = []
    if compiling_calls:
        compiling = sum(seconds[:compiling_calls])
        parts.append(f"{calls(1, compiling_calls)} (compile + run) {compiling:.2f} s")
    rest = seconds[compiling_calls:]
    if rest:
        parts.append(f"{calls(compiling_calls + 1, len(seconds))} {sum(rest):.2f} s "
                     f"({sum(rest) / len(rest):.3f} s/call)")
    return f"{name:<6}{sum(seconds):7.2f} s   " + "; ".join(parts)


def parity_check(jax_losses: Any, torch_losses: Any, *, checked_updates: int, rtol: float
                 ) -> dict[str, Any]:
    """How far the frameworks' losses are apart, and whether within the tolerances.

    Both frameworks compute the same function, but XLA and ATen round float32 in their own
    order, so the first update's losses already differ by ~1e-7 relative. Training
    amplifies such differences, as it does any perturbation, the more so the larger the
    model and the learning rate: over hundreds of updates they can grow past 1e-3 without
    anything being wrong. So each of the first `checked_updates` updates must agree to
    `rtol` (over the first 50, the configurations we measured stayed within 1.5e-5, while
    restarting each call from a zero carry, the classic streaming mistake, differs by 2e-2
    at the first update of the second call); they span several calls, so the carry handed
    from call to call is checked too. Afterwards the two runs must still reach the same
    loss: the means of their last 10 updates within FINAL_RTOL.
    """
    import numpy as np

    jax_losses, torch_losses = np.asarray(jax_losses), np.asarray(torch_losses)
    diff = np.abs(jax_losses - torch_losses)
    rel = diff / np.abs(torch_losses)
    checked = rel[:checked_updates]
    jax_final, torch_final = float(jax_losses[-10:].mean()), float(torch_losses[-10:].mean())
    final_rel = abs(jax_final - torch_final) / torch_final
    return {"updates": len(rel), "largest_abs_diff": float(diff.max()),
            "largest_rel_diff": float(rel.max()), "at_update": int(np.argmax(rel)) + 1,
            "checked_updates": len(checked), "checked_rel_diff": float(checked.max()),
            "checked_at_update": int(np.argmax(checked)) + 1, "rtol": rtol,
            "final_jax": jax_final, "final_torch": torch_final, "final_rel_diff": final_rel,
            "final_rtol": FINAL_RTOL,
            "ok": bool(checked.max() <= rtol and final_rel <= FINAL_RTOL)}


def print_parity(parity: dict[str, Any]) -> None:
    print(f"\nJAX vs torch over all {parity['updates']} updates: largest abs diff "
          f"{parity['largest_abs_diff']:.2e}, largest rel diff "
          f"{parity['largest_rel_diff']:.2e} (update {parity['at_update']})")
    print(f"  updates 1-{parity['checked_updates']}: largest rel diff "
          f"{parity['checked_rel_diff']:.2e} (update {parity['checked_at_update']}), "
          f"tolerance {parity['rtol']:.0e}")
    print(f"  mean loss of the last 10 updates: {parity['final_jax']:.4f} vs "
          f"{parity['final_torch']:.4f}, rel diff {parity['final_rel_diff']:.2e}, "
          f"tolerance {parity['final_rtol']:.0e}")
    if parity["ok"]:
        print("OK: the two frameworks trained the same model")
    else:
        print("FAIL: the frameworks' losses differ by more than the tolerance",
              file=sys.stderr)


def plot_losses(runs: dict[str, Any], path: Path, *, title: str,
                tolerance: tuple[int, float] | None = None) -> None:
    """A PNG of every framework's loss per update (bits/char), overlaid; with two runs, a
    second panel shows their relative difference on a log scale, and `tolerance`
    `(checked updates, rtol)` the bound the parity check holds the first updates to."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    both = len(runs) == 2
    figure, axes = plt.subplots(2 if both else 1, 1, figsize=(8, 6.5 if both else 4.5),
                                sharex=True, squeeze=False,
                                gridspec_kw={"height_ratios": [3, 1.4] if both else [1]})
    top = axes[0, 0]
    styles = {"jax": dict(color="tab:blue", linewidth=2.2),
              "torch": dict(color="tab:orange", linewidth=1.2, linestyle="--")}
    for name, losses in runs.items():
        updates = np.arange(1, len(losses) + 1)
        top.plot(updates, np.asarray(losses) / math.log(2), label=name, **styles[name])
    top.set_ylabel("loss (bits/char)")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    top.legend()
    if both:
        jax_losses, torch_losses = (np.asarray(losses) for losses in runs.values())
        rel = np.abs(jax_losses - torch_losses) / np.abs(torch_losses)
        bottom = axes[1, 0]
        # Updates where the losses are bit-identical have no place on a log scale: gaps.
        bottom.semilogy(np.arange(1, len(rel) + 1), np.where(rel > 0, rel, np.nan),
                        color="tab:gray", linewidth=1, marker=".", markersize=3)
        if tolerance is not None:
            checked, rtol = tolerance
            bottom.hlines(rtol, 1, min(checked, len(rel)), color="tab:red", linestyle=":",
                          label=f"tolerance, updates 1-{min(checked, len(rel))}")
            bottom.legend(loc="lower right", fontsize=8)
        bottom.set_ylabel("|jax - torch| / torch")
        bottom.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("update")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
