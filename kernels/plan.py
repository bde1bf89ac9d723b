"""How one pass of the chunked engine runs: its chunks of the sequence, the threads they are spread
over, whether the chunk steps are compiled, and whether a fused layer keeps its large activations
for the backward. `make_plan` derives all of it from the settings, the device type, the input's
size and, on a GPU, its free memory; a forward stores its plan so that its backward runs the same
chunks.

A CPU pass uses cache-sized chunks spread over the cores. A GPU pass uses as few chunks as its
memory budget allows (each chunk is a handful of kernel launches per step, and a GPU wants large
ones), on the calling thread, and keeps activations when they fit in a share of the free memory."""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable, NamedTuple

import torch

from kernels.settings import ExecutionSettings, get_execution

# Positions (over the batch) per chunk: temporaries stay cache-sized.
DEFAULT_CHUNK = 1024
# "auto" compiles for sequences at least this long. Shorter ones gained less than the compilation
# cost in every script measured (benchmarks/results_compile.md).
COMPILE_MIN_LEN = 2048
# A fused layer keeps q, k, v and the hidden layer when they fit in this many bytes: about 9,000
# positions (batch x sequence) in bf16 at the published widths; 16,907 positions would keep 550 MB
# over 6 layers (benchmarks/results_speed.md has what keeping saves).
KEEP_MAX_BYTES = 48 * 2**20
# Below this many positions a pass runs on the calling thread, where torch's intra-op threads share
# each matmul; with few chunks per thread, chunk threads scaled poorly.
THREAD_MIN_ROWS = 4096
# Compiled graphs allowed per step function: one per thread count, batch size, dtype and
# kept/recomputed backward; past dynamo's default of 8 it would fall back to eager without a word.
RECOMPILE_LIMIT = 64
# GPU: a pass may use this share of the free memory (what the settings' memory_budget replaces);
# half of it for one chunk's temporaries, an eighth for what a layer keeps for its backward.
GPU_MEMORY_SHARE = 0.5
# GPU temporaries per (position, head, feature) of a chunk: the backward's projections, exponentials
# and their gradients in float32 live together (an estimate, which the budget's margins absorb).
GPU_FEATURE_MAPS = 6
# When a CUDA plan is asked for on another device (settings.plan_device), it assumes an H100/H200.
ASSUMED_GPU_MEMORY = 80 * 2**30


class Plan(NamedTuple):
    chunks: tuple[slice, ...]  # consecutive slices covering the sequence
    workers: int  # threads the chunks are spread over (1: the calling thread)
    compile: bool  # run the chunk steps through torch.compile
    keep: bool  # a fused layer keeps q, k, v and the hidden layer for its backward
    device_type: str = "cpu"  # what the plan was made for ("cpu" or "cuda"): the compiler's options


def chunk_length(settings: ExecutionSettings) -> int:
    return settings.chunk or DEFAULT_CHUNK


def equal_slices(n: int, count: int) -> tuple[slice, ...]:
    """`count` consecutive slices of near-equal length covering range(n)."""
    count = max(1, min(count, n))
    base, extra = divmod(n, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (i < extra))
    return tuple(slice(start, stop) for start, stop in zip(bounds, bounds[1:]))


def split_sequence(n: int, chunk: int, batch: int = 1, workers: int = 1) -> tuple[slice, ...]:
    """Near-equal slices of the sequence of about `chunk` rows over the batch (down to 64 positions
    for large batches); their number a multiple of the workers when there are enough rows, so the
    threads finish together; no 1-row tail (compiled code would specialise it)."""
    chunk = max(min(chunk, 64), chunk // max(batch, 1))
    count = -(-n // chunk)
    if workers > 1 and n >= 64 * workers:
        count = -(-count // workers) * workers
    return equal_slices(n, count)


def make_plan(settings: ExecutionSettings, device_type: str, batch: int, positions: int, heads: int, features: int,
              dtype: torch.dtype, free_memory: int | None = None, keep_bytes_needed: int | None = None) -> Plan:
    """The plan of a pass over a (batch, positions, ...) input with `heads` x `features` random
    features per position, computed in `dtype`. free_memory: bytes free on the GPU (None: unknown;
    not used on a CPU). keep_bytes_needed: what a fused layer in training would keep (None: nothing
    to keep, as in inference). A pure function of its arguments."""
    device_type = settings.plan_device or device_type
    compile_steps = settings.compile == "on" or (settings.compile == "auto" and positions >= COMPILE_MIN_LEN)
    keep_budget = 0 if settings.grad_checkpoint else None
    keep_budget = settings.keep_bytes if settings.keep_bytes is not None else keep_budget
    if device_type != "cuda":
        if settings.threads is not None:
            workers = settings.threads
        else:
            workers = torch.get_num_threads() if batch * positions >= THREAD_MIN_ROWS else 1
        chunks = split_sequence(positions, chunk_length(settings), batch, workers)
        keep_budget = KEEP_MAX_BYTES if keep_budget is None else keep_budget
    else:  # a GPU: one thread, as few chunks as the memory allows
        workers = 1
        budget = settings.memory_budget
        if budget is None:
            budget = int(GPU_MEMORY_SHARE * (ASSUMED_GPU_MEMORY if free_memory is None else free_memory))
        if settings.chunk is not None:
            chunks = split_sequence(positions, settings.chunk, batch)
        else:
            per_position = heads * features * GPU_FEATURE_MAPS * max(accumulation_bytes(dtype), 4)
            chunks = equal_slices(positions, -(-batch * positions * per_position // max(budget // 2, 1)))
        keep_budget = budget // 8 if keep_budget is None else keep_budget
    keep = keep_bytes_needed is not None and keep_bytes_needed <= keep_budget
    return Plan(chunks, workers, compile_steps, keep, device_type)


def plan_pass(device: torch.device, batch: int, positions: int, heads: int, features: int, dtype: torch.dtype,
              keep_bytes_needed: int | None = None) -> Plan:
    """The plan of a pass that starts now: the settings in force on this thread, the GPU's free memory."""
    settings = get_execution()
    planned_for_gpu = (settings.plan_device or device.type) == "cuda"
    free = free_gpu_memory(device) if planned_for_gpu else None
    return make_plan(settings, device.type, batch, positions, heads, features, dtype, free, keep_bytes_needed)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where it is on for x's device, else x's own."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """The engine chooses its dtypes itself (meta tensors have no autocast)."""
    available = torch.amp.is_autocast_available(device.type)
    return torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext()


def accumulation_bytes(dtype: torch.dtype) -> int:
    return 4 if dtype in (torch.float16, torch.bfloat16) else dtype.itemsize


def free_gpu_memory(device: torch.device) -> int | None:
    """Bytes a pass on this CUDA device can still have: the driver's free memory plus what torch's
    caching allocator holds unused (None off CUDA)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# --------------------------------------------------------------------------------------------------
# worker threads

_worker_pools: dict[tuple[int, int], Any] = {}


def run_groups(fn: Callable[[list[tuple[int, slice]]], Any], plan: Plan) -> list:
    """Runs a pass over the plan's chunks: fn(group) consumes a list of (index, rows) pairs and
    returns its partial result; -> the partial results, in group order.

    With several workers each thread runs fn single-threaded on a fixed share of the chunks (every
    k-th), so there is no fork/join per operation: with per-op parallelism every small matmul is a
    barrier, and on a shared machine one descheduled OpenMP worker stalls each of them. The shares
    are fixed, not first come first served, so sums are added in the same order on every run:
    results are bitwise reproducible for a given thread count. Grad and inference mode are
    thread-local: the workers take the caller's."""
    count = min(plan.workers, len(plan.chunks))
    indexed = list(enumerate(plan.chunks))
    if count < 2:
        return [fn(indexed)]
    key = (os.getpid(), count)  # a forked child inherits the pool object but not its threads
    if key not in _worker_pools:
        from concurrent.futures import ThreadPoolExecutor

        _worker_pools[key] = ThreadPoolExecutor(count, thread_name_prefix="favor",
                                                initializer=torch.set_num_threads, initargs=(1,))
    groups = [indexed[start::count] for start in range(count)]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def run(group):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(group)

    return list(_worker_pools[key].map(run, groups))


def sum_parts(parts: list) -> tuple:
    """Element-wise sum of the groups' tuples of tensors (nested tuples too; NamedTuples stay so; None
    stays None)."""
    sums = [sum_parts(items) if isinstance(items[0], tuple) else None if items[0] is None else sum(items)
            for items in zip(*parts)]
    return type(parts[0])(*sums) if hasattr(parts[0], "_fields") else tuple(sums)


# --------------------------------------------------------------------------------------------------
# compiled chunk steps

_compiled_steps: dict[Any, Any] = {}  # (step, device type, threads) -> compiled step
_failed_steps: set = set()  # steps whose compilation failed: eager from then on


def chunk_dims(**dims: int):
    """Marks a step's chunk-length axes (argument name -> axis): the only dynamic dimensions when it
    is compiled, so the other sizes are compile-time constants."""

    def mark(fn):
        names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
        fn.chunk_dims = {names.index(name): axis for name, axis in dims.items()}
        return fn

    return mark


def chunk_step(fn: Callable, plan: Plan) -> Callable:
    """fn itself, or its torch.compile'd version if the plan says so. The compiled kernels use as
    many threads as the calling thread has: one inside run_groups' workers, torch's intra-op
    threads when the pass runs on the calling thread. A compilation failure (no C++ compiler, an
    unsupported platform) falls back to the eager step with one warning."""
    if not plan.compile or fn in _failed_steps:
        return fn

    def run(*args):
        if fn in _failed_steps:  # another chunk's compilation failed: dynamo would retry on every call
            return fn(*args)
        threads = torch.get_num_threads() if plan.device_type == "cpu" else 0
        key = (fn, plan.device_type, threads)
        if key not in _compiled_steps:
            # the C++ options are the CPU backend's; on a GPU inductor's defaults (Triton kernels)
            options = {"cpp.threads": threads, "cpp_wrapper": True} if plan.device_type == "cpu" else {}
            _compiled_steps[key] = torch.compile(fn, dynamic=False, options=options)
            dynamo_config = torch._dynamo.config  # raised, never lowered: other code may rely on more
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        for index, axis in fn.chunk_dims.items():
            if index < len(args):  # optional chunk inputs may be left out
                torch._dynamo.maybe_mark_dynamic(args[index], axis)
        try:
            return _compiled_steps[key](*args)
        except Exception as err:  # stay correct, warn once
            if fn not in _failed_steps:
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using the eager step", RuntimeWarning)
            _failed_steps.add(fn)
            return fn(*args)

    return run
