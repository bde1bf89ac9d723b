"""The Triton kernels behind kernels.triton_favor (which documents the maths and launches them).
Importing this module imports triton: kernels.triton_favor imports it on the first launch only, so
that `import kernels` works without triton.

Every kernel keeps its (positions x features) tile of projections p = x (c W)^T and features in
registers; only d-wide rows, the (m, d) sums and per-row scalars touch memory. Tiles are BLOCK_N
positions by BLOCK_M features by the head width d (padded to BLOCK_D, a power of two >= 16).
Matmuls accumulate in float32 with the operands cast to DOT_DTYPE: the storage dtype on a GPU,
float32 under the interpreter (whose bfloat16 dot multiplies raw bits). The projections that the
ties of a maximum are found in are computed by one helper (`_projections`) at the same block sizes
in a forward and its backward, so that a recomputed maximum is bit-for-bit the stored one.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=PRECISION)


@triton.jit
def _load_rows(base, rows, cols, stride_n, stride_d, n, d):
    """A (rows, cols) tile of one head's (n, d) matrix, zero outside it."""
    mask = (rows[:, None] < n) & (cols[None, :] < d)
    return tl.load(base + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def _projections(x, w, valid, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """p = x w^T (BLOCK_N, BLOCK_M) in float32, -inf outside `valid`."""
    zero = tl.zeros((x.shape[0], w.shape[0]), dtype=tl.float32)
    p = _dot(x, tl.trans(w), zero, DOT_DTYPE, PRECISION)
    return tl.where(valid, p, float("-inf"))


@triton.jit
def _head_rows(ptr, cell, head, rows, cols, stride_b, stride_n, stride_h, stride_d, n, d):
    """Rows of one cell's head of a (b, n, h, d) tensor of any strides, zero outside it."""
    return _load_rows(ptr + cell.to(tl.int64) * stride_b + head * stride_h, rows, cols, stride_n, stride_d, n, d)


@triton.jit
def _store_head_rows(ptr, x, cell, head, rows, cols, n, h, d):
    """Stores x into rows of one cell's head of a contiguous (b, n, h, d) tensor."""
    offsets = cell.to(tl.int64) * n * h * d + rows[:, None] * (h * d) + head * d + cols[None, :]
    tl.store(ptr + offsets, x, mask=(rows[:, None] < n) & (cols[None, :] < d))


@triton.jit
def _half_c2_norm(x, half_c2):
    """a(x) = c^2 |x|^2 / 2 per row, in float32."""
    xf = x.to(tl.float32)
    return tl.sum(xf * xf, 1) * half_c2


@triton.jit
def _position_tile(h, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """A grid (position tiles, b * h) program's (cell * h + head, cell, head, rows, columns)."""
    bh = tl.program_id(1)
    return bh, bh // h, bh % h, tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)


@triton.jit
def _feature_block(block, w_ptr, matrix_ptr, vector_ptr, sums, cols, m, d, BLOCK_M: tl.constexpr):
    """Feature block `block`: (its feature indices, rows of w, rows of the head's (m, d) matrix at
    matrix_ptr + sums * d, entries of its (m,) vector at vector_ptr + sums), zero past m."""
    feats = block * BLOCK_M + tl.arange(0, BLOCK_M)
    w = _load_rows(w_ptr, feats, cols, d, 1, m, d)
    matrix = _load_rows(matrix_ptr + sums * d, feats, cols, d, 1, m, d)
    vector = tl.load(vector_ptr + sums + feats, mask=feats < m, other=0.0)
    return feats, w, matrix, vector


@triton.jit
def favor_keys_kernel(
    k_ptr, v_ptr, w_ptr, context_ptr, k_sum_ptr, max_ptr, count_ptr, v_sum_ptr,
    stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
    n, h, m, d, half_c2, tiles_per_split, splits,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (splits, feature blocks, b * h). One program sums one feature block over one split of
    the positions with its own running maximum (rescaling what it has when the maximum rises) and
    writes partial sums relative to that maximum, the number of entries equal to it, and (feature
    block 0) the split's sum of v. Partial layouts: context (b, h, splits, m_pad, d), k_sum
    (b, h, splits, m_pad), max and count (b, h, splits, feature blocks), v_sum (b, h, splits, d)."""
    split = tl.program_id(0)
    block = tl.program_id(1)
    bh = tl.program_id(2)
    cell = bh // h
    head = bh % h
    m_blocks = tl.num_programs(1)
    feats = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    w = _load_rows(w_ptr, feats, cols, d, 1, m, d)  # (BLOCK_M, BLOCK_D), kept for every tile

    run_max = tl.max(tl.full((BLOCK_M,), float("-inf"), tl.float32), 0)
    count = tl.sum(tl.zeros((BLOCK_M,), tl.float32), 0)
    context = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    k_sum = tl.zeros((BLOCK_M,), tl.float32)
    v_sum = tl.zeros((BLOCK_D,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for tile in range(first, last):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _head_rows(k_ptr, cell, head, rows, cols, stride_kb, stride_kn, stride_kh, stride_kd, n, d)
        v = _head_rows(v_ptr, cell, head, rows, cols, stride_vb, stride_vn, stride_vh, stride_vd, n, d)
        valid = (rows[:, None] < n) & (feats[None, :] < m)
        p = _projections(k, w, valid, DOT_DTYPE, PRECISION)  # (BLOCK_N, BLOCK_M)
        new_max = tl.maximum(run_max, tl.max(tl.max(p, 1), 0))
        e = tl.exp(p - _half_c2_norm(k, half_c2)[:, None] - new_max)  # 0 outside `valid`
        rescale = tl.exp(run_max - new_max)
        context = _dot(tl.trans(e), v, context * rescale, DOT_DTYPE, PRECISION)
        k_sum = k_sum * rescale + tl.sum(e, 0)
        ties = tl.sum(tl.sum((p == new_max).to(tl.float32), 1), 0)
        count = tl.where(new_max == run_max, count, 0.0) + ties
        run_max = new_max
        v_sum += tl.sum(v.to(tl.float32), 0)

    part = bh * splits + split  # (cell, head, split) of the partial layouts
    m_pad = m_blocks * BLOCK_M
    offsets = part.to(tl.int64) * m_pad * d + feats[:, None] * d + cols[None, :]
    tl.store(context_ptr + offsets, context, mask=cols[None, :] < d)
    tl.store(k_sum_ptr + part.to(tl.int64) * m_pad + feats, k_sum)
    tl.store(max_ptr + part * m_blocks + block, run_max)
    tl.store(count_ptr + part * m_blocks + block, count)
    tl.store(v_sum_ptr + part.to(tl.int64) * d + cols, v_sum, mask=cols < tl.where(block == 0, d, 0))


@triton.jit
def favor_queries_kernel(
    q_ptr, w_ptr, context_ptr, k_sum_ptr, eps_v_ptr, eps_s_ptr, out_ptr, row_max_ptr, den_ptr, row_count_ptr,
    stride_qb, stride_qn, stride_qh, stride_qd,
    n, h, m, d, half_c2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (position tiles, b * h). Loops over the feature blocks with an online row maximum;
    context (b, h, m, d) in the compute dtype and k_sum (b, h, m) are the finished key sums, eps_v
    (b, h, d) and eps_s (b, h) their eps terms. Writes out (b, n, h, d, contiguous) and, for the
    backward, each row's maximum, normaliser and number of features at its maximum (b, h, n)."""
    bh, cell, head, rows, cols = _position_tile(h, BLOCK_N, BLOCK_D)
    q = _head_rows(q_ptr, cell, head, rows, cols, stride_qb, stride_qn, stride_qh, stride_qd, n, d)
    a = _half_c2_norm(q, half_c2)
    sums = bh.to(tl.int64) * m
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    count = tl.zeros((BLOCK_N,), tl.float32)
    num = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    den = tl.zeros((BLOCK_N,), tl.float32)
    for block in range(0, tl.cdiv(m, BLOCK_M)):
        feats, w, context, k_sum = _feature_block(block, w_ptr, context_ptr, k_sum_ptr, sums, cols, m, d, BLOCK_M)
        p = _projections(q, w, feats[None, :] < m, DOT_DTYPE, PRECISION)  # rows past n: q = 0, finite
        new_max = tl.maximum(run_max, tl.max(p, 1))
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(p - (new_max + a)[:, None])
        num = _dot(e, context, num * rescale[:, None], DOT_DTYPE, PRECISION)
        den = den * rescale + tl.sum(e * k_sum[None, :], 1)
        ties = tl.sum((p == new_max[:, None]).to(tl.float32), 1)
        count = tl.where(new_max == run_max, count, 0.0) + ties
        run_max = new_max
    eps_v = tl.load(eps_v_ptr + bh.to(tl.int64) * d + cols, mask=cols < d, other=0.0)
    den = den + tl.load(eps_s_ptr + bh)
    _store_head_rows(out_ptr, (num + eps_v[None, :]) / den[:, None], cell, head, rows, cols, n, h, d)
    row_offsets = bh.to(tl.int64) * n + rows
    tl.store(row_max_ptr + row_offsets, run_max, mask=rows < n)
    tl.store(den_ptr + row_offsets, den, mask=rows < n)
    tl.store(row_count_ptr + row_offsets, count, mask=rows < n)


@triton.jit
def favor_queries_grad_kernel(
    q_ptr, g_ptr, out_ptr, den_ptr, row_max_ptr, row_count_ptr, w_ptr, context_ptr, k_sum_ptr, eps_v_ptr, eps_s_ptr,
    dq_ptr, d_context_ptr, d_k_sum_ptr, g_num_sum_ptr, g_den_sum_ptr,
    stride_qb, stride_qn, stride_qh, stride_qd, stride_gb, stride_gn, stride_gh, stride_gd,
    n, h, m, d, half_c2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (position tiles, b * h). With g = d loss / d out, g_num = g / den and g_den =
    -(g . out) / den, recomputes the query features block by block: writes dq (b, n, h, d,
    contiguous) and adds this tile's d context = f^T g_num and d k_sum = f^T g_den (without the
    queries' eps terms) and its sums of g_num and g_den (for those eps terms) into float32 buffers
    (b, h, m, d), (b, h, m), (b, h, d), (b, h) with atomics. The features' sum of d loss / d p,
    which the row maximum and the query norm receive, has a closed form that needs no pass over
    the features: eps ((g . out) sum_j s_j - g . sum_j C_j) / den."""
    bh, cell, head, rows, cols = _position_tile(h, BLOCK_N, BLOCK_D)
    q = _head_rows(q_ptr, cell, head, rows, cols, stride_qb, stride_qn, stride_qh, stride_qd, n, d)
    g = _head_rows(g_ptr, cell, head, rows, cols, stride_gb, stride_gn, stride_gh, stride_gd, n, d).to(tl.float32)
    out = _head_rows(out_ptr, cell, head, rows, cols, n * h * d, h * d, d, 1, n, d).to(tl.float32)
    row_offsets = bh.to(tl.int64) * n + rows
    den = tl.load(den_ptr + row_offsets, mask=rows < n, other=1.0)
    row_max = tl.load(row_max_ptr + row_offsets, mask=rows < n, other=0.0)
    row_count = tl.load(row_count_ptr + row_offsets, mask=rows < n, other=1.0)
    eps_v = tl.load(eps_v_ptr + bh.to(tl.int64) * d + cols, mask=cols < d, other=0.0)
    eps_s = tl.load(eps_s_ptr + bh)
    a = _half_c2_norm(q, half_c2)
    g_out = tl.sum(g * out, 1)
    g_num = (g / den[:, None]).to(DOT_DTYPE)  # (BLOCK_N, BLOCK_D), 0 outside the rows; a dot operand only
    g_den = -g_out / den
    row_sum = (g_out * eps_s - tl.sum(g * eps_v[None, :], 1)) / den  # sum_j d loss / d p_j
    tie_share = row_sum / row_count
    sums = bh.to(tl.int64) * m
    dq = -(row_sum * 2.0 * half_c2)[:, None] * q.to(tl.float32)  # through a: d a / d q = c^2 q
    tl.atomic_add(g_num_sum_ptr + bh.to(tl.int64) * d + cols, tl.sum(g_num.to(tl.float32), 0), mask=cols < d)
    tl.atomic_add(g_den_sum_ptr + bh, tl.sum(g_den, 0))
    for block in range(0, tl.cdiv(m, BLOCK_M)):
        feats, w, context, k_sum = _feature_block(block, w_ptr, context_ptr, k_sum_ptr, sums, cols, m, d, BLOCK_M)
        valid = (rows[:, None] < n) & (feats[None, :] < m)
        p = _projections(q, w, valid, DOT_DTYPE, PRECISION)
        e = tl.exp(p - (row_max + a)[:, None])  # f - eps; 0 outside `valid`
        zero = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        d_feat = _dot(g_num, tl.trans(context), zero, DOT_DTYPE, PRECISION) + g_den[:, None] * k_sum[None, :]
        ties = valid & (p == row_max[:, None])
        d_proj = d_feat * e - tl.where(ties, tie_share[:, None], 0.0)
        dq = _dot(d_proj, w, dq, DOT_DTYPE, PRECISION)
        d_context = _dot(tl.trans(e), g_num, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), DOT_DTYPE, PRECISION)
        tl.atomic_add(d_context_ptr + (sums + feats[:, None]) * d + cols[None, :], d_context,
                      mask=(feats[:, None] < m) & (cols[None, :] < d))
        tl.atomic_add(d_k_sum_ptr + sums + feats, tl.sum(e * g_den[:, None], 0), mask=feats < m)
    _store_head_rows(dq_ptr, dq, cell, head, rows, cols, n, h, d)


@triton.jit
def favor_keys_grad_kernel(
    k_ptr, v_ptr, w_ptr, d_context_ptr, d_k_sum_ptr, d_eps_v_ptr, key_max_ptr, d_key_max_ptr, key_count_ptr,
    dk_ptr, dv_ptr,
    stride_kb, stride_kn, stride_kh, stride_kd, stride_vb, stride_vn, stride_vh, stride_vd,
    n, h, m, d, half_c2,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (position tiles, b * h). d_context (b, h, m, d) in the compute dtype and d_k_sum
    (b, h, m) are the finished gradients of the key sums, d_eps_v (b, h, d) = eps sum_j dC_j.
    Recomputes the key features block by block and writes dk, dv (b, n, h, d, contiguous). The
    gradient through the cell's key maximum, d_key_max (b,), is shared by the entries whose
    projection equals the stored maximum, key_count (b,) of them (counted in the forward)."""
    bh, cell, head, rows, cols = _position_tile(h, BLOCK_N, BLOCK_D)
    k = _head_rows(k_ptr, cell, head, rows, cols, stride_kb, stride_kn, stride_kh, stride_kd, n, d)
    v = _head_rows(v_ptr, cell, head, rows, cols, stride_vb, stride_vn, stride_vh, stride_vd, n, d)
    a = _half_c2_norm(k, half_c2)
    key_max = tl.load(key_max_ptr + cell)
    tie_share = tl.load(d_key_max_ptr + cell) / tl.load(key_count_ptr + cell)
    sums = bh.to(tl.int64) * m
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    row_sum = tl.zeros((BLOCK_N,), tl.float32)
    for block in range(0, tl.cdiv(m, BLOCK_M)):
        feats, w, d_context, d_k_sum = _feature_block(block, w_ptr, d_context_ptr, d_k_sum_ptr, sums, cols, m, d,
                                                      BLOCK_M)
        valid = (rows[:, None] < n) & (feats[None, :] < m)
        p = _projections(k, w, valid, DOT_DTYPE, PRECISION)
        e = tl.exp(p - a[:, None] - key_max)  # phi - eps; 0 outside `valid`
        zero = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        d_expo = (_dot(v, tl.trans(d_context), zero, DOT_DTYPE, PRECISION) + d_k_sum[None, :]) * e
        row_sum += tl.sum(d_expo, 1)
        d_proj = d_expo + tl.where(valid & (p == key_max), tie_share, 0.0)
        dk = _dot(d_proj, w, dk, DOT_DTYPE, PRECISION)
        dv = _dot(e, d_context, dv, DOT_DTYPE, PRECISION)
    dk = dk - (row_sum * 2.0 * half_c2)[:, None] * k.to(tl.float32)  # through a
    dv = dv + tl.load(d_eps_v_ptr + bh.to(tl.int64) * d + cols, mask=cols < d, other=0.0)[None, :]
    _store_head_rows(dk_ptr, dk, cell, head, rows, cols, n, h, d)
    _store_head_rows(dv_ptr, dv, cell, head, rows, cols, n, h, d)
