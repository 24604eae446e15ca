"""The word-level language model example (examples/word_lm): the JAX port equals the torch
model exactly with dropout off (`tbptt_parity.compare`, float64, clipping on); its
parameters carry torch's `state_dict` names; dropout follows the key the trainer hands
`apply`; the corpus caps its vocabulary with `<unk>`; the command trains in either
framework and prints perplexity; and docs/word_lm.md shows the committed dropout study."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tbptt_jax
import tbptt_torch
from examples.word_lm import Config, corpus, dropout, jax_lm, parity, torch_lm
from examples.word_lm.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--vocab-size", "50", "--embedding-size", "4", "--hidden-size", "4", "--epochs", "1",
         "--bptt", "35", "--updates-per-call", "50", "--no-progress"]


def test_the_jax_port_equals_the_torch_model_with_clipping_to_1e_10():
    report = parity.check()
    assert report.ok, report.format()
    assert report.updates == len(report.rows) == parity.UPDATES >= 20
    assert max(report.largest_gaps().values()) < 1e-10


@pytest.mark.parametrize("tied", [False, True])
def test_the_port_reads_the_torch_models_parameter_names(tied):
    config = Config(embedding_size=6, hidden_size=6, tied=tied)
    model = torch_lm.build(config, 30, seed=0)
    port = jax_lm.build(config, 30)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert port.param_shapes() == expected
    assert ("decoder.weight" in expected) is not tied
    params = port.init(jax.random.key(0))
    assert {name: value.shape for name, value in params.items()} == expected
    # The same weights give the same logits (dropout off, eval mode).
    weights = {name: p.detach().numpy() for name, p in model.named_parameters()}
    xs = np.arange(12).reshape(4, 3) % 30
    _, logits = port.apply(weights, port.initial_carry(3), xs)
    with torch.no_grad():
        expected_logits, _ = model.eval()(torch.from_numpy(xs).long(), None)
    np.testing.assert_allclose(logits, expected_logits.numpy(), rtol=1e-5, atol=1e-6)


def test_dropout_follows_the_key_and_is_off_without_one():
    port = jax_lm.WordLM("lstm", 30, 8, 8, 2, dropout=0.5)
    params = port.init(jax.random.key(0))
    xs = jnp.arange(40).reshape(10, 4) % 30
    carry = port.initial_carry(4)
    _, plain = port.apply(params, carry, xs)
    _, first = port.apply(params, carry, xs, key=jax.random.key(1))
    _, again = port.apply(params, carry, xs, key=jax.random.key(1))
    _, other = port.apply(params, carry, xs, key=jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - plain).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    _, undropped = jax_lm.WordLM("lstm", 30, 8, 8, 2).apply(params, carry, xs,
                                                             key=jax.random.key(1))
    np.testing.assert_array_equal(undropped, plain)


def test_the_stacks_dropout_acts_between_layers_only_with_a_key():
    rnn = tbptt_jax.models.lstm(5, 6, 1, num_layers=2)
    params = rnn.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (7, 3, 5))
    carry = rnn.initial_carry(3)
    _, ys = rnn.apply(params, carry, xs)
    _, plain = rnn.hidden_states(params, carry, xs, dropout=0.5)
    _, dropped = rnn.hidden_states(params, carry, xs, dropout=0.5, key=jax.random.key(2))
    readout = plain @ params["head.weight"].T + params["head.bias"][None, None]
    np.testing.assert_allclose(readout, ys, rtol=1e-6)
    assert np.abs(dropped - plain).max() > 1e-2
    one_layer = tbptt_jax.models.lstm(5, 6, 1)  # no layer above the first: nothing to drop
    single = one_layer.init(jax.random.key(0))
    np.testing.assert_array_equal(
        one_layer.hidden_states(single, one_layer.initial_carry(3), xs, dropout=0.5,
                                key=jax.random.key(2))[1],
        one_layer.hidden_states(single, one_layer.initial_carry(3), xs)[1])
    kept = jnp.mean(tbptt_jax.models.dropped(jax.random.key(0), jnp.ones((50, 8, 64)), 0.2) > 0)
    assert abs(float(kept) - 0.8) < 0.01


def test_the_corpus_caps_its_vocabulary_with_unk():
    words = corpus.load(100)
    assert len(words.words) == 100 and words.words[-1] == corpus.UNKNOWN
    assert set(words.words[:4]) == {corpus.END_OF_LINE, ".", "the", ","}
    assert words.train.max() == 99 and 0.2 < words.unknown_rate < 0.6
    total = words.train.size + words.valid.size
    assert words.valid.size == total - round(total * 0.9) and words.files > 100
    assert corpus.tokenize("Return the value.\n\n  x = 42") == [
        "return", "the", "value", ".", corpus.END_OF_LINE, "x", "=", "42", corpus.END_OF_LINE]


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_the_command_trains_and_prints_perplexity(framework, capsys):
    assert main(["--framework", framework, *SMALL]) == 0
    out = capsys.readouterr().out
    epoch = re.search(r"\| end of epoch   1 .* valid loss\s+([\d.]+) \| valid ppl\s+([\d.]+)",
                      out)
    assert epoch is not None, out
    loss, ppl = float(epoch[1]), float(epoch[2])
    assert math.isclose(math.exp(loss), ppl, rel_tol=5e-3)
    assert ppl < 40  # a uniform guess over the 50 words scores 50
    assert "2-layer LSTM 4/4, dropout 0.2" in out


def test_the_command_needing_a_missing_framework_says_so_and_exits_2(monkeypatch, capsys):
    from tbptt_cli import frameworks

    monkeypatch.setattr(frameworks, "import_error",
                        lambda name: ImportError("blocked") if name == "torch" else None)
    assert main(["--parity"]) == 2
    assert capsys.readouterr().err.strip() == (
        "python -m examples.word_lm --parity needs JAX and PyTorch, and PyTorch cannot be "
        "imported here (blocked); pip install \"tbptt[torch]\"")


def test_the_docs_show_the_committed_dropout_study():
    results = json.loads(dropout.RESULTS.read_text())
    assert Config(**results["config"]) == dropout.STUDY
    assert dropout.RESULTS.with_suffix(".md").read_text() == dropout.summary(results)
    assert dropout.summary(results) in (ROOT / "docs" / "word_lm.md").read_text()
    assert dropout.verdict(results)["ok"]
    assert "docs/word_lm.md" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_a_short_dropout_study_agrees_within_torchs_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(dropout, "SEEDS", 3)
    results = dropout.run(Config(epochs=1), seeds=3)
    result = dropout.verdict(results)
    assert np.asarray(results["valid_loss"]["jax"]).shape == (3, 1)
    assert result["gap"] < max(result["torch_range"], 0.05 * result["torch_mean"])


def test_weights_cross_between_the_models():
    config = Config(embedding_size=6, hidden_size=6)
    model = torch_lm.build(config, 30, seed=3)
    port = jax_lm.build(config, 30)
    params = port.init(jax.random.key(3))
    tbptt_torch.load_jax(model, params)
    np.testing.assert_array_equal(model.encoder.weight.detach().numpy(),
                                  params["encoder.weight"])
