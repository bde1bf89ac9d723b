"""Accuracy of fine-tuned scBERT with the default flags against an L1-regularised logistic regression
trained on the same cells (REFERENCE.md §7: the comparison of Boiarsky et al.), over seeds, on the
default data (pbmc68k_reduced, `celltype`) and PBMC3k (../shared/data/pbmc3k_silver.h5ad,
`silver_label`, `--gene_num 2000`; skipped when absent).

Every run goes through the command-line scripts with only the flags a user would give
(--data_path, --label_key, --seed, --gene_num 2000 for PBMC3k; --ckpt_dir/--output_dir say where):

    scratch    finetune.py --from_scratch --seed S                      -> evaluate.py --baseline
    weights, sampler   the same with --balance weights / sampler (the study behind the --balance default)
    unsmoothed the same with --label_smoothing 0, the published loss (the study behind that default)
    unoriented the same with --no-orient_head, the head as drawn (the study behind that default)
    ensemble   finetune.py --from_scratch --folds K --seed S            -> evaluate.py --model_path ensemble.pth --baseline
    union      pretrain.py on the union of the *other* real sets (the other dataset here and, when
               celltypist is installed, its bundled unlabelled sample cells), aligned to this
               dataset's panel, then finetune.py --model_path that/pretrain.pth --seed S -> evaluate.py --baseline
    quickstart the README's main job: pretrain.py with its defaults on this dataset's own cells (all of
               them, unlabelled, as `python pretrain.py` does) --seed S, then finetune.py from that
               checkpoint --seed S -> evaluate.py --baseline

For one seed every method holds out the same stratified test cells (the ensemble's outer test split is
the single model's test split), and evaluate.py --baseline trains the regression on the cells the
model trained on (for the ensemble: all non-test cells, at C = 1). The union pretraining never sees the
dataset it is fine-tuned on. Finished runs are kept (their eval/metrics.json) and skipped on a re-run;
--collect only writes the tables from what has finished.

Writes benchmarks/results_accuracy.md and benchmarks/out/accuracy_defaults/runs.csv, and keeps a record of
every finished run in benchmarks/results_accuracy_runs.csv (in git: the run folders are a cache, and a
run whose folder is gone still counts in the tables from its record; a run finished again replaces its
record). Heavy on 2 CPU cores (one PBMC3k run is ~35 min alone, ~50 min beside two others);
`--datasets pbmc68k_reduced --seeds 2021 --methods scratch` is one run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "accuracy_defaults"
RECORDS = ROOT / "benchmarks" / "results_accuracy_runs.csv"  # one row per finished run, kept in git
RUN_KEY = ["dataset", "method", "seed"]
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_silver.h5ad"
METHODS = ("scratch", "ensemble", "union", "quickstart", "weights", "sampler", "unsmoothed", "unoriented")
# weights/sampler: scratch with that --balance; unsmoothed: scratch with the published loss; unoriented:
# scratch with the head as drawn
SINGLE = ("scratch", "unoriented", "unsmoothed")  # the single models from scratch, in the order a pairing prefers

# name -> (data path or None for the default data, label column, the flags a user adds from scratch)
DATASETS = {
    "pbmc68k_reduced": (None, "celltype", []),
    "pbmc3k_silver": (PBMC3K, "silver_label", ["--gene_num", "2000"]),  # 2,000 most variable of 13,714 genes
}
# pretraining on the union: the benchmark's choice (pretrain.py's own defaults are the CPU quick start's)
UNION_PRETRAIN_FLAGS = ["--epoch", "5", "--learning_rate", "3e-4", "--warmup", "0", "--cycle", "5", "--min_genes", "0"]


def run(cmd: list[str], log_path: Path) -> float:
    """Runs one script, its output to a log file; a failure stops the benchmark with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.time() - started
    print(f"  {seconds:.0f} s -> {log_path}", flush=True)
    if result.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return seconds


def script(name: str) -> list[str]:
    return [sys.executable, str(ROOT / name)]


def data_flags(path: Path | None, label_key: str | None = None) -> list[str]:
    flags = [] if path is None else ["--data_path", str(path)]
    return flags + ([] if label_key is None else ["--label_key", label_key])


def celltypist_sample() -> Path | None:
    """celltypist's bundled unlabelled sample (cells x genes counts, CSV), if celltypist is installed."""
    import importlib.util

    spec = importlib.util.find_spec("celltypist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "samples" / "sample_cell_by_gene.csv"
    return path if path.is_file() else None


def union_cells(target: str, out: Path) -> tuple[Path, list[str]]:
    """The union of the real sets other than `target`, each ln(1 + CP10k) over its own genes, then
    aligned to the panel a from-scratch run on `target` uses; written as log1p .h5ad."""
    import anndata as ad
    import scipy.sparse as sp

    import utils

    path = out / target / "union" / "union_cells.h5ad"
    sources = [(n, d[0]) for n, d in DATASETS.items() if n != target and (d[0] is None or d[0].is_file())]
    sample = celltypist_sample()
    if sample is not None:
        sources.append(("celltypist_sample", sample))
    names = [n for n, _ in sources]
    if not sources:
        raise SystemExit(f"union pretraining for {target}: no other data set is here (PBMC3k absent, celltypist not "
                         f"installed: pip install --no-deps celltypist); leave out --methods union")
    if path.is_file():
        return path, names
    own_path, _, extra = DATASETS[target]
    own = utils.read_dataset(own_path)
    own_format = utils.detect_input_format(own, "auto")
    gene_num = int(extra[extra.index("--gene_num") + 1]) if "--gene_num" in extra else None
    panel = utils.dataset_panel(own, gene_num, own_format)
    parts = []
    for name, source in sources:
        cells = utils.read_dataset(source)
        fmt = utils.detect_input_format(cells, "auto")
        logged = ad.AnnData(utils.log_normalised(sp.csr_matrix(cells.X), fmt), obs=cells.obs[[]].copy(),
                            var=cells.var[[]].copy())
        logged.obs_names = [f"{name}:{c}" for c in cells.obs_names]
        aligned = utils.align_to_panel(logged, panel, input_format="log1p")
        found = aligned.uns["scbert_panel_overlap"]
        print(f"union for {target}: {name} {cells.n_obs} cells, {found['found']} of {len(panel)} panel genes")
        parts.append(ad.AnnData(aligned.X, obs=aligned.obs[[]], var=aligned.var[[]]))
    union = ad.concat(parts, merge="first")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.h5ad")
    union.write_h5ad(partial)
    os.replace(partial, path)
    return path, names


def predicted_types(folder: Path) -> int:
    import pandas as pd

    table = pd.read_csv(folder / "eval" / "predictions.csv")
    column = "scbert_label" if "scbert_label" in table.columns else table.columns[1]
    return int(table[column].nunique())


def one_method(name: str, method: str, seed: int, args, out: Path, folds: int = 0) -> dict | None:
    """Trains and scores one (dataset, method, seed) unless finished (the ensemble: of `folds` folds);
    its record, or None."""
    path, label_key, extra = DATASETS[name]
    folder = out / name / (f"ensemble_{folds}" if method == "ensemble" else method) / f"seed_{seed}"
    metrics_path = folder / "eval" / "metrics.json"
    if not metrics_path.is_file():
        if args.collect:
            return None
        model_path = folder / "finetune_best.pth"
        if method == "union":
            union, names = union_cells(name, out)
            pretrained = out / name / "union" / "pretrain" / "pretrain.pth"
            if not pretrained.is_file():
                run(script("pretrain.py") + ["--data_path", str(union), "--ckpt_dir", str(pretrained.parent),
                                             *UNION_PRETRAIN_FLAGS], pretrained.parent / "log.txt")
            start = ["--model_path", str(pretrained)]
        elif method == "quickstart":  # pretrain.py's own defaults, on these cells, this seed
            pretrained = folder / "pretrain" / "pretrain.pth"
            if not pretrained.is_file():
                run(script("pretrain.py") + data_flags(path) + extra +
                    ["--seed", str(seed), "--ckpt_dir", str(pretrained.parent)], pretrained.parent / "log.txt")
            start = ["--model_path", str(pretrained)]
        else:
            start = ["--from_scratch", *extra]
        if method in ("weights", "sampler"):  # the study that chose the --balance default
            start += ["--balance", method]
        if method == "unsmoothed":  # the study that chose the --label_smoothing default
            start += ["--label_smoothing", "0"]
        if method == "unoriented":  # the study that chose the --orient_head default
            start += ["--no-orient_head"]
        if method == "ensemble":
            start += ["--folds", str(folds)]
            model_path = folder / "ensemble.pth"
        seconds = run(script("finetune.py") + data_flags(path, label_key) + start +
                      ["--seed", str(seed), "--ckpt_dir", str(folder)], folder / "finetune_log.txt")
        (folder / "finetune_seconds.txt").write_text(f"{seconds:.0f}\n")
        (folder / "revision.txt").write_text(revision() + "\n")
        run(script("evaluate.py") + ["--model_path", str(model_path), "--output_dir", str(folder / "eval"),
                                     "--baseline", "--no-umap", "--no-gene_importance"],
            folder / "evaluate_log.txt")
    metrics = json.loads(metrics_path.read_text())
    seconds_file = folder / "finetune_seconds.txt"
    revision_file = folder / "revision.txt"
    return {"dataset": name, "seed": seed, "method": f"ensemble K={folds}" if method == "ensemble" else method,
            "n_test": metrics["n_cells"],
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "baseline_accuracy": metrics["baseline"]["accuracy"], "baseline_macro_f1": metrics["baseline"]["macro_f1"],
            "predicted_types": predicted_types(folder), "label_smoothing": label_smoothing_of(folder),
            "oriented": oriented_of(folder),
            "finetune_seconds": float(seconds_file.read_text()) if seconds_file.is_file() else float("nan"),
            "revision": revision_file.read_text().strip() if revision_file.is_file() else "?"}


def label_smoothing_of(folder: Path) -> float:
    """The --label_smoothing a run trained with, from its log (runs from before the flag: 0, the published loss)."""
    log = folder / "finetune_log.txt"
    found = re.search(r"--label_smoothing ([0-9.eE+-]+)[,;]", log.read_text()) if log.is_file() else None
    return float(found.group(1)) if found else 0.0


def oriented_of(folder: Path) -> bool:
    """Whether a run oriented its fresh head (finetune.orient_head logs it; runs from before it did not)."""
    log = folder / "finetune_log.txt"
    return log.is_file() and "head orientation (" in log.read_text()


def revision() -> str:
    """The commit the scripts ran at (+ 'dirty' with uncommitted changes), stamped in each run folder."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benchmarks/results_*"],  # the tables this benchmark writes itself
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def method_labels(methods, folds) -> list[str]:
    """The method column's values for these methods (the ensemble once per K), in table order."""
    return [f"ensemble K={k}" if m == "ensemble" else m
            for m in methods for k in (folds if m == "ensemble" else [0])]


def keep_records(fresh, kept_path: Path):
    """Adds the runs finished here to the kept records (a run's newer record replaces its older one),
    written atomically; returns all the records."""
    import pandas as pd

    kept = pd.read_csv(kept_path) if kept_path.is_file() else pd.DataFrame(columns=list(fresh.columns) or RUN_KEY)
    if not len(fresh):
        return kept
    if len(kept):
        kept = kept[~kept.set_index(RUN_KEY).index.isin(fresh.set_index(RUN_KEY).index)]
    table = pd.concat([kept, fresh], ignore_index=True) if len(kept) else fresh
    # records from before --label_smoothing existed trained with the published loss
    table["label_smoothing"] = table.get("label_smoothing", pd.Series(np.nan, index=table.index)).fillna(0.0)
    # and those from before --orient_head trained the head as drawn
    oriented = table.get("oriented", pd.Series(np.nan, index=table.index))
    table["oriented"] = oriented.map(lambda v: False if pd.isna(v) else str(v) == "True")  # read back as text or bool
    table = table.sort_values(RUN_KEY, kind="stable").reset_index(drop=True)
    partial = kept_path.with_name(kept_path.name + ".partial")
    table.to_csv(partial, index=False, float_format="%.6g")
    os.replace(partial, kept_path)
    return table


def asked_runs(records, datasets, labels, seeds):
    """The records of the asked datasets, method labels and seeds, in the order asked."""
    table = records[records["dataset"].isin(datasets) & records["method"].isin(labels) & records["seed"].isin(seeds)]
    rank = table["dataset"].map({d: i for i, d in enumerate(datasets)}) * 1000 + \
        table["method"].map({m: i for i, m in enumerate(labels)})
    return table.assign(_rank=rank).sort_values(["_rank", "seed"], kind="stable").drop(columns="_rank") \
        .reset_index(drop=True)


def fmt(values) -> str:
    v = np.asarray(list(values), dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def paired(diff) -> str:
    """mean of per-seed differences and its standard error."""
    d = np.asarray(list(diff), dtype=float)
    if len(d) < 2:
        return f"{d.mean():+.3f}" if len(d) else "-"
    return f"{d.mean():+.3f} (SE {d.std(ddof=1) / np.sqrt(len(d)):.3f})"


def known(values, how: str, spec: str) -> str:
    """min or mean of the values that are known ('-' when none is: a record carried over without it)."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    return "-" if not len(v) else format(float(getattr(v, how)()), spec)


def shown_methods(table):
    """The table's method column: a run that did not train with finetune.py's default --label_smoothing
    or head orientation says which flag it had (the studies whose names say it aside)."""
    from finetune import DEFAULT_LABEL_SMOOTHING

    def shown(row) -> str:
        flags = []
        if row["label_smoothing"] != DEFAULT_LABEL_SMOOTHING and row["method"] != "unsmoothed":
            flags.append(f"--label_smoothing {row['label_smoothing']:g}")
        if not row["oriented"] and row["method"] != "unoriented":
            flags.append("--no-orient_head")
        return row["method"] + (f" ({', '.join(flags)})" if flags else "")

    return table.apply(shown, axis=1) if len(table) else table["method"]


def single_reference(table, name: str, method: str, smoothing: float, oriented: bool):
    """The single from-scratch runs a method is paired with, so that a difference is the method's alone: for
    a study ('unsmoothed', 'unoriented') the single runs that differ from it only in what it studies; for
    the others the single runs (scratch, else unoriented, else unsmoothed) with the same label smoothing and
    head orientation."""
    from finetune import DEFAULT_LABEL_SMOOTHING

    rows = table[table["dataset"] == name]  # "plain": the method's own name, "method": the name shown
    want = {"unsmoothed": (DEFAULT_LABEL_SMOOTHING, oriented), "unoriented": (smoothing, True)}.get(
        method, (smoothing, oriented))
    for single in SINGLE:
        same = rows[(rows["plain"] == single) & (rows["plain"] != method) & (rows["label_smoothing"] == want[0])
                    & (rows["oriented"] == want[1])]
        if len(same):
            return same
    return rows.iloc[:0]


def report(table, args, minutes: float, carried: int = 0) -> str:
    if "label_smoothing" not in table:
        table = table.assign(label_smoothing=0.0)
    if "oriented" not in table:
        table = table.assign(oriented=False)
    table = table.assign(method=shown_methods(table), plain=table["method"])
    lines = [
        "# Cell-type annotation accuracy with the default flags: scBERT vs L1 logistic regression",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared). finetune.py with its defaults "
        f"(schedule auto, preset `small`, --balance, --label_smoothing, head orientation and selection as "
        f"shipped; a method that ran with another label smoothing or --no-orient_head says so); seeds {args.seeds}; each seed its own "
        f"stratified 80/20 split (10% of the rest validates); test cells scored by evaluate.py; the regression is "
        f"`evaluate.py --baseline`, trained on the cells the model trained on."
        + (f" Union pretraining: pretrain.py {' '.join(UNION_PRETRAIN_FLAGS)} on the union of the other real sets, "
           f"aligned to this set's panel." if (table["method"] == "union").any() else "")
        + f" A row with fewer seeds than asked has runs still to finish. This call: {minutes:.0f} min. "
        f"`python benchmarks/accuracy.py --seeds {args.seeds} --folds {args.folds}`.",
        "",
        "| data | method | accuracy | macro-F1 | regression accuracy | regression macro-F1 | accuracy − regression "
        "(paired) | macro-F1 − regression | fewest types predicted | seeds | fine-tune min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, method), part in table.groupby(["dataset", "method"], sort=False):
        lines.append(
            f"| {name} | {method} | {fmt(part['accuracy'])} | {fmt(part['macro_f1'])} | "
            f"{fmt(part['baseline_accuracy'])} | {fmt(part['baseline_macro_f1'])} | "
            f"{paired(part['accuracy'] - part['baseline_accuracy'])} | "
            f"{paired(part['macro_f1'] - part['baseline_macro_f1'])} | {known(part['predicted_types'], 'min', '.0f')} | "
            f"{len(part)} | {known(part['finetune_seconds'] / 60, 'mean', '.1f')} |")
    lines += ["", "Per seed (accuracy / macro-F1; regression in brackets):", "",
              "| data | method | " + " | ".join(args.seeds.split(",")) + " |",
              "|---|---|" + "---|" * len(args.seeds.split(","))]
    for (name, method), part in table.groupby(["dataset", "method"], sort=False):
        cells = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = part[part["seed"] == seed]
            cells.append("-" if not len(row) else
                         f"{row['accuracy'].iloc[0]:.3f} / {row['macro_f1'].iloc[0]:.3f} "
                         f"({row['baseline_accuracy'].iloc[0]:.3f} / {row['baseline_macro_f1'].iloc[0]:.3f})")
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    # each method against the single model from scratch on the same test cells (same seed) and the same loss:
    # does pretraining on other cells help, does the ensemble beat the single model, does a --balance mode help
    compared = []
    for (name, method), part in table.groupby(["dataset", "method"], sort=False):
        plain = part["plain"].iloc[0]
        if plain == "scratch":
            continue
        reference = single_reference(table, name, plain, part["label_smoothing"].iloc[0], bool(part["oriented"].iloc[0]))
        both = part.merge(reference, on="seed", suffixes=("", "_scratch"))
        if len(both):
            compared.append(f"| {name} | {method} − {reference['method'].iloc[0]} | "
                            f"{paired(both['accuracy'] - both['accuracy_scratch'])} | "
                            f"{paired(both['macro_f1'] - both['macro_f1_scratch'])} | "
                            f"{', '.join(map(str, both['seed']))} |")
    if compared:
        lines += ["", "Against the single model from scratch with the same label smoothing and head orientation (a "
                  "study: differing only in what it studies), paired over the seeds both have (same test cells):", "",
                  "| data | difference | accuracy | macro-F1 | seeds |", "|---|---|---|---|---|", *compared]
    lines += ["", f"Code revisions of these runs: {', '.join(sorted(set(table['revision'])))}."
              + (f" {carried} of the {len(table)} runs are from their records in {RECORDS.name} (their run folders are "
                 f"not here; a '-' is what a record lacks)." if carried else "") + " The ensemble's "
              "regression column is `evaluate.py --baseline` on the ensemble file: trained on all non-test cells at "
              "C = 1 (no validation cells are left to choose C), so compare the ensemble with the single model of "
              "the same seed (same test cells).",
              "", "Mean ± sample sd over seeds; paired: the mean of the per-seed differences (SE: its standard "
              "error). For context (REFERENCE.md §7): on the full Zheng68K the published scBERT reached 0.759 / "
              "0.691, the L1 regression 0.812 / 0.707 (Boiarsky et al.). PBMC3k's labels are derived from its "
              "expression (silver labels), so its scores are optimistic.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ", ".join(DATASETS))
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--folds", default="3", help="K of the ensemble method (comma-separated: one ensemble each)")
    p.add_argument("--collect", action="store_true", help="run nothing: the tables from the finished runs")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS):
        raise SystemExit(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    out = Path(args.out).resolve()
    started = time.time()
    records = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        if DATASETS[name][0] is not None and not DATASETS[name][0].is_file():
            print(f"skipping {name}: {DATASETS[name][0]} is absent")
            continue
        for method in methods:
            for k in ([int(f) for f in args.folds.split(",") if f.strip()] if method == "ensemble" else [0]):
                for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
                    record = one_method(name, method, seed, args, out, k)
                    if record is not None:
                        records.append(record)
    import pandas as pd

    fresh = pd.DataFrame(records)
    out.mkdir(parents=True, exist_ok=True)
    fresh.to_csv(out / "runs.csv", index=False)
    records_path = RECORDS if out == OUT.resolve() else out / RECORDS.name
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    folds = [int(f) for f in args.folds.split(",") if f.strip()]
    table = asked_runs(keep_records(fresh, records_path), [d.strip() for d in args.datasets.split(",") if d.strip()],
                       method_labels(methods, folds), seeds)
    if not len(table):
        print("no finished runs")
        return
    text = report(table, args, (time.time() - started) / 60, carried=len(table) - len(fresh))
    results = ROOT / "benchmarks" / "results_accuracy.md" if out == OUT.resolve() else out / "results_accuracy.md"
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
