"""Annotate cells with a scBERT checkpoint (fine-tuned or only pretrained) and report how well it did.

    python evaluate.py                                   # ckpts/finetune_best.pth on its held-out test cells
    python evaluate.py --data_path new.h5ad --novel_type # annotate other data; low-confidence cells -> Unassigned
    python evaluate.py --baseline                        # + L1 logistic regression on the same split
    python evaluate.py --model_path ckpts/pretrain.pth --data_path cells.h5ad   # encoder embeddings + UMAP
    python evaluate.py --model_path ckpts/pretrain.pth --data_path query.h5ad --reference ref.h5ad
                                                         # kNN label transfer from a labelled reference
    python evaluate.py --data_path new.h5ad --majority_voting   # + majority vote over an over-clustering

Writes into --output_dir (all files or none): predictions.h5ad (the scored cells with
obsm['X_scbert_encoder'] and, where the cells get calls, obs['scbert_label'], obs['scbert_confidence'],
obsm['scbert_probabilities'] and uns['scbert_classes']; obsm['X_scbert'] from a classifier head),
predictions.csv, metrics.json, confusion_matrix.png (with labels), umap.png, gene_importance.csv (with a
classifier head) and gene_overlap.csv.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

import annotation
import ensemble
import report_utils
import utils
from model import PerformerLM
from report_utils import UNASSIGNED

logger = logging.getLogger("scbert")

DEFAULT_MODEL = Path("ckpts") / "finetune_best.pth"
DEFAULT_ENSEMBLE = Path("ckpts") / "ensemble.pth"  # finetune.py --folds K
OUTPUT_FILES = ("predictions.h5ad", "predictions.csv", "metrics.json", "confusion_matrix.png", "umap.png",
                "gene_importance.csv", "gene_overlap.csv")


# --------------------------------------------------------------------------------------------------
# what the checkpoint brings


def checkpoint_classes(ckpt: dict[str, Any], n_outputs: int, label_names_path: str | None) -> list[str]:
    if label_names_path:
        path = Path(label_names_path)
        if not path.is_file():
            raise utils.InputError(f"label names file {path} does not exist; pass --label_names with a text file, "
                                   f"one cell type per line")
        names, source = [s.strip() for s in path.read_text().splitlines() if s.strip()], str(path)
    elif ckpt.get("label_names"):
        names, source = [str(s) for s in ckpt["label_names"]], "the checkpoint's label names"
    else:
        logger.info(f"note: the checkpoint carries no cell-type names; calling them class_0..class_{n_outputs - 1} "
              f"(pass --label_names to name them)")
        return [f"class_{i}" for i in range(n_outputs)]
    if len(names) != n_outputs:
        raise utils.InputError(f"{source} lists {len(names)} cell types but the model's classifier has {n_outputs} "
                               f"outputs; pass the label names this model was fine-tuned with (--label_names), "
                               f"or the checkpoint that goes with them")
    if len(set(names)) != len(names) or UNASSIGNED in names:
        raise utils.InputError(f"{source} repeats a cell type or uses the reserved name '{UNASSIGNED}'; "
                               f"give each output a distinct name")
    return names


def checkpoint_panel(ckpt: dict[str, Any], gene_num: int, panel_path: str | None) -> list[str]:
    if panel_path:
        panel, source = utils.load_gene_panel(panel_path), f"--gene_panel {panel_path}"
    elif ckpt.get("gene_panel"):
        panel, source = [str(g) for g in ckpt["gene_panel"]], "the checkpoint's gene panel"
    else:
        raise utils.InputError("the checkpoint carries no gene panel (published scBERT files do not); pass "
                               "--gene_panel with the model's genes, one per line, in model order")
    if len(panel) != gene_num:
        raise utils.InputError(f"{source} has {len(panel)} genes but the model was built for {gene_num}; "
                               f"pass the panel this model was trained with (--gene_panel)")
    return panel


def scored_cells(adata: Any, ckpt: dict[str, Any], all_cells: bool) -> tuple[np.ndarray, bool, str]:
    """(rows to score, whether the data is the fine-tuning data, a description)."""
    same_data = ckpt.get("data_fingerprint") is not None and ckpt["data_fingerprint"] == utils.data_fingerprint(adata)
    splits = ckpt.get("splits") or {}
    if not same_data:
        return np.arange(adata.n_obs), False, "all cells (not the data the model was fine-tuned on)"
    for part, rows in splits.items():
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= adata.n_obs):
            raise utils.InputError(f"the checkpoint's {part} split names cells beyond the {adata.n_obs} cells of the "
                                   f"data; the checkpoint does not belong to this data file: re-run finetune.py")
    if all_cells:
        return np.arange(adata.n_obs), True, "all cells of the fine-tuning data (--all_cells: includes training cells)"
    if "test" not in splits:
        logger.info("note: the checkpoint records no held-out test cells; scoring all cells")
        return np.arange(adata.n_obs), True, "all cells (the checkpoint records no test split)"
    test = np.sort(np.asarray(splits["test"], dtype=np.int64))
    if len(test) == 0:
        raise utils.InputError("the checkpoint's held-out test split is empty (fine-tuned with --test_size 0); "
                               "pass --all_cells to score every cell")
    return test, True, "held-out test cells of the fine-tuning data"


def true_labels(adata: Any, label_key: str, explicit: bool) -> np.ndarray | None:
    """Labels as strings (None where missing), or None without the column: an error when the user
    named it (--label_key), since a misspelt column would silently cost the scores."""
    labels = utils.read_labels(adata, label_key)
    if labels is None and explicit:
        raise utils.InputError(f"--label_key {label_key!r}: the data's obs has no such column (it has: "
                               f"{utils.obs_columns(adata)}); pass the column with the true types, or leave "
                               f"--label_key off to annotate without scores")
    return labels


# --------------------------------------------------------------------------------------------------
# the steps: load, align, predict, score, report, write


class Loaded(NamedTuple):
    """The model (eval mode, on its device) and what its checkpoint brings."""
    model: PerformerLM
    ckpt: dict[str, Any]
    classes: list[str] | None  # cell-type names in the order of the classifier's outputs; None: no classifier
    panel: list[str]           # genes, in model order
    weights_hash: str          # annotation.checkpoint_hash of its weights
    other_members: tuple = ()  # an ensemble's members after the first (`model`), whose probabilities are averaged


def load_model(model_path: str, label_names_path: str | None, panel_path: str | None,
               device: torch.device) -> Loaded:
    """The checkpoint's model, or of an ensemble file (finetune.py --folds) its first member as
    `model` and the others in `other_members`; the ensemble file's fields (splits, panel, labels)."""
    path = Path(model_path)
    ckpt = utils.read_checkpoint(path, allow_ensemble=True) if path.is_file() else None
    others: tuple = ()
    if ckpt is not None and ensemble.is_ensemble(ckpt):
        members = ensemble.load_members(path, ckpt)
        model, others = members[0][0], tuple(m.to(device).eval() for m, _ in members[1:])
        logger.info(f"ensemble of {len(members)} fold models ({', '.join(ckpt[ensemble.ENSEMBLE_KEY])}): their "
                    f"probabilities are averaged; embeddings and gene importance come from the first")
    else:
        ckpt = ckpt if ckpt is not None else utils.read_checkpoint(path)
        model = utils.build_model_from_checkpoint(ckpt, path)
    classes = None
    if model.head_kind == "classifier":
        classes = checkpoint_classes(ckpt, model.to_out.n_classes, label_names_path)
    panel = checkpoint_panel(ckpt, model.config.gene_num, panel_path)
    weights_hash = annotation.checkpoint_hash(model.state_dict())
    return Loaded(model.to(device).eval(), ckpt, classes, panel, weights_hash, others)


def ensemble_logits(loaded: Loaded, first: np.ndarray, dataset: utils.TokenDataset, batch_size: int,
                    ctx: utils.DistContext, precision: utils.Precision,
                    num_workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The log of the members' averaged probabilities (the first member's logits given), and per cell
    the share of members whose own top class is the ensemble's."""
    logits = [first]
    for k, member in enumerate(loaded.other_members, start=2):
        started = time.time()
        logits.append(utils.predict(member, dataset, batch_size, ctx, precision, num_workers).logits)
        logger.info(f"ensemble member {k} of {len(loaded.other_members) + 1}: {time.time() - started:.1f} s")
    return ensemble.mean_log_probabilities(logits).astype(np.float32), ensemble.fold_agreement(logits)


def agreement_report(agreement: np.ndarray, labels: np.ndarray, truth: np.ndarray | None, classes: Sequence[str],
                     n_members: int, calls: str = "ensemble") -> dict[str, Any]:
    """metrics.json's fold_agreement: how many cells every fold model calls alike, and with labels the
    accuracy of the ensemble classifier's calls (`labels`) where they all agree and where they split,
    over the cells whose true type is one of the classes (as `accuracy` counts them). `calls` says
    whose calls the accuracies are of: the ensemble's, or beside kNN calls the ensemble classifier's."""
    agree = agreement >= 1.0 - 1e-9
    out: dict[str, Any] = {"n_members": int(n_members), "calls": calls, "n_cells_all_agree": int(agree.sum()),
                           "n_cells_split": int((~agree).sum()), "accuracy_all_agree": None, "accuracy_split": None}
    line = (f"fold agreement: the {n_members} fold models call the same type for {int(agree.sum())} of "
            f"{len(agree)} cells; {int((~agree).sum())} split (obs['scbert_fold_agreement'] < 1)")
    labelled = None if truth is None else (np.array([t is not None for t in truth], dtype=bool)
                                           & np.isin(np.asarray(truth, dtype=object).astype(str),
                                                     [str(c) for c in classes]))
    if labelled is not None and labelled.any():
        right = labels.astype(str) == np.where(labelled, truth, "").astype(str)
        parts = []
        for key, part in (("accuracy_all_agree", agree & labelled), ("accuracy_split", ~agree & labelled)):
            if part.any():
                out[key] = float(right[part].mean())
                parts.append(f"{out[key]:.3f} on {int(part.sum())}")
        line += (f"; accuracy {'of the classifier ' if calls != 'ensemble' else ''}where they agree / split: "
                 f"{' / '.join(parts)} labelled cells")
    logger.info(line)
    return out


class Cells(NamedTuple):
    """The data to annotate, on the model's panel, and which of its cells are scored."""
    adata: Any               # as read
    aligned: Any             # on the model's gene panel, in the input format of its training cells
    input_format: str        # aligned's (the model's where it records one)
    rows: np.ndarray         # the scored cells (rows of adata)
    same_data: bool          # the data the checkpoint was fine-tuned on
    scope: str               # which cells, in words
    overlap: dict[str, Any]  # panel genes found in the data
    name: str                # the data, in words
    data_format: str         # adata's own input format


def align_cells(data_path: str | None, ckpt: dict[str, Any], panel: list[str], input_format: str,
                all_cells: bool, gene_map: utils.GeneMap | None, soma: utils.SomaOptions) -> Cells:
    """Reads the data (default: the checkpoint's, with its SOMA options), picks the cells to score and
    aligns them to the panel."""
    path = data_path if data_path is not None else ckpt.get("data_path")
    if data_path is None and path is not None:
        saved = ckpt.get("args") or {}
        soma = utils.SomaOptions(saved.get("soma_measurement", soma.measurement), saved.get("soma_layer"),
                                 saved.get("obs_filter"))
        if not any(c in str(path) for c in "*?[") and "://" not in str(path) and not Path(path).exists():
            raise utils.InputError(f"the checkpoint was trained on {path}, which does not exist here; "
                                   f"pass --data_path with the data to annotate")
    name = path or f"the default data ({utils.DEFAULT_DATA_NAME})"
    adata = utils.open_cells(path, soma)
    input_format = utils.detect_input_format(adata, input_format)
    rows, same_data, scope = scored_cells(adata, ckpt, all_cells)
    if len(rows) == 0:
        raise utils.InputError(f"{name} holds no cells to annotate; pass a non-empty dataset")
    aligned = utils.align_to_panel(adata, panel, input_format=input_format, gene_map=gene_map,
                                   model_format=ckpt.get("input_format"))
    overlap = dict(aligned.uns["scbert_panel_overlap"])
    logger.info(f"data: {name}, {adata.n_obs} cells x {adata.n_vars} genes ({input_format}); "
                f"{overlap['found']} of {overlap['total']} panel genes found ({overlap['found'] / overlap['total']:.1%}), "
                f"{overlap['count_share']:.1%} of the counts")
    return Cells(adata, aligned, aligned.uns["scbert_input_format"], rows, same_data, scope, overlap, str(name),
                 input_format)


def note_sparse_cells(cells: Cells, panel: list[str]) -> None:
    if len(panel) >= 10000:  # the published >= 200 expressed genes rule was made for a 16,906-gene panel
        low = int((utils.expressed_genes_of(cells.aligned, cells.rows) < 200).sum())
        if low:
            logger.info(f"note: {low} of {len(cells.rows)} cells have fewer than 200 expressed panel genes (the "
                        f"published quality filter); they are annotated, but less reliably")


class Reference(NamedTuple):
    """The labelled cells that --reference brings, embedded or ready to be."""
    name: str
    label_key: str
    labels: np.ndarray                   # their types (labelled cells only)
    cell_names: np.ndarray               # their obs names
    embedding: np.ndarray | None         # (cells, dim), read from a predictions.h5ad of this checkpoint
    dataset: utils.TokenDataset | None   # else the cells to embed, on the model's panel


def read_reference(path: str, label_key: str, loaded: Loaded, input_format: str,
                   gene_map: utils.GeneMap | None) -> Reference:
    """The reference's labelled cells, checked before any cell is embedded. A predictions.h5ad that
    this checkpoint wrote (the same weights hash and pooling in its uns) brings its embedding along."""
    if not Path(path).exists():
        raise utils.InputError(f"--reference {path} does not exist; pass a file of labelled cells (any format "
                               f"--data_path takes) or a predictions.h5ad that evaluate.py wrote")
    adata = utils.read_dataset(path, backed=True)
    labels = utils.read_labels(adata, label_key)
    if labels is None:
        raise utils.InputError(f"the reference {path} has no obs column '{label_key}' (it has: "
                               f"{utils.obs_columns(adata)}); pass --reference_label_key with the column "
                               f"holding its cell types")
    rows = np.flatnonzero([label is not None for label in labels])
    if len(rows) == 0:
        raise utils.InputError(f"the reference {path} has no labels in obs['{label_key}']; label its cells or "
                               f"pass --reference_label_key with another column")
    if len(rows) < adata.n_obs:
        logger.info(f"note: {adata.n_obs - len(rows)} reference cells without a label in obs['{label_key}'] "
                    f"are left out")
    names = np.asarray(adata.obs_names[rows], dtype=str)
    info = adata.uns.get("scbert", {}) if adata.uns is not None else {}
    if "X_scbert_encoder" in adata.obsm and info.get("checkpoint_hash") == loaded.weights_hash \
            and info.get("encoder_pooling") == annotation.POOLING:
        logger.info(f"reference: {path}, {len(rows)} labelled cells, embedded by this checkpoint before "
                    f"(its obsm['X_scbert_encoder'])")
        return Reference(path, label_key, labels[rows], names, np.asarray(adata.obsm["X_scbert_encoder"])[rows], None)
    if "X_scbert_encoder" in adata.obsm:
        logger.info(f"note: {path} holds embeddings of another checkpoint (or pooling); embedding its cells again")
    try:
        model_format = loaded.ckpt.get("input_format")
        data_format = utils.detect_input_format(adata, input_format)
        if model_format is not None and data_format != model_format:  # rescaled in memory, as align_cells does
            adata = utils.align_to_panel(adata.to_memory() if adata.isbacked else adata, loaded.panel,
                                         input_format=data_format, gene_map=gene_map, model_format=model_format)
            data_format, gene_map = model_format, None  # on the panel already
        dataset = utils.TokenDataset(adata, data_format, loaded.model.config.bin_num, indices=rows,
                                     panel=loaded.panel, gene_map=gene_map)
    except utils.InputError as err:
        raise utils.InputError(f"the reference {path}: {err}") from None
    logger.info(f"reference: {path}, {len(rows)} labelled cells of {len(set(labels[rows]))} types in "
                f"obs['{label_key}'], to embed")
    return Reference(path, label_key, labels[rows], names, None, dataset)


class Embedded(NamedTuple):
    """What one pass of the model gives for each scored cell."""
    encoder: np.ndarray        # (cells, dim): the pooled encoder output, obsm['X_scbert_encoder']
    logits: np.ndarray | None  # (cells, classes) with a classifier head
    head: np.ndarray | None    # (cells, 128): the classifier head's embedding, obsm['X_scbert']
    seconds: float
    agreement: np.ndarray | None = None  # of an ensemble: the share of folds whose top class is the ensemble's


def embed(model: PerformerLM, dataset: utils.TokenDataset, batch_size: int, ctx: utils.DistContext,
          precision: utils.Precision, num_workers: int, what: str) -> Embedded:
    started = time.time()
    out = utils.predict(model, dataset, batch_size, ctx, precision, num_workers, show_progress=True,
                        pool=annotation.pooling())
    seconds = time.time() - started
    logger.info(f"embedded {len(dataset)} {what} in {seconds:.1f} s ({len(dataset) / max(seconds, 1e-9):.0f} cells/s)")
    return Embedded(out.encoder, out.logits, out.embeddings, seconds)


class Calls(NamedTuple):
    """One method's cell-type calls for the scored cells."""
    method: str                # "classifier" or "kNN"
    classes: list[str]         # the classifier's outputs, or the reference's types
    probabilities: np.ndarray  # (cells, classes): the classifier's softmax, or the kNN vote shares
    labels: np.ndarray         # the called names (Unassigned under --novel_type)
    confidence: np.ndarray     # the top probability / vote share
    threshold: float | None    # --unassign_thres with --novel_type
    details: dict[str, Any]    # for metrics.json


def classifier_calls(logits: np.ndarray, classes: list[str], threshold: float | None) -> Calls:
    probabilities = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
    labels = report_utils.assign_labels(probabilities, classes, threshold)
    if threshold:
        logger.info(f"classifier: {int((labels == UNASSIGNED).sum())} Unassigned (confidence < {threshold})")
    return Calls("classifier", classes, probabilities, labels, probabilities.max(axis=1), threshold, {})


def knn_calls(reference: Reference, reference_embedding: np.ndarray, query: np.ndarray, k: int,
              threshold: float | None, seed: int) -> Calls:
    transfer = annotation.knn_transfer(reference_embedding, reference.labels, query, k, threshold, seed)
    details = {"reference": reference.name, "reference_label_key": reference.label_key,
               "reference_cells": int(len(reference.labels)), "k": int(min(k, len(reference.labels))),
               "reference_embedding": "read from the reference file" if reference.embedding is not None
               else "embedded in this run", "pooling": annotation.POOLING,
               "novelty_percentile": annotation.NOVELTY_PERCENTILE if threshold is not None else None,
               "novelty_radius": transfer.novelty_radius if threshold is not None else None,
               "n_unassigned_low_share": transfer.n_low_share, "n_unassigned_far": transfer.n_far}
    if threshold is not None:
        logger.info(f"kNN: {transfer.n_low_share} Unassigned for a vote share < {threshold}, {transfer.n_far} for "
                    f"lying farther than {transfer.novelty_radius:.4f} (the reference's own k-th neighbour "
                    f"distances at the {annotation.NOVELTY_PERCENTILE:g}th percentile)")
    return Calls("kNN", transfer.classes, transfer.shares, transfer.labels, transfer.confidence, threshold, details)


class Voting(NamedTuple):
    """--majority_voting: the over-clustering and each cluster's commonest call."""
    clusters: np.ndarray
    labels: np.ndarray
    resolution: float
    space: str               # --over_clustering: "expression" or "embedding"


def vote(calls: Calls, cells: Cells, encoder: np.ndarray, encoder_graph: Any, space: str, seed: int) -> Voting:
    """Over-clusters the scored cells in their expression (CellTypist's way) or in the encoder
    embedding (its neighbour graph, shared with the UMAP), and votes within each cluster."""
    started = time.time()
    graph = encoder_graph
    if space == "expression" and len(cells.rows) >= 5:
        graph = annotation.expression_graph(cells.adata[cells.rows], cells.data_format, seed)
    clusters, resolution = annotation.over_cluster(encoder, seed, graph)
    labels = annotation.majority_vote(clusters, calls.labels, calls.confidence)
    logger.info(f"majority voting: {len(set(clusters))} clusters (Leiden on the {space} graph, resolution "
                f"{resolution:g}), {int((labels != calls.labels).sum())} of {len(labels)} calls changed "
                f"({time.time() - started:.1f} s)")
    return Voting(clusters, labels, resolution, space)


def run_baseline(aligned: Any, input_format: str, truth: np.ndarray, splits: dict[str, Any], rows: np.ndarray,
                 classes: list[str], seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The L1 logistic regression trained on the checkpoint's labelled training cells: its predictions
    for the scored cells and its scores (on those with a label)."""
    train = np.asarray(splits.get("train", []), dtype=np.int64)
    train = train[np.array([truth[i] is not None for i in train], dtype=bool)] if len(train) else train
    if len(train) == 0:
        raise utils.InputError("--baseline needs the checkpoint's training cells, and it records none; fine-tune "
                               "with finetune.py (which stores its splits) first")
    valid = np.asarray(splits.get("valid", []), dtype=np.int64)
    valid = valid[np.array([truth[i] is not None for i in valid], dtype=bool)] if len(valid) else valid
    X = utils.log_normalised(aligned.X, input_format)  # ln(1 + CP10k) over the panel genes, as the tokens see them
    y = np.asarray(truth, dtype=object)
    predicted, info = report_utils.logistic_baseline(
        X[train], y[train].astype(str), X[rows], X[valid] if len(valid) else None,
        y[valid].astype(str) if len(valid) else None, seed=seed)
    labelled = np.array([t is not None for t in y[rows]], dtype=bool)
    scores = report_utils.classification_metrics(y[rows][labelled], predicted[labelled], classes)
    return predicted, {**info, **{k: scores[k] for k in ("accuracy", "macro_f1", "weighted_f1", "per_class")}}


SCORE_KEYS = ("accuracy", "macro_f1", "weighted_f1", "per_class", "n_known_label_cells", "n_unassigned_known_label",
              "unknown_labels", "novel_detection")


def call_scores(labels: np.ndarray, truth: np.ndarray | None, classes: list[str], title: str) -> dict[str, Any]:
    """The scores of one set of calls on the cells with a true label (None scores without any)."""
    labelled = None if truth is None else np.array([t is not None for t in truth], dtype=bool)
    if labelled is None or not labelled.any():
        return {"accuracy": None, "macro_f1": None, "weighted_f1": None, "per_class": {}, "unknown_labels": {}}
    scores = report_utils.classification_metrics(truth[labelled], labels[labelled], classes)
    logger.info(f"{title}: accuracy {fmt(scores['accuracy'])}, macro-F1 {fmt(scores['macro_f1'])}, weighted F1 "
                f"{fmt(scores['weighted_f1'])} on {scores['n_known_label_cells']} cells with known types")
    out = {k: scores[k] for k in SCORE_KEYS}
    out["n_labelled_cells"] = int(labelled.sum())
    return out


def score(calls: Calls | None, classifier: Calls | None, voting: Voting | None, truth: np.ndarray | None,
          label_key: str, cells: Cells, loaded: Loaded, model_path: str, amp: str, seconds: float) -> dict[str, Any]:
    """metrics.json: what was scored and how, and with labels the scores of the labelled cells: of the
    final calls, of the classifier's beside the kNN's, and after majority voting."""
    n = len(cells.rows)
    mode = "embedding" if calls is None else calls.method
    metrics: dict[str, Any] = {
        "model_path": str(model_path), "data": cells.name, "scored_cells": cells.scope, "mode": mode,
        "n_cells": int(n), "n_unassigned": int((calls.labels == UNASSIGNED).sum()) if calls is not None else 0,
        "unassign_thres": calls.threshold if calls is not None else None,
        "classes": calls.classes if calls is not None else [],
        "label_key": label_key if truth is not None else None, "panel_overlap": cells.overlap,
        "input_format": cells.data_format, "tokenised_as": cells.input_format, "amp": amp,
        "inference_seconds": round(seconds, 3),
        "cells_per_second": round(n / max(seconds, 1e-9), 1),
        "checkpoint_hash": loaded.weights_hash, "encoder_pooling": annotation.POOLING,
    }
    if calls is None:
        metrics.update(accuracy=None, macro_f1=None, weighted_f1=None, per_class={}, unknown_labels={})
        return metrics
    if truth is not None and not any(t is not None for t in truth):
        logger.info(f"note: column '{label_key}' has no labels for the scored cells; annotating without scores")
    metrics.update(call_scores(calls.labels, truth, calls.classes,
                               "scBERT" if calls.method == "classifier" else "scBERT kNN transfer"))
    for name, info in metrics.get("unknown_labels", {}).items():
        logger.info(f"  type unknown to the model: {name}: {info['n_cells']} cells, {info['n_unassigned']} Unassigned")
    if calls.method == "kNN":
        metrics["knn"] = calls.details
    if classifier is not None and classifier is not calls:
        metrics["classifier"] = {"classes": classifier.classes,
                                 **call_scores(classifier.labels, truth, classifier.classes, "scBERT classifier")}
    if voting is not None:
        metrics["majority_voting"] = {
            "over_clustering": voting.space, "resolution": voting.resolution,
            "n_clusters": int(len(set(voting.clusters))),
            "n_changed": int((voting.labels != calls.labels).sum()),
            "n_unassigned": int((voting.labels == UNASSIGNED).sum()),
            **call_scores(voting.labels, truth, calls.classes, "after majority voting")}
    return metrics


def explain(model: PerformerLM, dataset: utils.TokenDataset, classifier: Calls | None, encoder: np.ndarray,
            graph: Any, panel: list[str], precision: utils.Precision, gene_importance: bool, umap: bool,
            top_genes: int, importance_cells: int, batch_size: int,
            seed: int) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """The report beyond the scores: top genes per type the classifier predicts, and UMAP
    coordinates of the encoder embedding."""
    importance = None
    if gene_importance and classifier is None:
        logger.info("note: the checkpoint has no classifier head; gene importance is skipped")
    elif gene_importance:
        started = time.time()
        importance = report_utils.gene_importance(
            model, dataset, classifier.labels, classifier.classes, panel, precision.device, top_n=top_genes,
            max_cells=importance_cells, batch_size=min(batch_size, 16), seed=seed, show_progress=True,
            autocast=precision.autocast)
        logger.info(f"gene importance: {importance['cell_type'].nunique()} cell types in {time.time() - started:.1f} s")
    coordinates = None
    if umap:
        coordinates = report_utils.umap_coordinates(encoder, seed=seed, graph=graph)
        if coordinates is None:
            logger.info("note: too few cells for a UMAP; umap.png is not written")
    return importance, coordinates


def annotated_data(cells: Cells, embedded: Embedded, calls: Calls | None, classifier: Calls | None,
                   voting: Voting | None, coordinates: np.ndarray | None, model_path: str,
                   weights_hash: str) -> Any:
    """predictions.h5ad: the scored cells with their embeddings and, where made, the calls (of a
    streamed source: its obs alone, no X)."""
    scored = utils.cells_for_output(cells.adata, cells.rows)

    def categorical(labels: np.ndarray, c: Calls) -> pd.Categorical:
        return pd.Categorical(labels.astype(str), categories=c.classes + ([UNASSIGNED] if c.threshold is not None else []))

    if calls is not None:
        scored.obs["scbert_label"] = categorical(calls.labels, calls)
        scored.obs["scbert_confidence"] = calls.confidence.astype(np.float32)
        scored.obsm["scbert_probabilities"] = calls.probabilities.astype(np.float32)
    if classifier is not None and classifier is not calls:
        scored.obs["scbert_classifier_label"] = categorical(classifier.labels, classifier)
        scored.obsm["scbert_classifier_probabilities"] = classifier.probabilities.astype(np.float32)
    if embedded.agreement is not None:
        scored.obs["scbert_fold_agreement"] = embedded.agreement.astype(np.float32)
    if voting is not None:
        clusters = voting.clusters.astype(str)
        scored.obs["scbert_over_clustering"] = pd.Categorical(
            clusters, categories=sorted(set(clusters), key=lambda c: (len(c), c)))
        scored.obs["scbert_majority_voting"] = categorical(voting.labels, calls)
    scored.obsm["X_scbert_encoder"] = embedded.encoder.astype(np.float32)
    if embedded.head is not None:
        scored.obsm["X_scbert"] = embedded.head.astype(np.float32)
    if coordinates is not None:
        scored.obsm["X_scbert_umap"] = coordinates.astype(np.float32)
    scored.strings_to_categoricals()  # what writing would do anyway, without anndata's message
    if calls is not None:
        scored.uns["scbert_classes"] = np.asarray(calls.classes, dtype=object)
    if classifier is not None and classifier is not calls:
        scored.uns["scbert_classifier_classes"] = np.asarray(classifier.classes, dtype=object)
    threshold = calls.threshold if calls is not None else None
    scored.uns["scbert"] = {"model_path": str(model_path), "scored_cells": cells.scope,
                            "mode": "embedding" if calls is None else calls.method,
                            "checkpoint_hash": weights_hash, "encoder_pooling": annotation.POOLING,
                            "unassign_thres": -1.0 if threshold is None else float(threshold),
                            "panel_genes_found": int(cells.overlap["found"]), "panel_genes": int(cells.overlap["total"])}
    return scored


def write_results(out_dir: Path, scored: Any, calls: Calls | None, classifier: Calls | None, voting: Voting | None,
                  truth: np.ndarray | None, label_key: str, metrics: dict[str, Any],
                  baseline_labels: np.ndarray | None, importance: pd.DataFrame | None,
                  coordinates: np.ndarray | None, overlap: pd.DataFrame) -> list[Path]:
    """Every output file at once (all or none), removing our earlier outputs this run does not make."""
    writers = {
        "predictions.h5ad": lambda path: scored.write_h5ad(path),
        "metrics.json": lambda path: report_utils.write_json(metrics, path),
        "gene_overlap.csv": lambda path: overlap.to_csv(path, index=False),
    }
    labelled = None if truth is None else np.array([t is not None for t in truth], dtype=bool)
    if calls is not None:
        table = pd.DataFrame({"cell_id": scored.obs_names.astype(str), "scbert_label": calls.labels.astype(str),
                              "scbert_confidence": calls.confidence})
        for j, name in enumerate(calls.classes):
            table[f"prob_{name}"] = calls.probabilities[:, j]
        if classifier is not None and classifier is not calls:
            table["scbert_classifier_label"] = classifier.labels.astype(str)
        if "scbert_fold_agreement" in scored.obs:
            table["scbert_fold_agreement"] = scored.obs["scbert_fold_agreement"].to_numpy()
        if voting is not None:
            table["scbert_over_clustering"] = voting.clusters.astype(str)
            table["scbert_majority_voting"] = voting.labels.astype(str)
        if truth is not None:
            table["true_label"] = truth
        if baseline_labels is not None:
            table["baseline_label"] = baseline_labels
        writers["predictions.csv"] = lambda path: table.to_csv(path, index=False)
        if labelled is not None and labelled.any():
            writers["confusion_matrix.png"] = lambda path: report_utils.plot_confusion_matrix(
                truth[labelled], calls.labels[labelled], calls.classes, path,
                title=f"scBERT ({calls.method}) on {len(calls.labels)} cells")
    if coordinates is not None:
        colourings: dict[str, np.ndarray] = {}
        if calls is not None:
            colourings["scbert_label"] = calls.labels
        if voting is not None:
            colourings["scbert_majority_voting"] = voting.labels
        if labelled is not None and labelled.any():
            colourings[f"true ({label_key})"] = np.where(labelled, truth, "unlabelled")
        if not colourings:
            colourings["cells"] = np.full(len(coordinates), "cell", dtype=object)
        order = calls.classes if calls is not None else ()
        writers["umap.png"] = lambda path: report_utils.plot_umap(coordinates, colourings, path, order=order)
    if importance is not None:
        writers["gene_importance.csv"] = lambda path: importance.to_csv(path, index=False)
    return report_utils.write_outputs(out_dir, writers, stale=OUTPUT_FILES)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------


def check_flags(novel_type: bool, unassign_thres: float, batch_size: int | None, top_genes: int,
                importance_cells: int, knn_k: int) -> None:
    if novel_type and not 0.0 < unassign_thres <= 1.0:
        raise utils.InputError(f"--unassign_thres {unassign_thres} is not a probability in (0, 1]; use e.g. 0.5")
    if (batch_size is not None and batch_size < 1) or top_genes < 1 or importance_cells < 1 or knn_k < 1:
        raise utils.InputError("--batch_size, --top_genes, --importance_cells and --knn_k must be positive; give each a "
                               "number above 0")


def check_baseline_inputs(truth_all: np.ndarray | None, same_data: bool, label_key: str) -> None:
    if truth_all is None:
        raise utils.InputError(f"--baseline needs true labels to train on, and the data has no column '{label_key}'; "
                               f"pass --label_key with the obs column the model was fine-tuned on")
    if not same_data:
        raise utils.InputError("--baseline trains on the checkpoint's training cells, which exist only in the data it "
                               "was fine-tuned on; evaluate that data (omit --data_path), or drop --baseline")


def check_modes(loaded: Loaded, reference: str | None, majority_voting: bool, baseline: bool, model_path: str) -> None:
    if loaded.classes is not None or reference is not None:
        return
    if majority_voting:
        raise utils.InputError(f"--majority_voting votes over cell-type calls, and {model_path} has no classifier "
                               f"head to make them; pass --reference with labelled cells (kNN label transfer), or "
                               f"a fine-tuned checkpoint")
    if baseline:
        raise utils.InputError(f"--baseline is compared with a classifier, and {model_path} has none; fine-tune it "
                               f"first (python finetune.py --model_path {model_path}) or drop --baseline")


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    out_dir = utils.check_writable_dir(args.output_dir, "--output_dir", create=False)
    check_flags(args.novel_type, args.unassign_thres, args.batch_size, args.top_genes, args.importance_cells,
                args.knn_k)
    ctx = utils.setup_distributed(args.device)
    if ctx.distributed:
        raise utils.InputError("evaluate.py runs in one process; start it with python, not torchrun")
    batch_size = args.batch_size or (64 if ctx.device.type == "cuda" else 8)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed)

    # load, align, check the reference
    gene_map = utils.read_gene_map(args.gene_map)
    if args.model_path is None:
        args.model_path = str(DEFAULT_MODEL)
        if not DEFAULT_MODEL.exists() and DEFAULT_ENSEMBLE.exists():
            args.model_path = str(DEFAULT_ENSEMBLE)
            logger.info(f"no {DEFAULT_MODEL}: evaluating the fold ensemble {DEFAULT_ENSEMBLE}")
    loaded = load_model(args.model_path, args.label_names, args.gene_panel, ctx.device)
    check_modes(loaded, args.reference, args.majority_voting, args.baseline, args.model_path)
    config = loaded.model.config
    precision = utils.Precision(utils.resolve_amp(args.amp, ctx.device), ctx.device)
    cells = align_cells(args.data_path, loaded.ckpt, loaded.panel, args.input_format, args.all_cells, gene_map,
                        utils.SomaOptions(args.soma_measurement, args.soma_layer, args.obs_filter))
    head = f"{len(loaded.classes)} cell types" if loaded.classes is not None else "no classifier head"
    logger.info(f"model: {args.model_path} ({head}, {config.gene_num} genes, dim {config.dim}, depth "
                f"{config.depth}); scoring {len(cells.rows)} cells: {cells.scope}; precision {precision.mode} on "
                f"{ctx.device.type}")
    note_sparse_cells(cells, loaded.panel)
    label_key = args.label_key or loaded.ckpt.get("label_key") or "celltype"
    truth_all = true_labels(cells.adata, label_key, explicit=args.label_key is not None)
    if args.baseline:
        check_baseline_inputs(truth_all, cells.same_data, label_key)
        utils.require_in_memory(cells.aligned, "--baseline (it trains on the cells' whole expression matrix)")
    if args.majority_voting and args.over_clustering == "expression":
        utils.require_in_memory(cells.aligned, "--majority_voting over the cells' expression (the default "
                                "--over_clustering expression)", "pass --over_clustering embedding")
    reference = None
    if args.reference is not None:
        reference = read_reference(args.reference, args.reference_label_key, loaded, args.input_format, gene_map)
        shared = len(np.intersect1d(reference.cell_names, utils.obs_names_of(cells.adata, cells.rows)))
        if shared:
            logger.info(f"note: {shared} of the {len(cells.rows)} scored cells share their names with reference cells; "
                        f"if they are the same cells, each one's own label votes for it (scores are optimistic)")

    # embed, call
    threshold = args.unassign_thres if args.novel_type else None
    dataset = utils.token_dataset(cells.aligned, cells.input_format, config.bin_num, indices=cells.rows)
    embedded = embed(loaded.model, dataset, batch_size, ctx, precision, args.num_workers, "cells")
    if ensemble.is_ensemble(loaded.ckpt):  # of one member too
        logits, agreement = ensemble_logits(loaded, embedded.logits, dataset, batch_size, ctx, precision,
                                            args.num_workers)
        embedded = embedded._replace(logits=logits, agreement=agreement)
    classifier = classifier_calls(embedded.logits, loaded.classes, threshold) if loaded.classes is not None else None
    calls = classifier
    if reference is not None:
        reference_embedding = reference.embedding
        if reference_embedding is None:
            reference_embedding = embed(loaded.model, reference.dataset, batch_size, ctx, precision, args.num_workers,
                                        "reference cells").encoder
        calls = knn_calls(reference, reference_embedding, embedded.encoder, args.knn_k, threshold, args.seed)
    graph = None
    if (args.umap or (args.majority_voting and args.over_clustering == "embedding")) and len(cells.rows) >= 5:
        graph = report_utils.neighbour_graph(embedded.encoder, args.seed)
    voting = vote(calls, cells, embedded.encoder, graph, args.over_clustering, args.seed) \
        if args.majority_voting else None

    # score
    truth = None if truth_all is None else truth_all[cells.rows]
    metrics = score(calls, classifier, voting, truth, label_key, cells, loaded, args.model_path, precision.mode,
                    embedded.seconds)
    if ensemble.is_ensemble(loaded.ckpt):
        metrics["ensemble_members"] = [str(m) for m in loaded.ckpt[ensemble.ENSEMBLE_KEY]]
        metrics["fold_agreement"] = agreement_report(embedded.agreement, classifier.labels, truth, loaded.classes,
                                                     len(loaded.other_members) + 1,
                                                     "ensemble" if reference is None else "classifier")
    baseline_labels = None
    if args.baseline:
        baseline_labels, metrics["baseline"] = run_baseline(cells.aligned, cells.input_format, truth_all,
                                                            loaded.ckpt.get("splits") or {}, cells.rows,
                                                            loaded.classes, args.seed)
        logger.info(report_utils.comparison_table(
            {"scBERT": metrics, "L1 LogReg": metrics["baseline"]},
            [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted F1")]))

    # report, write
    importance, coordinates = explain(loaded.model, dataset, classifier, embedded.encoder, graph, loaded.panel,
                                      precision, args.gene_importance, args.umap, args.top_genes,
                                      args.importance_cells, batch_size, args.seed)
    scored = annotated_data(cells, embedded, calls, classifier, voting, coordinates, args.model_path,
                            loaded.weights_hash)
    written = write_results(out_dir, scored, calls, classifier, voting, truth, label_key, metrics, baseline_labels,
                            importance, coordinates, utils.overlap_table(cells.aligned))
    logger.info(f"wrote {', '.join(p.name for p in written)} to {out_dir} ({time.time() - started:.0f} s in all)")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("model and data")
    data.add_argument("--model_path", default=None, help="fine-tuned or pretrained checkpoint, or a fold "
                      f"ensemble (ensemble.pth); default {DEFAULT_MODEL}, else {DEFAULT_ENSEMBLE} when only that "
                      "exists; a pretrained one embeds, and with --reference labels, the cells")
    data.add_argument("--data_path", default=None, help=f"{utils.DATA_PATH_HELP}; default: the data the "
                      "checkpoint was fine-tuned on")
    utils.add_source_flags(data)
    data.add_argument("--label_key", default=None, help="obs column with true cell types, to score against "
                      "(optional; default: the checkpoint's label column, else 'celltype')")
    data.add_argument("--gene_panel", default=None, help="text file, one gene per line, in model order "
                      "(default: the checkpoint's panel)")
    data.add_argument("--label_names", default=None, help="text file, one cell type per line in the order of "
                      "the model's outputs, for a checkpoint that carries no label names")
    data.add_argument("--input_format", default="auto", choices=["auto", "counts", "log1p"])
    data.add_argument("--all_cells", action="store_true", help="on the fine-tuning data, score every cell "
                      "instead of the held-out test cells (training cells make the scores optimistic)")
    utils.add_gene_map_flag(data)
    ref = p.add_argument_group("label transfer and majority voting")
    ref.add_argument("--reference", default=None, help="labelled cells to transfer labels from (any data file, or "
                     "a predictions.h5ad this checkpoint wrote, whose embedding is reused): each cell takes a "
                     "distance-weighted vote of its --knn_k nearest reference cells (cosine, encoder embedding)")
    ref.add_argument("--reference_label_key", default="celltype", help="obs column of the reference with its cell "
                     "types (default celltype)")
    ref.add_argument("--knn_k", type=int, default=15, help="reference cells that vote for each cell (default 15)")
    ref.add_argument("--majority_voting", action="store_true", help="over-cluster the cells (Leiden, see "
                     "--over_clustering) and give each cluster its commonest call: obs['scbert_majority_voting']")
    ref.add_argument("--over_clustering", choices=annotation.OVER_CLUSTERINGS, default="expression",
                     help="what --majority_voting over-clusters: the cells' own expression (default, as CellTypist: "
                     "log-normalised, 2,000 most variable genes, scaled, 50 PCs, 10 neighbours) or the encoder "
                     "embedding's 15-neighbour cosine graph")
    pred = p.add_argument_group("predictions")
    pred.add_argument("--novel_type", action="store_true",
                      help="call cells whose top probability (kNN: vote share) is below --unassign_thres "
                           "'Unassigned'; with --reference also cells farther from it than its own cells' k-th "
                           "neighbours are at the 99th percentile")
    pred.add_argument("--unassign_thres", type=float, default=0.5,
                      help="confidence threshold for --novel_type (default 0.5)")
    pred.add_argument("--baseline", action="store_true", help="also train and score an L1-regularised logistic "
                      "regression on the checkpoint's training cells (needs the fine-tuning data and labels)")
    pred.add_argument("--umap", action=argparse.BooleanOptionalAction, default=True,
                      help="UMAP plot of the cell embeddings (umap.png)")
    pred.add_argument("--gene_importance", action=argparse.BooleanOptionalAction, default=True,
                      help="top genes per type the classifier predicts (gene_importance.csv; needs a classifier head)")
    pred.add_argument("--top_genes", type=int, default=50, help="genes listed per cell type (default 50)")
    pred.add_argument("--importance_cells", type=int, default=200,
                      help="at most this many cells per predicted type enter gene importance (default 200)")
    run = p.add_argument_group("run")
    run.add_argument("--output_dir", default="results", help="where predictions and reports go (default results/)")
    run.add_argument("--batch_size", type=int, default=None, help="cells per forward pass (default: 8 on CPU, "
                     "where larger batches run slower per cell, 64 on a GPU)")
    run.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    run.add_argument("--threads", type=int, default=0, help="CPU threads for inference (0: PyTorch's default, "
                     "one per core; on a machine shared with other jobs, 1 can be much faster)")
    utils.add_run_flags(run)
    return p


if __name__ == "__main__":
    utils.run_main(main, build_parser())
