"""The one module the scripts import. It re-exports the public names of

- data_utils.py: reading data, input detection, gene panels, binning, masking, datasets, splits;
- gene2vec.py: Gene2Vec embeddings (load, train from co-expression, save);
- train_utils.py: distributed setup, precision, schedule, checkpoints, RNG state, metrics log, plots;

and holds the little glue that composes them the same way in every script.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_utils import *  # noqa: F401,F403  (the data API, InputError included)
from data_utils import InputError
from gene2vec import coexpression_pairs, load_gene2vec, save_gene2vec, train_gene2vec  # noqa: F401
from train_utils import *  # noqa: F401,F403
from train_utils import DistContext, barrier, logger


def dataset_panel(adata: Any, gene_num: int | None, input_format: str) -> list[str]:
    """The panel a model trained from scratch uses: every gene of the data (case-insensitive repeats
    merged), or its `gene_num` most highly variable genes (scanpy's dispersion ranking on
    log-normalised values), in data order."""
    genes = panel_from_data(adata)  # noqa: F405
    if gene_num is None or gene_num >= len(genes):
        return genes
    if gene_num < 1:
        raise InputError(f"--gene_num {gene_num} must be positive; leave it out to keep every gene")
    import scanpy as sc

    log_data = align_to_panel(adata, genes, input_format=input_format)  # noqa: F405  (sums repeats)
    if input_format == "counts":
        sc.pp.normalize_total(log_data, target_sum=1e4)
        sc.pp.log1p(log_data)
    sc.pp.highly_variable_genes(log_data, n_top_genes=gene_num, flavor="seurat")
    chosen = np.flatnonzero(log_data.var["highly_variable"].to_numpy())
    return [genes[i] for i in chosen]


def gene2vec_table(gene2vec_path: str | None, aligned: Any, panel: list[str], dim: int, seed: int,
                   input_format: str, out_dir: Path, ctx: DistContext) -> Any:
    """The frozen positional table (genes + 1, dim) float64: from the file at gene2vec_path, or with
    None trained here from the data's gene co-expression (rank 0 trains it and saves it in out_dir
    as gene2vec_{dim}.npy + .txt; every rank then loads it)."""
    import torch

    path = gene2vec_path
    if path is None:
        path = Path(out_dir) / f"gene2vec_{dim}.npy"
        if ctx.is_main:
            logger.info(f"training Gene2Vec-style embeddings ({dim}-d) from the data's gene co-expression "
                        f"(pass --gene2vec_path to use a published file)")
            vectors, genes = train_gene2vec(aligned, dim=dim, seed=seed, input_format=input_format)
            save_gene2vec(path, vectors, genes)
        barrier(ctx)
    table, n_found = load_gene2vec(path, panel)
    if table.shape[1] != dim:
        raise InputError(f"the Gene2Vec file {path} has {table.shape[1]}-d vectors but the model is {dim} wide; "
                         f"use --model scbert for 200-d published vectors, or omit --gene2vec_path")
    logger.info(f"Gene2Vec: {n_found} of {len(panel)} panel genes have a vector ({path})")
    return torch.as_tensor(table, dtype=torch.float64)
