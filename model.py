"""scBERT: a Performer (FAVOR+ linear attention) over binned gene expression.

Reads top-down like the maths: configuration, random features, FAVOR+ kernels (a plain reference and
a chunked fast path with the same numerics), attention, feed-forward, residual wrappers, embeddings,
encoder, the masked-expression head and the cell-type head.

Parameter and buffer names follow the published checkpoints (`panglao_pretrain.pth`) exactly, so their
`model_state_dict` loads with ``strict=True`` and ours load in the original code. Pure PyTorch: no file
I/O, no argparse, no global device.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """Every architecture number of the model; derived sizes are properties."""

    bin_num: int = 5  # expression bins 0..bin_num; token bin_num + 1 is [MASK] / ignore id
    gene_num: int = 16906  # genes in the panel; the sequence appends one always-zero position
    dim: int = 200  # model width (= the Gene2Vec width in the published model)
    depth: int = 6  # encoder layers
    heads: int = 10  # attention heads
    dim_head: int = 64  # width of one head; heads * dim_head may exceed dim (640 > 200 published)
    nb_features: int | None = None  # FAVOR+ random features per head; None -> int(dim_head ln dim_head)
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    emb_dropout: float = 0.0  # dropout after the embeddings (0 as published)
    attn_dropout: float = 0.0  # dropout on the attention output (0 as published)
    ff_dropout: float = 0.0  # dropout inside the feed-forward (0 as published)
    residual: str = "prenorm"  # "prenorm": x + F(LN(x)) as published; "rezero": x + g * F(x)
    pos_embed: str = "gene2vec"  # "gene2vec" (frozen float64 table), "learned" or "none"
    feature_redraw_interval: int = 1000  # training forwards between redraws of the random features
    attention: str = "fast"  # "fast" (chunked, fused) or "reference" (the plain published maths)
    attn_chunk: int = 1024  # sequence positions per chunk in the fast path (bounds temporaries)
    grad_checkpoint: bool = False  # recompute each layer in backward instead of storing activations

    def __post_init__(self) -> None:
        if self.nb_features is None:
            self.nb_features = int(self.dim_head * math.log(self.dim_head))
        if self.residual not in ("prenorm", "rezero"):
            raise ValueError(f"residual must be 'prenorm' or 'rezero', got {self.residual!r}")
        if self.pos_embed not in ("gene2vec", "learned", "none"):
            raise ValueError(f"pos_embed must be 'gene2vec', 'learned' or 'none', got {self.pos_embed!r}")
        if self.attention not in ("fast", "reference"):
            raise ValueError(f"attention must be 'fast' or 'reference', got {self.attention!r}")

    @property
    def num_tokens(self) -> int:
        return self.bin_num + 2

    @property
    def mask_token_id(self) -> int:
        return self.bin_num + 1

    @property
    def seq_len(self) -> int:
        return self.gene_num + 1

    @property
    def inner_dim(self) -> int:
        return self.heads * self.dim_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PRESETS: dict[str, ModelConfig] = {
    # the published shape (Yang et al. 2022)
    "scbert": ModelConfig(),
    # CPU-sized: minutes on a laptop for a few thousand cells of a few thousand genes
    "small": ModelConfig(dim=64, depth=2, heads=4, dim_head=32, nb_features=110),
    # for tests and smoke runs
    "tiny": ModelConfig(dim=16, depth=2, heads=2, dim_head=8, nb_features=16),
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """A named preset with fields overridden (e.g. ``gene_num`` from the data's panel)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# --------------------------------------------------------------------------------------------------
# random features


def orthogonal_gaussian_matrix(
    nb_rows: int, nb_columns: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(nb_rows, nb_columns) matrix of stacked orthogonal blocks, each row rescaled by the norm of an
    independent Gaussian vector, so rows are marginally Gaussian but mutually orthogonal per block."""
    blocks = []
    for _ in range(math.ceil(nb_rows / nb_columns)):
        gaussian = torch.randn(nb_columns, nb_columns, generator=generator)
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
        blocks.append(q.t())
    matrix = torch.cat(blocks)[:nb_rows]
    row_norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    return row_norms[:, None] * matrix


# --------------------------------------------------------------------------------------------------
# FAVOR+ kernels

KERNEL_EPS = 1e-4  # added to every feature, as published


def softmax_features_reference(x: torch.Tensor, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x) of the softmax kernel, written as in REFERENCE.md §3.

    x: (b, h, n, d); projection: (m, d). Queries are stabilised per row; keys by one number per cell,
    the maximum of the projections over that cell's heads, positions and features (the published code
    took it over the whole batch, which made a cell's output depend on its neighbours)."""
    d, m = x.shape[-1], projection.shape[0]
    c = d**-0.25
    ratio = m**-0.5
    proj = torch.einsum("bhnd,md->bhnm", c * x, projection.to(x.dtype))  # (b, h, n, m)
    diag = (x**2).sum(dim=-1, keepdim=True) * (c * c / 2.0)  # (b, h, n, 1)
    if is_query:
        stabiliser = proj.amax(dim=-1, keepdim=True)
    else:
        stabiliser = proj.amax(dim=(1, 2, 3), keepdim=True)
    return ratio * (torch.exp(proj - diag - stabiliser) + KERNEL_EPS)


def linear_attention_reference(q_feat: torch.Tensor, k_feat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal linear attention D^-1 phi(Q) (phi(K)^T V); all (b, h, n, .)."""
    k_sum = k_feat.sum(dim=-2)  # (b, h, m)
    normaliser = 1.0 / torch.einsum("bhnm,bhm->bhn", q_feat, k_sum)
    context = torch.einsum("bhnm,bhne->bhme", k_feat, v)  # (b, h, m, e)
    return torch.einsum("bhme,bhnm,bhn->bhne", context, q_feat, normaliser)


def favor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """q, k, v: (b, n, h, d) -> (b, n, h, d), materialising the (b, h, n, m) feature maps."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, n, d)
    q_feat = softmax_features_reference(q, projection, is_query=True)
    k_feat = softmax_features_reference(k, projection, is_query=False)
    return linear_attention_reference(q_feat, k_feat, v).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# FAVOR+ fast path
#
# The same function as `favor_attention_reference`, computed over sequence chunks so that no
# (b, h, n, m) feature map is ever built, with hand-written gradients that recompute each chunk's
# features instead of storing them. Per cell and head, with p = x (c W)^T, c = d^-1/4,
# a(x) = c^2 |x|^2 / 2 and the published eps:
#   keys     phi_n = exp(p_n - a_n - M) + eps       M: the cell's largest key projection
#   queries  f_n   = exp(p_n - a_n - max_j p_nj) + eps
#   out_n    = f_n^T C / f_n^T s,   C = sum_n phi_n v_n^T (m, d),  s = sum_n phi_n (m)
# The ratio m^-1/2 cancels. Keys are summed with an online maximum (a chunk that raises M rescales
# the sums so far, as in an online softmax); the eps terms are added in closed form
# (eps sum_n v_n, eps n, eps sum_j C_j, eps sum_j s_j) and the query factor exp(-a_n) multiplies
# the d-vector f_n^T C rather than the m features. Low-precision inputs keep exponents, maxima and
# sums in float32; matmuls run in the input dtype with d (not d + 1) columns, which the CPU kernels
# handle much faster.

_COMPILE_MODES = ("auto", "on", "off")
# "auto" compiles for sequences at least this long. Shorter ones gain less than the compilation costs
# in a typical run: with the small preset on PBMC3k's 2,001 positions every script was slower compiled,
# even with the kernels cached (benchmarks/compile_speed.py)
_COMPILE_MIN_LEN = 2048
_compiled_steps: dict[Any, Any] = {}  # (step, threads) -> compiled step
_failed_steps: set = set()  # steps whose compilation failed: eager from then on
_RECOMPILE_LIMIT = 64  # compiled graphs per step function (see _chunk_step)


def _compile_mode_from_env() -> str:
    mode = os.environ.get("SCBERT_COMPILE", "auto").strip().lower() or "auto"
    if mode not in _COMPILE_MODES:
        warnings.warn(f"SCBERT_COMPILE={mode!r} is not one of {', '.join(_COMPILE_MODES)}; using 'auto'",
                      RuntimeWarning)
        return "auto"
    return mode


_FAST_COMPILE = _compile_mode_from_env()  # torch.compile the per-chunk steps? (set_fast_compile)


def set_fast_compile(mode: str) -> None:
    """Whether the fast path runs its per-chunk steps through torch.compile: "auto" (the default, or
    the environment variable SCBERT_COMPILE) for sequences of >= 2048 positions, "on" always, "off"
    never. The first call in a fresh environment compiles (20-60 s on two cores); inductor caches the
    kernels on disk, so later processes start in a few seconds. A compilation failure (e.g. no C++
    compiler) falls back to the eager steps with a warning."""
    global _FAST_COMPILE
    if mode not in _COMPILE_MODES:
        raise ValueError(f"fast compile mode must be 'auto', 'on' or 'off', got {mode!r}")
    _FAST_COMPILE = mode


def _chunk_step(fn, n: int):
    """fn itself, or its torch.compile'd version. Only the chunk length is a dynamic dimension (the
    steps' `chunk_dims`: argument index -> axis), so the other sizes are compile-time constants. The
    compiled kernels use as many threads as the calling thread has: one inside `_run_groups`'
    workers, torch's intra-op threads when a short input runs on the calling thread (2,049
    positions on 2 cores: inference 0.19 -> 0.16 s per cell against single-threaded kernels)."""
    use = _FAST_COMPILE == "on" or (_FAST_COMPILE == "auto" and n >= _COMPILE_MIN_LEN)
    if not use or fn in _failed_steps:
        return fn

    def run(*args):
        if fn in _failed_steps:  # another chunk's compilation failed: dynamo would retry on every call
            return fn(*args)
        threads = torch.get_num_threads()
        if (fn, threads) not in _compiled_steps:
            _compiled_steps[fn, threads] = torch.compile(
                fn, dynamic=False, options={"cpp.threads": threads, "cpp_wrapper": True})
            # one graph per thread count, batch size, dtype and kept/recomputed backward: past dynamo's
            # default of 8 per function it would fall back to eager without a word
            dynamo_config = torch._dynamo.config
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
        for index, axis in fn.chunk_dims.items():
            if index < len(args):  # optional chunk inputs may be left out
                torch._dynamo.maybe_mark_dynamic(args[index], axis)
        try:
            return _compiled_steps[fn, threads](*args)
        except Exception as err:  # no C++ compiler, unsupported platform...: stay correct, warn once
            if fn not in _failed_steps:
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using the eager step", RuntimeWarning)
            _failed_steps.add(fn)
            return fn(*args)

    return run


def _chunk_dims(**dims: int):
    """Marks a step's chunk-length axes: argument name -> axis."""

    def mark(fn):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        fn.chunk_dims = {names.index(name): axis for name, axis in dims.items()}
        return fn

    return mark


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Below this many positions (batch x sequence) a pass runs on the calling thread and torch's intra-op
# threads share each matmul instead: with few chunks per thread, chunk threads scaled poorly (2,049
# positions, 2 cores: 0.20 s per cell against 0.25-0.30 s with chunk threads; 16,907: 2.0 s against 1.3 s).
_THREAD_MIN_ROWS = 4096


def _workers(device: torch.device, rows: int) -> int:
    """Threads a pass over `rows` positions spreads its chunks over (see `_run_groups`)."""
    if device.type != "cpu" or rows < _THREAD_MIN_ROWS:
        return 1
    return torch.get_num_threads()


class _ChunkList(list):
    """The slices of a pass, and how many threads run them."""

    workers = 1


def _chunks(n: int, chunk: int, batch: int = 1, workers: int = 1) -> _ChunkList:
    """Near-equal slices of the sequence of about `chunk` rows over the batch (down to 64 positions
    for large batches), so temporaries stay cache-sized; their number a multiple of the worker
    threads when there are enough rows, so the threads finish together; no 1-row tail (compiled
    code would specialise it)."""
    chunk = max(min(chunk, 64), chunk // max(batch, 1))
    count = -(-n // chunk)
    if workers > 1 and n >= 64 * workers:
        count = -(-count // workers) * workers
    base, extra = divmod(n, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (i < extra))
    out = _ChunkList(slice(start, stop) for start, stop in zip(bounds, bounds[1:]))
    out.workers = workers
    return out


def _plan(x: torch.Tensor, chunk: int) -> _ChunkList:
    """The chunks of a (b, n, ...) input, for as many threads as its size warrants."""
    b, n = x.shape[0], x.shape[1]
    return _chunks(n, chunk, b, _workers(x.device, b * n))


_worker_pools: dict[tuple[int, int], Any] = {}


def _run_groups(fn, chunks: list[slice]) -> list:
    """Runs a pass over the chunks: fn(group) consumes an iterable of (index, rows) pairs and returns
    its partial result; -> the partial results, in group order. When the plan has several workers
    (long inputs on a CPU with several intra-op threads, see `_workers`), each thread runs fn
    single-threaded on a fixed share of the chunks (every k-th), so
    there is no fork/join per operation: with per-op parallelism every small matmul is a barrier,
    and on a shared machine a descheduled OpenMP worker stalls each of them (a step became 10-30x
    slower under load). The shares are fixed, not first come first served, so sums are added in
    the same order on every run: results are bitwise reproducible for a given thread count. Grad
    and inference mode are thread-local: the workers take the caller's."""
    count = min(getattr(chunks, "workers", 1), len(chunks))
    if count < 2:
        return [fn(list(enumerate(chunks)))]
    key = (os.getpid(), count)  # a forked child inherits the pool object but not its threads
    if key not in _worker_pools:
        from concurrent.futures import ThreadPoolExecutor

        _worker_pools[key] = ThreadPoolExecutor(count, thread_name_prefix="favor",
                                                initializer=torch.set_num_threads, initargs=(1,))
    groups = [list(enumerate(chunks))[start::count] for start in range(count)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(group):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(group)

    return list(_worker_pools[key].map(run, groups))


def _merge_key_sums(parts):
    """Combines the threads' (max, context, k_sum, v_sum, {chunk index: chunk max}) onto their
    common maximum; -> (max, context, k_sum, v_sum, chunk maxima (b, chunks))."""
    key_max = torch.stack([p[0] for p in parts]).amax(0)
    scales = [torch.exp(p[0] - key_max) for p in parts]
    context = sum(p[1] * s[:, None, None, None] for p, s in zip(parts, scales))
    k_sum = sum(p[2] * s[:, None, None] for p, s in zip(parts, scales))
    maxima = {i: m for p in parts for i, m in p[4].items()}
    return key_max, context, k_sum, sum(p[3] for p in parts), torch.stack([maxima[i] for i in sorted(maxima)], 1)


def _sum_parts(parts):
    """Element-wise sum of the groups' tuples of tensors (or nested tuples)."""
    return tuple(_sum_parts(items) if isinstance(items[0], tuple) else sum(items) for items in zip(*parts))


def _favor_keys(k, v, w, run_max, context, k_sum):
    """Adds a chunk of keys. k, v (b, h, c, d); w (m, d) = c W; run_max (b,), context (b, h, m, d),
    k_sum (b, h, m) in the accumulation dtype -> (new max, chunk max, context, k_sum), without eps."""
    acc = context.dtype
    d = k.shape[-1]
    p = torch.matmul(k, w.t())  # (b, h, c, m)
    chunk_max = p.flatten(1).amax(1).to(acc)
    new_max = torch.maximum(run_max, chunk_max)
    a = k.to(acc).square().sum(-1, keepdim=True) * (0.5 * d**-0.5)  # (b, h, c, 1)
    e = torch.exp(p.to(acc) - a - new_max[:, None, None, None]).to(k.dtype)
    rescale = torch.exp(run_max - new_max)
    context = torch.addcmul(torch.matmul(e.transpose(-1, -2), v).to(acc), context, rescale[:, None, None, None])
    k_sum = torch.addcmul(e.sum(2, dtype=acc), k_sum, rescale[:, None, None])
    return new_max, chunk_max, context, k_sum


def _favor_queries(q, w, context_lp, k_sum, eps_v, eps_s):
    """A chunk of outputs. q (b, h, c, d); context_lp (b, h, m, d) in q's dtype; k_sum (b, h, m);
    eps_v = eps sum_j C_j (b, h, d), eps_s = eps sum_j s_j (b, h) -> (out (b, h, c, d) and its
    normaliser f^T s (b, h, c), in the accumulation dtype)."""
    acc = k_sum.dtype
    d = q.shape[-1]
    p = torch.matmul(q, w.t()).to(acc)  # (b, h, c, m)
    e = torch.exp(p - p.amax(-1, keepdim=True)).to(q.dtype)
    ea = torch.exp(q.to(acc).square().sum(-1, keepdim=True) * (-0.5 * d**-0.5))  # exp(-a), (b, h, c, 1)
    den = ea * (e.to(acc) * k_sum[:, :, None, :]).sum(-1, keepdim=True) + eps_s[:, :, None, None]
    num = torch.addcmul(eps_v[:, :, None, :], torch.matmul(e, context_lp).to(acc), ea)
    return num / den, den[..., 0]


def _favor_queries_grad(q, g, out, den, w, context_lp, k_sum):
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


def _favor_keys_grad(k, v, w, key_max, d_context_lp, d_k_sum, d_eps_v):
    """k, v (b, h, c, d); d_context_lp (b, h, m, d) in k's dtype; d_k_sum (b, h, m);
    d_eps_v = eps sum_j dC_j (b, h, d) -> (dk, dv) in the accumulation dtype. The gradient through
    the key maximum M is added afterwards (`_add_key_max_gradient`)."""
    acc = d_k_sum.dtype
    cdt = k.dtype
    d = k.shape[-1]
    c2 = d**-0.5
    p = torch.matmul(k, w.t())
    kf = k.to(acc)
    a = kf.square().sum(-1, keepdim=True) * (0.5 * c2)
    e = torch.exp(p.to(acc) - a - key_max[:, None, None, None])
    d_feat = torch.matmul(v, d_context_lp.transpose(-1, -2)).to(acc) + d_k_sum[:, :, None, :]  # (b, h, c, m)
    d_expo = d_feat * e
    row_sum = d_expo.sum(-1, keepdim=True)
    dk = torch.matmul(d_expo.to(cdt), w).to(acc) - (row_sum * c2) * kf
    dv = torch.matmul(e.to(cdt), d_context_lp).to(acc) + d_eps_v[:, :, None, :]
    return dk, dv


def _key_max_gradient(d_context, d_k_sum, context, k_sum, v_sum, n: int) -> torch.Tensor:
    """d loss / dM (b,): M enters every key feature as exp(-M), so it is minus the contraction of
    the sums' gradients with their exp parts (the sums without their eps terms)."""
    return -((d_context * (context - KERNEL_EPS * v_sum[:, :, None, :])).sum((1, 2, 3))
             + (d_k_sum * (k_sum - KERNEL_EPS * n)).sum((1, 2)))


def _key_max_hits(k_rows, w, key_max, chunk_maxima, chunks) -> list[list[tuple[int, int, int]]]:
    """Per cell, the (position, head, feature) entries whose key projection equals M (ties share
    its gradient, as torch.amax does). Only chunks whose maximum was M are recomputed. k_rows(cell,
    rows) -> that cell's keys (1, h, c, d) in the compute dtype."""
    hits = []
    for cell in range(key_max.shape[0]):
        found = []
        for index in (chunk_maxima[cell] == key_max[cell]).nonzero().flatten().tolist():
            rows = chunks[index]
            p = torch.matmul(k_rows(cell, rows), w.t())[0]  # (h, c, m)
            where = (p.to(key_max.dtype) == key_max[cell]).nonzero()
            if len(where) == 0:  # the recomputed projection differs in the last bit: take its argmax
                flat = int(p.argmax())
                where = torch.tensor([[flat // (p.shape[1] * p.shape[2]), flat // p.shape[2] % p.shape[1],
                                       flat % p.shape[2]]])
            found += [(rows.start + i, head, j) for head, i, j in where.tolist()]
        hits.append(found)
    return hits


@_chunk_dims(k_c=1, v_c=1)
def _attention_keys_step(k_c, v_c, w, run_max, context, k_sum, v_sum):
    """favor_attention_fast's key step: k_c, v_c (b, c, h, d) slices."""
    k, v = k_c.transpose(1, 2), v_c.transpose(1, 2)
    new_max, chunk_max, context, k_sum = _favor_keys(k, v, w, run_max, context, k_sum)
    return new_max, chunk_max, context, k_sum, v_sum + v.sum(2, dtype=context.dtype)


@_chunk_dims(q_c=1)
def _attention_queries_step(q_c, w, context_lp, k_sum, eps_v, eps_s):
    out, den = _favor_queries(q_c.transpose(1, 2), w, context_lp, k_sum, eps_v, eps_s)
    return out.transpose(1, 2).to(q_c.dtype), den


@_chunk_dims(q_c=1, g_c=1, out_c=1, den_c=2)
def _attention_queries_grad_step(q_c, g_c, out_c, den_c, w, context_lp, k_sum):
    acc = den_c.dtype
    dq, d_context, d_k_sum = _favor_queries_grad(q_c.transpose(1, 2), g_c.transpose(1, 2).to(acc),
                                                 out_c.transpose(1, 2).to(acc), den_c, w, context_lp, k_sum)
    return dq.transpose(1, 2).to(q_c.dtype), d_context, d_k_sum


@_chunk_dims(k_c=1, v_c=1)
def _attention_keys_grad_step(k_c, v_c, w, key_max, d_context_lp, d_k_sum, d_eps_v):
    dk, dv = _favor_keys_grad(k_c.transpose(1, 2), v_c.transpose(1, 2), w, key_max, d_context_lp, d_k_sum, d_eps_v)
    return dk.transpose(1, 2).to(k_c.dtype), dv.transpose(1, 2).to(k_c.dtype)


def _finish_key_sums(context, k_sum, v_sum, n: int):
    """Adds the keys' eps terms; -> (context, k_sum, eps sum_j C_j, eps sum_j s_j)."""
    context = context + KERNEL_EPS * v_sum[:, :, None, :]
    k_sum = k_sum + KERNEL_EPS * n
    return context, k_sum, KERNEL_EPS * context.sum(2), KERNEL_EPS * k_sum.sum(2)


def _empty_key_sums(b: int, h: int, m: int, d: int, acc: torch.dtype, device):
    return (torch.full((b,), -torch.inf, dtype=acc, device=device), torch.zeros(b, h, m, d, dtype=acc, device=device),
            torch.zeros(b, h, m, dtype=acc, device=device), torch.zeros(b, h, d, dtype=acc, device=device))


def _key_pass(step, chunk_inputs, chunks: list[slice], sizes: tuple[int, int, int, int], acc: torch.dtype, device,
              kept: torch.Tensor | None = None):
    """Runs a key step (its leading arguments chunk_inputs(rows), then the running sums) over the
    chunks on the plan's threads; sizes = (b, h, m, d) -> the merged (max, context, k_sum, v_sum,
    chunk maxima), without the eps terms. Given `kept` (b, n, ...), the step is asked to return one
    more output per chunk (keep flag True), written to kept[:, rows]."""

    def keys(group):
        run_max, context, k_sum, v_sum = _empty_key_sums(*sizes, acc, device)
        maxima = {}
        for index, rows in group:
            if kept is None:
                run_max, maxima[index], context, k_sum, v_sum = step(*chunk_inputs(rows), run_max, context, k_sum,
                                                                     v_sum)
            else:
                run_max, maxima[index], context, k_sum, v_sum, kept[:, rows] = step(
                    *chunk_inputs(rows), run_max, context, k_sum, v_sum, True)
        return run_max, context, k_sum, v_sum, maxima

    return _merge_key_sums(_run_groups(keys, chunks))


def _favor_forward(q, k, v, w, chunks: list[slice], keep_state: bool):
    """q, k, v (b, n, h, d) of any strides; w (m, d) = c W in their dtype; chunks from `_chunks`
    -> (out (b, n, h, d), state)."""
    b, n, h, d = q.shape
    acc = _accumulation_dtype(q.dtype)
    key_step, query_step = _chunk_step(_attention_keys_step, n), _chunk_step(_attention_queries_step, n)
    key_max, context, k_sum, v_sum, maxima = _key_pass(key_step, lambda rows: (k[:, rows], v[:, rows], w), chunks,
                                                       (b, h, w.shape[0], d), acc, q.device)
    context, k_sum, eps_v, eps_s = _finish_key_sums(context, k_sum, v_sum, n)
    context_lp = context.to(q.dtype)
    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    den = torch.empty(b, h, n, dtype=acc, device=q.device)

    def queries(group):
        for _, rows in group:
            out[:, rows], den[:, :, rows] = query_step(q[:, rows], w, context_lp, k_sum, eps_v, eps_s)

    _run_groups(queries, chunks)
    state = (context, k_sum, v_sum, key_max, den, maxima) if keep_state else ()
    return out, state


class _FavorFunction(torch.autograd.Function):
    """FAVOR+ on given q, k, v (b, n, h, d); stores q, k, v, the output and the small sums."""

    @staticmethod
    def forward(ctx, q, k, v, w, chunk):
        ctx.chunks = _plan(q, chunk)  # the backward's must match
        out, state = _favor_forward(q, k, v, w, ctx.chunks, keep_state=True)
        ctx.save_for_backward(q, k, v, w, out, *state)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, w, out, context, k_sum, v_sum, key_max, den, chunk_maxima = ctx.saved_tensors
        n = q.shape[1]
        chunks = ctx.chunks
        dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
        context_lp = context.to(q.dtype)
        query_step = _chunk_step(_attention_queries_grad_step, n)

        def queries(group):
            d_context, d_k_sum = torch.zeros_like(context), torch.zeros_like(k_sum)
            for _, rows in group:
                dq[:, rows], d_c, d_s = query_step(q[:, rows], grad[:, rows], out[:, rows], den[:, :, rows], w,
                                                   context_lp, k_sum)
                d_context, d_k_sum = d_context + d_c, d_k_sum + d_s
            return d_context, d_k_sum

        d_context, d_k_sum = _sum_parts(_run_groups(queries, chunks))
        d_max = _key_max_gradient(d_context, d_k_sum, context, k_sum, v_sum, n)
        d_context_lp, d_eps_v = d_context.to(q.dtype), KERNEL_EPS * d_context.sum(2)
        key_step = _chunk_step(_attention_keys_grad_step, n)

        def keys(group):
            for _, rows in group:
                dk[:, rows], dv[:, rows] = key_step(k[:, rows], v[:, rows], w, key_max, d_context_lp, d_k_sum, d_eps_v)

        _run_groups(keys, chunks)
        cell_keys = lambda cell, rows: k[cell : cell + 1, rows].transpose(1, 2)  # noqa: E731
        for cell, hits in enumerate(_key_max_hits(cell_keys, w, key_max, chunk_maxima, chunks)):
            for position, head, feature in hits:
                dk[cell, position, head] += (d_max[cell] / len(hits) * w[feature].to(d_max.dtype)).to(dk.dtype)
        return dq, dk, dv, None, None


def _scaled_projection(projection: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (projection.shape[1] ** -0.25 * projection).to(dtype)  # c W: scaling W once beats scaling x


def favor_attention_fast(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor, chunk: int
) -> torch.Tensor:
    """`favor_attention_reference` over sequence chunks; q, k, v (b, n, h, d) of any strides."""
    w = _scaled_projection(projection, q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _FavorFunction.apply(q, k, v, w, chunk)
        return _favor_forward(q, k, v, w, _plan(q, chunk), False)[0]


# --------------------------------------------------------------------------------------------------
# attention


class FastAttention(nn.Module):
    """FAVOR+ with the positive softmax kernel; holds the (nb_features, dim_head) random projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.nb_features = config.nb_features
        self.dim_head = config.dim_head
        self.impl = config.attention
        self.chunk = config.attn_chunk
        self.register_buffer("projection_matrix", orthogonal_gaussian_matrix(config.nb_features, config.dim_head))

    @torch.no_grad()
    def redraw_projection_matrix(self, generator: torch.Generator) -> None:
        fresh = orthogonal_gaussian_matrix(self.nb_features, self.dim_head, generator=generator)
        self.projection_matrix.copy_(fresh)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            return favor_attention_reference(q, k, v, self.projection_matrix)
        return favor_attention_fast(q, k, v, self.projection_matrix, self.chunk)


class SelfAttention(nn.Module):
    """Multi-head FAVOR+ self-attention: dim -> heads * dim_head (no bias) -> dim (with bias)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.fast_attention = FastAttention(config)
        self.to_q = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_k = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_v = nn.Linear(config.dim, config.inner_dim, bias=False)
        self.to_out = nn.Linear(config.inner_dim, config.dim)
        self.dropout = nn.Dropout(config.attn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        # one matmul for q, k and v; the three weights stay separate parameters for checkpoint names
        qkv_weight = torch.cat((self.to_q.weight, self.to_k.weight, self.to_v.weight))
        qkv = F.linear(x, qkv_weight).view(b, n, 3, self.heads, -1)  # (b, n, 3, h, d)
        out = self.fast_attention(*qkv.unbind(dim=2))  # (b, n, h, d)
        return self.dropout(self.to_out(out.reshape(b, n, -1)))


# --------------------------------------------------------------------------------------------------
# feed-forward and residual wrappers


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.dim * config.ff_mult)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.ff_dropout)
        self.w2 = nn.Linear(config.dim * config.ff_mult, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.dropout(self.act(self.w1(x))))


class SequenceChunks(nn.Module):
    """Applies a position-wise module to slices of the sequence, bounding the wide hidden activation
    in inference. (The published model wraps its feed-forward the same way, hence the `fn.fn` names.)"""

    def __init__(self, fn: nn.Module, chunk: int):
        super().__init__()
        self.fn = fn
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.shape[1] <= self.chunk:
            return self.fn(x)
        return torch.cat([self.fn(part) for part in x.split(self.chunk, dim=1)], dim=1)


class PreLayerNorm(nn.Module):
    """F(LN(x)); the residual sum is added by the encoder."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class ReZero(nn.Module):
    """g * F(x) with a learned scalar g starting near 0, so each block starts as the identity."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1e-3))
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) * self.g


# --------------------------------------------------------------------------------------------------
# embeddings


class GenePositionalEmbedding(nn.Module):
    """One vector per panel position. "gene2vec": a frozen float64 table (published layout: the last,
    appended position is all zeros), cast to the activation dtype when added; "learned": trainable."""

    def __init__(self, config: ModelConfig, table: torch.Tensor | None = None):
        super().__init__()
        frozen = config.pos_embed == "gene2vec"
        self.emb = nn.Embedding(config.seq_len, config.dim, dtype=torch.float64 if frozen else None)
        if frozen:
            self.emb.weight.requires_grad_(False)
            with torch.no_grad():
                if table is None:
                    self.emb.weight.zero_()  # filled by a checkpoint or a Gene2Vec table
                else:
                    if tuple(table.shape) != (config.seq_len, config.dim):
                        raise ValueError(
                            f"Gene2Vec table has shape {tuple(table.shape)}; the model needs "
                            f"({config.seq_len}, {config.dim}) (genes + 1 appended row, model width)"
                        )
                    self.emb.weight.copy_(table.to(torch.float64))

    def forward(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.emb.weight[:n].to(dtype)  # (n, dim)


# --------------------------------------------------------------------------------------------------
# encoder: the fused fast layer
#
# One prenorm layer, x -> x' = x + Attn(LN1(x)) -> y = x' + FF(LN2(x')), run chunk by chunk along the
# sequence so that every temporary (q, k, v, features, the 4x wide hidden layer) stays cache-sized: a
# key pass (LN1, k and v, the key sums) then a query pass (LN1, q, outputs, to_out, LN2, FF). Its
# backward is written by hand and stores x, x' and the attention output (b, n, inner) per layer; the
# rest (LN, the feature projections, and for large inputs (batch x sequence) q, k, v and the hidden
# layer, see _KEEP_MAX_BYTES) is recomputed per chunk. Used for the prenorm model without dropout;
# autocast's dtype (bf16 on CPU) is used for the matmuls, LayerNorm, sums and the residual stream stay
# in float32, as under autocast.


def _layer_norm_stats(x, eps: float):
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


@_chunk_dims(x_c=1)
def _layer_keys_step(x_c, norm1, w_kv, w, run_max, context, k_sum, v_sum, keep_kv: bool = False):
    """Key pass of one chunk: x_c (b, c, dim) residual stream; norm1 = (weight, bias, eps). With
    keep_kv, also returns k and v (b, c, 2 inner) for the backward."""
    b, c, _ = x_c.shape
    h, d = context.shape[1], context.shape[-1]
    cdt = w.dtype
    xn = F.layer_norm(x_c, x_c.shape[-1:], norm1[0], norm1[1], norm1[2]).to(cdt)
    kv_rows = F.linear(xn, w_kv)
    kv = kv_rows.view(b, c, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, b, h, c, d)
    new_max, chunk_max, context, k_sum = _favor_keys(kv[0], kv[1], w, run_max, context, k_sum)
    sums = new_max, chunk_max, context, k_sum, v_sum + kv[1].sum(2, dtype=context.dtype)
    return (*sums, kv_rows) if keep_kv else sums


@_chunk_dims(x_c=1)
def _layer_queries_step(x_c, norm1, w_q, w, context_lp, k_sum, eps_v, eps_s, w_out, b_out, norm2, w1, b1, w2, b2,
                        keep_qh: bool = False):
    """Query pass of one chunk -> (y_c, normaliser (b, h, c), x'_c, attention output (b, c, inner)),
    and with keep_qh also q (b, c, inner) and the feed-forward's hidden layer before GELU."""
    b, c, _ = x_c.shape
    h, d = context_lp.shape[1], context_lp.shape[-1]
    cdt = w.dtype
    xn = F.layer_norm(x_c, x_c.shape[-1:], norm1[0], norm1[1], norm1[2]).to(cdt)
    q_rows = F.linear(xn, w_q)
    out, den = _favor_queries(q_rows.view(b, c, h, d).transpose(1, 2), w, context_lp, k_sum, eps_v, eps_s)
    out = out.transpose(1, 2).reshape(b, c, h * d).to(cdt)
    x_att = x_c + F.linear(out, w_out, b_out).to(x_c.dtype)
    xn2 = F.layer_norm(x_att, x_att.shape[-1:], norm2[0], norm2[1], norm2[2]).to(cdt)
    hid = F.linear(xn2, w1, b1)
    y = x_att + F.linear(F.gelu(hid), w2, b2).to(x_c.dtype)
    return (y, den, x_att, out, q_rows, hid) if keep_qh else (y, den, x_att, out)


@_chunk_dims(x_c=1, x_att=1, out_c=1, den_c=2, dy=1, q_c=1, hid_c=1)
def _layer_queries_grad_step(x_c, x_att, out_c, den_c, dy, norm1, w_q, w, context_lp, k_sum, w_out, norm2, w1, b1,
                             w2, grads, q_c=None, hid_c=None):
    """Backward of the query pass of one chunk, from d loss / dy. grads: running sums of the
    weight gradients (w2, b2, w1, b1, norm2 weight, norm2 bias, w_out, b_out, w_q); q_c, hid_c:
    q and the hidden layer if the forward kept them (else recomputed). -> (d x' (the residual part
    of dx), d LN1(x) from q, d context, d k_sum, updated grads)."""
    g_w2, g_b2, g_w1, g_b1, g_n2w, g_n2b, g_wo, g_bo, g_wq = grads
    b, c, dim = x_c.shape
    h, d = context_lp.shape[1], context_lp.shape[-1]
    cdt, acc = w.dtype, den_c.dtype
    # feed-forward: recompute LN2, and the hidden layer unless the forward kept it
    xh2, rstd2 = _layer_norm_stats(x_att, norm2[2])
    xn2 = (xh2 * norm2[0] + norm2[1]).to(cdt)
    hid = F.linear(xn2, w1, b1) if hid_c is None else hid_c
    dy_lp = dy.to(cdt)
    g_w2 = g_w2 + torch.matmul(_rows(dy_lp).t(), _rows(F.gelu(hid))).to(acc)
    g_b2 = g_b2 + _rows(dy).sum(0)
    d_hid = torch.matmul(dy_lp, w2).to(acc) * _gelu_grad(hid.to(acc))
    d_hid_lp = d_hid.to(cdt)
    g_w1 = g_w1 + torch.matmul(_rows(d_hid_lp).t(), _rows(xn2)).to(acc)
    g_b1 = g_b1 + _rows(d_hid).sum(0)
    d_xn2 = torch.matmul(d_hid_lp, w1).to(acc)
    g_n2w = g_n2w + _rows(d_xn2 * xh2).sum(0)
    g_n2b = g_n2b + _rows(d_xn2).sum(0)
    d_att = dy + _layer_norm_grad(d_xn2, xh2, rstd2, norm2[0])  # d loss / dx'
    # attention output projection
    d_att_lp = d_att.to(cdt)
    g_wo = g_wo + torch.matmul(_rows(d_att_lp).t(), _rows(out_c)).to(acc)
    g_bo = g_bo + _rows(d_att).sum(0)
    d_out = torch.matmul(d_att_lp, w_out).to(acc).view(b, c, h, d).transpose(1, 2)
    # FAVOR+ queries: recompute LN1, and q unless kept
    xn = F.layer_norm(x_c, (dim,), norm1[0], norm1[1], norm1[2]).to(cdt)
    q = (F.linear(xn, w_q) if q_c is None else q_c).view(b, c, h, d).transpose(1, 2)
    out = out_c.view(b, c, h, d).transpose(1, 2).to(acc)
    dq, d_context, d_k_sum = _favor_queries_grad(q, d_out, out, den_c, w, context_lp, k_sum)
    dq_lp = dq.transpose(1, 2).reshape(b, c, h * d).to(cdt)
    g_wq = g_wq + torch.matmul(_rows(dq_lp).t(), _rows(xn)).to(acc)
    d_xn = torch.matmul(dq_lp, w_q).to(acc)
    return d_att, d_xn, d_context, d_k_sum, (g_w2, g_b2, g_w1, g_b1, g_n2w, g_n2b, g_wo, g_bo, g_wq)


@_chunk_dims(x_c=1, d_att=1, d_xn=1, kv_c=1)
def _layer_keys_grad_step(x_c, d_att, d_xn, norm1, w_kv, w, key_max, d_context_lp, d_k_sum, d_eps_v, grads,
                          kv_c=None):
    """Backward of the key pass of one chunk; finishes dx. grads: running (w_kv, norm1 weight,
    norm1 bias) gradients; kv_c: k and v if the forward kept them. -> (dx_c, updated grads)."""
    g_wkv, g_n1w, g_n1b = grads
    b, c, _ = x_c.shape
    h, d = d_context_lp.shape[1], d_context_lp.shape[-1]
    cdt = w.dtype
    acc = d_k_sum.dtype
    xh, rstd = _layer_norm_stats(x_c, norm1[2])
    xn = (xh * norm1[0] + norm1[1]).to(cdt)
    kv = (F.linear(xn, w_kv) if kv_c is None else kv_c).view(b, c, 2, h, d).permute(2, 0, 3, 1, 4)
    dk, dv = _favor_keys_grad(kv[0], kv[1], w, key_max, d_context_lp, d_k_sum, d_eps_v)
    d_kv = torch.stack((dk, dv)).permute(1, 3, 0, 2, 4).reshape(b, c, 2 * h * d).to(cdt)
    g_wkv = g_wkv + torch.matmul(_rows(d_kv).t(), _rows(xn)).to(acc)
    d_xn = d_xn + torch.matmul(d_kv, w_kv).to(acc)
    g_n1w = g_n1w + _rows(d_xn * xh).sum(0)
    g_n1b = g_n1b + _rows(d_xn).sum(0)
    return d_att + _layer_norm_grad(d_xn, xh, rstd, norm1[0]), (g_wkv, g_n1w, g_n1b)


# A training input keeps q, k, v and the hidden layer of each fused layer for the backward instead of
# recomputing them (~1/9 of the step's matmuls) when they take at most this many bytes per layer:
# 5.4 kB per position (batch x sequence) in bf16 for the published widths, so up to ~9,000 positions
# (one cell of 2,049: 66 MB over 6 layers); longer inputs recompute (16,907 positions would keep 550 MB).
_KEEP_MAX_BYTES = 48 * 2**20


def _fused_layer_forward(x, weights, chunks: list[slice], keep: bool):
    """weights: see `_fused_layer_weights`; chunks from `_chunks` -> (y, state for the backward or None)."""
    norm1, w_q, w_kv, w, w_out, b_out, norm2, w1, b1, w2, b2 = weights
    b, n, _ = x.shape
    d = w.shape[1]
    h = w_q.shape[0] // d
    acc = _accumulation_dtype(w.dtype)
    key_step, query_step = _chunk_step(_layer_keys_step, n), _chunk_step(_layer_queries_step, n)
    kept_bytes = b * n * (w_q.shape[0] + w_kv.shape[0] + w1.shape[0]) * w.element_size()
    keep_more = keep and kept_bytes <= _KEEP_MAX_BYTES
    new = lambda width: torch.empty(b, n, width, dtype=w.dtype, device=x.device)  # noqa: E731
    kv = new(w_kv.shape[0]) if keep_more else None
    key_max, context, k_sum, v_sum, maxima = _key_pass(key_step, lambda rows: (x[:, rows], norm1, w_kv, w), chunks,
                                                       (b, h, w.shape[0], d), acc, x.device, kv)
    context, k_sum, eps_v, eps_s = _finish_key_sums(context, k_sum, v_sum, n)
    context_lp = context.to(w.dtype)
    y = torch.empty_like(x)
    den = torch.empty(b, h, n, dtype=acc, device=x.device)
    x_att = torch.empty_like(x) if keep else None
    out = new(h * d) if keep else None
    q, hid = (new(w_q.shape[0]), new(w1.shape[0])) if keep_more else (None, None)

    def queries(group):
        for _, rows in group:
            args = (x[:, rows], norm1, w_q, w, context_lp, k_sum, eps_v, eps_s, w_out, b_out, norm2, w1, b1, w2, b2)
            if keep_more:
                y[:, rows], den[:, :, rows], x_att[:, rows], out[:, rows], q[:, rows], hid[:, rows] = query_step(
                    *args, True)
            elif keep:
                y[:, rows], den[:, :, rows], x_att[:, rows], out[:, rows] = query_step(*args)
            else:
                y[:, rows], den[:, :, rows], _, _ = query_step(*args)

    _run_groups(queries, chunks)
    if not keep:
        return y, None
    return y, (x_att, out, den, context, k_sum, v_sum, key_max, maxima, q, hid, kv)


def _fused_layer_backward(dy, x, weights, chunks: list[slice], state):
    """-> (dx, gradients of (norm1 weight, norm1 bias, w_q, w_kv, w_out, b_out, norm2 weight,
    norm2 bias, w1, b1, w2, b2)) in float32 (the accumulation dtype)."""
    norm1, w_q, w_kv, w, w_out, b_out, norm2, w1, b1, w2, b2 = weights
    x_att, out, den, context, k_sum, v_sum, key_max, chunk_maxima, q, hid, kv = state
    kept = lambda t, rows: () if t is None else (t[:, rows],)  # noqa: E731
    b, n, dim = x.shape
    d = w.shape[1]
    h = w_q.shape[0] // d
    acc = den.dtype
    zeros = lambda t: torch.zeros(t.shape, dtype=acc, device=x.device)  # noqa: E731
    context_lp = context.to(w.dtype)
    d_att, d_xn = torch.empty_like(x), torch.empty(b, n, dim, dtype=acc, device=x.device)
    query_step = _chunk_step(_layer_queries_grad_step, n)

    def queries(group):
        grads = tuple(zeros(t) for t in (w2, b2, w1, b1, norm2[0], norm2[1], w_out, b_out, w_q))
        d_context, d_k_sum = torch.zeros_like(context), torch.zeros_like(k_sum)
        for _, rows in group:
            d_att[:, rows], d_xn[:, rows], d_c, d_s, grads = query_step(
                x[:, rows], x_att[:, rows], out[:, rows], den[:, :, rows], dy[:, rows], norm1, w_q, w, context_lp,
                k_sum, w_out, norm2, w1, b1, w2, grads, *kept(q, rows), *kept(hid, rows))
            d_context, d_k_sum = d_context + d_c, d_k_sum + d_s
        return grads, d_context, d_k_sum

    grads, d_context, d_k_sum = _sum_parts(_run_groups(queries, chunks))
    g_w2, g_b2, g_w1, g_b1, g_n2w, g_n2b, g_wo, g_bo, g_wq = grads
    d_max = _key_max_gradient(d_context, d_k_sum, context, k_sum, v_sum, n)
    d_context_lp, d_eps_v = d_context.to(w.dtype), KERNEL_EPS * d_context.sum(2)
    # the key maximum's gradient goes to d LN1(x) through k = LN1(x) W_k^T, before the key pass
    w_k = w_kv[: h * d]

    def cell_keys(cell, rows):
        xn = F.layer_norm(x[cell : cell + 1, rows], (dim,), norm1[0], norm1[1], norm1[2]).to(w.dtype)
        return F.linear(xn, w_k).view(1, -1, h, d).transpose(1, 2)

    extra_wk = []
    for cell, hits in enumerate(_key_max_hits(cell_keys, w, key_max, chunk_maxima, chunks)):
        for position, head, feature in hits:
            dk = d_max[cell] / len(hits) * w[feature].to(acc)  # (d,)
            xn = F.layer_norm(x[cell, position], (dim,), norm1[0], norm1[1], norm1[2]).to(acc)
            d_xn[cell, position] += dk @ w_k[head * d : (head + 1) * d].to(acc)
            extra_wk.append((head, torch.outer(dk, xn)))
    dx = torch.empty_like(x)
    key_step = _chunk_step(_layer_keys_grad_step, n)

    def keys(group):
        grads = (zeros(w_kv), zeros(norm1[0]), zeros(norm1[1]))
        for _, rows in group:
            dx[:, rows], grads = key_step(x[:, rows], d_att[:, rows], d_xn[:, rows], norm1, w_kv, w, key_max,
                                          d_context_lp, d_k_sum, d_eps_v, grads, *kept(kv, rows))
        return grads

    grads = _sum_parts(_run_groups(keys, chunks))
    g_wkv, g_n1w, g_n1b = grads
    for head, g in extra_wk:
        g_wkv[head * d : (head + 1) * d] += g
    return dx, (g_n1w, g_n1b, g_wq, g_wkv, g_wo, g_bo, g_n2w, g_n2b, g_w1, g_b1, g_w2, g_b2)


def _fused_layer_weights(params, projection, dtype):
    """The layer's parameters in the compute dtype, in the order the steps take them. params:
    (norm1 weight, norm1 bias, norm1 eps, to_q, to_k, to_v, to_out weight, to_out bias, norm2 weight,
    norm2 bias, norm2 eps, w1 weight, w1 bias, w2 weight, w2 bias)."""
    n1w, n1b, n1eps, wq, wk, wv, wo, bo, n2w, n2b, n2eps, w1, b1, w2, b2 = params
    lp = lambda t: t.to(dtype)  # noqa: E731
    return ((n1w, n1b, n1eps), lp(wq), lp(torch.cat((wk, wv))), _scaled_projection(projection, dtype), lp(wo), lp(bo),
            (n2w, n2b, n2eps), lp(w1), lp(b1), lp(w2), lp(b2))


class _FusedLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projection, dtype, chunk, *params):
        weights = _fused_layer_weights(params, projection, dtype)
        ctx.chunks = _plan(x, chunk)  # the backward's must match
        y, state = _fused_layer_forward(x, weights, ctx.chunks, keep=True)
        ctx.save_for_backward(x, projection, *(p for p in params if isinstance(p, torch.Tensor)), *state)
        ctx.eps = (params[2], params[10])
        ctx.dtype = dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, projection, n1w, n1b, wq, wk, wv, wo, bo, n2w, n2b, w1, b1, w2, b2, *state = ctx.saved_tensors
        params = (n1w, n1b, ctx.eps[0], wq, wk, wv, wo, bo, n2w, n2b, ctx.eps[1], w1, b1, w2, b2)
        with torch.autocast(x.device.type, enabled=False):
            weights = _fused_layer_weights(params, projection, ctx.dtype)
            dx, g = _fused_layer_backward(dy.contiguous(), x, weights, ctx.chunks, state)
        g_n1w, g_n1b, g_wq, g_wkv, g_wo, g_bo, g_n2w, g_n2b, g_w1, g_b1, g_w2, g_b2 = g
        inner = wq.shape[0]
        grads = (g_n1w, g_n1b, None, g_wq, g_wkv[:inner], g_wkv[inner:], g_wo, g_bo, g_n2w, g_n2b, None, g_w1, g_b1,
                 g_w2, g_b2)
        grads = tuple(None if g is None or not need else g.to(p.dtype) for g, p, need in
                      zip(grads, params, ctx.needs_input_grad[4:]))
        return (dx, None, None, None, *grads)


def fused_layer_usable(attn: nn.Module, ff: nn.Module, training: bool) -> bool:
    """The fused fast layer reproduces prenorm layers with FAVOR+ "fast" attention and exact GELU,
    without dropout in training."""
    if not (isinstance(attn, PreLayerNorm) and isinstance(ff, PreLayerNorm)):
        return False
    sa, fw = attn.fn, ff.fn.fn if isinstance(ff.fn, SequenceChunks) else ff.fn
    if not (isinstance(sa, SelfAttention) and isinstance(fw, FeedForward) and sa.fast_attention.impl == "fast"):
        return False
    if getattr(fw.act, "approximate", "none") != "none" or not isinstance(fw.act, nn.GELU):
        return False
    return not training or (sa.dropout.p == 0 and fw.dropout.p == 0)


def fused_layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + Attn(LN1(x)), then + FF(LN2(.)), as `fused_layer_usable` layers compute it."""
    sa, fw = attn.fn, ff.fn.fn if isinstance(ff.fn, SequenceChunks) else ff.fn
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    params = (attn.norm.weight, attn.norm.bias, attn.norm.eps, sa.to_q.weight, sa.to_k.weight, sa.to_v.weight,
              sa.to_out.weight, sa.to_out.bias, ff.norm.weight, ff.norm.bias, ff.norm.eps, fw.w1.weight, fw.w1.bias,
              fw.w2.weight, fw.w2.bias)
    projection = sa.fast_attention.projection_matrix
    chunk = sa.fast_attention.chunk
    with torch.autocast(device, enabled=False):
        tensors = [x] + [p for p in params if isinstance(p, torch.Tensor)]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _FusedLayerFunction.apply(x, projection, dtype, chunk, *params)
        chunks = _plan(x, chunk)
        return _fused_layer_forward(x, _fused_layer_weights(params, projection, dtype), chunks, keep=False)[0]


# --------------------------------------------------------------------------------------------------
# encoder


class Layers(nn.Module):
    """Holds `layers` (one [attention, feed-forward] pair per depth) under the published names."""

    def __init__(self, config: ModelConfig):
        super().__init__()

        def wrap(fn: nn.Module) -> nn.Module:
            return PreLayerNorm(config.dim, fn) if config.residual == "prenorm" else ReZero(fn)

        self.layers = nn.ModuleList(
            nn.ModuleList(
                [wrap(SelfAttention(config)), wrap(SequenceChunks(FeedForward(config), config.attn_chunk))]
            )
            for _ in range(config.depth)
        )


def _layer_forward(attn: nn.Module, ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x + attn(x)
    return x + ff(x)


class Performer(nn.Module):
    """The encoder: residual attention and feed-forward blocks, with the published redraw counter."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.net = Layers(config)
        self.feature_redraw_interval = config.feature_redraw_interval
        self.grad_checkpoint = config.grad_checkpoint
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        # Redraws use their own generator seeded from (redraw_seed, redraw_count), so every DDP rank
        # draws the same matrices without communicating, and a resumed run continues the sequence.
        self.redraw_seed = 0
        self.redraw_count = 0

    def redraw_projections(self) -> None:
        generator = torch.Generator().manual_seed(self.redraw_seed * 1_000_003 + self.redraw_count)
        for module in self.modules():
            if isinstance(module, FastAttention):
                module.redraw_projection_matrix(generator)
        self.redraw_count += 1

    def check_redraw(self) -> None:
        """Published semantics: at the start of a training forward, redraw if the counter has reached
        the interval (and reset it, without counting this call), otherwise count the call."""
        if not self.training or not self.feature_redraw_interval:
            return
        if int(self.calls_since_last_redraw) >= self.feature_redraw_interval:
            self.redraw_projections()
            self.calls_since_last_redraw.zero_()
            return
        self.calls_since_last_redraw += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_redraw()
        for attn, ff in self.net.layers:
            if fused_layer_usable(attn, ff, self.training):
                x = fused_layer(attn, ff, x)  # stores little and recomputes the rest in backward by itself
            elif self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(_layer_forward, attn, ff, x, use_reentrant=False)
            else:
                x = _layer_forward(attn, ff, x)
        return x


# --------------------------------------------------------------------------------------------------
# heads and the full model


class CellTypeHead(nn.Module):
    """The published classifier: a shared dim -> 1 projection per position (a Conv2d(1, 1, (1, dim))
    in the original, kept for the checkpoint layout), ReLU, then seq_len -> 512 -> 128 -> classes."""

    def __init__(self, seq_len: int, dim: int, n_classes: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(seq_len, 512)
        self.act1 = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(512, 128)
        self.act2 = nn.ReLU()
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(128, n_classes)

    @property
    def n_classes(self) -> int:
        return self.fc3.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b, n, dim) encodings -> (b, 128) cell embedding before the last layer."""
        # the (1, dim) convolution is a dot product per position: a linear map is the same and faster
        score = F.linear(x, self.conv1.weight.view(1, -1).to(x.dtype), self.conv1.bias.to(x.dtype))
        hidden = self.act(score.squeeze(-1))  # (b, n)
        hidden = self.dropout1(self.act1(self.fc1(hidden)))
        return self.dropout2(self.act2(self.fc2(hidden)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


class PerformerLM(nn.Module):
    """Token + gene positional embedding -> Performer encoder -> final LayerNorm -> head (`to_out`):
    per-position expression-bin logits (pretraining) or, after `attach_classifier`, cell-type logits."""

    def __init__(self, config: ModelConfig, pos_table: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.pos_emb = GenePositionalEmbedding(config, pos_table) if config.pos_embed != "none" else None
        self.dropout = nn.Dropout(config.emb_dropout)
        self.performer = Performer(config)
        self.norm = nn.LayerNorm(config.dim)
        self.to_out: nn.Module = nn.Linear(config.dim, config.num_tokens)

    @property
    def head_kind(self) -> str:
        return "classifier" if isinstance(self.to_out, CellTypeHead) else "mlm"

    def attach_classifier(self, n_classes: int, dropout: float = 0.0) -> "PerformerLM":
        device = self.token_emb.weight.device
        self.to_out = CellTypeHead(self.config.seq_len, self.config.dim, n_classes, dropout).to(device)
        return self

    def set_redraw_seed(self, seed: int) -> None:
        self.performer.redraw_seed = int(seed)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n) int tokens -> (b, n, dim) encodings after the final LayerNorm."""
        x = self.token_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb(tokens.shape[1], x.dtype)
        x = self.performer(self.dropout(x))
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, return_encodings: bool = False) -> torch.Tensor:
        x = self.encode(tokens)
        if return_encodings:
            return x
        return self.to_out(x)

    def classify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell-type logits (b, n_classes) and the 128-d cell embedding the head computes on the way."""
        if not isinstance(self.to_out, CellTypeHead):
            raise RuntimeError("classify() needs the classifier head: call attach_classifier first")
        hidden = self.to_out.features(self.encode(tokens))
        return self.to_out.fc3(hidden), hidden


# --------------------------------------------------------------------------------------------------
# reading an architecture back from a state dict


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[ModelConfig, str, int | None]:
    """Rebuilds the configuration of a checkpoint that carries none (the published files) from its
    tensor shapes. Returns (config, head kind "mlm" | "classifier", n_classes or None).

    Raises KeyError/ValueError when the keys do not form a scBERT model."""
    token_emb = state_dict["token_emb.weight"]
    num_tokens, dim = token_emb.shape
    depth = 1 + max(int(key.split(".")[3]) for key in state_dict if key.startswith("performer.net.layers."))
    prefix = "performer.net.layers.0.0."
    nb_features, dim_head = state_dict[prefix + "fn.fast_attention.projection_matrix"].shape
    inner = state_dict[prefix + "fn.to_q.weight"].shape[0]
    ff_hidden = state_dict["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    residual = "rezero" if prefix + "g" in state_dict else "prenorm"
    if "pos_emb.emb.weight" in state_dict:
        pos = state_dict["pos_emb.emb.weight"]
        seq_len = pos.shape[0]
        pos_embed = "gene2vec" if pos.dtype == torch.float64 else "learned"
    else:
        pos_embed = "none"
        seq_len = None
    if "to_out.fc1.weight" in state_dict:
        head = "classifier"
        n_classes = int(state_dict["to_out.fc3.weight"].shape[0])
        seq_len = int(state_dict["to_out.fc1.weight"].shape[1])
    elif "to_out.weight" in state_dict:
        head, n_classes = "mlm", None
    else:
        raise KeyError("to_out")
    if seq_len is None:
        raise ValueError("the sequence length cannot be read from a model with neither a positional "
                         "embedding nor a classifier head")
    if inner % dim_head or ff_hidden % dim:
        raise ValueError(f"inconsistent shapes: q width {inner}, head width {dim_head}, ff {ff_hidden}")
    config = ModelConfig(
        bin_num=int(num_tokens) - 2,
        gene_num=int(seq_len) - 1,
        dim=int(dim),
        depth=depth,
        heads=int(inner // dim_head),
        dim_head=int(dim_head),
        nb_features=int(nb_features),
        ff_mult=int(ff_hidden // dim),
        residual=residual,
        pos_embed=pos_embed,
    )
    return config, head, n_classes
