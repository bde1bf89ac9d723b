"""FAVOR+ over sequence chunks: the same function as model.favor_attention_reference, computed so
that no (b, h, n, m) feature map is ever built, with hand-written gradients that recompute each
chunk's features instead of storing them.

Per cell and head, with p = x (c W)^T, c = d^-1/4, a(x) = c^2 |x|^2 / 2 and the published eps:
  keys     phi_n = exp(p_n - a_n - M) + eps       M: the cell's largest key projection
  queries  f_n   = exp(p_n - a_n - max_j p_nj) + eps
  out_n    = f_n^T C / f_n^T s,   C = sum_n phi_n v_n^T (m, d),  s = sum_n phi_n (m)
The ratio m^-1/2 cancels. Keys are summed with an online maximum (a chunk that raises M rescales the
sums so far, as in an online softmax); the eps terms are added in closed form (eps sum_n v_n,
eps n, eps sum_j C_j, eps sum_j s_j) and the query factor exp(-a_n) multiplies the d-vector f_n^T C
rather than the m features. Low-precision inputs keep exponents, maxima and sums in float32; matmuls
run in the input dtype with d (not d + 1) columns, which the CPU kernels handle much faster.

Every pass is two passes over the chunks (keys, then queries; in the backward queries, then keys):
`forward_two_pass` and `backward_two_pass` are the one driver that the attention op below and the
fused layer (kernels.layer) both use.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from kernels.plan import Plan, autocast_off, chunk_dims, chunk_step, run_groups, sum_parts

KERNEL_EPS = 1e-4  # added to every feature, as published (model.KERNEL_EPS; a test checks they agree)


class KeySums(NamedTuple):
    """A key pass's running sums, without the eps terms, in the accumulation dtype."""

    key_max: torch.Tensor  # (b,) the cell's largest key projection M so far
    context: torch.Tensor  # (b, h, m, d) sum_n exp(p_n - a_n - M) v_n^T
    k_sum: torch.Tensor  # (b, h, m) sum_n exp(p_n - a_n - M)
    v_sum: torch.Tensor  # (b, h, d) sum_n v_n


class QueryInputs(NamedTuple):
    """What the queries read of the finished key sums (eps terms included)."""

    context_lp: torch.Tensor  # (b, h, m, d) C in the compute dtype
    k_sum: torch.Tensor  # (b, h, m) s
    eps_v: torch.Tensor  # (b, h, d) eps sum_j C_j
    eps_s: torch.Tensor  # (b, h) eps sum_j s_j


class KeyChunk(NamedTuple):
    """What a key step returns: the sums with its chunk and, for training, each (head, position) row's
    largest projection (which rows attain the key maximum decides where its gradient goes: see
    key_max_gradient)."""

    sums: KeySums
    row_max: torch.Tensor | None  # (b, h, c) in the accumulation dtype


class FavorState(NamedTuple):
    """What a forward leaves for its backward."""

    context: torch.Tensor  # (b, h, m, d) C, eps terms included
    k_sum: torch.Tensor  # (b, h, m) s, eps terms included
    v_sum: torch.Tensor  # (b, h, d)
    key_max: torch.Tensor  # (b,)
    tie_rows: torch.Tensor  # (b, h, n) bool: the rows whose largest projection is the key maximum
    den: torch.Tensor  # (b, h, n) the queries' normalisers f^T s


class KeyGradInputs(NamedTuple):
    """What the key pass of a backward reads of the queries' gradients."""

    key_max: torch.Tensor  # (b,)
    d_context_lp: torch.Tensor  # (b, h, m, d) d loss / dC in the compute dtype
    d_k_sum: torch.Tensor  # (b, h, m)
    d_eps_v: torch.Tensor  # (b, h, d) eps sum_j dC_j
    tie_share: torch.Tensor  # (b,) d loss / dM over the number of rows that attain M


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scaled_projection(projection: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (projection.shape[1] ** -0.25 * projection).to(dtype)  # c W: scaling W once beats scaling x


# --------------------------------------------------------------------------------------------------
# the maths of one chunk


def favor_keys(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, sums: KeySums, track: bool = False) -> KeyChunk:
    """Adds a chunk of keys. k, v (b, h, c, d); w (m, d) = c W. v_sum is left to the caller (it may
    have v in another layout). track: also return each row's maximum and its feature (training)."""
    acc = sums.context.dtype
    d = k.shape[-1]
    p = torch.matmul(k, w.t())  # (b, h, c, m)
    row_max = None
    if track:
        row_max = p.amax(-1).to(acc)  # (b, h, c)
        chunk_max = row_max.flatten(1).amax(1)
    else:
        chunk_max = p.flatten(1).amax(1).to(acc)
    new_max = torch.maximum(sums.key_max, chunk_max)
    a = k.to(acc).square().sum(-1, keepdim=True) * (0.5 * d**-0.5)  # (b, h, c, 1)
    e = torch.exp(p.to(acc) - a - new_max[:, None, None, None]).to(k.dtype)
    rescale = torch.exp(sums.key_max - new_max)
    context = torch.addcmul(torch.matmul(e.transpose(-1, -2), v).to(acc), sums.context, rescale[:, None, None, None])
    k_sum = torch.addcmul(e.sum(2, dtype=acc), sums.k_sum, rescale[:, None, None])
    return KeyChunk(KeySums(new_max, context, k_sum, sums.v_sum), row_max)


def favor_queries(q: torch.Tensor, w: torch.Tensor, keys: QueryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of outputs. q (b, h, c, d) -> (out (b, h, c, d), its normaliser f^T s (b, h, c)), in
    the accumulation dtype."""
    acc = keys.k_sum.dtype
    d = q.shape[-1]
    p = torch.matmul(q, w.t()).to(acc)  # (b, h, c, m)
    e = torch.exp(p - p.amax(-1, keepdim=True)).to(q.dtype)
    ea = torch.exp(q.to(acc).square().sum(-1, keepdim=True) * (-0.5 * d**-0.5))  # exp(-a), (b, h, c, 1)
    den = ea * (e.to(acc) * keys.k_sum[:, :, None, :]).sum(-1, keepdim=True) + keys.eps_s[:, :, None, None]
    num = torch.addcmul(keys.eps_v[:, :, None, :], torch.matmul(e, keys.context_lp).to(acc), ea)
    return num / den, den[..., 0]


def favor_queries_grad(q: torch.Tensor, g: torch.Tensor, out: torch.Tensor, den: torch.Tensor, w: torch.Tensor,
                       context_lp: torch.Tensor, k_sum: torch.Tensor):
    """q (b, h, c, d); g = d loss / d out and out (b, h, c, d), den (b, h, c) in the accumulation
    dtype -> (dq, this chunk's d context (b, h, m, d), d k_sum (b, h, m)). Through the row maximum
    the gradient is split evenly between tied maxima, as torch.amax does."""
    acc = den.dtype
    cdt = q.dtype
    d = q.shape[-1]
    c2 = d**-0.5
    inv = 1.0 / den[..., None]
    g_num = g * inv  # d loss / d (f^T C)
    g_den = -(g * out).sum(-1, keepdim=True) * inv  # d loss / d (f^T s), (b, h, c, 1)
    p = torch.matmul(q, w.t()).to(acc)
    row_max = p.amax(-1, keepdim=True)
    e = torch.exp(p - row_max)
    e_lp = e.to(cdt)
    qf = q.to(acc)
    ea = torch.exp(qf.square().sum(-1, keepdim=True) * (-0.5 * c2))
    d_feat = torch.matmul(g_num.to(cdt), context_lp.transpose(-1, -2)).to(acc) + g_den * k_sum[:, :, None, :]
    d_expo = d_feat * e * ea  # through f = exp(p - a - max) + eps
    row_sum = d_expo.sum(-1, keepdim=True)
    ties = (p == row_max).to(acc)
    d_proj = d_expo - ties * (row_sum / ties.sum(-1, keepdim=True))
    dq = torch.matmul(d_proj.to(cdt), w).to(acc) - (row_sum * c2) * qf  # d a / d q = c^2 q
    d_context = torch.matmul(e_lp.transpose(-1, -2), (g_num * ea).to(cdt)).to(acc)
    d_context = d_context + KERNEL_EPS * g_num.sum(2, keepdim=True)
    d_k_sum = (e_lp.to(acc) * (g_den * ea)).sum(2) + KERNEL_EPS * g_den.sum(2)
    return dq, d_context, d_k_sum


def favor_keys_grad(k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, grads: KeyGradInputs,
                    tie_rows: torch.Tensor):
    """k, v (b, h, c, d); tie_rows (b, h, c): the forward's record of the rows that attain the key
    maximum M -> (dk, dv) in the accumulation dtype. Through M the gradient goes to those rows, at
    their largest recomputed projection: the rows come from the record, so a recomputed projection
    that differs from the forward's in the last bit cannot move it."""
    acc = grads.d_k_sum.dtype
    cdt = k.dtype
    d = k.shape[-1]
    c2 = d**-0.5
    p = torch.matmul(k, w.t())
    kf = k.to(acc)
    a = kf.square().sum(-1, keepdim=True) * (0.5 * c2)
    e = torch.exp(p.to(acc) - a - grads.key_max[:, None, None, None])
    d_feat = torch.matmul(v, grads.d_context_lp.transpose(-1, -2)).to(acc) + grads.d_k_sum[:, :, None, :]  # (b,h,c,m)
    d_expo = d_feat * e
    row_sum = d_expo.sum(-1, keepdim=True)  # d a / dk takes the features' gradient, not M's
    at_max = (p == p.amax(-1, keepdim=True)) & tie_rows[..., None]
    d_proj = torch.where(at_max, d_expo + grads.tie_share[:, None, None, None], d_expo)
    dk = torch.matmul(d_proj.to(cdt), w).to(acc) - (row_sum * c2) * kf
    dv = torch.matmul(e.to(cdt), grads.d_context_lp).to(acc) + grads.d_eps_v[:, :, None, :]
    return dk, dv


def key_max_gradient(d_context: torch.Tensor, d_k_sum: torch.Tensor, state: FavorState, n: int) -> torch.Tensor:
    """The share of d loss / dM (b,) that each row attaining M receives, as torch.amax splits it
    between tied maxima. M enters every key feature as exp(-M), so its gradient is minus the
    contraction of the sums' gradients with their exp parts (the sums without their eps terms).
    Ties are counted by rows (head, position): two features of one row equal to M, which needs
    two random projections to coincide, would both get the row's one share."""
    d_max = -((d_context * (state.context - KERNEL_EPS * state.v_sum[:, :, None, :])).sum((1, 2, 3))
              + (d_k_sum * (state.k_sum - KERNEL_EPS * n)).sum((1, 2)))
    return d_max / state.tie_rows.sum((1, 2))


# --------------------------------------------------------------------------------------------------
# the two-pass driver


def _empty_key_sums(b: int, h: int, m: int, d: int, acc: torch.dtype, device) -> KeySums:
    return KeySums(torch.full((b,), -torch.inf, dtype=acc, device=device),
                   torch.zeros(b, h, m, d, dtype=acc, device=device),
                   torch.zeros(b, h, m, dtype=acc, device=device), torch.zeros(b, h, d, dtype=acc, device=device))


def _merge_key_sums(parts: list[KeySums]) -> KeySums:
    """Combines the threads' sums onto their common maximum."""
    key_max = torch.stack([sums.key_max for sums in parts]).amax(0)
    scales = [torch.exp(sums.key_max - key_max) for sums in parts]
    context = sum(sums.context * s[:, None, None, None] for sums, s in zip(parts, scales))
    k_sum = sum(sums.k_sum * s[:, None, None] for sums, s in zip(parts, scales))
    return KeySums(key_max, context, k_sum, sum(sums.v_sum for sums in parts))


def forward_two_pass(plan: Plan, key_chunk: Callable[[slice, KeySums], KeyChunk],
                     query_chunk: Callable[[slice, QueryInputs], None], sizes: tuple[int, int, int, int],
                     n: int, dtype: torch.dtype, device, track: bool = False) -> tuple[KeySums, torch.Tensor | None]:
    """The keys, then the queries, over the plan's chunks and threads. key_chunk(rows, sums) ->
    KeyChunk (with the rows' maxima when `track`); query_chunk(rows, QueryInputs) writes its outputs
    itself. sizes = (b, h, m, d). -> (the key sums, C and s with their eps terms; with `track`, the
    rows (b, h, n) that attain M)."""
    acc = accumulation_dtype(dtype)
    b, h, m, _ = sizes
    if track:
        row_max = torch.empty(b, h, n, dtype=acc, device=device)

    def keys(group):
        sums = _empty_key_sums(*sizes, acc, device)
        for _, rows in group:
            chunk = key_chunk(rows, sums)
            sums = chunk.sums
            if track:
                row_max[:, :, rows] = chunk.row_max
        return sums

    sums = _merge_key_sums(run_groups(keys, plan))
    tie_rows = row_max == sums.key_max[:, None, None] if track else None
    context = sums.context + KERNEL_EPS * sums.v_sum[:, :, None, :]
    k_sum = sums.k_sum + KERNEL_EPS * n
    inputs = QueryInputs(context.to(dtype), k_sum, KERNEL_EPS * context.sum(2), KERNEL_EPS * k_sum.sum(2))

    def queries(group):
        for _, rows in group:
            query_chunk(rows, inputs)

    run_groups(queries, plan)
    return KeySums(sums.key_max, context, k_sum, sums.v_sum), tie_rows


def favor_state(sums: KeySums, tie_rows: torch.Tensor, den: torch.Tensor) -> FavorState:
    return FavorState(sums.context, sums.k_sum, sums.v_sum, sums.key_max, tie_rows, den)


def backward_two_pass(plan: Plan, state: FavorState, n: int, dtype: torch.dtype, query_grad_group: Callable,
                      key_grad_group: Callable):
    """The queries' gradients, then the keys'. query_grad_group(group) -> (partial results, d
    context, d k_sum) of its chunks; key_grad_group(group, KeyGradInputs) -> partial results (its
    steps take the chunk's part of state.tie_rows). -> (the query groups' partials summed, the key
    groups' partials summed)."""
    query_parts, d_context, d_k_sum = sum_parts(run_groups(query_grad_group, plan))
    tie_share = key_max_gradient(d_context, d_k_sum, state, n)
    grads = KeyGradInputs(state.key_max, d_context.to(dtype), d_k_sum, KERNEL_EPS * d_context.sum(2), tie_share)
    key_parts = sum_parts(run_groups(lambda group: key_grad_group(group, grads), plan))
    return query_parts, key_parts


# --------------------------------------------------------------------------------------------------
# FAVOR+ on given q, k, v (the module path's attention)


@chunk_dims(k_c=1, v_c=1)
def _attention_keys_step(k_c, v_c, w, sums: KeySums, track: bool = False):
    """k_c, v_c (b, c, h, d) slices."""
    k, v = k_c.transpose(1, 2), v_c.transpose(1, 2)
    chunk = favor_keys(k, v, w, sums, track)
    return chunk._replace(sums=chunk.sums._replace(v_sum=sums.v_sum + v.sum(2, dtype=sums.context.dtype)))


@chunk_dims(q_c=1)
def _attention_queries_step(q_c, w, keys: QueryInputs):
    out, den = favor_queries(q_c.transpose(1, 2), w, keys)
    return out.transpose(1, 2).to(q_c.dtype), den


@chunk_dims(q_c=1, g_c=1, out_c=1, den_c=2)
def _attention_queries_grad_step(q_c, g_c, out_c, den_c, w, context_lp, k_sum):
    acc = den_c.dtype
    dq, d_context, d_k_sum = favor_queries_grad(q_c.transpose(1, 2), g_c.transpose(1, 2).to(acc),
                                                out_c.transpose(1, 2).to(acc), den_c, w, context_lp, k_sum)
    return dq.transpose(1, 2).to(q_c.dtype), d_context, d_k_sum


@chunk_dims(k_c=1, v_c=1, tie_rows=2)
def _attention_keys_grad_step(k_c, v_c, w, grads: KeyGradInputs, tie_rows):
    dk, dv = favor_keys_grad(k_c.transpose(1, 2), v_c.transpose(1, 2), w, grads, tie_rows)
    return dk.transpose(1, 2).to(k_c.dtype), dv.transpose(1, 2).to(k_c.dtype)


def _attention_forward(q, k, v, w, plan: Plan, training: bool) -> tuple[torch.Tensor, FavorState | None]:
    """q, k, v (b, n, h, d) of any strides; w (m, d) = c W in their dtype -> (out (b, n, h, d), the
    state for the backward if training)."""
    b, n, h, d = q.shape
    key_step = chunk_step(_attention_keys_step, plan)
    query_step = chunk_step(_attention_queries_step, plan)
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    den = torch.empty(b, h, n, dtype=accumulation_dtype(q.dtype), device=q.device)

    def query_chunk(rows, inputs):
        out[:, rows], den[:, :, rows] = query_step(q[:, rows], w, inputs)

    sums, tracked = forward_two_pass(plan, lambda rows, sums: key_step(k[:, rows], v[:, rows], w, sums, training),
                                     query_chunk, (b, h, w.shape[0], d), n, q.dtype, q.device, training)
    return out, favor_state(sums, tracked, den) if training else None


class _FavorFunction(torch.autograd.Function):
    """Stores q, k, v, the output and the small sums; the backward recomputes the features."""

    @staticmethod
    def forward(ctx, q, k, v, w, plan):
        out, state = _attention_forward(q, k, v, w, plan, training=True)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, w, out, *state)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, w, out, *state = ctx.saved_tensors
        state = FavorState(*state)
        plan, n = ctx.plan, q.shape[1]
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        context_lp = state.context.to(q.dtype)
        query_step = chunk_step(_attention_queries_grad_step, plan)
        key_step = chunk_step(_attention_keys_grad_step, plan)

        def queries(group):
            d_context, d_k_sum = torch.zeros_like(state.context), torch.zeros_like(state.k_sum)
            for _, rows in group:
                dq[:, rows], d_c, d_s = query_step(q[:, rows], grad[:, rows], out[:, rows], state.den[:, :, rows], w,
                                                   context_lp, state.k_sum)
                d_context, d_k_sum = d_context + d_c, d_k_sum + d_s
            return (), d_context, d_k_sum

        def keys(group, grads):
            for _, rows in group:
                dk[:, rows], dv[:, rows] = key_step(k[:, rows], v[:, rows], w, grads, state.tie_rows[:, :, rows])
            return ()

        backward_two_pass(plan, state, n, q.dtype, queries, keys)
        return dq, dk, dv, None, None


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                    plan: Plan) -> torch.Tensor:
    """model.favor_attention_reference over the plan's chunks; q, k, v (b, n, h, d) of any strides."""
    w = scaled_projection(projection, q.dtype)
    with autocast_off(q.device):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _FavorFunction.apply(q, k, v, w, plan)
        return _attention_forward(q, k, v, w, plan, training=False)[0]
