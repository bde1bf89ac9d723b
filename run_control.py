"""How a training run survives a cluster: stop signals, one run per checkpoint folder, torchrun
restarts, and progress lines a log file can hold.

- StopSignals: SIGTERM and SIGUSR1 (what SLURM sends before it kills a job) ask the run to stop; the
  epoch loop finishes the optimizer step it is in, writes a mid-epoch checkpoint and the script
  exits with EXIT_STOPPED (75, EX_TEMPFAIL: "try again later"). A second signal exits at once.
  Under torchrun every rank gets the signal; `stop_requested` makes the ranks agree on the step.
- RunLock: a lock file in --ckpt_dir holding the process id, host and torchrun run id of the run
  that writes there; a second run ends with an error, a lock left by a run that is gone (same host,
  process gone, or the same torchrun run restarted) is taken over.
- restarted_by_torchrun: a worker that torchrun restarted (--max-restarts) resumes by itself.
- Progress: a progress bar on a terminal; in a log file, a line every --log_every steps (default:
  about once a minute) instead of tqdm's carriage returns.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from data_utils import InputError

logger = logging.getLogger("scbert")

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; resume to continue
# SIGUSR1 does not exist on Windows
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
LOCK_NAME = ".scbert.lock"


class StopRun(Exception):
    """The run stopped on a signal after writing its checkpoint (run_main turns it into exit 75)."""

    def __init__(self, signal_name: str, checkpoint: Path, epoch: int, step: int):
        super().__init__(f"stopped by {signal_name} in epoch {epoch + 1} after {step} steps: wrote {checkpoint}; "
                         f"run the same command with --resume to continue (a torchrun restart resumes by itself)")
        self.signal_name = signal_name


# --------------------------------------------------------------------------------------------------
# signals


class StopSignals:
    """While active (a context manager), SIGTERM and SIGUSR1 ask the run to stop; a second one exits
    at once with EXIT_STOPPED and writes nothing. Handlers can only be set from the main thread;
    elsewhere (a library caller's worker thread) the signals keep their old meaning."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"error: a second {name}: stopping at once without writing a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_STOPPED)
        self.received = name
        logger.info(f"{name} received: finishing the current step, then writing a checkpoint")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


_control_group = None  # a gloo group for the stop flag, so that agreeing on it never waits for a GPU


def stop_requested(signals: StopSignals | None, distributed: bool) -> str | None:
    """The signal that stops the run now, agreed by every rank (each rank may have got it at a
    different step); None to go on. One small all-reduce per optimizer step when distributed."""
    global _control_group
    received = signals.received if signals is not None else None
    if not distributed:
        return received
    if _control_group is None:
        _control_group = dist.new_group(backend="gloo")
    flag = torch.tensor([STOP_SIGNALS.index(getattr(signal, received)) + 1 if received else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
    return STOP_SIGNALS[int(flag) - 1].name if int(flag) else None


def reset_control_group() -> None:
    global _control_group
    _control_group = None


# --------------------------------------------------------------------------------------------------
# restarts and the lock


def restarted_by_torchrun(environ=os.environ) -> int:
    """How many times torchrun has restarted this worker (TORCHELASTIC_RESTART_COUNT; 0 otherwise)."""
    try:
        return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """One run per checkpoint folder: rank 0 holds `folder/.scbert.lock` while the run lasts (a
    context manager; removed on every exit, errors included). Other ranks hold nothing."""

    def __init__(self, folder: Path, is_main: bool = True, environ=os.environ):
        self.path = Path(folder) / LOCK_NAME
        self.is_main = is_main
        self.me = {"pid": os.getpid(), "host": socket.gethostname(),
                   "run_id": environ.get("TORCHELASTIC_RUN_ID"), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a crash while it was written
            return True
        if holder.get("run_id") and holder.get("run_id") == self.me["run_id"]:
            return True  # our own torchrun run, before a restart
        return holder.get("host") == self.me["host"] and not _process_alive(int(holder.get("pid", -1)))

    def __enter__(self) -> "RunLock":
        if not self.is_main:
            return self
        for _ in range(2):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._is_stale(holder):
                    who = f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"
                    raise InputError(f"another run is writing to {self.path.parent} ({who}); wait for it to end or "
                                     f"choose another --ckpt_dir (delete {self.path} if that run is gone)") from None
                logger.info(f"taking over {self.path}: the run that held it ({(holder or {}).get('pid')}) is gone")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(handle, "w") as out:
                out.write(json.dumps(self.me))
            self.held = True
            return self
        raise InputError(f"could not take {self.path}; delete it if no run uses {self.path.parent}")

    def __exit__(self, *exc) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == self.me["pid"]:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:  # the folder itself is gone or was replaced: no lock is left in it
                    pass
            self.held = False


# --------------------------------------------------------------------------------------------------
# progress


class Progress:
    """The steps of an epoch, shown as they go: tqdm's bar on a terminal; in a log file, a line every
    `every` steps, or about once a minute when every is 0."""

    def __init__(self, steps: Iterable[Any], total: int, desc: str, enabled: bool, every: int = 0,
                 start: int = 0, stream=None):
        self.steps, self.total, self.desc, self.every = steps, total, desc, every
        self.enabled, self.start = enabled, start
        self.stream = stream if stream is not None else sys.stderr

    def __iter__(self) -> Iterator[Any]:
        if self.enabled and self.stream.isatty():
            from tqdm import tqdm

            with tqdm(self.steps, total=self.total, initial=self.start, desc=self.desc, dynamic_ncols=True,
                      leave=False, file=self.stream) as bar:
                yield from bar
            return
        started = last = time.monotonic()
        for done, item in enumerate(self.steps, start=self.start + 1):
            yield item
            now = time.monotonic()
            due = done % self.every == 0 if self.every else now - last >= 60
            if self.enabled and (due or done == self.total):
                self._line(done, (done - self.start) / max(now - started, 1e-9))
                last = now

    def _line(self, done: int, rate: float) -> None:
        eta = (self.total - done) / rate if rate > 0 else 0.0
        print(f"{self.desc}: step {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%), {rate:.2f} steps/s, "
              f"{eta / 60:.1f} min left", file=self.stream, flush=True)
