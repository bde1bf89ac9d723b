"""Training machinery shared by pretrain.py, finetune.py and evaluate.py: script entry and errors,
distributed setup, mixed precision, the published learning-rate schedule, checkpoints (atomic,
self-describing, loadable with ``weights_only=True``), RNG state, the metrics CSV and loss plots."""
from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import pickle
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import kernels
import run_control
from data_sources import StreamedTokens
from data_utils import InputError, TokenDataset, token_loader
from model import ModelConfig, PerformerLM, infer_config
from run_control import StopRun

# --------------------------------------------------------------------------------------------------
# the log

logger = logging.getLogger("scbert")  # every module logs here or to a child ("scbert.data", ...)


class _CurrentStdout(logging.StreamHandler):
    """Writes to sys.stdout as it is when a message comes, not as it was when the handler was made:
    pytest swaps sys.stdout per test (capsys), and in-process `main(args)` calls must log there."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value):
        pass


def _configure_log() -> None:
    """Rank 0 logs INFO and above to stdout, the other ranks only errors; stderr is left to the
    `error:` line and progress bars. Read from torchrun's RANK, as `setup_distributed` does, so it
    holds from the first message on, for the command line and in-process calls alike."""
    handler = _CurrentStdout()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR)
    logger.propagate = False  # a root handler someone else configures must not print it twice


_configure_log()


# --------------------------------------------------------------------------------------------------
# script entry


def reuse_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """glibc malloc: serve large blocks from the heap instead of fresh mmap'd pages, and keep up to
    1 GiB of freed memory for reuse (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB). The model's
    per-chunk temporaries are freed and allocated again thousands of times per step; as fresh
    pages each time, page faults cost as much as the arithmetic (benchmarks/speed.py, 2,048 genes:
    training step 0.87 -> 0.64 s per cell; performer-pytorch's fp32 time halves with the same
    setting). Peak memory is unchanged. Returns whether it applied (glibc only; SCBERT_MALLOC=default
    leaves the allocator alone)."""
    if not sys.platform.startswith("linux") or environ.get("SCBERT_MALLOC") == "default":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


def configure_from_environment(environ: Mapping[str, str] = os.environ) -> None:
    """The documented environment overrides, read once when a script starts: SCBERT_COMPILE
    (whether the engine compiles its chunk steps, kernels.ExecutionSettings.compile) and
    SCBERT_MALLOC (see reuse_freed_memory)."""
    try:
        kernels.set_execution(**kernels.settings_from_environment(environ))
    except ValueError as err:
        raise InputError(f"{err}; unset it or set it to auto, on or off") from None
    reuse_freed_memory(environ)


def run_main(main: Callable[[Any], Any], parser: Any, argv: list[str] | None = None) -> Any:
    """Parses arguments, applies the environment's overrides and runs main(args). A problem the user
    can fix (InputError) ends the script with one line on stderr and exit code 2; --debug shows the
    traceback instead. A flag argparse cannot parse is one line and exit code 2 as well (not its usage)."""
    def one_line(message: str) -> None:
        print(f"error: {message}; see python {parser.prog} --help", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line
    args = parser.parse_args(argv)
    try:
        configure_from_environment()
        return main(args)
    except StopRun as stop:  # a signal, after the checkpoint was written: exit "try again later"
        logger.info(str(stop))
        cleanup_distributed(sync=False)
        sys.exit(run_control.EXIT_STOPPED)
    except (InputError, torch.OutOfMemoryError) as err:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"error: {err if isinstance(err, InputError) else out_of_memory_message(err, args)}", file=sys.stderr)
        cleanup_distributed(sync=False)
        sys.exit(2)


def out_of_memory_message(err: BaseException, args: Any) -> str:
    """One line for a device that ran out of memory, with the flags that use less."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
    batch = getattr(args, "batch_size", None)
    advice = f"lower --batch_size (now {batch})" if batch else "lower --batch_size"
    if hasattr(args, "grad_checkpoint") and not args.grad_checkpoint:
        advice += " or add --grad_checkpoint"
    if hasattr(args, "grad_acc") and batch:
        advice += "; --grad_acc keeps the effective batch"
    return f"the device ran out of memory ({first[:160]}); {advice}"


# --------------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int, world_size: int, gpus: int) -> torch.device:
    """--device as asked, for this process. `auto` and `cuda` give each rank its own GPU,
    LOCAL_RANK modulo the visible GPUs (so a launcher that shows each process only its own GPU works
    as one that shows all of them); `cuda:N` is that GPU, for one process; `cpu` the CPU."""
    requested = requested.strip().lower()
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return torch.device("cpu")
    if requested not in ("auto", "cuda") and not requested.startswith("cuda:"):
        raise InputError(f"--device {requested!r} is not understood; use auto, cpu, cuda or cuda:N")
    if gpus == 0:
        raise InputError(f"--device {requested} was asked for but no CUDA GPU is visible; use --device cpu")
    if requested.startswith("cuda:"):
        index = requested[5:]
        if not index.isdigit() or int(index) >= gpus:
            raise InputError(f"--device {requested}: {gpus} GPU(s) are visible (cuda:0 to cuda:{gpus - 1}); "
                             f"pick one of them, or CUDA_VISIBLE_DEVICES to choose which are visible")
        if world_size > 1:
            raise InputError(f"--device {requested} would put all {world_size} processes on one GPU; under torchrun "
                             f"use --device cuda (each rank takes its own) and CUDA_VISIBLE_DEVICES to choose GPUs")
        return torch.device("cuda", int(index))
    return torch.device("cuda", local_rank % gpus)


def setup_distributed(device: str = "auto") -> DistContext:
    """One process, or one of several started by torchrun (read from its environment variables):
    gloo on CPU, nccl on CUDA. On a GPU, fp32 matmuls run in TF32 (10-bit mantissa products,
    fp32 sums: what autocast leaves in fp32 is mostly LayerNorm and sums, not matmuls)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = choose_device(device, local_rank, world_size, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=_attempt_store(rank, world_size), rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, dev)


def _attempt_store(rank: int, world_size: int) -> dist.Store:
    """The rendezvous store, with keys of this torchrun attempt only: after a restart
    (--max-restarts) gloo would otherwise find the previous attempt's addresses in it and fail to
    connect. torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); without torchrun rank 0 does."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world_size, is_master=rank == 0 and not agent_store, timeout=dist.default_pg_timeout)
    return dist.PrefixStore(f"scbert/attempt_{run_control.restarted_by_torchrun()}", store)


def cleanup_distributed(sync: bool = True) -> None:
    """Tears the process group down together: a rank that exits while another is still inside a gloo
    collective or its teardown can make the other abort (seen as SIGABRT at the end of a run).
    sync=False (the error path) skips the barrier, which a rank that did not fail might never reach."""
    run_control.reset_control_group()
    if dist.is_available() and dist.is_initialized():
        try:
            if sync:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def gather_arrays(array: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Concatenates a per-rank numpy array over all ranks (rank order); a no-op in one process."""
    if not ctx.distributed:
        return array
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model behind DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------------
# precision


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls faster than fp32 on a CPU; without them bf16 is slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_amp(mode: str, device: torch.device) -> str:
    if mode == "auto":
        if device.type == "cuda":  # not where bf16 is emulated (V100, T4): slower than fp32 there
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "none"
        return "bf16" if cpu_has_fast_bf16() else "none"
    if mode == "fp16" and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA GPU and none is in use; use --amp bf16 or --amp none")
    if mode == "apex":
        if device.type != "cuda":
            raise InputError("--amp apex needs a CUDA GPU and none is in use; use --amp bf16 or --amp none")
        try:
            import apex.amp  # noqa: F401  (NVIDIA apex, installed by hand; never the PyPI "apex")
        except ImportError:
            raise InputError(
                "--amp apex needs NVIDIA apex, which is not installed; build it from NVIDIA's apex "
                "repository, or use --amp fp16 / bf16 (native PyTorch mixed precision)"
            ) from None
    return mode


class Precision:
    """Autocast, loss scaling and the optimiser step for one precision mode."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = mode
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[nn.Module, Any]:
        if self.mode == "apex" and optimizer is not None:
            from apex import amp

            model, optimizer = amp.initialize(model, optimizer, opt_level="O1", verbosity=0)
        return model, optimizer

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        elif self.mode == "apex":
            from apex import amp

            with amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        else:
            loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float) -> bool:
        """Clips and steps; returns False (and leaves the weights as they were) when a gradient is not
        finite. fp16 keeps GradScaler's own skip-and-rescale, which is not reported here."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            if clip and clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(optimizer)
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return True
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)
        finite = bool(torch.isfinite(norm))  # one read per optimizer step: the step depends on it
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite


# --------------------------------------------------------------------------------------------------
# schedule


def warm_restart_lr(
    epoch: int,
    max_lr: float,
    min_lr: float = 1e-6,
    first_cycle: int = 15,
    cycle_mult: float = 2.0,
    warmup: int = 5,
    gamma: float = 0.9,
) -> float:
    """The published schedule, as a function of the epoch: cosine annealing with warm restarts,
    a linear warm-up from min_lr at the start of each cycle, cycles growing by cycle_mult, and the
    peak decaying by gamma per cycle."""
    cycle, length, step = 0, first_cycle, epoch
    while step >= length:
        step -= length
        cycle += 1
        length = int((length - warmup) * cycle_mult) + warmup
    peak = max_lr * gamma**cycle
    if step < warmup:
        return min_lr + (peak - min_lr) * step / warmup
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * (step - warmup) / (length - warmup))) / 2


# the published fine-tuning schedule (REFERENCE.md §4), made for Zheng68K's ~5 x 10^4 training cells
PUBLISHED_SCHEDULE = {"learning_rate": 1e-4, "min_lr": 1e-6, "cycle": 15, "warmup": 5, "lr_decay": 0.9}
PUBLISHED_EPOCHS = 15  # one first cycle


def add_schedule_flags(group: Any, auto: bool = False) -> None:
    """The optimiser and schedule flags shared by both trainers. Without `auto` (pretraining) their
    defaults are the published values; with it (fine-tuning) they default to None, and
    `choose_schedule` fills in what the user did not give."""
    def default(name: str) -> Any:
        return None if auto else PUBLISHED_SCHEDULE[name]

    tail = "; default: from --schedule" if auto else ""
    group.add_argument("--learning_rate", type=float, default=default("learning_rate"),
                       help="Adam; peak of the schedule" + tail)
    group.add_argument("--min_lr", type=float, default=default("min_lr"), help="floor of the cosine schedule" + tail)
    group.add_argument("--cycle", type=int, default=default("cycle"),
                       help="epochs in the first cosine cycle (x2 after)" + tail)
    group.add_argument("--warmup", type=int, default=default("warmup"),
                       help="warm-up epochs at the start of each cycle" + tail)
    group.add_argument("--lr_decay", type=float, default=default("lr_decay"), help="peak decay per cycle" + tail)
    if auto:
        group.add_argument("--schedule", default="auto", choices=["auto", "published"],
                           help="defaults of the five flags above and --epoch: 'auto' chooses them from the number "
                                "of training cells (the published schedule for 10^4-10^5 cells), 'published' is "
                                "the published one whatever the size")


def add_run_flags(group: Any) -> None:
    """The flags every script ends with: precision, device, seed and tracebacks."""
    group.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16", "apex"],
                       help="mixed precision; auto: bf16 where the hardware runs it fast, else none")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda")
    group.add_argument("--seed", type=int, default=2021)
    group.add_argument("--debug", action="store_true", help="show tracebacks")


@dataclass(frozen=True)
class Schedule:
    """The optimiser and schedule flags of `add_schedule_flags`, as values."""
    learning_rate: float  # Adam's, and the peak of the schedule
    min_lr: float         # the floor of the cosine
    cycle: int            # epochs in the first cosine cycle (each next one twice as long, less the warm-up)
    warmup: int           # warm-up epochs at the start of each cycle
    lr_decay: float       # the peak's decay per cycle


# the automatic schedule's size classes, in training cells
SMALL_DATA_CELLS = 10_000      # below: a higher peak, no warm-up, one cosine over the run
LARGE_DATA_CELLS = 100_000     # above: the published peak, no warm-up, a few epochs
SMALL_DATA_CELL_PASSES = 12_000  # 1,500 optimiser steps of 8 cells
LARGE_DATA_CELL_PASSES = 1_500_000


@dataclass(frozen=True)
class ScheduleChoice:
    schedule: Schedule
    epochs: int
    description: str  # one line for the log: what was chosen and why


def choose_schedule(kind: str, n_train: int, given: Mapping[str, Any]) -> ScheduleChoice:
    """The fine-tuning schedule and epoch count for n_train training cells. `given`: the user's
    --learning_rate, --min_lr, --cycle, --warmup, --lr_decay and --epoch (None where not given);
    a given value always wins.

    'published': REFERENCE.md §4, 15 epochs (its first cycle). 'auto':
    - fewer than 10^4 cells: peak 3e-4 from the first epoch, one cosine cycle over the run, and
      enough epochs for ~12,000 cell passes (1,500 steps of 8), between 10 and 30. The published
      1e-4 with 5 warm-up epochs was made for ~300 steps of 180 cells per epoch; on 10^3 cells its
      warm-up alone is a third of the run. (benchmarks/results_accuracy_budget_recipe.md has the
      hand-tuned 3e-4, no-warm-up recipe this generalises; results_accuracy.md the defaults.)
    - 10^4 to 10^5 cells: the published schedule, the size it was made for.
    - more than 10^5 cells: the published peak 1e-4 without warm-up (the schedule steps per epoch,
      so a warm-up epoch of 10^6 cells would run at 1e-6), one cosine over ~1.5 x 10^6 cell passes,
      between 2 and 15 epochs."""
    if kind not in ("auto", "published"):
        raise InputError(f"--schedule {kind!r} is not known; use auto or published")
    n = max(int(n_train), 1)
    if kind == "published" or SMALL_DATA_CELLS <= n <= LARGE_DATA_CELLS:
        values, epochs = dict(PUBLISHED_SCHEDULE), PUBLISHED_EPOCHS
        why = ("published (--schedule published)" if kind == "published" else
               f"published ({n:,} training cells: the size it was made for)")
    else:
        small = n < SMALL_DATA_CELLS
        passes, low, high = ((SMALL_DATA_CELL_PASSES, 10, 30) if small else (LARGE_DATA_CELL_PASSES, 2, 15))
        epochs = int(min(max(math.ceil(passes / n), low), high))
        values = {"learning_rate": 3e-4 if small else 1e-4, "min_lr": 1e-6, "cycle": None, "warmup": 0,
                  "lr_decay": 0.9}
        why = (f"auto for {n:,} training cells ({'fewer than 10^4' if small else 'more than 10^5'}; "
               f"--schedule published gives the published one)")
    chosen = {k: (given.get(k) if given.get(k) is not None else v) for k, v in values.items()}
    epochs = int(given["epoch"]) if given.get("epoch") is not None else epochs
    if epochs < 1:
        raise InputError(f"--epoch {epochs} must be at least 1; give the number of epochs to train")
    if chosen["cycle"] is None:
        chosen["cycle"] = epochs  # one cosine over the run
    for name in ("learning_rate", "cycle"):
        if not chosen[name] > 0:
            raise InputError(f"--{name} {chosen[name]} must be positive; give a value above 0")
    if not 0 <= chosen["warmup"] < chosen["cycle"]:
        raise InputError(f"--warmup {chosen['warmup']} must be at least 0 and shorter than the cycle "
                         f"({chosen['cycle']} epochs); lower --warmup or raise --cycle")
    schedule = Schedule(float(chosen["learning_rate"]), float(chosen["min_lr"]), int(chosen["cycle"]),
                        int(chosen["warmup"]), float(chosen["lr_decay"]))
    mine = [k for k in (*values, "epoch") if given.get(k) is not None]
    text = (f"schedule {why}: {epochs} epochs, peak lr {schedule.learning_rate:g}, warm-up {schedule.warmup}, "
            f"first cycle {schedule.cycle} epochs, floor {schedule.min_lr:g}, decay {schedule.lr_decay:g}"
            + (f"; given: {', '.join('--' + k for k in mine)}" if mine else ""))
    return ScheduleChoice(schedule, epochs, text)


def add_fault_flags(group: Any, checkpoint: str) -> None:
    """--resume, --save_every_steps and --log_every, shared by the two trainers."""
    group.add_argument("--resume", action="store_true", help=f"continue from --ckpt_dir/{checkpoint} (a worker "
                       f"that torchrun restarts resumes by itself)")
    group.add_argument("--save_every_steps", type=int, default=0, help=f"also write {checkpoint} every N optimizer "
                       "steps within an epoch, to resume from (0: at the end of each epoch only)")
    group.add_argument("--log_every", type=int, default=0, help="when stderr is not a terminal, a progress line "
                       "every N steps (0: about once a minute)")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch LambdaLR following `warm_restart_lr` (its state is plain numbers)."""
    max_lr = schedule.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = max_lr
        group["initial_lr"] = max_lr

    def factor(epoch: int) -> float:
        return warm_restart_lr(epoch, max_lr, schedule.min_lr, schedule.cycle, 2.0, schedule.warmup,
                               schedule.lr_decay) / max_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------
# randomness


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the training touches, as tensors, numbers and lists (loadable with weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """The RNGs as `rng_state` saved them. CUDA generators are per device: restored only where this
    node has as many GPUs as the one that saved them (with a note otherwise: the CPU, numpy and
    Python generators, which decide masking and the order of cells, are restored all the same)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available():
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:
            logger.info(f"note: the checkpoint's CUDA generators come from {len(saved)} GPU(s), this node has "
                        f"{torch.cuda.device_count()}: they start afresh (dropout on a GPU draws differently)")


# --------------------------------------------------------------------------------------------------
# checkpoints


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {"torch": torch.__version__, "numpy": np.__version__, "anndata": version("anndata"),
             "scanpy": version("scanpy"), "python": sys.version.split()[0]}
    return {name: str(v) for name, v in found.items()}  # plain str: weights_only loads it


def to_plain(obj: Any, for_json: bool = False) -> Any:
    """obj in the plain types that a weights_only checkpoint (and, with for_json, JSON) accepts:
    numpy scalars as Python numbers, numpy arrays as tensors (JSON: lists), dicts, lists and tuples
    converted inside; for JSON also keys as strings and NaN/inf as null. Anything else that is not a
    number, string, bool, None or tensor becomes its str() (e.g. an argparse value that is a Path)."""
    if isinstance(obj, Mapping):
        return {(str(k) if for_json else k): to_plain(v, for_json) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, for_json) for v in obj]
        return items if for_json else type(obj)(items)
    if isinstance(obj, np.ndarray):
        return to_plain(obj.tolist(), for_json) if for_json else torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if for_json and isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    return str(obj)


def on_cpu(obj: Any) -> Any:
    """Every tensor in obj (dicts, lists, tuples) copied to the CPU: a checkpoint written on a GPU
    loads anywhere, and torch.load does not need map_location."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save to a temporary file beside the target, then an atomic rename: a crash mid-write
    leaves the previous checkpoint intact. Contents must load with weights_only=True."""
    path = Path(path)
    state = to_plain(on_cpu(state))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, folder gone or replaced: the previous file is as it was
        raise InputError(f"could not write {path} ({err.strerror or err}); the previous checkpoint there is "
                         f"intact: free space or fix the folder, then run again with --resume") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes, wherever they stack."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", allow_ensemble: bool = False,
                    mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict, with the model weights under `model_state_dict` and wrapper prefixes
    stripped. Accepts a bare state dict too, and with allow_ensemble a fold-ensemble file
    (ensemble.py: a list of checkpoints, returned as read). Any unreadable file raises one clear
    InputError. mmap: the tensors are mapped, not read (for a look at the checkpoint's other fields;
    files in torch.save's zip format, as this project writes them)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; pass --model_path with a .pth file "
                         f"written by pretrain.py/finetune.py or a published scBERT checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "unsupported global" not in str(err).lower():  # other failures: not a torch.save file
            raise InputError(f"{path} is not a readable PyTorch checkpoint (the file is not in torch.save "
                             f"format); point --model_path at a .pth from pretrain.py/finetune.py or a "
                             f"published scBERT file") from None
        raise InputError(
            f"{path} holds pickled Python objects that safe loading (weights_only) refuses "
            f"({next((l.strip() for l in str(err).splitlines() if 'Unsupported global' in l), '')[:160]}); re-save it with tensors, numbers, strings, lists and dicts "
            f"only, or load it yourself if you trust its source and save its 'model_state_dict'"
        ) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            f"it may be truncated or another kind of file: re-copy it or point --model_path at a .pth "
            f"from pretrain.py/finetune.py or a published scBERT file"
        ) from None
    if isinstance(ckpt, Mapping) and "model_state_dict" not in ckpt and "token_emb.weight" in ckpt:
        ckpt = {"model_state_dict": ckpt}
    if isinstance(ckpt, Mapping) and "model_state_dict" not in ckpt and "ensemble" in ckpt:
        if allow_ensemble:
            return dict(ckpt)
        raise InputError(f"{path} is a fold ensemble (finetune.py --folds), a list of fine-tuned checkpoints; "
                         f"evaluate.py takes it as --model_path, elsewhere pass one of its folds "
                         f"({', '.join(map(str, ckpt['ensemble']))[:120]})")
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model_state_dict"), Mapping):
        found = list(ckpt)[:6] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise InputError(f"{path} holds no scBERT model (expected a dict with 'model_state_dict'; found {found}); "
                         f"pass a checkpoint written by pretrain.py/finetune.py or a published scBERT file")
    ckpt = dict(ckpt)
    ckpt["model_state_dict"] = strip_wrapper_prefixes(ckpt["model_state_dict"])
    return ckpt


def resume_point(path: Path, fingerprint: str, data_path: str | None, requested: bool = True,
                 run_args: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint a run continues from: with --resume (`requested`), the one at `path`, checked to
    exist and to come from this data; in a worker torchrun restarted, the one at `path` if there is
    one yet, checked also to come from the same command line (run_args); else None."""
    restarts = run_control.restarted_by_torchrun()
    if not requested and not restarts:
        return None
    if not path.exists():
        if requested:
            raise InputError(f"--resume found no {path}; run without --resume to start, or point --ckpt_dir at the "
                             f"folder of the run to continue")
        logger.info(f"torchrun restarted this run (restart {restarts}) before {path} was written: starting afresh")
        return None
    ckpt = read_checkpoint(path)
    if ckpt.get("data_fingerprint") != fingerprint:
        raise InputError(f"{path} was trained on other data than {data_path or 'the default data'}; resume with "
                         f"the same --data_path, or start a new run in another --ckpt_dir")
    if not requested and run_args is not None:
        saved = ckpt.get("args", {})
        differing = sorted(k for k in run_args if k != "resume" and saved.get(k) != run_args[k])
        if differing:
            raise InputError(f"torchrun restarted this run, but {path} comes from another command line (it differs in "
                             f"{', '.join('--' + k for k in differing)}); start the new run in another --ckpt_dir")
        logger.info(f"torchrun restarted this run (restart {restarts}): resuming by itself")
    where = f"epoch {ckpt['epoch']} finished" + (f", {ckpt['step']} steps into the next" if ckpt.get("step") else "")
    logger.info(f"resuming from {path} ({where})")
    return ckpt


@contextlib.contextmanager
def guarded_run(ckpt_dir: Path, ctx: DistContext) -> Iterator[run_control.StopSignals]:
    """While the block runs: the run alone writes to ckpt_dir (its lock, removed on every exit), and
    SIGTERM/SIGUSR1 stop it after a checkpoint (see run_control)."""
    with run_control.RunLock(ckpt_dir, ctx.is_main), run_control.StopSignals() as signals:
        yield signals


def build_model_from_checkpoint(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> PerformerLM:
    state = ckpt["model_state_dict"]
    if "config" in ckpt:  # ours: the config is stored; the head is read off the keys
        config = ModelConfig.from_dict(ckpt["config"])
        head = "classifier" if "to_out.fc3.weight" in state else "mlm"
        n_classes = int(state["to_out.fc3.weight"].shape[0]) if head == "classifier" else None
    else:
        try:
            config, head, n_classes = infer_config(state)
        except (KeyError, ValueError, IndexError) as err:
            raise InputError(
                f"{path} has an unknown layout ({type(err).__name__}: {err}; its first keys: {list(state)[:5]}); "
                f"expected scBERT keys such as token_emb.weight and performer.net.layers.0.0.fn.to_q.weight"
            ) from None
    model = PerformerLM(config)
    if head == "classifier":
        model.attach_classifier(n_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"{path} does not fit the model it describes: {str(err).splitlines()[0][:300]}; "
                         f"the file may come from another model") from None
    model.performer.redraw_seed = int(ckpt.get("redraw_seed", 0))
    model.performer.redraw_count = int(ckpt.get("redraw_count", 0))
    return model.eval()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[PerformerLM, dict[str, Any]]:
    """Rebuilds a model (in eval mode) from one of our checkpoints or from a published scBERT file,
    which carries no config: the architecture is then read off its tensor shapes."""
    ckpt = read_checkpoint(path, map_location)
    return build_model_from_checkpoint(ckpt, path), ckpt


def model_checkpoint_fields(model: nn.Module) -> dict[str, Any]:
    """The model part of a checkpoint: weights under the published names plus what rebuilds it."""
    plain = unwrap(model)
    assert isinstance(plain, PerformerLM)
    return {
        "model_state_dict": strip_wrapper_prefixes(plain.state_dict()),
        "config": plain.config.to_dict(),
        "head": plain.head_kind,
        "redraw_seed": plain.performer.redraw_seed,
        "redraw_count": plain.performer.redraw_count,
        "versions": versions(),
    }


# --------------------------------------------------------------------------------------------------
# metrics log and plots


class MetricsLog:
    """One CSV row per epoch beside the checkpoint. On resume, rows after the resumed epoch are
    dropped, so the file always describes the run that produced the checkpoint."""

    def __init__(self, path: str | os.PathLike, resume_epoch: int | None = None):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if resume_epoch is not None and self.path.exists():
            with open(self.path, newline="") as handle:
                self.rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) <= resume_epoch]

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        columns: list[str] = []
        for r in self.rows:
            columns += [c for c in r if c not in columns]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def plot(self, png_path: str | os.PathLike, series: list[tuple[str, str]], title: str) -> None:
        """A PNG with one curve per (column, label) against the epoch, skipping absent columns."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.4), squeeze=False)
        epochs = [int(r["epoch"]) for r in self.rows]
        for ax, (column, label) in zip(axes[0], series):
            values = [float(r[column]) if r.get(column) not in (None, "") else math.nan for r in self.rows]
            ax.plot(epochs, values, marker="o")
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        tmp = Path(png_path).with_name(f".{Path(png_path).name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, png_path)


def progress(iterable: Any, enabled: bool, **kwargs: Any) -> Iterator[Any]:
    from tqdm import tqdm

    return iter(tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs))


# --------------------------------------------------------------------------------------------------
# loops: loaders, DDP wrapping, reductions


def check_writable_dir(path: str | os.PathLike, flag: str, create: bool = True) -> Path:
    """Proves before any long work that the folder can be written: a file is written and removed in
    it, or in its nearest existing parent if it does not exist yet. create=False leaves a missing
    folder uncreated (evaluate.py creates it with its outputs, all at once); create=True makes it.
    `flag` names the option to change in the error."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"output folder {path} is an existing file; pass {flag} with a folder path")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create output folder {path} ({ancestor} is a file, not a folder: cannot write "
                         f"under it); choose another {flag}")
    try:
        handle, probe = tempfile.mkstemp(dir=ancestor, prefix=".scbert-write-test-")
        os.close(handle)
        os.unlink(probe)
        if create:
            path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot write to output folder {path} ({ancestor}: {err.strerror}); "
                         f"choose a writable {flag}") from None
    return path


def derive_seed(seed: int, *parts: int, salt: int = 0) -> int:
    """A seed for one (rank, epoch, ...) that does not depend on how much randomness came before,
    so a resumed epoch draws exactly what the interrupted one drew."""
    return int(np.random.SeedSequence([seed, salt, *parts]).generate_state(1)[0])


def weighted_draw(weights: np.ndarray, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's items of one epoch drawn with replacement in proportion to `weights` (one per
    item): len(weights) draws in all, dealt out rank by rank (the last ones repeated so every rank
    takes as many), the same for the same (seed, epoch) however often it is asked."""
    w = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng(derive_seed(seed, epoch, salt=0xBA1A))
    items = rng.choice(len(w), size=len(w), replace=True, p=w / w.sum())
    per_rank = -(-len(items) // world_size)
    items = np.resize(items, per_rank * world_size)  # repeats from the start as needed
    return [int(i) for i in items[rank::world_size]]


def make_loader(dataset: torch.utils.data.Dataset, batch_size: int, ctx: DistContext, shuffle: bool,
                seed: int, epoch: int, num_workers: int = 0, pad: bool = True,
                start_step: int = 0, sample_weights: np.ndarray | None = None) -> torch.utils.data.DataLoader:
    """Each rank's share of the dataset, in an order that depends only on (seed, epoch), from batch
    `start_step` on (the batches before it are not read).

    pad=True (training) lets DistributedSampler repeat a few cells so all ranks take the same number
    of steps; pad=False (scoring) gives every cell to exactly one rank. A streamed dataset
    (data_sources.StreamedTokens) is read block-shuffled by its own loader, in this process (no
    workers), under the same contract. sample_weights (training, one per item): the epoch's items are
    drawn with replacement in proportion to them (`weighted_draw`) instead of a shuffle."""
    if isinstance(dataset, StreamedTokens):
        if sample_weights is not None:
            raise InputError("--balance sampler draws cells at random and a streamed source is read block by block; "
                             "use --balance weights, or read the cells into memory")
        return dataset.loader(batch_size, ctx.rank, ctx.world_size, shuffle, seed, epoch, pad, start_step)
    if sample_weights is not None:
        sampler = weighted_draw(sample_weights, seed, epoch, ctx.rank, ctx.world_size)
    elif pad:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                                      shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = list(range(ctx.rank, len(dataset), ctx.world_size))
    if start_step:
        sampler = list(sampler)[start_step * batch_size:]
    pin = ctx.device.type == "cuda"
    if isinstance(dataset, TokenDataset):  # whole batches tokenised at once; workers send sparse tokens
        return token_loader(dataset, batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                       pin_memory=pin)


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.distributed:
        return model
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def maybe_no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync for the micro-steps of gradient accumulation that are not the last."""
    if skip_sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(values: np.ndarray, ctx: DistContext) -> np.ndarray:
    if not ctx.distributed:
        return np.asarray(values, dtype=np.float64)
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64))
    if ctx.device.type == "cuda":
        tensor = tensor.to(ctx.device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


class EpochLoader:
    """One epoch's batches for this rank, whose position can be saved and restored: the order
    depends only on (seed, epoch), so a position is a number of batches. state_dict() holds plain
    ints (loadable with weights_only); load_state_dict() continues after the batches already taken,
    without reading them; the batch size and process count must be the same."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, ctx: DistContext, seed: int, epoch: int,
                 num_workers: int = 0, sample_weights: np.ndarray | None = None):
        self.dataset, self.batch_size, self.ctx = dataset, batch_size, ctx
        self.seed, self.epoch, self.num_workers = seed, epoch, num_workers
        self.sample_weights = sample_weights
        self.step = 0  # batches taken in this epoch
        self.steps = len(make_loader(dataset, batch_size, ctx, shuffle=True, seed=seed, epoch=epoch,
                                     sample_weights=sample_weights))

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        loader = make_loader(self.dataset, self.batch_size, self.ctx, shuffle=True, seed=self.seed, epoch=self.epoch,
                             num_workers=self.num_workers, start_step=self.step, sample_weights=self.sample_weights)
        for batch in loader:
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
                 "world_size": self.ctx.world_size}
        if isinstance(self.dataset, StreamedTokens):  # what its block order depends on
            state.update(self.dataset.loader_state())
        if self.sample_weights is not None:  # a weighted draw, not a shuffle (absent: older checkpoints)
            state["sampler"] = 1
        return state

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        mine = self.state_dict()
        if int(state.get("sampler", 0)) != int(mine.get("sampler", 0)):
            raise InputError(f"the checkpoint stopped in the middle of an epoch run with"
                             f"{'' if state.get('sampler') else 'out'} --balance sampler, this run has"
                             f"{'' if mine.get('sampler') else ' no'} sampler; resume with the same --balance")
        for key in [k for k in mine if k != "step"]:
            if key not in state or int(state[key]) != mine[key]:
                raise InputError(f"the checkpoint stopped in the middle of an epoch run with {key} {state.get(key)}, this "
                                 f"run has {mine[key]}; resume with the same data, --batch_size, --seed and number "
                                 f"of processes to continue that epoch exactly")
        self.step = int(state["step"])


# a step whose gradients are not finite is skipped; this many in a row stop the run
MAX_SKIPPED_STEPS = 3


def train_one_epoch(training: "Training", loader: EpochLoader, loss_fn: "LossFn", plan: "EpochPlan",
                    ctx: DistContext, desc: str, totals: torch.Tensor | None = None,
                    signals: run_control.StopSignals | None = None,
                    save: Callable[[torch.Tensor | None], Path] | None = None) -> np.ndarray:
    """The rest of one epoch from the loader's position, with gradient accumulation (DDP syncs only
    on the last micro-step). loss_fn(batch) -> (loss to minimise, statistics to sum); `totals`: the
    statistics of the batches before the position. After each optimizer step: a step with
    non-finite gradients is skipped (MAX_SKIPPED_STEPS in a row end the run with an error); every
    plan.save_every_steps steps, and when a stop signal has come (every rank agreeing), save(totals)
    writes a mid-epoch checkpoint; a signal then ends the epoch with StopRun. Returns the summed
    statistics (the skipped steps' left out)."""
    model, precision, optimizer = training.stepped, training.precision, training.optimizer
    pending, skipped, steps = None, 0, len(loader)
    for batch in run_control.Progress(loader, steps, desc, ctx.is_main, plan.log_every, start=loader.step):
        last_micro = loader.step % plan.grad_acc == 0 or loader.step == steps
        with maybe_no_sync(model, not last_micro), kernels.execution(grad_checkpoint=plan.grad_checkpoint):
            loss, stats = loss_fn(batch)
            precision.backward(loss / plan.grad_acc, optimizer)
        pending = stats if pending is None else pending + stats  # on the device until the epoch ends
        if not last_micro:
            continue
        if precision.step(optimizer, training.params, plan.clip):
            totals = pending if totals is None else totals + pending
            skipped = 0
        else:
            skipped += 1
            logger.info(f"warning: {desc}, step {loader.step}: the gradients are not finite; the step is skipped")
            if skipped >= MAX_SKIPPED_STEPS:
                raise InputError(f"{skipped} optimizer steps in a row had non-finite gradients ({desc}, up to step "
                                 f"{loader.step}); the run stops with its last checkpoint as it was: resume with a "
                                 f"lower --learning_rate, or --amp none")
        pending = None
        stop = run_control.stop_requested(signals, ctx.distributed)
        every = plan.save_every_steps
        if save is not None and (stop or (every and (loader.step // plan.grad_acc) % every == 0
                                          and loader.step < steps)):
            path = save(totals)
            if stop:
                raise StopRun(stop, path, loader.epoch - 1, loader.step)
    optimizer.zero_grad(set_to_none=True)  # nothing accumulated leaks into the next epoch
    return totals.cpu().numpy() if totals is not None else np.zeros(3)


class Predictions(NamedTuple):
    """What the classifier says about each cell (float32), with the dataset's labels (int64) if it has any."""
    logits: np.ndarray | None      # (cells, classes); None for a model without a classifier head
    embeddings: np.ndarray | None  # (cells, 128): the cell embedding the head computes before its last layer
    labels: np.ndarray | None
    encoder: np.ndarray | None = None  # (cells, d): pool(encoder output, tokens), when a pool is given


@torch.no_grad()
def predict(model: PerformerLM, dataset: torch.utils.data.Dataset, batch_size: int, ctx: DistContext,
            precision: Precision, num_workers: int = 0, head_input: list[float] | None = None,
            show_progress: bool = False,
            pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Predictions:
    """The classifier's logits and embeddings for every cell of the dataset, batched. Each rank scores
    its share and all get the whole, rank by rank (dataset order in one process; labels in the same
    order). head_input: if given, receives [genes passed by the head's ReLU, genes seen] (this rank).
    pool(encodings (b, n, dim), tokens (b, n)) -> (b, d): also a cell embedding from the encoder
    (annotation.pooling); a model without a classifier head (pretrained) then gives only that."""
    was_training = model.training
    model.eval()
    loader = make_loader(dataset, batch_size, ctx, shuffle=False, seed=0, epoch=0, num_workers=num_workers,
                         pad=False)
    counts = [0.0, 0.0]

    def count(module, inputs, out):
        counts[0] += float((out > 0).sum())
        counts[1] += out.numel()

    hook = model.to_out.act.register_forward_hook(count) if head_input is not None else None
    classifier = model.head_kind == "classifier"
    logits, embeddings, pooled, labels = [], [], [], []
    try:
        for batch in progress(loader, show_progress, desc="annotating", total=len(loader)):
            tokens = batch["tokens"].to(ctx.device, non_blocking=True).long()
            with precision.autocast():
                encoded = model.encode(tokens)
                if classifier:  # model.classify, keeping the encoder output for the pool
                    embedding = model.to_out.features(encoded)
                    logits.append(model.to_out.fc3(embedding).float().cpu())
                    embeddings.append(embedding.float().cpu())
            if pool is not None:  # in float32, outside autocast
                pooled.append(pool(encoded, tokens).float().cpu())
            if "label" in batch:
                labels.append(batch["label"])
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    if head_input is not None:
        head_input[:] = counts

    def whole(parts: list[torch.Tensor], empty: np.ndarray) -> np.ndarray:
        # every rank gathers, also one with no cells: the others wait for it
        return gather_arrays(torch.cat(parts).numpy() if parts else empty, ctx)

    has_labels = bool(labels) or getattr(dataset, "labels", None) is not None
    return Predictions(whole(logits, np.zeros((0, model.to_out.n_classes), np.float32)) if classifier else None,
                       whole(embeddings, np.zeros((0, 128), np.float32)) if classifier else None,
                       whole(labels, np.zeros(0, np.int64)) if has_labels else None,
                       whole(pooled, np.zeros((0, model.config.dim), np.float32)) if pool is not None else None)


def check_ranks_agree(model: nn.Module, ctx: DistContext) -> None:
    """After distributed training every rank must hold the same weights (DDP averages gradients and
    the random features are redrawn from a shared seed). Compares a checksum of all parameters and
    buffers across ranks and fails loudly if they diverged."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        total = torch.zeros(2, dtype=torch.float64)
        for tensor in unwrap(model).state_dict().values():
            t = tensor.detach().double().cpu().flatten()
            total += torch.stack((t.sum(), (t * torch.arange(1, len(t) + 1, dtype=torch.float64)).sum()))
    sums: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(sums, total.tolist())
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"model weights differ between ranks after training: {sums}")
    logger.info(f"weights identical on all {ctx.world_size} ranks (checksum {sums[0][0]:.6g})")


# --------------------------------------------------------------------------------------------------
# the epoch loop both trainers run

# batch -> (loss, float64 tensor [summed loss, correct, count] on the loss's device)
LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor]]


def step_statistics(loss: torch.Tensor, correct: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A step's [summed loss, correct, count] as one float64 tensor, left on the device (reading it
    every step would wait for the GPU)."""
    count = count.double()
    return torch.stack((loss.detach().double() * count, correct.double(), count))


@dataclass
class Training:
    """A model set up to train, and where its run stands: what the epoch loop steps and updates."""
    model: nn.Module          # the plain model: validation and checkpoints use it
    stepped: nn.Module        # the same model, DDP-wrapped in a distributed run: losses call this one
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision
    first_epoch: int = 1
    best: float = float("-inf")  # the best validation score so far (early stopping)
    bad_epochs: int = 0       # validations since it last improved
    resume: Mapping[str, Any] | None = None  # a mid-epoch checkpoint: where in first_epoch to continue


def _rank_states(ctx: DistContext, loss_fn: Any) -> list[dict[str, Any]]:
    """Every rank's RNGs (and its loss's, e.g. the masking generator), gathered for rank 0 to save."""
    mine = {"rng": rng_state(), "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None}
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


def _restore_rank_state(states: list[Mapping[str, Any]], ctx: DistContext, loss_fn: Any) -> None:
    if len(states) != ctx.world_size:
        raise InputError(f"the checkpoint stopped mid-epoch with {len(states)} process(es), this run has "
                         f"{ctx.world_size}; resume with the same number of processes")
    mine = states[ctx.rank]
    set_rng_state(mine["rng"])
    if mine.get("loss") is not None:
        loss_fn.load_state_dict(mine["loss"])


def prepare_training(model: nn.Module, amp: str, schedule: Schedule, ctx: DistContext,
                     resume: Mapping[str, Any] | None) -> Training:
    """Adam over the parameters that require grad, the published schedule and the precision mode;
    from a resume checkpoint also their states (the loss scaler's too), the next epoch, the
    early-stopping counts and the RNG states as they were when it was written. A mid-epoch
    checkpoint (step > 0) continues its epoch (see run_epochs)."""
    precision = Precision(resolve_amp(amp, ctx.device), ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=schedule.learning_rate)
    scheduler = make_scheduler(optimizer, schedule)
    first_epoch, best, bad_epochs, mid_epoch = 1, float("-inf"), 0, None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        scheduler.load_state_dict(resume["scheduler_state_dict"])
        if precision.scaler is not None and resume.get("scaler_state_dict"):
            precision.scaler.load_state_dict(resume["scaler_state_dict"])
        first_epoch = int(resume["epoch"]) + 1
        best, bad_epochs = float(resume.get("best_metric", best)), int(resume.get("bad_epochs", bad_epochs))
        if int(resume.get("step", 0)) > 0:
            mid_epoch = resume  # its RNGs are restored once the epoch's loader has started
        else:
            set_rng_state(resume["rng_state"])
    model, optimizer = precision.prepare(model, optimizer)
    return Training(model, wrap_ddp(model, ctx), params, optimizer, scheduler, precision, first_epoch, best,
                    bad_epochs, mid_epoch)


@dataclass(frozen=True)
class EpochPlan:
    """How the loop steps through the epochs, and when it stops early."""
    last_epoch: int
    batch_size: int              # cells per step and process
    grad_acc: int                # steps per optimiser step
    clip: float                  # gradient-norm clipping (0: off)
    seed: int                    # the order of each epoch's cells derives from (seed, epoch)
    num_workers: int
    monitor: str | None = None   # a validation score, higher is better: the best checkpoint, early stopping
    patience: int = 0            # validations without a better `monitor` before the loop stops
    grad_checkpoint: bool = False  # store as little as possible for the backward (kernels.ExecutionSettings)
    save_every_steps: int = 0    # also a mid-epoch checkpoint every this many optimizer steps (0: none)
    log_every: int = 0           # steps between progress lines when stderr is not a terminal (0: about a minute)
    sample_weights: Any = None   # one per training item: each epoch draws its cells in proportion (None: a shuffle)


@dataclass(frozen=True)
class EpochRecords:
    """What rank 0 writes after every epoch."""
    checkpoint: Path                        # the resume point
    metrics_csv: Path
    loss_plot: Path
    plot_series: tuple[tuple[str, str], ...]  # (CSV column, axis label) per panel
    plot_title: str
    train_acc_column: str                   # the CSV name of the training accuracy
    rate_column: bool = False               # also cells_per_s (pretraining's CSV has it)
    best_checkpoint: Path | None = None     # with a monitor: written whenever it improves
    keep_every_epoch: bool = False          # also <checkpoint stem>_epoch{N}.pth


def run_epochs(training: Training, train_set: torch.utils.data.Dataset, epoch_loss: Callable[[int], LossFn],
               validate: Callable[[], dict[str, float]], plan: EpochPlan, records: EpochRecords,
               ctx: DistContext, checkpoint_fields: Mapping[str, Any], run_args: Mapping[str, Any],
               signals: run_control.StopSignals | None = None) -> None:
    """The epochs of both trainers: one pass over the training cells with the loss `epoch_loss(epoch)`,
    a schedule step, `validate()` (its scores join the row), a log line, the checkpoints, metrics CSV
    and plot (rank 0); early stop once `plan.monitor` has not improved for `plan.patience` epochs.
    A mid-epoch checkpoint (training.resume) continues its epoch at its step, with its RNG states,
    loss state and partial statistics; mid-epoch checkpoints are written to records.checkpoint
    every plan.save_every_steps steps and on a stop signal (then StopRun). checkpoint_fields: what
    the checkpoint holds beside the model, optimiser, schedule and RNG (data, panel, labels,
    splits); run_args: the command line. Updates training.best and .bad_epochs."""
    metrics = MetricsLog(records.metrics_csv, resume_epoch=training.first_epoch - 1)
    for epoch in range(training.first_epoch, plan.last_epoch + 1):
        if plan.monitor is not None and training.bad_epochs >= plan.patience:
            break
        started = time.time()
        loader = EpochLoader(train_set, plan.batch_size, ctx, plan.seed, epoch, plan.num_workers, plan.sample_weights)
        loss_fn, totals = epoch_loss(epoch), None
        if training.resume is not None:  # continue the interrupted epoch where it stopped
            loader.load_state_dict(training.resume["loader_state"])
            _restore_rank_state(training.resume["rank_states"], ctx, loss_fn)
            totals = torch.tensor(training.resume["epoch_totals"], dtype=torch.float64, device=ctx.device)
            training.resume = None

        def save_mid_epoch(partial: torch.Tensor | None) -> Path:
            totals_so_far = [0.0, 0.0, 0.0] if partial is None else partial.tolist()
            states = _rank_states(ctx, loss_fn)  # a collective: a dead peer makes it fail and nothing is written
            if ctx.is_main:
                save_checkpoint(records.checkpoint, {
                    **_run_checkpoint(training, epoch - 1, float("nan"), checkpoint_fields, run_args),
                    "step": loader.step, "loader_state": loader.state_dict(), "rank_states": states,
                    "epoch_totals": totals_so_far, "rng_state": states[0]["rng"]})
            barrier(ctx)
            return records.checkpoint

        totals = train_one_epoch(training, loader, loss_fn, plan, ctx, f"epoch {epoch}", totals, signals,
                                 save_mid_epoch)
        lr = training.optimizer.param_groups[0]["lr"]
        training.scheduler.step()
        totals = all_reduce_sum(totals, ctx)
        valid = validate()
        improved = plan.monitor is not None and valid[plan.monitor] > training.best
        if plan.monitor is not None:
            training.best, training.bad_epochs = ((valid[plan.monitor], 0) if improved
                                                  else (training.best, training.bad_epochs + 1))
        seconds = time.time() - started
        row = {"epoch": epoch, "train_loss": totals[0] / max(totals[2], 1),
               records.train_acc_column: totals[1] / max(totals[2], 1), **valid, "lr": lr,
               "seconds": round(seconds, 2)}
        if records.rate_column:
            row["cells_per_s"] = round(len(train_set) / seconds, 2)
        logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
                    + (" *" if improved else ""))
        if ctx.is_main:
            state = _epoch_checkpoint(training, epoch, row, plan.monitor is not None, checkpoint_fields, run_args)
            _write_epoch_records(records, epoch, state, improved, metrics, row)
        barrier(ctx)
    check_ranks_agree(training.model, ctx)


def _run_checkpoint(training: Training, epoch: int, loss: float, checkpoint_fields: Mapping[str, Any],
                    run_args: Mapping[str, Any]) -> dict[str, Any]:
    """What every checkpoint of a run holds: the published keys (epoch = finished epochs, losses,
    optimiser, schedule, model), the loss scaler, what rebuilds the model, `checkpoint_fields`, the
    early-stopping counts and the command line."""
    state = {"epoch": epoch, "losses": loss,
             "optimizer_state_dict": training.optimizer.state_dict(),
             "scheduler_state_dict": training.scheduler.state_dict(),
             **model_checkpoint_fields(training.model), **checkpoint_fields,
             "best_metric": training.best, "bad_epochs": training.bad_epochs, "args": dict(run_args)}
    if training.precision.scaler is not None:
        state["scaler_state_dict"] = training.precision.scaler.state_dict()
    return state


def _epoch_checkpoint(training: Training, epoch: int, row: Mapping[str, Any], early_stopping: bool,
                     checkpoint_fields: Mapping[str, Any], run_args: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint after an epoch (step 0 of the next): the run's fields, the RNG states and the
    epoch's metrics."""
    state = _run_checkpoint(training, epoch, row["train_loss"], checkpoint_fields, run_args)
    if not early_stopping:
        del state["best_metric"], state["bad_epochs"]
    return {**state, "step": 0, "rng_state": rng_state(),
            "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}


def _write_epoch_records(records: EpochRecords, epoch: int, state: Mapping[str, Any], improved: bool,
                        metrics: MetricsLog, row: Mapping[str, Any]) -> None:
    if improved and records.best_checkpoint is not None:
        save_checkpoint(records.best_checkpoint, state)
    save_checkpoint(records.checkpoint, state)
    if records.keep_every_epoch:
        save_checkpoint(records.checkpoint.with_name(f"{records.checkpoint.stem}_epoch{epoch}.pth"), state)
    metrics.append(row)
    metrics.plot(records.loss_plot, list(records.plot_series), records.plot_title)
