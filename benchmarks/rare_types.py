"""Where the fine-tuned model loses rare types to the L1 regression: the tokens or the decision rule?

Two checks on the very splits finetune.py draws (its seed, --test_size 0.2, --valid_size 0.1,
--min_valid_per_class as shipped), for the data sets of benchmarks/accuracy.py:

  inputs     the L1 regression of evaluate.py --baseline (C chosen on the validation cells) fitted on
             ln(1 + CP10k), and on the model's expression tokens (min(floor(log2(1 + CP10k)), B) as
             numbers) for several bin counts B. If the regression on the 6 published bins (B = 5)
             scores as well as on the continuous values, the binning is not what the model lacks.
  decision   for each finished `scratch` run of benchmarks/accuracy.py (its finetune_best.pth), the
             test scores when the classifier's logits are shifted by -tau * ln(training prior of the
             type) (post-hoc logit adjustment, Menon et al. 2021), tau chosen on the validation cells
             by the score that picks the best epoch (macro-F1 minus the types never recognised; a tie
             keeps the smaller tau), paired with tau = 0 on the same test cells.

    python benchmarks/rare_types.py                      # both checks -> benchmarks/results_rare_types.md
    python benchmarks/rare_types.py --runs DIR           # where accuracy.py's runs are (its --out)

Light: the regressions take ~1 min a seed on PBMC3k; the decision check only predicts (no training).
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import finetune  # noqa: E402
import report_utils  # noqa: E402
import utils  # noqa: E402
from accuracy import DATASETS, OUT, fmt, paired  # noqa: E402

TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
BINS = (3, 5, 7, 9)


def labelled(name: str, with_panel: bool = True):
    """(adata, input format, LabelledCells, panel or None) of a benchmark data set as finetune.py sees it
    (the panel: what a from-scratch run chooses; a finished run's checkpoint carries its own)."""
    path, label_key, extra = DATASETS[name]
    adata = utils.open_cells(None if path is None else str(path))
    input_format = utils.detect_input_format(adata, "auto")
    cells = finetune.labelled_cells(adata, label_key, 0)
    gene_num = int(extra[extra.index("--gene_num") + 1]) if "--gene_num" in extra else None
    return adata, input_format, cells, utils.dataset_panel(adata, gene_num, input_format) if with_panel else None


def scores(truth, predicted, classes) -> tuple[float, float]:
    got = report_utils.classification_metrics(truth, predicted, classes)
    return got["accuracy"], got["macro_f1"]


def inputs_check(name: str, seeds) -> list[dict]:
    adata, input_format, cells, panel = labelled(name)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    continuous = utils.log_normalised(aligned.X, input_format)
    features = {"ln(1 + CP10k)": continuous}
    for b in BINS:  # the tokens of the panel genes (the appended always-0 position dropped)
        features[f"tokens, bin_num {b}"] = utils.tokenize(aligned, bin_num=b)[:, :-1].astype(np.float32)
    truth = np.full(adata.n_obs, None, dtype=object)
    truth[cells.rows] = cells.labels
    rows = []
    for seed in seeds:
        split = finetune.make_splits(cells, 0, 0.2, 0.1, seed)[0]
        train, valid, test = (split[k] for k in ("train", "valid", "test"))
        for what, X in features.items():
            predicted, _ = report_utils.logistic_baseline(X[train], truth[train].astype(str), X[test], X[valid],
                                                          truth[valid].astype(str), seed=seed)
            acc, f1 = scores(truth[test], predicted, cells.names)
            rows.append({"dataset": name, "seed": seed, "features": what, "accuracy": acc, "macro_f1": f1})
        print(f"inputs {name} seed {seed}: " + ", ".join(f"{r['features']} {r['macro_f1']:.3f}"
                                                         for r in rows if r["seed"] == seed), flush=True)
    return rows


def selection(truth: np.ndarray, predicted: np.ndarray) -> float:
    """finetune.py's epoch score (valid_selection) of these predictions."""
    return finetune.selection_score(finetune.label_scores(truth, predicted))


def decision_check(name: str, seeds, runs: Path) -> list[dict]:
    ctx = utils.setup_distributed("cpu")
    precision = utils.Precision("none", ctx.device)
    adata, input_format, cells, _ = labelled(name, with_panel=False)
    rows = []
    for seed in seeds:
        path = runs / name / "scratch" / f"seed_{seed}" / "finetune_best.pth"
        if not path.is_file():
            print(f"decision {name} seed {seed}: no run at {path} (run benchmarks/accuracy.py --methods scratch)")
            continue
        model, ckpt = utils.load_checkpoint(path)
        aligned = utils.align_to_panel(adata, ckpt["gene_panel"], input_format=input_format)
        split = {k: np.asarray(v, dtype=np.int64) for k, v in ckpt["splits"].items()}
        logits = {}
        for part in ("valid", "test"):
            dataset = utils.token_dataset(aligned, input_format, model.config.bin_num, labels=cells.codes,
                                          indices=split[part])
            logits[part] = utils.predict(model, dataset, 32, ctx, precision).logits.astype(np.float64)
        counts = np.bincount(cells.codes[split["train"]], minlength=len(cells.names)).astype(np.float64)
        log_prior = np.log((counts + 1) / (counts.sum() + len(counts)))
        valid_truth, test_truth = cells.codes[split["valid"]], cells.codes[split["test"]]
        by_tau = {tau: selection(valid_truth, (logits["valid"] - tau * log_prior).argmax(1)) for tau in TAUS}
        chosen = max(TAUS, key=lambda t: (by_tau[t], -t))
        names = np.asarray(cells.names, dtype=object)
        for tau, what in ((0.0, "tau = 0 (as shipped)"), (chosen, "tau chosen on validation")):
            predicted = names[(logits["test"] - tau * log_prior).argmax(1)]
            acc, f1 = scores(names[test_truth], predicted, cells.names)
            rows.append({"dataset": name, "seed": seed, "rule": what, "tau": tau, "accuracy": acc, "macro_f1": f1})
        print(f"decision {name} seed {seed}: validation score by tau {by_tau}; chosen {chosen}", flush=True)
    return rows


def report(inputs: list[dict], decision: list[dict], seeds) -> str:
    import pandas as pd
    lines = ["# Rare types: the tokens or the decision rule?", "",
             f"Machine: {platform.machine()}, CPU. Seeds {', '.join(map(str, seeds))}; finetune.py's own splits. "
             f"Command: `python benchmarks/rare_types.py` (benchmarks/rare_types.py says what each check does).", ""]
    if inputs:
        table = pd.DataFrame(inputs)
        lines += ["## Inputs: the L1 regression on the continuous values and on the model's tokens", "",
                  "| data | features | accuracy | macro-F1 | macro-F1 − on ln(1 + CP10k) (paired) |", "|---|---|---|---|---|"]
        for (name, what), group in table.groupby(["dataset", "features"], sort=False):
            base = table[(table.dataset == name) & (table.features == "ln(1 + CP10k)")].set_index("seed")
            diff = [r.macro_f1 - base.loc[r.seed, "macro_f1"] for r in group.itertuples()]
            lines.append(f"| {name} | {what} | {fmt(group.accuracy)} | {fmt(group.macro_f1)} | "
                         f"{'-' if what.startswith('ln') else paired(diff)} |")
        lines.append("")
    if decision:
        table = pd.DataFrame(decision)
        lines += ["## Decision: post-hoc prior correction of the fine-tuned model (from-scratch runs)", "",
                  "| data | rule | taus chosen | accuracy | macro-F1 | accuracy − tau 0 | macro-F1 − tau 0 |",
                  "|---|---|---|---|---|---|---|"]
        for (name, rule), group in table.groupby(["dataset", "rule"], sort=False):
            base = table[(table.dataset == name) & (table.rule == "tau = 0 (as shipped)")].set_index("seed")
            da = [r.accuracy - base.loc[r.seed, "accuracy"] for r in group.itertuples()]
            df = [r.macro_f1 - base.loc[r.seed, "macro_f1"] for r in group.itertuples()]
            shipped = rule.startswith("tau = 0")
            lines.append(f"| {name} | {rule} | {', '.join(f'{t:g}' for t in group.tau)} | "
                         f"{group.accuracy.mean():.3f} | {group.macro_f1.mean():.3f} | "
                         f"{'-' if shipped else paired(da)} | {'-' if shipped else paired(df)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="2021,2022,2023")
    p.add_argument("--checks", default="inputs,decision", help="comma-separated: inputs, decision")
    p.add_argument("--runs", default=str(OUT), help="benchmarks/accuracy.py's --out (its scratch runs)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results_rare_types.md"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.datasets.split(",") if DATASETS[n][0] is None or DATASETS[n][0].is_file()]
    checks = set(args.checks.split(","))
    inputs = [r for n in names for r in inputs_check(n, seeds)] if "inputs" in checks else []
    decision = [r for n in names for r in decision_check(n, seeds, Path(args.runs))] if "decision" in checks else []
    text = report(inputs, decision, seeds)
    Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
