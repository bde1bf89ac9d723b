"""What compiling the engine's chunk steps (kernels/) buys a user of the scripts on panels shorter
than 2,048 genes, where the default (SCBERT_COMPILE=auto) does not compile.

Runs the scripts exactly as a user would, each configuration in its own process, with the compile
setting (kernels.ExecutionSettings.compile) chosen by the environment (SCBERT_COMPILE=off: eager
steps; on: compiled):

1. pretrain.py on the default data (pbmc68k_reduced, 766 positions), --epoch E;
2. finetune.py from scratch (no positional embedding, so no Gene2Vec training is timed) on PBMC3k
   (../shared/data/pbmc3k_silver.h5ad, 2,000 most variable genes -> 2,001 positions; skipped when
   absent) with the PBMC3k accuracy recipe, --epoch F;
3. evaluate.py on the fine-tuned checkpoint's held-out cells.

"on" runs twice: first with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR in benchmarks/out, as
on a fresh machine: every kernel compiles), then again with the cache the first run filled (every later
run). Reported: wall time of each script, and seconds per training epoch (from the metrics CSV), which
excludes start-up and compilation. Writes benchmarks/results_compile.md.

Usage: nice python benchmarks/compile_speed.py [--pretrain_epochs 2] [--finetune_epochs 2]
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
from pathlib import Path

from accuracy import PBMC3K, ROOT, run  # the same script runner (its folder is on sys.path when run)

OUT = ROOT / "benchmarks" / "out" / "compile"
CONFIGS = [("off", "eager steps", False), ("on", "compiled, empty cache", True),
           ("on", "compiled, cache filled", False)]


def epoch_seconds(metrics_csv: Path) -> list[float]:
    with open(metrics_csv) as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain_epochs", type=int, default=2)
    p.add_argument("--finetune_epochs", type=int, default=2)
    args = p.parse_args()

    rows = []
    for index, (mode, label, cold) in enumerate(CONFIGS):
        folder = OUT / f"run{index}_{mode}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        cache = OUT / "inductor_cache"
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        env = {"SCBERT_COMPILE": mode, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        py = [sys.executable]
        row = {"setting": f"SCBERT_COMPILE={mode}", "what": label}
        print(f"{row['setting']} ({label})", flush=True)
        row["pretrain_s"] = run(py + ["pretrain.py", "--ckpt_dir", str(folder / "pre"), "--epoch",
                                      str(args.pretrain_epochs)], folder / "pretrain.log", env)
        row["pretrain_epoch_s"] = epoch_seconds(folder / "pre" / "pretrain_metrics.csv")
        if PBMC3K.is_file():
            row["finetune_s"] = run(py + ["finetune.py", "--data_path", str(PBMC3K), "--label_key", "silver_label",
                                          "--from_scratch", "--no-pos_embed", "--gene_num", "2000",
                                          "--ckpt_dir", str(folder / "ft"), "--epoch", str(args.finetune_epochs),
                                          "--learning_rate", "3e-4", "--warmup", "0", "--cycle", "10"],
                                    folder / "finetune.log", env)
            row["finetune_epoch_s"] = epoch_seconds(folder / "ft" / "finetune_metrics.csv")
            row["evaluate_s"] = run(py + ["evaluate.py", "--model_path", str(folder / "ft" / "finetune_best.pth"),
                                          "--output_dir", str(folder / "eval"), "--no-umap"],
                                    folder / "evaluate.log", env)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                               if k not in ("setting", "what")), flush=True)

    def fmt_epochs(values):
        return " / ".join(f"{v:.0f}" for v in values) if values else "-"

    lines = [
        "# Compiled chunk steps: what they change for the scripts",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores. `python benchmarks/compile_speed.py "
        f"--pretrain_epochs {args.pretrain_epochs} --finetune_epochs {args.finetune_epochs}`. Each cell is one "
        "script run in its own process (wall seconds, start-up and compilation included); per-epoch seconds come "
        "from the run's metrics CSV (training and validation, no start-up). pretrain.py: default data, `small` "
        "preset, 766 positions; finetune.py: PBMC3k, 2,001 positions, from scratch without positional embedding "
        "(so no Gene2Vec training is timed), batch 8, the accuracy recipe (`--learning_rate 3e-4 --warmup 0 "
        "--cycle 10`); evaluate.py: that checkpoint's held-out cells, no UMAP.",
        "",
        "| setting | inductor cache | pretrain.py | its epochs | finetune.py | its epochs | evaluate.py |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| `{row['setting']}` | {row['what']} | {row['pretrain_s']:.0f} s | "
                     f"{fmt_epochs(row['pretrain_epoch_s'])} s | "
                     + (f"{row['finetune_s']:.0f} s | {fmt_epochs(row['finetune_epoch_s'])} s | "
                        f"{row['evaluate_s']:.0f} s |" if "finetune_s" in row else "- | - | - |"))
    eager, warm = rows[0], rows[2]
    if "finetune_epoch_s" in eager:
        ratio = sum(eager["finetune_epoch_s"]) / sum(warm["finetune_epoch_s"])
        lines += ["", f"Fine-tuning epochs, eager over compiled: {ratio:.2f}x; pretraining epochs: "
                  f"{sum(eager['pretrain_epoch_s']) / sum(warm['pretrain_epoch_s']):.2f}x."]
    lines.append("")
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "results_compile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
