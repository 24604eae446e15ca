"""The framework-free update plan, `tbptt.plan`, against SPEC §1.

Property tests draw many (T, k1, k2, tail, history) and check each rule of the plan: how
many updates, which loss steps each owns, where its window starts, where its carry is handed
on, where the returned carry stands, and how `runs()` groups updates for `lax.scan`.
Worked examples spell the positions out as literal tuples, and bad arguments must raise a
`ValueError` naming the argument with its expected and actual value.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tbptt import REDUCTIONS, TAILS, check_choice, check_k, plan


@st.composite
def plan_arguments(draw: st.DrawFn) -> tuple[int, int, int, str, int]:
    k1 = draw(st.integers(1, 9))
    k2 = draw(st.integers(k1, k1 + 9))
    length = draw(st.integers(1, 60))
    tail = draw(st.sampled_from(TAILS))
    history = draw(st.integers(0, k2 - k1))
    return length, k1, k2, tail, history


def positions(schedule) -> list[tuple[int, int, int, int]]:
    """(window_start, loss_start, loss_stop, handoff) of every update."""
    return [(u.window_start, u.loss_start, u.loss_stop, u.handoff) for u in schedule.updates]


@given(plan_arguments())
def test_number_of_updates_is_ceil_for_partial_and_floor_for_drop(args):
    length, k1, k2, tail, history = args
    schedule = plan(length, k1, k2, tail=tail, history=history)
    expected = math.ceil(length / k1) if tail == "partial" else math.floor(length / k1)
    assert len(schedule.updates) == expected
    assert [u.index for u in schedule.updates] == list(range(expected))
    assert (schedule.k1, schedule.k2, schedule.tail) == (k1, k2, tail)
    assert (schedule.history, schedule.length, schedule.total) == (
        history, length, history + length)


@given(plan_arguments())
def test_loss_spans_partition_the_new_steps_in_order(args):
    length, k1, k2, tail, history = args
    schedule = plan(length, k1, k2, tail=tail, history=history)
    trained = length if tail == "partial" else (length // k1) * k1
    owned = [t for u in schedule.updates for t in range(u.loss_start, u.loss_stop)]
    # In order, without gaps or repeats: exactly the trained steps after the history.
    assert owned == list(range(history, history + trained))
    for u in schedule.updates:
        assert u.loss_start == history + u.index * k1
        assert u.loss_length == u.loss_stop - u.loss_start
    lengths = [u.loss_length for u in schedule.updates]
    if lengths:
        assert all(n == k1 for n in lengths[:-1])
        assert 1 <= lengths[-1] <= k1
        assert lengths[-1] == (k1 if tail == "drop" or length % k1 == 0 else length % k1)


@given(plan_arguments())
def test_window_starts_k2_minus_k1_before_the_loss_but_never_before_step_0(args):
    length, k1, k2, tail, history = args
    schedule = plan(length, k1, k2, tail=tail, history=history)
    for u in schedule.updates:
        assert u.window_start == max(0, u.loss_start - (k2 - k1))
        assert u.overlap == u.loss_start - u.window_start
        assert u.window_length == u.loss_stop - u.window_start
        assert u.window_length <= k2
        assert u.window_start <= u.handoff <= u.loss_stop
        assert u.window_start <= u.loss_start < u.loss_stop
        assert u.shape == (u.window_length, u.overlap, u.handoff - u.window_start)


@given(plan_arguments())
def test_handoff_is_the_next_window_start_and_the_final_carry_follows(args):
    length, k1, k2, tail, history = args
    schedule = plan(length, k1, k2, tail=tail, history=history)
    updates = schedule.updates
    for before, after in zip(updates[:-1], updates[1:], strict=True):
        assert before.handoff == after.window_start
    for u in updates:
        assert u.handoff == max(0, u.loss_stop - (k2 - k1))
    assert schedule.final_carry_at == max(0, history + length - (k2 - k1))
    assert schedule.carry_after_updates == (updates[-1].handoff if updates else 0)
    assert schedule.carry_after_updates <= schedule.final_carry_at <= schedule.total
    # What is returned beside the carry is a valid history for the next call.
    assert schedule.total - schedule.final_carry_at <= k2 - k1


@given(plan_arguments())
def test_runs_group_consecutive_updates_of_equal_shape(args):
    length, k1, k2, tail, history = args
    schedule = plan(length, k1, k2, tail=tail, history=history)
    runs = schedule.runs()
    assert [u for run in runs for u in run] == list(schedule.updates)
    for run in runs:
        assert len(run) >= 1
        assert len({u.shape for u in run}) == 1
        starts = [u.loss_start for u in run]
        assert starts == list(range(starts[0], starts[0] + k1 * len(run), k1))
    # Maximal: two neighbouring runs never share a shape.
    for before, after in zip(runs[:-1], runs[1:], strict=True):
        assert before[-1].shape != after[0].shape


@given(plan_arguments(), st.integers(1, 6), st.integers(1, 40))
def test_two_consecutive_calls_plan_what_one_call_plans(args, chunks, rest):
    """Streaming at the schedule level: a first call of a multiple of k1 steps, then a second
    one from the history it leaves, give the updates of one call over both (SPEC §1)."""
    _, k1, k2, tail, history = args
    first_length = chunks * k1
    first = plan(first_length, k1, k2, tail=tail, history=history)
    second = plan(rest, k1, k2, tail=tail, history=first.total - first.final_carry_at)
    whole = plan(first_length + rest, k1, k2, tail=tail, history=history)
    offset = first.final_carry_at
    shifted = [(s + offset, a + offset, b + offset, h + offset)
               for s, a, b, h in positions(second)]
    assert positions(first) + shifted == positions(whole)
    assert second.final_carry_at + offset == whole.final_carry_at


def test_worked_example_t10_k1_3_k2_5():
    """SPEC §1: a_u = (u-1)*k1, b_u = min(u*k1, T), s_u = max(0, a_u - (k2 - k1))."""
    partial = plan(10, 3, 5)
    assert positions(partial) == [(0, 0, 3, 1), (1, 3, 6, 4), (4, 6, 9, 7), (7, 9, 10, 8)]
    assert [u.shape for u in partial.updates] == [(3, 0, 1), (5, 2, 3), (5, 2, 3), (3, 2, 1)]
    assert [[u.index for u in run] for run in partial.runs()] == [[0], [1, 2], [3]]
    assert (partial.carry_after_updates, partial.final_carry_at) == (8, 8)

    drop = plan(10, 3, 5, tail="drop")
    assert positions(drop) == [(0, 0, 3, 1), (1, 3, 6, 4), (4, 6, 9, 7)]
    # The untrained step 9 still advances the carry, from 7 to 8.
    assert (drop.carry_after_updates, drop.final_carry_at) == (7, 8)


def test_worked_example_t7_k1_k2_2():
    partial = plan(7, 2)
    assert positions(partial) == [(0, 0, 2, 2), (2, 2, 4, 4), (4, 4, 6, 6), (6, 6, 7, 7)]
    assert [[u.index for u in run] for run in partial.runs()] == [[0, 1, 2], [3]]
    assert (partial.k2, partial.final_carry_at) == (2, 7)

    drop = plan(7, 2, tail="drop")
    assert positions(drop) == [(0, 0, 2, 2), (2, 2, 4, 4), (4, 4, 6, 6)]
    assert (drop.carry_after_updates, drop.final_carry_at) == (6, 7)


def test_worked_example_with_history():
    """T=6 new steps after 3 steps of history (k1=2, k2=5): positions count from the
    history's start, and the first window reaches back over it."""
    schedule = plan(6, 2, 5, history=3)
    assert positions(schedule) == [(0, 3, 5, 2), (2, 5, 7, 4), (4, 7, 9, 6)]
    assert (schedule.total, schedule.final_carry_at) == (9, 6)


def test_a_sequence_shorter_than_k1():
    assert positions(plan(2, 5, 7)) == [(0, 0, 2, 0)]
    drop = plan(2, 5, 7, tail="drop")
    assert (drop.updates, drop.runs(), drop.carry_after_updates, drop.final_carry_at) == (
        (), (), 0, 0)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3", None])
def test_check_k_rejects_a_k1_that_is_not_a_positive_int(value):
    with pytest.raises(ValueError, match=re.escape(f"k1 must be a positive int, got {value!r}")):
        check_k(value, 3)
    with pytest.raises(ValueError, match=re.escape(f"k1 must be a positive int, got {value!r}")):
        plan(10, value, 3)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_check_k_rejects_a_k2_that_is_not_a_positive_int(value):
    with pytest.raises(ValueError, match=re.escape(f"k2 must be a positive int, got {value!r}")):
        check_k(1, value)
    with pytest.raises(ValueError, match=re.escape(f"k2 must be a positive int, got {value!r}")):
        plan(10, 1, value)


def test_check_k_rejects_k2_below_k1_and_defaults_k2_to_k1():
    with pytest.raises(ValueError, match=re.escape("k2 must be >= k1 (k1=3), got k2=2")):
        check_k(3, 2)
    with pytest.raises(ValueError, match=re.escape("k2 must be >= k1 (k1=3), got k2=2")):
        plan(10, 3, 2)
    assert check_k(4) == (4, 4)
    assert check_k(2, 7) == (2, 7)


@pytest.mark.parametrize("length", [0, -3, 2.5, True, "10"])
def test_plan_rejects_a_length_that_is_not_a_positive_int(length):
    with pytest.raises(ValueError, match=re.escape(
            f"the sequence length T must be a positive int, got {length!r}")):
        plan(length, 2)


@pytest.mark.parametrize(("history", "message"), [
    (-1, "history must be an int >= 0, got -1"),
    (1.5, "history must be an int >= 0, got 1.5"),
    (True, "history must be an int >= 0, got True"),
    (3, "history must be in [0, k2 - k1 = 2], got 3"),
])
def test_plan_rejects_a_history_that_is_not_an_overlap_length(history, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(10, 3, 5, history=history)


def test_plan_rejects_an_unknown_tail():
    with pytest.raises(ValueError, match=re.escape(
            "tail must be one of ('partial', 'drop'), got 'keep'")):
        plan(10, 3, tail="keep")


def test_check_choice_names_the_argument_and_the_choices():
    check_choice("reduction", "sum", REDUCTIONS)
    with pytest.raises(ValueError, match=re.escape(
            "reduction must be one of ('mean', 'sum'), got 'avg'")):
        check_choice("reduction", "avg", REDUCTIONS)
