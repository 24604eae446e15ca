"""`tbptt_torch.audit` on correct loops of three shapes and on each classic mistake.

The loops come from examples/audit_loops.py (what docs/audit.md shows) and, so that the
audit is seen to judge behaviour rather than a familiar text, from this file: written in
other styles (zip over the steps, `model.zero_grad()`, `detach_()`, `torch.split`, a class
with a callback). Each verdict is checked by its numbers: the updates' end steps, the loss
weight of each update, the gradient difference to the reference, and for a wrong loop the
finding's kind and the update and time step where it first shows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import audit_loops as loops
from tbptt_cli.cli import main
from tbptt_torch.audit import RTOL, AuditError, Tbptt, audit

T, K = 22, 4  # the audit's defaults for k1 = 4: five whole chunks and a tail of 2
B = K + 1


def ends(verdict) -> list[int]:
    return [u.after_step for u in verdict.updates]


def finding(verdict, kind):
    found = [f for f in verdict.findings if f.kind == kind]
    assert found, f"no {kind!r} in {verdict.kinds}:\n{verdict}"
    return found[0]


# -- correct loops -------------------------------------------------------------------------

def test_per_step_loop_is_sum_drop():
    verdict = audit(loops.per_step_loop, k1=K, reduction="sum", tail="drop")
    assert verdict.correct, str(verdict)
    assert verdict.implements == Tbptt(K, K, "sum", "drop", "sum")
    assert ends(verdict) == [3, 7, 11, 15, 19]
    assert [u.weight for u in verdict.updates] == [1.0] * 5
    assert [u.window_start for u in verdict.updates] == [0, 4, 8, 12, 16]
    assert verdict.max_gradient_difference < RTOL


def test_per_chunk_loop_is_mean_partial_like_ignite():
    verdict = audit(loops.per_chunk_loop, k1=K, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert (verdict.implements.reduction, verdict.implements.tail) == ("mean", "partial")
    assert ends(verdict) == [3, 7, 11, 15, 19, 21]
    weights = [u.weight for u in verdict.updates]
    assert weights[:5] == pytest.approx([1 / (K * B)] * 5, rel=1e-12)
    assert weights[5] == pytest.approx(1 / (2 * B), rel=1e-12)  # the tail owns 2 steps
    assert verdict.max_gradient_difference < RTOL


def test_overlap_loop_is_k2_greater_than_k1():
    verdict = audit(loops.overlap_loop, k1=K, k2=7, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert (verdict.implements.k1, verdict.implements.k2) == (K, 7)
    # Each window starts k2 - k1 = 3 steps before the update's first loss step.
    assert [u.window_start for u in verdict.updates] == [0, 1, 5, 9, 13, 17]
    assert verdict.max_gradient_difference < RTOL


def test_without_intent_the_audit_reports_what_the_loop_implements():
    verdict = audit(loops.per_step_loop)
    assert verdict.correct, str(verdict)
    assert str(verdict.implements) == "TBPTT(k1=4, k2=4, reduction='sum', tail='drop')"
    assert "CORRECT" in str(verdict)


def zip_loop(model, optimizer, xs, ys, k):
    """Per step over zip(xs, ys), nn.MSELoss per step summed, model.zero_grad, detach_."""
    criterion = nn.MSELoss()
    state = model.initial_carry(xs.shape[1])
    model.zero_grad()
    total, count = None, 0
    for x, y in zip(xs, ys, strict=True):
        pred, state = model(x, state)
        term = criterion(pred, y)
        total = term if total is None else total + term
        count += 1
        if count == k:
            total.backward()
            optimizer.step()
            model.zero_grad()
            state.detach_()
            total, count = None, 0


class CallbackTrainer:
    """A trainer object with a callback per chunk, chunks from torch.split."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.state = model, optimizer, None

    def on_chunk(self, x, y):
        self.optimizer.zero_grad(set_to_none=False)
        preds, state = self.model(x, self.state)
        loss = ((preds - y) ** 2).mean()
        loss.backward()
        self.optimizer.step()
        self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else (
            state.detach())


def callback_loop(model, optimizer, xs, ys, k):
    trainer = CallbackTrainer(model, optimizer)
    for x, y in zip(torch.split(xs, k), torch.split(ys, k), strict=True):
        trainer.on_chunk(x, y)


@pytest.mark.parametrize(("loop", "cell", "implements"), [
    (zip_loop, "gru", "TBPTT(k1=4, k2=4, reduction='sum', tail='drop')"),
    (callback_loop, "elman", "TBPTT(k1=4, k2=4, reduction='mean', tail='partial')"),
], ids=["zip-steps-gru", "callback-chunks-elman"])
def test_loops_in_styles_the_examples_do_not_use(loop, cell, implements):
    verdict = audit(loop, cell=cell, num_layers=2)
    assert verdict.correct, str(verdict)
    assert str(verdict.implements) == implements
    assert verdict.max_gradient_difference < RTOL


def test_zip_loop_sums_steps_of_a_batch_mean():
    verdict = audit(zip_loop, cell="gru")
    assert verdict.implements.batch == "mean"
    assert [u.weight for u in verdict.updates] == pytest.approx([1 / B] * 5, rel=1e-12)


# -- each mistake ---------------------------------------------------------------------------

@pytest.mark.parametrize("loop", [loops.no_detach_loop, loops.retain_graph_loop],
                         ids=["no-detach", "retain-graph"])
def test_carry_never_detached(loop):
    verdict = audit(loop)
    assert not verdict.correct
    found = finding(verdict, "not_detached")
    assert (found.update, found.step) == (2, 4)
    assert "through every step since step 0 (4 steps before its chunk)" in found.message
    assert finding(verdict, "loop_raised").update == 2
    assert "detach() was called" not in found.message


def test_detach_result_discarded():
    verdict = audit(loops.discarded_detach_loop)
    found = finding(verdict, "not_detached")
    assert (found.update, found.step) == (2, 4)
    assert "detach() was called on that carry, but its result was not used" in found.message


def test_zero_grad_missing_accumulates_gradients():
    verdict = audit(loops.no_zero_grad_loop)
    assert verdict.kinds == ("gradients_accumulate",)
    assert finding(verdict, "gradients_accumulate").update == 2
    assert [u.accumulated for u in verdict.updates] == [False] + [True] * 5
    assert verdict.updates[0].gradient_difference < RTOL  # update 1 is still right
    assert verdict.updates[1].gradient_difference > 1e-3


def test_zero_grad_between_backward_and_step():
    verdict = audit(loops.zero_grad_before_step_loop)
    assert verdict.kinds == ("zero_grad_before_step",)
    assert (verdict.findings[0].update, verdict.findings[0].step) == (1, 3)
    assert verdict.updates == ()  # no step() applied a gradient


def test_loss_not_reset():
    verdict = audit(loops.loss_not_reset_loop)
    assert set(verdict.kinds) == {"loop_raised", "loss_not_reset"}
    assert finding(verdict, "loss_not_reset").update == 2
    assert "backward through the graph a second time" in verdict.error


def test_step_before_backward():
    verdict = audit(loops.step_before_backward_loop)
    found = finding(verdict, "step_before_backward")
    assert (found.update, found.step) == (1, 3)
    assert "never applied" in found.message


def lagging_loop(model, optimizer, xs, ys, k):
    """step() at the top of each chunk: every update one chunk late, the last one lost."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.step()
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        h = h[0].detach(), h[1].detach()


def step_then_backward_loop(model, optimizer, xs, ys, k):
    """step() between the forward and backward() of each chunk, zero_grad() after."""
    h = None
    for start in range(0, xs.shape[0], k):
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        optimizer.step()
        loss.backward()
        optimizer.zero_grad(set_to_none=False)
        h = h[0].detach(), h[1].detach()


def test_step_before_backward_in_other_shapes():
    lagging = audit(lagging_loop)
    found = finding(lagging, "step_before_backward")
    assert (found.update, found.step) == (1, 0)
    assert "comes before any backward()" in found.message
    # After the empty first step(), the loop applies chunk u's gradient at step() u + 1.
    assert ends(lagging) == [3, 7, 11, 15, 19]
    assert max(u.gradient_difference for u in lagging.updates) < RTOL
    crossed = audit(step_then_backward_loop)
    assert finding(crossed, "step_before_backward").update == 1


def test_truncation_shorter_than_k():
    verdict = audit(loops.detach_every_step_loop)
    found = finding(verdict, "truncation_too_short")
    assert (found.update, found.step) == (1, 3)
    assert "reaches back only to step 3" in found.message
    chunked = audit(loops.per_chunk_loop, k2=7)  # k2 = 7 meant, k2 = 4 done
    found = finding(chunked, "truncation_too_short")
    assert (found.update, found.step) == (2, 4)
    assert chunked.implements.k2 == K


def test_truncation_longer_than_k():
    verdict = audit(loops.window_too_long_loop)
    assert verdict.kinds == ("truncation_too_long",)
    assert (verdict.findings[0].update, verdict.findings[0].step) == (2, 4)
    assert verdict.implements.k2 == 2 * K
    assert verdict.updates[0].gradient_difference < RTOL  # its first window is clipped at 0
    assert verdict.updates[1].gradient_difference > 1e-3


@pytest.mark.parametrize("loop", [loops.per_step_loop, loops.dropped_tail_loop],
                         ids=["per-step", "whole-chunks"])
def test_last_steps_never_trained(loop):
    verdict = audit(loop, tail="partial")
    found = finding(verdict, "tail_dropped")
    assert (found.update, found.step) == (6, 20)
    assert f"the last {T % K} steps (20-21) are never trained" in found.message


def test_tail_trained_where_drop_intended():
    verdict = audit(loops.per_chunk_loop, tail="drop")
    assert finding(verdict, "tail_trained").update == 6


def test_updates_at_the_wrong_steps():
    verdict = audit(loops.off_by_one_loop)
    found = finding(verdict, "wrong_update_steps")
    assert (found.update, found.step) == (1, 0)
    assert ends(verdict) == [0, 4, 8, 12, 16, 20]


def test_sum_where_mean_intended_and_the_reverse():
    summed = audit(loops.summed_chunk_loop, reduction="mean")
    found = finding(summed, "wrong_reduction")
    assert found.update == 1
    assert "its gradient is 20x the mean's" in found.message  # 4 steps x 5 sequences
    averaged = audit(loops.per_chunk_loop, reduction="sum")
    assert finding(averaged, "wrong_reduction").update == 1
    assert audit(loops.per_step_loop, reduction="mean").kinds == ("wrong_reduction",)


def test_carry_reset_each_chunk():
    verdict = audit(loops.fresh_carry_loop)
    assert verdict.kinds == ("carry_reset",)
    assert (verdict.findings[0].update, verdict.findings[0].step) == (2, 4)


def shifted_target_loop(model, optimizer, xs, ys, k):
    h = None
    for start in range(0, xs.shape[0] - 1, k):
        stop = min(start + k, xs.shape[0] - 1)
        optimizer.zero_grad()
        out, h = model(xs[start:stop], h)
        F.mse_loss(out, ys[start + 1:stop + 1]).backward()  # the next step's target
        optimizer.step()
        h = h[0].detach(), h[1].detach()


def test_loss_against_the_wrong_target():
    verdict = audit(shifted_target_loop)
    found = finding(verdict, "wrong_loss")
    assert (found.update, found.step) == (1, 3)
    assert "the loss terms of update 1 weigh unequally" in found.message


# -- the audit itself -----------------------------------------------------------------------

def test_global_state_is_left_as_found():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    audit(loops.per_chunk_loop)
    assert torch.get_default_dtype() == torch.float32
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"k1": 0}, "k1 must be a positive int, got 0"),
    ({"k1": 4, "k2": 2}, "k2 must be >= k1 (k1=4), got k2=2"),
    ({"reduction": "avg"}, "reduction must be one of ('mean', 'sum'), got 'avg'"),
    ({"tail": "keep"}, "tail must be one of ('partial', 'drop'), got 'keep'"),
    ({"cell": "rnn"}, "cell must be one of ('elman', 'gru', 'lstm'), got 'rnn'"),
    ({"lr": -1.0}, "lr must be a positive finite float, got -1.0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        audit(loops.per_chunk_loop, **kwargs)


def test_a_loop_that_feeds_the_model_other_data():
    def noisy_loop(model, optimizer, xs, ys, k):
        model(xs[:k] + 1.0, None)

    with pytest.raises(AuditError, match="not consecutive steps of xs"):
        audit(noisy_loop)
    with pytest.raises(ValueError, match="loop must be a callable"):
        audit("per_step_loop")


def test_command_prints_the_verdict_and_exits_with_it(capsys):
    assert main(["audit", "examples/audit_loops.py:per_step_loop", "--reduction", "sum",
                 "--tail", "drop"]) == 0
    out = capsys.readouterr().out
    assert "verdict    CORRECT: the same 5 updates after the same steps" in out
    assert main(["audit", "examples/audit_loops.py:per_step_loop", "--tail", "partial"]) == 1
    assert "[tail_dropped] (update 6, step 20)" in capsys.readouterr().out
    assert main(["audit", "examples/audit_loops.py:no_such_loop"]) == 2
    assert "has no function 'no_such_loop'" in capsys.readouterr().err


def test_default_length_shows_the_tail():
    from tbptt_torch.audit import default_length

    for k1, k2 in [(1, 1), (2, 7), (4, 4), (4, 8), (5, 5)]:
        length = default_length(k1, k2)
        assert length >= k2 + 2 * k1 and length // k1 >= 5
        assert k1 == 1 or length % k1 != 0
    assert math.ceil(default_length(4, 4) / 4) == 6


def clipping_loop(model, optimizer, xs, ys, k):
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        h = h[0].detach(), h[1].detach()


def per_step_backward_loop(model, optimizer, xs, ys, k):
    """backward() of each step's own loss (retain_graph), step() every k: the gradients of
    the k backward() calls add up to the chunk's, so this is TBPTT(k, k) with a sum."""
    h = None
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        ((out - ys[t]) ** 2).sum().backward(retain_graph=True)
        if (t + 1) % k == 0:
            optimizer.step()
            optimizer.zero_grad()
            h = h[0].detach(), h[1].detach()


def test_gradient_changed_between_backward_and_step():
    verdict = audit(clipping_loop)
    assert verdict.kinds == ("gradient_modified",)
    assert (verdict.findings[0].update, verdict.findings[0].step) == (1, 3)


def test_one_backward_per_step_adds_up_to_the_chunk():
    verdict = audit(per_step_backward_loop, reduction="sum", tail="drop")
    assert verdict.correct, str(verdict)
    assert verdict.max_gradient_difference < RTOL


def test_a_loop_that_bypasses_the_model():
    def rnn_only_loop(model, optimizer, xs, ys, k):
        hidden, _ = model.rnn(xs[:k])
        F.mse_loss(model.head(hidden), ys[:k]).backward()
        optimizer.step()

    with pytest.raises(AuditError, match="the loop never called model"):
        audit(rnn_only_loop)


def test_exported_from_the_package():
    import tbptt_torch
    from tbptt_torch.audit import AuditVerdict

    assert tbptt_torch.audit is audit
    assert tbptt_torch.AuditVerdict is AuditVerdict


def late_handoff_loop(model, optimizer, xs, ys, k, k2):
    """The overlapping loop handing on the state at the window's end, not at the next start."""
    T, overlap = xs.shape[0], k2 - k
    start_state = None
    for a in range(0, T, k):
        b, s = min(a + k, T), max(0, a - overlap)
        optimizer.zero_grad()
        h, loss = start_state, 0
        for t in range(s, b):
            out, h = model(xs[t], h)
            if t >= a:
                loss = loss + F.mse_loss(out, ys[t])
        (loss / (b - a)).backward()
        optimizer.step()
        start_state = h[0].detach(), h[1].detach()  # the state after step b - 1


def forgets_step_loop(model, optimizer, xs, ys, k):
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        h = h[0].detach(), h[1].detach()


def lr_schedule_loop(model, optimizer, xs, ys, k):
    """Correct TBPTT, but the loop changes the learning rate after the first update."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        optimizer.step()
        optimizer.param_groups[0]["lr"] = 0.2
        h = h[0].detach(), h[1].detach()


def test_carry_handed_on_from_the_wrong_step():
    verdict = audit(late_handoff_loop, k2=7)
    found = finding(verdict, "wrong_handoff")
    assert (found.update, found.step) == (2, 1)
    assert "after step 3, not the state at step 1" in found.message


def test_a_loop_that_never_steps():
    verdict = audit(forgets_step_loop)
    assert verdict.kinds == ("no_update",)
    assert verdict.findings[0].message == "the loop never called optimizer.step()"


def test_gradients_differ_with_everything_else_as_intended():
    verdict = audit(lr_schedule_loop)
    assert verdict.kinds == ("gradients_differ",)
    # Update 2 still starts from the reference's weights; its larger step shows at update 3.
    assert verdict.findings[0].update == 3
    assert max(u.gradient_difference for u in verdict.updates[:2]) < RTOL
    assert "does the loop change the learning rate" in verdict.findings[0].message


def test_a_model_of_ones_own():
    from tbptt_torch.models import GRUModel

    verdict = audit(loops.per_chunk_loop, model_factory=lambda: GRUModel(3, 5, 1))
    assert verdict.correct, str(verdict)
    assert verdict.setup.startswith("GRUModel, float64; xs [22, 5, 3]")

    with pytest.raises(ValueError, match="initial_carry"):
        audit(loops.per_chunk_loop, model_factory=lambda: nn.GRU(2, 4))
