"""Annotation throughput: evaluate.py's batched path against one cell at a time (the original's way).

Model: the `small` preset with a classifier head and random weights (speed does not depend on the
weights), its panel the --genes most variable genes of PBMC3k (../shared/data/pbmc3k_silver.h5ad; without
it, the default data's 765 genes). Data: --cells cells (default 1,000) of PBMC3k (or the default data,
repeated to reach the count), written to benchmarks/out/.

Rows:
1. `python evaluate.py`-equivalent run (evaluate.main: read, align, tokenise per batch, batched inference,
   every output file but the UMAP and gene importance), wall time for all cells, at --amp none and
   --amp auto (what auto resolves to on this machine is printed);
2. the same batched inference (utils.predict) over a batch-size sweep, on a --sweep_cells subset;
3. one cell at a time: tokenise one cell, one forward pass of batch 1, softmax, as the original
   predict script does, on --single_cells cells.

Writes benchmarks/results_inference.md and prints it.
Usage: nice python benchmarks/inference.py [--cells 1000] [--genes 2000] [--single_cells 200]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "inference"
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_silver.h5ad"


def make_inputs(n_cells: int, n_genes: int, seed: int) -> tuple[Path, Path, str]:
    """(data .h5ad, checkpoint, description) for the benchmark."""
    import anndata as ad
    import numpy as np
    import scanpy as sc
    import torch

    import train_utils
    import utils
    from model import PerformerLM, get_config

    if PBMC3K.is_file():
        full = utils.read_dataset(PBMC3K)
        logged = full.copy()
        sc.pp.normalize_total(logged, target_sum=1e4)
        sc.pp.log1p(logged)
        sc.pp.highly_variable_genes(logged, n_top_genes=min(n_genes, full.n_vars), flavor="seurat")
        panel = [g for g, hv in zip(full.var_names, logged.var["highly_variable"]) if hv]
        data = full[: min(n_cells, full.n_obs)].copy()
        what = f"PBMC3k, first {data.n_obs} cells (raw counts, {full.n_vars:,} genes)"
    else:
        base = utils.read_dataset(None)
        panel = list(base.var_names)
        reps = -(-n_cells // base.n_obs)
        data = ad.concat([base] * reps, index_unique="-")[:n_cells].copy()
        what = f"default data (pbmc68k_reduced) repeated to {data.n_obs} cells (log1p, 765 genes)"
    OUT.mkdir(parents=True, exist_ok=True)
    data_path = OUT / "cells.h5ad"
    data.write_h5ad(data_path)
    torch.manual_seed(seed)
    model = PerformerLM(get_config("small", gene_num=len(panel), pos_embed="none")).attach_classifier(8).eval()
    ckpt = OUT / "small_classifier.pth"
    train_utils.save_checkpoint(ckpt, {**train_utils.model_checkpoint_fields(model), "gene_panel": panel,
                                       "label_names": [f"type_{i}" for i in range(8)], "label_key": "none",
                                       "data_fingerprint": None, "data_path": None})
    return data_path, ckpt, f"{what}; panel {len(panel):,} genes"


def one_at_a_time(ckpt: Path, data_path: Path, n: int) -> float:
    """cells/s of the original's loop: one cell tokenised and run through the model per forward."""
    import torch

    import utils

    model, state = utils.load_checkpoint(ckpt)
    adata = utils.read_dataset(data_path)
    fmt = utils.detect_input_format(adata)
    aligned = utils.align_to_panel(adata, state["gene_panel"], input_format=fmt)
    X = aligned.X
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            tokens = torch.from_numpy(utils.tokenize_matrix(X[i], fmt, model.config.bin_num)).long()
            logits, _ = model.classify(tokens)
            torch.softmax(logits, dim=-1).argmax(-1).item()
    return n / (time.perf_counter() - started)


def batched(ckpt: Path, data_path: Path, n: int, batch_size: int, amp: str) -> float:
    import numpy as np
    import torch

    import utils

    model, state = utils.load_checkpoint(ckpt)
    adata = utils.read_dataset(data_path)
    fmt = utils.detect_input_format(adata)
    aligned = utils.align_to_panel(adata, state["gene_panel"], input_format=fmt)
    device = torch.device("cpu")
    precision = utils.Precision(utils.resolve_amp(amp, device), device)
    dataset = utils.TokenDataset(aligned, fmt, model.config.bin_num, indices=np.arange(n))
    started = time.perf_counter()
    utils.predict(model, dataset, batch_size, utils.DistContext(0, 1, 0, device), precision)
    return n / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1000)
    p.add_argument("--genes", type=int, default=2000, help="panel size (most variable PBMC3k genes)")
    p.add_argument("--batch_size", type=int, default=None, help="batch of the evaluate.py rows (default: its own)")
    p.add_argument("--threads", type=int, default=0, help="threads of the evaluate.py rows (0: PyTorch's default)")
    p.add_argument("--sweep", default="1,8,32", help="batch sizes of the batched-inference sweep")
    p.add_argument("--sweep_threads", default="1,2", help="thread counts of the sweep and the single-cell loop")
    p.add_argument("--sweep_cells", type=int, default=100)
    p.add_argument("--single_cells", type=int, default=100, help="cells for the one-at-a-time loop")
    p.add_argument("--repeats", type=int, default=2, help="sweep and single-cell rows report the best of this many")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    import evaluate
    import train_utils

    data_path, ckpt, what = make_inputs(args.cells, args.genes, args.seed)
    auto = train_utils.resolve_amp("auto", torch.device("cpu"))
    rows = []
    for amp in ("none", "auto"):
        started = time.perf_counter()
        argv = ["--model_path", str(ckpt), "--data_path", str(data_path), "--output_dir", str(OUT / f"results_{amp}"),
                "--no-umap", "--no-gene_importance", "--amp", amp, "--threads", str(args.threads)]
        if args.batch_size:
            argv += ["--batch_size", str(args.batch_size)]
        metrics = evaluate.main(evaluate.build_parser().parse_args(argv))
        wall = time.perf_counter() - started
        label = f"{amp} ({auto})" if amp == "auto" else amp
        batch = args.batch_size or "default (8)"
        rows.append((f"evaluate.py, batch {batch} (whole run)", label, args.threads or torch.get_num_threads(),
                     metrics["n_cells"], f"{metrics['cells_per_second']:.1f}", f"{wall:.1f}"))
        print(rows[-1], flush=True)
    n_sweep = min(args.sweep_cells, args.cells)
    n_single = min(args.single_cells, args.cells)
    for threads in [int(t) for t in args.sweep_threads.split(",") if t.strip()]:
        torch.set_num_threads(threads)
        for bs in [int(b) for b in args.sweep.split(",") if b.strip()]:
            rate = max(batched(ckpt, data_path, n_sweep, bs, "none") for _ in range(args.repeats))
            rows.append((f"utils.predict, batch {bs}", "none", threads, n_sweep, f"{rate:.1f}",
                         f"{n_sweep / rate:.1f}"))
            print(rows[-1], flush=True)
        rate = max(one_at_a_time(ckpt, data_path, n_single) for _ in range(args.repeats))
        rows.append(("one cell at a time (original's loop)", "none", threads, n_single, f"{rate:.1f}",
                     f"{n_single / rate:.1f}"))
        print(rows[-1], flush=True)

    load = os.getloadavg()
    lines = [
        "# Annotation throughput (CPU)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), torch {torch.__version__}. "
        f"Model: `small` preset (dim 64, depth 2, 4 heads x 32, 110 random features), classifier head, "
        f"random weights. Data: {what}. `nice python benchmarks/inference.py --cells {args.cells} "
        f"--genes {args.genes}`.",
        "",
        "| path | amp | threads | cells | cells/s (inference) | seconds |",
        "|---|---|---|---|---|---|",
        *[f"| {a} | {b} | {t} | {c:,} | {d} | {e} |" for a, b, t, c, d, e in rows],
        "",
        "`seconds` is the wall time of the whole run for the evaluate.py rows (reading, aligning, "
        "tokenising, inference, writing predictions.h5ad/csv and metrics.json) and of the inference alone "
        "elsewhere; `cells/s` is inference alone (tokenisation per batch included). The one-at-a-time rows "
        "tokenise and run each cell separately, as the original predict script does. Sweep and single-cell rows "
        f"are the best of {args.repeats} runs (the machine is shared, so timings are noisy).",
        "",
    ]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "results_inference.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
