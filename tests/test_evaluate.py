"""evaluate.py and report_utils.py on a tiny fine-tuned model: every output exists and agrees with the
others, metrics recomputed from the CSV match metrics.json, unlabelled data still annotates, novel
types are counted, user mistakes end with one clear line (exit 2) and leave no files, and gene
importance finds textbook markers on PBMC3k (skipped without ../shared/data).

The fine-tuned models are made here: the tiny preset with its encoder as initialised and a
classifier head trained for a few epochs on cached encodings (the published fine-tuning also freezes
most of the encoder), which takes seconds instead of a full fine-tuning run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

import evaluate
import report_utils
import train_utils
import utils
from data_utils import InputError
from model import PerformerLM, get_config

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


# --------------------------------------------------------------------------------------------------
# a tiny fine-tuned checkpoint


def finetune_head(adata, label_key: str, panel: list[str], data_path: str | None, path: Path,
                  epochs: int = 12, seed: int = 0, splits: dict | None = None, batch_size: int = 128,
                  pos_embed: str = "gene2vec") -> dict:
    """Tiny model, head trained on the training split's cached encodings; saved like finetune.py."""
    input_format = utils.detect_input_format(adata)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    y_text = adata.obs[label_key].astype(str).to_numpy()
    names = sorted(set(y_text))
    y = np.array([names.index(v) for v in y_text])
    splits = splits or utils.stratified_splits(y_text, seed=seed)
    torch.manual_seed(seed)
    config = get_config("tiny", gene_num=len(panel), pos_embed=pos_embed)
    table = None
    if pos_embed == "gene2vec":  # a stand-in for Gene2Vec vectors: the frozen float64 table path
        table = torch.randn(config.seq_len, config.dim, dtype=torch.float64) * 0.1
        table[-1] = 0
    model = PerformerLM(config, pos_table=table).attach_classifier(len(names)).eval()
    dataset = utils.TokenDataset(aligned, input_format, config.bin_num, labels=y, indices=splits["train"])
    with torch.inference_mode():
        encoded = torch.cat([model.encode(b["tokens"].long())
                             for b in torch.utils.data.DataLoader(dataset, batch_size=64)])
    encoded = encoded.clone()
    targets = torch.as_tensor(y[splits["train"]])
    optimizer = torch.optim.Adam(model.to_out.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = F.cross_entropy(model.to_out(encoded[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    state = {"epoch": epochs, "losses": float(loss.detach()), **train_utils.model_checkpoint_fields(model),
             "gene_panel": list(panel), "input_format": input_format, "label_names": names,
             "label_key": label_key, "splits": {k: [int(i) for i in v] for k, v in splits.items()},
             "data_fingerprint": utils.data_fingerprint(adata), "data_path": data_path}
    train_utils.save_checkpoint(path, state)
    return state


def run_evaluate(*argv: str) -> dict:
    return evaluate.main(evaluate.build_parser().parse_args(list(argv)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small models gain little from two, and on a machine shared with other
    jobs two threads waiting on each other at every operation run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_data():
    return utils.read_dataset(None)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, default_data):
    path = tmp_path_factory.mktemp("ckpt") / "finetune_best.pth"
    state = finetune_head(default_data, "celltype", list(default_data.var_names), None, path)
    return path, state


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, finetuned):
    """One full run: default data (held-out test cells), baseline, UMAP, gene importance."""
    path, state = finetuned
    out = tmp_path_factory.mktemp("results") / "results"
    metrics = run_evaluate("--model_path", str(path), "--output_dir", str(out), "--baseline",
                           "--importance_cells", "6", "--top_genes", "20")
    return out, metrics, state


def small_copy(adata, n: int, path: Path, edit=None) -> Path:
    """The first cells of each type (so several types appear), optionally edited, as an .h5ad."""
    rows = np.sort(np.concatenate([np.flatnonzero(adata.obs["celltype"].to_numpy() == c)[:6]
                                   for c in adata.obs["celltype"].unique()]))[:n]
    sub = adata[rows].copy()
    if edit is not None:
        edit(sub)
    sub.write_h5ad(path)
    return path


# --------------------------------------------------------------------------------------------------
# the full run


def test_every_output_exists_and_agrees(evaluated, default_data):
    out, metrics, state = evaluated
    for name in evaluate.OUTPUT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging files left behind"

    classes = state["label_names"]
    test_rows = np.asarray(state["splits"]["test"])
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["cell_id"]) == list(default_data.obs_names[test_rows])
    probs = table[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(table["scbert_label"], np.asarray(classes)[probs.argmax(axis=1)])
    np.testing.assert_allclose(table["scbert_confidence"], probs.max(axis=1), rtol=1e-6)
    assert list(table["true_label"]) == list(default_data.obs["celltype"].to_numpy()[test_rows])
    assert table["scbert_label"].nunique() >= 2, "the tiny model should not predict one class for all cells"

    import anndata

    pred = anndata.read_h5ad(out / "predictions.h5ad")
    assert list(pred.obs_names) == list(table["cell_id"])
    assert list(pred.uns["scbert_classes"]) == classes
    assert list(pred.obs["scbert_label"].astype(str)) == list(table["scbert_label"])
    np.testing.assert_allclose(pred.obsm["scbert_probabilities"], probs, atol=1e-6)
    np.testing.assert_allclose(pred.obs["scbert_confidence"], table["scbert_confidence"], rtol=1e-6)
    assert pred.obsm["X_scbert"].shape == (len(test_rows), 128)
    assert pred.n_vars == default_data.n_vars  # a copy of the input cells, all genes kept
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_metrics_recomputed_from_csv(evaluated):
    out, _, state = evaluated
    saved = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions.csv")
    truth, pred = table["true_label"].to_numpy(), table["scbert_label"].to_numpy()
    assert saved["n_cells"] == len(table) and saved["n_unassigned"] == 0
    assert saved["accuracy"] == pytest.approx(np.mean(truth == pred))
    assert saved["macro_f1"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert saved["weighted_f1"] == pytest.approx(f1_score(truth, pred, average="weighted"))
    for c in state["label_names"]:
        assert saved["per_class"][c]["support"] == int((truth == c).sum())
        assert saved["per_class"][c]["n_predicted"] == int((pred == c).sum())
    base = table["baseline_label"].to_numpy()
    assert saved["baseline"]["accuracy"] == pytest.approx(np.mean(truth == base))
    assert saved["baseline"]["macro_f1"] == pytest.approx(f1_score(truth, base, average="macro"))
    assert saved["baseline"]["C"] in (0.1, 1.0, 10.0)


def test_gene_importance_table(evaluated):
    out, _, state = evaluated
    table = pd.read_csv(out / "gene_importance.csv")
    predicted = set(pd.read_csv(out / "predictions.csv")["scbert_label"])
    assert set(table["cell_type"]) == predicted
    for _, part in table.groupby("cell_type"):
        assert list(part["rank"]) == list(range(1, len(part) + 1)) and len(part) == 20
        assert (np.diff(part["importance"].to_numpy()) <= 0).all()
        assert set(part["gene"]) <= set(state["gene_panel"])
        assert (part["n_cells"] <= 6).all()


# --------------------------------------------------------------------------------------------------
# other data


def test_unlabelled_data_is_annotated_whole(tmp_path, finetuned, default_data):
    path, state = finetuned

    def drop_labels(sub):
        del sub.obs["celltype"]
        del sub.obs["bulk_labels"]

    data = small_copy(default_data, 40, tmp_path / "unlabelled.h5ad", drop_labels)
    out = tmp_path / "out"
    out.mkdir()
    (out / "confusion_matrix.png").write_bytes(b"from an earlier labelled run")
    metrics = run_evaluate("--model_path", str(path), "--data_path", str(data), "--output_dir", str(out),
                           "--no-umap", "--no-gene_importance")
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 40 and "true_label" not in table.columns  # other data: every cell, no split
    assert metrics["accuracy"] is None and metrics["label_key"] is None
    assert sorted(p.name for p in out.iterdir()) == ["gene_overlap.csv", "metrics.json", "predictions.csv",
                                                     "predictions.h5ad"]


def test_novel_types_go_to_unassigned_and_are_counted(tmp_path, finetuned, default_data):
    path, state = finetuned

    def rename(sub):
        labels = sub.obs["celltype"].astype(str).to_numpy().copy()
        labels[labels == "CD19+ B"] = "Plasma (never seen)"
        sub.obs["celltype"] = labels

    data = small_copy(default_data, 60, tmp_path / "novel.h5ad", rename)
    out = tmp_path / "out"
    saved = run_evaluate("--model_path", str(path), "--data_path", str(data), "--output_dir", str(out),
                         "--novel_type", "--unassign_thres", "0.6", "--no-umap", "--no-gene_importance")
    table = pd.read_csv(out / "predictions.csv")
    probs = table[[f"prob_{c}" for c in state["label_names"]]].to_numpy()
    low = probs.max(axis=1) < 0.6
    assert (table["scbert_label"][low] == "Unassigned").all()
    np.testing.assert_array_equal(table["scbert_label"][~low],
                                  np.asarray(state["label_names"])[probs[~low].argmax(axis=1)])
    assert 0 < low.sum() < len(table), "threshold 0.6 should split this tiny model's cells"
    novel = table["true_label"] == "Plasma (never seen)"
    info = saved["unknown_labels"]["Plasma (never seen)"]
    assert info["n_cells"] == novel.sum() == 6
    assert info["n_unassigned"] == int((table["scbert_label"][novel] == "Unassigned").sum())
    assert saved["novel_detection"]["n_unassigned"] == info["n_unassigned"]
    assert saved["n_unassigned"] == int(low.sum())
    assert saved["n_known_label_cells"] == len(table) - 6
    known = ~novel.to_numpy()
    assert saved["accuracy"] == pytest.approx(np.mean(table["true_label"][known] == table["scbert_label"][known]))


# --------------------------------------------------------------------------------------------------
# mistakes a user can make


def _resave(state: dict, path: Path, **changes) -> Path:
    train_utils.save_checkpoint(path, {**state, **changes})
    return path


def test_class_count_mismatch(tmp_path, finetuned):
    path, state = finetuned
    bad = _resave(state, tmp_path / "bad.pth", label_names=state["label_names"][:-1])
    with pytest.raises(InputError, match="lists 9 cell types but the model's classifier has 10 outputs"):
        run_evaluate("--model_path", str(bad), "--output_dir", str(tmp_path / "out"))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(state["label_names"] + ["extra"]))
    with pytest.raises(InputError, match="lists 11 cell types"):
        run_evaluate("--model_path", str(path), "--label_names", str(names), "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gene_panel_mismatch_and_no_overlap(tmp_path, finetuned, default_data):
    path, state = finetuned
    bad = _resave(state, tmp_path / "bad.pth", gene_panel=state["gene_panel"][:700])
    with pytest.raises(InputError, match="has 700 genes but the model was built for 765"):
        run_evaluate("--model_path", str(bad), "--output_dir", str(tmp_path / "out"))
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(state["gene_panel"] + ["NOT_A_GENE"]))
    with pytest.raises(InputError, match="--gene_panel .* has 766 genes"):
        run_evaluate("--model_path", str(path), "--gene_panel", str(panel), "--output_dir", str(tmp_path / "out"))

    def rename_genes(sub):
        sub.var_names = [f"X{i}" for i in range(sub.n_vars)]

    data = small_copy(default_data, 10, tmp_path / "other_species.h5ad", rename_genes)
    with pytest.raises(InputError, match="panel genes"):
        run_evaluate("--model_path", str(path), "--data_path", str(data), "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_dataset(tmp_path, finetuned, default_data):
    path, _ = finetuned
    empty = tmp_path / "empty.h5ad"
    default_data[:0].copy().write_h5ad(empty)
    with pytest.raises(InputError, match="0 cells"):
        run_evaluate("--model_path", str(path), "--data_path", str(empty), "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_label_key_the_data_lacks_is_an_error_and_baseline_needs_labels(tmp_path, finetuned):
    path, _ = finetuned
    with pytest.raises(InputError, match="'no_such_column': the data's obs has no such column.*leave --label_key off"):
        run_evaluate("--model_path", str(path), "--label_key", "no_such_column", "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="--baseline needs true labels"):
        evaluate.check_baseline_inputs(None, True, "celltype")


def test_failed_write_leaves_nothing(tmp_path, finetuned, default_data, monkeypatch):
    path, _ = finetuned
    data = small_copy(default_data, 20, tmp_path / "d.h5ad")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_utils, "plot_confusion_matrix", disk_full)
    out = tmp_path / "new" / "results"
    with pytest.raises(InputError, match="No space left on device"):
        run_evaluate("--model_path", str(path), "--data_path", str(data), "--output_dir", str(out),
                     "--no-umap", "--no-gene_importance")
    assert not (tmp_path / "new").exists()


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_cli_unwritable_output_dir(tmp_path, finetuned):
    path, _ = finetuned
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _cli("--model_path", str(path), "--output_dir", str(blocker / "results"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot create output folder")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_cli_pretraining_checkpoint_embeds_and_labels_nothing(tmp_path, default_data):
    """Replaces the test that a pretrained checkpoint is refused (issue 19): it now embeds the cells."""
    genes = list(default_data.var_names)
    model = PerformerLM(get_config("tiny", gene_num=len(genes), pos_embed="none"))
    mlm = tmp_path / "pretrain.pth"
    train_utils.save_checkpoint(mlm, {**train_utils.model_checkpoint_fields(model), "gene_panel": genes})
    data = small_copy(default_data, 30, tmp_path / "cells.h5ad")
    result = _cli("--model_path", str(mlm), "--data_path", str(data), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gene_overlap.csv", "metrics.json",
                                                                    "predictions.h5ad", "umap.png"]
    import anndata

    pred = anndata.read_h5ad(tmp_path / "out" / "predictions.h5ad")
    assert pred.obsm["X_scbert_encoder"].shape == (30, model.config.dim)
    assert np.isfinite(pred.obsm["X_scbert_encoder"]).all() and pred.obsm["X_scbert_umap"].shape == (30, 2)
    assert not {"scbert_label", "scbert_confidence"} & set(pred.obs.columns)
    assert "scbert_probabilities" not in pred.obsm and "X_scbert" not in pred.obsm
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["mode"] == "embedding" and metrics["accuracy"] is None and metrics["classes"] == []


# --------------------------------------------------------------------------------------------------
# report_utils against hand-computed values


def test_metrics_by_hand():
    truth = ["a", "a", "a", "a", "b", "b", "new", "new"]
    pred = ["a", "a", "b", "c", "b", "Unassigned", "Unassigned", "a"]
    m = report_utils.classification_metrics(truth, pred, ["a", "b", "c", "d"])
    # scored over the six cells of known types; "Unassigned" is a wrong answer there
    assert m["accuracy"] == pytest.approx(3 / 6)
    # a: precision 2/2, recall 2/4 -> F1 2/3; b: 1/2, 1/2 -> 1/2; c: predicted once, never true -> 0;
    # d: neither true nor predicted -> not averaged
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 / 3 * 4 + 1 / 2 * 2) / 6)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "n_predicted": 1}
    assert m["n_unassigned"] == 2 and m["n_unassigned_known_label"] == 1
    assert m["unknown_labels"] == {"new": {"n_cells": 2, "n_unassigned": 1, "predicted_as": {"Unassigned": 1, "a": 1}}}
    assert m["novel_detection"]["rate"] == pytest.approx(0.5)
    probs = np.array([[0.7, 0.3], [0.45, 0.55], [0.5, 0.5]])
    assert list(report_utils.assign_labels(probs, ["x", "y"], 0.6)) == ["x", "Unassigned", "Unassigned"]
    assert list(report_utils.assign_labels(probs, ["x", "y"], None)) == ["x", "y", "x"]


# --------------------------------------------------------------------------------------------------
# gene importance finds textbook markers


B_MARKERS = {"MS4A1", "CD79A", "CD79B"}
MONO_MARKERS = {"CD14", "LYZ", "S100A8", "FCGR3A"}


@pytest.mark.skipif(not (SHARED_DATA / "pbmc3k_silver.h5ad").is_file(), reason="../shared/data is absent")
def test_gene_importance_finds_markers_on_pbmc3k(tmp_path):
    import scanpy as sc

    adata = utils.read_dataset(SHARED_DATA / "pbmc3k_silver.h5ad")
    labels = adata.obs["silver_label"].astype(str).to_numpy()
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), min(45, int((labels == c).sum())),
                                              replace=False) for c in np.unique(labels)]))
    sub = adata[keep].copy()
    logged = sub.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    sc.pp.highly_variable_genes(logged, n_top_genes=500, flavor="seurat")
    wanted = B_MARKERS | MONO_MARKERS
    panel = [g for g, hv in zip(sub.var_names, logged.var["highly_variable"]) if hv or g in wanted]
    every = {"train": np.arange(sub.n_obs), "valid": np.arange(0), "test": np.arange(0)}
    state = finetune_head(sub, "silver_label", panel, None, tmp_path / "pbmc3k.pth", epochs=20, splits=every,
                          batch_size=64, pos_embed="none")
    model, _ = train_utils.load_checkpoint(tmp_path / "pbmc3k.pth")
    aligned = utils.align_to_panel(sub, panel)
    dataset = utils.TokenDataset(aligned, "counts", model.config.bin_num)
    with torch.inference_mode():
        predicted_ids = torch.cat([model(b["tokens"].long()).argmax(1)
                                   for b in torch.utils.data.DataLoader(dataset, batch_size=64)]).numpy()
    predicted = np.asarray(state["label_names"], dtype=object)[predicted_ids]
    assert (predicted == sub.obs["silver_label"].astype(str).to_numpy()).mean() > 0.7
    of_interest = ["B", "CD14 Mono", "FCGR3A Mono"]
    predicted[~np.isin(predicted, of_interest)] = ""  # importance only for these types: keeps it quick
    table = report_utils.gene_importance(model, dataset, predicted, state["label_names"], panel,
                                         torch.device("cpu"), top_n=20, max_cells=40)
    top = {c: set(part["gene"]) for c, part in table.groupby("cell_type")}
    assert len(top["B"] & B_MARKERS) >= 2, top["B"]
    assert top["CD14 Mono"] & MONO_MARKERS, top["CD14 Mono"]
    assert top["FCGR3A Mono"] & MONO_MARKERS, top["FCGR3A Mono"]
