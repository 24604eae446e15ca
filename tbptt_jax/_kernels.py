"""Fast recurrent layers: one layer over a whole window, with a hand-written backward pass.

`layer(cell)` gives the function `tbptt_jax.models` runs for each recurrent layer:

    (w_hh, b_hh, b_ih, x_proj[T, B, G*H], carry, resets[T, B] | None) -> (carry, hs[T, B, H])

where `x_proj = xs @ W_ih^T` is the input projection of every step, computed by the
caller as one matrix product outside the recurrence, and G the number of gates. The two
biases are the layer's to add: where they sum (every gate but the GRU's n) they are added
once, as one vector. The forward pass is a `lax.scan` with one fused matrix product per
step for all gates. For the LSTM, what the backward pass needs of each step (the gate
activations) is written over that step's row of the projection, which is dead once read:
no zero-filled `[T, B, 4H]` buffer beside it; and the biases are added inside the step's
elementwise kernel rather than in passes of their own over the whole projection.

Autodiff of a scan would accumulate `dW_hh` inside the reverse loop, one small `[G*H, B] x
[B, H]` product and a read-modify-write of the whole weight gradient per step. The
backward pass here (a `custom_vjp`) runs only what is truly sequential in reverse: the
gate gradients and the hidden-state gradient `dh = dgates @ W_hh`. The weight and bias
gradients are then single large products over all T*B rows at once
(`dW_hh = dgates^T @ h_in`, the biases' as sums over them), and the input-projection
gradient is handed back whole, so `dW_ih` and `dxs` are single products too (autodiff of
the projection does that). The LSTM's reverse loop writes each step's gate gradients over
those rows in turn, which it no longer needs.

On a CPU the LSTM's two loops run as compiled kernels instead (`tbptt_jax._native`, one
call per window and direction; see docs/kernels.md), with the loops here as their fallback,
their definition on other platforms, and their derivatives and batching rules.

`project` is the models' input projection and linear readout over a whole window, with a
backward pass that keeps XLA from transposing the gradient of its output.

Each cell's equations are written once, in its step function; `tbptt_jax.models` keeps the
plain one-step cells (`step`) that the tests hold these kernels to, values and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tbptt_jax import _native

Array = jax.Array


def _mask(reset: Array | None, value: Array) -> Array:
    """Zero where `reset[B]` is true; a select, so a NaN of a finished sequence cannot leak."""
    if reset is None:
        return value
    return jnp.where(reset[:, None], jnp.zeros_like(value), value)


def _sigmoid_grad(y: Array) -> Array:
    """sigmoid'(x) from y = sigmoid(x)."""
    return y * (1 - y)


def _tanh_grad(y: Array) -> Array:
    """tanh'(x) from y = tanh(x)."""
    return 1 - y * y


def _row(vector: Array) -> Array:
    return vector[None, :]


class _Cell(NamedTuple):
    """One cell, split the way the layer runs it.

    loop_bias(b_ih, b_hh) -> (folded[G*H], in_loop or None): the biases as one vector added
      to the projection, and the part of b_hh that cannot be (the GRU's b_hn, which the
      reset gate multiplies).
    forward(w_t, b_in_loop, carry_in, x_t) -> (carry_out, row, extra): one step; `w_t` is
      W_hh^T `[H, G*H]`, `carry_in` the (already reset) carry, a tuple of `[B, H]` arrays
      whose first entry is h, and `x_t` the step's projection with the folded biases. What
      the backward pass needs of the step beyond the carries: `row` `[B, G*H]` (None unless
      `over_projection`), written over the step's projection row, and `extra` (or None),
      kept in buffers of its own.
    prepare(carry_ins, carry_outs, rows, extras) -> factors: everything the backward step
      needs that does not depend on the gradient flowing back, for all T steps at once.
    backward(w_hh, factors_t, dcarry_out) -> (dcarry_in, out_t): one reverse step; only
      what is truly sequential.
    finish(outs, factors) -> (dx_proj, dh_proj): the gradients of the input projection and
      of `h_in W_hh^T + b_hh`, for all T steps at once, from what the reverse loop gave.
    over_projection: whether the layer reuses the projection's buffer: `forward` writes a
      `row` over each step's projection row, and `backward`'s `out_t` (`[B, G*H]`) is
      written over the rows, dead once `prepare` has read them. Otherwise `row` is None,
      the projection is only read, and the reverse loop's outputs get a buffer of their
      own (for a small cell, the extra writes cost more than the buffers they save).
    """

    loop_bias: Callable[..., tuple[Array, Array | None]]
    forward: Callable[..., tuple[tuple[Array, ...], Array | None, Any]]
    prepare: Callable[..., Any]
    backward: Callable[..., tuple[tuple[Array, ...], Array]]
    finish: Callable[..., tuple[Array, Array]]
    over_projection: bool


def _fold_all(b_ih: Array, b_hh: Array) -> tuple[Array, None]:
    return b_ih + b_hh, None


def _same(outs: Array, factors: Any) -> tuple[Array, Array]:
    return outs, outs


def _by_gate(array: Array, gates: int) -> Array:
    """`[..., G*H]` -> `[..., G, H]`, so a per-gate factor is a broadcast, not a slice."""
    return array.reshape(*array.shape[:-1], gates, array.shape[-1] // gates)


def _elman_forward(w_t, b_in_loop, carry_in, x_t):
    """h' = tanh(W_ih x + b_ih + W_hh h + b_hh)."""
    (h,) = carry_in
    return (jnp.tanh(x_t + h @ w_t),), None, None


def _elman_prepare(carry_ins, carry_outs, rows, extras):
    return _tanh_grad(carry_outs[0])


def _elman_backward(w_hh, tanh_grad, dcarry_out):
    (dh,) = dcarry_out
    d_pre = dh * tanh_grad
    return (d_pre @ w_hh,), d_pre


def _gru_bias(b_ih: Array, b_hh: Array) -> tuple[Array, Array]:
    b_hr_z, b_hn = jnp.split(b_hh, [2 * (b_hh.shape[0] // 3)])
    return b_ih + jnp.concatenate([b_hr_z, jnp.zeros_like(b_hn)]), b_hn


def _gru_forward(w_t, b_hn, carry_in, x_t):
    """torch.nn.GRU, gates r, z, n:

    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr);  z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn));  h' = (1 - z) * n + z * h
    """
    (h,) = carry_in
    h_proj = h @ w_t
    # The sigmoid over all three blocks (the third unused): XLA's CPU code for an
    # elementwise op on a full row is several times faster than on a column slice.
    r_z = _by_gate(jax.nn.sigmoid(x_t + h_proj), 3)
    r, z = r_z[:, 0], r_z[:, 1]
    h_n = _by_gate(h_proj, 3)[:, 2] + _row(b_hn)
    n = jnp.tanh(_by_gate(x_t, 3)[:, 2] + r * h_n)
    return ((1 - z) * n + z * h,), None, (r, z, n, h_n)


def _gru_prepare(carry_ins, carry_outs, rows, saved):
    (h_in,) = carry_ins
    r, z, n, h_n = saved
    d_n = (1 - z) * _tanh_grad(n)
    d_r = d_n * h_n * _sigmoid_grad(r)
    d_z = (h_in - n) * _sigmoid_grad(z)
    # dh_proj = dh * proj_factor (what the loop multiplies by W_hh); dx_proj = dh * x_factor.
    proj_factor = jnp.stack([d_r, d_z, d_n * r], axis=-2)
    x_factor = jnp.stack([d_r, d_z, d_n], axis=-2)
    return z, proj_factor, x_factor


def _gru_backward(w_hh, factors_t, dcarry_out):
    z, proj_factor, _ = factors_t
    (dh,) = dcarry_out
    dh_proj = (dh[:, None, :] * proj_factor).reshape(dh.shape[0], -1)
    return (dh * z + dh_proj @ w_hh,), dh


def _gru_finish(dhs, factors):
    _, proj_factor, x_factor = factors
    dhs = dhs[..., None, :]
    return ((dhs * x_factor).reshape(*dhs.shape[:-2], -1),
            (dhs * proj_factor).reshape(*dhs.shape[:-2], -1))


def _lstm_activations(gates: Array) -> Array:
    """`[..., 4, H]` pre-activations -> i, f, g, o: sigmoid but tanh for g, both over every
    block then a select (XLA's CPU code for an elementwise op on a full row is several times
    faster than on a column slice)."""
    is_g = jnp.arange(4)[:, None] == 2
    return jnp.where(is_g, jnp.tanh(gates), jax.nn.sigmoid(gates))


def _lstm_forward(w_t, b_in_loop, carry_in, x_t):
    """torch.nn.LSTM, gates i, f, g, o:

    i, f, o = sigmoid(W_i* x + b_i* + W_h* h + b_h*);  g = tanh(W_ig x + b_ig + W_hg h + b_hg)
    c' = f * c + i * g;  h' = o * tanh(c')
    """
    h, c = carry_in
    gates = _by_gate(x_t + h @ w_t, 4)
    gates = _lstm_activations(gates)
    i, f, g, o = (gates[:, k] for k in range(4))
    c = f * c + i * g
    return (o * jnp.tanh(c), c), gates.reshape(x_t.shape), None


def _lstm_prepare(carry_ins, carry_outs, gates, extras):
    _, c_in = carry_ins
    _, c_out = carry_outs
    i, f, g, o = (_by_gate(gates, 4)[..., k, :] for k in range(4))
    tanh_c = jnp.tanh(c_out)
    # d_gates = [dc * i_factor, dc * f_factor, dc * g_factor, dh * o_factor], with
    # dc = dc_next + dh * c_factor.
    return (o * _tanh_grad(tanh_c), f,
            jnp.concatenate([g * _sigmoid_grad(i), c_in * _sigmoid_grad(f),
                             i * _tanh_grad(g), tanh_c * _sigmoid_grad(o)], axis=-1))


def _lstm_backward(w_hh, factors_t, dcarry_out):
    c_factor, f, gate_factor = factors_t
    dh, dc = dcarry_out
    dc = dc + dh * c_factor
    gate_factor = _by_gate(gate_factor, 4)
    d_gates = jnp.concatenate([dc[:, None] * gate_factor[:, :3],
                               (dh * gate_factor[:, 3])[:, None]], axis=1).reshape(dh.shape[0], -1)
    return (d_gates @ w_hh, dc * f), d_gates


CELLS = {
    "elman": _Cell(_fold_all, _elman_forward, _elman_prepare, _elman_backward, _same, False),
    "gru": _Cell(_gru_bias, _gru_forward, _gru_prepare, _gru_backward, _gru_finish, False),
    "lstm": _Cell(_fold_all, _lstm_forward, _lstm_prepare, _lstm_backward, _same, True),
}


def _as_tuple(carry: Any, cell: str) -> tuple[Array, ...]:
    return tuple(carry) if cell == "lstm" else (carry,)


def _from_tuple(parts: tuple[Array, ...], cell: str) -> Any:
    return parts if cell == "lstm" else parts[0]


def step(cell: str, w_hh: Array, b_hh: Array, b_ih: Array, x_proj: Array, carry: Any,
         reset: Array | None = None) -> Any:
    """One step of `cell` with plain autodiff: the reference `layer` is held to.

    Takes `x_proj[B, G*H]` (`x W_ih^T`) and the carry before the step (h `[B, H]`, or
    `(h, c)`), and returns the carry after it.
    """
    folded, in_loop = CELLS[cell].loop_bias(b_ih, b_hh)
    carry_in = tuple(_mask(reset, part) for part in _as_tuple(carry, cell))
    carry_out, _, _ = CELLS[cell].forward(w_hh.T, in_loop, carry_in, x_proj + _row(folded))
    return _from_tuple(carry_out, cell)


def _steps(per_step: Array) -> Array:
    """The step indices 0..T-1 of a `[T, ...]` array."""
    return jnp.arange(per_step.shape[0])


def _carry_ins(carry: tuple[Array, ...], carry_outs: tuple[Array, ...],
               resets: Array | None) -> tuple[Array, ...]:
    """The (reset) carry entering each step `[T, B, H]`, from the carry before step 0 and
    the carry after each step."""
    shifted = (jnp.concatenate([start[None], outs[:-1]]) for start, outs in
               zip(carry, carry_outs, strict=True))
    if resets is None:
        return tuple(shifted)
    return tuple(jnp.where(resets[:, :, None], jnp.zeros_like(part), part) for part in shifted)


def _native_lstm_run(w_hh, b_hh, b_ih, x_proj, carry, resets):
    """`run` for the LSTM by the compiled forward loop (`tbptt_jax._native`)."""
    h0, c0 = carry
    hs, cs, activations = _native.lstm_forward(w_hh, b_ih + b_hh, x_proj, h0, c0, resets)
    return (hs[-1], cs[-1]), (hs, cs), activations, None


def _native_lstm_reverse(w_hh, carry_ins, resets, carry_outs, activations, extras, dcarry_out,
                         dhs):
    """`reverse` for the LSTM by the compiled reverse loop: the gate gradients are both the
    projection's gradient and that of `h_in W_hh^T + b_hh`. The kernel takes the cell state
    before step 0 (already reset where `resets[0]`, which the kernel applies again: the
    same)."""
    (_, c_ins), (hs, cs), (dh, dc) = carry_ins, carry_outs, dcarry_out
    c0 = c_ins[0]
    d_gates, dh0, dc0 = _native.lstm_backward(w_hh, activations, hs, cs, c0, resets, dhs, dh,
                                              dc)
    return (d_gates, d_gates), (dh0, dc0)


def _compiled_on_cpu(native: Callable[..., Any], pure: Callable[..., Any]) -> Callable[..., Any]:
    """`native` (the compiled kernels) where the program runs on CPU, `pure` (the same
    function in JAX) elsewhere; and `pure` wherever a transformation meets the call, since
    the kernels have no rules of their own: its derivatives (differentiating through a
    training step, a gradient of a gradient) and its batching (`vmap` over an ensemble's
    parameters) are the pure loops'."""

    def by_platform(*args):
        return jax.lax.platform_dependent(*args, cpu=native, default=pure)

    batched = jax.custom_batching.custom_vmap(by_platform)

    @batched.def_vmap
    def _(axis_size, in_batched, *args):
        in_axes = jax.tree.map(lambda is_batched: 0 if is_batched else None, in_batched)
        out = jax.vmap(pure, in_axes=tuple(in_axes), axis_size=axis_size)(*args)
        return out, jax.tree.map(lambda _: True, out)

    differentiable = jax.custom_jvp(batched)
    differentiable.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    return differentiable


def gradients_shared(cell: str) -> bool:
    """Whether the gradients of a layer's input projection and of its recurrent product
    `h W_hh^T` are one array (the gate gradients of the LSTM and Elman cells; the GRU's
    differ in the n gate, which `r` scales inside the recurrent product)."""
    return CELLS[cell].finish is _same


def _weight_gradient(weight: Array, inputs: Array, d_out: Array, d_out_shared: bool) -> Array:
    """The gradient of `weight[M, N]` in `inputs[..., N] @ weight^T`: `d_out^T @ inputs`
    summed over every leading axis, typed as `weight` is.

    XLA forms `d_out^T @ inputs` by first transposing the whole `d_out` (the gate gradients
    `[T, B, G*H]`, a softmax's `[T, B, O]`: the window's largest arrays). Where `d_out`
    feeds two weight gradients (`d_out_shared`: an LSTM's `dW_ih` and `dW_hh`) it does so
    once for both, and that form is the fastest; where it feeds one, the product is formed
    as `(inputs^T @ d_out)^T`, which transposes only the result `[N, M]` and at most
    `inputs` (benchmarks/NOTES.md, changes 29-30). The leading axes are contracted as they
    are, not reshaped to rows: with the batch sharded over devices, a reshape would make
    XLA gather it, while this way each device contracts its own rows.

    On a mesh with `Explicit` axes the batch's sharding is part of the operands' types, and
    JAX asks what a contraction over a sharded axis should give: the weight's own sharding
    (a gradient is typed as its primal), which for replicated weights is the all-reduce."""
    leading = tuple(range(inputs.ndim - 1))
    contract_leading = ((leading, leading), ((), ()))
    sharding = jax.typeof(weight).sharding
    if d_out_shared:
        return jax.lax.dot_general(d_out, inputs, contract_leading, out_sharding=sharding)
    transposed = sharding.update(spec=jax.sharding.PartitionSpec(*sharding.spec[::-1]))
    return jax.lax.dot_general(inputs, d_out, contract_leading, out_sharding=transposed).T


def project(weight: Array, inputs: Array, d_out_shared: bool) -> Array:
    """`inputs[..., N] @ weight[M, N]^T`: a window's input projection or readout.

    `d_out_shared`: whether the gradient of the result also feeds another weight gradient
    (see `gradients_shared`). Autodiff's backward has XLA transpose that gradient,
    `d_out[..., M]`, for the weight gradient: the right choice where the transposition
    serves another product too, or where `d_out` is no wider than `inputs`. Otherwise the
    weight gradient is formed as `(inputs^T @ d_out)^T` (`_weight_gradient`)."""
    out_size, in_size = weight.shape
    if d_out_shared or out_size <= in_size:
        return inputs @ weight.T
    return _project_unshared(weight, inputs)


@jax.custom_vjp
def _project_unshared(weight: Array, inputs: Array) -> Array:
    return inputs @ weight.T


def _project_forward(weight, inputs):
    return _project_unshared(weight, inputs), (weight, inputs)


def _project_backward(residuals, d_out):
    weight, inputs = residuals
    return _weight_gradient(weight, inputs, d_out, False), d_out @ weight


_project_unshared.defvjp(_project_forward, _project_backward)


@cache
def layer(cell: str, native: bool | None = None) -> Callable[..., tuple[Any, Array]]:
    """The layer function of `cell` ("elman", "gru" or "lstm"), with its custom backward.

    `native`: run the LSTM's two loops by the compiled CPU kernels (`tbptt_jax._native`)
    where the program runs on CPU; default: wherever they are available. The other cells
    (and the LSTM on other platforms) run the pure-JAX loops below.

    Args (of the returned function):
      w_hh: `[G*H, H]`, the recurrent weights (torch's `weight_hh_l*`).
      b_hh: `[G*H]`, the recurrent bias (torch's `bias_hh_l*`).
      b_ih: `[G*H]`, the input bias (torch's `bias_ih_l*`).
      x_proj: `[T, B, G*H]`, the input projection of every step, `xs @ W_ih^T`.
      carry: the layer's state before step 0: h `[B, H]`, or `(h, c)` for the LSTM.
      resets: None, or bool `[T, B]`: where true the carry is zeroed before that step.

    Returns:
      `(carry, hs)`: the state after the last step and the hidden states `[T, B, H]`.

    The kernels take float32 and float64; a layer in another precision (bfloat16, float16)
    runs the pure-JAX loops, chosen when the call is traced.
    """
    if native is None:
        native = cell == "lstm" and _native.available()
    if native and cell != "lstm":
        raise ValueError(f"no compiled kernels for the {cell!r} cell, only for the LSTM")
    if native and not _native.available():
        raise RuntimeError("the compiled LSTM kernels are unavailable here (see the warning)")
    pure = _layer(cell, native=False)
    if not native:
        return pure
    compiled = _layer(cell, native=True)

    def recurrent_layer(w_hh, b_hh, b_ih, x_proj, carry, resets):
        operands = (w_hh, b_hh, b_ih, x_proj, *_as_tuple(carry, cell))
        chosen = compiled if _native.takes(*operands) else pure
        return chosen(w_hh, b_hh, b_ih, x_proj, carry, resets)

    return recurrent_layer


@cache
def _layer(cell: str, native: bool) -> Callable[..., tuple[Any, Array]]:
    """`layer(cell)` with its loops chosen: the compiled kernels on CPU (`native`), else
    the pure-JAX loops."""
    cell_fns = CELLS[cell]

    def run(w_hh, b_hh, b_ih, x_proj, carry, resets, keep):
        folded, in_loop = cell_fns.loop_bias(b_ih, b_hh)
        # Materialised once per window: a product against W_hh^T in row-major order is
        # faster on CPU than XLA's transposed-operand product, which it would fold back in.
        w_t = jax.lax.optimization_barrier(w_hh.T)

        over_projection = cell_fns.over_projection

        def body(state, step_inputs):
            carry_parts, rows = state
            t, x_t, reset_t = step_inputs
            if over_projection:  # and the biases are added here, in the step's elementwise kernel
                x_t = jax.lax.dynamic_index_in_dim(rows, t, keepdims=False) + _row(folded)
            carry_in = tuple(_mask(reset_t, part) for part in carry_parts)
            carry_out, row, extra = cell_fns.forward(w_t, in_loop, carry_in, x_t)
            if keep and over_projection:  # the step's projection row is read: reuse it
                rows = jax.lax.dynamic_update_index_in_dim(rows, row, t, 0)
            return (carry_out, rows), (carry_out, extra if keep else None)

        # Over the projection the loop carries it and is given the step's index; else it is
        # given the step's row with the bias (at B=1, H=16 adding the bias in the loop cost
        # the Elman cell 30%).
        (carry_out, rows), (carry_outs, extras) = jax.lax.scan(
            body, (_as_tuple(carry, cell), x_proj if over_projection else None),
            (_steps(x_proj) if over_projection else None,
             None if over_projection else x_proj + _row(folded)[None], resets))
        return _from_tuple(carry_out, cell), carry_outs, rows, extras

    def run_on_platform(w_hh, b_hh, b_ih, x_proj, carry, resets, keep):
        pure = partial(run, keep=keep)
        chosen = _compiled_on_cpu(_native_lstm_run, pure) if native else pure
        return chosen(w_hh, b_hh, b_ih, x_proj, carry, resets)

    @jax.custom_vjp
    def recurrent_layer(w_hh, b_hh, b_ih, x_proj, carry, resets):
        carry_out, carry_outs, _, _ = run_on_platform(w_hh, b_hh, b_ih, x_proj, carry, resets,
                                                      keep=False)
        return carry_out, carry_outs[0]

    def forward(w_hh, b_hh, b_ih, x_proj, carry, resets):
        carry_out, carry_outs, rows, extras = run_on_platform(w_hh, b_hh, b_ih, x_proj, carry,
                                                              resets, keep=True)
        return (carry_out, carry_outs[0]), (w_hh, _as_tuple(carry, cell), resets, carry_outs,
                                            rows, extras)

    def reverse(w_hh, carry_ins, resets, carry_outs, rows, extras, dcarry_out, dhs):
        """The reverse loop: (what it gives per step, dcarry before step 0)."""
        factors = cell_fns.prepare(carry_ins, carry_outs, rows, extras)

        over_projection = cell_fns.over_projection

        def body(state, step_inputs):
            dcarry_parts, outs = state
            t, dh_t, reset_t, factors_t = step_inputs
            dcarry_parts = (dcarry_parts[0] + dh_t, *dcarry_parts[1:])
            dcarry_in, out_t = cell_fns.backward(w_hh, factors_t, dcarry_parts)
            dcarry_in = tuple(_mask(reset_t, part) for part in dcarry_in)
            if over_projection:  # `prepare` has read the rows: they are free now
                return (dcarry_in, jax.lax.dynamic_update_index_in_dim(outs, out_t, t, 0)), None
            return (dcarry_in, outs), out_t

        (dcarry, outs), stacked_outs = jax.lax.scan(
            body, (dcarry_out, rows if over_projection else None),
            (_steps(dhs) if over_projection else None, dhs, resets, factors), reverse=True)
        return cell_fns.finish(outs if over_projection else stacked_outs, factors), dcarry

    def backward(residuals, cotangents):
        w_hh, carry, resets, carry_outs, rows, extras = residuals
        dcarry_out, dhs = cotangents
        carry_ins = _carry_ins(carry, carry_outs, resets)
        chosen = _compiled_on_cpu(_native_lstm_reverse, reverse) if native else reverse
        (dx_proj, dh_proj), dcarry = chosen(w_hh, carry_ins, resets, carry_outs, rows, extras,
                                            _as_tuple(dcarry_out, cell), dhs)
        # All T*B rows at once: the weight gradient as one matrix product, formed as the
        # input projection's (`project`) is.
        dw_hh = _weight_gradient(w_hh, carry_ins[0], dh_proj, gradients_shared(cell))
        db_hh = dh_proj.sum(axis=(0, 1))
        db_ih = dx_proj.sum(axis=(0, 1))  # for the LSTM and Elman cells, db_hh: XLA merges them
        return dw_hh, db_hh, db_ih, dx_proj, _from_tuple(dcarry, cell), None

    recurrent_layer.defvjp(forward, backward)
    return recurrent_layer
