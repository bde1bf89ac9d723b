"""Fused FAVOR+ in Triton, forward and backward: model.favor_attention_reference (the same function
as kernels.favor.favor_attention) with each tile's projections and features computed in registers
and never written out. For CUDA GPUs of compute capability 8.0 and later, in bfloat16 or float32;
on the CPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
Importing this module does not import triton: the kernels (kernels.triton_favor_kernels) are
imported on the first launch.

Per cell and head, with w = c W (m, d), c = d^-1/4, p = x w^T and a(x) = c^2 |x|^2 / 2:
  keys     phi_n = exp(p_n - a_n - M) + eps       M: the cell's largest key projection
  queries  f_n   = exp(p_n - a_n - max_j p_nj) + eps
  out_n    = f_n^T C / f_n^T s,   C = sum_n phi_n v_n^T (m, d),  s = sum_n phi_n (m)
(the ratio m^-1/2 cancels; the eps terms do not).

Four kernels and two small merges of torch ops (no host reads anywhere):
1. keys: a program per (split of the positions, feature block, cell and head) sums exp(p - a - M')
   v^T and exp(p - a - M') over its positions with its own running maximum M' (an online
   maximum: the sums so far are rescaled when it rises) and counts the entries equal to M'.
   The merge takes M over a cell's programs, rescales and adds their partials, counts the ties
   of M (the counts of the programs whose M' is M) and adds the eps terms in closed form
   (C += eps sum_n v_n, s += eps n).
2. queries: a program per (position tile, cell and head) loops over the feature blocks with an
   online row maximum and writes out, each row's maximum, normaliser f^T s and number of
   features at its maximum.
3. queries' backward: recomputes the query features; writes dq and adds d C, d s (atomics).
4. keys' backward: recomputes the key features; writes dk, dv; the gradient through M (from the
   merged d C, d s) goes to the entries whose projection equals the stored float32 M, split
   evenly between the ties as torch.amax splits it.
What the backward keeps: C (b, h, m, d), s (b, h, m), sum_n v (b, h, d) in float32, M and its tie
count (b,), and per row the maximum, normaliser and tie count (b, h, n); never (b, h, n, m).

Storage in the inputs' dtype, accumulation, exponents and sums in float32; matmul operands in the
storage dtype (bfloat16 tensor cores; float32 as "ieee", or "tf32" when
torch.backends.cuda.matmul.allow_tf32 is set). The features are padded to a multiple of the
feature block (m = 266: 288 with blocks of 32, 320 with 64, 384 with 128).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from kernels.favor import KERNEL_EPS, scaled_projection

OP_NAMESPACE = "scbert"


class Blocks(NamedTuple):
    """The tile sizes of a launch (powers of two >= 16)."""

    block_n: int = 64  # positions per tile
    block_m: int = 32  # features per block; m is padded up to a multiple (266 -> 288)
    key_tiles: int = 16  # position tiles per keys program (more programs: more partial sums to merge)
    num_warps: int = 4
    num_stages: int = 2  # software pipelining of the loops' loads


# 64 x 64 tiles spill registers on sm_80 in both backward kernels (test_triton_kernels reports it)
GPU_BLOCKS = Blocks()
INTERPRETER_BLOCKS = Blocks(block_n=32, block_m=32, key_tiles=4, num_warps=1, num_stages=1)


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET=1, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether favor_attention runs here: a CUDA GPU of compute capability >= 8.0 with bfloat16 or
    float32 and triton installed, or the CPU under Triton's interpreter (TRITON_INTERPRET=1).
    float16 is not offered: the key sums C, cast to the storage dtype for the queries' matmul, can
    outgrow its range (65,504) over 16,907 positions."""
    device = torch.device(device)
    if dtype not in (torch.float32, torch.bfloat16) or not triton_importable():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and (interpreting() if _kernel_module is None else _kernels_interpreted)


_kernel_module = None
_kernels_interpreted = False  # whether the kernels were defined under the interpreter


def _kernels():
    """kernels.triton_favor_kernels, imported on first use (triton reads TRITON_INTERPRET when a
    kernel is defined, so the mode is fixed from then on)."""
    global _kernel_module, _kernels_interpreted
    if _kernel_module is None:
        _kernels_interpreted = interpreting()
        from kernels import triton_favor_kernels

        _kernel_module = triton_favor_kernels
    return _kernel_module


def _dot_types(dtype: torch.dtype, tf32: bool):
    """(DOT_DTYPE, PRECISION) constexprs: the interpreter's bfloat16 dot is wrong, so there the
    operands are cast to float32."""
    import triton.language as tl

    _kernels()
    if dtype == torch.float32 or _kernels_interpreted:
        return tl.float32, ("tf32" if tf32 and dtype == torch.float32 else "ieee")
    return tl.bfloat16, "ieee"  # the precision is not used for bfloat16 operands


def _head_block(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


class _Launch(NamedTuple):
    """The constexprs and launch options that every kernel of one call shares."""

    blocks: Blocks
    block_d: int
    dot_dtype: object
    precision: str

    def kwargs(self) -> dict:
        return dict(BLOCK_N=self.blocks.block_n, BLOCK_M=self.blocks.block_m, BLOCK_D=self.block_d,
                    DOT_DTYPE=self.dot_dtype, PRECISION=self.precision, num_warps=self.blocks.num_warps,
                    num_stages=self.blocks.num_stages)


def _launch(dtype: torch.dtype, d: int, blocks: Blocks, tf32: bool) -> _Launch:
    return _Launch(blocks, _head_block(d), *_dot_types(dtype, tf32))


# --------------------------------------------------------------------------------------------------
# forward and backward on given tensors


def _forward(q, k, v, w, blocks: Blocks, tf32: bool):
    """q, k, v (b, n, h, d) of any strides; w = c W (m, d) in their dtype -> (out (b, n, h, d),
    C (b, h, m, d), s (b, h, m), sum_n v (b, h, d), M (b,), M's tie count (b,), row maxima,
    normalisers and tie counts (b, h, n)); all but out in float32."""
    kern = _kernels()
    b, n, h, d = q.shape
    m = w.shape[0]
    launch = _launch(q.dtype, d, blocks, tf32)
    tiles = -(-n // blocks.block_n)
    splits = -(-tiles // blocks.key_tiles)
    m_blocks = -(-m // blocks.block_m)
    m_pad = m_blocks * blocks.block_m
    f32 = dict(dtype=torch.float32, device=q.device)
    context_parts = torch.empty(b, h, splits, m_pad, d, **f32)
    k_sum_parts = torch.empty(b, h, splits, m_pad, **f32)
    max_parts = torch.empty(b, h, splits, m_blocks, **f32)
    count_parts = torch.empty(b, h, splits, m_blocks, **f32)
    v_sum_parts = torch.empty(b, h, splits, d, **f32)
    half_c2 = 0.5 / math.sqrt(d)
    kern.favor_keys_kernel[(splits, m_blocks, b * h)](
        k, v, w, context_parts, k_sum_parts, max_parts, count_parts, v_sum_parts, *_strides(k), *_strides(v),
        n, h, m, d, half_c2, blocks.key_tiles, splits, **launch.kwargs())

    # merge the programs' partial sums onto the cell's maximum
    key_max = max_parts.amax((1, 2, 3))  # (b,)
    scale = torch.exp(max_parts - key_max[:, None, None, None]).repeat_interleave(blocks.block_m, 3)
    context = torch.einsum("bhsmd,bhsm->bhmd", context_parts, scale)[:, :, :m]
    k_sum = (k_sum_parts * scale).sum(2)[:, :, :m]
    v_sum = v_sum_parts.sum(2)
    key_count = (count_parts * (max_parts == key_max[:, None, None, None])).sum((1, 2, 3))
    context = (context + KERNEL_EPS * v_sum[:, :, None, :]).contiguous()
    k_sum = (k_sum + KERNEL_EPS * n).contiguous()
    eps_v = KERNEL_EPS * context.sum(2)  # (b, h, d)
    eps_s = KERNEL_EPS * k_sum.sum(2)  # (b, h)

    out = torch.empty(b, n, h, d, dtype=q.dtype, device=q.device)
    row_max, den, row_count = (torch.empty(b, h, n, **f32) for _ in range(3))
    kern.favor_queries_kernel[(tiles, b * h)](
        q, w, context.to(q.dtype), k_sum, eps_v, eps_s, out, row_max, den, row_count, *_strides(q),
        n, h, m, d, half_c2, **launch.kwargs())
    return out, context, k_sum, v_sum, key_max, key_count, row_max, den, row_count


def _backward(q, k, v, w, out, grad, context, k_sum, v_sum, key_max, key_count, row_max, den, row_count,
              blocks: Blocks, tf32: bool):
    """-> (dq, dk, dv) (b, n, h, d) in q's dtype."""
    kern = _kernels()
    b, n, h, d = q.shape
    m = w.shape[0]
    launch = _launch(q.dtype, d, blocks, tf32)
    tiles = -(-n // blocks.block_n)
    half_c2 = 0.5 / math.sqrt(d)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(b, n, h, d, dtype=q.dtype, device=q.device) for _ in range(3))
    d_context = torch.zeros(b, h, m, d, **f32)
    d_k_sum = torch.zeros(b, h, m, **f32)
    g_num_sum = torch.zeros(b, h, d, **f32)
    g_den_sum = torch.zeros(b, h, **f32)
    eps_v = KERNEL_EPS * context.sum(2)
    eps_s = KERNEL_EPS * k_sum.sum(2)
    kern.favor_queries_grad_kernel[(tiles, b * h)](
        q, grad, out, den, row_max, row_count, w, context.to(q.dtype), k_sum, eps_v, eps_s,
        dq, d_context, d_k_sum, g_num_sum, g_den_sum, *_strides(q), *_strides(grad),
        n, h, m, d, half_c2, **launch.kwargs())

    # the queries' eps terms reach every feature; M enters every key feature as exp(-M)
    d_context = d_context + KERNEL_EPS * g_num_sum[:, :, None, :]
    d_k_sum = d_k_sum + KERNEL_EPS * g_den_sum[:, :, None]
    d_key_max = -((d_context * (context - KERNEL_EPS * v_sum[:, :, None, :])).sum((1, 2, 3))
                  + (d_k_sum * (k_sum - KERNEL_EPS * n)).sum((1, 2)))
    d_eps_v = KERNEL_EPS * d_context.sum(2)
    kern.favor_keys_grad_kernel[(tiles, b * h)](
        k, v, w, d_context.to(q.dtype), d_k_sum, d_eps_v, key_max, d_key_max, key_count, dk, dv,
        *_strides(k), *_strides(v), n, h, m, d, half_c2, **launch.kwargs())
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# the custom ops


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the inputs'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_inputs(q, k, v, w) -> None:
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"q, k, v must share one (b, n, h, d) shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype == w.dtype) or q.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"q, k, v and the projection must share one dtype, bfloat16 or float32; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}, {w.dtype}")
    if w.dim() != 2 or w.shape[1] != q.shape[3]:
        raise ValueError(f"the projection must be (m, {q.shape[3]}), got {tuple(w.shape)}")


@torch.library.custom_op(f"{OP_NAMESPACE}::triton_favor", mutates_args=())
def _favor_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, block_n: int, block_m: int,
              key_tiles: int, num_warps: int, num_stages: int, tf32: bool) -> tuple[(torch.Tensor,) * 9]:
    _check_inputs(q, k, v, w)
    with _on_device(q.device):
        return _forward(q, k, v, w.contiguous(), Blocks(block_n, block_m, key_tiles, num_warps, num_stages), tf32)


@_favor_op.register_fake
def _favor_op_fake(q, k, v, w, *config):
    _check_inputs(q, k, v, w)
    b, n, h, d = q.shape
    m = w.shape[0]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty(b, n, h, d), q.new_empty(b, h, m, d, dtype=torch.float32), q.new_empty(b, h, m, **f32),
            q.new_empty(b, h, d, **f32), q.new_empty(b, **f32), q.new_empty(b, **f32),
            q.new_empty(b, h, n, **f32), q.new_empty(b, h, n, **f32), q.new_empty(b, h, n, **f32))


@torch.library.custom_op(f"{OP_NAMESPACE}::triton_favor_backward", mutates_args=())
def _favor_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
                       grad: torch.Tensor, context: torch.Tensor, k_sum: torch.Tensor, v_sum: torch.Tensor,
                       key_max: torch.Tensor, key_count: torch.Tensor, row_max: torch.Tensor, den: torch.Tensor,
                       row_count: torch.Tensor, block_n: int, block_m: int, key_tiles: int, num_warps: int,
                       num_stages: int, tf32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _on_device(q.device):
        return _backward(q, k, v, w.contiguous(), out, grad, context, k_sum, v_sum, key_max, key_count, row_max,
                         den, row_count, Blocks(block_n, block_m, key_tiles, num_warps, num_stages), tf32)


@_favor_backward_op.register_fake
def _favor_backward_op_fake(q, k, v, w, out, grad, *rest):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, w, *config = inputs
    ctx.config = config
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, k, v, w, *output)


def _favor_op_backward(ctx, grad, *unused):
    q, k, v, w, out, *state = ctx.saved_tensors
    dq, dk, dv = _favor_backward_op(q, k, v, w, out, grad, *state, *ctx.config)
    return (dq, dk, dv) + (None,) * (len(ctx.config) + 1)


_favor_op.register_autograd(_favor_op_backward, setup_context=_setup_context)


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor,
                    blocks: Blocks | None = None) -> torch.Tensor:
    """model.favor_attention_reference by the fused kernels; differentiable in q, k, v (not in the
    projection). q, k, v (b, n, h, d) of any strides, bfloat16 or float32; projection (m, d).
    -> (b, n, h, d) in q's dtype. Check `available(q.device, q.dtype)` first."""
    if blocks is None:
        blocks = INTERPRETER_BLOCKS if q.device.type == "cpu" else GPU_BLOCKS
    tf32 = q.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    w = scaled_projection(projection.detach(), q.dtype)
    return _favor_op(q, k, v, w, *blocks, tf32)[0]


# --------------------------------------------------------------------------------------------------
# compiling for a GPU without one


# pointers in the storage dtype, per kernel (the others are float32)
_STORAGE_POINTERS = {
    "favor_keys_kernel": ("k_ptr", "v_ptr", "w_ptr"),
    "favor_queries_kernel": ("q_ptr", "w_ptr", "context_ptr", "out_ptr"),
    "favor_queries_grad_kernel": ("q_ptr", "g_ptr", "out_ptr", "w_ptr", "context_ptr", "dq_ptr"),
    "favor_keys_grad_kernel": ("k_ptr", "v_ptr", "w_ptr", "d_context_ptr", "dk_ptr", "dv_ptr"),
}


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack, local and static shared memory of a cubin, as cuobjdump (shipped with
    triton) reports them. Spills live in the stack frame (these kernels have no local arrays)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", file.name], check=True, capture_output=True,
                              text=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "reg" not in usage:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text!r}")
    return usage


def compile_report(capability: int, dtype: torch.dtype = torch.bfloat16, blocks: Blocks = GPU_BLOCKS,
                   d: int = 64) -> list[dict]:
    """Compiles the four kernels for a CUDA GPU of the given compute capability (80, 90, ...)
    without one, specialised as a launch on (b, n, 3, h, d) views of one qkv tensor would be
    (16-byte aligned pointers, unit d strides, the other strides and d multiples of 16), and
    reports per kernel: registers per thread, spilled bytes (stack frame and local memory), shared memory
    (triton's dynamic allocation, and static) and the seconds it took. Needs triton without
    TRITON_INTERPRET (the interpreter's kernels cannot be compiled)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = _kernels()
    if _kernels_interpreted:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset: interpreted kernels cannot be compiled")
    launch = _launch(dtype, d, blocks, tf32=False)
    storage = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
    constexprs = dict(BLOCK_N=blocks.block_n, BLOCK_M=blocks.block_m, BLOCK_D=launch.block_d,
                      DOT_DTYPE=launch.dot_dtype, PRECISION=launch.precision)
    target = GPUTarget("cuda", capability, 32)
    report = []
    for name, pointers in _STORAGE_POINTERS.items():
        fn = getattr(kern, name)
        signature, attrs, constants = {}, {}, dict(constexprs)
        for index, arg in enumerate(fn.arg_names):
            if arg in constants:
                signature[arg] = "constexpr"
            elif arg.startswith("stride_") and arg.endswith("d"):
                signature[arg], constants[arg] = "constexpr", 1  # as the JIT specialises a 1
            elif arg.endswith("_ptr"):
                signature[arg] = storage if arg in pointers else "*fp32"
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif arg == "half_c2":
                signature[arg] = "fp32"
            else:
                signature[arg] = "i32"
                if arg.startswith("stride_") or arg == "d":
                    attrs[(index,)] = [["tt.divisibility", 16]]
        start = time.perf_counter()
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        options = {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
        compiled = triton.compile(source, target=target, options=options)
        seconds = time.perf_counter() - start
        usage = _resource_usage(compiled.asm["cubin"])
        report.append(dict(kernel=name, capability=capability, registers=usage["reg"],
                           spill_bytes=usage.get("stack", 0) + usage.get("local", 0),
                           shared_bytes=int(compiled.metadata.shared), static_shared_bytes=usage.get("shared", 0),
                           seconds=round(seconds, 2)))
    return report
