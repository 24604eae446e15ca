"""Long-stream data helpers, framework-free (numpy): from raw sequences to the time-major
`[T, B, ...]` arrays both trainers take.

`batchify` cuts one long stream into B contiguous streams, as pytorch/examples'
word_language_model does; `next_step_pairs` makes a language model's inputs and targets of
them; `segments` feeds them to a trainer a few updates at a time (a stream, each call
continuing from the carry the last returned); `resets_from_episodes` marks where an episode
starts; `pad_batch` stacks variable-length sequences with the mask that leaves the padding
out of the loss. Every function checks its input and raises a `ValueError` naming the
argument, the expected and the actual value.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tbptt.checks import check_int


def batchify(stream: Any, batch_size: int) -> np.ndarray:
    """Cuts `stream` `[N, ...]` into `batch_size` contiguous streams, time-major.

    Stream b is the b-th of `batch_size` equal slices of `stream`; the last
    `N % batch_size` items are dropped, as word_language_model's `batchify` drops them.

    Returns:
      `[N // batch_size, batch_size, ...]`: `out[t, b] = stream[b * (N // batch_size) + t]`.
    """
    batch_size = check_int("batch_size", batch_size)
    stream = _array("stream", stream, min_ndim=1)
    steps = stream.shape[0] // batch_size
    if steps < 1:
        raise ValueError(f"stream must hold at least batch_size={batch_size} items, got "
                         f"{stream.shape[0]}")
    streams = stream[:steps * batch_size].reshape(batch_size, steps, *stream.shape[1:])
    return streams.swapaxes(0, 1)


def next_step_pairs(batch: Any) -> tuple[np.ndarray, np.ndarray]:
    """`(xs, ys)` for next-step prediction from a time-major `batch` `[T, B, ...]`: each
    step's target is the next step's input, so both are `[T - 1, B, ...]`
    (`xs = batch[:-1]`, `ys = batch[1:]`, as word_language_model's `get_batch` pairs them)."""
    batch = _array("batch", batch, min_ndim=2)
    if batch.shape[0] < 2:
        raise ValueError(f"batch must have at least 2 steps to pair each with the next, got "
                         f"shape {batch.shape}")
    return batch[:-1], batch[1:]


def segments(*arrays: Any, length: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Consecutive pieces of `length` steps of time-major `arrays` (all `[T, ...]`, the same
    T), one tuple of pieces per trainer call; the last piece may be shorter.

    For a stream with k2 > k1, `length` must be a multiple of k1 for the calls to train as
    one call over the whole would (SPEC §1, Streaming).
    """
    length = check_int("length", length)
    if not arrays:
        raise ValueError("segments needs at least one array, got none")
    arrays = tuple(_array(f"arrays[{i}]", array, min_ndim=1) for i, array in enumerate(arrays))
    steps = {array.shape[0] for array in arrays}
    if len(steps) > 1:
        raise ValueError(f"arrays must all have the same number of steps T, got shapes "
                         f"{[array.shape for array in arrays]}")
    for start in range(0, arrays[0].shape[0], length):
        yield tuple(array[start:start + length] for array in arrays)


def resets_from_episodes(episode_ids: Any, *, at_start: bool = False,
                         previous: Any = None) -> np.ndarray:
    """The trainers' `resets` `[T, B]` from the episode id of every step `[T, B]`: True
    where a sequence's id differs from its id one step before.

    Args:
      episode_ids: `[T, B]`, any dtype with `!=` (ints, strings).
      at_start: also mark step 0 of every sequence (a fresh start; with the zero carry this
        changes nothing).
      previous: `[B]`, the ids of the step before step 0 (the last step of the previous
        segment of a stream), so that step 0 is marked where the episode changed across
        the segments' border. Not with `at_start`.
    """
    ids = _array("episode_ids", episode_ids, min_ndim=2, max_ndim=2)
    resets = np.zeros(ids.shape, dtype=bool)
    resets[1:] = ids[1:] != ids[:-1]
    if previous is not None:
        if at_start:
            raise ValueError("previous and at_start=True contradict each other: step 0 is "
                             "marked where the id changed from previous, or everywhere")
        previous = _array("previous", previous, min_ndim=1, max_ndim=1)
        if previous.shape != ids.shape[1:]:
            raise ValueError(f"previous must have shape [B] = {list(ids.shape[1:])}, got "
                             f"{list(previous.shape)}")
        resets[0] = ids[0] != previous
    elif at_start:
        resets[0] = True
    return resets


def pad_batch(sequences: Sequence[Any], *, pad_value: Any = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Stacks variable-length sequences time-major, padded at the end with `pad_value`.

    Args:
      sequences: B arrays `[T_b, ...]`, T_b >= 1, the same trailing shape and dtype.
      pad_value: what fills the steps after a sequence's end.

    Returns:
      `(batch, mask)`: `batch` `[T_max, B, ...]` and the bool `mask` `[T_max, B]`, True on
      the steps a sequence holds. With `mask=` the trainers leave the padded steps out of
      the loss and the gradient, so each sequence trains as it would alone (the padding
      comes after its end, so it cannot reach its earlier steps through the carry).
    """
    if isinstance(sequences, np.ndarray) or not isinstance(sequences, Sequence):
        raise ValueError(f"sequences must be a list of arrays [T_b, ...], got "
                         f"{type(sequences).__name__}")
    if not sequences:
        raise ValueError("sequences must hold at least one sequence, got none")
    arrays = [_array(f"sequences[{b}]", sequence, min_ndim=1)
              for b, sequence in enumerate(sequences)]
    first = arrays[0]
    for b, array in enumerate(arrays):
        if array.shape[0] == 0:
            raise ValueError(f"sequences[{b}] is empty: every sequence needs at least one step")
        if array.shape[1:] != first.shape[1:] or array.dtype != first.dtype:
            raise ValueError(f"sequences[{b}] must have trailing shape {list(first.shape[1:])} "
                             f"and dtype {first.dtype} as sequences[0] has, got "
                             f"{list(array.shape[1:])} and {array.dtype}")
    lengths = np.array([array.shape[0] for array in arrays])
    batch = np.full((lengths.max(), len(arrays), *first.shape[1:]), pad_value, first.dtype)
    for b, array in enumerate(arrays):
        batch[:lengths[b], b] = array
    mask = np.arange(lengths.max())[:, None] < lengths[None, :]
    return batch, mask


def _array(name: str, value: Any, *, min_ndim: int, max_ndim: int | None = None) -> np.ndarray:
    """`value` as a numpy array of `min_ndim` to `max_ndim` axes, else a ValueError."""
    try:
        array = np.asarray(value)
    except Exception as error:  # anything numpy cannot read as an array
        raise ValueError(f"{name} must be an array, got {type(value).__name__}") from error
    if array.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got one of Python objects (ragged "
                         f"or mixed values?)")
    if array.ndim < min_ndim or (max_ndim is not None and array.ndim > max_ndim):
        axes = (f"{min_ndim}" if max_ndim == min_ndim
                else f"at least {min_ndim}" if max_ndim is None else f"{min_ndim} to {max_ndim}")
        raise ValueError(f"{name} must have {axes} axes, got shape {array.shape}")
    return array
