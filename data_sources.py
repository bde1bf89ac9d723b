"""Data sources that are streamed instead of read into memory: a folder or glob of .h5ad files (one
dataset), an AnnData .zarr store, a TileDB-SOMA experiment, and a single .h5ad too large to load.

`open_cells(path)` returns an AnnData for the small single files the quick start uses (read as
before) and a `CellSource` otherwise. A CellSource is one or more *shards* (a file, a store, an
experiment) seen as one row range; each shard keeps its own genes and is aligned to the gene panel
with its own column map, a block of rows at a time. On a panel (`CellSource.align`) the cells are
an `AlignedCells`: the data steps the scripts run (the min-genes filter, a sample for highly variable
genes or Gene2Vec, a validation split by block) stream over it, and `StreamedTokens` tokenises its
rows for training with the block-shuffled loader (`epoch_plan`, `BlockLoader`).

What is reused: anndata's element readers for obs/var (`anndata.io.read_elem`) over h5py and zarr
groups, whose CSR arrays are sliced directly (one read per span of rows); tiledbsoma's value filters,
coordinate reads and Arrow tables. What is written here: the block plan, which no loader library
offers with the contract the trainers need (an exact, resumable position; every rank the same number
of steps; see README "Data sources").
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from data_utils import (
    FINGERPRINT_CELLS, InputError, _NAME_COLUMNS, checked_rows, _bin_values, _gene_key, _PanelMap, _runs,
    _ROW_SAMPLE, _check_bin_num, evenly_spaced_rows, fingerprint_values, format_of_sample, label_strings,
    read_csr_rows, read_dataset,
)

if TYPE_CHECKING:
    from gene_map import GeneMap

__all__ = ["SomaOptions", "open_cells", "CellSource", "AlignedCells", "StreamedTokens", "EpochOrder", "epoch_plan",
           "BlockLoader", "is_streamed", "STREAM_VALUES", "BLOCK_CELLS", "BLOCKS_HELD", "HVG_SAMPLE_CELLS"]

logger = logging.getLogger("scbert.data")

# A single .h5ad whose X stores more values than this is streamed instead of read into memory
# (2e8 values: ~1.6 GB of float32 values + int32 columns, about 130k cells of 1,500 genes each).
STREAM_VALUES = 200_000_000
BLOCK_CELLS = 256       # contiguous cells read together, the unit that is shuffled (fewer for small data)
BLOCKS_HELD = 16        # blocks read into memory at once; a batch mixes cells of all of them
BATCHES_DENSIFIED = 2   # consecutive batches the block loader densifies together (1 call each cost ~10% more)
HVG_SAMPLE_CELLS = 20_000  # evenly spaced cells that the highly-variable-gene ranking of a source sees
_PASS_ROWS = 2048       # rows per read in a pass over a whole shard (~3M values: ~50 MB of working arrays)
_SOMA_LAYERS = ("raw", "data")
SOURCE_KINDS = ("a folder or glob of .h5ad files, an AnnData .zarr store, a TileDB-SOMA experiment")


def is_streamed(data) -> bool:
    """Whether `data` is a streamed source (CellSource or AlignedCells) rather than an AnnData."""
    return isinstance(data, (CellSource, AlignedCells))


@dataclass(frozen=True)
class SomaOptions:
    """How a TileDB-SOMA experiment is read (the scripts' --soma_measurement, --soma_layer, --obs_filter)."""
    measurement: str = "RNA"
    layer: str | None = None      # None: "raw" if present, else "data", else the only layer
    obs_filter: str | None = None  # a SOMA value filter on obs, e.g. "is_primary_data == True"


# ----------------------------------------------------------------------------------------------
# Shards: one readable unit each
# ----------------------------------------------------------------------------------------------

class _Shard:
    """One file, store or experiment: n_obs rows over its own genes."""
    name: str
    n_obs: int
    n_vars: int

    def var(self) -> pd.DataFrame:
        """Genes: the index is the var names, the columns the other gene identifiers."""
        raise NotImplementedError

    def obs_names(self) -> np.ndarray:
        raise NotImplementedError

    def obs_columns(self) -> list[str]:
        raise NotImplementedError

    def obs_column(self, key: str):
        """The values of obs[key] for every row, or None without such a column."""
        raise NotImplementedError

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        """obs of the given rows (index: cell names)."""
        raise NotImplementedError

    def read(self, rows: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, indices, indptr) of sorted distinct rows, over this shard's columns. A shard that
        knows stored_values_of(rows) reads them into `out` (values, indices buffers) when given."""
        raise NotImplementedError

    def stored_values_of(self, rows: np.ndarray) -> int | None:
        """How many values read(rows) returns, when known before reading (else None)."""
        return None

    def recorded_format(self) -> str | None:
        return None


class _StoreShard(_Shard):
    """An AnnData on disk, .h5ad (h5py) or .zarr: X (CSR or dense) is sliced directly; obs and var
    are read with anndata's element readers. The store is opened in each process on first use."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind, self.name = Path(path), kind, str(path)
        self._root_handle, self._pid, self._indptr, self._csr_arrays = None, None, None, None
        try:
            X = self._root()["X"]
            if self._is_group(X):
                enc = str(X.attrs.get("encoding-type", X.attrs.get("h5sparse_format", "")))
                if "csc" in enc:
                    raise InputError(f"{path} stores X column-major (CSC), which cannot be read a cell at a time; "
                                     "rewrite it as CSR (adata.X = adata.X.tocsr()) or read it into memory")
                self.dense = False
                self.n_obs, self.n_vars = (int(v) for v in X.attrs["shape"])
                self.stored_values = int(X["data"].shape[0])
            else:
                self.dense = True
                self.n_obs, self.n_vars = (int(v) for v in X.shape)
                self.stored_values = self.n_obs * self.n_vars
        except InputError:
            raise
        except Exception as err:  # a truncated file, not an AnnData, no X
            raise InputError(f"could not read {path} as an AnnData {kind} ({type(err).__name__}: "
                             f"{str(err)[:160]}); check that it is complete and was written by anndata") from err

    @staticmethod
    def _is_group(node) -> bool:
        return hasattr(node, "keys")

    def _root(self):
        if self._root_handle is None or self._pid != os.getpid():
            if self.kind == "zarr":
                import zarr

                self._root_handle = zarr.open_group(str(self.path), mode="r")
            else:
                import h5py

                # no chunk cache: blocks are read once each, and 2 MB a shard adds up over a collection
                self._root_handle = h5py.File(self.path, "r", rdcc_nbytes=0)
            self._pid = os.getpid()
            self._csr_arrays = None
        return self._root_handle

    def _x_arrays(self):
        """X's data and indices arrays of the open handle (looked up once: an h5py lookup costs
        ~0.1 ms, and an epoch reads a million cells in ~8,000 spans)."""
        root = self._root()
        if self._csr_arrays is None:
            self._csr_arrays = (root["X"]["data"], root["X"]["indices"])
        return self._csr_arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_root_handle"] = state["_pid"] = state["_csr_arrays"] = None
        return state

    @contextlib.contextmanager
    def _annotations(self):
        """The store's root for reading obs, var and uns. An .h5ad is opened for the read and closed
        after, with the handle kept for X closed first (it reopens on the next read of X): HDF5 caches
        the string heaps it reads (~5 MB for 50,000 cell names) for as long as any handle holds the file,
        which for every shard of a collection adds up to more than an epoch's working memory."""
        if self.kind == "zarr":
            yield self._root()
            return
        import h5py

        if self._root_handle is not None and self._pid == os.getpid():
            self._root_handle.close()
        self._root_handle, self._csr_arrays = None, None
        with h5py.File(self.path, "r") as root:
            yield root

    def var(self) -> pd.DataFrame:
        with self._annotations() as root:
            var = ad.io.read_elem(root["var"])
        var.index = var.index.astype(str)
        return var

    def obs_names(self) -> np.ndarray:
        with self._annotations() as root:
            group = root["obs"]
            names = ad.io.read_elem(group[group.attrs["_index"]])
        return np.asarray(names, dtype=object).astype(str)  # zarr stores give numpy StringDType

    def obs_columns(self) -> list[str]:
        with self._annotations() as root:
            return [str(c) for c in root["obs"].attrs.get("column-order", [])]

    def obs_column(self, key: str):
        if key not in self.obs_columns():
            return None
        with self._annotations() as root:
            return ad.io.read_elem(root["obs"][key])

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        with self._annotations() as root:
            obs = ad.io.read_elem(root["obs"]).iloc[rows]
        obs.index = obs.index.astype(str)
        return obs

    def recorded_format(self) -> str | None:
        with self._annotations() as root:
            if "uns" in root and "scbert_input_format" in root["uns"]:
                return str(ad.io.read_elem(root["uns"]["scbert_input_format"]))
        return None

    def _row_pointer(self) -> np.ndarray:
        if self._indptr is None:
            self._indptr = np.asarray(self._root()["X"]["indptr"][:], dtype=np.int64)
        return self._indptr

    def stored_values_of(self, rows: np.ndarray) -> int | None:
        if self.dense:
            return None
        ptr = self._row_pointer()
        return int((ptr[rows + 1] - ptr[rows]).sum())

    def read(self, rows: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.dense:
            X = self._root()["X"]
            if len(rows) == 0:
                return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
            starts, stops = _runs(rows)
            block = sp.csr_matrix(np.concatenate([X[a:b] for a, b in zip(starts, stops)], axis=0))
            return block.data, block.indices, block.indptr.astype(np.int64)
        data, indices = self._x_arrays()
        return read_csr_rows(data, indices, self._row_pointer(), rows, out=out)


# TileDB's read buffers: tiledbsoma's default (1 GiB a column) took a 200k-cell experiment's reads to a
# 6.7 GB peak RSS; at these sizes reads return in several parts (concatenated), at ~0.8 GB peak
_SOMA_READ_CONFIG = {"soma.init_buffer_bytes": 64 << 20, "sm.mem.total_budget": 256 << 20}


class _SomaShard(_Shard):
    """A TileDB-SOMA experiment: the cells obs_filter keeps (in soma_joinid order), one measurement's
    X layer, read by coordinates as Arrow tables (row-major)."""

    def __init__(self, uri: str, options: SomaOptions):
        try:
            import tiledbsoma
        except ImportError:
            raise InputError(f"{uri} is a TileDB-SOMA experiment, and reading it needs the optional package "
                             "tiledbsoma; install it with: pip install tiledbsoma") from None
        self.uri, self.name, self.options = uri, uri, options
        self._experiment, self._pid = None, None
        exp = self._open()
        if options.measurement not in exp.ms:
            raise InputError(f"the TileDB-SOMA experiment {uri} has no measurement {options.measurement!r} (it has "
                             f"{', '.join(sorted(exp.ms.keys())) or 'none'}); pass --soma_measurement with one of them")
        ms = exp.ms[options.measurement]
        layers = sorted(ms.X.keys()) if "X" in ms else []
        layer = options.layer or next((name for name in _SOMA_LAYERS if name in layers),
                                      layers[0] if len(layers) == 1 else None)
        if layer is None or layer not in layers:
            raise InputError(f"measurement {options.measurement!r} of {uri} has no X layer "
                             f"{options.layer or ' or '.join(_SOMA_LAYERS)!r} (it has {', '.join(layers) or 'none'}); "
                             "pass --soma_layer with one of them")
        self.layer = layer
        try:
            table = exp.obs.read(value_filter=options.obs_filter, column_names=["soma_joinid"]).concat()
        except Exception as err:  # tiledbsoma raises several types for a bad filter
            raise InputError(f"the obs filter {options.obs_filter!r} could not be applied to {uri} "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); write it as a SOMA value "
                             "filter over obs columns, e.g. \"is_primary_data == True\"") from None
        self.joinids = np.sort(table.column("soma_joinid").to_numpy().astype(np.int64))
        if len(self.joinids) == 0:
            raise InputError(f"no cell of {uri} passes the obs filter {options.obs_filter!r}; loosen --obs_filter")
        var_ids = ms.var.read(column_names=["soma_joinid"]).concat().column("soma_joinid").to_numpy()
        self._var_joinids = np.asarray(var_ids, dtype=np.int64)
        self._column_of = np.full(int(self._var_joinids.max()) + 1, -1, dtype=np.int64)
        self._column_of[self._var_joinids] = np.arange(len(self._var_joinids))
        self.n_obs, self.n_vars = len(self.joinids), len(self._var_joinids)
        self._obs_id = next((c for c in ("obs_id", "cell_id", "barcode") if c in exp.obs.schema.names), None)

    def _open(self):
        if self._experiment is None or self._pid != os.getpid():
            import tiledbsoma

            try:
                context = tiledbsoma.SOMATileDBContext(tiledb_config=_SOMA_READ_CONFIG)
                self._experiment = tiledbsoma.Experiment.open(self.uri, context=context)
            except Exception as err:
                raise InputError(f"could not open {self.uri} as a TileDB-SOMA experiment ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:160]}); pass --data_path with the experiment's folder "
                                 "or URI") from None
            self._pid = os.getpid()
        return self._experiment

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_experiment"] = state["_pid"] = None
        return state

    def _ms(self):
        return self._open().ms[self.options.measurement]

    def var(self) -> pd.DataFrame:
        var = self._ms().var.read().concat().to_pandas().set_index("soma_joinid").loc[self._var_joinids]
        index_column = next((c for c in ("var_id", "feature_id", "gene_ids", "feature_name") if c in var.columns),
                            None)
        names = var[index_column].astype(str) if index_column else var.index.astype(str)
        return var.set_index(pd.Index(np.asarray(names), name=None))

    def _obs_table(self, columns: list[str] | None, rows: np.ndarray | None = None) -> pd.DataFrame:
        joinids = self.joinids if rows is None else self.joinids[rows]
        table = self._open().obs.read(coords=(joinids,), column_names=columns).concat().to_pandas()
        return table.set_index("soma_joinid").loc[joinids]

    def obs_names(self) -> np.ndarray:
        if self._obs_id is None:
            return self.joinids.astype(str)
        return self._obs_table(["soma_joinid", self._obs_id])[self._obs_id].to_numpy().astype(str)

    def obs_columns(self) -> list[str]:
        return [c for c in self._open().obs.schema.names if c not in ("soma_joinid", self._obs_id)]

    def obs_column(self, key: str):
        if key not in self.obs_columns():
            return None
        return self._obs_table(["soma_joinid", key])[key].to_numpy()

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        obs = self._obs_table(None, rows)
        names = obs.pop(self._obs_id).astype(str) if self._obs_id else obs.index.astype(str)
        return obs.set_index(pd.Index(np.asarray(names), name=None))

    def read(self, rows: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        joinids = self.joinids[rows]
        if len(joinids) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
        X = self._ms().X[self.layer]
        # one read: a slice for consecutive cells (SOMA slices include their end), else the cells as
        # points (one query per run of cells costs more than points here). Result order "auto" (the
        # stored order) is ~10x faster than asking for row-major; the rows are put in order below.
        contiguous = joinids[-1] - joinids[0] == len(joinids) - 1
        coords = slice(int(joinids[0]), int(joinids[-1])) if contiguous else joinids
        table = X.read(coords=(coords,), result_order="auto").tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        cols = self._column_of[table.column("soma_dim_1").to_numpy()].astype(np.int32)
        data = table.column("soma_data").to_numpy()
        local = np.searchsorted(joinids, dim0)
        if len(local) > 1 and bool((np.diff(local) < 0).any()):
            order = np.argsort(local, kind="stable")
            local, cols, data = local[order], cols[order], data[order]
        indptr = np.concatenate(([0], np.cumsum(np.bincount(local, minlength=len(joinids))))).astype(np.int64)
        return data, cols, indptr


# ----------------------------------------------------------------------------------------------
# Opening a --data_path
# ----------------------------------------------------------------------------------------------

def _is_tiledb_group(p: Path) -> bool:
    return (p / "__tiledb_group.tdb").exists() or (p / "__group").is_dir()


def _is_zarr(p: Path) -> bool:
    return (p / ".zgroup").exists() or (p / "zarr.json").exists()


def _has_10x_mtx(p: Path) -> bool:
    return any(p.glob("*.mtx")) or any(p.glob("*.mtx.gz"))


def _single_h5ad_size(p: Path) -> int:
    """Values X stores in a .h5ad (0 if it cannot be told: read_dataset then reports the problem)."""
    try:
        return _StoreShard(p, "h5ad").stored_values
    except InputError:
        return 0


def open_cells(path: str | os.PathLike | None, soma: SomaOptions = SomaOptions(),
               stream: bool | None = None) -> ad.AnnData | CellSource:
    """The cells at --data_path: an AnnData in memory for the default data and small single files
    (as read_dataset reads them), a CellSource for a folder or glob of .h5ad files, a .zarr store, a
    TileDB-SOMA experiment (folder or URI), and a .h5ad storing more than STREAM_VALUES values
    (`stream` True/False forces the choice for a single .h5ad).

    A folder is recognised in this order: 10x mtx files (10x, in memory), .zgroup/zarr.json (zarr), a
    TileDB group (SOMA), *.h5ad inside (shards)."""
    if path is None:
        return read_dataset(None)
    text = str(path)
    if "://" in text:
        return CellSource("TileDB-SOMA experiment", text, [_SomaShard(text, soma)], soma_layer=soma)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text)) if f.endswith(".h5ad"))
        if not files:
            raise InputError(f"no .h5ad file matches {text}; pass --data_path with a glob that matches the shards "
                             f"(quote it so the shell does not expand it) or a folder holding them")
        _no_filter(soma, text)
        return CellSource("h5ad files", text, [_StoreShard(f, "h5ad") for f in files])
    p = Path(text).expanduser()
    if p.is_dir():
        if _has_10x_mtx(p):
            _no_filter(soma, text)
            return read_dataset(p)
        if _is_zarr(p):
            _no_filter(soma, text)
            return CellSource("zarr store", text, [_StoreShard(p, "zarr")])
        if _is_tiledb_group(p):
            return CellSource("TileDB-SOMA experiment", text, [_SomaShard(str(p), soma)], soma_layer=soma)
        files = sorted(p.glob("*.h5ad"))
        if not files:
            raise InputError(f"the folder {p} holds no 10x mtx files, zarr store, TileDB-SOMA experiment or .h5ad "
                             f"file; pass --data_path with a data file or a folder of .h5ad shards")
        _no_filter(soma, text)
        return CellSource("h5ad files", text, [_StoreShard(f, "h5ad") for f in files])
    _no_filter(soma, text)
    if p.suffix.lower() == ".h5ad" and p.is_file():
        big = _single_h5ad_size(p) > STREAM_VALUES if stream is None else stream
        if big:
            return CellSource("h5ad file", text, [_StoreShard(p, "h5ad")])
    return read_dataset(p)


def _no_filter(soma: SomaOptions, where: str) -> None:
    if soma.obs_filter is not None:
        raise InputError(f"--obs_filter applies to a TileDB-SOMA experiment, and {where} is not one; drop "
                         "--obs_filter (or select the cells in the file itself)")


# ----------------------------------------------------------------------------------------------
# A source: shards as one dataset
# ----------------------------------------------------------------------------------------------

class CellSource:
    """Rows of several shards as one dataset: global row i lies in shard k with offsets[k] <= i <
    offsets[k + 1]. Nothing of X is held in memory; obs is read when a step asks for it."""

    def __init__(self, kind: str, path: str, shards: list[_Shard], soma_layer: SomaOptions | None = None):
        if not shards:
            raise InputError(f"{path} holds no cells; pass a non-empty dataset")
        for shard in shards:
            if shard.n_obs == 0 or shard.n_vars == 0:
                raise InputError(f"{shard.name} holds {shard.n_obs} cells x {shard.n_vars} genes; remove it or supply "
                                 "a non-empty cells x genes matrix")
        self.kind, self.path, self.shards = kind, path, shards
        self.offsets = np.concatenate(([0], np.cumsum([s.n_obs for s in shards]))).astype(np.int64)
        self.n_obs = int(self.offsets[-1])
        self.soma = soma_layer
        keys = set()
        for shard in shards:
            keys.update(_gene_key(g) for g in shard.var().index)
        self.n_vars = len(keys)  # distinct genes over all shards
        self.uns: dict = {}

    def __repr__(self) -> str:
        return f"CellSource({self.kind} {self.path}: {self.n_obs} cells in {len(self.shards)} shard(s))"

    def locate(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard number, positions in `rows`, local rows) for sorted global rows, shard by shard."""
        rows = np.asarray(rows, dtype=np.int64)
        cuts = np.searchsorted(rows, self.offsets)
        for k in range(len(self.shards)):
            a, b = int(cuts[k]), int(cuts[k + 1])
            if b > a:
                yield k, np.arange(a, b), rows[a:b] - self.offsets[k]

    def read_raw(self, rows: np.ndarray) -> sp.csr_matrix:
        """Sorted global rows in their shards' own columns (padded to the widest shard): values only
        mean something with their shard's genes, which the format checks do not need."""
        width = max(s.n_vars for s in self.shards)
        parts = [sp.csr_matrix(self.shards[k].read(local), shape=(len(local), width))
                 for k, _, local in self.locate(rows)]
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    # the data steps of the scripts, streamed

    def input_format(self, override: str = "auto") -> str:
        """As detect_input_format, on up to 1,000 evenly spaced cells across the shards."""
        if override not in ("auto", "counts", "log1p"):
            raise InputError(f"input format {override!r} is not known; use auto, counts or log1p")
        recorded = {s.recorded_format() for s in self.shards}
        sample = self.read_raw(evenly_spaced_rows(self.n_obs, _ROW_SAMPLE))
        return format_of_sample(sample, override, recorded.pop() if len(recorded) == 1 else None)

    def fingerprint(self) -> str:
        """A stable hash of shapes, gene names, cell names (streamed shard by shard) and the values of
        64 evenly spaced cells. A single .h5ad gets the fingerprint it has when read into memory, so
        a checkpoint made either way recognises its data."""
        h = hashlib.sha256()
        if len(self.shards) == 1 and self.soma is None:
            shard = self.shards[0]
            h.update(f"{shard.n_obs}x{shard.n_vars}".encode())
            h.update("\x1f".join(shard.var().index).encode())
            h.update("\x1f".join(shard.obs_names()).encode())
        else:
            h.update(f"{self.kind}: {len(self.shards)} shards, {self.n_obs} cells".encode())
            if self.soma is not None:
                h.update(f"measurement {self.soma.measurement}, layer {self.shards[0].layer}".encode())
            for shard in self.shards:
                h.update(f"\x1e{shard.n_obs}x{shard.n_vars}\x1e".encode())
                h.update("\x1f".join(shard.var().index).encode())
            for shard in self.shards:
                h.update("\x1f".join(shard.obs_names()).encode())
        return fingerprint_values(h, self.read_raw(evenly_spaced_rows(self.n_obs, FINGERPRINT_CELLS)))

    def shared_genes(self, gene_map: GeneMap | None = None) -> list[str]:
        """The genes every shard has, in the first shard's order (renamed by the gene map if given;
        case-insensitive repeats once), each shard matched on whichever of its gene identifiers fits
        best."""
        seen: set[str] = set()
        genes = []
        names = list(self.shards[0].var().index)
        for g in (names if gene_map is None else gene_map.rename(names)):
            if _gene_key(g) not in seen:
                seen.add(_gene_key(g))
                genes.append(str(g))
        for shard in self.shards[1:]:
            found = _PanelMap(shard.var(), genes, gene_map).found_mask
            genes = [g for g, hit in zip(genes, found) if hit]
            if not genes:
                raise InputError(f"{shard.name} shares no gene with the shards before it; the shards must name genes "
                                 f"the same way (symbols or Ensembl IDs), or pass --gene_panel")
        if len(self.shards) > 1:
            logger.info("%d genes are shared by all %d shards of %s", len(genes), len(self.shards), self.path)
        return genes

    def read_labels(self, key: str) -> np.ndarray | None:
        """obs[key] as strings over every shard (None where missing; a shard without the column has
        none), or None if no shard has the column."""
        parts, any_found = [], False
        for shard in self.shards:
            values = shard.obs_column(key)
            any_found |= values is not None
            parts.append(label_strings(values) if values is not None else np.full(shard.n_obs, None, dtype=object))
        return np.concatenate(parts) if any_found else None

    def obs_columns(self) -> list[str]:
        columns: list[str] = []
        for shard in self.shards:
            columns += [c for c in shard.obs_columns() if c not in columns]
        return columns

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        """obs of sorted global rows, shards' columns combined."""
        parts = [self.shards[k].obs(local) for k, _, local in self.locate(np.asarray(rows, dtype=np.int64))]
        return pd.concat(parts) if len(parts) > 1 else parts[0]

    def align(self, panel: Sequence[str], min_overlap: float = 0.1, input_format: str = "auto",
              gene_map: GeneMap | None = None) -> AlignedCells:
        return AlignedCells(self, panel, min_overlap, self.input_format(input_format), gene_map)


# ----------------------------------------------------------------------------------------------
# A source on a gene panel
# ----------------------------------------------------------------------------------------------

def _on_panel(pmap: _PanelMap, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR rows with each stored column mapped to at most one panel gene, on the panel: (data, panel
    columns, indptr), the values of genes off the panel dropped (data itself when none is)."""
    panel_cols = pmap.col_to_panel[indices]
    keep = panel_cols >= 0
    if keep.all():
        return data, panel_cols, indptr
    kept_before = np.concatenate(([0], np.cumsum(keep)))
    return data[keep], panel_cols[keep], kept_before[indptr]


def _gene_identifiers_digest(var: pd.DataFrame) -> str:
    """A digest of everything a panel map reads of var (its index and the name columns, in order)."""
    h = hashlib.sha256("\x1f".join(var.index.astype(str)).encode())
    for col in _NAME_COLUMNS:
        if col in var.columns:
            h.update(f"\x1e{col}\x1e".encode() + "\x1f".join(var[col].astype(str)).encode())
    return h.hexdigest()


class AlignedCells:
    """A CellSource on a gene panel: each shard's columns mapped to the panel (genes outside it
    dropped, repeats summed, missing genes 0), read a block of rows at a time."""

    def __init__(self, source: CellSource, panel: Sequence[str], min_overlap: float, input_format: str,
                 gene_map: GeneMap | None = None):
        self.source, self.panel, self.input_format = source, [str(g) for g in panel], input_format
        self.maps = []
        by_genes: dict[str, _PanelMap] = {}  # shards with the same gene identifiers share one map
        for shard in source.shards:
            var = shard.var()
            key = _gene_identifiers_digest(var)
            if key not in by_genes:
                pmap = _PanelMap(var, self.panel, gene_map)
                try:
                    pmap.check(min_overlap)
                except InputError as err:
                    raise InputError(f"{shard.name}: {err}") from None
                by_genes[key] = pmap
            self.maps.append(by_genes[key])
        found = np.logical_and.reduce([m.found_mask for m in self.maps])
        matched = sorted({m.matched_on for m in self.maps})
        self.found_mask = found
        self.count_share = self._count_share()
        self.uns = {"scbert_panel_overlap": {"found": int(found.sum()), "total": len(self.panel),
                                             "matched_on": ", ".join(matched),
                                             "count_share": float(self.count_share.sum())},
                    "scbert_input_format": input_format}
        n_found = [m.found for m in self.maps]
        log = logger.warning if min(n_found) < 0.5 * len(self.panel) else logger.info
        log("gene panel: %d-%d of %d genes found per shard of %s (matched on %s), holding about %.1f%% of its counts "
            "(%d evenly spaced cells); the missing ones get token 0", min(n_found), max(n_found), len(self.panel),
            source.path, ", ".join(matched), 100 * self.count_share.sum(), min(_ROW_SAMPLE, source.n_obs))
        self._canonical = [self._rows_canonical(k) for k in range(len(source.shards))]
        self._identity = [m.total == s.n_vars and np.array_equal(m.col_to_panel, np.arange(m.total))
                          for m, s in zip(self.maps, source.shards)]

    def _count_share(self) -> np.ndarray:
        """Each panel gene's share of the data's counts (on the expression scale for log1p data), as
        align_to_panel reports it, estimated on up to 1,000 evenly spaced cells (a whole pass would read
        every cell for a table)."""
        share = np.zeros(len(self.panel), dtype=np.float64)
        total = 0.0
        for k, _, local in self.source.locate(evenly_spaced_rows(self.source.n_obs, _ROW_SAMPLE)):
            shard, pmap = self.source.shards[k], self.maps[k]
            data, cols, _ = shard.read(local)
            values = np.expm1(np.asarray(data, np.float64)) if self.input_format == "log1p" else np.asarray(
                data, np.float64)
            column_totals = np.bincount(cols, weights=values, minlength=shard.n_vars)
            mapped = np.flatnonzero(pmap.col_to_panel >= 0)
            share += np.bincount(pmap.col_to_panel[mapped], weights=column_totals[mapped], minlength=len(self.panel))
            total += column_totals.sum()
        return share / total if total > 0 else share

    def gene_overlap_table(self) -> pd.DataFrame:
        """gene_overlap.csv as data_utils.gene_overlap_table gives it: found (in every shard), the data's
        identifiers that went into each panel gene (over all shards, ';'-joined) and its count share
        (estimated, see _count_share)."""
        sources: list[list[str]] = [[] for _ in self.panel]
        for pmap in self.maps:
            for col in np.flatnonzero(pmap.col_to_panel >= 0):
                name = str(pmap.matched_names[col])
                if name not in sources[pmap.col_to_panel[col]]:
                    sources[pmap.col_to_panel[col]].append(name)
        return pd.DataFrame({"panel_gene": self.panel, "found": self.found_mask,
                             "data_genes": [";".join(names) for names in sources], "count_share": self.count_share,
                             "matched_on": self.uns["scbert_panel_overlap"]["matched_on"]})

    @property
    def n_obs(self) -> int:
        return self.source.n_obs

    @property
    def n_vars(self) -> int:
        return len(self.panel)

    def _rows_canonical(self, k: int) -> bool:
        """Whether shard k's rows can be mapped as stored (no column twice in a row), judged on the rows
        format detection reads, as TokenDataset does for a backed file."""
        shard = self.source.shards[k]
        rows = evenly_spaced_rows(shard.n_obs, _ROW_SAMPLE)
        return bool(sp.csr_matrix(shard.read(rows), shape=(len(rows), shard.n_vars)).has_canonical_format)

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data float32, panel columns, indptr) of sorted distinct global rows on the panel; the
        columns of a row are distinct (not sorted)."""
        parts = list(self.source.locate(rows))
        sizes = [self.source.shards[k].stored_values_of(local) for k, _, local in parts]
        if parts and all(n is not None for n in sizes) and \
                all(self._canonical[k] and not self.maps[k].has_duplicates for k, _, _ in parts):
            return self._read_in_place(parts, sizes)
        datas, cols, lengths = [], [], []
        for k, _, local in parts:
            shard = self.source.shards[k]
            data, indices, indptr = shard.read(local)
            pmap = self.maps[k]
            if self._canonical[k] and not pmap.has_duplicates:
                # each stored value goes to at most one panel gene: renumber the columns, drop the
                # unmapped ones (the common case, without the general path's per-value row numbers)
                if self._identity[k]:  # the shard's genes are the panel, in panel order
                    datas.append(np.asarray(data, dtype=np.float32))
                    cols.append(np.asarray(indices, dtype=np.int32))
                    lengths.append(np.diff(indptr))
                    continue
                data, panel_cols, indptr = _on_panel(pmap, data, indices, indptr)
                datas.append(np.asarray(data, dtype=np.float32))
                cols.append(panel_cols.astype(np.int32))
                lengths.append(np.diff(indptr))
                continue
            X = sp.csr_matrix((data, indices, indptr), shape=(len(local), shard.n_vars))
            if not self._canonical[k]:
                X.sum_duplicates()
            X = pmap.apply(X, self.input_format)
            datas.append(X.data)
            cols.append(X.indices)
            lengths.append(np.diff(X.indptr))
        if not datas:
            return np.zeros(0, np.float32), np.zeros(0, np.int32), np.zeros(1, np.int64)
        indptr = np.concatenate(([0], np.cumsum(np.concatenate(lengths)))).astype(np.int64)
        if len(datas) == 1:
            return datas[0], cols[0], indptr
        return np.concatenate(datas), np.concatenate(cols), indptr

    def _read_in_place(self, parts: list, sizes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """read() when every shard knows its values' count beforehand and maps each stored value to at
        most one panel gene (the common case): the shards read into one pair of result buffers, and
        columns are renumbered (unmapped values dropped) there, without concatenating per-shard arrays."""
        values, cols = np.empty(sum(sizes), np.float32), np.empty(sum(sizes), np.int32)
        lengths, at = [], 0
        for (k, _, local), n in zip(parts, sizes):
            data, indices, indptr = self.source.shards[k].read(local, out=(values[at:at + n], cols[at:at + n]))
            if not self._identity[k]:  # renumber to panel columns (in place), dropping genes not on the panel
                kept, panel_cols, indptr = _on_panel(self.maps[k], data, indices, indptr)
                if len(kept) < n:
                    values[at:at + len(kept)] = kept
                n = len(kept)
                cols[at:at + n] = panel_cols
            lengths.append(np.diff(indptr))
            at += n
        indptr = np.concatenate(([0], np.cumsum(np.concatenate(lengths)))).astype(np.int64)
        return values[:at], cols[:at], indptr

    def read_csr(self, rows: np.ndarray) -> sp.csr_matrix:
        data, cols, indptr = self.read(rows)
        X = sp.csr_matrix((data, cols, indptr), shape=(len(rows), len(self.panel)))
        X.sort_indices()
        return X

    def expressed_counts(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Expressed panel genes per cell (int64) of sorted global rows (all: streamed in passes)."""
        rows = np.arange(self.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
        counts = np.zeros(len(rows), dtype=np.int64)
        for start in range(0, len(rows), _PASS_ROWS):
            data, _, indptr = self.read(rows[start:start + _PASS_ROWS])
            expressed_before = np.concatenate(([0], np.cumsum(data > 0, dtype=np.int64)))
            counts[start:start + len(indptr) - 1] = expressed_before[indptr[1:]] - expressed_before[indptr[:-1]]
        return counts

    def filter_min_genes(self, min_genes: int, drop: bool = True) -> np.ndarray:
        """filter_cells_min_genes over a streamed pass: the rows to use (sorted)."""
        counts = self.expressed_counts()
        low = counts < min_genes
        n_low = int(low.sum())
        self.uns["scbert_cell_filter"] = {"min_genes": int(min_genes), "n_below": n_low,
                                          "dropped": bool(drop and n_low)}
        if n_low:
            logger.warning("%d of %d cells have fewer than %d expressed panel genes and are %s", n_low, self.n_obs,
                           min_genes, "left out" if drop else "kept, but their predictions are less reliable")
        if drop and n_low == self.n_obs:
            raise InputError(f"no cell has {min_genes} or more expressed panel genes (max {int(counts.max())}); "
                             "check the gene panel matches the data, or lower the minimum")
        return np.flatnonzero(~low) if drop else np.arange(self.n_obs)

    def sample(self, most: int) -> ad.AnnData:
        """Up to `most` evenly spaced cells on the panel, in memory (for highly variable genes and
        Gene2Vec, which need a matrix but not every cell)."""
        rows = evenly_spaced_rows(self.n_obs, most)
        var = pd.DataFrame({"in_data": self.found_mask}, index=pd.Index(self.panel))
        sample = ad.AnnData(X=self.read_csr(rows), var=var)
        sample.uns["scbert_input_format"] = self.input_format
        return sample

    def split_by_block(self, cells: np.ndarray, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(validation rows, training rows): whole blocks of consecutive cells chosen at random (seeded),
        so that validation cells never enter training and the training epochs still read blocks."""
        cells = np.sort(np.asarray(cells, dtype=np.int64))
        starts = block_starts(cells, self.source.offsets, split_block_cells(len(cells)))
        n_blocks = len(starts) - 1
        n_valid = int(round(n_blocks * ratio)) if len(cells) > 10 else 0
        if ratio > 0 and n_valid == 0 and n_blocks > 1 and len(cells) > 10:
            n_valid = 1
        chosen = np.zeros(len(cells), dtype=bool)
        for b in np.random.default_rng(seed).permutation(n_blocks)[:n_valid]:
            chosen[starts[b]:starts[b + 1]] = True
        return cells[chosen], cells[~chosen]

    def token_dataset(self, bin_num: int = 5, labels: np.ndarray | None = None,
                      indices: np.ndarray | None = None) -> StreamedTokens:
        return StreamedTokens(self, bin_num, labels, indices)


def split_block_cells(n: int) -> int:
    """Cells per block for a validation split: BLOCK_CELLS, fewer for small data (>= ~100 blocks)."""
    return max(1, min(BLOCK_CELLS, n // 100))


def block_starts(rows: np.ndarray, offsets: np.ndarray, size: int) -> np.ndarray:
    """Boundaries (positions in sorted `rows`) of blocks of up to `size` consecutive entries that
    never cross a shard boundary: block b is rows[starts[b]:starts[b + 1]]."""
    cuts = np.searchsorted(rows, offsets[1:-1])  # where each shard after the first begins
    edges = np.unique(np.concatenate(([0], cuts, [len(rows)])))
    starts = [np.arange(a, b, size) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return np.concatenate(starts + [np.array([len(rows)])]).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Tokens, and the block-shuffled epoch
# ----------------------------------------------------------------------------------------------

def _bin_rows(data: np.ndarray, indptr: np.ndarray, input_format: str, bin_num: int) -> np.ndarray:
    """Token of every stored value of CSR rows, binned in slices of ~64k values (see _bin_values)."""
    tokens = np.empty(len(data), dtype=np.uint8)
    n, start = len(indptr) - 1, 0
    while start < n:
        stop = min(n, max(start + 1, int(np.searchsorted(indptr, indptr[start] + (1 << 16), side="right")) - 1))
        lo, hi = indptr[start], indptr[stop]
        if hi > lo:
            tokens[lo:hi] = _bin_values(data[lo:hi], indptr[start:stop + 1] - lo, input_format, bin_num)
        start = stop
    return tokens


class _TokenRows:
    """Token rows in memory as CSR (tokens, panel columns, row pointers)."""

    def __init__(self, tokens: np.ndarray, cols: np.ndarray, indptr: np.ndarray):
        self.tokens, self.cols, self.indptr = tokens, cols, indptr
        self._matrix = None  # the rows as a scipy CSR matrix, made on the first dense_batch

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    def dense_batch(self, order: np.ndarray, seq_len: int) -> torch.Tensor:
        """The given rows, in that order, as one dense uint8 batch (rows, seq_len). scipy's compiled row
        selection and densification do it in two passes over the batch's values (numpy's flat-position
        scatter took about six); a row's columns are distinct, so nothing is summed."""
        if self._matrix is None:
            index = np.int32 if max(len(self.tokens), seq_len) < np.iinfo(np.int32).max else np.int64
            self._matrix = sp.csr_matrix((self.tokens, self.cols.astype(index, copy=False),
                                          self.indptr.astype(index, copy=False)), shape=(self.n, seq_len))
        return torch.from_numpy(self._matrix[np.asarray(order, dtype=np.int64)].toarray())


class StreamedTokens(torch.utils.data.Dataset):
    """TokenDataset's counterpart for an AlignedCells: item i is global row indices[i], as the same
    dict (tokens uint8 (seq_len,), index, label if labels). Training reads it with `loader`, block
    by block; item access (`dataset[items]`, `__getitems__`) reads the rows it is asked for."""

    def __init__(self, cells: AlignedCells, bin_num: int = 5, labels: np.ndarray | None = None,
                 indices: np.ndarray | None = None):
        _check_bin_num(bin_num)
        self.cells, self.bin_num, self.input_format = cells, int(bin_num), cells.input_format
        self.n_genes = len(cells.panel)
        self.seq_len = self.n_genes + 1
        self.indices, self.labels = checked_rows(cells.n_obs, indices, labels)
        self.block_size = max(1, min(BLOCK_CELLS, len(self.indices) // 64))
        self.blocks_held = BLOCKS_HELD

    def __len__(self) -> int:
        return len(self.indices)

    def token_rows(self, rows: np.ndarray) -> _TokenRows:
        """Token rows of sorted distinct global rows."""
        data, cols, indptr = self.cells.read(np.asarray(rows, dtype=np.int64))
        return _TokenRows(_bin_rows(data, indptr, self.input_format, self.bin_num), cols, indptr)

    def dense_tokens(self, rows: np.ndarray) -> torch.Tensor:
        """Dense uint8 tokens (len(rows), seq_len) of global rows in the order given (read sorted, once each)."""
        uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        return self.token_rows(uniq).dense_batch(inverse, self.seq_len)

    def tokens_of_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.dense_tokens(rows).numpy()

    def get_batch(self, items: Sequence[int]) -> dict:
        rows = self.indices[np.asarray(items, dtype=np.int64).reshape(-1)]
        batch = {"tokens": self.dense_tokens(rows), "index": torch.from_numpy(np.array(rows, np.int64))}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(self.labels[rows])
        return batch

    def __getitem__(self, i):
        if isinstance(i, (list, tuple, np.ndarray, torch.Tensor)):
            return self.get_batch(i)
        batch = self.get_batch([int(i)])
        item = {"tokens": batch["tokens"][0], "index": int(batch["index"][0])}
        if "label" in batch:
            item["label"] = batch["label"][0]
        return item

    def __getitems__(self, items: Sequence[int]) -> list[dict]:
        batch = self.get_batch(items)
        return [{"tokens": batch["tokens"][j], "index": int(batch["index"][j]),
                 **({"label": batch["label"][j]} if "label" in batch else {})} for j in range(len(items))]

    def loader_state(self) -> dict[str, int]:
        """What an epoch's order depends on beyond (seed, epoch, batch size, ranks): a mid-epoch
        checkpoint stores it and a resumed run must match it."""
        return {"cells": len(self), "block_size": self.block_size, "blocks_held": self.blocks_held}

    def loader(self, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int, epoch: int,
               pad: bool = True, start_step: int = 0) -> BlockLoader:
        """This rank's batches: shuffled (training) as epoch_plan lays them out; else (scoring) a
        contiguous share of the items in order (rank by rank, so gathering keeps dataset order)."""
        if shuffle:
            order = epoch_plan(self.indices, self.cells.source.offsets, self.block_size, self.blocks_held, seed,
                               epoch, rank, world_size, pad)
        else:
            n = len(self.indices)
            a, b = n * rank // world_size, n * (rank + 1) // world_size
            held = self.block_size * self.blocks_held
            order = EpochOrder(np.arange(a, b, dtype=np.int64), np.arange(0, b - a, held, dtype=np.int64),
                               np.zeros(b - a, dtype=np.int64))
        return BlockLoader(self, order, batch_size, start_step)


@dataclass(frozen=True)
class EpochOrder:
    """One rank's items for one epoch, in the order they are trained on."""
    items: np.ndarray    # dataset items (positions in StreamedTokens.indices)
    fetches: np.ndarray  # where each read of blocks begins in `items` (ascending, 0 first)
    blocks: np.ndarray   # the source block of each item (how well batches mix)


def epoch_plan(indices: np.ndarray, offsets: np.ndarray, block_size: int, blocks_held: int, seed: int, epoch: int,
               rank: int, world_size: int, pad: bool = True) -> EpochOrder:
    """The block-shuffled order of one epoch for one rank, a function of its arguments only.

    The items, taken in row order, are cut into blocks of block_size consecutive cells that never
    cross a shard; the blocks are permuted with (seed, epoch), the same on every rank; rank r takes
    blocks r, r + world_size, ... (ranks read disjoint blocks). Its blocks are read blocks_held at a
    time, and the cells of each such read are shuffled together (seeded by seed, epoch, rank). With
    pad, every rank's order is lengthened to the longest rank's by repeating its own first cells, as
    DistributedSampler pads, so all ranks take the same number of steps."""
    by_row = np.argsort(indices, kind="stable")
    starts = block_starts(indices[by_row], offsets, block_size)
    n_blocks = len(starts) - 1
    perm = np.random.default_rng([seed, epoch, 11]).permutation(n_blocks)
    sizes = np.diff(starts)
    per_rank = [int(sizes[perm[r::world_size]].sum()) for r in range(world_size)]
    mine = perm[rank::world_size]
    rng = np.random.default_rng([seed, epoch, rank, 12])
    items, blocks, fetches = [], [], []
    position = 0
    for f in range(0, len(mine), blocks_held):
        group = mine[f:f + blocks_held]
        members = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in group])
        owner = np.repeat(group, sizes[group])
        shuffle = rng.permutation(len(members))
        items.append(by_row[members[shuffle]])
        blocks.append(owner[shuffle])
        fetches.append(position)
        position += len(members)
    items = np.concatenate(items) if items else np.zeros(0, np.int64)
    blocks = np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
    target = max(per_rank) if pad else len(items)
    if target > len(items):
        source_items = items if len(items) else by_row  # a rank with no block repeats the first cells
        source_blocks = blocks if len(items) else np.zeros(len(by_row), np.int64)
        extra = np.resize(np.arange(len(source_items)), target - len(items))
        fetches.append(position)
        items = np.concatenate((items, source_items[extra]))
        blocks = np.concatenate((blocks, source_blocks[extra]))
    # int32 where it fits: at a million cells the two arrays are a sizeable part of what grows with the data
    index = np.int32 if len(indices) < np.iinfo(np.int32).max else np.int64
    return EpochOrder(items.astype(index), np.asarray(fetches, dtype=np.int64), blocks.astype(index))


class BlockLoader:
    """Batches of an EpochOrder from step `start_step` on: each fetch (a group of blocks) is read in
    row order, tokenised, put in the epoch's order, and cut into batches (a batch may span two
    fetches); fetches before the start are not read. len() is the number of batches of the epoch."""

    def __init__(self, dataset: StreamedTokens, order: EpochOrder, batch_size: int, start_step: int = 0):
        self.dataset, self.order, self.batch_size, self.start_step = dataset, order, int(batch_size), int(start_step)

    def __len__(self) -> int:
        return math.ceil(len(self.order.items) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        ds, items, b = self.dataset, self.order.items, self.batch_size
        bounds = np.append(self.order.fetches, len(items))
        position = self.start_step * b
        if position >= len(items):
            return
        f = int(np.searchsorted(bounds, position, side="right")) - 1
        # segments: the fetches read and not yet used up, in epoch order, as (token rows in row order,
        # at) where item `position + i` of the first is its held row at[i]; covered: items they hold
        segments: list[tuple[_TokenRows, np.ndarray]] = []
        covered = 0
        while position < len(items):
            stop = min(position + b, len(items))
            while position + covered < stop:  # read the next fetch (its rows sorted, each once)
                a, z = max(int(bounds[f]), position + covered), int(bounds[f + 1])
                uniq, inverse = np.unique(ds.indices[items[a:z]], return_inverse=True)
                segments.append((ds.token_rows(uniq), inverse.astype(np.int64)))
                covered += z - a
                f += 1
            # densify up to BATCHES_DENSIFIED whole batches that are read in one call (each batch a view
            # of its rows): one call a batch spent more on scipy's overhead than on the values. A batch
            # that spans two fetches is densified from each and joined (only its rows are copied).
            limit = min(len(items), position + BATCHES_DENSIFIED * b)
            if position + covered < limit:
                limit = max(stop, position + (covered // b) * b)
            parts, need = [], limit - position
            while need:
                held, at = segments[0]
                take = min(need, len(at))
                parts.append(held.dense_batch(at[:take], ds.seq_len))
                if take == len(at):
                    segments.pop(0)
                else:
                    segments[0] = (held, at[take:])
                need -= take
            dense = parts[0] if len(parts) == 1 else torch.cat(parts)
            for first in range(position, limit, b):
                last = min(first + b, limit)
                batch_rows = ds.indices[items[first:last]]
                batch = {"tokens": dense[first - position:last - position],
                         "index": torch.from_numpy(np.array(batch_rows, np.int64))}
                if ds.labels is not None:
                    batch["label"] = torch.from_numpy(ds.labels[batch_rows])
                yield batch
            covered -= limit - position
            position = limit
