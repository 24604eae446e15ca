"""Argument checks both trainers share, so the two frameworks reject bad input alike.

Each check raises `ValueError` naming the argument, the value expected and the value given
(SPEC §4). They see only Python values and shapes, never a framework's arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

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
                  sequence_shape: Sequence[int], k1: int, k2: int) -> None:
    """Checks an OverlapCarry's inputs `[n, B, ...]` and resets `[n, B]` against this call's
    xs `[T, B, ...]`: at most k2 - k1 steps, the same batch and features."""
    steps, expected = xs_shape[0], [*sequence_shape[1:]]
    if steps > k2 - k1:
        raise ValueError(f"carry: an OverlapCarry holds at most k2 - k1 = {k2 - k1} steps, "
                         f"got {steps} (was it made with other k1, k2?)")
    if list(xs_shape[1:]) != expected:
        raise ValueError(f"carry: the OverlapCarry's xs must have shape {[steps, *expected]} "
                         f"(n steps, then the batch and features of xs), got {list(xs_shape)}")
    if resets_shape is not None and list(resets_shape) != [steps, expected[0]]:
        raise ValueError(f"carry: the OverlapCarry's resets must have shape "
                         f"{[steps, expected[0]]}, got {list(resets_shape)}")


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


def nonfinite_cause(loss: float) -> str:
    """Says what was not finite in a skipped update, for error messages."""
    if not math.isfinite(loss):
        return f"a non-finite loss ({loss})"
    return f"a non-finite gradient (its loss, {loss}, is finite)"
