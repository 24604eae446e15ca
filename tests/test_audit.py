"""`tbptt_torch.audit` on correct loops of three shapes and on each classic mistake, on
word_language_model's `train()` from pytorch/examples as written and seven mistakes in it,
on updates the loop makes itself, and on losses, models and data of the user's own.

The loops come from examples/audit_loops.py and tests/fixtures/word_language_model.py (what
docs/audit.md shows) and, so that the audit is seen to judge behaviour rather than a familiar
text, from this file: written in other styles (zip over the steps, `model.zero_grad()`,
`detach_()`, `torch.split`, a class with a callback, `p -= lr * p.grad`, torch.optim's
functional SGD). Each verdict is checked by its numbers: the updates' end steps, the loss
weight and learning rate of each update, the gradient difference to the reference, and for a
wrong loop the finding's kind and the update and time step where it first shows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from examples import audit_loops as loops
from tbptt.loading import load_object
from tbptt_cli.cli import main
from tbptt_torch.audit import RTOL, AuditError, Tbptt, audit

ROOT = Path(__file__).resolve().parents[1]

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
    assert (found.update, found.step) == (1, 0)
    assert ("the loss of step 0 is computed against ys[1], the target of the next step, not "
            "ys[0]") in found.message


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
    assert "examples/audit_loops.py defines no 'no_such_loop'" in capsys.readouterr().err


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


def doubling_loop(model, optimizer, xs, ys, k):
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        nn.utils.clip_grad_value_(model.parameters(), 0.05)
        optimizer.step()
        h = h[0].detach(), h[1].detach()


def test_clipping_between_backward_and_step_is_recognised_and_judged():
    verdict = audit(clipping_loop)  # clip_grad_norm not said: reported, and clipped alike
    assert verdict.correct, str(verdict)
    assert verdict.implements.clip_grad_norm == pytest.approx(0.01, rel=1e-9)
    assert verdict.reference.clip_grad_norm == pytest.approx(0.01, rel=1e-9)
    assert "the loop clips the gradient's global norm to 0.01" in verdict.notes[0]
    assert audit(clipping_loop, clip_grad_norm=0.01).correct
    other = audit(clipping_loop, clip_grad_norm=0.5)
    assert other.kinds == ("wrong_clipping",)
    assert (other.findings[0].update, other.findings[0].step) == (1, 3)
    assert "the loop clips to max norm 0.01 where clip_grad_norm=0.5" in other.findings[0].message
    unclipped = audit(loops.per_chunk_loop, clip_grad_norm=0.01)
    assert unclipped.kinds == ("wrong_clipping",)
    assert "and is applied unclipped" in unclipped.findings[0].message


def test_a_change_of_the_gradient_that_is_no_norm_clipping():
    verdict = audit(doubling_loop)  # clip_grad_value_ clips each entry on its own
    assert verdict.kinds == ("gradient_modified",)
    assert (verdict.findings[0].update, verdict.findings[0].step) == (1, 3)
    assert "not by clipping its global norm" in verdict.findings[0].message


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
    assert verdict.findings[0].message == ("the loop never updated the weights: it called no "
                                           "optimizer.step() and changed no parameter itself")


def frozen_bias_loop(model, optimizer, xs, ys, k):
    """Correct TBPTT, but one parameter is left out of backward() from the second update."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        optimizer.step()
        model.head.bias.requires_grad_(False)
        h = h[0].detach(), h[1].detach()


def test_the_learning_rate_of_each_update_is_read_and_reported():
    verdict = audit(lr_schedule_loop)
    assert verdict.correct, str(verdict)  # each update is judged from the loop's own weights
    assert [u.lr for u in verdict.updates] == pytest.approx([0.05] + [0.2] * 5, rel=1e-9)
    assert verdict.notes == ("the learning rate changes: lr=0.05 at update 1, 0.2 from update "
                             "2; each update is judged by the gradient it applies",)


def test_gradients_differ_with_everything_else_as_intended():
    verdict = audit(frozen_bias_loop)
    assert verdict.kinds == ("gradients_differ",)
    assert verdict.findings[0].update == 2
    assert verdict.updates[0].gradient_difference < RTOL
    assert "most in head.bias" in verdict.findings[0].message


def test_a_model_of_ones_own():
    from tbptt_torch.models import GRUModel

    verdict = audit(loops.per_chunk_loop, model_factory=lambda: GRUModel(3, 5, 1))
    assert verdict.correct, str(verdict)
    assert verdict.setup.startswith("GRUModel, float64; xs [22, 5, 3]")

    # A bare nn.GRU: no initial_carry, predictions [t, B, 4]; ys are shaped for it.
    bare = audit(loops.per_chunk_loop, model_factory=lambda: nn.GRU(2, 4))
    assert bare.correct, str(bare)
    assert bare.setup.startswith("GRU, float64; xs [22, 5, 2], ys [22, 5, 4]")
    with pytest.raises(ValueError, match="pass model or model_factory, not both"):
        audit(loops.per_chunk_loop, model=nn.GRU(2, 4), model_factory=lambda: nn.GRU(2, 4))


# -- word_language_model's train(), as pytorch/examples has it, and seven mistakes in it ----

WLM = ROOT / "tests" / "fixtures" / "word_language_model.py"
WLM_INTENT = dict(k1=5, reduction="mean", tail="partial", clip_grad_norm=0.25)


def wlm(name):
    return load_object(f"{WLM}:{name}")


def test_word_language_model_loop_as_written_is_correct():
    verdict = audit(wlm("loop"), model_factory=wlm("make_model"), **WLM_INTENT)
    assert verdict.correct, str(verdict)
    # T = 27 token steps of B = 6 streams, bptt = 5: five chunks of 5 and a last one of 2.
    assert ends(verdict) == [4, 9, 14, 19, 24, 26]
    assert [u.weight for u in verdict.updates] == pytest.approx([1 / 30] * 5 + [1 / 12])
    assert [u.lr for u in verdict.updates] == pytest.approx([20.0] * 6, rel=1e-9)
    assert verdict.loss == "nll"
    assert str(verdict.implements) == ("TBPTT(k1=5, k2=5, reduction='mean', tail='partial', "
                                       "clip_grad_norm=0.25)")
    assert verdict.max_gradient_difference < RTOL
    assert verdict.setup.startswith("RNNModel (dropout off in 2 modules), float64; xs [27, 6] "
                                    "token ids < 10, ys [27, 6] the next tokens")
    assert ("the loop updates the weights itself (no optimizer.step()): plain SGD steps along "
            "p.grad with lr=20") in verdict.notes


def test_word_language_model_without_its_clipping_said():
    verdict = audit(wlm("loop"), model_factory=wlm("make_model"), k1=5)
    assert verdict.correct, str(verdict)
    assert verdict.implements.clip_grad_norm == pytest.approx(0.25, rel=1e-9)
    assert any("clips the gradient's global norm to 0.25" in note for note in verdict.notes)
    other = audit(wlm("loop"), model_factory=wlm("make_model"), k1=5, clip_grad_norm=1.0)
    assert other.kinds == ("wrong_clipping",)


@pytest.mark.parametrize(("name", "kinds", "first"), [
    ("without_repackage_loop", ("loop_raised", "not_detached"), ("not_detached", 2, 5)),
    ("zero_grad_after_backward_loop", ("loop_raised", "zero_grad_before_step"),
     ("zero_grad_before_step", 1, 4)),
    ("without_zero_grad_loop", ("gradients_accumulate",), ("gradients_accumulate", 2, 9)),
    ("hidden_reset_loop", ("carry_reset",), ("carry_reset", 2, 5)),
    ("targets_unshifted_loop", ("wrong_loss",), ("wrong_loss", 1, 0)),
    ("short_batch_skipped_loop", ("tail_dropped",), ("tail_dropped", 6, 25)),
    ("loss_summed_loop", ("wrong_reduction",), ("wrong_reduction", 1, None)),
], ids=["repackage_hidden-removed", "zero_grad-after-backward", "zero_grad-removed",
        "hidden-reset-every-batch", "targets-not-shifted", "short-batch-skipped", "loss-summed"])
def test_word_language_model_mistakes_are_each_diagnosed(name, kinds, first):
    verdict = audit(wlm(name), model_factory=wlm("make_model"), **WLM_INTENT)
    assert verdict.kinds == kinds, str(verdict)
    kind, update, step = first
    found = finding(verdict, kind)
    assert (found.update, found.step) == (update, step), str(verdict)


def test_word_language_model_mistakes_say_why():
    def audited(name):
        return audit(wlm(name), model_factory=wlm("make_model"), **WLM_INTENT)

    no_repackage = audited("without_repackage_loop")
    raised = finding(no_repackage, "loop_raised")
    assert (raised.update, raised.step) == (2, 9)
    # The whole message, quoted, and why: nothing was detached (not "although it was").
    assert ("Specify retain_graph=True if you need to backward through the graph a second time "
            "or if you need to access saved tensors after calling backward.\"") in raised.message
    assert raised.message.endswith("because the hidden state is not detached")
    late_zero_grad = audited("zero_grad_after_backward_loop")
    raised = finding(late_zero_grad, "loop_raised")
    assert ('raised TypeError: "add_(): argument \'other\' (position 1) must be Tensor, not '
            'NoneType"; every p.grad is None there: zero_grad() set them so after backward()'
            ) in raised.message
    assert "steps 0-4 is cleared before update 1 could apply it" in finding(
        late_zero_grad, "zero_grad_before_step").message
    assert "against xs[0], the input of that step itself, not ys[0]: the targets are not " \
           "shifted" in finding(audited("targets_unshifted_loop"), "wrong_loss").message
    assert "its gradient is 30x the mean's" in finding(audited("loss_summed_loop"),
                                                        "wrong_reduction").message


def test_word_language_model_from_the_command_line(capsys):
    arguments = ["--model", f"{WLM}:make_model", "--k1", "5", "--reduction", "mean", "--tail",
                 "partial", "--clip-grad-norm", "0.25"]
    assert main(["audit", f"{WLM}:loop", *arguments]) == 0
    assert "verdict    CORRECT: the same 6 updates" in capsys.readouterr().out
    assert main(["audit", f"{WLM}:hidden_reset_loop", *arguments]) == 1
    assert "[carry_reset] (update 2, step 5)" in capsys.readouterr().out
    assert main(["audit", f"{WLM}:loop", "--model", f"{WLM}:no_such_model"]) == 2
    assert "defines no 'no_such_model'" in capsys.readouterr().err


# -- updates without an optimizer object ----------------------------------------------------

def in_place_loop(model, optimizer, xs, ys, k):
    """`p -= lr * p.grad` under no_grad, model.zero_grad()."""
    h = None
    for start in range(0, xs.shape[0], k):
        model.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        h = h[0].detach(), h[1].detach()


def functional_loop(model, optimizer, xs, ys, k):
    """torch.optim's functional SGD; the gradients cleared by `p.grad = None`."""
    params, h = list(model.parameters()), None
    for start in range(0, xs.shape[0], k):
        for p in params:
            p.grad = None
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        with torch.no_grad():
            torch.optim._functional.sgd(params, [p.grad for p in params], [None] * len(params),
                                        weight_decay=0.0, momentum=0.0, lr=0.2, dampening=0.0,
                                        nesterov=False, maximize=False)
        h = h[0].detach(), h[1].detach()


def own_adam_loop(model, optimizer, xs, ys, k):
    """An optimizer of the loop's own, not the one handed over."""
    adam, h = torch.optim.Adam(model.parameters(), lr=0.01), None
    for start in range(0, xs.shape[0], k):
        adam.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.mse_loss(out, ys[start:start + k]).backward()
        adam.step()
        h = h[0].detach(), h[1].detach()


@pytest.mark.parametrize(("loop", "lr"), [(in_place_loop, 0.1), (functional_loop, 0.2),
                                          (own_adam_loop, None)],
                         ids=["p-=lr*grad", "functional-sgd", "own-adam"])
def test_updates_the_loop_makes_itself_count(loop, lr):
    verdict = audit(loop, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert ends(verdict) == [3, 7, 11, 15, 19, 21]
    if lr is None:
        assert [u.lr for u in verdict.updates] == [None] * 6
        assert "other than a plain SGD step along p.grad" in verdict.notes[0]
    else:
        assert [u.lr for u in verdict.updates] == pytest.approx([lr] * 6, rel=1e-9)


# -- any loss, any model, any data -----------------------------------------------------------

class TinyLM(nn.Module):
    """Token ids [t, B] -> logits [t, B, 6]: an embedding, a GRU, a readout."""

    def __init__(self):
        super().__init__()
        self.embed, self.gru, self.head = nn.Embedding(6, 3), nn.GRU(3, 4), nn.Linear(4, 6)

    def forward(self, x, h):
        out, h = self.gru(self.embed(x), h)
        return self.head(out), h


def cross_entropy_loop(model, optimizer, xs, ys, k):
    h = torch.zeros(1, xs.shape[1], 4)
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        logits, h = model(xs[start:start + k], h)
        F.cross_entropy(logits.flatten(0, 1), ys[start:start + k].flatten()).backward()
        optimizer.step()
        h = h.detach()


def masked_loop(model, optimizer, xs, ys, k, mean_over_all=False):
    """Cross-entropy where the target is not 0 (a padding id), averaged over those terms."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        logits, h = model(xs[start:start + k], h)
        targets = ys[start:start + k].flatten()
        terms = F.cross_entropy(logits.flatten(0, 1), targets, reduction="none")
        keep = (targets != 0).double()
        loss = (terms * keep).mean() if mean_over_all else (terms * keep).sum() / keep.sum()
        loss.backward()
        optimizer.step()
        h = h.detach()


def masked_mean_over_all_loop(model, optimizer, xs, ys, k):
    masked_loop(model, optimizer, xs, ys, k, mean_over_all=True)


def test_a_token_model_with_cross_entropy():
    verdict = audit(cross_entropy_loop, model_factory=TinyLM, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert verdict.loss == "cross_entropy"
    assert verdict.setup.startswith("TinyLM, float64; xs [22, 5] token ids < 6, ys [22, 5] "
                                    "the next tokens")


def test_a_masked_loss_is_read_from_the_weights():
    verdict = audit(masked_loop, model_factory=TinyLM, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert verdict.implements.masked and verdict.reference.masked
    assert [u.masked_terms for u in verdict.updates] == [3, 3, 1, 2, 1, 2]  # ys == 0
    assert verdict.updates[0].weight == pytest.approx(1 / 17)  # 20 terms, 3 masked
    wrong = audit(masked_mean_over_all_loop, model_factory=TinyLM, reduction="mean")
    assert wrong.kinds == ("wrong_reduction",)
    assert ("divided by all 20 terms of its 4 steps, not by the 17 terms the mask keeps"
            in wrong.findings[0].message)


def weighted_loop(model, optimizer, xs, ys, k, mask):
    """Squared error weighted by the mask it is given, SPEC's mean: sum(w l) / sum(w)."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        weights = mask[start:start + k]
        terms = ((out - ys[start:start + k]) ** 2).squeeze(-1)
        ((terms * weights).sum() / weights.sum()).backward()
        optimizer.step()
        h = h[0].detach(), h[1].detach()


def test_a_mask_given_is_judged():
    generator = torch.Generator().manual_seed(3)
    mask = torch.rand(T, B, generator=generator) * (torch.rand(T, B, generator=generator) > 0.3)
    assert audit(weighted_loop, mask=mask, reduction="mean", tail="partial").correct
    summed = audit(weighted_loop, mask=mask, reduction="sum")
    assert summed.kinds == ("wrong_reduction",)
    unmasked = audit(loops.per_chunk_loop, mask=mask, reduction="mean")
    assert unmasked.kinds == ("wrong_mask",)
    assert (unmasked.findings[0].update, unmasked.findings[0].step) == (1, 0)


def huber_loop(model, optimizer, xs, ys, k):
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        F.huber_loss(out, ys[start:start + k], delta=0.5).backward()
        optimizer.step()
        h = h[0].detach(), h[1].detach()


def huber(preds, targets):
    return F.huber_loss(preds, targets, delta=0.5, reduction="none").mean(-1)


def test_a_loss_the_audit_does_not_know_is_asked_for_by_name():
    from tbptt_torch.models import LSTMModel

    with pytest.raises(AuditError, match="pass loss_fn, the loss your loop computes"):
        audit(huber_loop, model_factory=lambda: LSTMModel(2, 4, 3))
    verdict = audit(huber_loop, model_factory=lambda: LSTMModel(2, 4, 3), loss_fn=huber,
                    reduction="mean")
    assert verdict.correct, str(verdict)
    assert verdict.loss == "huber"


def test_data_of_ones_own(tmp_path, capsys):
    rng = np.random.default_rng(5)
    xs, ys = rng.normal(size=(13, 3, 2)), rng.normal(size=(13, 3, 1))
    verdict = audit(loops.per_chunk_loop, xs=xs, ys=ys, reduction="mean", tail="partial")
    assert verdict.correct, str(verdict)
    assert ends(verdict) == [3, 7, 11, 12]
    assert "xs [13, 3, 2], ys [13, 3, 1] (given)" in verdict.setup
    data = tmp_path / "data.npz"
    np.savez(data, xs=xs, ys=ys)
    assert main(["audit", "examples/audit_loops.py:per_chunk_loop", "--data", str(data)]) == 0
    assert "verdict    CORRECT: the same 4 updates" in capsys.readouterr().out
    with pytest.raises(ValueError, match="length and batch_size shape the random data"):
        audit(loops.per_chunk_loop, xs=xs, ys=ys, length=13)
    with pytest.raises(ValueError, match=r"mask must have the \[T, B\] of xs, expected \[13, "
                                         r"3\], got \[13, 4\]"):
        audit(loops.per_chunk_loop, xs=xs, ys=ys, mask=np.ones((13, 4)))
