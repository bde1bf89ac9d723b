"""One prenorm encoder layer as one op: x -> x' = x + Attn(LN1(x)) -> y = x' + FF(LN2(x')), run chunk
by chunk along the sequence so that every temporary (q, k, v, features, the 4x wide hidden layer)
stays cache-sized: a key pass (LN1, k and v, the key sums) then a query pass (LN1, q, outputs,
to_out, LN2, FF), through kernels.favor's two-pass driver.

Its backward is written by hand and stores x, x' and the attention output (b, n, inner); the rest
(LN, the feature projections, and unless the plan keeps them q, k, v and the hidden layer) is
recomputed per chunk. Autocast's dtype (bf16 on CPU) is used for the matmuls; LayerNorm, sums and
the residual stream stay in float32, as under autocast. It computes what the model's modules compute
for a prenorm layer with exact GELU and no dropout (tests/test_fast_path.py checks values and
gradients against them).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.favor import (FavorState, KeyGradInputs, KeySums, QueryInputs, accumulation_dtype, backward_two_pass,
                           favor_keys, favor_keys_grad, favor_queries, favor_queries_grad, favor_state,
                           forward_two_pass, scaled_projection)
from kernels.plan import Plan, autocast_off, chunk_dims, chunk_step, compute_dtype, plan_pass


class LayerWeights(NamedTuple):
    """A prenorm layer's parameters as the model holds them: attention (norm1, to_q/k/v, to_out) and
    feed-forward (norm2, w1, w2), the FAVOR+ projection (m, d), and the two LayerNorm eps last."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    to_q: torch.Tensor  # (inner, dim)
    to_k: torch.Tensor
    to_v: torch.Tensor
    to_out: torch.Tensor  # (dim, inner)
    to_out_bias: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    w1: torch.Tensor  # (ff, dim)
    b1: torch.Tensor
    w2: torch.Tensor  # (dim, ff)
    b2: torch.Tensor
    projection: torch.Tensor  # (m, d) random features, a buffer
    norm1_eps: float
    norm2_eps: float


class LayerNormParams(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


class StepWeights(NamedTuple):
    """The weights as the chunk steps use them: matmul weights in the compute dtype, LayerNorms as held."""

    norm1: LayerNormParams
    w_q: torch.Tensor  # (inner, dim)
    w_kv: torch.Tensor  # (2 inner, dim): k and v in one matmul
    w: torch.Tensor  # (m, d) c W
    w_out: torch.Tensor
    b_out: torch.Tensor
    norm2: LayerNormParams
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


class QueryGrads(NamedTuple):
    """Running weight gradients of the query pass's backward, in the accumulation dtype."""

    w2: torch.Tensor
    b2: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    w_q: torch.Tensor


class KeyGrads(NamedTuple):
    """Running weight gradients of the key pass's backward."""

    w_kv: torch.Tensor
    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor


class LayerState(NamedTuple):
    """What the forward leaves for the backward (q, hid, kv only when the plan keeps them)."""

    x_att: torch.Tensor  # (b, n, dim) x' = x + Attn(LN1(x))
    out: torch.Tensor  # (b, n, inner) the attention output before to_out
    favor: FavorState
    q: torch.Tensor | None  # (b, n, inner)
    hid: torch.Tensor | None  # (b, n, ff) the feed-forward's hidden layer before GELU
    kv: torch.Tensor | None  # (b, n, 2 inner)


def _step_weights(weights: LayerWeights, dtype: torch.dtype) -> StepWeights:
    lp = lambda t: t.to(dtype)  # noqa: E731
    return StepWeights(LayerNormParams(weights.norm1_weight, weights.norm1_bias, weights.norm1_eps), lp(weights.to_q),
                       lp(torch.cat((weights.to_k, weights.to_v))), scaled_projection(weights.projection, dtype),
                       lp(weights.to_out), lp(weights.to_out_bias),
                       LayerNormParams(weights.norm2_weight, weights.norm2_bias, weights.norm2_eps), lp(weights.w1),
                       lp(weights.b1), lp(weights.w2), lp(weights.b2))


def _layer_norm(x: torch.Tensor, norm: LayerNormParams) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def _layer_norm_stats(x: torch.Tensor, eps: float):
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + eps)
    return (x - mean) * rstd, rstd  # x hat, 1 / std


def _layer_norm_grad(d_out, x_hat, rstd, weight):
    """d loss / dx of LN(x) = x_hat * weight + bias, given d loss / d LN(x)."""
    g = d_out * weight
    return rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))


def _gelu_grad(h):
    return 0.5 * (1.0 + torch.erf(h * 0.7071067811865476)) + h * torch.exp(-0.5 * h * h) * 0.3989422804014327


def _rows(t):  # (b, c, k) -> (b * c, k)
    return t.reshape(-1, t.shape[-1])


def _accumulate(running, chunk_part):
    """running + chunk_part() for a weight that trains; a frozen weight's gradient (None) is never computed."""
    return None if running is None else running + chunk_part()


# --------------------------------------------------------------------------------------------------
# chunk steps (compiled as a whole when the plan says so)


@chunk_dims(x_c=1)
def _layer_keys_step(x_c, weights: StepWeights, sums: KeySums, track: bool = False, keep_kv: bool = False):
    """Key pass of one chunk: x_c (b, c, dim) residual stream -> (KeyChunk (tracked for training),
    and with keep_kv k and v (b, c, 2 inner) for the backward, else None)."""
    b, c, _ = x_c.shape
    h, d = sums.context.shape[1], sums.context.shape[-1]
    xn = _layer_norm(x_c, weights.norm1).to(weights.w.dtype)
    kv_rows = F.linear(xn, weights.w_kv)
    kv = kv_rows.view(b, c, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, b, h, c, d)
    chunk = favor_keys(kv[0], kv[1], weights.w, sums, track)
    chunk = chunk._replace(sums=chunk.sums._replace(v_sum=sums.v_sum + kv[1].sum(2, dtype=sums.context.dtype)))
    return chunk, kv_rows if keep_kv else None


@chunk_dims(x_c=1)
def _layer_queries_step(x_c, weights: StepWeights, keys: QueryInputs, keep_qh: bool = False):
    """Query pass of one chunk -> (y_c, normaliser (b, h, c), x'_c, attention output (b, c, inner)),
    and with keep_qh also q (b, c, inner) and the feed-forward's hidden layer before GELU."""
    b, c, _ = x_c.shape
    h, d = keys.context_lp.shape[1], keys.context_lp.shape[-1]
    cdt = weights.w.dtype
    xn = _layer_norm(x_c, weights.norm1).to(cdt)
    q_rows = F.linear(xn, weights.w_q)
    out, den = favor_queries(q_rows.view(b, c, h, d).transpose(1, 2), weights.w, keys)
    out = out.transpose(1, 2).reshape(b, c, h * d).to(cdt)
    x_att = x_c + F.linear(out, weights.w_out, weights.b_out).to(x_c.dtype)
    xn2 = _layer_norm(x_att, weights.norm2).to(cdt)
    hid = F.linear(xn2, weights.w1, weights.b1)
    y = x_att + F.linear(F.gelu(hid), weights.w2, weights.b2).to(x_c.dtype)
    return (y, den, x_att, out, q_rows, hid) if keep_qh else (y, den, x_att, out)


@chunk_dims(x_c=1, x_att=1, out_c=1, den_c=2, dy=1, q_c=1, hid_c=1)
def _layer_queries_grad_step(x_c, x_att, out_c, den_c, dy, weights: StepWeights, context_lp, k_sum,
                             grads: QueryGrads, q_c=None, hid_c=None):
    """Backward of the query pass of one chunk, from d loss / dy; q_c, hid_c: q and the hidden layer
    if the forward kept them (else recomputed). -> (d x' (the residual part of dx), d LN1(x) from q,
    d context, d k_sum, updated grads)."""
    b, c, dim = x_c.shape
    h, d = context_lp.shape[1], context_lp.shape[-1]
    w, norm2 = weights.w, weights.norm2
    cdt, acc = w.dtype, den_c.dtype
    # feed-forward: recompute LN2, and the hidden layer unless the forward kept it
    xh2, rstd2 = _layer_norm_stats(x_att, norm2.eps)
    xn2 = (xh2 * norm2.weight + norm2.bias).to(cdt)
    hid = F.linear(xn2, weights.w1, weights.b1) if hid_c is None else hid_c
    dy_lp = dy.to(cdt)
    g_w2 = _accumulate(grads.w2, lambda: torch.matmul(_rows(dy_lp).t(), _rows(F.gelu(hid))).to(acc))
    g_b2 = _accumulate(grads.b2, lambda: _rows(dy).sum(0))
    d_hid = torch.matmul(dy_lp, weights.w2).to(acc) * _gelu_grad(hid.to(acc))
    d_hid_lp = d_hid.to(cdt)
    g_w1 = _accumulate(grads.w1, lambda: torch.matmul(_rows(d_hid_lp).t(), _rows(xn2)).to(acc))
    g_b1 = _accumulate(grads.b1, lambda: _rows(d_hid).sum(0))
    d_xn2 = torch.matmul(d_hid_lp, weights.w1).to(acc)
    g_n2w = _accumulate(grads.norm2_weight, lambda: _rows(d_xn2 * xh2).sum(0))
    g_n2b = _accumulate(grads.norm2_bias, lambda: _rows(d_xn2).sum(0))
    d_att = dy + _layer_norm_grad(d_xn2, xh2, rstd2, norm2.weight)  # d loss / dx'
    # attention output projection
    d_att_lp = d_att.to(cdt)
    g_wo = _accumulate(grads.w_out, lambda: torch.matmul(_rows(d_att_lp).t(), _rows(out_c)).to(acc))
    g_bo = _accumulate(grads.b_out, lambda: _rows(d_att).sum(0))
    d_out = torch.matmul(d_att_lp, weights.w_out).to(acc).view(b, c, h, d).transpose(1, 2)
    # FAVOR+ queries: recompute LN1, and q unless kept
    xn = F.layer_norm(x_c, (dim,), *weights.norm1).to(cdt)
    q = (F.linear(xn, weights.w_q) if q_c is None else q_c).view(b, c, h, d).transpose(1, 2)
    out = out_c.view(b, c, h, d).transpose(1, 2).to(acc)
    dq, d_context, d_k_sum = favor_queries_grad(q, d_out, out, den_c, w, context_lp, k_sum)
    dq_lp = dq.transpose(1, 2).reshape(b, c, h * d).to(cdt)
    g_wq = _accumulate(grads.w_q, lambda: torch.matmul(_rows(dq_lp).t(), _rows(xn)).to(acc))
    d_xn = torch.matmul(dq_lp, weights.w_q).to(acc)
    return d_att, d_xn, d_context, d_k_sum, QueryGrads(g_w2, g_b2, g_w1, g_b1, g_n2w, g_n2b, g_wo, g_bo, g_wq)


@chunk_dims(x_c=1, d_att=1, d_xn=1, tie_rows=2, kv_c=1)
def _layer_keys_grad_step(x_c, d_att, d_xn, weights: StepWeights, key_grads: KeyGradInputs, grads: KeyGrads,
                          tie_rows, kv_c=None):
    """Backward of the key pass of one chunk; finishes dx. tie_rows: the chunk's part of the
    forward's record of the rows attaining the key maximum; kv_c: k and v if the forward kept them.
    -> (dx_c, updated grads)."""
    b, c, _ = x_c.shape
    h, d = key_grads.d_context_lp.shape[1], key_grads.d_context_lp.shape[-1]
    norm1 = weights.norm1
    cdt, acc = weights.w.dtype, key_grads.d_k_sum.dtype
    xh, rstd = _layer_norm_stats(x_c, norm1.eps)
    xn = (xh * norm1.weight + norm1.bias).to(cdt)
    kv = (F.linear(xn, weights.w_kv) if kv_c is None else kv_c).view(b, c, 2, h, d).permute(2, 0, 3, 1, 4)
    dk, dv = favor_keys_grad(kv[0], kv[1], weights.w, key_grads, tie_rows)
    d_kv = torch.stack((dk, dv)).permute(1, 3, 0, 2, 4).reshape(b, c, 2 * h * d).to(cdt)
    g_wkv = _accumulate(grads.w_kv, lambda: torch.matmul(_rows(d_kv).t(), _rows(xn)).to(acc))
    d_xn = d_xn + torch.matmul(d_kv, weights.w_kv).to(acc)
    g_n1w = _accumulate(grads.norm1_weight, lambda: _rows(d_xn * xh).sum(0))
    g_n1b = _accumulate(grads.norm1_bias, lambda: _rows(d_xn).sum(0))
    return d_att + _layer_norm_grad(d_xn, xh, rstd, norm1.weight), KeyGrads(g_wkv, g_n1w, g_n1b)


# --------------------------------------------------------------------------------------------------
# the passes


def _layer_forward(x: torch.Tensor, weights: StepWeights, plan: Plan, keep: bool):
    """-> (y, LayerState for the backward, or None without keep)."""
    b, n, _ = x.shape
    w, w_q, w_kv, w1 = weights.w, weights.w_q, weights.w_kv, weights.w1
    d = w.shape[1]
    h = w_q.shape[0] // d
    key_step, query_step = chunk_step(_layer_keys_step, plan), chunk_step(_layer_queries_step, plan)
    keep_more = keep and plan.keep
    new = lambda width: torch.empty(b, n, width, dtype=w.dtype, device=x.device)  # noqa: E731
    kv = new(w_kv.shape[0]) if keep_more else None
    y = torch.empty_like(x)
    den = torch.empty(b, h, n, dtype=accumulation_dtype(w.dtype), device=x.device)
    x_att = torch.empty_like(x) if keep else None
    out = new(h * d) if keep else None
    q, hid = (new(w_q.shape[0]), new(w1.shape[0])) if keep_more else (None, None)

    def key_chunk(rows, sums):
        if not keep_more:
            return key_step(x[:, rows], weights, sums, keep)[0]
        chunk, kv[:, rows] = key_step(x[:, rows], weights, sums, True, True)
        return chunk

    def query_chunk(rows, inputs):
        if keep_more:
            y[:, rows], den[:, :, rows], x_att[:, rows], out[:, rows], q[:, rows], hid[:, rows] = query_step(
                x[:, rows], weights, inputs, True)
        elif keep:
            y[:, rows], den[:, :, rows], x_att[:, rows], out[:, rows] = query_step(x[:, rows], weights, inputs)
        else:
            y[:, rows], den[:, :, rows], _, _ = query_step(x[:, rows], weights, inputs)

    sums, tracked = forward_two_pass(plan, key_chunk, query_chunk, (b, h, w.shape[0], d), n, w.dtype, x.device,
                                     track=keep)
    if not keep:
        return y, None
    return y, LayerState(x_att, out, favor_state(sums, tracked, den), q, hid, kv)


def _layer_backward(dy: torch.Tensor, x: torch.Tensor, weights: StepWeights, plan: Plan, state: LayerState,
                    need: LayerWeights):
    """need: which weights want a gradient (LayerWeights of bools) -> (dx, QueryGrads, KeyGrads) in
    the accumulation dtype, None for the weights that do not."""
    w, w_q, w_kv, norm1 = weights.w, weights.w_q, weights.w_kv, weights.norm1
    favor = state.favor
    kept = lambda t, rows: () if t is None else (t[:, rows],)  # noqa: E731
    b, n, dim = x.shape
    acc = favor.den.dtype
    zeros = lambda t, wanted: torch.zeros(t.shape, dtype=acc, device=x.device) if wanted else None  # noqa: E731
    context_lp = favor.context.to(w.dtype)
    d_att, d_xn = torch.empty_like(x), torch.empty(b, n, dim, dtype=acc, device=x.device)
    dx = torch.empty_like(x)
    query_step = chunk_step(_layer_queries_grad_step, plan)
    key_step = chunk_step(_layer_keys_grad_step, plan)

    def queries(group):
        grads = QueryGrads(zeros(weights.w2, need.w2), zeros(weights.b2, need.b2), zeros(weights.w1, need.w1),
                           zeros(weights.b1, need.b1), zeros(weights.norm2.weight, need.norm2_weight),
                           zeros(weights.norm2.bias, need.norm2_bias), zeros(weights.w_out, need.to_out),
                           zeros(weights.b_out, need.to_out_bias), zeros(w_q, need.to_q))
        d_context, d_k_sum = torch.zeros_like(favor.context), torch.zeros_like(favor.k_sum)
        for _, rows in group:
            d_att[:, rows], d_xn[:, rows], d_c, d_s, grads = query_step(
                x[:, rows], state.x_att[:, rows], state.out[:, rows], favor.den[:, :, rows], dy[:, rows], weights,
                context_lp, favor.k_sum, grads, *kept(state.q, rows), *kept(state.hid, rows))
            d_context, d_k_sum = d_context + d_c, d_k_sum + d_s
        return grads, d_context, d_k_sum

    def keys(group, key_grads):
        grads = KeyGrads(zeros(w_kv, need.to_k or need.to_v), zeros(norm1.weight, need.norm1_weight),
                         zeros(norm1.bias, need.norm1_bias))
        for _, rows in group:
            dx[:, rows], grads = key_step(x[:, rows], d_att[:, rows], d_xn[:, rows], weights, key_grads, grads,
                                          favor.tie_rows[:, :, rows], *kept(state.kv, rows))
        return grads

    return (dx, *backward_two_pass(plan, favor, n, w.dtype, queries, keys))


class _FusedLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: Plan, dtype, *params):
        weights = LayerWeights(*params)
        y, state = _layer_forward(x, _step_weights(weights, dtype), plan, keep=True)
        ctx.plan, ctx.dtype, ctx.eps = plan, dtype, params[-2:]
        ctx.save_for_backward(x, *params[:-2], state.x_att, state.out, *state.favor, state.q, state.hid, state.kv)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, *saved = ctx.saved_tensors
        tensors = len(LayerWeights._fields) - 2
        weights = LayerWeights(*saved[:tensors], *ctx.eps)
        x_att, out, *favor = saved[tensors: tensors + 2 + len(FavorState._fields)]
        q, hid, kv = saved[tensors + 2 + len(FavorState._fields):]
        state = LayerState(x_att, out, FavorState(*favor), q, hid, kv)
        need = LayerWeights(*ctx.needs_input_grad[3:])
        with autocast_off(x.device):
            dx, gq, gk = _layer_backward(dy.contiguous(), x, _step_weights(weights, ctx.dtype), ctx.plan, state, need)
        inner = weights.to_q.shape[0]
        g_k, g_v = (None, None) if gk.w_kv is None else (gk.w_kv[:inner], gk.w_kv[inner:])
        grads = LayerWeights(gk.norm1_weight, gk.norm1_bias, gq.w_q, g_k, g_v, gq.w_out, gq.b_out, gq.norm2_weight,
                             gq.norm2_bias, gq.w1, gq.b1, gq.w2, gq.b2, None, None, None)
        grads = tuple(None if g is None or not wanted else g.to(p.dtype) for g, p, wanted in zip(grads, weights, need))
        return (dx, None, None, *grads)


def fused_layer(x: torch.Tensor, weights: LayerWeights) -> torch.Tensor:
    """x + Attn(LN1(x)), then + FF(LN2(.)), for a prenorm layer with exact GELU and no dropout."""
    dtype = compute_dtype(x)
    b, n, _ = x.shape
    features, d = weights.projection.shape
    shape = (x.device, b, n, weights.to_q.shape[0] // d, features, dtype)
    with autocast_off(x.device):
        tensors = [x, *weights[:-2]]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            kept_bytes = b * n * (3 * weights.to_q.shape[0] + weights.w1.shape[0]) * dtype.itemsize
            return _FusedLayerFunction.apply(x, plan_pass(*shape, kept_bytes), dtype, *weights)
        return _layer_forward(x, _step_weights(weights, dtype), plan_pass(*shape), keep=False)[0]
