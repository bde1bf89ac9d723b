"""Streaming a collection: tokenised cells/s for a block-shuffled epoch, peak memory, shuffling quality.

1. A synthetic collection written into benchmarks/out/stream/: --cells cells (default 1,000,000) x
   16,906 genes with ~1,500 non-zeros per cell (raw counts), in --shards .h5ad files (default 20),
   written chunk by chunk (never held in memory); its first --subset cells (default 200,000) also as
   one .h5ad, one AnnData .zarr store and one TileDB-SOMA experiment (the same cells).
2. Each measurement in its own process (ru_maxrss is per process): the scripts' data steps on the
   source (open, format detection, fingerprint, panel alignment, the --min_genes pass, the block
   validation split), then one shuffled epoch of token batches through the loader the trainers use
   (data_sources.StreamedTokens.loader): from the shards at 100k cells and at all cells (one process,
   and 2 ranks running together), from the zarr store and SOMA experiment; beside it row-shuffled
   access to the one backed .h5ad as the Python API reads it today (TokenDataset + token_loader with
   a RandomSampler).
3. Shuffling quality: how many source blocks (256 consecutive cells) a batch of 8 draws on.
4. Page cache: how much of the files was resident (fincore) before each measurement.

Writes benchmarks/results_data_stream.md. Bar: >= 50k tokenised cells/s in one process from the
shards, >= 10x the row-shuffled backed access, peak RSS within 1.2x between 100k and 1M cells.
Needs ~12 GB of disk at the default size; --delete removes the collection afterwards.
Usage: nice python benchmarks/data_stream.py [--cells 1000000] [--shards 20] [--subset 200000] [--delete]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "stream"
GENES = 16_906
CHUNK = 10_000  # cells generated at once; chunk j of the collection always holds the same cells


def write_cells(path: Path, first: int, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int = 0) -> None:
    """Cells first .. first + n_cells of the collection as a CSR .h5ad written chunk by chunk with h5py
    (memory: one chunk). Chunk j is drawn from the seed (seed, j), so any file of whole chunks holds
    the same cells as the shards it overlaps."""
    import numpy as np

    from tokenize_speed import write_csr_h5ad

    assert first % CHUNK == 0
    write_csr_h5ad(path, n_cells, n_genes, nnz_per_cell,
                   lambda start: np.random.default_rng([seed, (first + start) // CHUNK]), first=first, chunk=CHUNK)


def write_soma(h5ad: Path, uri: Path, chunk: int = CHUNK) -> None:
    """The .h5ad as a TileDB-SOMA experiment (measurement RNA, X layer "data"), written chunk by chunk
    with tiledbsoma's own API: tiledbsoma.io.from_anndata (what the tests use) took 35 s for 10k of
    these cells here and grew faster than linearly."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import tiledbsoma as soma

    with h5py.File(h5ad, "r") as f:
        n_cells, n_genes = (int(v) for v in f["X"].attrs["shape"])
        obs_names = np.asarray(ad.io.read_elem(f["obs"]).index, dtype=str)
        var_names = np.asarray(ad.io.read_elem(f["var"]).index, dtype=str)
    def write_ids(collection, name: str, column: str, ids: np.ndarray) -> None:
        """A SOMA dataframe of soma_joinid 0..n-1 and one id column."""
        table = pa.Table.from_pandas(pd.DataFrame({"soma_joinid": np.arange(len(ids), dtype=np.int64), column: ids}),
                                     preserve_index=False)
        with collection.add_new_dataframe(name, schema=table.schema, index_column_names=["soma_joinid"],
                                          domain=[[0, len(ids) - 1]]) as df:
            df.write(table)

    with soma.Experiment.create(str(uri)) as exp:
        write_ids(exp, "obs", "obs_id", obs_names)
        ms = exp.add_new_collection("ms")
        rna = ms.add_new_collection("RNA", soma.Measurement)
        write_ids(rna, "var", "var_id", var_names)
        layers = rna.add_new_collection("X")
        with layers.add_new_sparse_ndarray("data", type=pa.float32(), shape=(n_cells, n_genes)) as X, \
                h5py.File(h5ad, "r") as f:
            indptr = f["X/indptr"][:]
            for start in range(0, n_cells, chunk):
                stop = min(n_cells, start + chunk)
                lo, hi = int(indptr[start]), int(indptr[stop])
                rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(indptr[start:stop + 1]))
                X.write(pa.Table.from_pydict({"soma_dim_0": rows,
                                              "soma_dim_1": f["X/indices"][lo:hi].astype(np.int64),
                                              "soma_data": f["X/data"][lo:hi]}))


def write_stores(h5ad: Path, zarr_path: Path, soma_path: Path) -> dict:
    """The subset .h5ad as a .zarr store (anndata) and a TileDB-SOMA experiment, each unless there."""
    import anndata as ad

    seconds = {}
    if not zarr_path.exists():
        t = time.perf_counter()
        adata = ad.read_h5ad(h5ad)
        tmp = zarr_path.with_name(zarr_path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        adata.write_zarr(tmp)
        os.replace(tmp, zarr_path)
        del adata
        seconds["zarr"] = time.perf_counter() - t
    if not soma_path.exists():
        t = time.perf_counter()
        tmp = soma_path.with_name(soma_path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_soma(h5ad, tmp)
        os.replace(tmp, soma_path)
        seconds["soma"] = time.perf_counter() - t
    return seconds


def write_collection(shard_dir: str, shards: int, per_shard: int, subset: str, subset_cells: int, zarr_path: str,
                     soma_path: str, nnz: int) -> dict:
    """In a child process: whatever of the collection is missing; -> seconds spent on each part."""
    written = {}
    t = time.perf_counter()
    for k in range(shards):
        path = Path(shard_dir) / f"part{k:02d}.h5ad"
        if not path.exists():
            write_cells(path, k * per_shard, per_shard, GENES, nnz)
            print(f"  shard {k + 1}/{shards} written ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    written["shards"] = time.perf_counter() - t
    t = time.perf_counter()
    if not Path(subset).exists():
        write_cells(Path(subset), 0, subset_cells, GENES, nnz)
    written["subset h5ad"] = time.perf_counter() - t
    written.update(write_stores(Path(subset), Path(zarr_path), Path(soma_path)))
    return written


def _cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def streamed_epoch(data_path: str, rank: int, world: int, batch_size: int, force_stream: bool = False) -> dict:
    """In a child process: the scripts' data steps on the source, then this rank's shuffled epoch
    (force_stream: a single .h5ad streamed whatever its size)."""
    import numpy as np

    import data_sources
    import utils

    t0 = time.perf_counter()
    source = data_sources.open_cells(data_path, stream=True) if force_stream else utils.open_cells(data_path)
    fmt = utils.detect_input_format(source)
    fingerprint = utils.data_fingerprint(source)
    panel = utils.data_genes(source)
    aligned = utils.align_to_panel(source, panel, input_format=fmt)
    cells = utils.filter_cells_min_genes(aligned, 200, drop=True)
    valid, train = aligned.split_by_block(cells, 0.01, seed=2021)
    steps_seconds = time.perf_counter() - t0
    dataset = aligned.token_dataset(5, indices=train)
    loader = dataset.loader(batch_size, rank, world, shuffle=True, seed=2021, epoch=1)
    per_batch8 = [len(np.unique(loader.order.blocks[i:i + 8])) for i in range(0, len(loader.order.items) - 7, 8)]
    seen, touched = 0, 0
    t1, c1 = time.perf_counter(), _cpu_seconds()
    for batch in loader:
        seen += batch["tokens"].shape[0]
        touched += int(batch["tokens"][:, :16].count_nonzero())  # touch the data
    epoch_seconds, cpu = time.perf_counter() - t1, _cpu_seconds() - c1
    return {"cells": int(source.n_obs), "train_cells": int(len(train)), "tokenised": seen, "format": fmt,
            "fingerprint": fingerprint[:8], "data_steps_s": steps_seconds, "epoch_s": epoch_seconds,
            "cells_per_s": seen / epoch_seconds if seen else 0.0, "cells_per_cpu_s": seen / cpu if seen else 0.0,
            "steps": len(loader), "blocks_per_batch8": float(np.mean(per_batch8)), "block_size": dataset.block_size,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def row_shuffled_backed(path: str, batch_size: int, most_cells: int) -> dict:
    """In a child process: today's Python API path, a backed .h5ad through TokenDataset and token_loader
    with a seeded RandomSampler, for the first most_cells cells of one shuffled epoch."""
    import numpy as np
    import torch

    import data_utils as du

    adata = du.read_dataset(path, backed=True)
    ds = du.TokenDataset(adata, input_format="counts", bin_num=5)
    loader = du.token_loader(ds, batch_size, shuffle=True, generator=torch.Generator().manual_seed(2021))
    seen, rows = 0, []
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for batch in loader:
        seen += batch["tokens"].shape[0]
        rows.append(batch["index"].numpy())
        if seen >= most_cells:
            break
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    rows = np.concatenate(rows)
    per_batch8 = [len(np.unique(rows[i:i + 8] // 256)) for i in range(0, len(rows) - 7, 8)]
    return {"cells": int(adata.n_obs), "tokenised": seen, "epoch_s": elapsed, "cells_per_s": seen / elapsed,
            "cells_per_cpu_s": seen / cpu, "blocks_per_batch8": float(np.mean(per_batch8)),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def resident(paths: list[str]) -> str:
    """Share of the files' bytes in the page cache (fincore), e.g. '97%'."""
    files = []
    for p in paths:
        files += [str(f) for f in Path(p).rglob("*") if f.is_file()] if Path(p).is_dir() else glob.glob(p)
    if not files or shutil.which("fincore") is None:
        return "unknown"
    cached, total = 0, 0
    for k in range(0, len(files), 200):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *files[k:k + 200]],
                             capture_output=True, text=True).stdout
        for line in out.split("\n"):
            if line.strip():
                res, size = line.split()[:2]
                cached, total = cached + int(res), total + int(size)
    return f"{100 * cached / max(total, 1):.0f}%"


def child(kind: str, **kw) -> dict:
    """Runs one measurement in a fresh process and returns its JSON."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps({"kind": kind, **kw})]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"measurement {kind} {kw} failed (its stderr is above)")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ranks_together(data_path: str, batch_size: int) -> dict:
    """Two ranks (world 2) run their epochs at the same time, each in its own process."""
    spec = {"kind": "stream", "data_path": data_path, "world": 2, "batch_size": batch_size}
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_child",
                               json.dumps({**spec, "rank": r})], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    outs = [p.communicate() for p in procs]
    wall = time.perf_counter() - t
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"a rank failed:\n{err[-3000:]}")
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    tokenised = sum(r["tokenised"] for r in res)
    epoch = max(r["epoch_s"] for r in res)
    return {"ranks": res, "tokenised": tokenised, "epoch_s": epoch, "cells_per_s": tokenised / epoch, "wall_s": wall,
            "steps": [r["steps"] for r in res]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--subset", type=int, default=200_000, help="cells of the zarr/SOMA/backed copies")
    parser.add_argument("--small", type=int, default=100_000, help="the smaller size peak RSS is compared at")
    parser.add_argument("--nnz", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--row_cells", type=int, default=20_000, help="cells read row-shuffled from the backed file")
    parser.add_argument("--delete", action="store_true", help="delete the collection afterwards")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        spec = json.loads(args._child)
        kind = spec.pop("kind")
        run = {"stream": streamed_epoch, "rows": row_shuffled_backed, "write": write_collection}[kind]
        print(json.dumps(run(**spec)))
        return

    # the parent stays small (stdlib only): Linux carries ru_maxrss across exec
    per_shard = args.cells // args.shards
    if per_shard % CHUNK or args.subset % CHUNK or args.small % per_shard:
        raise SystemExit(f"--cells / --shards, --subset and --small must be multiples of {CHUNK} cells, and --small "
                         "of the shard size")
    need_gb = (args.cells + 2 * args.subset) * args.nnz * 8 / 1e9 * 1.1
    free_gb = shutil.disk_usage(ROOT).free / 1e9
    if free_gb < need_gb + 5:
        raise SystemExit(f"the collection needs ~{need_gb:.0f} GB and {free_gb:.0f} GB are free; use fewer --cells")
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():  # a collection of another size: its disk is needed
        if old.name != f"{args.cells}x{args.shards}":
            shutil.rmtree(old)
    out = OUT / f"{args.cells}x{args.shards}"
    shard_dir, subset = out / "shards", out / f"first_{args.subset}.h5ad"
    zarr_path, soma_path = out / f"first_{args.subset}.zarr", out / f"first_{args.subset}_soma"
    shard_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    # written in a child process: a child's ru_maxrss starts at its parent's, so the parent stays small
    written = child("write", shard_dir=str(shard_dir), shards=args.shards, per_shard=per_shard, subset=str(subset),
                    subset_cells=args.subset, zarr_path=str(zarr_path), soma_path=str(soma_path), nnz=args.nnz)
    print("written:", {k: round(v) for k, v in written.items()}, flush=True)
    size_gb = sum(f.stat().st_size for f in shard_dir.glob("*.h5ad")) / 1e9

    small_dir = out / f"first_{args.small}_shards"  # links to the first shards: a folder of fewer files
    small_dir.mkdir(exist_ok=True)
    for k in range(args.small // per_shard):
        link = small_dir / f"part{k:02d}.h5ad"
        if not link.exists():
            os.symlink(shard_dir / f"part{k:02d}.h5ad", link)
    small_path = str(small_dir)

    runs = []

    def measure(label: str, kind: str, files: list[str], **kw) -> dict:
        cache = resident(files)
        res = child(kind, **kw) if kind != "ranks" else ranks_together(**kw)
        res.update(label=label, cache=cache)
        runs.append(res)
        print(label, json.dumps({k: v for k, v in res.items() if k != "ranks"}), flush=True)
        return res

    stream = {"rank": 0, "world": 1, "batch_size": args.batch_size}
    measure(f"shards, {args.small:,} cells, 1 process", "stream", [small_path], data_path=small_path, **stream)
    measure(f"shards, {args.cells:,} cells, 1 process", "stream", [str(shard_dir)], data_path=str(shard_dir),
            **stream)
    measure(f"shards, {args.cells:,} cells, 2 ranks together", "ranks", [str(shard_dir)], data_path=str(shard_dir),
            batch_size=args.batch_size)
    measure(f"zarr store, {args.subset:,} cells, 1 process", "stream", [str(zarr_path)], data_path=str(zarr_path),
            **stream)
    measure(f"TileDB-SOMA, {args.subset:,} cells, 1 process", "stream", [str(soma_path)], data_path=str(soma_path),
            **stream)
    measure(f"one .h5ad of {args.subset:,} cells streamed, 1 process", "stream", [str(subset)],
            data_path=str(subset), force_stream=True, **stream)
    row = measure(f"one backed .h5ad of {args.subset:,} cells, row-shuffled (today)", "rows", [str(subset)],
                  path=str(subset), batch_size=args.batch_size, most_cells=args.row_cells)
    load_end = os.getloadavg()[0]

    small, one = runs[0], runs[1]
    lines = [
        "# Streaming a collection: block-shuffled epochs\n",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (1-minute load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end), Python {platform.python_version()}. Wall-clock "
        "rates depend on how busy the machine is; cells per CPU-second (of the measuring process) much less. "
        f"Command: `nice python benchmarks/data_stream.py --cells {args.cells} --shards {args.shards} --subset "
        f"{args.subset} --small {args.small}`.\n",
        f"Collection: {args.cells:,} cells x {GENES:,} genes, {args.shards} CSR .h5ad shards of {per_shard:,} cells "
        f"(uncompressed, {size_gb:.1f} GB), ~{args.nnz:,} non-zeros per cell (raw counts); its first "
        f"{args.subset:,} cells also as one .h5ad, one AnnData .zarr store (anndata's default compression) and "
        "one TileDB-SOMA experiment (written with tiledbsoma's API in chunks of 10k cells). Written in "
        + ", ".join(f"{k} {v:.0f} s" for k, v in written.items()) + " (a missing entry: already there).\n",
        "Each row is its own process: the data steps of the scripts (open, format detection, fingerprint, panel "
        "alignment, the --min_genes 200 pass, a 1% validation split by block), then one shuffled epoch of token "
        f"batches (batch {args.batch_size}, dense uint8 cells x {GENES + 1:,}) from the loader the trainers use. "
        "Peak RSS is ru_maxrss of that process (torch, anndata and the indptr arrays included). 'Blocks per 8' "
        "is how many source blocks of 256 consecutive cells a batch of 8 draws on (8 is a full row shuffle). "
        "'Cache' is the share of the files' bytes in the page cache before the row (fincore).\n",
        "| source | cells tokenised | data steps (s) | epoch (s) | cells/s (wall) | cells per CPU-s | steps | "
        "blocks per 8 | peak RSS (MB) | cache |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "ranks" in r:
            rss = "/".join(f"{x['rss_mb']:,.0f}" for x in r["ranks"])
            steps = "/".join(str(s) for s in r["steps"])
            lines.append(f"| {r['label']} | {r['tokenised']:,} | {max(x['data_steps_s'] for x in r['ranks']):.1f} | "
                         f"{r['epoch_s']:.1f} | {r['cells_per_s']:,.0f} | - | {steps} | "
                         f"{r['ranks'][0]['blocks_per_batch8']:.1f} | {rss} | {r['cache']} |")
        else:
            lines.append(f"| {r['label']} | {r['tokenised']:,} | {r.get('data_steps_s', 0):.1f} | {r['epoch_s']:.1f} | "
                         f"{r['cells_per_s']:,.0f} | {r['cells_per_cpu_s']:,.0f} | {r.get('steps', '-')} | "
                         f"{r['blocks_per_batch8']:.1f} | {r['rss_mb']:,.0f} | {r['cache']} |")
    ratio = one["cells_per_s"] / row["cells_per_s"]
    rss_ratio = one["rss_mb"] / small["rss_mb"]
    lines += ["", "Bar (from the issue), measured at the sizes above:", "",
              f"- >= 50k tokenised cells/s in one process from the shards: {one['cells_per_s']:,.0f} "
              f"({'met' if one['cells_per_s'] >= 50_000 else 'not met'}).",
              f"- >= 10x the row-shuffled backed access: {ratio:.1f}x ({'met' if ratio >= 10 else 'not met'}).",
              f"- peak RSS within 1.2x between {args.small:,} and {args.cells:,} cells: {small['rss_mb']:,.0f} -> "
              f"{one['rss_mb']:,.0f} MB, {rss_ratio:.2f}x ({'met' if rss_ratio <= 1.2 else 'not met'})"
              + ("" if args.cells >= 1_000_000 else f"; measured at {args.cells:,} cells, not at 1M") + "."]
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results_data_stream.md").write_text(text)
    print(text)
    if args.delete:
        shutil.rmtree(out)
        print(f"deleted {out}")


if __name__ == "__main__":
    main()
