"""A run on a cluster: stopped by a signal mid-epoch and resumed exactly, a torchrun restart after a
dead worker, one run per checkpoint folder, non-finite steps, failed checkpoint writes, and
progress lines a log file can hold. Tiny preset on the embedded data (a third of its cells)."""
from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import finetune
import pretrain
import train_utils
from data_utils import InputError
from helpers import ROOT, max_abs_diff, run_script, state_dict_of
from run_control import EXIT_STOPPED, LOCK_NAME, StopRun

RUN = ["--model", "tiny", "--amp", "none", "--batch_size", "4", "--learning_rate", "1e-3", "--warmup", "0",
       "--no-pos_embed", "--seed", "3", "--log_every", "5"]
ENV = {"OMP_NUM_THREADS": "1"}


def start(command: list[str], stop_at: str, act) -> tuple[subprocess.Popen, list[str]]:
    """Runs command, calls act(process) once a stderr line contains stop_at; -> (process, stderr lines)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV})
    lines: list[str] = []
    for line in process.stderr:
        lines.append(line)
        if stop_at in line:
            act(process)
            break
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


def test_sigterm_mid_epoch_writes_a_checkpoint_exits_75_and_resumes_exactly(tmp_path, default_subset):
    base = [*RUN, "--epoch", "2", "--data_path", str(default_subset)]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert run_script("pretrain.py", *base, "--ckpt_dir", str(whole), env=ENV).returncode == 0
    process, errors = start([sys.executable, str(ROOT / "pretrain.py"), *base, "--ckpt_dir", str(stopped)],
                            "epoch 2: step 10/", lambda p: p.send_signal(signal.SIGTERM))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == EXIT_STOPPED, "".join(errors)[-2000:]
    assert "stopped by SIGTERM in epoch 2" in out and "--resume" in out
    ckpt = torch.load(stopped / "pretrain.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] >= 10 and not (stopped / LOCK_NAME).exists()
    assert all("\r" not in line for line in errors) and any(line.startswith("epoch 1: step 5/") for line in errors)
    resumed = run_script("pretrain.py", *base, "--ckpt_dir", str(stopped), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(epoch 1 finished, {ckpt['step']} steps into the next)" in resumed.stdout
    assert max_abs_diff(state_dict_of(whole / "pretrain.pth"), state_dict_of(stopped / "pretrain.pth")) <= 1e-6
    assert (whole / "pretrain_metrics.csv").read_text().count("\n") == (stopped / "pretrain_metrics.csv").read_text(
    ).count("\n") == 3


def worker_pid(ckpt_dir, local_rank: int) -> int:
    """The first attempt's worker of that local rank, found in /proc."""
    for folder in glob.glob("/proc/[0-9]*"):
        try:
            command = open(f"{folder}/cmdline").read()
            environ = open(f"{folder}/environ").read().split("\0")
        except OSError:
            continue
        if str(ckpt_dir) in command and f"LOCAL_RANK={local_rank}" in environ \
                and "TORCHELASTIC_RESTART_COUNT=0" in environ:
            return int(folder.rsplit("/", 1)[1])
    raise AssertionError("worker not found")


def test_a_torchrun_restart_after_a_killed_worker_resumes_by_itself(tmp_path, default_subset):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    base = [str(ROOT / "pretrain.py"), *RUN, "--epoch", "2", "--save_every_steps", "4",
            "--data_path", str(default_subset)]
    whole, restarted = tmp_path / "whole", tmp_path / "restarted"
    reference = subprocess.run([*launcher, *base, "--ckpt_dir", str(whole)], capture_output=True, text=True,
                               env={**os.environ, **ENV}, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    process, errors = start([*launcher, "--max-restarts=1", *base, "--ckpt_dir", str(restarted)], "epoch 2: step 10/",
                            lambda p: os.kill(worker_pid(restarted, 1), signal.SIGKILL))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, "".join(errors)[-3000:]
    assert "torchrun restarted this run (restart 1): resuming by itself" in out
    assert "steps into the next" in out  # from the mid-epoch checkpoint, not the epoch's start
    assert max_abs_diff(state_dict_of(whole / "pretrain.pth"), state_dict_of(restarted / "pretrain.pth")) <= 1e-6
    assert sorted(p.name for p in restarted.iterdir()) == sorted(p.name for p in whole.iterdir())


def test_one_run_per_checkpoint_folder(tmp_path, default_subset):
    folder = tmp_path / "ckpts"
    base = [*RUN, "--epoch", "3", "--data_path", str(default_subset), "--ckpt_dir", str(folder)]
    second = []
    first, _ = start([sys.executable, str(ROOT / "pretrain.py"), *base], "epoch 1: step 5/",
                     lambda p: second.append(run_script("pretrain.py", *base, env=ENV)))
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second[0].returncode == 2 and second[0].stdout.count("epoch=") == 0
    error = second[0].stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: another run is writing to") and "--ckpt_dir" in error[0]
    assert not (folder / LOCK_NAME).exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / LOCK_NAME).write_text('{"pid": %s, "host": "%s"}' % (gone.stdout.strip(), os.uname().nodename))
    taken = run_script("pretrain.py", *base, "--epoch", "1", env=ENV)  # a lock left by a run that is gone
    assert taken.returncode == 0 and "taking over" in taken.stdout and not (folder / LOCK_NAME).exists()


def nan_on_calls(monkeypatch, calls: set[int]):
    """MaskedLoss gives a NaN loss on the given calls (counted from 1)."""
    count = [0]
    original = pretrain.MaskedLoss.__call__

    def poisoned(self, batch):
        loss, stats = original(self, batch)
        count[0] += 1
        return (loss * float("nan"), stats) if count[0] in calls else (loss, stats)

    monkeypatch.setattr(pretrain.MaskedLoss, "__call__", poisoned)


def test_a_non_finite_step_is_skipped_and_three_in_a_row_stop_the_run(tmp_path, default_subset, monkeypatch, caplog):
    args = [*RUN, "--epoch", "2", "--data_path", str(default_subset)]
    nan_on_calls(monkeypatch, {7})
    pretrain.main(pretrain.build_parser().parse_args([*args, "--ckpt_dir", str(tmp_path / "one")]))
    assert "step 7: the gradients are not finite; the step is skipped" in caplog.text
    assert all(torch.isfinite(v.double()).all() for v in state_dict_of(tmp_path / "one" / "pretrain.pth").values())

    nan_on_calls(monkeypatch, {60, 61, 62})  # epoch 2 (52 steps per epoch)
    folder = tmp_path / "three"
    with pytest.raises(InputError, match="3 optimizer steps in a row had non-finite gradients"):
        pretrain.main(pretrain.build_parser().parse_args([*args, "--ckpt_dir", str(folder)]))
    last_good = torch.load(folder / "pretrain.pth", weights_only=True)
    assert (last_good["epoch"], last_good["step"]) == (1, 0) and not (folder / LOCK_NAME).exists()


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, default_subset, monkeypatch):
    args = [*RUN, "--epoch", "2", "--data_path", str(default_subset)]
    saves = [0]
    real_save = torch.save

    def disk_full(obj, handle, *rest, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # epoch 2's checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *rest, **kwargs)

    monkeypatch.setattr(train_utils.torch, "save", disk_full)
    folder = tmp_path / "full"
    with pytest.raises(InputError, match="could not write .*pretrain.pth .No space left on device.; the previous"):
        pretrain.main(pretrain.build_parser().parse_args([*args, "--ckpt_dir", str(folder)]))
    assert torch.load(folder / "pretrain.pth", weights_only=True)["epoch"] == 1
    assert not list(folder.glob(".pretrain.pth.tmp*"))

    monkeypatch.setattr(train_utils.torch, "save", real_save)
    folder, moved = tmp_path / "replaced", tmp_path / "moved"
    real_write = train_utils.save_checkpoint
    writes = [0]

    def folder_replaced(path, state):
        writes[0] += 1
        if writes[0] == 2:
            folder.rename(moved)
            folder.write_text("not a folder")
        return real_write(path, state)

    monkeypatch.setattr(train_utils, "save_checkpoint", folder_replaced)
    with pytest.raises(InputError, match="could not write"):
        pretrain.main(pretrain.build_parser().parse_args([*args, "--ckpt_dir", str(folder)]))
    assert torch.load(moved / "pretrain.pth", weights_only=True)["epoch"] == 1


def test_cross_validation_stopped_in_a_fold_resumes_at_that_fold(tmp_path, default_subset, monkeypatch):
    args = [*RUN, "--epoch", "2", "--folds", "2", "--data_path", str(default_subset), "--from_scratch"]
    whole = tmp_path / "whole"
    calls = [0]
    loss_fn = finetune.classification_loss

    def counting(stop_at=None):
        def wrapped(*a, **k):
            inner = loss_fn(*a, **k)

            def counted(batch):
                calls[0] += 1
                if calls[0] == stop_at:
                    os.kill(os.getpid(), signal.SIGTERM)
                return inner(batch)
            return counted
        return wrapped

    monkeypatch.setattr(finetune, "classification_loss", counting())
    finetune.main(finetune.build_parser().parse_args([*args, "--ckpt_dir", str(whole)]))
    steps, calls[0] = calls[0], 0  # the two folds train on equally many cells: fold 2 begins near the middle

    monkeypatch.setattr(finetune, "classification_loss", counting(stop_at=steps // 2 + 3))  # fold 2, epoch 1
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRun):
        finetune.main(finetune.build_parser().parse_args([*args, "--ckpt_dir", str(stopped)]))
    assert not (stopped / "cv_summary.csv").exists() and torch.load(stopped / "fold1" / "finetune_last.pth",
                                                                    weights_only=True)["step"] > 0
    monkeypatch.setattr(finetune, "classification_loss", loss_fn)
    finetune.main(finetune.build_parser().parse_args([*args, "--ckpt_dir", str(stopped), "--resume"]))
    for fold in ("fold0", "fold1"):
        assert max_abs_diff(state_dict_of(whole / fold / "finetune_last.pth"),
                            state_dict_of(stopped / fold / "finetune_last.pth")) <= 1e-6
    assert (whole / "cv_summary.csv").read_text() == (stopped / "cv_summary.csv").read_text()
    assert np.isfinite(torch.load(stopped / "fold1" / "finetune_best.pth", weights_only=True)["best_metric"])
