"""`python -m examples.word_lm --framework jax|torch`: the word-level language model trained
with TBPTT in one framework, which is all it needs installed; perplexity per epoch on
stdout, a progress bar on stderr (on a terminal)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence

from examples.word_lm import Config, corpus, streams, train, updates_per_epoch
from tbptt_cli import frameworks


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Config]:
    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m examples.word_lm",
        description="pytorch/examples' word_language_model trained with TBPTT on words of "
        "the Python standard library's docstrings, in JAX or PyTorch (docs/word_lm.md).")
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    for field in dataclasses.fields(Config):
        option = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(option, action="store_true", help="(default: off)")
        elif field.name == "cell":
            parser.add_argument(option, choices=("lstm", "gru", "elman"), default=defaults.cell)
        else:
            kind = float if field.type == "float" else int
            parser.add_argument(option, type=kind, default=getattr(defaults, field.name),
                                help="(default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's intra-op threads (default 1: at these sizes two "
                        "OpenMP threads made an epoch 46 s against 6 s on one, docs/word_lm.md)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--parity", action="store_true",
                        help="instead, check the JAX port against the torch model exactly "
                        "(tbptt_parity.compare, dropout off, float64); needs both frameworks")
    parser.add_argument("--dropout-study", action="store_true",
                        help="instead, train both frameworks with dropout over several seeds "
                        "and write examples/word_lm/results/dropout.*; needs both frameworks")
    args = parser.parse_args(argv)
    return args, Config(**{field.name: getattr(args, field.name)
                           for field in dataclasses.fields(Config)})


def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse(argv)
    both = args.parity or args.dropout_study
    problem = frameworks.missing(["jax", "torch"] if both else [args.framework])
    if problem is not None:
        what = "--parity" if args.parity else "--dropout-study" if both else (
            f"--framework {args.framework}")
        print(f"python -m examples.word_lm {what} {problem}", file=sys.stderr)
        return 2
    if args.parity:
        from examples.word_lm import parity

        report = parity.check()
        print(report)
        return 0 if report.ok else 1
    if args.dropout_study:
        from examples.word_lm import dropout

        return dropout.main()
    start = time.perf_counter()
    words = corpus.load(config.vocab_size)
    data = streams(words.train, words.valid, config)
    print(f"corpus: docstrings of {words.files} standard-library modules, "
          f"{words.train.size:,} training and {words.valid.size:,} validation tokens, "
          f"{len(words.words):,} words ({words.unknown_rate:.1%} of training tokens <unk>)")
    if args.framework == "jax":
        import jax

        from examples.word_lm import jax_lm as framework

        model = framework.build(config, len(words.words))
        trainer = framework.Trainer(model, model.init(jax.random.key(config.seed)), config,
                                    seed=config.seed)
    else:
        import torch

        from examples.word_lm import torch_lm as framework

        torch.set_num_threads(args.torch_threads)
        trainer = framework.Trainer(framework.build(config, len(words.words), seed=config.seed),
                                    config, seed=config.seed)
    print(f"{framework.describe()}: {config.num_layers}-layer {config.cell.upper()} "
          f"{config.embedding_size}/{config.hidden_size}, dropout {config.dropout}, "
          f"{'tied' if config.tied else 'untied'}; TBPTT(k1 = k2 = {config.bptt}), SGD lr "
          f"{config.lr:g}, clip {config.clip:g}, batch {config.batch_size}", flush=True)
    progress = None
    if not args.no_progress:
        from tbptt_cli.progress import Progress

        progress = Progress(args.framework, config.epochs * updates_per_epoch(config, data),
                            steps_per_update=config.bptt)
    record = train(trainer, config, data, on_call=progress and progress.update,
                   log=print if progress is None else progress.write)
    if progress is not None:
        progress.close()
    best = min(record["valid_loss"])
    print(f"best valid ppl {math.exp(best):.2f} after {config.epochs} epochs, "
          f"{time.perf_counter() - start:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
