"""Gene2Vec positional embeddings (Du et al. 2019), the gene-identity table scBERT adds to each token:
reading a published file (.npy + gene list, or word2vec text) aligned to a gene panel, training
vectors from a dataset's gene co-expression with gensim's skip-gram when no file is given, and saving
them in the published layout. A subsystem of its own: the model only receives the finished table.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp

from data_utils import InputError, _gene_key, _RowReader, detect_input_format, log_normalised

__all__ = ["load_gene2vec", "coexpression_pairs", "train_gene2vec", "save_gene2vec"]

logger = logging.getLogger("scbert.gene2vec")


# ----------------------------------------------------------------------------------------------
# Reading a published file
# ----------------------------------------------------------------------------------------------

def _gene_list_beside(path: Path) -> Path | None:
    for cand in (path.with_suffix(".txt"), path.with_name(path.stem + "_genes.txt"), path.with_name("genes.txt")):
        if cand.is_file():
            return cand
    return None


def _read_word2vec_text(path: Path) -> tuple[list[str], np.ndarray]:
    genes, rows = [], []
    with open(path) as f:
        for n_line, line in enumerate(f):
            parts = line.split()
            if not parts:
                continue
            if n_line == 0 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header "n_words dim"
            genes.append(parts[0])
            rows.append(parts[1:])
    if not rows:
        raise InputError(f"{path} holds no vectors; expected lines 'GENE v1 ... v200'")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(f"{path}: lines have {sorted(widths)[:5]} values; every line must be 'GENE' plus the same "
                         "number of numbers")
    try:
        vectors = np.asarray(rows, dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{path}: non-numeric vector values ({err}); expected lines 'GENE v1 ... v200'") from err
    return genes, vectors


def load_gene2vec(path: str | os.PathLike, panel: Sequence[str],
                  genes_path: str | os.PathLike | None = None) -> tuple[np.ndarray, int]:
    """Gene2Vec table aligned to the panel: float64 (len(panel) + 1, dim), last row zeros (the
    appended position), zero rows for panel genes the file lacks. Returns (table, n_found).

    Formats: a (n_genes, dim) .npy with its gene list (.txt beside it or `genes_path`), or word2vec
    text lines "GENE v1 ... vdim" (tab or space separated, optional "n dim" header line). A .npy with
    no gene list whose rows number len(panel) (or len(panel) + 1), like scBERT's gene2vec_16906.npy,
    is taken to be in panel order already.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"Gene2Vec file {p} does not exist; pass --gene2vec_path with a .npy (+ gene list) or a "
                         "word2vec text file, or leave it out to train embeddings from the data")
    if p.suffix == ".npy":
        try:
            vectors = np.load(p, allow_pickle=False).astype(np.float64)
        except Exception as err:
            raise InputError(f"could not read {p} as a .npy array ({err}); save the vectors with numpy.save") from err
        if vectors.ndim != 2:
            raise InputError(f"{p} holds an array of shape {vectors.shape}; expected (genes, dim)")
        gpath = Path(genes_path).expanduser() if genes_path is not None else _gene_list_beside(p)
        if gpath is None:
            if vectors.shape[0] in (len(panel), len(panel) + 1):
                logger.warning("%s has no gene list beside it; its %d rows are taken to be the panel genes in order",
                               p, vectors.shape[0])
                table = np.zeros((len(panel) + 1, vectors.shape[1]), dtype=np.float64)
                table[:-1] = vectors[:len(panel)]
                return table, len(panel)
            raise InputError(f"{p}: no gene list beside it ({p.with_suffix('.txt').name}) and its {vectors.shape[0]} "
                             f"rows do not match the {len(panel)} panel genes; pass the gene list file (one gene per "
                             "line, in the row order of the .npy)")
        if not gpath.is_file():
            raise InputError(f"gene list {gpath} does not exist; pass the file naming the rows of {p}")
        genes = [g.strip() for g in gpath.read_text().splitlines() if g.strip()]
        if len(genes) != vectors.shape[0]:
            raise InputError(f"{p} has shape {vectors.shape} but {gpath} lists {len(genes)} genes; the gene list "
                             "must name each row of the array")
    else:
        genes, vectors = _read_word2vec_text(p)
    row_of = {}
    for i, g in enumerate(genes):
        row_of.setdefault(_gene_key(g), i)
    table = np.zeros((len(panel) + 1, vectors.shape[1]), dtype=np.float64)
    hits = np.array([row_of.get(_gene_key(g), -1) for g in panel], dtype=np.int64)
    found = hits >= 0
    table[:-1][found] = vectors[hits[found]]
    n_found = int(found.sum())
    if n_found == 0:
        raise InputError(f"none of the {len(panel)} panel genes is in {p} (it has e.g. {', '.join(genes[:5])}); use "
                         "embeddings with the panel's gene naming")
    logger.info("Gene2Vec: %d of %d panel genes found in %s%s", n_found, len(panel), p,
                "; the others get zero vectors" if n_found < len(panel) else "")
    return table, n_found


# ----------------------------------------------------------------------------------------------
# Training from co-expression, and saving
# ----------------------------------------------------------------------------------------------

def coexpression_pairs(X: sp.csr_matrix, top_k: int = 10, min_corr: float = 0.2, min_cells: int = 3,
                       block: int = 1024) -> np.ndarray:
    """Gene pairs (i < j, int64 (p, 2)) that are co-expressed: each gene's top_k partners by Pearson
    correlation across cells (log-normalised values), kept when the correlation is >= min_corr.
    Genes expressed in fewer than min_cells cells take no part. Blocked so memory is block x genes."""
    n, g = X.shape
    X = sp.csc_matrix(X)
    expressed = np.diff(X.indptr) >= min_cells
    genes = np.flatnonzero(expressed)
    if len(genes) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    Z = X[:, genes].toarray().astype(np.float32)          # (cells, used genes); cells are capped by the caller
    Z -= Z.mean(axis=0)
    std = np.sqrt((Z * Z).mean(axis=0))
    Z /= np.where(std > 0, std, 1.0)
    m = len(genes)
    k = min(top_k, m - 1)
    pairs = []
    for a in range(0, m, block):
        b = min(a + block, m)
        corr = (Z[:, a:b].T @ Z) / n                      # (block, used genes)
        corr[np.arange(b - a), np.arange(a, b)] = -np.inf  # no self pairs
        part = np.argpartition(-corr, k - 1, axis=1)[:, :k]
        val = np.take_along_axis(corr, part, axis=1)
        rows, cols = np.nonzero(val >= min_corr)
        pairs.append(np.stack([rows + a, part[rows, cols]], axis=1))
    p = np.concatenate(pairs)
    p = np.sort(genes[p], axis=1)                          # back to column numbers of X, i < j
    return np.unique(p, axis=0)


def train_gene2vec(adata: ad.AnnData, dim: int = 200, seed: int = 2021, input_format: str = "auto",
                   max_cells: int = 3000, top_k: int = 30, min_corr: float = 0.1, epochs: int | None = None,
                   workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Gene2Vec-style embeddings (Du et al. 2019) from this dataset's co-expression.

    Each co-expressed gene pair (see `coexpression_pairs`, over up to max_cells sampled cells) is a
    two-word sentence for gensim's skip-gram Word2Vec (window 1, negative sampling), so genes that are
    expressed together get nearby vectors. epochs=None scales the passes so that each paired gene is
    updated ~800 times (small corpora need many passes). Skip-gram on so few distinct contexts pushes every
    trained vector along one shared direction; it carries no gene-specific information and would make
    all genes look alike, so the mean of the trained vectors is subtracted. Genes without a pair keep
    their small seeded random start vector. workers=1 keeps the result reproducible for a seed.
    Returns (float32 (n_genes, dim), genes).
    """
    from gensim.models import Word2Vec

    fmt = detect_input_format(adata, input_format)
    rng = np.random.default_rng(seed)
    rows = np.arange(adata.n_obs)
    if adata.n_obs > max_cells:
        rows = np.sort(rng.choice(adata.n_obs, max_cells, replace=False))
    reader = _RowReader(adata)
    try:
        X = log_normalised(reader.read(rows), fmt)
    finally:
        reader.close()
    pairs = coexpression_pairs(X, top_k=top_k, min_corr=min_corr)
    genes = [str(gname) for gname in adata.var_names]
    words = [f"g{i}" for i in range(len(genes))]            # gene names may contain anything; indices do not
    sentences = [[words[i], words[j]] for i, j in pairs[rng.permutation(len(pairs))]]
    paired = np.zeros(len(genes), dtype=bool)
    paired[pairs.ravel()] = True
    # a one-word sentence puts the gene in the vocabulary without any context to train on
    sentences += [[words[i]] for i in np.flatnonzero(~paired)]
    if epochs is None:
        # ~800 updates per paired gene: fewer leave the vectors of well-connected genes undifferentiated
        epochs = int(min(200, max(5, math.ceil(800 * paired.sum() / max(2 * len(pairs), 1)))))
    logger.info("Gene2Vec: %d co-expressed pairs over %d genes (%d genes without a pair), %d cells, %d epochs",
                len(pairs), len(genes), int((~paired).sum()), len(rows), epochs)
    gensim_log = logging.getLogger("gensim")
    level = gensim_log.level
    gensim_log.setLevel(max(level, logging.WARNING))  # gensim logs every epoch at INFO
    try:
        model = Word2Vec(sentences=sentences, vector_size=dim, window=1, min_count=1, sg=1, negative=5, sample=0,
                         epochs=epochs, seed=seed, workers=workers)
    finally:
        gensim_log.setLevel(level)
    vectors = np.stack([model.wv[w] for w in words]).astype(np.float32)
    if paired.any():
        vectors[paired] -= vectors[paired].mean(axis=0)
    return vectors, genes


def save_gene2vec(path: str | os.PathLike, vectors: np.ndarray, genes: Sequence[str]) -> Path:
    """Write the published layout: <prefix>.npy (n_genes, dim) and <prefix>.txt (one gene per line).
    Both files are written to temporary names first and renamed. Returns the .npy path."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(genes):
        raise ValueError(f"vectors of shape {vectors.shape} do not match {len(genes)} genes")
    p = Path(path)
    npy = p if p.suffix == ".npy" else p.with_name(p.name + ".npy")
    txt = npy.with_suffix(".txt")
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp_npy, tmp_txt = npy.with_name(npy.name + ".tmp"), txt.with_name(txt.name + ".tmp")
    with open(tmp_npy, "wb") as f:
        np.save(f, vectors)
    tmp_txt.write_text("".join(f"{g}\n" for g in genes))
    os.replace(tmp_npy, npy)
    os.replace(tmp_txt, txt)
    return npy
