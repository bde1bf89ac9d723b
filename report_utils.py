"""Reporting for evaluate.py: classification metrics, the L1 logistic-regression baseline, gene
importance, the confusion-matrix and UMAP plots, and writing an output folder all at once.

Nothing here reads data or checkpoints; evaluate.py hands over arrays, the model and a dataset.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from data_utils import InputError
from train_utils import to_plain

UNASSIGNED = "Unassigned"  # the label of cells below --unassign_thres (--novel_type)

# --------------------------------------------------------------------------------------------------
# predictions and metrics


def assign_labels(probabilities: np.ndarray, classes: Sequence[str], threshold: float | None) -> np.ndarray:
    """The most probable class per cell; with a threshold, cells whose top probability is below it
    become "Unassigned" (the published novel-type rule)."""
    labels = np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)]
    if threshold is not None:
        labels = labels.copy()
        labels[probabilities.max(axis=1) < threshold] = UNASSIGNED
    return labels


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Scores of predictions against true labels, computed over the cells whose true label is one of
    the model's classes. "Unassigned" counts as a wrong answer there.

    macro-F1 is the unweighted mean of the per-class F1 over the model's classes that occur among
    those cells as truth or as prediction (scikit-learn's f1_score(average="macro") convention, so the
    numbers compare with published ones; "Unassigned" is not a class); weighted F1 weights the
    per-class F1 by support.
    Cells whose true label the model never learned are reported apart, under `unknown_labels`, with
    how many of them went to "Unassigned" (the novel-type detection rate) and what the rest became.
    """
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=object).astype(str)
    y_pred = np.asarray(y_pred, dtype=object).astype(str)
    classes = [str(c) for c in classes]
    known = np.isin(y_true, classes)
    out: dict[str, Any] = {
        "n_cells": int(len(y_true)),
        "n_known_label_cells": int(known.sum()),
        "n_unassigned": int((y_pred == UNASSIGNED).sum()),
        "n_unassigned_known_label": int((y_pred[known] == UNASSIGNED).sum()),
    }
    if known.any():
        t, p = y_true[known], y_pred[known]
        precision, recall, f1, support = precision_recall_fscore_support(
            t, p, labels=classes, average=None, zero_division=0)
        occurs = np.isin(classes, np.concatenate([t, p]))
        out["accuracy"] = float((t == p).mean())
        out["macro_f1"] = float(f1[occurs].mean())
        out["weighted_f1"] = float((f1 * support).sum() / support.sum())
        out["per_class"] = {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                "support": int(support[i]), "n_predicted": int((p == c).sum())}
            for i, c in enumerate(classes)
        }
    else:
        out.update(accuracy=None, macro_f1=None, weighted_f1=None, per_class={})
    unknown: dict[str, Any] = {}
    for label in sorted(set(y_true[~known])):
        rows = y_true == label
        became = pd.Series(y_pred[rows]).value_counts()
        unknown[label] = {"n_cells": int(rows.sum()), "n_unassigned": int((y_pred[rows] == UNASSIGNED).sum()),
                          "predicted_as": {str(k): int(v) for k, v in became.items()}}
    n_unknown = int((~known).sum())
    n_unknown_unassigned = int((y_pred[~known] == UNASSIGNED).sum())
    out["unknown_labels"] = unknown
    out["novel_detection"] = {
        "n_cells": n_unknown,
        "n_unassigned": n_unknown_unassigned,
        "rate": n_unknown_unassigned / n_unknown if n_unknown else None,
    }
    return out


def comparison_table(columns: Mapping[str, Mapping[str, Any]], rows: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: one column per method, one row per (metric key, row title)."""
    names = list(columns)
    width = max(len(title) for _, title in rows) + 2
    lines = [" " * width + "".join(f"{n:>14}" for n in names)]
    for key, title in rows:
        cells = []
        for n in names:
            value = columns[n].get(key)
            cells.append(f"{value:>14.4f}" if isinstance(value, (int, float)) and value is not None else f"{'-':>14}")
        lines.append(f"{title:<{width}}" + "".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# baseline: L1-regularised logistic regression (Boiarsky et al., REFERENCE.md §7)


def _l1_logistic(C: float, seed: int, max_iter: int):
    import sklearn
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    # scikit-learn 1.8 replaced penalty="l1" by l1_ratio=1 (and warns about the old spelling)
    kind = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    # liblinear solves the L1 problem one class against the rest, 10-30x faster than saga's multinomial
    # fit here at the same accuracy; the explicit wrapper keeps that scheme in every sklearn version
    return OneVsRestClassifier(LogisticRegression(C=C, solver="liblinear", max_iter=max_iter,
                                                  random_state=seed, **kind))


def logistic_baseline(X_train: Any, y_train: np.ndarray, X_eval: Any, X_valid: Any = None,
                      y_valid: np.ndarray | None = None, seed: int = 2021,
                      Cs: Sequence[float] = (0.1, 1.0, 10.0),
                      max_iter: int = 1000) -> tuple[np.ndarray, dict[str, Any]]:
    """L1-regularised logistic regression (one-vs-rest, liblinear) on log-normalised expression.

    The inverse regularisation strength C is chosen from `Cs` by macro-F1 on the validation cells
    (the ones fine-tuning used for early stopping), then that fit (on the training cells alone) is
    used; without validation cells C = 1. Returns (predicted labels of X_eval, details)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import f1_score

    def fit(C: float):
        model = _l1_logistic(C, seed, max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_train, y_train)
        return model

    scores: dict[str, float] = {}
    if X_valid is not None and y_valid is not None and len(y_valid) and len(Cs) > 1:
        fitted = {}
        for C in Cs:
            fitted[C] = fit(C)
            scores[str(C)] = float(f1_score(y_valid, fitted[C].predict(X_valid), average="macro"))
        best_C = max(Cs, key=lambda c: scores[str(c)])
        model = fitted[best_C]
    else:
        best_C = 1.0 if len(Cs) != 1 else Cs[0]
        model = fit(best_C)
    info = {"method": "L1-regularised logistic regression (scikit-learn liblinear, one-vs-rest) on "
                      "ln(1 + CP10k) of the panel genes",
            "C": float(best_C), "valid_macro_f1_by_C": scores,
            "nonzero_genes": int((np.abs(np.vstack([e.coef_ for e in model.estimators_])).sum(axis=0) > 0).sum()),
            "n_train_cells": int(len(y_train))}
    return model.predict(X_eval).astype(object), info


# --------------------------------------------------------------------------------------------------
# gene importance


def gene_importance(model: torch.nn.Module, dataset: torch.utils.data.Dataset, predicted: np.ndarray,
                    class_names: Sequence[str], gene_names: Sequence[str], device: torch.device,
                    top_n: int = 50, max_cells: int = 200, batch_size: int = 16, seed: int = 2021,
                    show_progress: bool = False,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> pd.DataFrame:
    """Top genes per predicted cell type, by gradient x input on the token embeddings.

    For a cell with tokens t (one per panel gene) predicted as class c, the score of class c is its
    centred logit s_c = z_c - mean_k z_k (logits are defined only up to a shared shift, and unlike the
    probability it does not saturate for confident cells). The attribution of gene g is

        a_g = (E[t_g] - E[0]) . d s_c / d E[t_g]

    where E[t] is the learned embedding of expression bin t: a first-order estimate of how much s_c
    would drop if the gene's expression were set to zero (bin 0, the "not expressed" token). Genes
    not expressed in a cell get exactly 0. The gene positional embedding is the same at both points,
    so it cancels. Scores are averaged over (up to `max_cells` randomly chosen) cells predicted as c,
    so a gene ranks high when it is expressed in those cells and pushes the model towards c.

    `dataset[i]["tokens"]` must be the tokens of the cell whose prediction is `predicted[i]`;
    cells labelled anything not in `class_names` (e.g. "Unassigned") are skipped. `autocast()`: the
    precision the forward and backward run in (the annotation's). Returns a long table: cell_type,
    rank, gene, importance, frac_expressed (among those cells), n_cells.
    """
    genes = list(gene_names)
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(seed)
    captured: dict[str, torch.Tensor] = {}

    def keep_embedding(_module, _inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured["emb"] = leaf
        return leaf

    predicted = np.asarray(predicted, dtype=object)
    chosen = {}
    for c, name in enumerate(class_names):
        cells = np.flatnonzero(predicted == name)
        if len(cells) > max_cells:
            cells = np.sort(rng.choice(cells, max_cells, replace=False))
        if len(cells):
            chosen[c] = cells
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(v) for v in chosen.values()), desc="gene importance", unit="cell",
                   leave=False, dynamic_ncols=True)
    handle = model.token_emb.register_forward_hook(keep_embedding)
    was_training = model.training
    model.eval()
    try:
        zero_embedding = model.token_emb.weight[0].detach()
        for c, cells in chosen.items():
            total = torch.zeros(len(genes), dtype=torch.float64)
            expressed = torch.zeros(len(genes), dtype=torch.float64)
            for start in range(0, len(cells), batch_size):
                chunk = cells[start:start + batch_size]
                fetch = getattr(dataset, "__getitems__", None)  # TokenDataset tokenises a batch at once
                items = fetch([int(i) for i in chunk]) if fetch else [dataset[int(i)] for i in chunk]
                tokens = torch.stack([item["tokens"] for item in items]).long().to(device)
                with torch.enable_grad(), autocast():
                    logits, _ = model.classify(tokens)
                    centred = logits[:, c] - logits.mean(dim=1)
                    (grad,) = torch.autograd.grad(centred.sum(), captured["emb"])
                emb = captured["emb"].detach()
                attribution = ((emb - zero_embedding) * grad).sum(dim=-1)[:, : len(genes)]  # (b, genes)
                total += attribution.double().sum(dim=0).cpu()
                expressed += (tokens[:, : len(genes)] > 0).double().sum(dim=0).cpu()
                if bar is not None:
                    bar.update(len(chunk))
            mean = (total / len(cells)).numpy()
            frac = (expressed / len(cells)).numpy()
            order = np.argsort(-mean, kind="stable")[:top_n]
            for rank, g in enumerate(order, start=1):
                rows.append({"cell_type": class_names[c], "rank": rank, "gene": genes[g],
                             "importance": float(mean[g]), "frac_expressed": float(frac[g]),
                             "n_cells": int(len(cells))})
    finally:
        handle.remove()
        model.train(was_training)
        if bar is not None:
            bar.close()
    return pd.DataFrame(rows, columns=["cell_type", "rank", "gene", "importance", "frac_expressed", "n_cells"])


# --------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str], path: str | os.PathLike,
                          title: str = "scBERT predictions") -> None:
    """Rows: true labels (the model's classes present, then labels it never learned); columns: the
    model's classes, then "Unassigned" if used. Colour = fraction of the row, text = cell count."""
    plt = _pyplot()
    y_true = np.asarray(y_true, dtype=object).astype(str)
    y_pred = np.asarray(y_pred, dtype=object).astype(str)
    classes = [str(c) for c in classes]
    row_names = [c for c in classes if c in set(y_true)] + sorted(set(y_true) - set(classes))
    col_names = classes + ([UNASSIGNED] if (y_pred == UNASSIGNED).any() else [])
    r_of = {n: i for i, n in enumerate(row_names)}
    c_of = {n: i for i, n in enumerate(col_names)}
    counts = np.zeros((len(row_names), len(col_names)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        counts[r_of[t], c_of[p]] += 1
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * max(len(row_names), len(col_names))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true label")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def neighbour_graph(embedding: np.ndarray, seed: int = 2021, n_neighbors: int = 15, metric: str = "cosine") -> Any:
    """scanpy's kNN graph of the cells of an embedding (at least 2 cells), in an AnnData that holds
    nothing else: UMAP and the over-clustering of --majority_voting are computed on it."""
    import anndata as ad
    import scanpy as sc

    n = embedding.shape[0]
    holder = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    holder.obsm["X_embedding"] = np.asarray(embedding, dtype=np.float32)
    sc.pp.neighbors(holder, use_rep="X_embedding", n_neighbors=min(n_neighbors, n - 1), metric=metric,
                    random_state=seed)
    return holder


def umap_coordinates(embedding: np.ndarray, seed: int = 2021, graph: Any = None) -> np.ndarray | None:
    """UMAP of the cell embeddings on their neighbour_graph (or on `graph`, that graph already
    built); None when there are too few cells."""
    import scanpy as sc

    if embedding.shape[0] < 5:
        return None
    holder = graph if graph is not None else neighbour_graph(embedding, seed)
    sc.tl.umap(holder, random_state=seed)
    return np.asarray(holder.obsm["X_umap"])


def label_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per label, the same in every panel; "Unassigned" and "unlabelled" are grey."""
    import matplotlib.colors as mcolors

    plt = _pyplot()
    named = [str(x) for x in labels if str(x) not in (UNASSIGNED, "unlabelled")]
    cmap = plt.get_cmap("tab10" if len(named) <= 10 else "tab20")
    colours = {name: mcolors.to_hex(cmap(i % cmap.N)) for i, name in enumerate(named)}
    colours.update({UNASSIGNED: "#b0b0b0", "unlabelled": "#d9d9d9"})
    return colours


def plot_umap(coordinates: np.ndarray, colourings: Mapping[str, Sequence[str]], path: str | os.PathLike,
              order: Sequence[str] = ()) -> None:
    """One scanpy UMAP panel per colouring (e.g. prediction, true label); a label has the same colour
    in every panel (`order` fixes the colour sequence, e.g. the model's classes)."""
    import anndata as ad
    import scanpy as sc

    n = coordinates.shape[0]
    values = {k: np.asarray(v, dtype=object).astype(str) for k, v in colourings.items()}
    seen = list(order) + sorted({x for v in values.values() for x in v} - set(order))
    colours = label_colours(seen)
    holder = ad.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    for key, v in values.items():
        categories = [c for c in seen if c in set(v)]
        holder.obs[key] = pd.Categorical(v, categories=categories)
        holder.uns[f"{key}_colors"] = [colours[c] for c in categories]
    holder.obsm["X_umap"] = coordinates
    plt = _pyplot()
    with plt.rc_context({"figure.figsize": (5.5, 4.5)}):
        fig = sc.pl.umap(holder, color=list(values), return_fig=True, show=False, wspace=0.6,
                         size=float(np.clip(120000 / max(n, 1), 4, 80)))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# output folder: everything or nothing


def write_outputs(path: str | os.PathLike, writers: Mapping[str, Callable[[Path], None]],
                  stale: Sequence[str] = ()) -> list[Path]:
    """Writes every file into a hidden staging folder inside `path`, then renames them into place,
    so a failure leaves neither half-written files nor a half-updated folder. `stale` names earlier
    outputs of ours that this run does not produce (e.g. a confusion matrix from a labelled run):
    they are removed so the folder describes one run. Returns the written paths."""
    path = Path(path).expanduser()
    created = []
    probe = path
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    staging = None
    done = False
    try:
        path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path, prefix=".evaluate-staging-"))
        for name, write in writers.items():
            write(staging / name)
        written = []
        for name in writers:
            os.replace(staging / name, path / name)
            written.append(path / name)
        for name in stale:
            if name not in writers and (path / name).is_file():
                (path / name).unlink()
        done = True
        return written
    except OSError as err:
        raise InputError(f"could not write the outputs to {path} ({err.strerror or err}); "
                         f"free some space or choose another --output_dir") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:  # remove the folders this call created, innermost first
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def write_json(obj: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(to_plain(obj, for_json=True), indent=2) + "\n")
