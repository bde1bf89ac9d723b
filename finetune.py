"""Cell-type fine-tuning of scBERT (REFERENCE.md §4).

    python finetune.py                          # default data, from ckpts/pretrain.pth if it exists
    python finetune.py --data_path my.h5ad --label_key cell_type --model_path panglao_pretrain.pth \\
        --gene_panel panel_16906.txt            # the published weights carry no gene panel
    python finetune.py --folds 5                # stratified 5-fold cross-validation

Holds out a stratified test set it never looks at (--test_size), early-stops on the macro-F1 of a
stratified validation set (--valid_size, --patience), and writes ckpts/finetune_best.pth (with the
label names, gene panel and split indices that evaluate.py needs) and ckpts/finetune_last.pth
(for --resume), finetune_metrics.csv and finetune_loss.png.
"""
from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

import utils
from model import PRESETS, PerformerLM, get_config

DEFAULT_PRETRAINED = Path("ckpts") / "pretrain.pth"
logger = logging.getLogger("scbert")


# --------------------------------------------------------------------------------------------------
# starting point and data


def starting_checkpoint(model_path: str | None, from_scratch: bool) -> tuple[dict | None, Path | None]:
    """The pretrained checkpoint to start from and its path, or (None, None) to train from scratch."""
    if from_scratch:
        logger.info("training from scratch (--from_scratch)")
        return None, None
    path = Path(model_path) if model_path else DEFAULT_PRETRAINED
    if not path.exists() and not model_path:
        logger.info(f"no pretrained checkpoint at {path}: training from scratch "
                    f"(run pretrain.py first, or pass --model_path)")
        return None, None
    ckpt = utils.read_checkpoint(path)
    logger.info(f"starting from pretrained weights {path}")
    return ckpt, path


def choose_panel(start: dict | None, start_path: Path | None, gene_panel: str | None, adata, gene_num: int | None,
                 input_format: str, gene_map: utils.GeneMap | None = None) -> list[str]:
    """The pretrained checkpoint's panel (or the --gene_panel file, which must fit it); from scratch
    the file, else the data's genes."""
    if start is not None:
        config = utils.build_model_from_checkpoint(start, start_path).config
        panel = start.get("gene_panel")
        if gene_panel:
            panel = utils.load_gene_panel(gene_panel)
        if not panel:
            raise utils.InputError(
                f"{start_path} carries no gene panel (the published scBERT files do not); pass "
                f"--gene_panel FILE with its {config.gene_num} genes, one per line, in model order")
        if len(panel) != config.gene_num:
            raise utils.InputError(f"the gene panel has {len(panel)} genes but {start_path} was trained on "
                                   f"{config.gene_num}; pass the panel the checkpoint was trained with")
        return list(panel)
    if gene_panel:
        return utils.load_gene_panel(gene_panel)
    return utils.dataset_panel(adata, gene_num, input_format, gene_map)


@dataclass(frozen=True)
class LabelledCells:
    """The cells fine-tuning learns from: rows of the data as read, their labels and the classes."""
    rows: np.ndarray         # labelled rows of the data (splits index these)
    labels: np.ndarray       # their label strings
    names: list[str]         # the classes, sorted: the model's outputs
    codes: np.ndarray        # class index for every row of the data, -1 for a cell left out


def labelled_cells(adata, label_key: str, min_cells_per_class: int) -> LabelledCells:
    """The labelled cells of obs[label_key], leaving out types with fewer than min_cells_per_class."""
    labels = utils.read_labels(adata, label_key)
    if labels is None:
        raise utils.InputError(f"the data has no obs column {label_key!r} (columns: {utils.obs_columns(adata)}); "
                               f"pass --label_key with the column holding the cell types")
    rows = np.flatnonzero([label is not None for label in labels])
    if len(rows) == 0:
        raise utils.InputError(f"obs[{label_key!r}] is empty for every cell; label the cells or pick another column")
    labels = labels[rows]
    if len(rows) < adata.n_obs:
        logger.info(f"{adata.n_obs - len(rows)} cells without a label in obs[{label_key!r}] are left out")
    if min_cells_per_class > 0:
        names, counts = np.unique(labels, return_counts=True)
        rare = {str(n) for n, c in zip(names, counts) if c < min_cells_per_class}
        if rare:
            keep = ~np.isin(labels, list(rare))
            rows, labels = rows[keep], labels[keep]
            logger.info(f"left out {int((~keep).sum())} cells of {len(rare)} type(s) with fewer than "
                        f"{min_cells_per_class} cells: {', '.join(sorted(rare))}")
    names = sorted(set(labels))
    if len(names) < 2:
        raise utils.InputError(f"obs[{label_key!r}] holds a single cell type ({names[0]}); "
                               f"a classifier needs at least two")
    codes = np.full(adata.n_obs, -1, dtype=np.int64)
    codes[rows] = np.searchsorted(names, labels)
    return LabelledCells(rows, labels, names, codes)


def make_splits(cells: LabelledCells, folds: int, test_size: float, valid_size: float,
                seed: int) -> list[dict[str, np.ndarray]]:
    """One stratified train/valid/test split, or one per fold with folds > 1. They index rows of the
    data as read (labelled cells only), so evaluate.py finds the same cells."""
    if folds and folds > 1:
        splits = utils.stratified_folds(cells.labels, folds, valid_size, seed)
    else:
        splits = [utils.stratified_splits(cells.labels, test_size, valid_size, seed)]
    return [{k: cells.rows[v] for k, v in split.items()} for split in splits]


def classifier_model(start: dict | None, start_path: Path | None, preset: str, panel: list[str], bin_num: int,
                     gene2vec: Callable[[int], torch.Tensor] | None, seed: int, n_classes: int,
                     dropout: float) -> PerformerLM:
    """The model a split starts from, drawn from the seed: the pretrained checkpoint's (or from
    scratch the preset over the panel, with the Gene2Vec table `gene2vec(width)` if any) with a new
    cell-type head."""
    utils.seed_everything(seed)
    if start is not None:
        model = utils.build_model_from_checkpoint(start, start_path)
    else:
        config = get_config(preset, gene_num=len(panel), bin_num=bin_num,
                            pos_embed="gene2vec" if gene2vec is not None else "none")
        table = gene2vec(config.dim) if gene2vec is not None else None
        model = PerformerLM(config, pos_table=table)
        model.set_redraw_seed(seed)
    return model.attach_classifier(n_classes, dropout)


def set_trainable(model: PerformerLM, unfreeze: str) -> str:
    """Freezes everything, then unfreezes what `unfreeze` names. Returns a description."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = model.performer.net.layers
    if unfreeze == "all":
        chosen, what = [model], "all layers"
    elif unfreeze == "published":
        chosen, what = [model.norm, layers[-2], model.to_out], "final norm, second-to-last layer, head (published)"
    elif unfreeze == "last":
        chosen, what = [model.norm, layers[-1], model.to_out], "final norm, last layer, head"
    elif unfreeze.isdigit() and 0 <= int(unfreeze) <= len(layers):
        top = int(unfreeze)
        chosen = [model.norm, model.to_out, *(layers[len(layers) - top:] if top else [])]
        what = f"final norm, top {top} layer(s), head"
    else:
        raise utils.InputError(f"--unfreeze {unfreeze!r} is not understood; use published, last, all, "
                               f"or a number of top layers from 0 to {len(layers)}")
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(True)
    if model.pos_emb is not None and model.config.pos_embed == "gene2vec":
        model.pos_emb.emb.weight.requires_grad_(False)  # the Gene2Vec table always stays frozen
    return what


# --------------------------------------------------------------------------------------------------
# training one split


@dataclass(frozen=True)
class Cells:
    """The fine-tuning data as the model sees it."""
    aligned: Any             # AnnData on the model's gene panel
    input_format: str
    codes: np.ndarray        # class index per row of the data (-1: not trained on)
    n_classes: int
    fingerprint: str         # of the data as read, and where it was read from (None: the default data)
    data_path: str | None


@dataclass(frozen=True)
class FineTuning:
    """How every split is fine-tuned: the same for each fold."""
    new_model: Callable[[], PerformerLM]  # the starting model (seeded, with a fresh head)
    unfreeze: str                         # what trains (see set_trainable)
    amp: str
    schedule: utils.Schedule
    plan: utils.EpochPlan
    class_weights: bool                   # weight the loss by inverse class frequency
    resume: bool
    checkpoint_fields: dict[str, Any]     # what each checkpoint says about the data, labels and start
    run_args: dict[str, Any]              # the command line, stored in each checkpoint


predict = utils.predict  # the shared batched predictor (tests and older code call finetune.predict)


def warn_if_head_is_dead(head_input: list[float], ctx, log: Callable[[str], None] = logger.warning) -> None:
    """The published head scores each gene (a dim -> 1 projection), then a ReLU. If training drives
    every score below 0, the ReLU passes only zeros, no gradient reaches the layers below and the
    model predicts one class for ever (seen at --learning_rate 1e-3, with and without
    --class_weights). Say so while the user can still stop the run."""
    passed, seen = utils.all_reduce_sum(head_input, ctx)
    if seen > 0 and passed == 0:
        log("warning: the classifier head's per-gene scores are <= 0 for every gene of every validation cell "
            "(its ReLU passes nothing), so the model can no longer learn; restart with a lower "
            "--learning_rate (the published 1e-4) or a longer --warmup")


def scores(predictions: utils.Predictions) -> dict[str, float]:
    pred, truth = predictions.logits.argmax(-1), predictions.labels
    if len(truth) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    return {"accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0))}


def validation_scores(model, dataset, batch_size: int, num_workers: int, ctx, precision) -> dict[str, float]:
    head_input: list[float] = []
    valid = scores(predict(model, dataset, batch_size, ctx, precision, num_workers, head_input))
    warn_if_head_is_dead(head_input, ctx)
    return {"valid_acc": valid["accuracy"], "valid_macro_f1": valid["macro_f1"]}


def classification_loss(model, class_weight: torch.Tensor | None, device, precision) -> utils.LossFn:
    def loss_fn(batch):
        with precision.autocast():
            logits = model(batch["tokens"].to(device, torch.long))
        target = batch["label"].to(device)
        loss = F.cross_entropy(logits.float(), target, weight=class_weight)
        correct = (logits.argmax(-1) == target).sum()
        return loss, utils.step_statistics(loss, correct, torch.tensor(len(target), device=target.device))

    return loss_fn


def inverse_frequency_weights(codes: np.ndarray, n_classes: int, device) -> torch.Tensor:
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def train_split(split: dict[str, np.ndarray], out_dir: Path, cells: Cells, tuning: FineTuning,
                ctx: utils.DistContext, signals=None, fold: bool = False) -> Path:
    """Fine-tunes on split['train'], early-stops on split['valid']; writes finetune_best/last.pth,
    finetune_metrics.csv and finetune_loss.png in out_dir. Returns the best checkpoint's path. When
    resuming a cross-validation (fold), a fold not begun yet starts (a finished one trains no more)."""
    last_path, best_path = out_dir / "finetune_last.pth", out_dir / "finetune_best.pth"
    requested = tuning.resume and (last_path.exists() or not fold)
    resume = utils.resume_point(last_path, cells.fingerprint, cells.data_path, requested, tuning.run_args)
    model = utils.build_model_from_checkpoint(resume, last_path) if resume is not None else tuning.new_model()
    what = set_trainable(model, tuning.unfreeze)
    model.to(ctx.device).train()
    training = utils.prepare_training(model, tuning.amp, tuning.schedule, ctx, resume)
    logger.info(f"training {what}: {sum(p.numel() for p in training.params):,} parameters")

    class_weight = (inverse_frequency_weights(cells.codes[split["train"]], cells.n_classes, ctx.device)
                    if tuning.class_weights else None)
    bin_num = model.config.bin_num
    train_set = utils.token_dataset(cells.aligned, cells.input_format, bin_num, labels=cells.codes,
                                    indices=split["train"])
    valid_set = utils.token_dataset(cells.aligned, cells.input_format, bin_num, labels=cells.codes,
                                    indices=split["valid"] if len(split["valid"]) else split["train"])
    records = utils.EpochRecords(
        checkpoint=last_path, best_checkpoint=best_path, metrics_csv=out_dir / "finetune_metrics.csv",
        loss_plot=out_dir / "finetune_loss.png",
        plot_series=(("train_loss", "loss (train)"), ("valid_acc", "accuracy (valid)"),
                     ("valid_macro_f1", "macro-F1 (valid)")),
        plot_title="scBERT fine-tuning", train_acc_column="train_acc")
    loss_fn = classification_loss(training.stepped, class_weight, ctx.device, training.precision)
    plan = tuning.plan
    utils.run_epochs(
        training, train_set, lambda epoch: loss_fn,
        lambda: validation_scores(training.model, valid_set, plan.batch_size, plan.num_workers, ctx,
                                  training.precision),
        plan, records, ctx,
        checkpoint_fields={**tuning.checkpoint_fields, "splits": {k: [int(i) for i in v] for k, v in split.items()}},
        run_args=tuning.run_args, signals=signals)
    if training.bad_epochs >= plan.patience:
        logger.info(f"early stop: no better validation macro-F1 in {plan.patience} epochs")
    logger.info(f"best validation macro-F1 {training.best:.4f}: {best_path}")
    return best_path


def cross_validate(splits: list[dict[str, np.ndarray]], ckpt_dir: Path, cells: Cells, tuning: FineTuning,
                   ctx: utils.DistContext, signals=None) -> Path:
    """Trains every fold in ckpt_dir/fold{k}, scores its held-out fold with its best checkpoint, and
    writes a per-fold and mean ± sd table to ckpt_dir/cv_summary.csv."""
    precision = utils.Precision(utils.resolve_amp(tuning.amp, ctx.device), ctx.device)
    rows = []
    for k, split in enumerate(splits):
        logger.info(f"--- fold {k + 1} of {len(splits)} ---")
        best_path = train_split(split, utils.check_writable_dir(ckpt_dir / f"fold{k}", "--ckpt_dir"), cells, tuning,
                                ctx, signals, fold=True)
        model, _ = utils.load_checkpoint(best_path)
        model.to(ctx.device)
        test_set = utils.token_dataset(cells.aligned, cells.input_format, model.config.bin_num, labels=cells.codes,
                                       indices=split["test"])
        test = scores(predict(model, test_set, tuning.plan.batch_size, ctx, precision, tuning.plan.num_workers))
        rows.append({"fold": k, "n_test": len(split["test"]), **test})
    table = utils.summarise_folds(rows)
    summary = ckpt_dir / "cv_summary.csv"
    if ctx.is_main:
        table.to_csv(summary, index=False)
        logger.info(table.to_string(index=False))
    return summary


# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    ctx = utils.setup_distributed(args.device)
    ckpt_dir = Path(args.ckpt_dir)
    start, start_path = starting_checkpoint(args.model_path, args.from_scratch)

    # data: labelled cells, splits, the panel
    adata = utils.open_cells(args.data_path, utils.SomaOptions(args.soma_measurement, args.soma_layer,
                                                               args.obs_filter))
    input_format = utils.detect_input_format(adata, args.input_format)
    labelled = labelled_cells(adata, args.label_key, args.min_cells_per_class)
    splits = make_splits(labelled, args.folds, args.test_size, args.valid_size, args.seed)
    gene_map = utils.read_gene_map(args.gene_map)
    panel = choose_panel(start, start_path, args.gene_panel, adata, args.gene_num, input_format, gene_map)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format, gene_map=gene_map)
    found = aligned.uns["scbert_panel_overlap"]
    logger.info(f"data: {len(labelled.rows)} labelled cells of {len(labelled.names)} types; {found['found']} of "
                f"{found['total']} panel genes found ({input_format} input)")
    utils.check_writable_dir(ckpt_dir, "--ckpt_dir")  # after the inputs are known good: an error leaves nothing behind

    # how each split trains
    fingerprint = utils.data_fingerprint(adata)
    cells = Cells(aligned, input_format, labelled.codes, len(labelled.names), fingerprint, args.data_path)
    gene2vec = functools.partial(utils.gene2vec_table, args.gene2vec_path, aligned, panel, seed=args.seed,
                                 input_format=input_format, out_dir=ckpt_dir, ctx=ctx) if args.pos_embed else None
    tuning = FineTuning(
        new_model=functools.partial(classifier_model, start, start_path, args.model, panel, args.bin_num, gene2vec,
                                    args.seed, len(labelled.names), args.cls_dropout),
        unfreeze=args.unfreeze or ("all" if start is None else "published"),
        amp=args.amp,
        schedule=utils.Schedule(args.learning_rate, args.min_lr, args.cycle, args.warmup, args.lr_decay),
        plan=utils.EpochPlan(args.epoch, args.batch_size, args.grad_acc, args.clip, args.seed, args.num_workers,
                             monitor="valid_macro_f1", patience=args.patience,
                             grad_checkpoint=args.grad_checkpoint, save_every_steps=args.save_every_steps,
                             log_every=args.log_every),
        class_weights=args.class_weights, resume=args.resume,
        checkpoint_fields={"gene_panel": list(panel), "input_format": input_format, "label_names": labelled.names,
                           "label_key": args.label_key, "data_fingerprint": fingerprint, "data_path": args.data_path,
                           "pretrained_from": str(start_path) if start_path else None},
        run_args=utils.to_plain(vars(args)))

    with utils.guarded_run(ckpt_dir, ctx) as signals:  # the folder is this run's from here
        utils.write_gene_overlap(aligned, ckpt_dir, ctx)
        if len(splits) == 1:
            result = train_split(splits[0], ckpt_dir, cells, tuning, ctx, signals)
        else:
            result = cross_validate(splits, ckpt_dir, cells, tuning, ctx, signals)
    utils.cleanup_distributed()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=None, help=f"labelled cells: {utils.DATA_PATH_HELP}; default: "
                      "scanpy's bundled Zheng68K subset")
    utils.add_source_flags(data)
    data.add_argument("--label_key", default="celltype", help="obs column holding the cell types")
    data.add_argument("--input_format", default="auto", choices=["auto", "counts", "log1p"])
    data.add_argument("--gene_panel", default=None, help="text file, one gene per line, in model order "
                      "(required with a checkpoint that carries no panel, e.g. panglao_pretrain.pth)")
    data.add_argument("--gene_num", type=int, default=None, help="from scratch without --gene_panel: "
                      "keep this many highly variable genes (default: all genes)")
    utils.add_gene_map_flag(data)
    data.add_argument("--bin_num", type=int, default=5, help="expression bins, from scratch only")
    data.add_argument("--test_size", type=float, default=0.2, help="held-out stratified test fraction")
    data.add_argument("--valid_size", type=float, default=0.1, help="validation fraction of the rest")
    data.add_argument("--folds", type=int, default=0, help="K > 1: stratified K-fold cross-validation")
    data.add_argument("--min_cells_per_class", type=int, default=0,
                      help="leave out cell types with fewer labelled cells (0: keep every type)")
    data.add_argument("--num_workers", type=int, default=0)
    model = p.add_argument_group("model")
    model.add_argument("--model_path", default=None, help=f"pretrained weights (ours or the published "
                       f"scBERT file); default {DEFAULT_PRETRAINED} if it exists, else from scratch")
    model.add_argument("--from_scratch", action="store_true", help="ignore any pretrained checkpoint")
    model.add_argument("--model", default="small", choices=sorted(PRESETS), help="preset, from scratch only")
    model.add_argument("--pos_embed", action=argparse.BooleanOptionalAction, default=True,
                       help="from scratch: Gene2Vec positional embedding")
    model.add_argument("--gene2vec_path", default=None, help="from scratch: published-format Gene2Vec file")
    model.add_argument("--unfreeze", default=None, help="what trains: 'published' (final norm, "
                       "second-to-last layer, head), 'last', 'all', or a number of top layers; "
                       "default published, 'all' from scratch")
    model.add_argument("--cls_dropout", type=float, default=0.0, help="dropout in the classifier head")
    model.add_argument("--grad_checkpoint", action="store_true")
    train = p.add_argument_group("training")
    train.add_argument("--epoch", type=int, default=15, help="maximum epochs (default: one first cycle of the published schedule)")
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--grad_acc", type=int, default=1)
    utils.add_schedule_flags(train)
    train.add_argument("--clip", type=float, default=1.0)
    train.add_argument("--patience", type=int, default=10, help="validations without a better macro-F1")
    train.add_argument("--class_weights", action="store_true", help="weight the loss by inverse class frequency")
    run = p.add_argument_group("run")
    run.add_argument("--ckpt_dir", default="ckpts")
    utils.add_fault_flags(run, "finetune_last.pth")
    utils.add_run_flags(run)
    return p


if __name__ == "__main__":
    utils.run_main(main, build_parser())
