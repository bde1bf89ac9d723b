"""Annotation modes of evaluate.py (issue 19): the pooled encoder embedding, kNN label transfer from a
reference (also a pre-embedded predictions.h5ad), --novel_type's two rules, majority voting over an
over-clustering, and the mistakes that end with one line (exit 2) and leave no output. The maths is
checked against hand-computed values; the runs use the tiny preset on the default data."""
from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import annotation
import evaluate
import train_utils
from model import PerformerLM, get_config
from report_utils import UNASSIGNED
from test_errors import run_in_process
from test_evaluate import default_data, finetune_head, one_thread, run_evaluate, small_copy  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_data):
    """A tiny fine-tuned checkpoint, the same weights without the head (a 'pretrained' one), and a
    reference / query split of the default data (every other cell / a third of the rest)."""
    folder = tmp_path_factory.mktemp("annotation")
    genes = list(default_data.var_names)
    state = finetune_head(default_data, "celltype", genes, None, folder / "finetuned.pth")
    encoder = {k: v for k, v in state["model_state_dict"].items() if not k.startswith("to_out.")}
    mlm = PerformerLM(get_config("tiny", gene_num=len(genes), pos_embed="gene2vec"),
                      pos_table=torch.zeros(len(genes) + 1, 16, dtype=torch.float64))
    mlm.load_state_dict({**mlm.state_dict(), **encoder})
    train_utils.save_checkpoint(folder / "pretrained.pth", {**train_utils.model_checkpoint_fields(mlm),
                                                            "gene_panel": genes})
    reference = folder / "reference.h5ad"
    default_data[0::2].copy().write_h5ad(reference)
    query = folder / "query.h5ad"
    default_data[1::6].copy().write_h5ad(query)
    return {"finetuned": folder / "finetuned.pth", "pretrained": folder / "pretrained.pth",
            "reference": reference, "query": query, "classes": state["label_names"]}


# --------------------------------------------------------------------------------------------------
# the maths, by hand


def test_pooling_by_hand():
    encoded = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)   # (cells, positions, dim)
    tokens = torch.tensor([[0, 2, 1, 0], [0, 0, 0, 0]])                       # cell 1 expresses nothing
    expressed = annotation.pool_encodings(encoded, tokens, "expressed")
    torch.testing.assert_close(expressed[0], encoded[0, 1:3].mean(dim=0))
    torch.testing.assert_close(expressed[1], encoded[1].mean(dim=0))           # falls back to every position
    torch.testing.assert_close(annotation.pool_encodings(encoded, tokens, "all"), encoded.mean(dim=1))
    torch.testing.assert_close(annotation.pool_encodings(encoded, tokens, "last"), encoded[:, -1])
    assert annotation.POOLING in annotation.POOLINGS


def test_vote_shares_by_hand():
    distances = np.array([[0.1, 0.3], [0.2, 0.2]], dtype=np.float32)
    codes = np.array([[0, 1], [1, 1]])
    shares = annotation.vote_shares(distances, codes, 3)
    w = np.exp(-np.array([0.1, 0.3]) / 0.2)  # each weight exp(-d / mean d of the cell's neighbours)
    np.testing.assert_allclose(shares[0], [w[0] / w.sum(), w[1] / w.sum(), 0], rtol=1e-6)
    np.testing.assert_allclose(shares[1], [0, 1, 0])


def test_knn_transfer_and_both_novelty_rules():
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.3, (40, 3))
    b = rng.normal([0, 5, 0], 0.3, (40, 3))
    reference = np.vstack([a, b]).astype(np.float32)
    labels = np.array(["A"] * 40 + ["B"] * 40)
    query = np.array([[5, 0.1, 0], [0.1, 5, 0], [5, 2, 0], [5, 5, 0]], dtype=np.float32)
    plain = annotation.knn_transfer(reference, labels, query, 5, threshold=None)
    assert plain.classes == ["A", "B"] and list(plain.labels[:2]) == ["A", "B"]
    assert ((plain.shares >= 0) & (plain.shares <= 1)).all()
    np.testing.assert_allclose(plain.shares.sum(axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(plain.confidence, plain.shares.max(axis=1))
    novel = annotation.knn_transfer(reference, labels, query, 5, threshold=0.9)
    # the third cell's neighbours are all A but farther (in angle) than A's cells are from each
    # other: beyond the radius; the fourth lies between the types: a split vote
    assert plain.labels[2] == "A" and plain.confidence[2] > 0.99 and plain.confidence[3] < 0.9
    assert list(novel.labels) == ["A", "B", UNASSIGNED, UNASSIGNED]
    assert novel.kth_distance[2] > novel.novelty_radius >= novel.kth_distance[0]
    assert novel.n_far == 1 and novel.n_low_share == 1


def test_majority_vote_and_resolution_rule():
    clusters = np.array(["0", "0", "0", "1", "1", "2"])
    labels = np.array(["T", "T", "B", "B", "NK", UNASSIGNED], dtype=object)
    confidence = np.array([0.9, 0.8, 0.7, 0.4, 0.6, 0.3])
    voted = annotation.majority_vote(clusters, labels, confidence)
    assert list(voted) == ["T", "T", "T", "NK", "NK", UNASSIGNED]  # cluster 1: a tie, NK has more confidence
    assert [annotation.leiden_resolution(n) for n in (100, 4_999, 5_000, 30_000, 150_000, 10**6)] == \
        [5, 5, 10, 15, 25, 30]


def test_expression_over_clustering_separates_populations_and_outvotes_wrong_calls():
    """Two populations of counts that differ in 30 of 300 genes: every over-cluster of the
    expression graph is one population, so a few wrong calls are outvoted and all calls come right."""
    rng = np.random.default_rng(0)
    n, genes = 120, 300
    rates = np.full((n, genes), 2.0)
    rates[:60, :30] = 25.0
    rates[60:, 30:60] = 25.0
    counts = anndata.AnnData(X=rng.poisson(rates).astype(np.float32))
    truth = np.array(["A"] * 60 + ["B"] * 60, dtype=object)
    pcs = annotation.expression_pcs(counts, "counts")
    assert pcs.shape == (n, 50) and np.isfinite(pcs).all()
    assert counts.X.max() > 20, "the caller's matrix is not normalised in place"
    clusters, resolution = annotation.over_cluster(pcs, 0, annotation.expression_graph(counts, "counts", 0))
    assert resolution == 5 and len(set(clusters)) > 2
    for cluster in set(clusters):
        assert len(set(truth[clusters == cluster])) == 1
    calls = truth.copy()
    calls[::7] = np.where(truth[::7] == "A", "B", "A")  # one call in seven wrong, and less sure
    confidence = np.where(calls == truth, 0.9, 0.4)
    voted = annotation.majority_vote(clusters, calls, confidence)
    assert (calls != truth).sum() == 18 and (voted == truth).all()


def test_checkpoint_hash_follows_the_weights():
    model = PerformerLM(get_config("tiny", gene_num=20))
    state = model.state_dict()
    assert annotation.checkpoint_hash(state) == annotation.checkpoint_hash(dict(reversed(list(state.items()))))
    changed = {**state, "norm.bias": state["norm.bias"] + 1e-3}
    assert annotation.checkpoint_hash(changed) != annotation.checkpoint_hash(state)


# --------------------------------------------------------------------------------------------------
# evaluate.py runs


def test_knn_with_classifier_and_majority_voting(tmp_path, files):
    out = tmp_path / "out"
    metrics = run_evaluate("--model_path", str(files["finetuned"]), "--data_path", str(files["query"]),
                           "--reference", str(files["reference"]), "--majority_voting", "--novel_type",
                           "--unassign_thres", "0.4", "--output_dir", str(out), "--importance_cells", "4",
                           "--top_genes", "5")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["predictions.h5ad", "predictions.csv", "metrics.json", "confusion_matrix.png", "umap.png",
         "gene_importance.csv", "gene_overlap.csv"])
    pred = anndata.read_h5ad(out / "predictions.h5ad")
    reference_types = sorted(set(anndata.read_h5ad(files["reference"]).obs["celltype"].astype(str)))
    assert list(pred.uns["scbert_classes"]) == reference_types
    shares = pred.obsm["scbert_probabilities"]
    assert shares.shape == (pred.n_obs, len(reference_types)) and ((shares >= 0) & (shares <= 1 + 1e-6)).all()
    np.testing.assert_allclose(shares.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(pred.obs["scbert_confidence"], shares.max(axis=1), rtol=1e-6)
    labels = pred.obs["scbert_label"].astype(str).to_numpy()
    assert set(labels) <= set(reference_types) | {UNASSIGNED}
    confident = shares.max(axis=1) >= 0.4
    np.testing.assert_array_equal(labels[confident & (labels != UNASSIGNED)],
                                  np.asarray(reference_types)[shares.argmax(axis=1)][confident & (labels != UNASSIGNED)])
    assert (labels[~confident] == UNASSIGNED).all()
    assert metrics["n_unassigned"] == int((labels == UNASSIGNED).sum()) == \
        metrics["knn"]["n_unassigned_low_share"] + metrics["knn"]["n_unassigned_far"]
    # the classifier's own call beside the kNN's
    classifier = pred.obs["scbert_classifier_label"].astype(str).to_numpy()
    probs = pred.obsm["scbert_classifier_probabilities"]
    sure = probs.max(axis=1) >= 0.4
    np.testing.assert_array_equal(classifier[sure], np.asarray(files["classes"])[probs.argmax(axis=1)][sure])
    assert metrics["classifier"]["accuracy"] is not None and metrics["mode"] == "kNN"
    # over-clusters cover every cell; the majority label is constant within a cluster and is its commonest call
    clusters = pred.obs["scbert_over_clustering"].astype(str).to_numpy()
    voted = pred.obs["scbert_majority_voting"].astype(str).to_numpy()
    assert pred.obs["scbert_over_clustering"].notna().all()
    for cluster in set(clusters):
        members = clusters == cluster
        assert len(set(voted[members])) == 1
        counts = pd.Series(labels[members]).value_counts()
        assert voted[members][0] in set(counts.index[counts == counts.max()])
    mv = metrics["majority_voting"]
    assert mv["n_clusters"] == len(set(clusters)) and mv["resolution"] == 5 and mv["over_clustering"] == "expression"
    truth = pred.obs["celltype"].astype(str).to_numpy()
    assert mv["accuracy"] == pytest.approx(np.mean(voted == truth))
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == truth))
    assert pred.obsm["X_scbert_encoder"].shape == (pred.n_obs, 16) and pred.obsm["X_scbert"].shape[1] == 128
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["scbert_label"]) == list(labels) and list(table["scbert_majority_voting"]) == list(voted)
    assert list(table["scbert_classifier_label"]) == list(classifier)
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_pretrained_checkpoint_transfers_labels_and_reuses_an_embedded_reference(tmp_path, files):
    common = ["--model_path", str(files["pretrained"]), "--no-umap", "--no-gene_importance"]
    embedded = run_evaluate(*common, "--data_path", str(files["reference"]), "--output_dir", str(tmp_path / "ref"))
    assert embedded["mode"] == "embedding"
    first = run_evaluate(*common, "--data_path", str(files["query"]), "--reference", str(files["reference"]),
                         "--output_dir", str(tmp_path / "a"), "--majority_voting", "--over_clustering", "embedding")
    again = run_evaluate(*common, "--data_path", str(files["query"]), "--output_dir", str(tmp_path / "b"),
                         "--reference", str(tmp_path / "ref" / "predictions.h5ad"))
    assert first["knn"]["reference_embedding"] == "embedded in this run"
    assert again["knn"]["reference_embedding"] == "read from the reference file"
    a = pd.read_csv(tmp_path / "a" / "predictions.csv")
    b = pd.read_csv(tmp_path / "b" / "predictions.csv")
    pd.testing.assert_frame_equal(a.drop(columns=["scbert_over_clustering", "scbert_majority_voting"]), b)
    assert first["majority_voting"]["over_clustering"] == "embedding"
    for cluster, calls in a.groupby("scbert_over_clustering")["scbert_majority_voting"]:
        assert calls.nunique() == 1
    assert "scbert_classifier_label" not in a.columns and first["mode"] == "kNN"
    assert first["accuracy"] > 0.3, "the encoder embedding should carry some of the cell type"
    # another checkpoint's predictions.h5ad is embedded again, not trusted
    other = run_evaluate("--model_path", str(files["finetuned"]), "--data_path", str(files["query"]),
                         "--reference", str(tmp_path / "ref" / "predictions.h5ad"), "--no-umap",
                         "--no-gene_importance", "--output_dir", str(tmp_path / "c"))
    assert other["knn"]["reference_embedding"] == "embedded in this run"


def one_line_error(capsys, out, *argv) -> str:
    """evaluate.py's entry as the command line runs it: exit 2, one `error: ...; ...` line, no output."""
    err = run_in_process(evaluate, [*argv, "--output_dir", str(out)], capsys)
    assert not out.exists()
    return err


def test_reference_mistakes_end_with_one_line(tmp_path, files, default_data, capsys):
    model = ["--model_path", str(files["pretrained"]), "--data_path", str(files["query"])]
    err = one_line_error(capsys, tmp_path / "o1", *model, "--reference", str(files["reference"]), "--reference_label_key", "type")
    assert "no obs column 'type'" in err and "--reference_label_key" in err

    def other_genes(sub):
        sub.var_names = [f"X{i}" for i in range(sub.n_vars)]

    foreign = small_copy(default_data, 20, tmp_path / "foreign.h5ad", other_genes)
    err = one_line_error(capsys, tmp_path / "o2", *model, "--reference", str(foreign))
    assert "the reference" in err and "0 of 765 panel genes" in err
    err = one_line_error(capsys, tmp_path / "o4", *model, "--reference", str(tmp_path / "missing.h5ad"))
    assert err.startswith("error: --reference") and "does not exist" in err
    err = one_line_error(capsys, tmp_path / "o3", *model, "--majority_voting")
    assert "--majority_voting" in err and "--reference" in err
