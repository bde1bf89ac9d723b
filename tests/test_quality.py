"""The fine-tuning defaults users can trust (issue 18): the schedule chosen from the number of
training cells, the head guard, rare types (--balance, --label_smoothing,
--min_valid_per_class, the best-epoch rule), fold ensembles that evaluate.py averages, and --test_size 0."""
from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import ensemble
import finetune
import utils
from helpers import run_script
from model import PerformerLM, get_config

FAST = ["--model", "tiny", "--amp", "none", "--batch_size", "16", "--from_scratch", "--no-pos_embed"]


# --------------------------------------------------------------------------------------------------
# the schedule


def given(**values):
    return {"learning_rate": None, "min_lr": None, "cycle": None, "warmup": None, "lr_decay": None, "epoch": None,
            **values}


def test_auto_schedule_follows_the_number_of_training_cells():
    small = utils.choose_schedule("auto", 500, given())
    assert (small.epochs, small.schedule.learning_rate, small.schedule.warmup, small.schedule.cycle) == (24, 3e-4, 0, 24)
    assert utils.choose_schedule("auto", 200, given()).epochs == 30  # at most 30
    assert utils.choose_schedule("auto", 3_600, given()).epochs == 10  # at least 10
    published = utils.choose_schedule("auto", 50_000, given())  # the size the published schedule was made for
    assert published.epochs == 15
    assert published.schedule == utils.Schedule(1e-4, 1e-6, 15, 5, 0.9)
    large = utils.choose_schedule("auto", 1_000_000, given())
    assert (large.epochs, large.schedule.learning_rate, large.schedule.warmup, large.schedule.cycle) == (2, 1e-4, 0, 2)
    assert "1,000,000 training cells" in large.description and "--schedule published" in large.description
    # 'published' whatever the size; a flag the user gives always wins
    assert utils.choose_schedule("published", 500, given()).schedule == utils.Schedule(1e-4, 1e-6, 15, 5, 0.9)
    mine = utils.choose_schedule("auto", 500, given(learning_rate=1e-3, epoch=4))
    assert (mine.epochs, mine.schedule.learning_rate, mine.schedule.cycle) == (4, 1e-3, 4)
    assert "given: --learning_rate, --epoch" in mine.description
    assert utils.choose_schedule("published", 500, given(warmup=0)).schedule.warmup == 0
    with pytest.raises(utils.InputError, match="--warmup 5 .* shorter than the cycle"):
        utils.choose_schedule("auto", 500, given(warmup=5, epoch=4))


def test_finetune_prints_its_schedule_and_writes_the_new_columns(tmp_path, default_subset, caplog):
    args = finetune.build_parser().parse_args([*FAST, "--epoch", "2", "--ckpt_dir", str(tmp_path),
                                               "--data_path", str(default_subset)])
    with caplog.at_level(logging.INFO, logger="scbert"):
        finetune.main(args)
    assert "schedule auto for 163 training cells" in caplog.text and "2 epochs, peak lr 0.0003" in caplog.text
    assert "head orientation (" in caplog.text  # a fresh head is oriented before training
    metrics = pd.read_csv(tmp_path / "finetune_metrics.csv")
    assert {"valid_types_missed", "valid_selection", "head_lifted_cells"} <= set(metrics.columns)
    assert np.allclose(metrics["valid_selection"], metrics["valid_macro_f1"] - metrics["valid_types_missed"])


def test_a_wrong_schedule_flag_is_one_line_and_exit_2(tmp_path, default_subset):
    result = run_script("finetune.py", *FAST, "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path / "o"),
                        "--warmup", "3", "--epoch", "2")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "--warmup 3" in result.stderr
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# the head guard


def dead_classifier(seed: int = 0) -> PerformerLM:
    torch.manual_seed(seed)
    model = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(3)
    with torch.no_grad():
        model.to_out.conv1.bias.fill_(-8.0)  # every per-gene score < 0: the ReLU passes nothing
    return model


def train_steps(model: PerformerLM, guard: finetune.HeadGuard | None, steps: int = 60) -> float:
    """Adam at 3e-4 on a separable toy task; returns the share of genes the head's ReLU passes after."""
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, 6, size=(24, 41))).long()
    labels = torch.from_numpy(np.arange(24) % 3)
    tokens[:, 0] = labels + 1
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = finetune.classification_loss(model, None, torch.device("cpu"), utils.Precision("none", torch.device("cpu")),
                                           guard)
    for _ in range(steps):
        loss, _ = loss_fn({"tokens": tokens, "label": labels})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        score = model.encode(tokens) @ model.to_out.conv1.weight.view(-1) + model.to_out.conv1.bias
    return float((score > 0).float().mean())


def test_the_head_guard_revives_a_dead_head_and_changes_nothing_else():
    assert train_steps(dead_classifier(), None) == 0.0  # unguarded, a dead head stays dead: no gradient
    model = dead_classifier()
    guard = finetune.HeadGuard(model.to_out)
    assert train_steps(model, guard) > 0.05
    lifted, restarts = guard.take_counts()
    assert lifted > 0 and restarts >= 1 and guard.take_counts() == (0, 0)
    # a living head: the guard adds nothing, the loss is the cross-entropy alone
    alive = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(3)
    with torch.no_grad():
        alive.to_out.conv1.bias.fill_(5.0)
    guard = finetune.HeadGuard(alive.to_out)
    tokens = torch.randint(0, 6, (4, 41))
    before = alive.to_out.conv1.bias.clone()
    alive(tokens)
    assert float(guard.loss().detach()) == 0.0
    alive(tokens)  # the next step: the bias stays as it was
    assert torch.equal(alive.to_out.conv1.bias, before) and guard.take_counts() == (0, 0)
    with torch.no_grad():  # not kept outside training: validation never adds to the loss
        alive(tokens)
    assert guard.loss() == 0.0
    guard.remove()


class FewCells:
    """The part of a token dataset orient_head reads: dataset[list of items] -> {'tokens': (b, n)}."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, items):
        return {"tokens": self.tokens[torch.as_tensor(items)]}


def head_scores(model: PerformerLM, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(tokens) @ model.to_out.conv1.weight.view(-1) + model.to_out.conv1.bias


def test_orient_head_points_each_gene_score_along_expression_whatever_the_draw():
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(1, 6, size=(60, 41)) * (rng.random((60, 41)) < 0.2)).long()  # 80% zeros
    cells = FewCells(tokens)
    oriented = []
    for sign in (1.0, -1.0):  # the same draw and its mirror image
        torch.manual_seed(0)
        model = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(3)
        with torch.no_grad():
            model.to_out.conv1.weight.mul_(sign)
            model.to_out.conv1.bias.mul_(sign)
        said = finetune.orient_head(model, cells, "cpu")
        assert said.startswith("head orientation (60 training cells): ") and "--no-orient_head" in said
        score = head_scores(model, tokens)
        zero = tokens == 0
        # the score rises with expression, the ReLU's threshold midway between absent and present
        assert float(score[~zero].mean()) > 0 > float(score[zero].mean())
        assert abs(float(score[zero].mean() + score[~zero].mean())) < 1e-4
        assert model.training  # left in training mode
        oriented.append((model.to_out.conv1.weight.clone(), model.to_out.conv1.bias.clone()))
    # one draw and its mirror end the same: exactly one of them was flipped
    assert torch.allclose(oriented[0][0], oriented[1][0]) and torch.allclose(oriented[0][1], oriented[1][1], atol=1e-6)
    # cells all alike say nothing about the direction: the head is left as drawn
    torch.manual_seed(0)
    model = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(3)
    before = [p.clone() for p in model.to_out.conv1.parameters()]
    assert "kept (every token" in finetune.orient_head(model, FewCells(torch.zeros(8, 41, dtype=torch.long)), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(before, model.to_out.conv1.parameters()))


def test_orient_head_puts_expressed_genes_above_the_threshold_on_every_draw():
    """Each bin has its own random embedding, so at initialisation the score is not monotone in the token:
    with mostly low bins and a few high ones, a covariance with the token value points some draws the wrong
    way (6 of these 40 tiny draws). The orientation follows the two groups its threshold sits between."""
    rng = np.random.default_rng(1)
    expressed = rng.random((60, 41)) < 0.2
    tokens = torch.from_numpy(np.where(rng.random((60, 41)) < 0.9, 1, 5) * expressed).long()
    for seed in range(40):
        torch.manual_seed(seed)
        model = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(3)
        finetune.orient_head(model, FewCells(tokens), "cpu")
        score = head_scores(model, tokens)
        assert float(score[tokens > 0].mean()) > 0 > float(score[tokens == 0].mean()), seed


def test_no_orient_head_trains_the_head_as_drawn(tmp_path, default_subset, caplog):
    args = finetune.build_parser().parse_args([*FAST, "--epoch", "1", "--ckpt_dir", str(tmp_path),
                                               "--data_path", str(default_subset), "--no-orient_head"])
    with caplog.at_level(logging.INFO, logger="scbert"):
        finetune.main(args)
    assert "head orientation" not in caplog.text
    assert utils.read_checkpoint(tmp_path / "finetune_last.pth", mmap=True)["args"]["orient_head"] is False


# --------------------------------------------------------------------------------------------------
# rare types


def test_sampler_draws_rare_types_more_often_and_the_same_each_time():
    codes = np.array([0] * 900 + [1] * 90 + [2] * 10)
    weights = finetune.balanced_sample_weights(codes)
    draw = utils.weighted_draw(weights, seed=3, epoch=2, rank=0, world_size=1)
    assert draw == utils.weighted_draw(weights, seed=3, epoch=2, rank=0, world_size=1)
    assert draw != utils.weighted_draw(weights, seed=3, epoch=3, rank=0, world_size=1)
    share = np.bincount(codes[draw], minlength=3) / len(draw)
    expected = np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum()  # square-root balancing
    assert np.allclose(share, expected, atol=0.03) and share[2] > 5 * 0.01
    ranks = [utils.weighted_draw(weights, 3, 2, r, 3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and sum(map(len, ranks)) >= len(codes)


def test_scores_count_validation_types_never_recognised():
    truth = np.array([0, 0, 0, 1, 1, 2])
    logits = np.eye(3)[[0, 0, 1, 1, 1, 0]].astype(np.float32)  # type 2 never called right
    got = finetune.scores(utils.Predictions(logits, None, truth, None))
    assert got["types_missed"] == 1
    # an epoch recognising every type outranks one with a higher macro-F1 that misses one
    assert 0.30 - 0 > got["macro_f1"] - got["types_missed"]
    assert finetune.describe_selection(got["macro_f1"] - 1).startswith(f"macro-F1 {got['macro_f1']:.4f}, 1 ")


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_balance_modes_train_and_are_recorded(tmp_path, default_subset, balance, caplog):
    args = finetune.build_parser().parse_args([*FAST, "--epoch", "1", "--ckpt_dir", str(tmp_path),
                                               "--data_path", str(default_subset), "--balance", balance])
    with caplog.at_level(logging.INFO, logger="scbert"):
        best = finetune.main(args)
    assert f"--balance {balance}" in caplog.text
    assert torch.load(best, weights_only=True)["args"]["balance"] == balance


def test_label_smoothing_is_the_smoothed_cross_entropy_and_zero_is_the_published_loss():
    torch.manual_seed(0)
    model = PerformerLM(get_config("tiny", gene_num=40, bin_num=5)).attach_classifier(4)
    batch = {"tokens": torch.randint(0, 6, (6, 41)), "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    cpu = torch.device("cpu")
    with torch.no_grad():
        log_p = torch.log_softmax(model(batch["tokens"]).float(), -1)
        nll = -log_p.gather(1, batch["label"][:, None]).squeeze(1)
        spread = -log_p.mean(-1)  # the cross-entropy against the uniform distribution over the 4 types
        plain, _ = finetune.classification_loss(model, None, cpu, utils.Precision("none", cpu))(batch)
        smoothed, _ = finetune.classification_loss(model, None, cpu, utils.Precision("none", cpu),
                                                   label_smoothing=0.2)(batch)
    assert torch.allclose(plain, nll.mean(), atol=1e-6)
    assert torch.allclose(smoothed, (0.8 * nll + 0.2 * spread).mean(), atol=1e-6)


def test_label_smoothing_flag_reaches_the_loss_and_is_recorded(tmp_path, default_subset, monkeypatch, caplog):
    seen = []
    loss_fn = finetune.classification_loss

    def recording(*a, **k):
        seen.append(k.get("label_smoothing"))
        return loss_fn(*a, **k)

    monkeypatch.setattr(finetune, "classification_loss", recording)
    args = finetune.build_parser().parse_args([*FAST, "--epoch", "1", "--ckpt_dir", str(tmp_path),
                                               "--data_path", str(default_subset), "--label_smoothing", "0.15"])
    with caplog.at_level(logging.INFO, logger="scbert"):
        best = finetune.main(args)
    assert seen == [0.15] and "--label_smoothing 0.15" in caplog.text
    assert torch.load(best, weights_only=True)["args"]["label_smoothing"] == 0.15


def test_label_smoothing_out_of_range_is_one_line_and_exit_2(tmp_path, default_subset):
    result = run_script("finetune.py", *FAST, "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path / "o"),
                        "--label_smoothing", "1")
    assert result.returncode == 2 and "--label_smoothing 1.0 is outside [0, 1)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------
# fold ensembles and --test_size 0


def test_folds_make_an_ensemble_that_evaluate_averages(tmp_path, default_subset):
    ckpts = tmp_path / "ckpts"
    result = run_script("finetune.py", *FAST, "--epoch", "1", "--folds", "2", "--seed", "4",
                        "--data_path", str(default_subset), "--ckpt_dir", str(ckpts))
    assert result.returncode == 0, result.stderr
    summary = pd.read_csv(ckpts / "cv_summary.csv")
    assert list(summary["fold"].astype(str)) == ["0", "1", "mean", "sd", "ensemble"]
    assert {"valid_accuracy", "valid_macro_f1", "test_accuracy", "test_macro_f1"} <= set(summary.columns)
    single = utils.stratified_splits(utils.read_labels(utils.read_dataset(str(default_subset)), "celltype"),
                                     0.2, 0.1, seed=4)
    ens = torch.load(ckpts / "ensemble.pth", weights_only=True)
    assert ens["ensemble"] == ["fold0/finetune_best.pth", "fold1/finetune_best.pth"]
    assert ens["splits"]["test"] == single["test"].tolist()  # the single model's test cells
    assert len(ens["splits"]["train"]) + len(ens["splits"]["test"]) == 234
    for k in (0, 1):  # each fold trains on as many cells as the single split, from its own seed
        member = torch.load(ckpts / f"fold{k}" / "finetune_best.pth", weights_only=True)
        assert member["seed"] == 4 + k
        topped_up = utils.stratified_splits(utils.read_labels(utils.read_dataset(str(default_subset)), "celltype"),
                                            0.2, 0.1, seed=4, min_valid_per_class=2)
        assert abs(len(member["splits"]["train"]) - len(topped_up["train"])) <= 3, (k, len(member["splits"]["train"]))

    outs = {}
    for name, model_path in (("ensemble", None), ("fold0", ckpts / "fold0" / "finetune_best.pth"),
                             ("fold1", ckpts / "fold1" / "finetune_best.pth")):
        out = tmp_path / name
        where = [] if model_path is None else ["--model_path", str(model_path)]  # none: ckpts/ensemble.pth
        result = run_script("evaluate.py", *where, "--output_dir", str(out), "--no-umap", "--no-gene_importance",
                            cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outs[name] = pd.read_csv(out / "predictions.csv")
        assert ("evaluating the fold ensemble" in result.stdout) == (model_path is None)
    probability_columns = [c for c in outs["ensemble"].columns if c.startswith("prob_")]
    averaged = (outs["fold0"][probability_columns].to_numpy() + outs["fold1"][probability_columns].to_numpy()) / 2
    assert np.allclose(outs["ensemble"][probability_columns].to_numpy(), averaged, atol=1e-5)
    metrics = json.loads((tmp_path / "ensemble" / "metrics.json").read_text())
    assert metrics["ensemble_members"] == ens["ensemble"] and metrics["n_cells"] == len(single["test"])
    # fold agreement: the share of the two folds whose own call is the ensemble's call
    own = np.stack([outs[f]["scbert_label"].to_numpy() for f in ("fold0", "fold1")])
    expected = (own == outs["ensemble"]["scbert_label"].to_numpy()).mean(axis=0)
    assert np.allclose(outs["ensemble"]["scbert_fold_agreement"].to_numpy(), expected)
    assert "scbert_fold_agreement" not in outs["fold0"].columns
    agreement = metrics["fold_agreement"]
    assert agreement["n_members"] == 2 and agreement["n_cells_all_agree"] == int((expected == 1).sum())
    assert agreement["n_cells_all_agree"] + agreement["n_cells_split"] == len(single["test"])
    truth, called = outs["ensemble"]["true_label"].to_numpy(), outs["ensemble"]["scbert_label"].to_numpy()
    if agreement["n_cells_all_agree"]:
        assert np.isclose(agreement["accuracy_all_agree"], (truth == called)[expected == 1].mean())
    stored = ad.read_h5ad(tmp_path / "ensemble" / "predictions.h5ad")
    assert np.allclose(stored.obs["scbert_fold_agreement"].to_numpy(), expected)
    row = summary[summary["fold"].astype(str) == "ensemble"].iloc[0]
    assert abs(row["test_accuracy"] - metrics["accuracy"]) < 1e-6

    # --resume with another seed would go on training fold models on what are now test cells: refused
    before = (ckpts / "fold0" / "finetune_last.pth").read_bytes()
    result = run_script("finetune.py", *FAST, "--epoch", "2", "--folds", "2", "--seed", "5", "--resume",
                        "--data_path", str(default_subset), "--ckpt_dir", str(ckpts))
    assert result.returncode == 2 and "--seed" in result.stderr and "splits" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (ckpts / "fold0" / "finetune_last.pth").read_bytes() == before

    # a fold re-trained since, or an ensemble given where one checkpoint is needed: one line, exit 2
    result = run_script("finetune.py", *FAST[:-2], "--model_path", str(ckpts / "ensemble.pth"),
                        "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path / "again"))
    assert result.returncode == 2 and "fold ensemble" in result.stderr and not (tmp_path / "again").exists()
    member = ckpts / "fold1" / "finetune_best.pth"
    member.write_bytes(member.read_bytes() + b"\0")
    result = run_script("evaluate.py", "--model_path", str(ckpts / "ensemble.pth"), "--output_dir",
                        str(tmp_path / "changed"))
    assert result.returncode == 2 and "has changed since" in result.stderr and not (tmp_path / "changed").exists()


def test_test_size_0_fits_on_every_labelled_cell(tmp_path, default_subset):
    ckpts = tmp_path / "ckpts"
    result = run_script("finetune.py", *FAST, "--epoch", "1", "--test_size", "0", "--data_path", str(default_subset),
                        "--ckpt_dir", str(ckpts))
    assert result.returncode == 0, result.stderr
    splits = torch.load(ckpts / "finetune_best.pth", weights_only=True)["splits"]
    assert len(splits["test"]) == 0 and len(splits["train"]) + len(splits["valid"]) == 234 and len(splits["valid"]) > 0
    result = run_script("evaluate.py", "--model_path", str(ckpts / "finetune_best.pth"), "--output_dir",
                        str(tmp_path / "out"))
    assert result.returncode == 2 and "--all_cells" in result.stderr
    result = run_script("finetune.py", *FAST, "--epoch", "1", "--valid_size", "0", "--data_path", str(default_subset),
                        "--ckpt_dir", str(tmp_path / "novalid"))
    assert result.returncode == 2 and "--valid_size" in result.stderr


def test_ensemble_helpers():
    a = np.array([[2.0, 0.0], [0.0, 1.0]])
    b = np.array([[0.0, 0.0], [0.0, 3.0]])
    mean = ensemble.mean_probabilities([a, b])
    assert np.allclose(mean.sum(axis=1), 1) and np.allclose(mean, (ensemble.softmax(a) + ensemble.softmax(b)) / 2)
    assert ensemble.is_ensemble({"ensemble": []}) and not ensemble.is_ensemble({"model_state_dict": {}})
    # three members: cell 0 every one calls class 0; cell 1 splits 2 : 1 and the average follows the two;
    # cell 2 splits 2 : 1 but one confident member outweighs the other two, so only it agrees
    x = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    z = np.array([[3.0, 0.0], [0.0, 2.0], [0.0, 6.0]])
    assert np.allclose(ensemble.fold_agreement([x, y, z]), [1.0, 2 / 3, 1 / 3])


def test_fold_agreement_report_counts_like_accuracy():
    import evaluate

    agreement = np.array([1.0, 1.0, 0.5, 0.5, 1.0, 0.5])
    calls = np.array(["A", "A", "B", "B", "A", "C"])
    # cell 1's type was never learned and cell 3 has no label: neither counts, as in `accuracy`
    truth = np.array(["A", "NOVEL", "B", None, "B", "C"], dtype=object)
    got = evaluate.agreement_report(agreement, calls, truth, ["A", "B", "C"], 2)
    assert got["n_members"] == 2 and got["calls"] == "ensemble"
    assert got["n_cells_all_agree"] == 3 and got["n_cells_split"] == 3
    assert got["accuracy_all_agree"] == 0.5 and got["accuracy_split"] == 1.0  # cells 0, 4 and 2, 5
    unlabelled = evaluate.agreement_report(agreement, calls, None, ["A", "B", "C"], 2, "classifier")
    assert unlabelled["calls"] == "classifier" and unlabelled["accuracy_all_agree"] is None
    alike = evaluate.agreement_report(np.ones(6), calls, truth, ["A", "B", "C"], 3)
    assert alike["n_cells_split"] == 0 and alike["accuracy_split"] is None and alike["accuracy_all_agree"] == 0.75


def test_resume_refuses_a_run_started_on_other_cells(tmp_path, default_subset):
    base = [*FAST, "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path)]
    finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "1", "--seed", "4"]))
    before = (tmp_path / "finetune_last.pth").read_bytes()
    result = run_script("finetune.py", *base, "--epoch", "2", "--resume", "--test_size", "0.3", "--seed", "4")
    assert result.returncode == 2 and "--test_size" in result.stderr and "splits" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "finetune_last.pth").read_bytes() == before


def test_resume_keeps_the_schedule_it_started_with(tmp_path, default_subset, caplog):
    base = [*FAST, "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path)]
    finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "2"]))  # auto: one cosine over 2 epochs
    with caplog.at_level(logging.INFO, logger="scbert"):
        finetune.main(finetune.build_parser().parse_args([*base, "--epoch", "3", "--resume"]))
    assert "--resume: the schedule of" in caplog.text
    ckpt = torch.load(tmp_path / "finetune_last.pth", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["schedule"]["cycle"] == 2 and ckpt["schedule"]["epoch"] == 3


def test_conflicting_balance_flags_are_one_line_and_exit_2(tmp_path, default_subset):
    result = run_script("finetune.py", *FAST, "--data_path", str(default_subset), "--ckpt_dir", str(tmp_path / "o"),
                        "--class_weights", "--balance", "sampler")
    assert result.returncode == 2 and "--class_weights is --balance weights" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_accuracy_benchmark_keeps_run_records_a_lost_run_folder_still_counts(tmp_path):
    """benchmarks/accuracy.py: every finished run is kept as a record (in git), so the tables survive the
    run folders (a cache); a run finished again replaces its record, and only the asked runs are shown."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def record(method, seed, accuracy, dataset="pbmc68k_reduced", **more):
        return {"dataset": dataset, "seed": seed, "method": method, "accuracy": accuracy, "macro_f1": accuracy - 0.1,
                "baseline_accuracy": 0.8, "baseline_macro_f1": 0.7, "predicted_types": 9, "revision": "r1", **more}

    kept = tmp_path / "runs.csv"
    bench.keep_records(pd.DataFrame([record("scratch", 2021, 0.81), record("scratch", 2022, 0.82),
                                     record("ensemble K=3", 2021, 0.83), record("scratch", 2021, 0.9,
                                                                                "pbmc3k_silver")]), kept)
    fresh = pd.DataFrame([record("scratch", 2022, 0.85), record("weights", 2021, 0.84)])
    records = bench.keep_records(fresh, kept)
    on_disk = pd.read_csv(kept)
    assert len(on_disk) == 5 and not list(tmp_path.glob("*.partial"))
    assert on_disk.set_index(["dataset", "method", "seed"]).loc[("pbmc68k_reduced", "scratch", 2022), "accuracy"] == 0.85

    labels = bench.method_labels(["scratch", "ensemble", "weights"], [3, 5])
    assert labels == ["scratch", "ensemble K=3", "ensemble K=5", "weights"]
    pd.testing.assert_frame_equal(records, on_disk, check_dtype=False)
    table = bench.asked_runs(records, ["pbmc68k_reduced"], labels, [2021, 2022])
    assert list(zip(table["method"], table["seed"], table["accuracy"])) == [
        ("scratch", 2021, 0.81), ("scratch", 2022, 0.85), ("ensemble K=3", 2021, 0.83), ("weights", 2021, 0.84)]
    report = bench.report(table.assign(finetune_seconds=float("nan")), _Args(), 0.0, carried=2)
    assert ("| pbmc68k_reduced | weights (--label_smoothing 0, --no-orient_head) − scratch (--label_smoothing 0, "
            "--no-orient_head) | +0.030 | +0.030 | 2021 |") in report
    assert "2 of the 4 runs are from their records" in report
    # records from before --label_smoothing trained with the published loss and from before --orient_head
    # with the head as drawn: they say so, and a method is paired with the from-scratch runs of its own loss
    # and orientation; a study with the runs that differ only in what it studies
    assert (records["label_smoothing"] == 0.0).all() and not records["oriented"].any()
    default = finetune.DEFAULT_LABEL_SMOOTHING
    assert default != 0.0
    mixed = pd.DataFrame([record("scratch", 2021, 0.86, label_smoothing=default, oriented=True),
                          record("unoriented", 2021, 0.85, label_smoothing=default, oriented=False),
                          record("unsmoothed", 2021, 0.81, label_smoothing=0.0, oriented=False),
                          record("weights", 2021, 0.84, label_smoothing=0.0, oriented=False),
                          record("ensemble K=3", 2021, 0.88, label_smoothing=default, oriented=False),
                          record("sampler", 2021, 0.90, label_smoothing=default, oriented=True)]
                         ).assign(finetune_seconds=1.0)
    report = bench.report(mixed, _Args(), 0.0)
    assert ("| pbmc68k_reduced | weights (--label_smoothing 0, --no-orient_head) − unsmoothed (--no-orient_head) | "
            "+0.030 | +0.030 | 2021 |") in report
    assert "| pbmc68k_reduced | unsmoothed (--no-orient_head) − unoriented | -0.040 | -0.040 | 2021 |" in report
    assert "| pbmc68k_reduced | unoriented − scratch | -0.010 | -0.010 | 2021 |" in report
    assert "| pbmc68k_reduced | ensemble K=3 (--no-orient_head) − unoriented | +0.030 | +0.030 | 2021 |" in report
    assert "| pbmc68k_reduced | sampler − scratch | +0.040 | +0.040 | 2021 |" in report
    assert "| pbmc68k_reduced | scratch |" in report and "scratch (--" not in report
    assert not bench.oriented_of(tmp_path)  # no log: a run from before the orientation
    assert bench.label_smoothing_of(tmp_path) == 0.0  # no log: a run from before the flag
    (tmp_path / "finetune_log.txt").write_text("rare types: --balance none, --label_smoothing 0.1; validation keeps")
    assert bench.label_smoothing_of(tmp_path) == 0.1
    with open(tmp_path / "finetune_log.txt", "a") as log:
        log.write("\nhead orientation (128 training cells): flipped, threshold moved by +0.1; the ReLU now passes")
    assert bench.oriented_of(tmp_path)
    nothing = bench.keep_records(pd.DataFrame(), tmp_path / "absent.csv")
    assert bench.asked_runs(nothing, ["pbmc68k_reduced"], labels, [2021]).empty
    assert not (tmp_path / "absent.csv").exists()


class _Args:
    seeds, folds = "2021,2022", "3,5"


def test_the_rare_types_check_scores_a_tau_as_finetune_scores_an_epoch():
    """benchmarks/rare_types.py picks its prior correction by finetune.py's epoch score (macro-F1 minus
    the validation types never recognised), and its paired report subtracts per seed."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("rare_types_bench", ROOT / "benchmarks" / "rare_types.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = np.array([0, 0, 0, 1, 1, 2])
    for predicted in (np.array([0, 0, 0, 1, 1, 2]), np.array([0, 0, 1, 1, 1, 0]), np.array([0, 0, 0, 0, 0, 0])):
        logits = np.eye(3, dtype=np.float32)[predicted]
        epoch = finetune.scores(utils.Predictions(logits, None, truth))
        assert bench.selection(truth, predicted) == pytest.approx(epoch["macro_f1"] - epoch["types_missed"])
    assert bench.selection(truth, np.array([0, 0, 0, 0, 0, 0])) < 0 < bench.selection(truth, truth)
    assert bench.paired([0.01, 0.03]) == "+0.020 (SE 0.010)"
