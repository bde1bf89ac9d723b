"""How one pass of the chunked engine runs: its chunks of the sequence, the threads they are spread
over, whether the chunk steps are compiled, and whether a fused layer keeps its large activations
for the backward. `make_plan` derives all of it from the settings and the input's size; a forward
stores its plan so that its backward runs the same chunks."""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

import torch

from kernels.settings import ExecutionSettings

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


class Plan(NamedTuple):
    chunks: tuple[slice, ...]  # consecutive slices covering the sequence
    workers: int  # threads the chunks are spread over (1: the calling thread)
    compile: bool  # run the chunk steps through torch.compile
    keep: bool  # a fused layer keeps q, k, v and the hidden layer for its backward


def chunk_length(settings: ExecutionSettings) -> int:
    return settings.chunk or DEFAULT_CHUNK


def split_sequence(n: int, chunk: int, batch: int = 1, workers: int = 1) -> tuple[slice, ...]:
    """Near-equal slices of the sequence of about `chunk` rows over the batch (down to 64 positions
    for large batches); their number a multiple of the workers when there are enough rows, so the
    threads finish together; no 1-row tail (compiled code would specialise it)."""
    chunk = max(min(chunk, 64), chunk // max(batch, 1))
    count = -(-n // chunk)
    if workers > 1 and n >= 64 * workers:
        count = -(-count // workers) * workers
    base, extra = divmod(n, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (i < extra))
    return tuple(slice(start, stop) for start, stop in zip(bounds, bounds[1:]))


def make_plan(settings: ExecutionSettings, device: torch.device, batch: int, positions: int,
              keep_bytes_needed: int | None = None) -> Plan:
    """The plan of a pass over a (batch, positions, ...) input. keep_bytes_needed: what a fused
    layer in training would keep (None: nothing to keep)."""
    if device.type != "cpu":
        workers = 1  # chunk threads exist to share a CPU's cores
    elif settings.threads is not None:
        workers = settings.threads
    else:
        workers = torch.get_num_threads() if batch * positions >= THREAD_MIN_ROWS else 1
    compile_steps = settings.compile == "on" or (settings.compile == "auto" and positions >= COMPILE_MIN_LEN)
    budget = settings.keep_bytes
    if budget is None:
        budget = 0 if settings.grad_checkpoint else KEEP_MAX_BYTES
    keep = keep_bytes_needed is not None and keep_bytes_needed <= budget
    return Plan(split_sequence(positions, chunk_length(settings), batch, workers), workers, compile_steps, keep)


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
    """Element-wise sum of the groups' tuples of tensors (nested tuples too; NamedTuples stay so)."""
    sums = [sum_parts(items) if isinstance(items[0], tuple) else sum(items) for items in zip(*parts)]
    return type(parts[0])(*sums) if hasattr(parts[0], "_fields") else tuple(sums)


# --------------------------------------------------------------------------------------------------
# compiled chunk steps

_compiled_steps: dict[Any, Any] = {}  # (step, threads) -> compiled step
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
        threads = torch.get_num_threads()
        if (fn, threads) not in _compiled_steps:
            _compiled_steps[fn, threads] = torch.compile(
                fn, dynamic=False, options={"cpp.threads": threads, "cpp_wrapper": True})
            dynamo_config = torch._dynamo.config  # raised, never lowered: other code may rely on more
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        for index, axis in fn.chunk_dims.items():
            if index < len(args):  # optional chunk inputs may be left out
                torch._dynamo.maybe_mark_dynamic(args[index], axis)
        try:
            return _compiled_steps[fn, threads](*args)
        except Exception as err:  # stay correct, warn once
            if fn not in _failed_steps:
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using the eager step", RuntimeWarning)
            _failed_steps.add(fn)
            return fn(*args)

    return run
