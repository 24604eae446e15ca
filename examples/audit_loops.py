"""Hand-written PyTorch TBPTT loops, three correct shapes and the usual mistakes.

Each is `loop(model, optimizer, xs, ys, k)` (plus `k2` for the overlapping shape), the form
`tbptt_torch.audit` and `tbptt audit FILE:FUNCTION` take, e.g.

    tbptt audit examples/audit_loops.py:per_step_loop --k1 4 --reduction sum --tail drop

`model(x, carry) -> (preds, carry)` takes a chunk `x[t, B, I]` or one step `x[B, I]`;
`carry=None` is the zero carry. The broken loops differ from a correct one in one place,
marked `# BUG`. docs/audit.md shows the audit's verdict on each.
"""

from __future__ import annotations

import torch.nn.functional as F


def detach(carry):
    """`h.detach()` for a GRU/Elman carry, both parts for an LSTM's `(h, c)`."""
    return tuple(part.detach() for part in carry) if isinstance(carry, tuple) else carry.detach()


# -- three correct shapes --------------------------------------------------------------------

def per_step_loop(model, optimizer, xs, ys, k):
    """The loop of the PyTorch forums: one step at a time, a running loss summed over the
    chunk, backward / step / zero_grad every k steps, then the carry detached. It trains
    only whole chunks: TBPTT(k, k) with reduction="sum", tail="drop"."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        loss = loss + ((out - ys[t]) ** 2).sum()
        if (t + 1) % k == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = 0
            h = detach(h)


def per_chunk_loop(model, optimizer, xs, ys, k):
    """Ignite's `create_supervised_tbptt_trainer` written out: one model call per chunk, the
    mean-squared error of the chunk, a shorter last chunk trained too: TBPTT(k, k) with
    reduction="mean", tail="partial"."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward()
        optimizer.step()
        h = detach(h)


def overlap_loop(model, optimizer, xs, ys, k, k2):
    """TBPTT(k1=k, k2) with k2 > k: each update owns k new steps but backpropagates k2,
    re-running the k2 - k steps before them from the state saved at the window start.
    The loss is the mean over the k new steps (and the batch); a last shorter chunk trains."""
    T, overlap = xs.shape[0], k2 - k
    start_state = None  # the detached carry at the window start
    for a in range(0, T, k):
        b = min(a + k, T)
        s, next_s = max(0, a - overlap), max(0, b - overlap)
        optimizer.zero_grad()
        h, loss, handoff = start_state, 0, start_state
        for t in range(s, b):
            out, h = model(xs[t], h)
            if t >= a:
                loss = loss + F.mse_loss(out, ys[t])
            if t + 1 == next_s:
                handoff = detach(h)
        (loss / (b - a)).backward()
        optimizer.step()
        start_state = handoff


# -- the usual mistakes --------------------------------------------------------------------

def no_detach_loop(model, optimizer, xs, ys, k):
    """The per-step loop without the detach."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        loss = loss + ((out - ys[t]) ** 2).sum()
        if (t + 1) % k == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = 0  # BUG: the carry h is never detached


def discarded_detach_loop(model, optimizer, xs, ys, k):
    """The per-step loop with `h.detach()` as a statement: its result is thrown away."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        loss = loss + ((out - ys[t]) ** 2).sum()
        if (t + 1) % k == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = 0
            for part in h if isinstance(h, tuple) else (h,):
                part.detach()  # BUG: detach() returns a new tensor; h is unchanged


def no_zero_grad_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop without zero_grad(): gradients accumulate across updates."""
    h = None
    for start in range(0, xs.shape[0], k):
        out, h = model(xs[start:start + k], h)  # BUG: no optimizer.zero_grad() anywhere
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward()
        optimizer.step()
        h = detach(h)


def zero_grad_before_step_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop with zero_grad() between backward() and step()."""
    h = None
    for start in range(0, xs.shape[0], k):
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward()
        optimizer.zero_grad()  # BUG: clears the gradient step() is about to apply
        optimizer.step()
        h = detach(h)


def loss_not_reset_loop(model, optimizer, xs, ys, k):
    """The per-step loop that never resets its running loss."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        loss = loss + ((out - ys[t]) ** 2).sum()
        if (t + 1) % k == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            h = detach(h)  # BUG: no `loss = 0`


def step_before_backward_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop with step() before backward(): each step() applies nothing."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        optimizer.step()  # BUG: before loss.backward()
        loss.backward()
        h = detach(h)


def detach_every_step_loop(model, optimizer, xs, ys, k):
    """The per-step loop that detaches after every step: each loss term's gradient stops
    at its own step, a truncation of 1 instead of k."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        h = detach(h)  # BUG: belongs under the `if`, after step()
        loss = loss + ((out - ys[t]) ** 2).sum()
        if (t + 1) % k == 0:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = 0


def window_too_long_loop(model, optimizer, xs, ys, k):
    """The overlapping loop run with k2 = 2k where k2 = k was meant."""
    overlap_loop(model, optimizer, xs, ys, k, 2 * k)  # BUG: k2 should be k


def dropped_tail_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop over whole chunks only: the last T % k steps are never trained."""
    h = None
    for start in range(0, xs.shape[0] - k + 1, k):  # BUG: stops before a shorter last chunk
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward()
        optimizer.step()
        h = detach(h)


def off_by_one_loop(model, optimizer, xs, ys, k):
    """The per-step loop updating when `t % k == 0`: after steps 0, k, 2k, ..."""
    h, loss = None, 0
    for t in range(xs.shape[0]):
        out, h = model(xs[t], h)
        loss = loss + ((out - ys[t]) ** 2).sum()
        if t % k == 0:  # BUG: should be (t + 1) % k == 0
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss = 0
            h = detach(h)


def summed_chunk_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop with the squared error summed, where the mean was meant."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k], reduction="sum")  # BUG: meant "mean"
        loss.backward()
        optimizer.step()
        h = detach(h)


def fresh_carry_loop(model, optimizer, xs, ys, k):
    """The per-chunk loop that starts every chunk from the zero carry."""
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, _ = model(xs[start:start + k], None)  # BUG: the carry is not carried over
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward()
        optimizer.step()


def retain_graph_loop(model, optimizer, xs, ys, k):
    """The no-detach loop 'fixed' with retain_graph=True, as the error message suggests."""
    h = None
    for start in range(0, xs.shape[0], k):
        optimizer.zero_grad()
        out, h = model(xs[start:start + k], h)
        loss = F.mse_loss(out, ys[start:start + k])
        loss.backward(retain_graph=True)  # BUG: hides the missing detach
        optimizer.step()


# Every loop above by name, in the order written (correct shapes first).
LOOPS = {name: value for name, value in list(globals().items())
         if name.endswith("_loop") and callable(value)}
