"""How the model is executed fast. model.py computes with these when the execution settings say so
and falls back to its own modules otherwise; this package never imports model.py.

- settings.py: the one settings object (path, compile, chunk, keep_bytes, threads, grad_checkpoint)
  with `set_execution` (process-wide) and `execution` (a block on this thread);
- plan.py: a pass's plan (chunks, threads, compile, keep-or-recompute), the worker threads and the
  compiled chunk steps;
- favor.py: FAVOR+ over sequence chunks with hand-written gradients, and the two-pass driver;
- layer.py: a whole prenorm layer as one chunked op with a hand-written backward;
- triton_favor.py (+ triton_favor_kernels.py): FAVOR+ as fused Triton kernels for CUDA GPUs.

The functions below are the dispatch; each reads the settings on the calling thread. FAVOR+ runs in
the Triton kernels where they run (triton_runs), else in the chunked engine; a prenorm layer runs as
the engine's fused op except where the Triton kernels run: there the model's own modules (cuBLAS
matmuls) around the fused FAVOR+ op are the faster way (fuses_layers).
"""
from __future__ import annotations

import torch

from kernels import favor as _favor
from kernels import triton_favor
from kernels.layer import LayerWeights, fused_layer
from kernels.plan import DEFAULT_CHUNK, compute_dtype, plan_pass
from kernels.settings import ExecutionSettings, execution, get_execution, set_execution, settings_from_environment

__all__ = ["ExecutionSettings", "LayerWeights", "execution", "favor_attention", "fused_layer", "fuses_layers",
           "get_execution", "sequence_chunk", "set_execution", "settings_from_environment", "triton_runs"]


def triton_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FAVOR+ on tensors of this device and dtype runs in the Triton kernels: a CUDA GPU of
    compute capability >= 8.0, bf16 or fp32, triton installed, and the settings' triton not "off".
    (On a CPU never: Triton's interpreter is for the kernels' own tests.)"""
    return device.type == "cuda" and get_execution().triton != "off" and triton_favor.available(device, dtype)


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Non-causal FAVOR+ with positive random features: model.favor_attention_reference without the
    (b, h, n, m) feature maps. q, k, v (b, n, h, d) of any strides; projection (m, d)."""
    if triton_runs(q.device, q.dtype):
        return triton_favor.favor_attention(q, k, v, projection)
    b, n, h, _ = q.shape
    plan = plan_pass(q.device, b, n, h, projection.shape[0], q.dtype)
    return _favor.favor_attention(q, k, v, projection, plan)


def fuses_layers(x: torch.Tensor) -> bool:
    """Whether a prenorm layer over x is best run as the engine's fused op (fused_layer)."""
    return not triton_runs(x.device, compute_dtype(x))


def sequence_chunk(x: torch.Tensor) -> int:
    """Positions per slice when a position-wise module is applied to x in slices (to bound its wide
    hidden activation in inference): the settings' chunk; by default 1,024 on a CPU (cache-sized),
    the whole sequence on a GPU (large kernels; the hidden layer fits)."""
    chunk = get_execution().chunk
    return chunk or (x.shape[1] if x.device.type == "cuda" else DEFAULT_CHUNK)
