"""How long fine-tuning from scratch takes with the default flags at the size the quality issue names:
~5,000 cells x 500 genes (bar: <= 25 minutes on the 2-core machine).

    python benchmarks/finetune_time.py [--cells 5000 --genes 500 --types 8]

The cells are synthetic raw counts with type structure (each type raises its own block of marker
genes over a negative-binomial background; type sizes fall geometrically, the rarest ~1%), written to
benchmarks/out/finetune_time/cells.h5ad. finetune.py runs as a user would run it (--data_path,
--label_key, --from_scratch: no pretrained checkpoint), in its own process; the wall time includes
reading, the panel, the Gene2Vec-style embedding and every epoch. Adds a row to the table in
benchmarks/results_finetune_time.md (after its last row: hand notes below the table stay below it).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "finetune_time"


def synthetic_cells(path: Path, cells: int, genes: int, types: int, seed: int = 0) -> None:
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    sizes = 0.6 ** np.arange(types)
    sizes = np.maximum(np.round(cells * sizes / sizes.sum()).astype(int), 10)
    sizes[0] += cells - sizes.sum()
    labels = np.repeat([f"type_{k}" for k in range(types)], sizes)
    base = rng.gamma(0.3, 2.0, size=genes)  # per-gene mean expression
    rates = np.tile(base, (cells, 1))
    block = genes // (2 * types)
    for k in range(types):
        rates[labels == f"type_{k}", k * block:(k + 1) * block] *= 6.0
    depth = rng.lognormal(0.0, 0.3, size=(cells, 1))
    counts = rng.poisson(rng.gamma(2.0, rates * depth / 2.0)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"GENE{i}" for i in range(genes)]
    adata.obs_names = [f"cell{i}" for i in range(cells)]
    adata.obs["celltype"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--types", type=int, default=8)
    args = p.parse_args()
    data = OUT / f"cells_{args.cells}x{args.genes}.h5ad"
    if not data.is_file():
        synthetic_cells(data, args.cells, args.genes, args.types)
    ckpt_dir = OUT / f"run_{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--data_path", str(data), "--label_key", "celltype",
           "--from_scratch", "--ckpt_dir", str(ckpt_dir)]
    print("$ " + " ".join(cmd), flush=True)
    started = time.time()
    with open(OUT / f"{ckpt_dir.name}.log", "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.time() - started) / 60
    if result.returncode != 0:
        raise SystemExit(f"finetune.py failed (exit {result.returncode}); see {OUT / (ckpt_dir.name + '.log')}")
    import pandas as pd

    metrics = pd.read_csv(ckpt_dir / "finetune_metrics.csv")
    schedule = next((line.split("] ")[-1].strip() for line in (OUT / f"{ckpt_dir.name}.log").read_text().splitlines()
                     if "schedule auto" in line or "schedule published" in line), "")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    row = (f"| {time.strftime('%Y-%m-%d')} | {args.cells:,} x {args.genes} | {len(metrics)} | {minutes:.1f} | "
           f"{metrics.loc[metrics['valid_selection'].idxmax(), 'valid_macro_f1']:.3f} | {load:.1f} |")
    results = ROOT / "benchmarks" / "results_finetune_time.md"
    header = ("# Fine-tuning from scratch with the default flags: wall time\n\n"
              f"`python benchmarks/finetune_time.py` on {platform.machine()}, {os.cpu_count()} CPU cores (shared; the "
              "load average at the end is the last column). Bar: <= 25 minutes for ~5,000 cells x 500 genes.\n\n"
              "| date | cells x genes | epochs run | minutes | valid macro-F1 of the kept epoch | load |\n"
              "|---|---|---|---|---|---|\n")
    lines = (results.read_text() if results.is_file() else header).splitlines()
    last_row = max(i for i, line in enumerate(lines) if line.startswith("|"))  # the table, before any notes
    lines.insert(last_row + 1, row)
    partial = results.with_name(results.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, results)
    print(schedule)
    print(row)


if __name__ == "__main__":
    main()
