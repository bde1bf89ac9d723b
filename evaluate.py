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
from typing import Any

import numpy as np
import pandas as pd
import torch

import report_utils
import utils
from utils import log_normalised
from report_utils import UNASSIGNED

logger = logging.getLogger("scbert")

OUTPUT_FILES = ("predictions.h5ad", "predictions.csv", "metrics.json", "confusion_matrix.png", "umap.png",
                "gene_importance.csv")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("model and data")
    data.add_argument("--model_path", default="ckpts/finetune_best.pth", help="fine-tuned checkpoint (default "
                      "ckpts/finetune_best.pth)")
    data.add_argument("--data_path", default=None, help="cells x genes file (.h5ad, 10x .h5 or mtx folder, "
                      ".csv/.tsv, .loom); default: the data the checkpoint was fine-tuned on")
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
    run.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16", "apex"])
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--seed", type=int, default=2021)
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


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
# inference


def run_baseline(aligned: Any, input_format: str, truth: np.ndarray, splits: dict[str, Any], rows: np.ndarray,
                 seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    train = np.asarray(splits.get("train", []), dtype=np.int64)
    train = train[np.array([truth[i] is not None for i in train], dtype=bool)] if len(train) else train
    if len(train) == 0:
        raise utils.InputError("--baseline needs the checkpoint's training cells, and it records none; fine-tune "
                               "with finetune.py (which stores its splits) first")
    valid = np.asarray(splits.get("valid", []), dtype=np.int64)
    valid = valid[np.array([truth[i] is not None for i in valid], dtype=bool)] if len(valid) else valid
    X = log_normalised(aligned.X, input_format)  # ln(1 + CP10k) over the panel genes, as the tokens see them
    y = np.asarray(truth, dtype=object)
    predicted, info = report_utils.logistic_baseline(
        X[train], y[train].astype(str), X[rows], X[valid] if len(valid) else None,
        y[valid].astype(str) if len(valid) else None, seed=seed)
    return predicted, info


# --------------------------------------------------------------------------------------------------
# main


def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    out_dir = utils.check_writable_dir(args.output_dir, "--output_dir", create=False)
    if args.novel_type and not 0.0 < args.unassign_thres <= 1.0:
        raise utils.InputError(f"--unassign_thres {args.unassign_thres} is not a probability in (0, 1]; use e.g. 0.5")
    if (args.batch_size is not None and args.batch_size < 1) or args.top_genes < 1 or args.importance_cells < 1:
        raise utils.InputError("--batch_size, --top_genes and --importance_cells must be positive")
    ctx = utils.setup_distributed(args.device)
    if ctx.distributed:
        raise utils.InputError("evaluate.py runs in one process; start it with python, not torchrun")
    device = ctx.device
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    utils.seed_everything(args.seed)

    # model
    model, ckpt = utils.load_checkpoint(args.model_path, map_location="cpu")
    if model.head_kind != "classifier":
        raise utils.InputError(f"{args.model_path} is a pretraining (masked-expression) checkpoint without a cell-type "
                               f"classifier; fine-tune it first (python finetune.py --model_path {args.model_path}) "
                               f"and evaluate the result (ckpts/finetune_best.pth)")
    config = model.config
    classes = checkpoint_classes(ckpt, model.to_out.n_classes, args.label_names)
    panel = checkpoint_panel(ckpt, config.gene_num, args.gene_panel)
    model.to(device).eval()
    precision = utils.Precision(utils.resolve_amp(args.amp, device), device)

    # data
    data_path = args.data_path if args.data_path is not None else ckpt.get("data_path")
    if args.data_path is None and data_path is not None and not Path(data_path).exists():
        raise utils.InputError(f"the checkpoint was fine-tuned on {data_path}, which does not exist here; "
                               f"pass --data_path with the data to annotate")
    data_name = data_path or f"the default data ({utils.DEFAULT_DATA_NAME})"
    adata = utils.read_dataset(data_path)
    input_format = utils.detect_input_format(adata, args.input_format)
    rows, same_data, scope = scored_cells(adata, ckpt, args.all_cells)
    if len(rows) == 0:
        raise utils.InputError(f"{data_name} holds no cells to annotate; pass a non-empty dataset")
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    overlap = dict(aligned.uns["scbert_panel_overlap"])
    logger.info(f"data: {data_name}, {adata.n_obs} cells x {adata.n_vars} genes ({input_format}); "
          f"{overlap['found']} of {overlap['total']} panel genes found ({overlap['found'] / overlap['total']:.1%})")
    logger.info(f"model: {args.model_path} ({len(classes)} cell types, {config.gene_num} genes, dim {config.dim}, "
          f"depth {config.depth}); scoring {len(rows)} cells: {scope}; precision {precision.mode} on {device.type}")
    if len(panel) >= 10000:  # the published >= 200 expressed genes rule was made for a 16,906-gene panel
        low = int((utils.expressed_gene_counts(aligned.X[rows]) < 200).sum())
        if low:
            logger.info(f"note: {low} of {len(rows)} cells have fewer than 200 expressed panel genes (the published "
                  f"quality filter); they are annotated, but less reliably")

    label_key = args.label_key or ckpt.get("label_key") or "celltype"
    truth_all = true_labels(adata, label_key, explicit=args.label_key is not None or args.baseline)
    if args.baseline and truth_all is None:
        raise utils.InputError(f"--baseline needs true labels to train on, and the data has no column '{label_key}'; "
                               f"pass --label_key with the obs column the model was fine-tuned on")
    if args.baseline and not same_data:
        raise utils.InputError("--baseline trains on the checkpoint's training cells, which exist only in the data it "
                               "was fine-tuned on; evaluate that data (omit --data_path), or drop --baseline")

    # predictions
    dataset = utils.TokenDataset(aligned, input_format, config.bin_num, indices=rows)
    t0 = time.time()
    predictions = utils.predict(model, dataset, batch_size, ctx, precision, args.num_workers, show_progress=True)
    probabilities = torch.softmax(torch.from_numpy(predictions.logits), dim=-1).numpy()
    embedding = predictions.embeddings
    seconds = time.time() - t0
    threshold = args.unassign_thres if args.novel_type else None
    labels = report_utils.assign_labels(probabilities, classes, threshold)
    confidence = probabilities.max(axis=1)
    logger.info(f"annotated {len(rows)} cells in {seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.0f} cells/s)"
          + (f"; {int((labels == UNASSIGNED).sum())} Unassigned (confidence < {threshold})" if threshold else ""))

    # scores
    truth = None if truth_all is None else truth_all[rows]
    labelled = None if truth is None else np.array([t is not None for t in truth], dtype=bool)
    metrics: dict[str, Any] = {
        "model_path": str(args.model_path), "data": str(data_name), "scored_cells": scope,
        "n_cells": int(len(rows)), "n_unassigned": int((labels == UNASSIGNED).sum()),
        "unassign_thres": threshold, "classes": classes, "label_key": label_key if truth is not None else None,
        "panel_overlap": overlap, "input_format": input_format, "amp": precision.mode,
        "inference_seconds": round(seconds, 3), "cells_per_second": round(len(rows) / max(seconds, 1e-9), 1),
    }
    if truth is not None and labelled.any():
        scores = report_utils.classification_metrics(truth[labelled], labels[labelled], classes)
        metrics.update({k: v for k, v in scores.items() if k not in ("n_cells", "n_unassigned")})
        metrics["n_labelled_cells"] = int(labelled.sum())
        logger.info(f"scBERT: accuracy {fmt(scores['accuracy'])}, macro-F1 {fmt(scores['macro_f1'])}, weighted F1 "
              f"{fmt(scores['weighted_f1'])} on {scores['n_known_label_cells']} cells with known types")
        for name, info in scores["unknown_labels"].items():
            logger.info(f"  type unknown to the model: {name}: {info['n_cells']} cells, {info['n_unassigned']} Unassigned")
    else:
        metrics.update(accuracy=None, macro_f1=None, weighted_f1=None, per_class={}, unknown_labels={})
        if truth is not None:
            logger.info(f"note: column '{label_key}' has no labels for the scored cells; annotating without scores")
    if args.baseline:
        base_pred, base_info = run_baseline(aligned, input_format, truth_all, ckpt.get("splits") or {}, rows,
                                            args.seed)
        base_scores = report_utils.classification_metrics(truth[labelled], base_pred[labelled], classes)
        metrics["baseline"] = {**base_info, **{k: base_scores[k] for k in
                                               ("accuracy", "macro_f1", "weighted_f1", "per_class")}}
        logger.info(report_utils.comparison_table(
            {"scBERT": metrics, "L1 LogReg": metrics["baseline"]},
            [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted F1")]))

    importance = None
    if args.gene_importance:
        t1 = time.time()
        importance = report_utils.gene_importance(
            model, dataset, labels, classes, panel, device, top_n=args.top_genes,
            max_cells=args.importance_cells, batch_size=min(batch_size, 16), seed=args.seed, show_progress=True)
        logger.info(f"gene importance: {importance['cell_type'].nunique()} cell types in {time.time() - t1:.1f} s")
    coordinates = None
    if args.umap:
        coordinates = report_utils.umap_coordinates(embedding, seed=args.seed)
        if coordinates is None:
            logger.info("note: too few cells for a UMAP; umap.png is not written")

    # outputs, all at once
    scored = adata[rows].copy()
    scored.obs["scbert_label"] = pd.Categorical(labels.astype(str), categories=classes + (
        [UNASSIGNED] if threshold is not None else []))
    scored.obs["scbert_confidence"] = confidence.astype(np.float32)
    scored.obsm["scbert_probabilities"] = probabilities.astype(np.float32)
    scored.obsm["X_scbert"] = embedding.astype(np.float32)
    if coordinates is not None:
        scored.obsm["X_scbert_umap"] = coordinates.astype(np.float32)
    scored.strings_to_categoricals()  # what writing would do anyway, without anndata's message
    scored.uns["scbert_classes"] = np.asarray(classes, dtype=object)
    scored.uns["scbert"] = {"model_path": str(args.model_path), "scored_cells": scope,
                            "unassign_thres": -1.0 if threshold is None else float(threshold),
                            "panel_genes_found": int(overlap["found"]), "panel_genes": int(overlap["total"])}

    table = pd.DataFrame({"cell_id": scored.obs_names.astype(str), "scbert_label": labels.astype(str),
                          "scbert_confidence": confidence})
    for j, name in enumerate(classes):
        table[f"prob_{name}"] = probabilities[:, j]
    if truth is not None:
        table["true_label"] = truth
    if args.baseline:
        table["baseline_label"] = base_pred

    writers = {
        "predictions.h5ad": lambda path: scored.write_h5ad(path),
        "predictions.csv": lambda path: table.to_csv(path, index=False),
        "metrics.json": lambda path: report_utils.write_json(metrics, path),
    }
    if truth is not None and labelled.any():
        writers["confusion_matrix.png"] = lambda path: report_utils.plot_confusion_matrix(
            truth[labelled], labels[labelled], classes, path, title=f"scBERT on {len(rows)} cells")
    if coordinates is not None:
        colourings = {"scbert_label": labels}
        if truth is not None and labelled.any():
            colourings[f"true ({label_key})"] = np.where(labelled, truth, "unlabelled")
        writers["umap.png"] = lambda path: report_utils.plot_umap(coordinates, colourings, path, order=classes)
    if importance is not None:
        writers["gene_importance.csv"] = lambda path: importance.to_csv(path, index=False)
    written = report_utils.write_outputs(out_dir, writers, stale=OUTPUT_FILES)
    logger.info(f"wrote {', '.join(p.name for p in written)} to {out_dir} ({time.time() - started:.0f} s in all)")
    return metrics


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    utils.run_main(main, build_parser())
