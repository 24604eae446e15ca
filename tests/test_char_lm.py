"""The main job (`examples/char_lm.py`), run small: the data it builds, and both frameworks
training the same model from the same weights, agreeing and learning."""

import numpy as np
import pytest
import torch

import tbptt_jax
import tbptt_torch
from examples import char_lm


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Under `pytest -n 2` on two cores, torch's per-core OpenMP threads oversubscribe the
    machine and its small ops wait on each other (we saw 100x slower); one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_streams_are_contiguous_slices_of_the_text_time_major():
    codes = char_lm.encode(char_lm.load_corpus(3 * 11).text)
    inputs, targets = char_lm.make_streams(codes, batch_size=3, steps=10)
    assert inputs.shape == targets.shape == (10, 3)
    for b in range(3):
        np.testing.assert_array_equal(inputs[:, b], codes[b * 11:b * 11 + 10])
        np.testing.assert_array_equal(targets[:, b], codes[b * 11 + 1:b * 11 + 11])


def test_characters_outside_printable_ascii_share_one_code():
    codes = char_lm.encode("a\tb\u00e9\n")
    assert codes.tolist() == [char_lm.CODES["a"], char_lm.OTHER, char_lm.CODES["b"],
                              char_lm.OTHER, char_lm.CODES["\n"]]
    assert char_lm.decode(codes) == f"a{char_lm.OTHER_SHOWN_AS}b{char_lm.OTHER_SHOWN_AS}\n"


def test_jax_and_torch_streams_train_the_same_model_and_learn():
    batch, steps, k1, k2 = 4, 200, 10, 15
    codes = char_lm.encode(char_lm.load_corpus(batch * (steps + 1)).text)
    inputs, targets = char_lm.make_streams(codes, batch, steps)
    torch.manual_seed(0)
    torch_model = tbptt_torch.models.LSTMModel(char_lm.VOCAB_SIZE, 16, char_lm.VOCAB_SIZE)
    jax_model = tbptt_jax.models.lstm(char_lm.VOCAB_SIZE, 16, char_lm.VOCAB_SIZE)
    # Four calls of 50 steps each: the OverlapCarry (k2 > k1) travels between them.
    train = dict(k1=k1, k2=k2, segment_length=50, lr=1e-2)

    _, jax_run = char_lm.train_jax(jax_model, tbptt_torch.to_jax(torch_model), inputs,
                                   targets, **train)
    torch_run = char_lm.train_torch(torch_model, inputs, targets, **train)

    assert jax_run.losses.shape == torch_run.losses.shape == (steps // k1,)
    assert len(jax_run.seconds) == len(torch_run.seconds) == 4
    np.testing.assert_allclose(jax_run.losses, torch_run.losses, rtol=1e-5)
    assert jax_run.losses[-5:].mean() < jax_run.losses[:5].mean() - 0.5


def test_main_runs_small_and_passes(capsys):
    status = char_lm.main(["--hidden", "16", "--k1", "5", "--batch", "4", "--chars", "1000",
                           "--updates-per-call", "4", "--lr", "1e-2", "--sample-length", "20"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "jax loss" in out and "torch loss" in out and "bits/char" in out
    assert "OK: the two frameworks trained the same model" in out
