"""How the model is executed, as one settings object: which path runs a layer, whether the engine
compiles its chunk steps, how long its chunks are, what it keeps for the backward and how many
threads share a pass. Architecture numbers live in model.ModelConfig; nothing here changes what the
model computes, only how (every path is tested against the plain modules).

Two ways to set them:

- ``set_execution(**changes)``: process-wide (the scripts call it once at start-up, from their
  flags and the environment); every thread sees it.
- ``with execution(**changes):``: for the calls made inside the block, on this thread (a
  ``contextvars`` context); it nests, and takes precedence over the process-wide settings.

The engine reads the settings once per call, on the calling thread, and hands its worker threads a
finished plan: chunk threads therefore always run with the caller's settings, whatever their own
context. A backward pass runs with the plan its forward made, even outside the block. A
``threading.Thread`` that a user starts does not inherit the block (standard ``contextvars``
behaviour): use ``set_execution`` or enter the block in that thread.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Mapping

PATHS = ("fused", "modules", "reference")
COMPILE_MODES = ("auto", "on", "off")
TRITON_MODES = ("auto", "off")


@dataclass(frozen=True)
class ExecutionSettings:
    """None means "the engine chooses" (see kernels.plan for its rules); a value is obeyed."""

    # "fused": each prenorm layer runs as one engine op (chunked, hand-written backward) where it can
    # (exact GELU, no dropout while training), the modules otherwise; "modules": every module's own
    # forward with autograd, FAVOR+ by the engine's chunked op; "reference": the modules with the
    # plain FAVOR+ maths (model.favor_attention_reference), which builds the (b, h, n, m) features
    path: str = "fused"
    # torch.compile the engine's chunk steps: "auto" (sequences of >= 2,048 positions), "on", "off"
    compile: str = "auto"
    # positions per chunk over the batch (the engine divides it by the batch size, down to 64)
    chunk: int | None = None
    # bytes a fused layer may keep (q, k, v and the feed-forward's hidden layer) for its backward
    # instead of recomputing them; larger inputs recompute
    keep_bytes: int | None = None
    # threads a pass spreads its chunks over (1: the calling thread, with torch's intra-op threads)
    threads: int | None = None
    # store as little as possible in training: module-path layers are recomputed in the backward
    # (torch.utils.checkpoint) and fused layers keep nothing beyond their inputs (unless keep_bytes)
    grad_checkpoint: bool = False
    # bytes a GPU pass may use for one chunk's temporaries and what it keeps for its backward
    # (None: half the GPU's free memory)
    memory_budget: int | None = None
    # plan passes as for this device type ("cpu" or "cuda"; None: the input's): to look at, or test,
    # the CUDA plan on CPU tensors
    plan_device: str | None = None
    # the fused Triton FAVOR+ kernels (kernels.triton_favor): "auto" where they run (a CUDA GPU of
    # compute capability >= 8.0, bf16 or fp32, triton installed), "off" never
    triton: str = "auto"

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"execution path must be one of {', '.join(PATHS)}, got {self.path!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        for name in ("chunk", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("keep_bytes", "memory_budget"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
        if self.triton not in TRITON_MODES:
            raise ValueError(f"triton must be one of {', '.join(TRITON_MODES)}, got {self.triton!r}")
        if self.plan_device not in (None, "cpu", "cuda"):
            raise ValueError(f"plan_device must be 'cpu', 'cuda' or None, got {self.plan_device!r}")


_process_settings = ExecutionSettings()
_block_settings: contextvars.ContextVar[ExecutionSettings | None] = contextvars.ContextVar(
    "scbert_execution", default=None)


def get_execution() -> ExecutionSettings:
    """The settings in force for a call made here and now."""
    block = _block_settings.get()
    return _process_settings if block is None else block


def set_execution(**changes) -> ExecutionSettings:
    """Changes the process-wide settings (fields of ExecutionSettings); returns them."""
    global _process_settings
    _process_settings = dataclasses.replace(_process_settings, **changes)
    return _process_settings


@contextlib.contextmanager
def execution(settings: ExecutionSettings | None = None, /, **changes) -> Iterator[ExecutionSettings]:
    """Within the block, on this thread: `settings` (default: those in force) with `changes` applied."""
    chosen = dataclasses.replace(settings or get_execution(), **changes)
    token = _block_settings.set(chosen)
    try:
        yield chosen
    finally:
        _block_settings.reset(token)


def settings_from_environment(environ: Mapping[str, str]) -> dict:
    """The execution settings the environment asks for (SCBERT_COMPILE=auto|on|off), as
    set_execution keywords; the scripts apply them once at start-up. Raises ValueError naming the
    variable for a value that is not understood."""
    value = environ.get("SCBERT_COMPILE", "").strip().lower()
    if not value:
        return {}
    if value not in COMPILE_MODES:
        raise ValueError(f"SCBERT_COMPILE={environ['SCBERT_COMPILE']!r} is not one of {', '.join(COMPILE_MODES)}")
    return {"compile": value}
