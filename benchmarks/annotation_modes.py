"""Annotation modes of evaluate.py on real data: kNN label transfer from a pretrained-only checkpoint,
kNN from the fine-tuned one, the fine-tuned classifier, each with and without --majority_voting,
beside the L1-regularised logistic regression; and which pooling of the encoder output transfers
labels best. Datasets: the default data (pbmc68k_reduced, `celltype`) and PBMC3k
(../shared/data/pbmc3k_silver.h5ad, `silver_label`; skipped when absent).

Per dataset and seed, the seed's stratified split is finetune.py's own (test 0.2, validation 0.1 of
the rest), computed here with its functions and checked against the fine-tuned checkpoint:

    pretrain.py  --data_path <train + valid cells>            the pretraining never sees a test cell
    finetune.py  --model_path <that pretrain.pth> --seed S    on the whole data: trains on train, stops on valid
    evaluate.py  --model_path P|F --data_path <train cells>   the reference, embedded once per checkpoint
    evaluate.py  --model_path P|F --data_path <test cells> --reference <its predictions.h5ad> --majority_voting
    evaluate.py  --model_path F --baseline --majority_voting  the classifier and the regression, test cells

So the reference is the classifier's and the regression's training cells and the query is the held-out
test cells, for every method. Runs are cached under benchmarks/out/annotation/ (a finished step is
skipped on a re-run; --force redoes them). Writes benchmarks/results_annotation.md and runs.csv.

    nice python benchmarks/annotation_modes.py --pretrain_epochs 3 --finetune_epochs 10 \\
        --pretrain_args '--learning_rate 3e-4 --warmup 0 --cycle 3 --min_genes 0' \\
        --finetune_args '--learning_rate 3e-4 --warmup 0 --cycle 10'
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # (this file is not called annotation.py: it would shadow the module)

from accuracy import DATASETS, data_flags, mean_sd, run, script, slug  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "annotation"
METHODS = (  # (row name, evaluate run, metrics section; "embedding_vote": computed here from its predictions)
    ("kNN, pretrained-only checkpoint", "knn_pretrained", None),
    ("kNN, pretrained-only checkpoint + majority voting", "knn_pretrained", "majority_voting"),
    ("kNN, pretrained-only checkpoint + majority voting on the embedding graph", "knn_pretrained", "embedding_vote"),
    ("kNN, fine-tuned checkpoint", "knn_finetuned", None),
    ("kNN, fine-tuned checkpoint + majority voting", "knn_finetuned", "majority_voting"),
    ("kNN, fine-tuned checkpoint + majority voting on the embedding graph", "knn_finetuned", "embedding_vote"),
    ("fine-tuned classifier", "classifier", None),
    ("fine-tuned classifier + majority voting", "classifier", "majority_voting"),
    ("fine-tuned classifier + majority voting on the embedding graph", "classifier", "embedding_vote"),
    ("L1 logistic regression", "classifier", "baseline"),
)


def seed_split(adata, label_key: str, seed: int) -> dict[str, np.ndarray]:
    """finetune.py's split for this seed (rows of the data as read)."""
    import finetune

    cells = finetune.labelled_cells(adata, label_key, 0)
    return finetune.make_splits(cells, 0, 0.2, 0.1, seed)[0]


def write_subsets(adata, split: dict[str, np.ndarray], folder: Path) -> dict[str, Path]:
    paths = {"pretrain": folder / "pretrain_cells.h5ad", "reference": folder / "reference.h5ad",
             "query": folder / "query.h5ad"}
    rows = {"pretrain": np.sort(np.concatenate([split["train"], split["valid"]])), "reference": split["train"],
            "query": split["test"]}
    folder.mkdir(parents=True, exist_ok=True)
    for part, path in paths.items():
        if not path.is_file():
            adata[rows[part]].copy().write_h5ad(path)
    return paths


def train_run(cmd: list[str], checkpoint: Path) -> None:
    """Runs pretrain.py or finetune.py once to the end: a run that was stopped part-way (its checkpoint
    is there, the folder's `finished` mark is not) continues with --resume."""
    finished = checkpoint.parent / "finished"
    if finished.is_file():
        return
    resumed = checkpoint.is_file()
    run(cmd + (["--resume"] if resumed else []), checkpoint.parent / ("log_resumed.txt" if resumed else "log.txt"))
    finished.touch()


def seed_finished(folder: Path) -> bool:
    """Whether every run of one dataset and seed is there (both trainings and every evaluate.py run)."""
    runs = ["reference_pretrained", "knn_pretrained", "reference_finetuned", "knn_finetuned", "classifier"]
    return all((folder / part / "finished").is_file() for part in ("pretrain", "finetune")) and \
        all((folder / "eval" / run / "metrics.json").is_file() for run in runs) and \
        all((folder / f"pooling_{tag}.json").is_file() for tag in ("pretrained", "finetuned"))


def evaluate_run(model: Path, data: Path | None, out: Path, label_key: str, extra: list[str], threads: int,
                 force: bool) -> dict:
    metrics = out / "metrics.json"
    if force or not metrics.is_file():
        run(script("evaluate.py") + ["--model_path", str(model), "--output_dir", str(out), "--label_key", label_key,
                                     "--no-umap", "--no-gene_importance", "--threads", str(threads)]
            + ([] if data is None else ["--data_path", str(data)]) + extra, out.with_suffix(".log"))
    return json.loads(metrics.read_text())


def embedding_vote(predictions: Path, label_key: str, seed: int) -> dict:
    """Majority voting as `--over_clustering embedding` does it (Leiden on the encoder embedding's
    15-neighbour cosine graph), over the calls a predictions.h5ad holds, scored on its labels."""
    import anndata as ad

    import annotation
    import report_utils

    cells = ad.read_h5ad(predictions)
    calls = cells.obs["scbert_label"].astype(str).to_numpy()
    clusters, _ = annotation.over_cluster(np.asarray(cells.obsm["X_scbert_encoder"]), seed)
    voted = annotation.majority_vote(clusters, calls, cells.obs["scbert_confidence"].to_numpy())
    truth = cells.obs[label_key].astype(str).to_numpy()
    return report_utils.classification_metrics(truth, voted, [str(c) for c in cells.uns["scbert_classes"]])


def pooling_scores(model_path: Path, reference: Path, query: Path, label_key: str, threads: int,
                   cache: Path) -> list[dict]:
    """kNN transfer reference -> query with each pooling of the encoder output (one pass per cell
    set computes all of them), scored on the query's labels."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    import annotation
    import report_utils
    import utils

    if threads:
        torch.set_num_threads(threads)
    model, ckpt = utils.load_checkpoint(model_path)
    device = torch.device("cpu")
    precision = utils.Precision(utils.resolve_amp("auto", device), device)
    ctx = utils.DistContext(0, 1, 0, device)

    def every_pooling(encoded, tokens):
        return torch.cat([annotation.pool_encodings(encoded, tokens, how) for how in annotation.POOLINGS], dim=1)

    embedded, labels = {}, {}
    for part, path in (("reference", reference), ("query", query)):
        adata = utils.read_dataset(path)
        labels[part] = utils.read_labels(adata, label_key).astype(str)
        dataset = utils.TokenDataset(adata, "auto", model.config.bin_num, panel=ckpt["gene_panel"])
        embedded[part] = utils.predict(model, dataset, 8, ctx, precision, pool=every_pooling).encoder
    dim = model.config.dim
    rows = []
    for j, how in enumerate(annotation.POOLINGS):
        transfer = annotation.knn_transfer(embedded["reference"][:, j * dim:(j + 1) * dim], labels["reference"],
                                           embedded["query"][:, j * dim:(j + 1) * dim], 15, None)
        scores = report_utils.classification_metrics(labels["query"], transfer.labels, transfer.classes)
        rows.append({"pooling": how, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]})
    cache.write_text(json.dumps(rows, indent=1))
    return rows


def scaling(dim: int, reference_sizes: list[int], n_query: int, k: int) -> list[dict]:
    """Seconds of the exact cosine kNN search (and of the novelty radius) for synthetic references."""
    import annotation

    rng = np.random.default_rng(0)
    rows = []
    for n in reference_sizes:
        reference = rng.standard_normal((n, dim), dtype=np.float32)
        query = rng.standard_normal((n_query, dim), dtype=np.float32)
        started = time.time()
        annotation.nearest_cells(reference, query, k)
        search = time.time() - started
        started = time.time()
        annotation.novelty_radius(reference, k, seed=0)
        radius = time.time() - started
        rows.append({"reference_cells": n, "query_cells": n_query, "dim": dim, "k": k,
                     "search_s": round(search, 2), "novelty_radius_s": round(radius, 2)})
        print(rows[-1], flush=True)
        del reference
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--pretrain_epochs", type=int, default=3)
    p.add_argument("--finetune_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="evaluate.py --threads (0: PyTorch's default)")
    p.add_argument("--pretrain_args", default="", help="extra pretrain.py flags")
    p.add_argument("--finetune_args", default="", help="extra finetune.py flags")
    p.add_argument("--scaling", default="100000,1000000", help="reference sizes of the kNN timing ('' skips it)")
    p.add_argument("--force", action="store_true", help="redo evaluate.py runs whose results exist")
    p.add_argument("--cached_only", action="store_true", help="run nothing: the tables from the seeds whose runs "
                   "are all finished (a seed still training is left out and the seed counts say so)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    started = time.time()
    import utils

    records, pooling_rows = [], []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        path, label_key, extra = DATASETS[name]
        if path is not None and not path.is_file():
            print(f"skipping {name}: {path} is absent")
            continue
        adata = utils.read_dataset(path)
        for seed in seeds:
            folder = OUT / name / (f"p{args.pretrain_epochs}{slug(args.pretrain_args)}_f{args.finetune_epochs}"
                                   f"{slug(args.finetune_args)}") / f"seed_{seed}"
            if args.cached_only and not seed_finished(folder):
                print(f"{name} seed {seed}: not finished, left out (--cached_only)")
                continue
            split = seed_split(adata, label_key, seed)
            files = write_subsets(adata, split, folder / "cells")
            pretrained = folder / "pretrain" / "pretrain.pth"
            train_run(script("pretrain.py") + ["--data_path", str(files["pretrain"]), *extra, "--model", "small",
                                               "--ckpt_dir", str(pretrained.parent), "--epoch", str(args.pretrain_epochs),
                                               "--batch_size", str(args.batch_size), "--seed", str(seed),
                                               *shlex.split(args.pretrain_args)], pretrained)
            finetuned = folder / "finetune" / "finetune_best.pth"
            train_run(script("finetune.py") + data_flags(path, label_key) +
                      ["--model_path", str(pretrained), "--ckpt_dir", str(finetuned.parent), "--seed", str(seed),
                       "--epoch", str(args.finetune_epochs), "--batch_size", str(args.batch_size),
                       *shlex.split(args.finetune_args)], finetuned.parent / "finetune_last.pth")
            import torch

            held_out = np.sort(np.asarray(torch.load(finetuned, weights_only=True)["splits"]["test"]))
            if not np.array_equal(held_out, split["test"]):
                raise SystemExit(f"{name} seed {seed}: finetune.py held out other test cells than computed here")

            evals = folder / "eval"
            knn = ["--reference_label_key", label_key, "--majority_voting"]
            for tag, model in (("pretrained", pretrained), ("finetuned", finetuned)):
                evaluate_run(model, files["reference"], evals / f"reference_{tag}", label_key, [], args.threads,
                             args.force)
                reference = evals / f"reference_{tag}" / "predictions.h5ad"
                evaluate_run(model, files["query"], evals / f"knn_{tag}", label_key, ["--reference", str(reference)]
                             + knn, args.threads, args.force)
                for row in pooling_scores(model, files["reference"], files["query"], label_key, args.threads,
                                          folder / f"pooling_{tag}.json"):
                    pooling_rows.append({"dataset": name, "seed": seed, "checkpoint": tag, **row})
            evaluate_run(finetuned, None if path is None else Path(path), evals / "classifier", label_key,
                         ["--baseline", "--majority_voting"], args.threads, args.force)
            for method, run_name, section in METHODS:
                metrics = json.loads((evals / run_name / "metrics.json").read_text())
                if section == "embedding_vote":
                    scores = embedding_vote(evals / run_name / "predictions.h5ad", label_key, seed)
                else:
                    scores = metrics if section is None else metrics[section]
                records.append({"dataset": name, "seed": seed, "method": method, "n_test": metrics["n_cells"],
                                "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]})
            knn_ft = json.loads((evals / "knn_finetuned" / "metrics.json").read_text())
            classifier = json.loads((evals / "classifier" / "metrics.json").read_text())
            if abs(knn_ft["classifier"]["accuracy"] - classifier["accuracy"]) > 1e-9:
                raise SystemExit(f"{name} seed {seed}: the classifier's calls differ between the two runs")

    import pandas as pd

    OUT.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(records)
    table.to_csv(OUT / "runs.csv", index=False)
    pooling = pd.DataFrame(pooling_rows)
    pooling.to_csv(OUT / "pooling.csv", index=False)
    sizes = [int(s) for s in args.scaling.split(",") if s.strip()]
    timing = scaling(64, sizes, 1000, 15) if sizes else []
    minutes = (time.time() - started) / 60
    lines = [
        "# Annotation modes: kNN label transfer, the fine-tuned classifier, majority voting",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared). Preset `small`; per seed, pretraining "
        f"{args.pretrain_epochs} epochs ({args.pretrain_args or 'default schedule'}) on that seed's training and "
        "validation cells only (never its test cells), "
        f"fine-tuning from it up to {args.finetune_epochs} epochs on the whole data's split "
        f"({args.finetune_args or 'default schedule'}); seeds {', '.join(map(str, seeds))}. Reference = the "
        "seed's training cells (those the classifier and the regression train on), query = its held-out test "
        f"cells. kNN: k = 15, cosine distance on `X_scbert_encoder`. Total time {minutes:.0f} min (cached steps "
        f"not counted). `python benchmarks/annotation_modes.py --pretrain_epochs {args.pretrain_epochs} --finetune_epochs "
        f"{args.finetune_epochs} --seeds {args.seeds}"
        + (f" --pretrain_args '{args.pretrain_args}'" if args.pretrain_args else "")
        + (f" --finetune_args '{args.finetune_args}'" if args.finetune_args else "") + "`."
        + (" Written with `--cached_only`: a seed whose runs had not all finished is left out (the seeds column "
           "counts those in each row; `-` in the per-seed table)." if args.cached_only else ""),
        "",
        "| data | method | accuracy | macro-F1 | seeds | test cells |",
        "|---|---|---|---|---|---|",
    ]
    for (name, method), part in table.groupby(["dataset", "method"], sort=False):
        lines.append(f"| {name} | {method} | {mean_sd(list(part['accuracy']))} | {mean_sd(list(part['macro_f1']))} "
                     f"| {len(part)} | {int(part['n_test'].iloc[0])} |")
    lines += ["", "Per seed (accuracy / macro-F1):", "", "| data | method | " +
              " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for (name, method), part in table.groupby(["dataset", "method"], sort=False):
        cells = {int(r.seed): f"{r.accuracy:.3f} / {r.macro_f1:.3f}" for r in part.itertuples()}
        lines.append(f"| {name} | {method} | " + " | ".join(cells.get(s, "-") for s in seeds) + " |")
    lines += ["", "## Pooling of the encoder output (kNN transfer, k = 15, same reference and query)", "",
              "| data | checkpoint | pooling | accuracy | macro-F1 |", "|---|---|---|---|---|"]
    if len(pooling):
        for (name, tag, how), part in pooling.groupby(["dataset", "checkpoint", "pooling"], sort=False):
            lines.append(f"| {name} | {tag} | {how} | {mean_sd(list(part['accuracy']))} | "
                         f"{mean_sd(list(part['macro_f1']))} |")
    if timing:
        lines += ["", "## Exact cosine kNN search (scikit-learn brute force), synthetic 64-d embeddings", "",
                  "| reference cells | query cells | k | search s | novelty radius s (2,000 sampled reference cells) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['reference_cells']:,} | {r['query_cells']:,} | {r['k']} | {r['search_s']} | "
                  f"{r['novelty_radius_s']} |" for r in timing]
    lines += ["", "Mean ± sample standard deviation over seeds. PBMC3k's labels are derived from the expression "
              "itself (silver labels), so its scores are optimistic.", ""]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "results_annotation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
