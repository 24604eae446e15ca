"""Argument checks both trainers share, so the two frameworks reject bad input alike.

Each check raises `ValueError` naming the argument, the value expected and the value given
(SPEC §4). They see Python values, shapes and, for class ids, numpy arrays, never a
framework's arrays.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

F = TypeVar("F", bound=Callable)

REDUCTIONS = ("mean", "sum")
TAILS = ("partial", "drop")
ON_NONFINITE = ("raise", "skip")


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """`value` as an int if it is an integer (a numpy one too, not a bool) >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_k(k1: object, k2: object = None) -> tuple[int, int]:
    """Validates k1 and k2 (k2 defaults to k1) and returns them as ints."""
    k1 = check_int("k1", k1)
    k2 = k1 if k2 is None else check_int("k2", k2)
    if k2 < k1:
        raise ValueError(f"k2 must be >= k1 (k1={k1}), got k2={k2}")
    return k1, k2


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_overlap(xs_shape: Sequence[int], resets_shape: Sequence[int] | None,
                  sequence_shape: Sequence[int], k1: int, k2: int, *, xs_dtype: str,
                  sequence_dtype: str, resets_dtype: str | None) -> None:
    """Checks an OverlapCarry's inputs `[n, B, ...]` and resets `[n, B]` against this call's
    xs `[T, B, ...]`: at most k2 - k1 steps, the same batch, features and dtype (dtypes as
    the framework names them), and bool resets."""
    steps, expected = xs_shape[0], [*sequence_shape[1:]]
    if steps > k2 - k1:
        raise ValueError(f"carry: an OverlapCarry holds at most k2 - k1 = {k2 - k1} steps, "
                         f"got {steps} (was it made with other k1, k2?)")
    if list(xs_shape[1:]) != expected:
        raise ValueError(f"carry: the OverlapCarry's xs must have shape {[steps, *expected]} "
                         f"(n steps, then the batch and features of xs), got {list(xs_shape)}")
    if xs_dtype != sequence_dtype:
        raise ValueError(f"carry: the OverlapCarry's xs must have the dtype of xs, "
                         f"{sequence_dtype}, got {xs_dtype}")
    if resets_shape is not None and (list(resets_shape) != [steps, expected[0]]
                                     or str(resets_dtype).removeprefix("torch.") != "bool"):
        raise ValueError(f"carry: the OverlapCarry's resets must be bool of shape "
                         f"{[steps, expected[0]]}, got {resets_dtype} of shape "
                         f"{list(resets_shape)}")


def check_param_shapes(expected: Mapping[str, Sequence[int]],
                       actual: Mapping[str, Sequence[int]], *, model: str = "",
                       hint: str = "") -> None:
    """Checks parameters, named as torch's `state_dict()` and given as `{name: shape}`,
    against the model's: the same keys and every shape, before anything is copied or
    trained. `model` (e.g. " for a one-layer lstm") follows the expected keys in the
    message, `hint` ends it."""
    missing = [name for name in expected if name not in actual]
    unexpected = [name for name in actual if name not in expected]
    if missing or unexpected:
        raise ValueError(f"params must have the keys {list(expected)}{model}; missing "
                         f"{missing}, unexpected {unexpected}{hint}")
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise ValueError(f"params[{name!r}] must have shape {tuple(shape)}, "
                             f"got {tuple(actual[name])}")


def check_sequences(xs: Mapping[str, Sequence[int]], ys: Mapping[str, Sequence[int]]
                    ) -> tuple[int, int]:
    """Checks time-major data and returns its `(T, B)`.

    `xs` and `ys` map each array's name to its shape: `{"xs": shape}` for one array, or
    every leaf's path for a structure (`{"xs['obs']": ..., "xs['flag']": ...}`). Every
    array must be `[T, B, ...]` with one T >= 1 and one B >= 1.
    """
    for group, arrays in (("xs", xs), ("ys", ys)):
        if not arrays:
            raise ValueError(f"{group} must hold at least one [T, B, ...] array, got none")
    arrays = {**xs, **ys}
    if any(len(shape) < 2 for shape in arrays.values()):
        described = " and ".join(f"{name} of shape {tuple(shape)}"
                                 for name, shape in arrays.items())
        raise ValueError(f"xs and ys must be time-major [T, B, ...]; got {described}")
    (first, shape), *_ = xs.items()
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{first} must hold at least one step of one sequence, got shape "
                         f"{tuple(shape)}")
    expected = tuple(shape[:2])
    for name, other in arrays.items():
        if tuple(other[:2]) != expected:
            raise ValueError(f"{name} must have the [T, B] of {first}, expected {expected}, "
                             f"got {tuple(other[:2])}")
    return expected


def check_resets(shape: Sequence[int], dtype: str, is_bool: bool,
                 sequence: tuple[int, int]) -> None:
    """`resets` must be bool `[T, B]`; `dtype` is how the framework names its dtype."""
    if tuple(shape) != tuple(sequence) or not is_bool:
        raise ValueError(f"resets must be bool of shape [T, B] = {tuple(sequence)}, got "
                         f"{dtype} of shape {tuple(shape)}")


def check_mask(shape: Sequence[int], dtype: str, is_weight_type: bool,
               sequence: tuple[int, int]) -> None:
    """`mask` must be `[T, B]`, bool or float weights; `dtype` as the framework names it."""
    if tuple(shape) != tuple(sequence) or not is_weight_type:
        raise ValueError(f"mask must be bool or float weights of shape [T, B] = "
                         f"{tuple(sequence)}, got {dtype} of shape {tuple(shape)}")


def check_mask_weights(first_bad: tuple[int, int] | None, value: float) -> None:
    """A mask's weights must be finite and >= 0 (SPEC §1); `first_bad` is the `(t, b)` of
    the first that is not, None if all are. A negative weight would make a "mean" divide
    by a sum that may be 0 or negative; a NaN one would stop the update as a NaN loss."""
    if first_bad is not None:
        raise ValueError(f"mask must hold finite weights >= 0, got {value} at [t, b] = "
                         f"{first_bad}")


def check_carry(expected: object, got: object, batch_size: int) -> None:
    """A carry, described leaf by leaf as `dtype[shape]` in its structure, must be the one
    the model declares for this batch size."""
    if got != expected:
        raise ValueError(f"carry must match the model and batch size {batch_size}: expected "
                         f"{expected}, got {got}")


def flattened_preds(name: str, shape: Sequence[int], steps: int, batch: int) -> bool:
    """Whether a prediction of `shape`, from a model call over `steps` steps of `batch`
    sequences, is flattened time-major, `[steps * batch, ...]` (as `.view(-1, V)` makes of
    `[steps, batch, V]`, e.g. word_language_model's `RNNModel`), rather than `[steps,
    batch, ...]`. A trainer cutting a window's predictions to its loss steps must know.
    With one sequence the two read alike, and it says False."""
    if len(shape) >= 1 and shape[0] == steps:
        return False
    if len(shape) >= 1 and shape[0] == steps * batch:
        return True
    raise ValueError(f"{name} must be [t, B, ...], or [t * B, ...] flattened time-major, for "
                     f"a model call over t = {steps} steps of B = {batch} sequences; got "
                     f"shape {tuple(shape)}")


def not_arrays(name: str, leaf: object, path: str, *, alternative: str = "") -> ValueError:
    """The error for `name` holding something other than arrays: `leaf` at `path`."""
    return ValueError(f"{name} must be arrays (numpy or the framework's) in tuples, lists or "
                      f"dicts{alternative}; got {type(leaf).__name__} at {name}{path}")


def check_callable(name: str, value: object, signature: str, *, optional: bool = False
                   ) -> None:
    if not callable(value) and not (optional and value is None):
        raise ValueError(f"{name} must be callable {signature}{' or None' if optional else ''}, "
                         f"got {type(value).__name__}")


def check_losses(shape: Sequence[int] | None, got: str, steps: int, batch: int) -> None:
    """`loss_fn` must return a `[t, b]` array for `steps` steps; `shape` is what it returned
    (None for something without one, described by `got`)."""
    expected = (steps, batch)
    if shape is None or tuple(shape) != expected:
        raise ValueError(f"loss_fn must return per-step, per-sequence losses [t, b], expected "
                         f"shape {expected} for {_steps(steps)}, got "
                         f"{got if shape is None else tuple(shape)}")


def loss_fails(ys: str, preds: str, steps: int, error: Exception) -> ValueError:
    """The error for a `loss_fn` that fails on the targets and the model's predictions for
    `steps` steps (each described as the frameworks describe them), quoting its error."""
    return ValueError(f"ys of shape {ys} does not fit loss_fn with the model's predictions of "
                      f"shape {preds} for {_steps(steps)}: {error}")


def _steps(steps: int) -> str:
    return "1 step" if steps == 1 else f"{steps} steps"


def model_fails(carry: object, xs: str, error: Exception) -> ValueError:
    """The error for a model that cannot run on the carry and xs it was given (described as
    the frameworks describe them: xs by its shape), quoting what the model raised."""
    return ValueError(f"the model fails on the carry {carry} and xs of shape {xs}: {error}")


def check_float_dtypes(params: set[str], carry: set[str], xs: set[str], *, hint: str = ""
                       ) -> None:
    """The parameters, the carry and floating inputs must compute in one floating dtype
    (each set holds the dtypes of one's floating leaves; integer inputs such as token ids
    take no part). One message names all three, so a mismatch is found in one look."""
    if len(params | carry | xs) <= 1:
        return
    def name(dtypes: set[str]) -> str:
        return "/".join(sorted(dtypes)) or "none"
    raise ValueError(f"params, carry and xs must share one floating-point dtype; got params "
                     f"{name(params)}, carry {name(carry)}, xs {name(xs)}{hint}")


def takes_class_ids(loss_fn: F, class_axis: int = -1) -> F:
    """Declares that `loss_fn(preds, targets)` reads its targets as integer class ids
    counting along axis `class_axis` of `preds`, and returns it (a decorator, too).

    Both trainers' one-call forms then check the targets of a call before training on
    it (`check_class_ids`). The library's `cross_entropy` and `nll` declare
    `class_axis=-1`; the declaration is the attribute `loss_fn.class_axis`.
    """
    loss_fn.class_axis = _check_axis("class_axis", class_axis)  # type: ignore[attr-defined]
    return loss_fn


def _check_axis(name: str, axis: object) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise ValueError(f"{name} must be an int (an axis of the predictions), got {axis!r}")
    return int(axis)


def declared_class_axis(loss_fn: object) -> int | None:
    """The `class_axis` a loss declares (`takes_class_ids`), or None if it declares none."""
    class_axis = getattr(loss_fn, "class_axis", None)
    if class_axis is None:
        return None
    return _check_axis("loss_fn.class_axis", class_axis)


def class_count(preds_shape: Sequence[int], class_axis: int) -> int:
    """How many classes predictions of `preds_shape` score along `class_axis`."""
    if not -len(preds_shape) <= class_axis < len(preds_shape):
        raise ValueError(f"loss_fn.class_axis must be an axis of the model's predictions, of "
                         f"shape {tuple(preds_shape)}, got {class_axis}")
    return int(preds_shape[class_axis])


def check_class_ids(name: str, ids: np.ndarray, classes: int,
                    counted: np.ndarray | None = None) -> None:
    """Class ids `[T, B, ...]` must be integers in `[0, classes)`; `counted` (bool `[T, B]`,
    or None for all) leaves out terms a mask weighs 0, whose targets are never read.

    The message names the first id outside the range, its position, and how many more
    there are. Costs a min and a max over `ids` when they are in range.
    """
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer class ids for a loss_fn that takes class "
                         f"ids (loss_fn.class_axis), got {ids.dtype}")
    if counted is not None:
        counted = counted.reshape(counted.shape + (1,) * (ids.ndim - counted.ndim))
        ids = np.where(counted, ids, 0)
    if ids.size == 0 or (ids.min() >= 0 and ids.max() < classes):
        return
    outside = (ids < 0) | (ids >= classes)
    position = tuple(int(i) for i in np.unravel_index(np.argmax(outside), ids.shape))
    more = int(outside.sum()) - 1
    others = f"; {more} more {'is' if more == 1 else 'are'} outside it" if more else ""
    raise ValueError(f"{name} must be class ids in [0, {classes}) (the classes the model "
                     f"predicts), got {int(ids[position])} at {name}{list(position)} (step "
                     f"t={position[0]} of sequence b={position[1]}){others}")
