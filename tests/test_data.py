"""The long-stream data helpers of `tbptt.data`, in numbers: `batchify` and
`next_step_pairs` against word_language_model's own `batchify` and `get_batch`; `segments`
rejoining to the whole; resets from episode ids, across a segment border too; a padded batch
trained with its mask against each sequence trained alone; and every bad input a ValueError
naming its argument."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import tbptt_torch
from tbptt import batchify, next_step_pairs, pad_batch, resets_from_episodes, segments
from tests.fixtures import word_language_model


def upstream_batchify(data, bsz):
    # word_language_model/main.py's batchify (pytorch/examples, BSD-3-Clause, see
    # tests/fixtures/word_language_model.py), without its `.to(device)`.
    nbatch = data.size(0) // bsz
    data = data.narrow(0, 0, nbatch * bsz)
    data = data.view(bsz, -1).t().contiguous()
    return data


def test_batchify_equals_word_language_models_batchify():
    stream = np.arange(23)  # 23 = 4 * 5 + 3: the last 3 tokens are dropped
    batch = batchify(stream, 4)
    np.testing.assert_array_equal(batch, upstream_batchify(torch.arange(23), 4).numpy())
    np.testing.assert_array_equal(batch[:, 1], [5, 6, 7, 8, 9])  # stream 1: the second fifth
    assert batch.shape == (5, 4)


def test_batchify_keeps_feature_axes():
    stream = np.arange(26).reshape(13, 2)
    batch = batchify(stream, 3)
    assert batch.shape == (4, 3, 2)
    np.testing.assert_array_equal(batch[:, 2], stream[8:12])
    np.testing.assert_array_equal(batch[1, 0], [2, 3])


def test_next_step_pairs_are_word_language_models_batches_joined(monkeypatch):
    source = upstream_batchify(torch.arange(47), 3)  # [15, 3]
    xs, ys = next_step_pairs(source.numpy())
    monkeypatch.setattr(word_language_model.args, "bptt", 4)
    pieces = [word_language_model.get_batch(source, i) for i in range(0, len(source) - 1, 4)]
    np.testing.assert_array_equal(xs, torch.cat([data for data, _ in pieces]).numpy())
    np.testing.assert_array_equal(ys.reshape(-1),
                                  torch.cat([target for _, target in pieces]).numpy())
    assert xs.shape == ys.shape == (14, 3)
    np.testing.assert_array_equal(ys[:-1], xs[1:])


def test_segments_cut_in_order_the_last_shorter():
    xs, ys = np.arange(22).reshape(11, 2), np.arange(11)
    pieces = list(segments(xs, ys, length=4))
    assert [piece[0].shape[0] for piece in pieces] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in pieces]), xs)
    np.testing.assert_array_equal(pieces[2][1], [8, 9, 10])


def test_resets_mark_where_the_episode_changes():
    ids = np.array([[0, 5], [0, 5], [1, 5], [1, 6], [2, 6]])
    np.testing.assert_array_equal(resets_from_episodes(ids), [
        [False, False], [False, False], [True, False], [False, True], [True, False]])
    assert resets_from_episodes(ids, at_start=True)[0].tolist() == [True, True]
    # The next segment of the stream: sequence 0 starts episode 3 on its first step.
    later = np.array([[3, 6], [3, 6]])
    assert resets_from_episodes(later, previous=ids[-1]).tolist() == [[True, False],
                                                                      [False, False]]


def test_pad_batch_stacks_time_major_with_its_mask():
    batch, mask = pad_batch([np.array([1, 2, 3]), np.array([4]), np.array([5, 6])],
                            pad_value=-1)
    np.testing.assert_array_equal(batch, [[1, 4, 5], [2, -1, 6], [3, -1, -1]])
    np.testing.assert_array_equal(mask, [[True, True, True], [True, False, True],
                                         [True, False, False]])
    features, _ = pad_batch([np.ones((2, 3)), np.ones((1, 3))])
    assert features.shape == (2, 2, 3) and features[1, 1].tolist() == [0, 0, 0]


def test_a_padded_batch_trained_with_its_mask_is_each_sequence_trained_alone():
    # reduction="sum", one update over the whole batch: its loss is the sum of each
    # sequence's alone, its gradient the sum of theirs, so one SGD step moves the
    # parameters by -lr times that sum.
    rng = np.random.default_rng(0)
    lengths = (7, 3, 5)
    inputs = [rng.normal(size=(n, 2)) for n in lengths]
    targets = [rng.normal(size=(n, 1)) for n in lengths]
    torch.manual_seed(0)
    model = tbptt_torch.models.GRUModel(2, 4, 1).double()
    start = copy.deepcopy(model.state_dict())

    def train(xs: np.ndarray, ys: np.ndarray, mask: np.ndarray | None = None
              ) -> tuple[float, dict[str, np.ndarray]]:
        model.load_state_dict(start)
        _, losses = tbptt_torch.tbptt_train_step(
            model, torch.optim.SGD(model.parameters(), lr=0.1), None, torch.from_numpy(xs),
            torch.from_numpy(ys), loss_fn=tbptt_torch.losses.mse, k1=xs.shape[0],
            reduction="sum", mask=None if mask is None else torch.from_numpy(mask))
        return losses.item(), {name: (start[name] - value).numpy() / 0.1
                               for name, value in model.state_dict().items()}

    alone = [train(x[:, None], y[:, None]) for x, y in zip(inputs, targets, strict=True)]
    xs, mask = pad_batch(inputs)
    ys, _ = pad_batch(targets, pad_value=100.0)  # a padded target that would count, if read
    loss, step = train(xs, ys, mask)
    np.testing.assert_allclose(loss, sum(each for each, _ in alone), rtol=1e-12)
    for name, value in step.items():
        np.testing.assert_allclose(value, sum(grads[name] for _, grads in alone), rtol=1e-9,
                                   atol=1e-12, err_msg=name)
    unmasked, _ = train(xs, ys)
    assert unmasked > loss + 1e4  # without the mask the padding's targets of 100 count


@pytest.mark.parametrize(("call", "message"), [
    (lambda: batchify(np.arange(3), 4), "stream must hold at least batch_size=4 items, got 3"),
    (lambda: batchify(np.arange(8), 0), "batch_size must be a positive int, got 0"),
    (lambda: batchify(np.float64(3.0), 1), "stream must have at least 1 axes, got shape ()"),
    (lambda: next_step_pairs(np.zeros((1, 4))),
     "batch must have at least 2 steps to pair each with the next, got shape (1, 4)"),
    (lambda: next_step_pairs(np.zeros(5)), "batch must have at least 2 axes, got shape (5,)"),
    (lambda: list(segments(np.zeros(5), length=0)), "length must be a positive int, got 0"),
    (lambda: list(segments(np.zeros(5), np.zeros(4), length=2)),
     "arrays must all have the same number of steps T, got shapes [(5,), (4,)]"),
    (lambda: resets_from_episodes(np.zeros(5)),
     "episode_ids must have 2 axes, got shape (5,)"),
    (lambda: resets_from_episodes(np.zeros((2, 3)), previous=np.zeros(2)),
     "previous must have shape [B] = [3], got [2]"),
    (lambda: resets_from_episodes(np.zeros((2, 3)), previous=np.zeros(3), at_start=True),
     "previous and at_start=True contradict each other"),
    (lambda: pad_batch([]), "sequences must hold at least one sequence, got none"),
    (lambda: pad_batch(np.zeros((2, 3))), "sequences must be a list of arrays [T_b, ...], got "
     "ndarray"),
    (lambda: pad_batch([np.zeros(2), np.zeros(0)]),
     "sequences[1] is empty: every sequence needs at least one step"),
    (lambda: pad_batch([np.zeros((2, 3)), np.zeros((2, 4))]),
     "sequences[1] must have trailing shape [3] and dtype float64 as sequences[0] has, got "
     "[4] and float64"),
    (lambda: pad_batch([np.zeros(2), np.zeros(2, np.int32)]),
     "sequences[1] must have trailing shape [] and dtype float64 as sequences[0] has, got "
     "[] and int32"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
