"""Tokenisation throughput and memory.

1. PBMC3k in memory (../shared/data/pbmc3k_silver.h5ad, else the default pbmc68k_reduced data):
   `tokenize` on the whole matrix, and TokenDataset through a DataLoader.
2. A synthetic backed .h5ad, 200,000 cells x 20,000 genes with ~1,500 non-zeros per cell, written
   chunk by chunk into benchmarks/out/ (never held in memory), streamed through
   TokenDataset/DataLoader; peak RSS (ru_maxrss) of the main process and of the workers measured
   after 50k and after 200k cells, each in its own subprocess.

Writes benchmarks/results_tokenize.md and prints it. Goal: >= 50k cells/s and flat memory.
Usage: nice python benchmarks/tokenize_speed.py [--cells 200000] [--genes 20000] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_silver.h5ad"


def write_synthetic(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, seed: int = 0,
                    chunk: int = 10_000) -> None:
    """CSR h5ad written chunk-wise with h5py: memory stays at one chunk whatever n_cells is."""
    import numpy as np

    rng = np.random.default_rng(seed)
    write_csr_h5ad(path, n_cells, n_genes, nnz_per_cell, lambda start: rng, chunk=chunk, progress=True)


def write_csr_h5ad(path: Path, n_cells: int, n_genes: int, nnz_per_cell: int, chunk_rng, first: int = 0,
                   chunk: int = 10_000, progress: bool = False) -> None:
    """Synthetic raw counts (~nnz_per_cell distinct genes per cell, values 1, 2, 3, ...) as a CSR
    .h5ad written chunk by chunk with h5py, atomically. chunk_rng(start) gives the generator that
    draws the chunk of rows starting at `start`; cells are named cell{first + i}."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    p_gap = nnz_per_cell / n_genes
    width = int(nnz_per_cell * 1.3) + 64  # enough gaps to pass the last gene in practice
    with h5py.File(tmp, "w") as f:
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([n_cells, n_genes])
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype="float32", chunks=(1 << 18,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,))
        written = 0
        for start in range(0, n_cells, chunk):
            rows = min(chunk, n_cells - start)
            rng = chunk_rng(start)
            # distinct sorted genes per cell without a sort: cumulative sums of geometric gaps
            cols = np.cumsum(rng.geometric(p_gap, size=(rows, width)).astype(np.int32), axis=1) - 1
            keep = cols < n_genes
            r = np.broadcast_to(np.arange(rows)[:, None], cols.shape)[keep]
            c = cols[keep]
            vals = rng.geometric(0.4, len(c)).astype(np.float32)  # counts 1, 2, 3, ...
            indptr[start + 1:start + rows + 1] = written + np.cumsum(np.bincount(r, minlength=rows))
            data.resize((written + len(c),))
            indices.resize((written + len(c),))
            data[written:] = vals
            indices[written:] = c.astype(np.int32)
            written += len(c)
            if progress:
                print(f"  wrote {start + rows:,} / {n_cells:,} cells", end="\r", flush=True)
        g.create_dataset("indptr", data=indptr)
        ad.io.write_elem(f, "obs", pd.DataFrame(index=pd.Index([f"cell{first + i}" for i in range(n_cells)])))
        ad.io.write_elem(f, "var", pd.DataFrame(index=pd.Index([f"GENE{i}" for i in range(n_genes)])))
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
    os.replace(tmp, path)
    if progress:
        print()


def stream(path: str, n_cells: int, batch_size: int, workers: int) -> dict:
    """Runs in its own process: stream the first n_cells through TokenDataset/DataLoader."""
    import numpy as np
    import torch

    import data_utils as du

    adata = du.read_dataset(path, backed=True)
    ds = du.TokenDataset(adata, input_format="counts", bin_num=5, indices=np.arange(n_cells))
    dl = du.token_loader(ds, batch_size, num_workers=workers, prefetch_factor=4 if workers else None)
    seen, nonzero = 0, 0
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for batch in dl:
        seen += batch["tokens"].shape[0]
        nonzero += int(batch["tokens"][:, :16].count_nonzero())  # touch the data
    del dl  # workers exit and are reaped, so RUSAGE_CHILDREN covers them
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    kb = 1024
    return {"cells": seen, "seconds": elapsed, "cells_per_s": seen / elapsed, "cells_per_cpu_s": seen / cpu,
            "nnz_per_cell": _nnz_per_cell(path, n_cells),
            "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb,
            "rss_workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kb}


def _nnz_per_cell(path: str, n_cells: int) -> float:
    import h5py

    with h5py.File(path, "r") as f:
        return float(f["X/indptr"][n_cells] / n_cells)


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (DataLoader workers): throughput per CPU-second
    does not depend on how busy the shared machine is."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def in_memory(batch_size: int, workers: int) -> list[list]:
    """Runs in its own process. Rows of [data, path, cells/s (wall), cells per CPU-second]."""
    import torch

    import data_utils as du

    name = "PBMC3k" if PBMC3K.is_file() else "pbmc68k_reduced"
    adata = du.read_dataset(PBMC3K if PBMC3K.is_file() else None)
    du.tokenize(adata)  # warm-up
    wall, cpu = _best(lambda: du.tokenize(adata), 3)
    rows = [[f"{name} in memory ({adata.n_obs:,} x {adata.n_vars:,})", "tokenize(adata)",
             adata.n_obs / wall, adata.n_obs / cpu]]
    ds = du.TokenDataset(adata, bin_num=5)
    for w in sorted({0, workers}):
        # persistent workers: the timed passes measure steady state, not process start-up
        kw = {"num_workers": w, "persistent_workers": w > 0}
        loaders = [("token_loader", du.token_loader(ds, batch_size, shuffle=True, **kw)),
                   ("plain DataLoader(batch_size=...)",
                    torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, **kw))]
        for how, dl in loaders:
            def run():
                for _ in dl:
                    pass
            run()
            # live persistent workers are not in RUSAGE_CHILDREN yet: add their CPU time from /proc
            workers_cpu = (lambda: sum(_proc_cpu_seconds(p.pid) for p in dl._iterator._workers)) if w else None
            wall, cpu = _best(run, 3, workers_cpu)
            rows.append([f"{name} in memory", f"TokenDataset + {how}, batch {batch_size}, shuffled, {w} workers",
                         adata.n_obs / wall, adata.n_obs / cpu])
    return rows


def _best(fn, repeats: int, extra_cpu=None) -> tuple[float, float]:
    """Smallest wall time and smallest CPU time over repeats; extra_cpu() adds CPU seconds of live
    worker processes."""
    def cpu_now() -> float:
        return _cpu_seconds() + (extra_cpu() if extra_cpu else 0.0)

    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), cpu_now()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(cpu_now() - c)
    return min(walls), min(cpus)


def _proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child(*args: str) -> object:
    """Run this script in a fresh process (its ru_maxrss starts from a small parent) and return its JSON."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--_stream", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--_inmem", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stream:  # child processes
        path, n, bs, w = args._stream
        print(json.dumps(stream(path, int(n), int(bs), int(w))))
        return
    if args._inmem:
        print(json.dumps(in_memory(args.batch_size, args.workers)))
        return

    # The parent stays small (stdlib only): Linux carries ru_maxrss across exec, so a child's peak RSS
    # would otherwise start at the parent's.
    load_start = os.getloadavg()[0]
    rows = _child("--_inmem", "--batch_size", str(args.batch_size), "--workers", str(args.workers))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"synthetic_{args.cells}x{args.genes}.h5ad"
    if not path.exists():
        print(f"writing {path} ...")
        t = time.perf_counter()
        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import tokenize_speed as t; "
                f"from pathlib import Path; "
                f"t.write_synthetic(Path({str(path)!r}), {args.cells}, {args.genes}, {args.nnz})")
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"written in {time.perf_counter() - t:.0f} s")
    size_gb = path.stat().st_size / 1e9
    checkpoints = sorted({min(50_000, args.cells), args.cells})
    streams = []
    for w in sorted({0, args.workers}):
        for n in checkpoints:
            res = _child("--_stream", str(path), str(n), str(args.batch_size), str(w))
            res["workers"] = w
            streams.append(res)
            print(res, flush=True)
    load_end = os.getloadavg()[0]

    lines = ["# Tokenisation throughput and memory\n",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (1-minute load average "
             f"{load_start:.1f} at the start, {load_end:.1f} at the end), Python {platform.python_version()}. "
             "Wall-clock rates depend on how busy the machine is; cells per CPU-second (this process and its "
             "DataLoader workers) do not. Tokens: bin_num 5, uint8, genes + 1 per cell. "
             "Command: `nice python benchmarks/tokenize_speed.py`.\n",
             "| data | path | cells/s (wall) | cells per CPU-second |", "|---|---|---|---|"]
    lines += [f"| {data} | {how} | {wall:,.0f} | {cpu:,.0f} |" for data, how, wall, cpu in rows]
    nnz = streams[-1]["nnz_per_cell"]
    lines += ["", f"Backed synthetic .h5ad: {args.cells:,} cells x {args.genes:,} genes, {nnz:,.0f} non-zeros per cell "
              f"(CSR, uncompressed, {size_gb:.1f} GB on disk, written chunk by chunk), streamed in file order through "
              f"TokenDataset + token_loader (batch {args.batch_size}); each row is its own process. Peak RSS is "
              "ru_maxrss of the process (it includes torch, anndata and the obs names) and of the largest worker.\n",
              "| workers | cells streamed | seconds | cells/s (wall) | cells per CPU-second | peak RSS main (MB) | "
              "peak RSS worker (MB) |", "|---|---|---|---|---|---|---|"]
    for s in streams:
        worker_rss = f"{s['rss_workers_mb']:,.0f}" if s["workers"] else "-"
        lines.append(f"| {s['workers']} | {s['cells']:,} | {s['seconds']:.1f} | {s['cells_per_s']:,.0f} | "
                     f"{s['cells_per_cpu_s']:,.0f} | {s['rss_main_mb']:,.0f} | {worker_rss} |")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results_tokenize.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
