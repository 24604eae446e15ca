"""The main job (`tbptt train`, also `examples/char_lm.py`), run small: the data it builds,
both frameworks training the same model from the same weights (JAX's draw), agreeing and
learning, torch drawing its own when it trains alone, a sample alike from either, and the
parity gate failing the mistakes it is there to catch."""

import json

import jax
import numpy as np
import pytest
import torch

import tbptt_jax
import tbptt_torch
from examples import char_lm as script
from tbptt_cli import char_lm, text
from tbptt_cli.char_lm import _jax as char_jax
from tbptt_cli.char_lm import _torch as char_torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Under `pytest -n 2` on two cores, torch's per-core OpenMP threads oversubscribe the
    machine and its small ops wait on each other (we saw 100x slower); one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_streams_are_contiguous_slices_of_the_text_time_major():
    codes = text.encode(text.load_corpus(3 * 11).text)
    inputs, targets = text.make_streams(codes, batch_size=3, steps=10)
    assert inputs.shape == targets.shape == (10, 3)
    for b in range(3):
        np.testing.assert_array_equal(inputs[:, b], codes[b * 11:b * 11 + 10])
        np.testing.assert_array_equal(targets[:, b], codes[b * 11 + 1:b * 11 + 11])


def test_characters_outside_printable_ascii_share_one_code():
    codes = text.encode("a\tb\u00e9\n")
    assert codes.tolist() == [text.CODES["a"], text.OTHER, text.CODES["b"], text.OTHER,
                              text.CODES["\n"]]
    assert text.decode(codes) == f"a{text.OTHER_SHOWN_AS}b{text.OTHER_SHOWN_AS}\n"


def test_a_text_file_of_ones_own_is_read_whole_or_cut(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("h\u00e9llo\nworld\n", encoding="utf-8")
    assert text.read_corpus(path).text == "h\u00e9llo\nworld\n"
    assert text.read_corpus(path, 4).text == "h\u00e9ll"
    assert text.read_corpus(path).name() == "notes.txt"
    with pytest.raises(ValueError, match="holds 12 characters, fewer than the 13 asked for"):
        text.read_corpus(path, 13)
    with pytest.raises(ValueError, match="--text must name a file"):
        text.read_corpus(tmp_path / "missing.txt")


def test_jax_and_torch_streams_train_the_same_model_and_learn():
    batch, steps, k1, k2 = 4, 200, 10, 15
    codes = text.encode(text.load_corpus(batch * (steps + 1)).text)
    inputs, targets = text.make_streams(codes, batch, steps)
    jax_model = char_jax.build_model("lstm", 16, 1)
    params = char_jax.init(jax_model, seed=0, dtype="float32")
    torch_model = char_torch.build_model("lstm", 16, 1, seed=0, dtype="float32",
                                         params=params)
    # Four calls of 50 steps each: the OverlapCarry (k2 > k1) travels between them.
    train = dict(k1=k1, k2=k2, segment_length=50, lr=1e-2)
    reported = []

    _, jax_run = char_jax.train(jax_model, params, inputs, targets,
                                on_call=lambda done, loss: reported.append((done, loss)),
                                **train)
    torch_run = char_torch.train(torch_model, inputs, targets, **train)

    assert jax_run.losses.shape == torch_run.losses.shape == (steps // k1,)
    assert len(jax_run.seconds) == len(torch_run.seconds) == 4
    assert reported == [(5 * (i + 1), float(jax_run.losses[5 * i + 4])) for i in range(4)]
    np.testing.assert_allclose(jax_run.losses, torch_run.losses, rtol=1e-5)
    assert jax_run.losses[-5:].mean() < jax_run.losses[:5].mean() - 0.5


def first_update_loss(logits, targets):
    """The mean cross-entropy of logits `[k1, B, V]` against codes `[k1, B]`, in numpy."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, targets[..., None], axis=-1).mean()


@pytest.mark.parametrize("framework", ["both", "jax", "torch"])
def test_jax_draws_the_weights_when_it_trains_and_torch_when_it_trains_alone(framework,
                                                                           tmp_path):
    k1, seed = 5, 3
    status = script.main(["--framework", framework, "--cell", "gru", "--hidden", "8",
                          "--k1", str(k1), "--batch", "2", "--updates", "4",
                          "--updates-per-call", "2", "--dtype", "float64", "--seed", str(seed),
                          "--sample-length", "0", "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    runs = json.loads((tmp_path / "train_log.json").read_text())["runs"]
    inputs, targets = text.make_streams(text.encode(text.load_corpus(2 * 21).text), 2, 20)
    xs = text.one_hot(inputs[:k1], np.float64)
    # The first update's loss is that of the initial weights on the first k1 steps.
    with jax.enable_x64(True):
        model = tbptt_jax.models.gru(97, 8, 97)
        _, logits = model.apply(model.init(jax.random.key(seed), np.float64),
                                model.initial_carry(2, np.float64), xs)
        jax_drawn = first_update_loss(logits, targets[:k1])
    torch.manual_seed(seed)
    with torch.no_grad():
        logits, _ = tbptt_torch.models.GRUModel(97, 8, 97).double()(torch.from_numpy(xs))
    torch_drawn = first_update_loss(logits.numpy(), targets[:k1])
    assert abs(jax_drawn - torch_drawn) > 1e-3  # the two draws are told apart

    expected = {"both": {"jax": jax_drawn, "torch": jax_drawn}, "jax": {"jax": jax_drawn},
                "torch": {"torch": torch_drawn}}[framework]
    assert {name: run["losses"][0] for name, run in runs.items()} == pytest.approx(
        expected, rel=1e-12)


def test_a_sample_is_the_same_from_either_framework_with_the_same_weights():
    with jax.enable_x64(True):
        jax_model = char_jax.build_model("lstm", 16, 1)
        params = char_jax.init(jax_model, seed=0, dtype="float64")
        from_jax = char_lm.sample(char_jax.sampler(jax_model, params), "def ", 40,
                                  temperature=0.7, seed=5)
    torch_model = char_torch.build_model("lstm", 16, 1, seed=0, dtype="float64",
                                         params=params)
    from_torch = char_lm.sample(char_torch.sampler(torch_model), "def ", 40, temperature=0.7,
                                seed=5)
    assert from_jax == from_torch
    assert from_jax.startswith("def ") and len(from_jax) == 44
    assert char_lm.sample(char_torch.sampler(torch_model), "def ", 40, temperature=0.7,
                          seed=6) != from_torch


def test_the_script_runs_small_and_passes(capsys):
    status = script.main(["--hidden", "16", "--k1", "5", "--batch", "4", "--chars", "1000",
                          "--updates-per-call", "4", "--lr", "1e-2", "--sample-length", "20"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "jax loss" in out and "torch loss" in out and "bits/char" in out
    assert "4 streams x 240 steps, vocabulary 97, 12 calls x 4 updates = 48 updates" in out
    assert "OK: the two frameworks trained the same model" in out
    assert "wrote" not in out  # the script writes files only when given --out


SMALL_RUN = ["--hidden", "16", "--k1", "5", "--batch", "4", "--chars", "1000",
             "--updates-per-call", "4", "--lr", "1e-2", "--sample-length", "0"]


def test_the_script_fails_when_one_framework_drops_a_weight(monkeypatch, capsys):
    """The gate's first purpose: a port that does not compute the same function exits 1
    with the message that says so. Here the JAX side loses torch's second bias, a mistake
    ports make (torch's cells have two biases, most JAX cells one)."""
    train = char_jax.train

    def without_the_second_bias(model, params, *args, **kwargs):
        params = {**params, "rnn.bias_hh_l0": np.zeros_like(params["rnn.bias_hh_l0"])}
        return train(model, params, *args, **kwargs)

    monkeypatch.setattr(char_jax, "train", without_the_second_bias)
    status = script.main(SMALL_RUN)
    captured = capsys.readouterr()
    assert status == 1, captured.out
    assert "FAIL: the frameworks' losses differ by more than the tolerance" in captured.err
    assert "OK: the two frameworks" not in captured.out


def test_the_script_fails_when_jax_restarts_every_call_from_a_zero_carry(monkeypatch,
                                                                        capsys):
    """The gate's second purpose, the classic streaming mistake: each call of one
    framework starts from the zero carry instead of the carry the last call returned. The
    first call agrees; the first update of the second call does not."""
    train_step = char_jax.tbptt_jax.tbptt_train_step

    def from_a_zero_carry(params, opt_state, carry, xs, ys, **kwargs):
        return train_step(params, opt_state, None, xs, ys, **kwargs)

    monkeypatch.setattr(char_jax.tbptt_jax, "tbptt_train_step", from_a_zero_carry)
    status = script.main(SMALL_RUN)
    captured = capsys.readouterr()
    assert status == 1, captured.out
    assert "FAIL: the frameworks' losses differ by more than the tolerance" in captured.err
    assert "updates 1-48: largest rel diff" in captured.out
    first_call = [line for line in captured.out.splitlines() if line.startswith("     1 ")]
    assert first_call and float(first_call[0].split()[4]) < 1e-4  # rel diff, update 1
