"""Dropout on in both frameworks: does the JAX port train to the validation perplexity torch
trains to? Needs JAX and PyTorch.

With dropout the two runs draw different masks (torch from its generator, JAX from the keys
the trainer hands `apply`), so they cannot agree to rounding as the port check does; they
are two draws of the same random training. For each seed, torch draws the initial weights,
JAX starts from a copy of them, and each framework trains `STUDY` (dropout 0.2) with its own
randomness seeded by that seed. The tolerance is the spread of torch itself: the
frameworks' mean validation perplexities over the seeds must differ by less than the range
(largest minus smallest) of torch's over the same seeds, i.e. less than a change of seed
alone moves torch.

    .venv/bin/python -m examples.word_lm --dropout-study
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import jax
import numpy as np
import torch

import tbptt_torch
from examples.word_lm import Config, corpus, jax_lm, streams, torch_lm, train

RESULTS = Path(__file__).resolve().parent / "results" / "dropout.json"
STUDY = Config(epochs=2)
SEEDS = 5


def run(config: Config = STUDY, seeds: int = SEEDS) -> dict[str, Any]:
    """Every seed's validation losses per epoch, per framework."""
    words = corpus.load(config.vocab_size)
    data = streams(words.train, words.valid, config)
    runs: dict[str, list[list[float]]] = {"jax": [], "torch": []}
    for seed in range(seeds):
        model = torch_lm.build(config, len(words.words), seed=seed)
        weights = tbptt_torch.to_jax(model)
        port = jax_lm.build(config, len(words.words))
        trainers = {"jax": jax_lm.Trainer(port, weights, config, seed=seed),
                    "torch": torch_lm.Trainer(model, config, seed=seed)}
        for name, trainer in trainers.items():
            record = train(trainer, config, data, log=None)
            runs[name].append(record["valid_loss"])
            print(f"seed {seed} {name:5s} valid ppl "
                  f"{' '.join(f'{math.exp(loss):7.2f}' for loss in record['valid_loss'])}",
                  flush=True)
    return {"config": dataclasses.asdict(config), "seeds": seeds,
            "environment": {"python": platform.python_version(), "jax": jax.__version__,
                            "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
            "valid_loss": runs}


def verdict(results: dict[str, Any]) -> dict[str, float | bool]:
    """The final validation perplexity's mean per framework, torch's range over the seeds
    (the tolerance), and whether the means differ by less."""
    final = {name: np.exp(np.asarray(losses)[:, -1])
             for name, losses in results["valid_loss"].items()}
    tolerance = float(final["torch"].max() - final["torch"].min())
    gap = float(abs(final["jax"].mean() - final["torch"].mean()))
    return {"jax_mean": float(final["jax"].mean()), "torch_mean": float(final["torch"].mean()),
            "jax_range": float(final["jax"].max() - final["jax"].min()),
            "torch_range": tolerance, "gap": gap, "ok": gap < tolerance}


def summary(results: dict[str, Any]) -> str:
    config, result = results["config"], verdict(results)
    final = {name: np.exp(np.asarray(losses)[:, -1])
             for name, losses in results["valid_loss"].items()}
    lines = [
        f"Dropout {config['dropout']} in both frameworks: {results['seeds']} seeds x "
        f"{config['epochs']} epochs of a {config['num_layers']}-layer "
        f"{config['cell'].upper()} {config['embedding_size']}/{config['hidden_size']} over "
        f"{config['vocab_size']} words, TBPTT({config['bptt']}), SGD lr {config['lr']:g}, "
        f"clip {config['clip']:g}; each seed's initial weights drawn by torch and copied "
        f"to JAX. JAX {results['environment']['jax']}, torch "
        f"{results['environment']['torch']} ({results['environment']['torch_threads']} "
        f"thread).",
        "",
        "| framework | final validation perplexity per seed | mean | range |",
        "| --- | --- | ---: | ---: |",
    ]
    for name in ("torch", "jax"):
        lines.append(f"| {name} | {', '.join(f'{value:.2f}' for value in final[name])} | "
                     f"{final[name].mean():.2f} | {final[name].max() - final[name].min():.2f} |")
    lines += ["", f"Means differ by {result['gap']:.2f}; torch's own range over the seeds, "
              f"the tolerance, is {result['torch_range']:.2f}: "
              f"{'within' if result['ok'] else 'OUTSIDE'}."]
    return "\n".join(lines) + "\n"


def main(out: Path = RESULTS) -> int:
    torch.set_num_threads(1)
    results = run()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(summary(results))
    print(summary(results), end="")
    return 0 if verdict(results)["ok"] else 1
