"""Accuracy of fine-tuned scBERT (from a pretrained checkpoint and from scratch) against an
L1-regularised logistic regression on the same stratified splits (REFERENCE.md §7: the comparison of
Boiarsky et al.), over several seeds, on the default data (pbmc68k_reduced, `celltype`) and PBMC3k
(../shared/data/pbmc3k_silver.h5ad, `silver_label`; skipped when absent).

Everything runs through the command-line scripts, exactly as a user would run them:

    pretrain.py  --model small --epoch P --ckpt_dir OUT/<data>/pretrain_eP                  (once per dataset)
    finetune.py  --model_path .../pretrain.pth --seed S --epoch F --ckpt_dir OUT/<data>/finetune_eF/seed_S/pretrained_eP
    finetune.py  --from_scratch --model small --seed S --epoch F --ckpt_dir OUT/<data>/finetune_eF/seed_S/scratch
    evaluate.py  --model_path .../finetune_best.pth --baseline                              (held-out test cells)

The seed fixes finetune.py's stratified train/valid/test split, so for one seed both fine-tuned models
and the logistic regression (trained by evaluate.py --baseline on the checkpoint's training cells) are
scored on the same test cells. Extra flags (--pretrain_args, --finetune_args) are appended to the folder
names (finetune_eF_learning_rate_3e-4_...), so runs with other settings are never mixed. Pretraining
uses every cell of the dataset without labels (test cells included), as a model pretrained on an atlas
would have seen similar cells. Finished runs are kept
(OUT/.../eval/metrics.json) and skipped on a re-run; --force redoes them.

Writes benchmarks/results_accuracy.md (mean ± sd over seeds) and benchmarks/out/accuracy/runs.csv.
Heavy on CPU: `nice python benchmarks/accuracy.py` takes hours at the defaults on 2 cores;
`--pretrain_epochs 1 --finetune_epochs 2 --seeds 2021` is a smoke run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "accuracy"
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_silver.h5ad"

# name -> (data path or None for the default data, label column, extra data flags for pretrain/from scratch)
DATASETS = {
    "pbmc68k_reduced": (None, "celltype", []),
    "pbmc3k_silver": (PBMC3K, "silver_label", ["--gene_num", "2000"]),  # 2,000 most variable of 13,714 genes
}


def run(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> float:
    """Runs one script (extra environment variables in env), its output to a log file; a failure stops
    the benchmark with the log's tail. Returns the wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    seconds = time.time() - started
    print(f"  {seconds:.0f} s -> {log_path}", flush=True)
    if result.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"failed (exit {result.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return seconds


def script(name: str) -> list[str]:
    return ["nice", sys.executable, str(ROOT / name)]


def data_flags(path: Path | None, label_key: str | None = None) -> list[str]:
    flags = [] if path is None else ["--data_path", str(path)]
    return flags + ([] if label_key is None else ["--label_key", label_key])


def slug(extra_args: str) -> str:
    """Folder-name suffix for extra script flags, so runs with other settings never reuse each other:
    '--learning_rate 3e-4 --warmup 0' -> '_learning_rate_3e-4_warmup_0'."""
    words = [re.sub(r"[^A-Za-z0-9.+-]+", "_", w.lstrip("-")).strip("_") for w in shlex.split(extra_args)]
    return "".join(f"_{w}" for w in words if w)


def mean_sd(values: list[float]) -> str:
    import numpy as np

    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return "-"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ", ".join(DATASETS))
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--pretrain_epochs", type=int, default=8)
    p.add_argument("--finetune_epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="evaluate.py --threads (0: PyTorch's default)")
    p.add_argument("--pretrain_args", default="", help="extra pretrain.py flags, e.g. '--learning_rate 1e-3'")
    p.add_argument("--finetune_args", default="", help="extra finetune.py flags, e.g. '--learning_rate 1e-3 --warmup 1'")
    p.add_argument("--methods", default="pretrained,scratch",
                   help="which fine-tunings to run: pretrained, scratch or both (the regression comes with either); "
                        "finished runs of the other are still reported")
    p.add_argument("--force", action="store_true", help="redo runs whose results exist")
    p.add_argument("--out", default=str(OUT), help="folder for checkpoints, logs and runs.csv (a folder other "
                   "than the default also receives results_accuracy.md, leaving benchmarks/ untouched)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = {m.strip() for m in args.methods.split(",") if m.strip()}
    if not methods or methods - {"pretrained", "scratch"}:
        raise SystemExit(f"--methods takes pretrained and/or scratch, got {args.methods!r}")
    out = Path(args.out).resolve()
    started = time.time()

    records = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        path, label_key, extra = DATASETS[name]
        if path is not None and not path.is_file():
            print(f"skipping {name}: {path} is absent")
            continue
        # the epochs and extra flags are part of the folder names, so a re-run never reuses other settings
        base = out / name
        pretrain_name = f"pretrain_e{args.pretrain_epochs}{slug(args.pretrain_args)}"
        pretrained = base / pretrain_name / "pretrain.pth"
        if "pretrained" in methods and (args.force or not pretrained.is_file()):
            run(script("pretrain.py") + data_flags(path) + extra +
                ["--model", "small", "--ckpt_dir", str(pretrained.parent), "--epoch", str(args.pretrain_epochs),
                 "--batch_size", str(args.batch_size), "--seed", "2021", *shlex.split(args.pretrain_args)],
                pretrained.parent / "log.txt")
        for seed in seeds:
            runs = {
                "scBERT (pretrained)": ["--model_path", str(pretrained)],
                "scBERT (from scratch)": ["--from_scratch", "--model", "small", *extra],
            }
            test_sets = []
            for method, start_flags in runs.items():
                folder = (base / f"finetune_e{args.finetune_epochs}{slug(args.finetune_args)}" / f"seed_{seed}" /
                          (pretrain_name.replace("pretrain_", "pretrained_") if "pretrained" in method else "scratch"))
                metrics_path = folder / "eval" / "metrics.json"
                wanted = ("pretrained" if "pretrained" in method else "scratch") in methods
                if not wanted and not metrics_path.is_file():
                    continue  # not asked for and never run (finished runs of it are still reported)
                if wanted and (args.force or not metrics_path.is_file()):
                    run(script("finetune.py") + data_flags(path, label_key) + start_flags +
                        ["--ckpt_dir", str(folder), "--seed", str(seed), "--epoch", str(args.finetune_epochs),
                         "--batch_size", str(args.batch_size), *shlex.split(args.finetune_args)],
                        folder / "finetune_log.txt")
                    run(script("evaluate.py") + ["--model_path", str(folder / "finetune_best.pth"),
                                                 "--output_dir", str(folder / "eval"), "--baseline", "--no-umap",
                                                 "--no-gene_importance", "--threads", str(args.threads)],
                        folder / "evaluate_log.txt")
                metrics = json.loads(metrics_path.read_text())
                import pandas as pd

                test_sets.append(list(pd.read_csv(folder / "eval" / "predictions.csv")["cell_id"]))
                records.append({"dataset": name, "seed": seed, "method": method, "n_test": metrics["n_cells"],
                                "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
                if "pretrained" in method:  # one baseline per split
                    records.append({"dataset": name, "seed": seed, "method": "L1 logistic regression",
                                    "n_test": metrics["n_cells"], "accuracy": metrics["baseline"]["accuracy"],
                                    "macro_f1": metrics["baseline"]["macro_f1"]})
            if test_sets and not any(r["seed"] == seed and r["dataset"] == name and r["method"].startswith("L1")
                                     for r in records):  # no pretrained run: the regression from the other one
                records.append({"dataset": name, "seed": seed, "method": "L1 logistic regression",
                                "n_test": metrics["n_cells"], "accuracy": metrics["baseline"]["accuracy"],
                                "macro_f1": metrics["baseline"]["macro_f1"]})
            if len(test_sets) == 2 and test_sets[0] != test_sets[1]:
                raise SystemExit(f"{name} seed {seed}: the two fine-tuning runs held out different test cells; "
                                 f"the comparison would not be on the same split")

    import pandas as pd

    table = pd.DataFrame(records)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "runs.csv", index=False)
    lines = [
        "# Cell-type annotation accuracy: scBERT vs L1 logistic regression",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared). Preset `small`; pretraining "
        f"{args.pretrain_epochs} epochs, fine-tuning up to {args.finetune_epochs} epochs (early stopping on "
        f"validation macro-F1), batch {args.batch_size}; seeds {', '.join(map(str, seeds))} (each seed its own "
        f"stratified 80/20 split, 10% of the rest for validation); test cells scored by evaluate.py; "
        f"the regression is trained by `evaluate.py --baseline` on the same training cells. "
        f"Total time {(time.time() - started) / 60:.0f} min. `python benchmarks/accuracy.py "
        f"--pretrain_epochs {args.pretrain_epochs} --finetune_epochs {args.finetune_epochs} --seeds {args.seeds}"
        + (f" --datasets {args.datasets}" if args.datasets != ",".join(DATASETS) else "")
        + (f" --methods {args.methods}" if methods != {"pretrained", "scratch"} else "")
        + (f" --pretrain_args '{args.pretrain_args}'" if args.pretrain_args else "")
        + (f" --finetune_args '{args.finetune_args}'" if args.finetune_args else "") + "`.",
        "",
        "| data | method | accuracy | macro-F1 | seeds | test cells |",
        "|---|---|---|---|---|---|",
    ]
    if len(table):
        for (name, method), part in table.groupby(["dataset", "method"], sort=False):
            lines.append(f"| {name} | {method} | {mean_sd(list(part['accuracy']))} | {mean_sd(list(part['macro_f1']))} "
                         f"| {len(part)} | {int(part['n_test'].iloc[0])} |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds. For context (REFERENCE.md §7): on the full Zheng68K "
        "(11 types) the published scBERT reached accuracy 0.759 / macro-F1 0.691, and L1 logistic "
        "regression 0.812 / 0.707 (Boiarsky et al.). pbmc68k_reduced is a 700-cell, 765-gene subset of it; "
        "PBMC3k's labels are derived from the expression itself (silver labels), so its scores are optimistic.",
        "",
    ]
    text = "\n".join(lines)
    results = ROOT / "benchmarks" / "results_accuracy.md" if out == OUT.resolve() else out / "results_accuracy.md"
    results.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
