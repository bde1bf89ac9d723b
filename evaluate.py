"""Annotate cells with a fine-tuned scBERT model and report how well it did.

    python evaluate.py                                   # ckpts/finetune_best.pth on its held-out test cells
    python evaluate.py --data_path new.h5ad --novel_type # annotate other data; low-confidence cells -> Unassigned
    python evaluate.py --baseline                        # + L1 logistic regression on the same split

Writes into --output_dir (all files or none): predictions.h5ad (the scored cells with obs['scbert_label'],
obs['scbert_confidence'], obsm['scbert_probabilities'], obsm['X_scbert'] and uns['scbert_classes']),
predictions.csv, metrics.json, confusion_matrix.png (with labels), umap.png and gene_importance.csv.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

import report_utils
import utils
from model import PerformerLM
from report_utils import UNASSIGNED

logger = logging.getLogger("scbert")

OUTPUT_FILES = ("predictions.h5ad", "predictions.csv", "metrics.json", "confusion_matrix.png", "umap.png",
                "gene_importance.csv")


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
    """Labels as strings (None where missing), or None without the column."""
    labels = utils.read_labels(adata, label_key)
    if labels is None and explicit:
        logger.info(f"note: no column '{label_key}' in the data's obs (it has: {utils.obs_columns(adata)}); "
                    f"annotating without scores")
    return labels


# --------------------------------------------------------------------------------------------------
# the steps: load, align, predict, score, report, write


class Loaded(NamedTuple):
    """The fine-tuned model (eval mode, on its device) and what its checkpoint brings."""
    model: PerformerLM
    ckpt: dict[str, Any]
    classes: list[str]      # cell-type names, in the order of the model's outputs
    panel: list[str]        # genes, in model order


def load_model(model_path: str, label_names_path: str | None, panel_path: str | None,
               device: torch.device) -> Loaded:
    model, ckpt = utils.load_checkpoint(model_path, map_location="cpu")
    if model.head_kind != "classifier":
        raise utils.InputError(f"{model_path} is a pretraining (masked-expression) checkpoint without a cell-type "
                               f"classifier; fine-tune it first (python finetune.py --model_path {model_path}) "
                               f"and evaluate the result (ckpts/finetune_best.pth)")
    classes = checkpoint_classes(ckpt, model.to_out.n_classes, label_names_path)
    panel = checkpoint_panel(ckpt, model.config.gene_num, panel_path)
    return Loaded(model.to(device).eval(), ckpt, classes, panel)


class Cells(NamedTuple):
    """The data to annotate, on the model's panel, and which of its cells are scored."""
    adata: Any               # as read
    aligned: Any             # on the model's gene panel
    input_format: str
    rows: np.ndarray         # the scored cells (rows of adata)
    same_data: bool          # the data the checkpoint was fine-tuned on
    scope: str               # which cells, in words
    overlap: dict[str, Any]  # panel genes found in the data
    name: str                # the data, in words


def align_cells(data_path: str | None, ckpt: dict[str, Any], panel: list[str], input_format: str,
                all_cells: bool, soma: utils.SomaOptions) -> Cells:
    """Reads the data (default: the checkpoint's, with its SOMA options), picks the cells to score and
    aligns them to the panel."""
    path = data_path if data_path is not None else ckpt.get("data_path")
    if data_path is None and path is not None:
        saved = ckpt.get("args") or {}
        soma = utils.SomaOptions(saved.get("soma_measurement", soma.measurement), saved.get("soma_layer"),
                                 saved.get("obs_filter"))
        if not any(c in str(path) for c in "*?[") and "://" not in str(path) and not Path(path).exists():
            raise utils.InputError(f"the checkpoint was fine-tuned on {path}, which does not exist here; "
                                   f"pass --data_path with the data to annotate")
    name = path or f"the default data ({utils.DEFAULT_DATA_NAME})"
    adata = utils.open_cells(path, soma)
    input_format = utils.detect_input_format(adata, input_format)
    rows, same_data, scope = scored_cells(adata, ckpt, all_cells)
    if len(rows) == 0:
        raise utils.InputError(f"{name} holds no cells to annotate; pass a non-empty dataset")
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    overlap = dict(aligned.uns["scbert_panel_overlap"])
    logger.info(f"data: {name}, {adata.n_obs} cells x {adata.n_vars} genes ({input_format}); "
                f"{overlap['found']} of {overlap['total']} panel genes found ({overlap['found'] / overlap['total']:.1%})")
    return Cells(adata, aligned, input_format, rows, same_data, scope, overlap, str(name))


def note_sparse_cells(cells: Cells, panel: list[str]) -> None:
    if len(panel) >= 10000:  # the published >= 200 expressed genes rule was made for a 16,906-gene panel
        low = int((utils.expressed_genes_of(cells.aligned, cells.rows) < 200).sum())
        if low:
            logger.info(f"note: {low} of {len(cells.rows)} cells have fewer than 200 expressed panel genes (the "
                        f"published quality filter); they are annotated, but less reliably")


class Annotation(NamedTuple):
    """What the model says about each scored cell."""
    probabilities: np.ndarray  # (cells, classes) float32
    embedding: np.ndarray      # (cells, 128) float32
    labels: np.ndarray         # the predicted names (Unassigned below the threshold, if one is set)
    confidence: np.ndarray     # the top probability
    threshold: float | None    # --unassign_thres with --novel_type
    seconds: float             # inference time


def annotate(model: PerformerLM, dataset: utils.TokenDataset, classes: list[str], threshold: float | None,
             batch_size: int, ctx: utils.DistContext, precision: utils.Precision, num_workers: int) -> Annotation:
    started = time.time()
    predictions = utils.predict(model, dataset, batch_size, ctx, precision, num_workers, show_progress=True)
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), dim=-1).numpy()
    seconds = time.time() - started
    labels = report_utils.assign_labels(probabilities, classes, threshold)
    n = len(labels)
    logger.info(f"annotated {n} cells in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} cells/s)"
                + (f"; {int((labels == UNASSIGNED).sum())} Unassigned (confidence < {threshold})" if threshold else ""))
    return Annotation(probabilities, predictions.embeddings, labels, probabilities.max(axis=1), threshold, seconds)


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


def score(annotation: Annotation, truth: np.ndarray | None, label_key: str, cells: Cells, classes: list[str],
          model_path: str, amp: str) -> dict[str, Any]:
    """metrics.json: what was scored and how, and with labels the scores of the labelled cells."""
    n, labels = len(cells.rows), annotation.labels
    metrics: dict[str, Any] = {
        "model_path": str(model_path), "data": cells.name, "scored_cells": cells.scope,
        "n_cells": int(n), "n_unassigned": int((labels == UNASSIGNED).sum()),
        "unassign_thres": annotation.threshold, "classes": classes,
        "label_key": label_key if truth is not None else None, "panel_overlap": cells.overlap,
        "input_format": cells.input_format, "amp": amp, "inference_seconds": round(annotation.seconds, 3),
        "cells_per_second": round(n / max(annotation.seconds, 1e-9), 1),
    }
    labelled = None if truth is None else np.array([t is not None for t in truth], dtype=bool)
    if truth is None or not labelled.any():
        metrics.update(accuracy=None, macro_f1=None, weighted_f1=None, per_class={}, unknown_labels={})
        if truth is not None:
            logger.info(f"note: column '{label_key}' has no labels for the scored cells; annotating without scores")
        return metrics
    scores = report_utils.classification_metrics(truth[labelled], labels[labelled], classes)
    metrics.update({k: v for k, v in scores.items() if k not in ("n_cells", "n_unassigned")})
    metrics["n_labelled_cells"] = int(labelled.sum())
    logger.info(f"scBERT: accuracy {fmt(scores['accuracy'])}, macro-F1 {fmt(scores['macro_f1'])}, weighted F1 "
                f"{fmt(scores['weighted_f1'])} on {scores['n_known_label_cells']} cells with known types")
    for name, info in scores["unknown_labels"].items():
        logger.info(f"  type unknown to the model: {name}: {info['n_cells']} cells, {info['n_unassigned']} Unassigned")
    return metrics


def explain(model: PerformerLM, dataset: utils.TokenDataset, annotation: Annotation, classes: list[str],
            panel: list[str], precision: utils.Precision, gene_importance: bool, umap: bool, top_genes: int,
            importance_cells: int, batch_size: int, seed: int) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """The report beyond the scores: top genes per predicted type, and UMAP coordinates of the embedding."""
    importance = None
    if gene_importance:
        started = time.time()
        importance = report_utils.gene_importance(
            model, dataset, annotation.labels, classes, panel, precision.device, top_n=top_genes,
            max_cells=importance_cells, batch_size=min(batch_size, 16), seed=seed, show_progress=True,
            autocast=precision.autocast)
        logger.info(f"gene importance: {importance['cell_type'].nunique()} cell types in {time.time() - started:.1f} s")
    coordinates = None
    if umap:
        coordinates = report_utils.umap_coordinates(annotation.embedding, seed=seed)
        if coordinates is None:
            logger.info("note: too few cells for a UMAP; umap.png is not written")
    return importance, coordinates


def annotated_data(cells: Cells, annotation: Annotation, classes: list[str], coordinates: np.ndarray | None,
                   model_path: str) -> Any:
    """predictions.h5ad: the scored cells with the model's labels, confidences, probabilities and embeddings."""
    scored = utils.cells_for_output(cells.adata, cells.rows)
    scored.obs["scbert_label"] = pd.Categorical(annotation.labels.astype(str), categories=classes + (
        [UNASSIGNED] if annotation.threshold is not None else []))
    scored.obs["scbert_confidence"] = annotation.confidence.astype(np.float32)
    scored.obsm["scbert_probabilities"] = annotation.probabilities.astype(np.float32)
    scored.obsm["X_scbert"] = annotation.embedding.astype(np.float32)
    if coordinates is not None:
        scored.obsm["X_scbert_umap"] = coordinates.astype(np.float32)
    scored.strings_to_categoricals()  # what writing would do anyway, without anndata's message
    scored.uns["scbert_classes"] = np.asarray(classes, dtype=object)
    scored.uns["scbert"] = {"model_path": str(model_path), "scored_cells": cells.scope,
                            "unassign_thres": -1.0 if annotation.threshold is None else float(annotation.threshold),
                            "panel_genes_found": int(cells.overlap["found"]), "panel_genes": int(cells.overlap["total"])}
    return scored


def write_results(out_dir: Path, scored: Any, annotation: Annotation, classes: list[str], truth: np.ndarray | None,
                  label_key: str, metrics: dict[str, Any], baseline_labels: np.ndarray | None,
                  importance: pd.DataFrame | None, coordinates: np.ndarray | None) -> list[Path]:
    """Every output file at once (all or none), removing our earlier outputs this run does not make."""
    labels = annotation.labels
    table = pd.DataFrame({"cell_id": scored.obs_names.astype(str), "scbert_label": labels.astype(str),
                          "scbert_confidence": annotation.confidence})
    for j, name in enumerate(classes):
        table[f"prob_{name}"] = annotation.probabilities[:, j]
    if truth is not None:
        table["true_label"] = truth
    if baseline_labels is not None:
        table["baseline_label"] = baseline_labels
    writers = {
        "predictions.h5ad": lambda path: scored.write_h5ad(path),
        "predictions.csv": lambda path: table.to_csv(path, index=False),
        "metrics.json": lambda path: report_utils.write_json(metrics, path),
    }
    labelled = None if truth is None else np.array([t is not None for t in truth], dtype=bool)
    if labelled is not None and labelled.any():
        writers["confusion_matrix.png"] = lambda path: report_utils.plot_confusion_matrix(
            truth[labelled], labels[labelled], classes, path, title=f"scBERT on {len(labels)} cells")
    if coordinates is not None:
        colourings = {"scbert_label": labels}
        if labelled is not None and labelled.any():
            colourings[f"true ({label_key})"] = np.where(labelled, truth, "unlabelled")
        writers["umap.png"] = lambda path: report_utils.plot_umap(coordinates, colourings, path, order=classes)
    if importance is not None:
        writers["gene_importance.csv"] = lambda path: importance.to_csv(path, index=False)
    return report_utils.write_outputs(out_dir, writers, stale=OUTPUT_FILES)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------------------------------


def check_flags(novel_type: bool, unassign_thres: float, batch_size: int | None, top_genes: int,
                importance_cells: int) -> None:
    if novel_type and not 0.0 < unassign_thres <= 1.0:
        raise utils.InputError(f"--unassign_thres {unassign_thres} is not a probability in (0, 1]; use e.g. 0.5")
    if (batch_size is not None and batch_size < 1) or top_genes < 1 or importance_cells < 1:
        raise utils.InputError("--batch_size, --top_genes and --importance_cells must be positive")


def check_baseline_inputs(truth_all: np.ndarray | None, same_data: bool, label_key: str) -> None:
    if truth_all is None:
        raise utils.InputError(f"--baseline needs true labels to train on, and the data has no column '{label_key}'; "
                               f"pass --label_key with the obs column the model was fine-tuned on")
    if not same_data:
        raise utils.InputError("--baseline trains on the checkpoint's training cells, which exist only in the data it "
                               "was fine-tuned on; evaluate that data (omit --data_path), or drop --baseline")


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    out_dir = utils.check_writable_dir(args.output_dir, "--output_dir", create=False)
    check_flags(args.novel_type, args.unassign_thres, args.batch_size, args.top_genes, args.importance_cells)
    ctx = utils.setup_distributed(args.device)
    if ctx.distributed:
        raise utils.InputError("evaluate.py runs in one process; start it with python, not torchrun")
    batch_size = args.batch_size or (64 if ctx.device.type == "cuda" else 8)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed)

    # load, align
    loaded = load_model(args.model_path, args.label_names, args.gene_panel, ctx.device)
    config = loaded.model.config
    precision = utils.Precision(utils.resolve_amp(args.amp, ctx.device), ctx.device)
    cells = align_cells(args.data_path, loaded.ckpt, loaded.panel, args.input_format, args.all_cells,
                        utils.SomaOptions(args.soma_measurement, args.soma_layer, args.obs_filter))
    logger.info(f"model: {args.model_path} ({len(loaded.classes)} cell types, {config.gene_num} genes, dim "
                f"{config.dim}, depth {config.depth}); scoring {len(cells.rows)} cells: {cells.scope}; precision "
                f"{precision.mode} on {ctx.device.type}")
    note_sparse_cells(cells, loaded.panel)
    label_key = args.label_key or loaded.ckpt.get("label_key") or "celltype"
    truth_all = true_labels(cells.adata, label_key, explicit=args.label_key is not None or args.baseline)
    if args.baseline:
        check_baseline_inputs(truth_all, cells.same_data, label_key)
        utils.require_in_memory(cells.aligned, "--baseline (it trains on the cells' whole expression matrix)")

    # predict, score
    dataset = utils.token_dataset(cells.aligned, cells.input_format, config.bin_num, indices=cells.rows)
    annotation = annotate(loaded.model, dataset, loaded.classes, args.unassign_thres if args.novel_type else None,
                          batch_size, ctx, precision, args.num_workers)
    truth = None if truth_all is None else truth_all[cells.rows]
    metrics = score(annotation, truth, label_key, cells, loaded.classes, args.model_path, precision.mode)
    baseline_labels = None
    if args.baseline:
        baseline_labels, metrics["baseline"] = run_baseline(cells.aligned, cells.input_format, truth_all,
                                                            loaded.ckpt.get("splits") or {}, cells.rows,
                                                            loaded.classes, args.seed)
        logger.info(report_utils.comparison_table(
            {"scBERT": metrics, "L1 LogReg": metrics["baseline"]},
            [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted F1")]))

    # report, write
    importance, coordinates = explain(loaded.model, dataset, annotation, loaded.classes, loaded.panel, precision,
                                      args.gene_importance, args.umap, args.top_genes, args.importance_cells,
                                      batch_size, args.seed)
    scored = annotated_data(cells, annotation, loaded.classes, coordinates, args.model_path)
    written = write_results(out_dir, scored, annotation, loaded.classes, truth, label_key, metrics, baseline_labels,
                            importance, coordinates)
    logger.info(f"wrote {', '.join(p.name for p in written)} to {out_dir} ({time.time() - started:.0f} s in all)")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("model and data")
    data.add_argument("--model_path", default="ckpts/finetune_best.pth", help="fine-tuned checkpoint (default "
                      "ckpts/finetune_best.pth)")
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
    pred = p.add_argument_group("predictions")
    pred.add_argument("--novel_type", action="store_true",
                      help="call cells whose top probability is below --unassign_thres 'Unassigned'")
    pred.add_argument("--unassign_thres", type=float, default=0.5,
                      help="confidence threshold for --novel_type (default 0.5)")
    pred.add_argument("--baseline", action="store_true", help="also train and score an L1-regularised logistic "
                      "regression on the checkpoint's training cells (needs the fine-tuning data and labels)")
    pred.add_argument("--umap", action=argparse.BooleanOptionalAction, default=True,
                      help="UMAP plot of the cell embeddings (umap.png)")
    pred.add_argument("--gene_importance", action=argparse.BooleanOptionalAction, default=True,
                      help="top genes per predicted cell type (gene_importance.csv)")
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
