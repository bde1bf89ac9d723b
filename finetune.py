"""Cell-type fine-tuning of scBERT (REFERENCE.md §4).

    python finetune.py                          # default data, from ckpts/pretrain.pth if it exists
    python finetune.py --data_path my.h5ad --label_key cell_type --model_path panglao_pretrain.pth \\
        --gene_panel panel_16906.txt            # the published weights carry no gene panel
    python finetune.py --folds 5                # a 5-fold ensemble: ckpts/ensemble.pth for evaluate.py
    python finetune.py --test_size 0            # fit on every labelled cell, to deploy

Holds out a stratified test set it never looks at (--test_size), keeps the epoch that does best on a
stratified validation set (--valid_size; the most types recognised, then macro-F1) and stops after
--patience epochs without a better one, and writes ckpts/finetune_best.pth (with the label names,
gene panel and split indices that evaluate.py needs) and ckpts/finetune_last.pth (for --resume),
finetune_metrics.csv and finetune_loss.png. The schedule and epoch count follow the number of
training cells unless given (--schedule; train_utils.choose_schedule); a fresh head is pointed
along expression before training (orient_head) and a head guard keeps it from dying (HeadGuard).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

import ensemble
import utils
from model import PRESETS, PerformerLM, get_config

DEFAULT_PRETRAINED = Path("ckpts") / "pretrain.pth"
DEFAULT_MIN_VALID = 2  # --min_valid_per_class
# the published loss, kept by measurement (benchmarks/accuracy.py --methods scratch,weights,sampler, 3 seeds):
# inverse-frequency weights cost the default data 0.14 macro-F1; the square-root sampler is level with none
# on the default data and on PBMC3k (within 0.01)
DEFAULT_BALANCE = "none"
# --label_smoothing, by measurement (benchmarks/accuracy.py --methods scratch,unsmoothed, 3 seeds): 0.1 against
# the published loss (0) lifts PBMC3k accuracy on every seed (+0.006 paired) to the regression's, macro-F1 +0.005;
# on the default data accuracy is level and macro-F1 -0.026 inside its noise (SE 0.049, 140 test cells)
DEFAULT_LABEL_SMOOTHING = 0.1
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
        if gene_num is not None:
            logger.info(f"note: --gene_num {gene_num} does not apply: the model starts from {start_path} and keeps "
                        f"its panel of {len(panel)} genes (--from_scratch chooses genes from the data)")
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
        columns = utils.obs_columns(adata)
        if label_key in set(map(str, utils.data_genes(adata))):  # a table's column of numbers is read as a gene
            raise utils.InputError(f"the data has no obs column {label_key!r}: a column of that name was read as a "
                                   f"gene (its values are numbers); write the types as text (e.g. 'c0', 'c1') or "
                                   f"put them in an .h5ad's obs")
        if columns == "none":  # a 10x folder or .h5, or a table of genes only: nothing to name
            raise utils.InputError(f"the data has no obs column {label_key!r}: it has no obs columns at all (10x "
                                   f"files carry no cell types); add the types as a column of an .h5ad's obs, or "
                                   f"as a text column of a .csv beside the genes, and pass its name as --label_key")
        raise utils.InputError(f"the data has no obs column {label_key!r} (columns: {columns}); "
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


def make_splits(cells: LabelledCells, folds: int, test_size: float, valid_size: float, seed: int,
                min_valid_per_class: int = DEFAULT_MIN_VALID) -> list[dict[str, np.ndarray]]:
    """One stratified train/valid/test split, or with folds > 1 an outer test split and one
    train/valid split per fold (the fold validates on valid_size of the rest, drawn from its own
    K-th part, and trains on all the other non-test cells: as many as the single split trains on).
    They index rows of the data as read (labelled cells only), so evaluate.py finds the same cells."""
    if min_valid_per_class < 0:
        raise utils.InputError(f"--min_valid_per_class {min_valid_per_class} is negative; use 0 (off) or more")
    if valid_size <= 0:
        raise utils.InputError(f"--valid_size {valid_size} leaves no validation cells, and they choose the best "
                               f"epoch and stop the run; use a fraction such as 0.1")
    if folds and folds < 2:
        raise utils.InputError(f"--folds {folds} makes no ensemble (one fold is the single run); use --folds 2 or "
                               f"more, or leave it off")
    if folds:  # each fold validates on a stratified draw from its K-th of the non-test cells
        splits = utils.stratified_folds(cells.labels, folds, test_size, seed, valid_size, min_valid_per_class)
    else:
        splits = [utils.stratified_splits(cells.labels, test_size, valid_size, seed, min_valid_per_class)]
    return [{k: cells.rows[v] for k, v in split.items()} for split in splits]


# the flags that decide which cells a run trains, validates and tests on, and what it predicts
SPLIT_FLAGS = ("data_path", "label_key", "min_cells_per_class", "folds", "test_size", "valid_size",
               "min_valid_per_class", "seed", "gene_num", "gene_panel")


def check_resume(splits: list[dict[str, np.ndarray]], ckpt_dir: Path, args: argparse.Namespace,
                 label_names: list[str], panel: list[str], input_format: str) -> None:
    """With --resume, before anything is written: each run or fold checkpoint there is to continue was
    started on the cells this command splits off (train, valid and test), from its seed, for its cell
    types, on its gene panel and tokenised alike (input_format). A different --seed or --test_size would otherwise go on training a
    model on what are now the test cells (the data fingerprint alone does not see that)."""
    if not args.resume:
        return
    for k, split in enumerate(splits):
        path = ckpt_dir / (f"fold{k}" if len(splits) > 1 else "") / "finetune_last.pth"
        if not path.is_file():
            continue
        stored = utils.read_checkpoint(path, mmap=True)
        wanted = {"splits": {key: [int(i) for i in rows] for key, rows in split.items()},
                  "seed": args.seed + (k if len(splits) > 1 else 0), "label_names": list(label_names),
                  "gene_panel": list(panel), "input_format": input_format}
        differ = [key for key, value in wanted.items() if key in stored and stored[key] != value]
        if differ:
            saved = stored.get("args", {})
            flags = [f"--{f}" for f in SPLIT_FLAGS if f in saved and saved[f] != getattr(args, f, None)]
            raise utils.InputError(
                f"--resume: {path} was trained on other cells or types than this command gives (its "
                f"{', '.join(d.replace('_', ' ') for d in differ)} differ"
                + (f"; it was started with other {', '.join(flags)}" if flags else "")
                + "); resume with the flags it started with, or start a new run in another --ckpt_dir")


SCHEDULE_FLAGS = ("learning_rate", "min_lr", "cycle", "warmup", "lr_decay", "epoch")


def schedule_flags(args: argparse.Namespace, ckpt_dir: Path) -> dict[str, Any]:
    """The schedule flags the user gave (None: not given). With --resume, those not given come from
    the checkpoint being resumed, so a run continues on the schedule it started with (the automatic
    cosine spans the epochs it chose; a larger --epoch continues into the next warm restart)."""
    given = {k: getattr(args, k) for k in SCHEDULE_FLAGS}
    if args.resume:
        last = next((p for p in (ckpt_dir / "finetune_last.pth", ckpt_dir / "fold0" / "finetune_last.pth")
                     if p.is_file()), None)
        # mapped, not read: the weights are read once, when train_split resumes from this file
        stored = utils.read_checkpoint(last, mmap=True).get("schedule") if last is not None else None
        if stored:
            given = {k: (v if v is not None else stored.get(k)) for k, v in given.items()}
            logger.info(f"--resume: the schedule of {last} ({', '.join(f'{k} {stored[k]:g}' for k in SCHEDULE_FLAGS if k in stored)}) "
                        f"unless given")
    return given


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
    new_model: Callable[[int], PerformerLM]  # the starting model drawn from a seed (with a fresh head)
    unfreeze: str                         # what trains (see set_trainable)
    amp: str
    schedule: utils.Schedule
    plan: utils.EpochPlan
    balance: str                          # none, weights (inverse-frequency loss) or sampler (see balance_plan)
    label_smoothing: float                # the cross-entropy's label smoothing (0: the published loss)
    orient_head: bool                     # point a fresh head's gene scores along expression (orient_head)
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


ORIENT_POSITIONS = 262_144  # cells x genes encoded to orient a fresh head (at most 128 cells)


def orient_head(model: PerformerLM, dataset, device) -> str:
    """Points a fresh head's per-gene score the way expression rises; returns what it did, for the log.

    The head scores each gene (w . encoding + b), then a ReLU. Drawn at random, w points either way,
    and in about half the seeds the score *falls* with expression: the ReLU then passes the genes a
    cell does not express (a constant) and blocks most of those it does, which send no gradient back.
    Measured at initialisation on PBMC3k (seeds 2021, 2022, 2023): 100%, 0% and 95% of unexpressed
    genes passed, against 20%, 80% and 45% of expressed ones; the one seed pointed the right way
    fitted its training cells by epoch 3, the other two took all 10 epochs and missed types for 4
    and 6 of them. This flips (w, b) where the mean score of the expressed genes (tokens above the
    lowest present) is below that of the unexpressed ones (the lowest token), over a spread of the
    training cells, then sets b so that the ReLU's threshold lies midway between the two means. Flipping the sign of a
    symmetric random draw is another draw of the same distribution, and the trained head is the
    published one: published checkpoints load and predict unchanged."""
    head = utils.unwrap(model).to_out
    n_cells = max(1, min(len(dataset), 128, ORIENT_POSITIONS // model.config.seq_len))
    rows = np.unique(np.linspace(0, len(dataset) - 1, n_cells).round().astype(np.int64))
    tokens = dataset[rows.tolist()]["tokens"].to(device).long()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            weight, bias = head.conv1.weight, head.conv1.bias
            score = model.encode(tokens).float() @ weight.view(-1).float() + bias.float()  # (cells, genes)
            low = tokens == tokens.min()
            if low.all():
                return "head orientation: kept (every token of the sampled cells is the same)"
            # the direction from the same two groups the threshold sits between (a covariance with the
            # token value can disagree: each bin has its own random embedding, so the score is not monotone)
            sign = -1.0 if float(score[~low].mean() - score[low].mean()) < 0 else 1.0
            score = score * sign
            shift = -0.5 * (score[low].mean() + score[~low].mean())
            weight.mul_(sign)
            bias.mul_(sign).add_(shift.to(bias.dtype))
            passed_low, passed_high = float((score[low] + shift > 0).float().mean()), float(
                (score[~low] + shift > 0).float().mean())
    finally:
        model.train(was_training)
    return (f"head orientation ({len(rows)} training cells): {'flipped' if sign < 0 else 'kept'}, threshold moved "
            f"by {float(shift):+.3g}; the ReLU now passes {passed_high:.0%} of expressed and {passed_low:.0%} of "
            f"unexpressed genes (--no-orient_head: the head as drawn)")


class HeadGuard:
    """Keeps the published head alive while it trains. The head scores each gene (dim -> 1), then a
    ReLU: a cell whose every score is <= 0 reaches the classifier as zeros and sends no gradient
    back, and once that holds for every cell the model predicts one type for ever (seen from scratch
    at 3e-4 and 1e-3). Two remedies, in training steps only:
    - for such cells, the loss adds `margin` minus the cell's highest score (a cell with a positive
      score is trained by the cross-entropy alone);
    - when every cell of a batch is dead, the score's bias is raised at once (before this step's
      update) so that half of those cells have a score of at least `margin` (a restart of the head's
      operating point; Adam alone would take hundreds of steps to climb back).
    A trained model computes exactly what the published head computes; published checkpoints load
    and predict unchanged. Nothing is left pending between steps, so checkpoints and resumes need
    no state of its own."""

    def __init__(self, head: torch.nn.Module, margin: float = 1.0):
        self.head, self.margin = head, margin
        self.scores = None
        self.counts = None  # [cells lifted, restarts] since take_counts, on the head's device
        self.handle = head.act.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        if torch.is_grad_enabled():  # training steps only, not validation
            self.scores = inputs[0]

    def loss(self) -> torch.Tensor | float:
        """The revival term of the last training forward, after raising the bias if the batch is
        all dead. No host synchronisation: the decisions stay on the device; in a distributed run
        every rank raises the bias by the largest rank's need, so the replicas stay equal."""
        scores, self.scores = self.scores, None
        if scores is None:
            return 0.0
        top = scores.float().amax(dim=-1)  # (cells,)
        dead = top <= 0
        if self.counts is None:
            self.counts = torch.zeros(2, dtype=torch.float64, device=top.device)
        with torch.no_grad():
            shift = torch.where(dead.all(), self.margin - top.median(), torch.zeros((), device=top.device))
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX)
            bias = self.head.conv1.bias
            bias.add_(shift.to(bias.dtype))  # adding 0 leaves it as it is, bit for bit
            self.counts += torch.stack([dead.sum(), shift > 0]).to(self.counts.dtype)
        return torch.where(dead, self.margin - top, torch.zeros_like(top)).mean()

    def take_counts(self) -> tuple[int, int]:
        """(cells lifted by the loss term, bias restarts) since the last call."""
        if self.counts is None:
            return 0, 0
        lifted, restarts = (int(v) for v in self.counts.tolist())
        self.counts.zero_()
        return lifted, restarts

    def remove(self) -> None:
        self.handle.remove()


def scores(predictions: utils.Predictions) -> dict[str, float]:
    return label_scores(predictions.labels, predictions.logits.argmax(-1))


def label_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1 and the number of true types with no cell recognised."""
    if len(truth) == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "types_missed": 0}
    present = np.unique(truth)
    found = np.unique(truth[pred == truth])
    return {"accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, average="macro", zero_division=0)),
            "types_missed": int(len(np.setdiff1d(present, found)))}


def selection_score(got: dict[str, float]) -> float:
    """valid_selection: macro-F1 minus the types never recognised (more types recognised always ranks higher)."""
    return got["macro_f1"] - got["types_missed"]


def validation_scores(model, dataset, batch_size: int, num_workers: int, ctx, precision,
                      guard: HeadGuard | None = None) -> dict[str, float]:
    """The validation scores of an epoch. valid_selection, which picks the best epoch and stops
    the run, is macro-F1 minus the number of validation types with no cell recognised: an epoch that
    recognises more types always ranks higher, then the higher macro-F1."""
    head_input: list[float] = []
    valid = scores(predict(model, dataset, batch_size, ctx, precision, num_workers, head_input))
    warn_if_head_is_dead(head_input, ctx)
    row = {"valid_acc": valid["accuracy"], "valid_macro_f1": valid["macro_f1"],
           "valid_types_missed": valid["types_missed"],
           "valid_selection": selection_score(valid)}
    if guard is not None:
        lifted, restarts = utils.all_reduce_sum(list(guard.take_counts()), ctx)
        # cells differ per rank; a restart is the same on every rank (all-reduced), so counted once
        row.update({"head_lifted_cells": int(lifted), "head_restarts": int(restarts) // ctx.world_size})
    return row


def classification_loss(model, class_weight: torch.Tensor | None, device, precision,
                        guard: HeadGuard | None = None, label_smoothing: float = 0.0) -> utils.LossFn:
    def loss_fn(batch):
        with precision.autocast():
            logits = model(batch["tokens"].to(device, torch.long))
        target = batch["label"].to(device)
        loss = F.cross_entropy(logits.float(), target, weight=class_weight, label_smoothing=label_smoothing)
        correct = (logits.argmax(-1) == target).sum()
        statistics = utils.step_statistics(loss, correct, torch.tensor(len(target), device=target.device))
        if guard is not None:
            loss = loss + guard.loss()
        return loss, statistics

    return loss_fn


def inverse_frequency_weights(codes: np.ndarray, n_classes: int, device) -> torch.Tensor:
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)


def balanced_sample_weights(codes: np.ndarray) -> np.ndarray:
    """--balance sampler: a weight per training cell so that each epoch draws the types in proportion
    to the square root of their counts (a type of 10 cells among 1,000 is drawn 10x as often as its
    share, not 100x: square-root sampling, Mahajan et al. 2018), with replacement."""
    counts = np.bincount(codes)
    return 1.0 / np.sqrt(counts[codes].astype(np.float64))


def train_split(split: dict[str, np.ndarray], out_dir: Path, cells: Cells, tuning: FineTuning,
                ctx: utils.DistContext, signals=None, fold: int | None = None) -> Path:
    """Fine-tunes on split['train'], early-stops on split['valid']; writes finetune_best/last.pth,
    finetune_metrics.csv and finetune_loss.png in out_dir. Returns the best checkpoint's path. Fold k
    of a cross-validation draws its start and its batches from --seed + k (the members of an ensemble
    differ in more than their cells); when resuming, a fold not begun yet starts (a finished one
    trains no more)."""
    last_path, best_path = out_dir / "finetune_last.pth", out_dir / "finetune_best.pth"
    requested = tuning.resume and (last_path.exists() or fold is None)
    resume = utils.resume_point(last_path, cells.fingerprint, cells.data_path, requested, tuning.run_args)
    seed = tuning.plan.seed + (fold or 0)
    model = utils.build_model_from_checkpoint(resume, last_path) if resume is not None else tuning.new_model(seed)
    what = set_trainable(model, tuning.unfreeze)
    model.to(ctx.device).train()
    if resume is None and tuning.orient_head:
        logger.info(orient_head(model, utils.token_dataset(cells.aligned, cells.input_format, model.config.bin_num,
                                                           indices=split["train"]), ctx.device))
    training = utils.prepare_training(model, tuning.amp, tuning.schedule, ctx, resume)
    logger.info(f"training {what}: {sum(p.numel() for p in training.params):,} parameters")

    train_codes = cells.codes[split["train"]]
    class_weight = (inverse_frequency_weights(train_codes, cells.n_classes, ctx.device)
                    if tuning.balance == "weights" else None)
    plan = dataclasses.replace(tuning.plan, seed=seed)
    if tuning.balance == "sampler":
        plan = dataclasses.replace(plan, sample_weights=balanced_sample_weights(train_codes))
    guard = HeadGuard(utils.unwrap(training.model).to_out)
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
    loss_fn = classification_loss(training.stepped, class_weight, ctx.device, training.precision, guard,
                                  label_smoothing=tuning.label_smoothing)
    try:
        utils.run_epochs(
            training, train_set, lambda epoch: loss_fn,
            lambda: validation_scores(training.model, valid_set, plan.batch_size, plan.num_workers, ctx,
                                      training.precision, guard),
            plan, records, ctx,
            checkpoint_fields={**tuning.checkpoint_fields, "seed": seed,
                               "splits": {k: [int(i) for i in v] for k, v in split.items()}},
            run_args=tuning.run_args, signals=signals)
    finally:
        guard.remove()
    if training.bad_epochs >= plan.patience:
        logger.info(f"early stop: no better validation score in {plan.patience} epochs")
    logger.info(f"best validation score {describe_selection(training.best)}: {best_path}")
    return best_path


def describe_selection(value: float) -> str:
    """valid_selection in words: macro-F1 and the types missed."""
    if not np.isfinite(value):
        return "none"
    missed = int(np.ceil(-value)) if value < 0 else 0
    return f"macro-F1 {value + missed:.4f}" + (f", {missed} validation type(s) never recognised" if missed else "")


def cross_validate(splits: list[dict[str, np.ndarray]], ckpt_dir: Path, cells: Cells, tuning: FineTuning,
                   ctx: utils.DistContext, signals=None) -> Path:
    """Trains every fold in ckpt_dir/fold{k} (it early-stops on its own part of the non-test cells),
    writes ckpt_dir/ensemble.pth listing the folds' best checkpoints, and ckpt_dir/cv_summary.csv:
    per fold its validation scores and its scores on the common test cells, their mean and sd, and
    the ensemble's test scores (the folds' probabilities averaged). Returns the ensemble file."""
    precision = utils.Precision(utils.resolve_amp(tuning.amp, ctx.device), ctx.device)
    test_rows = splits[0]["test"]
    rows, members, test_logits, test_labels = [], [], [], None
    for k, split in enumerate(splits):
        logger.info(f"--- fold {k + 1} of {len(splits)} ---")
        best_path = train_split(split, utils.check_writable_dir(ckpt_dir / f"fold{k}", "--ckpt_dir"), cells, tuning,
                                ctx, signals, fold=k)
        model, _ = utils.load_checkpoint(best_path)
        model.to(ctx.device)
        row: dict[str, Any] = {"fold": k, "n_valid": len(split["valid"]), "n_test": len(test_rows)}
        for part, part_rows in (("valid", split["valid"]), ("test", test_rows)):
            if not len(part_rows):
                continue
            dataset = utils.token_dataset(cells.aligned, cells.input_format, model.config.bin_num, labels=cells.codes,
                                          indices=part_rows)
            predicted = predict(model, dataset, tuning.plan.batch_size, ctx, precision, tuning.plan.num_workers)
            got = scores(predicted)
            row.update({f"{part}_accuracy": got["accuracy"], f"{part}_macro_f1": got["macro_f1"]})
            if part == "test":  # gathered rank by rank: the labels come in the same order as the logits
                test_logits.append(predicted.logits)
                test_labels = predicted.labels
        rows.append(row)
        members.append(best_path)
    ensemble_path = ckpt_dir / "ensemble.pth"
    summary = ckpt_dir / "cv_summary.csv"
    if ctx.is_main:
        non_test = np.sort(np.concatenate([splits[0]["train"], splits[0]["valid"]]))  # a fold's parts: all but the test
        ensemble.write_ensemble(ensemble_path, members, {
            **tuning.checkpoint_fields, "folds": len(splits),
            "splits": {"train": [int(i) for i in non_test], "valid": [], "test": [int(i) for i in test_rows]},
            "fold_splits": [{k: [int(i) for i in v] for k, v in s.items() if k != "test"} for s in splits],
            "args": dict(tuning.run_args)})
        table = summary_table(rows, test_logits, test_labels)
        partial = summary.with_name(summary.name + ".partial")
        table.to_csv(partial, index=False)
        os.replace(partial, summary)
        logger.info(table.to_string(index=False))
        logger.info(f"ensemble of {len(members)} folds: {ensemble_path} (python evaluate.py --model_path "
                    f"{ensemble_path})")
    utils.barrier(ctx)
    return ensemble_path


def summary_table(rows: list[dict[str, Any]], test_logits: list[np.ndarray], test_codes: np.ndarray | None):
    """cv_summary.csv: a row per fold, 'mean' and 'sd' over the folds, and with test cells an
    'ensemble' row (averaged probabilities on the test cells; test_codes in the logits' order)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    metrics = [c for c in table.columns if c not in ("fold", "n_valid", "n_test")]
    mean = {"fold": "mean", "n_valid": float(table["n_valid"].mean()), "n_test": int(table["n_test"].iloc[0]),
            **{m: table[m].mean() for m in metrics}}
    sd = {"fold": "sd", **{m: table[m].std(ddof=1) for m in metrics}}
    extra = [mean, sd]
    if test_codes is not None and test_logits:
        got = scores(utils.Predictions(ensemble.mean_log_probabilities(test_logits), None, test_codes, None))
        extra.append({"fold": "ensemble", "n_test": len(test_codes), "test_accuracy": got["accuracy"],
                      "test_macro_f1": got["macro_f1"]})
    return pd.concat([table.astype({"fold": str}), pd.DataFrame(extra)], ignore_index=True)


# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    if not 0.0 <= args.label_smoothing < 1.0:
        raise utils.InputError(f"--label_smoothing {args.label_smoothing} is outside [0, 1); use e.g. 0.1, or 0 for "
                               f"the published loss")
    ctx = utils.setup_distributed(args.device)
    ckpt_dir = Path(args.ckpt_dir)
    start, start_path = starting_checkpoint(args.model_path, args.from_scratch)

    # data: labelled cells, splits, the panel
    adata = utils.open_cells(args.data_path, utils.SomaOptions(args.soma_measurement, args.soma_layer,
                                                               args.obs_filter))
    labelled = labelled_cells(adata, args.label_key, args.min_cells_per_class)
    input_format = utils.detect_input_format(adata, args.input_format)
    splits = make_splits(labelled, args.folds, args.test_size, args.valid_size, args.seed, args.min_valid_per_class)
    choice = utils.choose_schedule(args.schedule, len(splits[0]["train"]), schedule_flags(args, ckpt_dir))
    logger.info(choice.description)
    if args.class_weights and args.balance not in (None, "weights"):
        raise utils.InputError(f"--class_weights is --balance weights, and --balance {args.balance} asks for "
                               f"another; give one of them")
    balance = args.balance = "weights" if args.class_weights else (args.balance or DEFAULT_BALANCE)
    logger.info(f"rare types: --balance {balance}, --label_smoothing {args.label_smoothing:g}; validation keeps at "
                f"least {args.min_valid_per_class} cell(s) of each type where it can; the best epoch recognises the "
                f"most validation types, then has the highest macro-F1")
    gene_map = utils.read_gene_map(args.gene_map)
    panel = choose_panel(start, start_path, args.gene_panel, adata, args.gene_num, input_format, gene_map)
    # tokenised as the starting checkpoint's cells were (rescaled where the data is in the other format)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format, gene_map=gene_map,
                                   model_format=start.get("input_format") if start is not None else None)
    data_format, input_format = input_format, aligned.uns["scbert_input_format"]
    check_resume(splits, ckpt_dir, args, labelled.names, panel, input_format)
    found = aligned.uns["scbert_panel_overlap"]
    logger.info(f"data: {len(labelled.rows)} labelled cells of {len(labelled.names)} types; {found['found']} of "
                f"{found['total']} panel genes found ({data_format} input)")
    if balance == "sampler":
        utils.require_in_memory(aligned, "--balance sampler (it draws cells at random)", "use --balance weights")
    utils.check_writable_dir(ckpt_dir, "--ckpt_dir")  # after the inputs are known good: an error leaves nothing behind

    # how each split trains
    fingerprint = utils.data_fingerprint(adata)
    cells = Cells(aligned, input_format, labelled.codes, len(labelled.names), fingerprint, args.data_path)
    gene2vec = functools.partial(utils.gene2vec_table, args.gene2vec_path, aligned, panel, seed=args.seed,
                                 input_format=input_format, out_dir=ckpt_dir, ctx=ctx) if args.pos_embed else None
    tuning = FineTuning(
        new_model=functools.partial(classifier_model, start, start_path, args.model, panel, args.bin_num, gene2vec,
                                    n_classes=len(labelled.names), dropout=args.cls_dropout),
        unfreeze=args.unfreeze or ("all" if start is None else "published"),
        amp=args.amp,
        schedule=choice.schedule,
        plan=utils.EpochPlan(choice.epochs, args.batch_size, args.grad_acc, args.clip, args.seed, args.num_workers,
                             monitor="valid_selection", patience=args.patience,
                             grad_checkpoint=args.grad_checkpoint, save_every_steps=args.save_every_steps,
                             log_every=args.log_every),
        balance=balance, label_smoothing=args.label_smoothing, orient_head=args.orient_head, resume=args.resume,
        checkpoint_fields={"gene_panel": list(panel), "input_format": input_format, "label_names": labelled.names,
                           "label_key": args.label_key, "data_fingerprint": fingerprint, "data_path": args.data_path,
                           "pretrained_from": str(start_path) if start_path else None,
                           "schedule": {**dataclasses.asdict(choice.schedule), "epoch": choice.epochs}},
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
    data.add_argument("--test_size", type=float, default=0.2, help="held-out stratified test fraction; 0 fits on "
                      "every labelled cell (the validation cells still choose the epoch), to deploy")
    data.add_argument("--valid_size", type=float, default=0.1, help="validation fraction of the rest (with --folds, "
                      "of the rest each fold validates on, drawn from its own K-th part)")
    data.add_argument("--min_valid_per_class", type=int, default=DEFAULT_MIN_VALID, help="give each type at least "
                      "this many validation cells, from its training cells, while half of them stay for training "
                      "(with --folds: up to this many of each type the fold's part has)")
    data.add_argument("--folds", type=int, default=0, help="K > 1: after the --test_size split, K folds over the "
                      "rest; fold k validates on --valid_size of the rest drawn from its k-th part, trains on all "
                      "the other non-test cells and starts from --seed + k; writes fold{k}/ and ensemble.pth "
                      "(evaluate.py averages the folds) and cv_summary.csv")
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
    model.add_argument("--orient_head", action=argparse.BooleanOptionalAction, default=True,
                       help="point a fresh head's per-gene scores so that they rise with expression (finetune.orient_head); "
                            "--no-orient_head keeps the random draw")
    model.add_argument("--grad_checkpoint", action="store_true")
    train = p.add_argument_group("training")
    train.add_argument("--epoch", type=int, default=None, help="maximum epochs; default: from --schedule (auto: "
                       "10-30 below 10^4 training cells, 15 up to 10^5, 2-15 above)")
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--grad_acc", type=int, default=1)
    utils.add_schedule_flags(train, auto=True)
    train.add_argument("--clip", type=float, default=1.0)
    train.add_argument("--patience", type=int, default=10, help="epochs without a better validation score (valid_selection)")
    train.add_argument("--balance", default=None, choices=["none", "weights", "sampler"],
                       help=f"rare types: 'weights' weights the loss by inverse type frequency, 'sampler' draws "
                            f"each epoch's cells with square-root type balancing; default {DEFAULT_BALANCE}")
    train.add_argument("--class_weights", action="store_true", help="the same as --balance weights (older name)")
    train.add_argument("--label_smoothing", type=float, default=DEFAULT_LABEL_SMOOTHING,
                       help="spread this share of each cell's target evenly over all types; 0 is the published "
                            f"loss; default {DEFAULT_LABEL_SMOOTHING:g} (chosen by measurement, see README)")
    run = p.add_argument_group("run")
    run.add_argument("--ckpt_dir", default="ckpts")
    utils.add_fault_flags(run, "finetune_last.pth")
    utils.add_run_flags(run)
    return p


if __name__ == "__main__":
    utils.run_main(main, build_parser())
