"""pretrain.py and finetune.py end to end on real data (the embedded Zheng68K subset), tiny preset:
training, one process and torchrun DDP, resuming after a kill, published-layout checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import finetune
import pretrain
from helpers import ROOT, max_abs_diff, run_script, state_dict_of
from model import PerformerLM, get_config

FAST = ["--model", "tiny", "--amp", "none", "--batch_size", "16"]
SCHEDULE = ["--learning_rate", "1e-3", "--warmup", "0"]  # short runs: start at the peak


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    args = pretrain.build_parser().parse_args([*FAST, *SCHEDULE, "--epoch", "2", "--ckpt_dir", str(out)])
    pretrain.main(args)
    return out


def test_pretraining_writes_published_keys_metrics_and_learns(pretrained):
    ckpt = torch.load(pretrained / "pretrain.pth", weights_only=True)
    for key in ("epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "losses"):
        assert key in ckpt
    assert ckpt["epoch"] == 2 and ckpt["head"] == "mlm"
    assert len(ckpt["gene_panel"]) == 765 and ckpt["input_format"] == "log1p"
    assert ckpt["model_state_dict"]["pos_emb.emb.weight"].dtype == torch.float64
    assert (pretrained / "gene2vec_16.npy").exists() and (pretrained / "gene2vec_16.txt").exists()
    assert (pretrained / "pretrain_loss.png").stat().st_size > 1000
    rows = (pretrained / "pretrain_metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3 and {"valid_masked_acc", "valid_majority_acc", "train_loss"} <= set(header)
    last = dict(zip(header, rows[-1].split(",")))
    first = dict(zip(header, rows[1].split(",")))
    assert float(last["train_loss"]) < float(first["train_loss"])
    assert float(last["valid_masked_acc"]) > float(last["valid_majority_acc"])  # beats always-majority


def test_finetune_from_pretrained_keeps_test_cells_apart(pretrained, tmp_path):
    args = finetune.build_parser().parse_args([*FAST, *SCHEDULE, "--epoch", "2", "--ckpt_dir", str(tmp_path),
                                               "--model_path", str(pretrained / "pretrain.pth")])
    best = finetune.main(args)
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["head"] == "classifier" and ckpt["pretrained_from"].endswith("pretrain.pth")
    assert len(ckpt["label_names"]) == 10 and ckpt["label_key"] == "celltype"
    splits = {k: set(v) for k, v in ckpt["splits"].items()}
    assert not (splits["train"] & splits["test"]) and not (splits["valid"] & splits["test"])
    assert not (splits["train"] & splits["valid"])
    assert len(splits["train"] | splits["valid"] | splits["test"]) == 700
    assert 130 <= len(splits["test"]) <= 150
    # the published freezing: everything but the final norm, the second-to-last layer and the head
    start = state_dict_of(pretrained / "pretrain.pth")
    tuned = ckpt["model_state_dict"]
    assert torch.equal(start["token_emb.weight"], tuned["token_emb.weight"])
    assert torch.equal(start["performer.net.layers.1.0.fn.to_q.weight"], tuned["performer.net.layers.1.0.fn.to_q.weight"])
    assert not torch.equal(start["performer.net.layers.0.0.fn.to_q.weight"], tuned["performer.net.layers.0.0.fn.to_q.weight"])
    assert (tmp_path / "finetune_last.pth").exists() and (tmp_path / "finetune_loss.png").exists()


def test_finetune_resume_equals_uninterrupted(tmp_path, default_subset):
    # --cycle fixed: by default the cosine spans --epoch, so a run cut short with a smaller --epoch would differ
    base = [*FAST, *SCHEDULE, "--cycle", "3", "--from_scratch", "--no-pos_embed", "--seed", "5",
            "--data_path", str(default_subset)]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "3", "--ckpt_dir", str(whole)]))
    finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "2", "--ckpt_dir", str(parts)]))
    finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "3", "--ckpt_dir", str(parts), "--resume"]))
    assert max_abs_diff(state_dict_of(whole / "finetune_last.pth"), state_dict_of(parts / "finetune_last.pth")) <= 1e-6
    assert (whole / "finetune_metrics.csv").read_text().count("\n") == (parts / "finetune_metrics.csv").read_text().count("\n")


def test_pretrain_killed_mid_epoch_resumes_to_the_same_weights(tmp_path, default_subset):
    base = [*FAST, *SCHEDULE, "--epoch", "3", "--seed", "11", "--batch_size", "4", "--data_path", str(default_subset)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_script("pretrain.py", *base, "--ckpt_dir", str(whole)).returncode == 0

    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), *base, "--ckpt_dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_path = killed / "pretrain.pth"
    deadline = time.time() + 300
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # during epoch 2: its first checkpoint has just been written
    proc.wait()
    interrupted_at = torch.load(ckpt_path, weights_only=True)["epoch"]
    assert interrupted_at < 3
    resumed = run_script("pretrain.py", *base, "--ckpt_dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"epoch {interrupted_at} finished" in resumed.stdout
    assert max_abs_diff(state_dict_of(whole / "pretrain.pth"), state_dict_of(ckpt_path)) <= 1e-6


def test_torchrun_two_ranks_agree_and_write_one_set_of_files(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {"OMP_NUM_THREADS": "1"}
    result = run_script("pretrain.py", *FAST, *SCHEDULE, "--epoch", "2", "--ckpt_dir", str(tmp_path),
                        launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights identical on all 2 ranks" in result.stdout
    assert result.stdout.count("pretrained model:") == 1  # rank 0 alone reports
    result = run_script("finetune.py", *FAST, *SCHEDULE, "--epoch", "1", "--ckpt_dir", str(tmp_path),
                        "--model_path", str(tmp_path / "pretrain.pth"), launcher=launcher, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights identical on all 2 ranks" in result.stdout
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["pretrain.pth", "pretrain_metrics.csv", "pretrain_loss.png", "gene2vec_16.npy",
                            "gene2vec_16.txt", "finetune_best.pth", "finetune_last.pth",
                            "finetune_metrics.csv", "finetune_loss.png", "gene_overlap.csv"])
    assert (tmp_path / "pretrain_metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_published_layout_checkpoint_fine_tunes_with_a_gene_panel(tmp_path):
    import scanpy as sc

    genes = list(sc.datasets.pbmc68k_reduced().raw.var_names)
    model = PerformerLM(get_config("tiny", gene_num=len(genes)))
    original = tmp_path / "panglao_like.pth"
    torch.save({"epoch": 7, "model_state_dict": model.state_dict(), "optimizer_state_dict": {},
                "scheduler_state_dict": {}, "losses": 1.0}, original)  # exactly the published keys
    no_panel = run_script("finetune.py", "--model_path", str(original), "--ckpt_dir", str(tmp_path / "a"))
    assert no_panel.returncode == 2
    assert "carries no gene panel" in no_panel.stderr and "--gene_panel" in no_panel.stderr
    assert not (tmp_path / "a").exists()

    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(reversed(genes)) + "\n")  # any order: the panel defines model order
    args = finetune.build_parser().parse_args([*FAST, *SCHEDULE, "--epoch", "1", "--model_path", str(original),
                                               "--gene_panel", str(panel), "--ckpt_dir", str(tmp_path / "b")])
    ckpt = torch.load(finetune.main(args), weights_only=True)
    assert ckpt["gene_panel"] == list(reversed(genes))


def test_warm_restart_schedule_matches_published_shape():
    from train_utils import warm_restart_lr

    lrs = [warm_restart_lr(e, 1e-4) for e in range(60)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[5] == pytest.approx(1e-4)  # 5 warm-up epochs
    assert lrs[14] < lrs[10] < lrs[5]  # cosine decay in the first 15-epoch cycle
    assert lrs[15] == pytest.approx(1e-6) and lrs[20] == pytest.approx(0.9e-4)  # restart, peak x0.9
    assert lrs[40] == pytest.approx(1e-6) and lrs[45] == pytest.approx(0.81e-4)  # second cycle: 25 epochs


def test_a_dead_classifier_head_is_reported(default_subset):
    """The published head's ReLU after its per-gene scores: when every score is <= 0 the model can
    no longer learn (seen at lr 1e-3); fine-tuning says so, and stays quiet for a live head."""
    import utils

    adata = utils.read_dataset(str(default_subset))
    tokens_set = utils.TokenDataset(adata, labels=np.zeros(adata.n_obs, dtype=np.int64))
    net = PerformerLM(get_config("tiny", gene_num=adata.n_vars, pos_embed="none")).attach_classifier(3)
    ctx = utils.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    precision = utils.Precision("none", ctx.device)
    messages = []
    for bias, dead in ((5.0, False), (-5.0, True)):
        with torch.no_grad():
            net.to_out.conv1.weight.zero_()
            net.to_out.conv1.bias.fill_(bias)
        head_input = []
        finetune.predict(net, tokens_set, 16, ctx, precision, 0, head_input)
        assert head_input[1] == adata.n_obs * (adata.n_vars + 1)
        assert (head_input[0] == 0) == dead
        messages.clear()
        finetune.warn_if_head_is_dead(head_input, ctx, messages.append)
        assert bool(messages) == dead and (not dead or "--learning_rate" in messages[0])
