"""Annotation without (or beside) the classifier head, for evaluate.py: a cell embedding pooled from
the encoder of any checkpoint, label transfer from a labelled reference by a distance-weighted vote
of its nearest cells, and majority voting over an over-clustering of the query.

Nothing here reads files; evaluate.py hands over arrays and tensors.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from report_utils import UNASSIGNED, neighbour_graph

# How the (cells, genes + 1, dim) encoder output becomes one vector per cell; chosen by measuring
# which transfers labels better (benchmarks/results_annotation.md): "expressed" = mean over the
# genes the cell expresses (token > 0), "all" = mean over every position, "last" = the appended position.
POOLINGS = ("expressed", "all", "last")
POOLING = "expressed"
NOVELTY_PERCENTILE = 99.0   # --novel_type: farther than this percentile of the reference's own k-th distances
NOVELTY_SAMPLE = 2_000      # reference cells whose own k-th neighbour distance sets that radius


def pool_encodings(encoded: torch.Tensor, tokens: torch.Tensor, how: str = POOLING) -> torch.Tensor:
    """(b, n, dim) encoder output and its (b, n) tokens -> (b, dim) float32 cell embeddings. A cell
    that expresses none of the panel's genes gets the mean over all positions under "expressed"."""
    x = encoded.float()
    if how == "last":
        return x[:, -1]
    mean_all = x.mean(dim=1)
    if how == "all":
        return mean_all
    if how != "expressed":
        raise ValueError(f"pooling {how!r} is not one of {POOLINGS}")
    expressed = (tokens > 0).to(x.dtype)          # (b, n); the appended position is always token 0
    count = expressed.sum(dim=1, keepdim=True)    # (b, 1)
    mean_expressed = torch.einsum("bn,bnd->bd", expressed, x) / count.clamp_min(1.0)
    return torch.where(count > 0, mean_expressed, mean_all)


def pooling(how: str = POOLING):
    """pool_encodings with the pooling fixed: the `pool` that utils.predict takes."""
    def pool(encoded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return pool_encodings(encoded, tokens, how)
    return pool


def checkpoint_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a model's weights (names, shapes, dtypes and values): a predictions.h5ad that
    stores it can serve as a pre-embedded reference for exactly this model, whatever the file is called."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------------------------------
# kNN label transfer


class Transfer(NamedTuple):
    """The reference's vote for each query cell."""
    classes: list[str]         # the reference's types, sorted
    shares: np.ndarray         # (cells, classes) distance-weighted vote shares, rows sum to 1
    labels: np.ndarray         # the top type, or Unassigned (with a threshold)
    confidence: np.ndarray     # the top vote share
    kth_distance: np.ndarray   # cosine distance to the k-th nearest reference cell
    novelty_radius: float      # the reference's own k-th distances at NOVELTY_PERCENTILE
    n_low_share: int           # Unassigned for a vote share below the threshold
    n_far: int                 # Unassigned for lying beyond the radius (and not already low)


def nearest_cells(reference: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosine distances, reference rows) of each query cell's k nearest reference cells, nearest
    first: exact brute force (scikit-learn, in chunks of bounded memory), linear in the reference's size."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(reference)
    distances, rows = index.kneighbors(query)
    return distances.astype(np.float32), rows


def vote_shares(distances: np.ndarray, neighbour_codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Distance-weighted votes: neighbour i of a cell weighs exp(-d_i / mean_j d_j), so weights fall
    with distance on the scale of that cell's neighbourhood (nearest ~1, an average one 1/e); the
    shares are each type's weight over the total."""
    scale = np.maximum(distances.mean(axis=1, keepdims=True), 1e-8)
    weights = np.exp(-distances / scale)                              # (cells, k)
    shares = np.zeros((len(distances), n_classes), dtype=np.float64)
    np.add.at(shares, (np.arange(len(distances))[:, None], neighbour_codes), weights)
    return (shares / shares.sum(axis=1, keepdims=True)).astype(np.float32)


def novelty_radius(reference: np.ndarray, k: int, seed: int, sample: int = NOVELTY_SAMPLE,
                   percentile: float = NOVELTY_PERCENTILE) -> float:
    """The `percentile` of the reference cells' own distances to their k-th nearest other reference
    cell, over up to `sample` of them (so that it stays cheap for a reference of 10^6 cells)."""
    n = len(reference)
    if n < 2:
        return float("inf")
    rows = np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    kk = min(k + 1, n)
    distances, _ = nearest_cells(reference, reference[rows], kk)
    return float(np.percentile(distances[:, kk - 1], percentile))  # column 0 is the cell itself


def knn_transfer(reference: np.ndarray, reference_labels: Sequence[str], query: np.ndarray, k: int,
                 threshold: float | None, seed: int = 2021) -> Transfer:
    """Labels each query cell by a distance-weighted vote of its k nearest reference cells (cosine
    distance between encoder embeddings). With a threshold (--novel_type) a cell is Unassigned when
    its top vote share is below it, or when its k-th nearest reference cell is farther than the
    reference's own k-th neighbours are at the NOVELTY_PERCENTILE (a cell outside the reference)."""
    labels = np.asarray(reference_labels, dtype=object).astype(str)
    classes = sorted({str(label) for label in labels})
    codes = np.searchsorted(classes, labels)
    k = min(k, len(reference))
    distances, rows = nearest_cells(reference, query, k)
    shares = vote_shares(distances, codes[rows], len(classes))
    called = np.asarray(classes, dtype=object)[shares.argmax(axis=1)]
    confidence = shares.max(axis=1)
    kth = distances[:, -1]
    radius, n_low, n_far = float("nan"), 0, 0
    if threshold is not None:
        radius = novelty_radius(reference, k, seed)
        low = confidence < threshold
        far = (kth > radius) & ~low
        called = called.copy()
        called[low | far] = UNASSIGNED
        n_low, n_far = int(low.sum()), int(far.sum())
    return Transfer(classes, shares, called, confidence, kth, radius, n_low, n_far)


# --------------------------------------------------------------------------------------------------
# majority voting over an over-clustering


def leiden_resolution(n_cells: int) -> float:
    """Over-clustering resolution, rising with the number of cells as CellTypist's does: 5 below
    5,000 cells, 10 below 20,000, 15 below 40,000, 20 below 100,000, 25 below 200,000, else 30."""
    for limit, resolution in ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0)):
        if n_cells < limit:
            return resolution
    return 30.0


# --over_clustering: the space whose neighbour graph is over-clustered. "expression" (the default) is
# CellTypist's: the cells' own expression, independent of the model whose calls are voted on;
# "embedding" is the encoder embedding's graph (benchmarks/results_annotation.md compares them).
OVER_CLUSTERINGS = ("expression", "embedding")
EXPRESSION_GENES = 2_000   # most variable genes of the expression space
EXPRESSION_PCS = 50
EXPRESSION_NEIGHBOURS = 10


def expression_pcs(adata, input_format: str, seed: int = 2021) -> np.ndarray:
    """The expression space of --over_clustering expression, a canonical scanpy pipeline on the cells'
    own genes (all of them, not only the panel's): CP10k + log1p for counts (log1p input as it is),
    the EXPRESSION_GENES most variable genes (scanpy's dispersion ranking), each scaled to unit
    variance and clipped at 10, and the first EXPRESSION_PCS principal components."""
    import anndata as ad
    import scanpy as sc

    cells = ad.AnnData(X=adata.X.astype(np.float32))  # a copy: the caller's data stays as it is
    if input_format == "counts":
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
    if cells.n_vars > EXPRESSION_GENES:
        sc.pp.highly_variable_genes(cells, n_top_genes=EXPRESSION_GENES, subset=True)
    sc.pp.scale(cells, max_value=10)
    n_pcs = max(1, min(EXPRESSION_PCS, cells.n_obs - 1, cells.n_vars - 1))
    sc.pp.pca(cells, n_comps=n_pcs, random_state=seed)
    return np.asarray(cells.obsm["X_pca"], dtype=np.float32)


def expression_graph(adata, input_format: str, seed: int = 2021):
    """The neighbour graph of --over_clustering expression (EXPRESSION_NEIGHBOURS, Euclidean on the PCs)."""
    return neighbour_graph(expression_pcs(adata, input_format, seed), seed, n_neighbors=EXPRESSION_NEIGHBOURS,
                           metric="euclidean")


def over_cluster(embedding: np.ndarray, seed: int = 2021, graph=None) -> tuple[np.ndarray, float]:
    """Leiden clusters (igraph's, through scanpy) of the cells' kNN graph in the embedding (15
    neighbours, cosine; or `graph`, a report_utils.neighbour_graph already built, e.g. the
    expression_graph), at leiden_resolution(cells). Returns (cluster names "0", "1", ..., resolution).
    Fewer than 5 cells: each cell is its own cluster."""
    import scanpy as sc

    n = len(embedding)
    resolution = leiden_resolution(n)
    if n < 5:
        return np.arange(n).astype(str).astype(object), resolution
    graph = graph if graph is not None else neighbour_graph(embedding, seed)
    sc.tl.leiden(graph, resolution=resolution, flavor="igraph", n_iterations=2, directed=False,
                 random_state=seed, key_added="cluster")
    return graph.obs["cluster"].astype(str).to_numpy().astype(object), resolution


def majority_vote(clusters: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Every cell takes the commonest label of its cluster (Unassigned counts as a label, so a cluster
    of mostly unassigned cells stays Unassigned); a tie goes to the label with the larger summed confidence."""
    clusters = np.asarray(clusters, dtype=object).astype(str)
    labels = np.asarray(labels, dtype=object).astype(str)
    out = np.empty(len(labels), dtype=object)
    for cluster in np.unique(clusters):
        members = clusters == cluster
        names, counts = np.unique(labels[members], return_counts=True)
        weight = np.array([confidence[members][labels[members] == name].sum() for name in names])
        best = max(range(len(names)), key=lambda i: (counts[i], weight[i]))
        out[members] = names[best]
    return out
