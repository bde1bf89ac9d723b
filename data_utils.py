"""Data side of scBERT: reading, input detection, gene-panel alignment, binning, masking, datasets
and splits (Gene2Vec embeddings are in gene2vec.py).

The token of a gene is min(floor(log2(1 + CP10k)), bin_num), where CP10k is the cell normalised to
10,000 counts over the panel genes (../shared/REFERENCE.md §1). Everything here works on CSR rows
(`.data` / `.indices` / `.indptr`) so that no dense cells x genes float matrix is ever built, and
backed .h5ad files are read a block of rows at a time.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

if TYPE_CHECKING:
    from gene_map import GeneMap

__all__ = [
    "InputError", "DEFAULT_DATA_NAME", "INPUT_FORMATS", "READABLE_FORMATS",
    "read_dataset", "detect_input_format",
    "load_gene_panel", "panel_from_data", "align_to_panel", "gene_overlap_table",
    "tokenize", "tokenize_matrix", "expressed_gene_counts", "filter_cells_min_genes",
    "mask_expressed_genes", "TokenDataset", "token_loader",
    "read_labels", "obs_columns", "stratified_splits", "stratified_folds", "data_fingerprint", "log_normalised",
]

logger = logging.getLogger("scbert.data")

DEFAULT_DATA_NAME = "pbmc68k_reduced"
INPUT_FORMATS = ("counts", "log1p")
READABLE_FORMATS = ".h5ad, 10x .h5, a 10x mtx folder, .csv/.tsv (cells x genes; text columns become obs), .loom"

# ln(1 + CP10k) cannot exceed ln(10,001) ~ 9.2; anything non-integer above this is not log1p data.
_LOG1P_MAX = 15.0
# Relative tolerance for bin edges of log1p input: float32 storage of ln(1 + c) is off by ~6e-8
# relative, so a CP10k of exactly 2**k - 1 may come back a hair below ln(2**k); 1e-6 absorbs that.
_LOG1P_EDGE_RTOL = 1e-6
_ROW_SAMPLE = 1000        # rows looked at by format detection
FINGERPRINT_CELLS = 64    # evenly spaced cells whose values enter the data fingerprint
_CHUNK_ROWS = 8192        # rows per block when walking a whole (possibly backed) matrix
_NAME_COLUMNS = ("gene_ids", "gene_symbols", "gene_id", "gene_symbol", "feature_name", "feature_id", "ensembl_id")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")


class InputError(Exception):
    """A problem the user can fix. Message form: "<what was found>; <what to do>"."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def _default_dataset() -> ad.AnnData:
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    # .raw holds ln(1 + CP10k) over the original full gene set; renormalising over the 765 kept genes
    # would inflate every value (expm1 of a row sums to ~2,000 here), so it is used exactly as stored.
    X = sp.csr_matrix(src.raw.X, dtype=np.float32)
    obs = src.obs.copy()
    obs["celltype"] = src.obs["bulk_labels"].astype(str).to_numpy()
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=src.raw.var_names.astype(str)))
    for key in ("X_umap", "X_pca"):
        if key in src.obsm:
            adata.obsm[key] = np.asarray(src.obsm[key])
    adata.uns["scbert_source"] = (
        "scanpy.datasets.pbmc68k_reduced(): .raw.X = ln(1 + CP10k) over the original full gene set, "
        "rounded to 3 decimals (700 cells x 765 genes, not renormalised); obs['celltype'] = bulk_labels")
    return adata


def _loom_names(path: Path) -> tuple[str, str]:
    import h5py

    with h5py.File(path, "r") as f:
        rows = set(f["row_attrs"].keys()) if "row_attrs" in f else set()
        cols = set(f["col_attrs"].keys()) if "col_attrs" in f else set()
    var = next((k for k in ("var_names", "Gene", "gene", "Genes", "gene_names", "Accession") if k in rows), None)
    obs = next((k for k in ("obs_names", "CellID", "CellId", "cell_names", "obs") if k in cols), None)
    if var is None or obs is None:
        raise InputError(f"{path}: loom file without gene names (row_attrs {sorted(rows)}) or cell names "
                         f"(col_attrs {sorted(cols)}); store them as row attribute 'Gene' and column attribute "
                         "'CellID'")
    return var, obs


def read_dataset(path: str | os.PathLike | None, backed: bool = False) -> ad.AnnData:
    """Read a cells x genes dataset; `None` returns the embedded default data (pbmc68k_reduced).

    Formats: .h5ad (with `backed=True` the matrix stays on disk and rows are read lazily), 10x .h5,
    a 10x mtx folder (or its matrix.mtx[.gz]), .csv/.tsv/.txt tables with cells as rows and genes as
    columns (optionally .gz), .loom. Other formats ignore `backed` and load into memory.
    """
    if path is None:
        return _default_dataset()
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"data file {p} does not exist; pass --data_path with an existing file "
                         f"({READABLE_FORMATS}), or omit it to use the default data")
    name = p.name.lower()
    stem = name[:-3] if name.endswith(".gz") else name
    try:
        if p.is_dir() or stem.endswith(".mtx"):
            import scanpy as sc

            folder = p if p.is_dir() else p.parent
            # make_unique=False: a symbol seen twice is summed during panel alignment instead of
            # becoming an unmatched "GENE-1".
            adata = sc.read_10x_mtx(folder, var_names="gene_symbols", make_unique=False)
        elif name.endswith(".h5ad"):
            adata = ad.io.read_h5ad(p, backed="r" if backed else None)
        elif name.endswith(".h5"):
            import scanpy as sc

            adata = sc.read_10x_h5(p)
        elif name.endswith(".loom"):
            var_key, obs_key = _loom_names(p)
            adata = ad.io.read_loom(p, sparse=True, var_names=var_key, obs_names=obs_key)
        elif stem.endswith((".csv", ".tsv", ".txt")):
            adata = _read_table(p, "," if stem.endswith(".csv") else "\t" if stem.endswith(".tsv") else r"\s+")
        else:
            raise InputError(f"{p}: unknown file type; accepted formats are {READABLE_FORMATS}")
    except InputError:
        raise
    except Exception as err:  # any reader failure is a file the user must fix or convert
        raise InputError(f"could not read {p} ({type(err).__name__}: {str(err)[:200]}); check that the file "
                         f"is complete and in one of the accepted formats: {READABLE_FORMATS}") from err
    if backed and not adata.isbacked:
        logger.info("backed reading only applies to .h5ad; %s was read into memory", p)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{p} holds {adata.n_obs} cells x {adata.n_vars} genes; supply a non-empty cells x genes "
                         "matrix")
    adata.var_names = adata.var_names.astype(str)
    adata.obs_names = adata.obs_names.astype(str)
    return adata


def _read_table(path: Path, sep: str) -> ad.AnnData:
    """A cells x genes text table: the first column names the cells, numeric columns are genes and
    the others (such as a column of cell types) become obs columns."""
    # the header is read apart: pandas would rename a gene named twice (ACTB, ACTB.1), and the panel
    # alignment sums repeated genes only under one name
    names = [str(n) for n in pd.read_csv(path, sep=sep, header=None, nrows=1).iloc[0].tolist()]
    frame = pd.read_csv(path, sep=sep, header=None, skiprows=1, index_col=0)
    if len(names) == frame.shape[1] + 1:
        names = names[1:]  # the header names the cell column too
    if len(names) != frame.shape[1]:
        raise InputError(f"{path}: the header has {len(names)} names for {frame.shape[1]} columns of values; "
                         f"expected cells as rows and genes as columns, the first column naming the cells")
    numeric = np.array([pd.api.types.is_numeric_dtype(frame.iloc[:, i]) for i in range(frame.shape[1])], dtype=bool)
    if not numeric.any():
        raise InputError(f"{path} has no numeric column: expected cells as rows and genes as columns, the first "
                         f"column naming the cells")
    obs = frame.iloc[:, ~numeric].copy()
    obs.columns = [n for n, keep in zip(names, ~numeric) if keep]
    obs.index = frame.index.astype(str)
    obs.index.name = None
    obs.columns.name = None
    if obs.shape[1]:
        logger.info(f"{path.name}: {int(numeric.sum())} numeric columns read as genes; {obs.shape[1]} other(s) as "
                    f"obs columns: {', '.join(map(str, obs.columns[:8]))}")
    values = frame.iloc[:, numeric].to_numpy(dtype=np.float32, na_value=np.nan)
    if np.isnan(values).any():
        logger.info(f"{path.name}: {int(np.isnan(values).sum())} empty values read as 0")
        values = np.nan_to_num(values, nan=0.0)
    genes = [n for n, keep in zip(names, numeric) if keep]
    return ad.AnnData(X=sp.csr_matrix(values), obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)))


# ----------------------------------------------------------------------------------------------
# Row access: in-memory or backed matrices, one block of rows at a time
# ----------------------------------------------------------------------------------------------

def _ranges_to_index(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Concatenation of arange(starts[i], stops[i]) without a Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def _runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs [start, stop) of sorted distinct rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return rows[np.concatenate(([0], breaks))], rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1


class _RowReader:
    """Reads arbitrary rows of adata.X as CSR float matrices.

    In memory the matrix is held as CSR. For a backed .h5ad only the path is kept; the HDF5 file is
    opened on first use in each process (so DataLoader workers never share a handle across fork) and
    only the row pointer array stays in memory.
    """

    # Runs of wanted rows closer than this many stored values are read as one span: one large HDF5
    # read is far cheaper than many small ones.
    _MERGE_GAP = 1 << 16

    def __init__(self, adata: ad.AnnData):
        self.shape = (adata.n_obs, adata.n_vars)
        self.backed = bool(adata.isbacked)
        self._file = None
        self._pid = None
        if self.backed:
            if adata.is_view:
                raise ValueError("pass the full backed AnnData and select cells with indices=, not a view")
            self.path = str(adata.filename)
            self.kind = self._probe_kind()
            self.X = None
        else:
            X = adata.X
            if X is None:
                raise InputError("the AnnData has no .X matrix; put the expression matrix in .X")
            if sp.issparse(X):
                X = X.tocsr() if not sp.isspmatrix_csr(X) else X
            else:
                X = sp.csr_matrix(np.asarray(X))
            self.X = X
            self.kind = "memory"

    def _probe_kind(self) -> str:
        import h5py

        with h5py.File(self.path, "r") as f:
            node = f["X"]
            if isinstance(node, h5py.Dataset):
                return "dense"
            enc = node.attrs.get("encoding-type", node.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if "csc" in enc:
            raise InputError(f"{self.path} stores X column-major (CSC), which cannot be read a cell at a time; "
                             "rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) or read it into "
                             "memory")
        return "csr"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state

    def _open(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
            if self.kind == "csr":
                g = self._file["X"]
                self._data, self._indices = g["data"], g["indices"]
                self._indptr = g["indptr"][:].astype(np.int64)
            else:
                self._dense = self._file["X"]
        return self._file

    def read(self, rows: np.ndarray) -> sp.csr_matrix:
        """Rows in the order given (duplicates allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.X is not None:
            return self.X[rows]
        self._open()
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = self._read_sorted(uniq)
        if len(uniq) == len(rows) and np.array_equal(uniq, rows):
            return block
        return block[inverse]

    def read_arrays(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, indices, indptr) of the rows in the order given, as `read` would hold them. Sorted
        distinct rows of a backed CSR file (the streaming case) never build a scipy matrix: its
        constructor's checks cost as much as tokenising."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.X is None and self.kind == "csr" and (len(rows) < 2 or bool((np.diff(rows) > 0).all())):
            self._open()
            return self._read_sorted_arrays(rows)
        X = self.read(rows)
        return X.data, X.indices, X.indptr

    def _read_sorted(self, rows: np.ndarray) -> sp.csr_matrix:
        n_cols = self.shape[1]
        if len(rows) == 0:
            return sp.csr_matrix((0, n_cols), dtype=np.float32)
        if self.kind == "csr":
            return sp.csr_matrix(self._read_sorted_arrays(rows), shape=(len(rows), n_cols))
        run_start, run_stop = _runs(rows)
        parts = [self._dense[a:b] for a, b in zip(run_start, run_stop)]  # a dense backed X
        return sp.csr_matrix(np.concatenate(parts, axis=0))

    def _read_sorted_arrays(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return read_csr_rows(self._data, self._indices, self._indptr, rows, self._MERGE_GAP)

    def blocks(self, chunk: int = _CHUNK_ROWS) -> Iterable[tuple[int, sp.csr_matrix]]:
        for start in range(0, self.shape[0], chunk):
            stop = min(start + chunk, self.shape[0])
            if self.X is not None:
                yield start, self.X[start:stop]
            else:
                yield start, self.read(np.arange(start, stop))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_span(array, lo: int, hi: int, dest: np.ndarray, direct: bool) -> None:
    """array[lo:hi] into dest (hi - lo values, C-contiguous): with `direct` (an h5py dataset of dest's
    dtype) straight into it, with no intermediate array; anything else is read, then cast on assignment."""
    if hi <= lo:
        return
    if direct:
        array.read_direct(dest, np.s_[lo:hi])
    else:
        dest[...] = array[lo:hi]


def read_csr_rows(data, indices, indptr: np.ndarray, rows: np.ndarray,
                  merge_gap: int = _RowReader._MERGE_GAP,
                  out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of sorted distinct `rows` of a CSR matrix stored as three arrays that
    slice like numpy (h5py datasets, zarr arrays; `indptr` in memory, int64). Runs of wanted rows
    closer than merge_gap stored values are read as one span: one large read is far cheaper than
    many small ones. Each span is read into its place in the result (no concatenation); with `out`,
    (values, indices) buffers of at least the rows' stored values, the result is views of them (cast
    to their dtypes)."""
    if len(rows) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
    run_start, run_stop = _runs(rows)
    ptr = indptr
    # merge runs separated by few stored values into spans read with one call each
    gap = ptr[run_start[1:]] - ptr[run_stop[:-1]]
    cut = np.flatnonzero(gap > merge_gap) + 1
    span_start = run_start[np.concatenate(([0], cut))]
    span_stop = run_stop[np.concatenate((cut - 1, [len(run_stop) - 1]))]
    lengths = ptr[rows + 1] - ptr[rows]
    row_ptr = np.concatenate(([0], np.cumsum(lengths)))
    total = int(row_ptr[-1])
    if out is None and len(span_start) == 1 and span_stop[0] - span_start[0] == len(rows):
        lo, hi = ptr[span_start[0]], ptr[span_stop[0]]  # the streaming case: one span of every row, as read
        return data[lo:hi], indices[lo:hi], row_ptr
    if out is None:
        out = (np.empty(total, dtype=data.dtype), np.empty(total, dtype=indices.dtype))
    values, cols = out[0][:total], out[1][:total]
    # (h5py looks a dataset's dtype up anew at each access: once per call, not once per span)
    direct_values = hasattr(data, "read_direct") and data.dtype == values.dtype
    direct_cols = hasattr(indices, "read_direct") and indices.dtype == cols.dtype
    row_span = np.searchsorted(span_stop, rows, side="right")  # span number of each wanted row
    at = 0
    for s, (a, b) in enumerate(zip(span_start, span_stop)):
        lo, hi = int(ptr[a]), int(ptr[b])
        want = rows[row_span == s]
        if len(want) == b - a:  # every row of the span: straight into place
            _read_span(data, lo, hi, values[at:at + hi - lo], direct_values)
            _read_span(indices, lo, hi, cols[at:at + hi - lo], direct_cols)
            at += hi - lo
            continue
        take = _ranges_to_index(ptr[want] - lo, ptr[want + 1] - lo)
        values[at:at + len(take)] = data[lo:hi][take]
        cols[at:at + len(take)] = indices[lo:hi][take]
        at += len(take)
    return values, cols, row_ptr


def evenly_spaced_rows(n: int, most: int) -> np.ndarray:
    """Up to `most` evenly spaced row numbers of n rows (all of them when n <= most): the cells that
    format detection and the fingerprint look at."""
    return np.arange(n) if n <= most else np.unique(np.linspace(0, n - 1, most).astype(np.int64))


def _sample_rows(adata: ad.AnnData, max_rows: int = _ROW_SAMPLE) -> sp.csr_matrix:
    rows = evenly_spaced_rows(adata.n_obs, max_rows)
    reader = _RowReader(adata)
    try:
        return reader.read(rows)
    finally:
        reader.close()


# ----------------------------------------------------------------------------------------------
# Input format detection
# ----------------------------------------------------------------------------------------------

def detect_input_format(adata: ad.AnnData, override: str = "auto") -> str:
    """Return "counts" (raw integer counts) or "log1p" (ln(1 + CP10k), as scanpy's normalize_total +
    log1p produce), judged on a sample of up to 1,000 evenly spaced cells.

    `override` ("counts" / "log1p") skips the guess but not the checks for negative, NaN or infinite
    values, which no format can bin. Data produced by `align_to_panel` carries the format it was
    aligned as in uns['scbert_input_format'], which is trusted.
    """
    if override not in ("auto",) + INPUT_FORMATS:
        raise InputError(f"input format {override!r} is not known; use auto, counts or log1p")
    recorded = adata.uns.get("scbert_input_format") if adata.uns is not None else None
    return format_of_sample(_sample_rows(adata), override, recorded)


def format_of_sample(sample: sp.csr_matrix, override: str = "auto", recorded: str | None = None) -> str:
    """detect_input_format's judgement on a CSR sample of cells (`recorded`: a format the data says it
    was aligned as, trusted under "auto")."""
    vals = np.asarray(sample.data, dtype=np.float64)
    n_rows = sample.shape[0]
    if not np.all(np.isfinite(vals)):
        raise InputError(f"found {int((~np.isfinite(vals)).sum())} NaN/infinite values in {n_rows} sampled cells; "
                         "remove or impute them (raw counts or ln(1+CP10k) are expected)")
    if vals.size and vals.min() < 0:
        raise InputError(f"found negative values (min {vals.min():.3g}) in {n_rows} sampled cells, which looks like "
                         "scaled/centred data; supply raw counts or ln(1+CP10k) (e.g. adata.raw, or the counts layer)")
    if override != "auto":
        return override
    if recorded in INPUT_FORMATS:
        return str(recorded)
    vals = vals[vals != 0]
    if vals.size == 0:
        raise InputError(f"the {n_rows} sampled cells have no non-zero value; supply a matrix of expression values "
                         "(raw counts or ln(1+CP10k))")
    if np.all(vals == np.floor(vals)):
        return "counts"
    hint = "or pass --input_format counts|log1p to override detection"
    vmax = float(vals.max())
    if vmax >= _LOG1P_MAX:
        raise InputError(f"found non-integer values up to {vmax:.4g}: neither raw counts (integers) nor ln(1+CP10k) "
                         f"(at most ~9.2); supply raw counts or scanpy-style log1p-normalised data, {hint}")
    rows_nz = np.repeat(np.arange(n_rows), np.diff(sample.indptr))
    expr = np.expm1(np.asarray(sample.data, dtype=np.float64))
    if np.all(np.abs(expr - np.round(expr)) < 1e-3):
        raise InputError("values are ln(1 + integer): log1p of raw counts without per-cell normalisation; supply the "
                         f"raw counts (or normalise with scanpy normalize_total(target_sum=1e4) then log1p), {hint}")
    totals = np.bincount(rows_nz, weights=expr, minlength=n_rows)
    med = float(np.median(totals[totals > 0]))
    if med > 1.2e4:
        raise InputError(f"values look log-transformed but expm1 of a cell sums to ~{med:,.0f} (median), more than the "
                         "10,000 of ln(1+CP10k) (log2/log10 or CPM?); supply raw counts or scanpy "
                         f"normalize_total(target_sum=1e4) + log1p data, {hint}")
    return "log1p"


# ----------------------------------------------------------------------------------------------
# Gene panel and alignment
# ----------------------------------------------------------------------------------------------

def _gene_key(name: str) -> str:
    """Matching key: case-insensitive, Ensembl version suffix dropped (ENSG00000123.12 -> ENSG00000123)."""
    key = str(name).strip().upper()
    m = _ENSEMBL_VERSION.match(key)
    return m.group(1) if m else key


def load_gene_panel(path: str | os.PathLike) -> list[str]:
    """One gene per line in model order; blank lines ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"gene panel file {p} does not exist; pass --gene_panel with a text file, one gene per line")
    genes = [line.strip() for line in p.read_text().splitlines()]
    genes = [g for g in genes if g]
    if not genes:
        raise InputError(f"gene panel file {p} lists no genes; write one gene symbol or Ensembl ID per line")
    keys = pd.Series([_gene_key(g) for g in genes])
    dup = keys[keys.duplicated()].unique()
    if len(dup):
        raise InputError(f"gene panel {p} lists {len(dup)} genes more than once (e.g. {', '.join(dup[:5])}); "
                         "keep each gene once")
    return genes


def panel_from_data(adata: ad.AnnData, gene_map: GeneMap | None = None) -> list[str]:
    """The data's own genes as a panel: var_names in order (renamed by the gene map, if one is
    given), repeats (case-insensitive) kept once."""
    seen: set[str] = set()
    panel = []
    names = list(adata.var_names) if gene_map is None else gene_map.rename(adata.var_names)
    for g in names:
        k = _gene_key(g)
        if k not in seen:
            seen.add(k)
            panel.append(str(g))
    return panel


class _PanelMap:
    """Where each dataset column goes in the panel (-1: dropped), chosen over var_names and the
    usual gene-id/symbol columns by whichever matches the most panel genes, after renaming them by
    the gene map (--gene_map), if one is given. `adata` may also be a var table alone (its index the
    var_names), as a streamed source has it."""

    def __init__(self, adata: ad.AnnData | pd.DataFrame, panel: Sequence[str], gene_map: GeneMap | None = None):
        var = adata.var if isinstance(adata, ad.AnnData) else adata
        self.panel = [str(g) for g in panel]
        keys = [_gene_key(g) for g in self.panel] if gene_map is None else gene_map.panel_keys(self.panel)
        pos = {k: i for i, k in enumerate(keys)}
        if len(pos) != len(keys):
            dup = pd.Series(keys)[pd.Series(keys).duplicated()].unique()
            raise InputError(f"the gene panel lists genes more than once (e.g. {', '.join(dup[:5])}); keep each "
                             "gene once")
        candidates = [("var_names", np.asarray(var.index, dtype=str))]
        for col in _NAME_COLUMNS:
            if col in var.columns:
                candidates.append((f"var['{col}']", var[col].astype(str).to_numpy()))
        best = None
        for label, names in candidates:
            renamed = names if gene_map is None else gene_map.rename(names)
            cols = np.fromiter((pos.get(_gene_key(n), -1) for n in renamed), dtype=np.int64, count=len(names))
            found = len(np.unique(cols[cols >= 0]))
            if best is None or found > best[2]:
                best = (label, cols, found, names)
        self.matched_on, self.col_to_panel, self.found, names = best
        if gene_map is not None:
            self.matched_on += f" through --gene_map {gene_map.source}"
        self.matched_names = np.asarray(names, dtype=str)  # the dataset's identifiers, one per column
        self.total = len(self.panel)
        mapped = self.col_to_panel[self.col_to_panel >= 0]
        self.has_duplicates = len(mapped) != len(np.unique(mapped))
        self.found_mask = np.zeros(self.total, dtype=bool)
        self.found_mask[mapped] = True
        self.example_data_genes = [str(n) for n in names[:5]]

    def check(self, min_overlap: float) -> None:
        frac = self.found / max(self.total, 1)
        if self.found == 0 or frac < min_overlap:
            missing = [g for g, hit in zip(self.panel, self.found_mask) if not hit][:5]
            raise InputError(
                f"only {self.found} of {self.total} panel genes ({frac:.1%}) were found in the data (best match on "
                f"{self.matched_on}; data genes look like {', '.join(self.example_data_genes)}; missing panel genes "
                f"look like {', '.join(missing)}); use a gene panel with the data's naming (symbols vs Ensembl IDs, "
                f"same species) or data that covers at least {min_overlap:.0%} of the panel")

    def apply(self, X: sp.csr_matrix, input_format: str) -> sp.csr_matrix:
        """Rows of X (dataset columns) -> rows over the panel, CSR float32.

        Duplicated genes are summed on the expression scale: counts add directly; log1p values are
        expm1'd, added and log1p'd again (ln(1+a) + ln(1+b) would be a product of expressions).
        Column indices within a row come back unsorted when there are no duplicates; the binning code
        only needs them unique.
        """
        X = X.tocsr() if not sp.isspmatrix_csr(X) else X
        n = X.shape[0]
        cols = self.col_to_panel[X.indices]
        keep = cols >= 0
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(X.indptr))
        row_nnz = np.bincount(rows[keep], minlength=n)
        indptr = np.concatenate(([0], np.cumsum(row_nnz)))
        data = np.asarray(X.data[keep], dtype=np.float64 if self.has_duplicates else np.float32)
        out = sp.csr_matrix((data, cols[keep].astype(np.int32), indptr), shape=(n, self.total))
        if self.has_duplicates:
            if input_format == "log1p":
                out.data = np.expm1(out.data)
            out.sum_duplicates()
            if input_format == "log1p":
                out.data = np.log1p(out.data)
            out.data = out.data.astype(np.float32)
        return out


def rescale_for_model(X, data_format: str, model_format: str) -> sp.csr_matrix:
    """Rows of X over all of the data's genes, in the input format a model was trained on, so that
    they tokenise as its training cells did (before the panel is applied: the totals need every gene).

    counts for a model trained on log1p data: ln(1 + CP10k) over all the data's genes, as scanpy's
    normalize_total + log1p made its training data (CP10k over a small panel instead would lift
    every gene by the panel's share of the counts, about 2 bins for a 765-gene panel).
    log1p for a model trained on counts: expm1, i.e. CP10k over all genes, which the counts
    tokeniser then renormalises over the panel exactly as it did the training counts."""
    if data_format == model_format:
        return X
    if (data_format, model_format) == ("counts", "log1p"):
        return log_normalised(X, "counts")
    if (data_format, model_format) == ("log1p", "counts"):
        X = sp.csr_matrix(X, dtype=np.float32, copy=True)
        X.data = np.expm1(X.data)
        return X
    raise InputError(f"input format {data_format!r} / {model_format!r} is not known; use counts or log1p")


def align_to_panel(adata: ad.AnnData, panel: Sequence[str], min_overlap: float = 0.1,
                   input_format: str = "auto", gene_map: GeneMap | None = None,
                   model_format: str | None = None) -> ad.AnnData:
    """Cells x len(panel) CSR float32 AnnData in panel order (var_names = panel).

    Genes outside the panel are dropped, panel genes the data lacks are 0, genes occurring twice are
    summed (on the expression scale for log1p data). Matching is case-insensitive, ignores Ensembl
    version suffixes, and uses var_names or var['gene_ids'] / var['gene_symbols'], whichever fits,
    after renaming them by `gene_map` (gene_map.py; several dataset genes renamed to one panel gene
    are summed). Sets uns['scbert_panel_overlap'] = {'found', 'total', 'matched_on', 'count_share'},
    uns['scbert_input_format'], and per panel gene var['in_data'], var['data_genes'] (the dataset's
    identifiers that went into it) and var['count_share'] (its share of all the dataset's counts, on
    the expression scale for log1p data): gene_overlap_table reads them. A backed input is read block
    by block but the result is in memory; for data larger than RAM give the panel to TokenDataset
    instead, which aligns each batch as it reads it.
    model_format: the input format of the model's training cells, when known (our checkpoints record
    it): data in the other format is rescaled to it first (rescale_for_model), the values come back
    in that format, and uns['scbert_data_format'] keeps the data's own.
    """
    fmt = detect_input_format(adata, input_format)
    target = model_format or fmt
    if target != fmt:
        logger.info(f"note: the model was trained on {target} data and these are {fmt}: rescaled to match ("
                    + ("ln(1 + CP10k) over all the data's genes, as scanpy's normalize_total + log1p" if target == "log1p"
                       else "expm1, then CP10k over the panel genes as the counts were") + ")")
    pmap = _PanelMap(adata, panel, gene_map)
    pmap.check(min_overlap)
    reader = _RowReader(adata)
    column_totals = np.zeros(adata.n_vars, dtype=np.float64)
    try:
        parts = []
        for _, block in reader.blocks():
            parts.append(pmap.apply(rescale_for_model(block, fmt, target), target))
            values = np.expm1(block.data.astype(np.float64)) if fmt == "log1p" else block.data
            column_totals += np.bincount(block.indices, weights=values, minlength=adata.n_vars)
    finally:
        reader.close()
    X = sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
    X.sort_indices()
    mapped = np.flatnonzero(pmap.col_to_panel >= 0)
    total = column_totals.sum()
    share = np.bincount(pmap.col_to_panel[mapped], weights=column_totals[mapped], minlength=pmap.total)
    share = share / total if total > 0 else share
    sources = pd.Series(pmap.matched_names[mapped]).groupby(pmap.col_to_panel[mapped]).agg(";".join)
    log = logger.warning if pmap.found < 0.5 * pmap.total else logger.info
    log("gene panel: %d of %d genes found in the data (matched on %s), holding %.1f%% of its counts; the missing "
        "ones get token 0", pmap.found, pmap.total, pmap.matched_on, 100 * share.sum())
    var = pd.DataFrame({"in_data": pmap.found_mask,
                        "data_genes": sources.reindex(range(pmap.total), fill_value="").to_numpy(),
                        "count_share": share}, index=pd.Index(pmap.panel))
    out = ad.AnnData(X=X.astype(np.float32, copy=False), obs=adata.obs.copy(), var=var)
    for key in adata.obsm.keys():
        out.obsm[key] = adata.obsm[key]
    out.uns.update(dict(adata.uns))
    out.uns["scbert_panel_overlap"] = {"found": int(pmap.found), "total": int(pmap.total),
                                       "matched_on": pmap.matched_on, "count_share": float(share.sum())}
    out.uns["scbert_input_format"] = target
    out.uns["scbert_data_format"] = fmt
    return out


def gene_overlap_table(aligned: ad.AnnData) -> pd.DataFrame:
    """gene_overlap.csv: every panel gene of data aligned by align_to_panel, in panel order, whether
    the data had it, as which of the data's identifiers (';'-joined when several were summed), and its
    share of the dataset's counts (the column sums to the share of the counts that mapped)."""
    var = aligned.var
    return pd.DataFrame({"panel_gene": var.index.astype(str), "found": var["in_data"].to_numpy(bool),
                         "data_genes": var["data_genes"].astype(str).to_numpy(),
                         "count_share": var["count_share"].to_numpy(np.float64),
                         "matched_on": aligned.uns["scbert_panel_overlap"]["matched_on"]})


# ----------------------------------------------------------------------------------------------
# Normalisation and binning
# ----------------------------------------------------------------------------------------------

def _bin_values(data: np.ndarray, indptr: np.ndarray, input_format: str, bin_num: int) -> np.ndarray:
    """Token (uint8) of every stored value of a block of CSR rows (`indptr` starts at 0); rows must
    not repeat a column."""
    lengths = np.diff(indptr)
    if input_format == "counts":
        value = data.astype(np.float64)  # one working array, updated in place below
        # CP10k over the columns of X (the panel). reduceat over non-empty rows only: it misreads empty ones.
        totals = np.ones(len(lengths), dtype=np.float64)
        filled = np.flatnonzero(lengths)
        if len(filled):
            totals[filled] = np.add.reduceat(value, indptr[filled])
        totals[totals == 0] = 1.0
        # q = x * 1e4 / total with x*1e4 exact for integer counts and one correctly rounded division:
        # if the true ratio reaches 2**k - 1 so does q, and if it falls short it does so by at least
        # 1/total, far more than the rounding error; so 1 + q crosses 2**k exactly where it should.
        value *= 1e4
        value /= np.repeat(totals, lengths)
        # floor(log2(1 + q)) exactly: the binary exponent of the float64 1 + q (bits 52..62, bias 1023)
        value += 1.0
        token = value.view(np.int64)
        token >>= 52
        token -= 1023
    elif input_format == "log1p":
        # x = ln(1 + c) already, so floor(log2(1 + expm1(x))) = floor(x / ln 2); working on x avoids the
        # round trip and its error. No renormalisation: c keeps the scale the data was normalised on.
        token = data.astype(np.float64)
        token *= (1.0 + _LOG1P_EDGE_RTOL) / math.log(2.0)
        np.floor(token, out=token)
    else:
        raise InputError(f"input format {input_format!r} is not known; use counts or log1p")
    np.clip(token, 0, bin_num, out=token)
    return token.astype(np.uint8)


# Rows are binned in slices of about this many stored values: the working arrays (~8 bytes a value)
# then stay in cache and are recycled by the allocator instead of being fresh pages each batch.
_BLOCK_NNZ = 1 << 16


def _tokenize_csr(X: sp.csr_matrix, input_format: str, bin_num: int, out: np.ndarray | None = None) -> np.ndarray:
    n, g = X.shape
    if out is None:
        out = np.zeros((n, g + 1), dtype=np.uint8)  # last column: the appended position, always 0
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous: the scatter writes through a flat view of it")
    positions, tokens = _nonzero_tokens(X.data, X.indices, X.indptr, g + 1, input_format, bin_num)
    out.reshape(-1)[positions] = tokens
    return out


def _nonzero_tokens(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, seq_len: int, input_format: str,
                    bin_num: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the stored values of CSR rows (columns unique within a row) and their flat positions
    in a C-ordered (rows, seq_len) array: scattering them into zeros gives the cells' tokens. Positions
    are int32 while they fit (half the memory traffic)."""
    n = len(indptr) - 1
    itype = np.int32 if n * seq_len < 2**31 else np.int64
    positions = np.empty(int(indptr[-1] - indptr[0]), dtype=itype)
    tokens = np.empty(len(positions), dtype=np.uint8)
    base = indptr[0]
    start = 0
    while start < n:
        # rows [start, stop): at least one row, then as many as fit in _BLOCK_NNZ stored values
        stop = max(start + 1, int(np.searchsorted(indptr, indptr[start] + _BLOCK_NNZ, side="right")) - 1)
        stop = min(stop, n)
        lo, hi = indptr[start], indptr[stop]
        if hi > lo:
            local_ptr = indptr[start:stop + 1] - lo
            tokens[lo - base:hi - base] = _bin_values(data[lo:hi], local_ptr, input_format, bin_num)
            pos = positions[lo - base:hi - base]
            pos[:] = np.repeat(np.arange(start * seq_len, stop * seq_len, seq_len, dtype=itype), np.diff(local_ptr))
            pos += indices[lo:hi]
        start = stop
    return positions, tokens


def checked_rows(n: int, indices: np.ndarray | None, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """A dataset's rows (default: all n) and per-cell labels as int64 arrays, checked against n cells."""
    rows = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= n)):
        raise ValueError(f"indices must be a 1-d array of row numbers in [0, {n})")
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels must have one entry per cell of the data ({n}), got shape {labels.shape}")
    return rows, labels


def _check_bin_num(bin_num: int) -> None:
    if not 1 <= int(bin_num) <= 253:
        raise InputError(f"bin_num {bin_num} is out of range; use 1..253 (tokens are uint8 with [MASK] = bin_num + 1)")


def _canonical_csr(X) -> sp.csr_matrix:
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        return X
    return sp.csr_matrix(np.asarray(X))


def tokenize_matrix(X, input_format: str, bin_num: int = 5) -> np.ndarray:
    """Tokens (rows, genes + 1) uint8 for a block of rows already in panel order (CSR or dense).

    counts: CP10k over these genes, then min(floor(log2(1 + CP10k)), bin_num), exact at bin edges.
    log1p: ln(1 + CP10k) as given (not renormalised), same bins. A 0 token is appended to every row.
    """
    _check_bin_num(bin_num)
    return _tokenize_csr(_canonical_csr(X), input_format, bin_num)


def tokenize(adata: ad.AnnData, bin_num: int = 5, input_format: str = "auto") -> np.ndarray:
    """Tokens of every cell, uint8 (cells, genes + 1); genes are adata's columns (align first)."""
    fmt = detect_input_format(adata, input_format)
    _check_bin_num(bin_num)
    out = np.zeros((adata.n_obs, adata.n_vars + 1), dtype=np.uint8)
    reader = _RowReader(adata)
    try:
        for start, block in reader.blocks():
            _tokenize_csr(_canonical_csr(block), fmt, bin_num, out=out[start:start + block.shape[0]])
    finally:
        reader.close()
    return out


def expressed_gene_counts(X, input_format: str | None = None) -> np.ndarray:
    """Number of genes with a value > 0 per cell (int64), for the ">= 200 expressed genes" rule.

    X: a CSR/dense block, or an AnnData (read block by block, backed too). Zero is zero in counts and
    in ln(1 + x), so `input_format` does not change the result; it is accepted for symmetry with
    tokenize_matrix.
    """
    if isinstance(X, ad.AnnData):
        reader = _RowReader(X)
        try:
            return np.concatenate([expressed_gene_counts(b) for _, b in reader.blocks()])
        finally:
            reader.close()
    if sp.issparse(X):
        X = _canonical_csr(X)
        return np.bincount(np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[X.data > 0],
                           minlength=X.shape[0]).astype(np.int64)
    return (np.asarray(X) > 0).sum(axis=1).astype(np.int64)


def log_normalised(X: sp.csr_matrix, input_format: str) -> sp.csr_matrix:
    """ln(1 + CP10k) of each cell over the columns of X, as a float32 CSR copy (log1p input unchanged)."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    if input_format == "counts":
        totals = np.asarray(X.sum(axis=1)).ravel()
        totals[totals == 0] = 1.0
        X.data = np.log1p(X.data * np.repeat(1e4 / totals, np.diff(X.indptr))).astype(np.float32)
    return X


def filter_cells_min_genes(adata: ad.AnnData, min_genes: int = 200, drop: bool = True) -> np.ndarray:
    """Row indices of the cells to use under the original's rule "at least min_genes expressed panel
    genes" (adata aligned to the panel). drop=True (pretraining) leaves the others out; drop=False
    (annotation) keeps every cell and only warns. Records uns['scbert_cell_filter']."""
    counts = expressed_gene_counts(adata)
    low = counts < min_genes
    n_low = int(low.sum())
    adata.uns["scbert_cell_filter"] = {"min_genes": int(min_genes), "n_below": n_low, "dropped": bool(drop and n_low)}
    if n_low:
        if drop:
            logger.warning("%d of %d cells have fewer than %d expressed panel genes and are left out",
                           n_low, adata.n_obs, min_genes)
        else:
            logger.warning("%d of %d cells have fewer than %d expressed panel genes; they are kept, but "
                           "their predictions are less reliable", n_low, adata.n_obs, min_genes)
    if drop and n_low == adata.n_obs:
        raise InputError(f"no cell has {min_genes} or more expressed panel genes (max {int(counts.max())}); "
                         "check the gene panel matches the data, or lower the minimum")
    return np.flatnonzero(~low) if drop else np.arange(adata.n_obs)


# ----------------------------------------------------------------------------------------------
# Masking (MLM pretraining)
# ----------------------------------------------------------------------------------------------

def _ceil_times(p: float, n: torch.Tensor) -> torch.Tensor:
    # The real product, not the float one: 0.55 * 100 is 55.00000000000001 in float64, and float32
    # arithmetic (as in the original) turns 0.15 * 100 into 15.000001, whose ceil is 16.
    return torch.ceil(n.double() * p - 1e-9).clamp_min(0).long()


def mask_expressed_genes(tokens: torch.Tensor, mask_prob: float = 0.15, replace_prob: float = 0.9,
                         random_token_prob: float = 0.0, bin_num: int = 5,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose positions to predict and hide them; returns (masked tokens, labels), both int64 (b, n).

    Candidates are the non-zero tokens; the last (appended) position never is. Each cell gets exactly
    ceil(mask_prob * candidates) positions, uniformly at random, capped at ceil(mask_prob * n). Each
    chosen position becomes [MASK] (bin_num + 1) with probability replace_prob, a random token in
    1..bin_num with probability random_token_prob, and otherwise keeps its token (so the two must sum
    to at most 1; 0.9 / 0.0 is the original, 0.8 / 0.1 is BERT's). Labels hold the original token at
    chosen positions and the ignore id bin_num + 1 elsewhere. Random draws come from `generator`.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise InputError(f"mask_prob {mask_prob} is outside [0, 1]; use e.g. 0.15")
    if replace_prob < 0 or random_token_prob < 0 or replace_prob + random_token_prob > 1.0 + 1e-12:
        raise InputError(f"replace_prob {replace_prob} + random_token_prob {random_token_prob} must be probabilities "
                         "summing to at most 1; use e.g. 0.9 and 0.0")
    tokens = tokens.long()
    b, n = tokens.shape
    ignore = bin_num + 1
    candidate = tokens > 0
    candidate[:, -1] = False
    # no host reads (no data-dependent sizes or boolean indexing): on a GPU the step never waits
    cap = max(0, math.ceil(n * mask_prob - 1e-9))  # _ceil_times in Python: the same float64 arithmetic
    k = torch.minimum(_ceil_times(mask_prob, candidate.sum(dim=1)), torch.tensor(cap, device=tokens.device))  # (b,)
    dev = generator.device if generator is not None else tokens.device
    scores = torch.rand((b, n), generator=generator, device=dev).to(tokens.device)
    scores.masked_fill_(~candidate, -1.0)   # never outrank a candidate; k <= candidates per row
    # the replacement dice are drawn even when nothing is chosen, so the stream does not depend on data
    dice = torch.rand((b, n), generator=generator, device=dev).to(tokens.device)
    top = scores.topk(cap, dim=1).indices                                    # (b, cap), best first
    within = torch.arange(cap, device=tokens.device)[None, :] < k[:, None]    # per-row k
    chosen = torch.zeros_like(candidate)
    chosen.scatter_(1, top, within)
    labels = torch.where(chosen, tokens, ignore)
    masked = torch.where(chosen & (dice < replace_prob), ignore, tokens)
    if random_token_prob > 0:
        swap = chosen & (dice >= replace_prob) & (dice < replace_prob + random_token_prob)
        random_tokens = torch.randint(1, bin_num + 1, (b, n), generator=generator, device=dev).to(tokens.device)
        masked = torch.where(swap, random_tokens, masked)
    return masked, labels


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

def _token_buffer(n: int, seq_len: int) -> tuple[torch.Tensor, np.ndarray]:
    """Zeroed uint8 (n, seq_len) tensor and its numpy view. Inside a DataLoader worker it lives in
    shared memory from the start, as default_collate does it, so handing the batch to the main
    process costs no extra copy."""
    if torch.utils.data.get_worker_info() is not None:
        proto = torch.empty(0, dtype=torch.uint8)
        storage = proto._typed_storage()._new_shared(n * seq_len, device=proto.device)
        out = proto.new(storage).view(n, seq_len)
        view = out.numpy()
        view.fill(0)
        return out, view
    # numpy, not torch.zeros: torch fills with its intra-op thread pool, which on a busy machine
    # costs tens of times more than the calloc'd pages numpy gets from the OS
    view = np.zeros((n, seq_len), dtype=np.uint8)
    return torch.from_numpy(view), view


class TokenDataset(torch.utils.data.Dataset):
    """Cells of an AnnData as token sequences, tokenised from CSR rows when asked for.

    Item i is the cell adata[indices[i]] (all cells if indices is None) — never a random one:
    dict(tokens=uint8 (seq_len,), label=int64 (if labels given; labels are per adata row, not per
    item), index=the adata row). Batched paths, each reading and tokenising all rows in one go:
    `dataset[list_of_items]` returns the collated dict (tokens (b, seq_len), label (b,), index (b,)),
    which `token_loader` uses through a BatchSampler; `__getitems__` serves a plain DataLoader with
    batch_size set. A backed .h5ad is read lazily (each worker opens the file itself; only the row
    pointers are in memory). `panel` aligns each batch to a gene panel on the fly for backed data
    (in-memory data is aligned once), after renaming the data's genes by `gene_map`, if given.
    """

    def __init__(self, adata: ad.AnnData, input_format: str = "auto", bin_num: int = 5,
                 labels: np.ndarray | None = None, indices: np.ndarray | None = None,
                 panel: Sequence[str] | None = None, min_overlap: float = 0.1, gene_map: GeneMap | None = None):
        _check_bin_num(bin_num)
        self.input_format = detect_input_format(adata, input_format)
        self.bin_num = int(bin_num)
        self._panel_map = None
        if panel is not None and (list(adata.var_names) != list(panel) or gene_map is not None):
            if adata.isbacked:
                self._panel_map = _PanelMap(adata, panel, gene_map)
                self._panel_map.check(min_overlap)
            else:
                adata = align_to_panel(adata, panel, min_overlap, self.input_format, gene_map)
        self.n_genes = len(panel) if self._panel_map is not None else adata.n_vars
        self.seq_len = self.n_genes + 1
        self._reader = _RowReader(adata)
        self._unique_columns = self._columns_unique_per_row(adata)
        self.indices, self.labels = checked_rows(adata.n_obs, indices, labels)

    def __len__(self) -> int:
        return len(self.indices)

    def _columns_unique_per_row(self, adata: ad.AnnData) -> bool:
        """Whether rows can be scattered as stored (no column twice in a row). In memory: checked on
        the whole matrix once. Backed: checked on a sample of rows (files written by anndata/scanpy
        are canonical); a file that fails is canonicalised batch by batch."""
        if self._reader.X is not None:
            return bool(self._reader.X.has_canonical_format)
        if self._reader.kind != "csr":
            return True  # dense rows: one value per column
        return bool(sp.csr_matrix(_sample_rows(adata)).has_canonical_format)  # the rows format detection reads

    def _nonzero_tokens(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat positions, tokens) of the non-zero tokens of adata rows, in a (len(rows), seq_len) grid."""
        data, indices, indptr = self._reader.read_arrays(rows)
        if self._panel_map is not None or not self._unique_columns:
            X = sp.csr_matrix((data, indices, indptr), shape=(len(rows), self._reader.shape[1]))
            # a panel map sums duplicated genes itself and leaves each column once per row
            X = self._panel_map.apply(X, self.input_format) if self._panel_map is not None else _canonical_csr(X)
            data, indices, indptr = X.data, X.indices, X.indptr
        return _nonzero_tokens(data, indices, indptr, self.seq_len, self.input_format, self.bin_num)

    def _tokens_into(self, rows: np.ndarray, out: np.ndarray) -> None:
        positions, tokens = self._nonzero_tokens(rows)
        out.reshape(-1)[positions] = tokens

    def tokens_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), seq_len) for adata rows, read and tokenised in one go."""
        out = np.zeros((len(rows), self.seq_len), dtype=np.uint8)
        self._tokens_into(np.asarray(rows, dtype=np.int64), out)
        return out

    def get_batch(self, items: Sequence[int], compact: bool = False) -> dict:
        """Collated batch of dataset items: tokens uint8 (b, seq_len), index int64 (b,), label int64 (b,).
        compact=True: tokens as a `SparseTokens` (the non-zero tokens and their positions, ~1/3 of the
        bytes for typical cells), which `token_loader` uses to pass batches out of worker processes."""
        rows = self.indices[np.asarray(items, dtype=np.int64).reshape(-1)]
        if compact:
            tokens = SparseTokens(len(rows), self.seq_len, *self._nonzero_tokens(rows))
        else:
            tokens, view = _token_buffer(len(rows), self.seq_len)
            self._tokens_into(rows, view)
        batch = {"tokens": tokens, "index": torch.from_numpy(rows.copy())}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[rows])
        return batch

    def __getitem__(self, i):
        if isinstance(i, (list, tuple, np.ndarray, torch.Tensor)):
            return self.get_batch(i)
        row = int(self.indices[i])
        item = {"tokens": torch.from_numpy(self.tokens_of_rows(np.array([row]))[0]), "index": row}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[row], dtype=torch.int64)
        return item

    def __getitems__(self, items: Sequence[int]) -> list[dict]:
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        block = torch.from_numpy(self.tokens_of_rows(rows))
        has_labels = self.labels is not None
        out = []
        for j, r in enumerate(rows.tolist()):
            item = {"tokens": block[j], "index": r}
            if has_labels:
                item["label"] = torch.tensor(self.labels[r], dtype=torch.int64)
            out.append(item)
        return out


class SparseTokens:
    """A batch of token rows held as its non-zero tokens and their flat positions; `dense()` -> uint8
    tensor (rows, seq_len)."""

    def __init__(self, rows: int, seq_len: int, positions: np.ndarray, tokens: np.ndarray):
        self.shape = (rows, seq_len)
        self.positions, self.tokens = positions, tokens

    def dense(self) -> torch.Tensor:
        # numpy, not torch.zeros: torch fills with its intra-op thread pool, which on a busy machine
        # costs tens of times more than the calloc'd pages numpy gets from the OS
        out = np.zeros(self.shape, dtype=np.uint8)
        out.reshape(-1)[self.positions] = self.tokens
        return torch.from_numpy(out)


class _CompactBatches(torch.utils.data.Dataset):
    """TokenDataset seen through a BatchSampler: inside a worker process, batches carry SparseTokens,
    which the loader densifies in the main process (cheaper than shipping dense rows between
    processes, most of which are zeros)."""

    def __init__(self, dataset: TokenDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, items):
        return self.dataset.get_batch(items, compact=torch.utils.data.get_worker_info() is not None)


class _TokenLoader(torch.utils.data.DataLoader):
    """A DataLoader whose batches always hold dense token tensors (see _CompactBatches)."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch.get("tokens"), SparseTokens):
                batch["tokens"] = batch["tokens"].dense()
            yield batch


def token_loader(dataset: TokenDataset, batch_size: int, shuffle: bool = False,
                 sampler: torch.utils.data.Sampler | Sequence[int] | None = None, drop_last: bool = False,
                 num_workers: int = 0, generator: torch.Generator | None = None,
                 **loader_kwargs) -> torch.utils.data.DataLoader:
    """DataLoader that tokenises a whole batch per call (no per-cell objects, no re-stacking).

    Batches are dicts: tokens uint8 (b, seq_len), index int64 (b,), label int64 (b,) if labels.
    `sampler` (e.g. a DistributedSampler; call its set_epoch as usual, or a list of items) picks the
    items; otherwise `shuffle` chooses a RandomSampler (seeded by `generator`) or the dataset order.
    Worker processes send only the non-zero tokens; the dense batch is built in the main process.
    """
    if sampler is None:
        sampler = (torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle
                   else torch.utils.data.SequentialSampler(dataset))
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
    return _TokenLoader(_CompactBatches(dataset), sampler=batches, batch_size=None, num_workers=num_workers,
                        **loader_kwargs)


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------

def read_labels(adata: ad.AnnData, label_key: str) -> np.ndarray | None:
    """obs[label_key] as strings (an object array, one entry per cell), None for a cell without a
    label (missing or blank); None for the whole if the data has no such column."""
    if label_key not in adata.obs.columns:
        return None
    return label_strings(adata.obs[label_key])


def label_strings(column) -> np.ndarray:
    """An obs column's values as strings (object array), None where missing or blank."""
    values = pd.Series(column).astype(object).to_numpy()
    strings = values.astype(str)
    missing = pd.isna(values) | (np.char.strip(strings) == "")
    labels = strings.astype(object)
    labels[missing] = None
    return labels


def obs_columns(adata: ad.AnnData, most: int = 12) -> str:
    """The first obs column names, for a message that says which columns the data has."""
    return ", ".join(map(str, adata.obs.columns[:most])) or "none"


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def _class_counts_error(labels: np.ndarray, need: int, why: str) -> None:
    names, counts = np.unique(labels, return_counts=True)
    small = [(str(nm), int(c)) for nm, c in zip(names, counts) if c < need]
    if small:
        listed = ", ".join(f"{nm} ({c})" for nm, c in small[:10])
        raise InputError(f"{len(small)} cell types have fewer than {need} cells, too few for {why}: {listed}; drop "
                         "those cells or merge the types (e.g. --min_cells_per_class), or change the split sizes")


def _shuffle_split(labels: np.ndarray, idx: np.ndarray, size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedShuffleSplit

    if size <= 0:
        return idx, idx[:0]
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    try:
        keep, held = next(splitter.split(np.zeros(len(idx)), labels[idx]))
    except ValueError as err:
        raise InputError(f"cannot make a stratified split of {len(idx)} cells ({err}); drop rare cell types "
                         "(e.g. --min_cells_per_class) or change --test_size/--valid_size") from err
    return idx[keep], idx[held]


def stratified_splits(labels: Sequence, test_size: float = 0.2, valid_size: float = 0.1,
                      seed: int = 2021, min_valid_per_class: int = 0) -> dict[str, np.ndarray]:
    """Stratified train/valid/test row indices (sorted int64).

    test_size is a fraction of all cells; valid_size is a fraction of the non-test cells. A size of 0
    gives an empty part. Classes need >= 2 cells per stage (3 when both parts are drawn). With
    min_valid_per_class N, a type with fewer than N validation cells gets more from its training
    cells, as long as at least half of its non-test cells stay for training (a proportional split
    gives a type of 12 non-test cells 1 validation cell, or none).
    """
    y = np.asarray(labels).astype(str)
    for name, size in (("test_size", test_size), ("valid_size", valid_size)):
        if not 0 <= size < 1:
            raise InputError(f"{name} {size} is outside [0, 1); use a fraction such as 0.2")
    stages = int(test_size > 0) + int(valid_size > 0)
    if stages:
        _class_counts_error(y, 1 + stages, "a stratified train/valid/test split")
    all_idx = np.arange(len(y))
    rest, test = _shuffle_split(y, all_idx, test_size, seed)
    train, valid = _shuffle_split(y, rest, valid_size, seed)
    if valid_size > 0 and min_valid_per_class > 0:
        train, valid = _top_up_validation(y, train, valid, min_valid_per_class, seed)
    return {"train": np.sort(train), "valid": np.sort(valid), "test": np.sort(test)}


def _top_up_validation(y: np.ndarray, train: np.ndarray, valid: np.ndarray, need: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves training cells of types with fewer than `need` validation cells to validation (seeded
    choice), keeping at least half of each type's non-test cells for training."""
    rng = np.random.default_rng(seed)
    moved = []
    for name in np.unique(y[train]):
        mine = train[y[train] == name]
        have = int((y[valid] == name).sum())
        spare = len(mine) - -(-(len(mine) + have) // 2)  # what may go while half the type's cells stay
        take = min(need - have, spare)
        if take > 0:
            moved.append(rng.choice(mine, size=take, replace=False))
    if not moved:
        return train, valid
    moved = np.concatenate(moved)
    return np.setdiff1d(train, moved), np.concatenate([valid, moved])


def stratified_folds(labels: Sequence, folds: int, test_size: float = 0.2, seed: int = 2021,
                     valid_size: float | None = None, min_valid_per_class: int = 0) -> list[dict[str, np.ndarray]]:
    """An outer stratified test part (test_size of all cells, the same for every fold), then a
    stratified K-fold over the rest: fold k validates on its k-th part and trains on the others; the
    fold models form an ensemble scored on the common test part (empty with test_size 0).

    valid_size None: every non-test cell validates exactly once (plain K-fold). valid_size v (a
    fraction of the non-test cells, as for one split): fold k validates on a stratified draw of v of
    the non-test cells from its own part, the rest of that part trains, so each fold model trains on
    as many cells as the single split's model (with K = 1 / v, plain K-fold; with K * v > 1, the whole
    part validates). The validation parts stay disjoint. With min_valid_per_class N the draw keeps
    up to N cells of every type its part has."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(labels).astype(str)
    if folds < 2:
        raise InputError(f"--folds {folds} is too small; use 2 or more (or no --folds for one split)")
    for name, size in (("test_size", test_size), ("valid_size", valid_size or 0.0)):
        if not 0 <= size < 1:
            raise InputError(f"{name} {size} is outside [0, 1); use a fraction such as 0.2")
    _class_counts_error(y, folds + (1 if test_size > 0 else 0), f"{folds}-fold cross-validation")
    rest, test = _shuffle_split(y, np.arange(len(y)), test_size, seed)
    _class_counts_error(y[rest], folds, f"{folds} folds after the --test_size split")
    share = 1.0 if not valid_size else min(1.0, valid_size * folds)  # of its own part, what a fold validates on
    rng = np.random.default_rng(seed)
    out = []
    kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, part in kfold.split(np.zeros(len(rest)), y[rest]):
        valid = part
        if share < 1.0:
            drawn, part_labels = [], y[rest[part]]
            for name in np.unique(part_labels):
                mine = part[part_labels == name]
                keep = min(len(mine), max(int(round(share * len(mine))), min_valid_per_class))
                drawn.append(rng.choice(mine, size=keep, replace=False))
            valid = np.concatenate(drawn)
            train = np.setdiff1d(np.arange(len(rest)), valid)
        out.append({"train": np.sort(rest[train]), "valid": np.sort(rest[valid]), "test": np.sort(test)})
    return out


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------

def data_fingerprint(adata: ad.AnnData) -> str:
    """Cheap stable hash (32 hex chars) of shape, gene names, cell names and the values of up to 64
    evenly spaced cells; the same for sparse/dense or float32/float64 storage of the same numbers."""
    h = hashlib.sha256()
    h.update(f"{adata.n_obs}x{adata.n_vars}".encode())
    h.update("\x1f".join(map(str, adata.var_names)).encode())
    h.update("\x1f".join(map(str, adata.obs_names)).encode())
    return fingerprint_values(h, _sample_rows(adata, FINGERPRINT_CELLS))


def fingerprint_values(h, sample: sp.csr_matrix) -> str:
    """Finish a fingerprint's hash with the sampled cells' values (storage-independent) -> 32 hex chars."""
    sample = sp.csr_matrix(sample).astype(np.float32)
    sample.sum_duplicates()
    sample.eliminate_zeros()
    sample.sort_indices()
    h.update(sample.indptr.astype("<i8").tobytes())
    h.update(sample.indices.astype("<i8").tobytes())
    h.update(sample.data.astype("<f4").tobytes())
    return h.hexdigest()[:32]


# Gene2Vec lives in gene2vec.py (it imports this module, so it cannot be imported here at the top);
# the names it had here still resolve, for code written against data_utils.
_MOVED_TO_GENE2VEC = ("load_gene2vec", "coexpression_pairs", "train_gene2vec", "save_gene2vec")


def __getattr__(name: str):
    if name in _MOVED_TO_GENE2VEC:
        import gene2vec

        return getattr(gene2vec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
