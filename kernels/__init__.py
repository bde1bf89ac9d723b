"""How the model is executed fast. model.py computes with these when the execution settings say so
and falls back to its own modules otherwise; this package never imports model.py.

- settings.py: the one settings object (path, compile, chunk, keep_bytes, threads, grad_checkpoint)
  with `set_execution` (process-wide) and `execution` (a block on this thread);
- plan.py: a pass's plan (chunks, threads, compile, keep-or-recompute), the worker threads and the
  compiled chunk steps;
- favor.py: FAVOR+ over sequence chunks with hand-written gradients, and the two-pass driver;
- layer.py: a whole prenorm layer as one chunked op with a hand-written backward.

The two entry points below are the dispatch: each reads the settings on the calling thread and runs
the chunked CPU engine (which also runs, unspecialised, on other devices).
"""
from __future__ import annotations

import torch

from kernels import favor as _favor
from kernels.layer import LayerWeights, fused_layer
from kernels.plan import chunk_length, plan_pass
from kernels.settings import ExecutionSettings, execution, get_execution, set_execution, settings_from_environment

__all__ = ["ExecutionSettings", "LayerWeights", "chunk_length", "execution", "favor_attention", "fused_layer",
           "get_execution", "set_execution", "settings_from_environment"]


def favor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Non-causal FAVOR+ with positive random features: model.favor_attention_reference without the
    (b, h, n, m) feature maps. q, k, v (b, n, h, d) of any strides; projection (m, d)."""
    b, n, h, _ = q.shape
    plan = plan_pass(q.device, b, n, h, projection.shape[0], q.dtype)
    return _favor.favor_attention(q, k, v, projection, plan)
