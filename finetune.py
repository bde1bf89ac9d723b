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
import logging
import time
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=None, help="labelled cells x genes file; default: scanpy's "
                      "bundled Zheng68K subset")
    data.add_argument("--label_key", default="celltype", help="obs column holding the cell types")
    data.add_argument("--input_format", default="auto", choices=["auto", "counts", "log1p"])
    data.add_argument("--gene_panel", default=None, help="text file, one gene per line, in model order "
                      "(required with a checkpoint that carries no panel, e.g. panglao_pretrain.pth)")
    data.add_argument("--gene_num", type=int, default=None, help="from scratch without --gene_panel: "
                      "keep this many highly variable genes (default: all genes)")
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
    run.add_argument("--resume", action="store_true", help="continue from --ckpt_dir/finetune_last.pth")
    run.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16", "apex"])
    run.add_argument("--device", default="auto")
    run.add_argument("--seed", type=int, default=2021)
    run.add_argument("--debug", action="store_true")
    return p


# --------------------------------------------------------------------------------------------------
# starting point and data


def starting_checkpoint(args: argparse.Namespace, log) -> tuple[dict | None, Path | None]:
    if args.from_scratch:
        log("training from scratch (--from_scratch)")
        return None, None
    path = Path(args.model_path) if args.model_path else DEFAULT_PRETRAINED
    if not path.exists() and not args.model_path:
        log(f"no pretrained checkpoint at {path}: training from scratch "
            f"(run pretrain.py first, or pass --model_path)")
        return None, None
    ckpt = utils.read_checkpoint(path)
    log(f"starting from pretrained weights {path}")
    return ckpt, path


def choose_panel(args, start: dict | None, start_path: Path | None, adata, input_format: str) -> list[str]:
    if start is not None:
        config = utils.build_model_from_checkpoint(start, start_path).config
        panel = start.get("gene_panel")
        if args.gene_panel:
            panel = utils.load_gene_panel(args.gene_panel)
        if not panel:
            raise utils.InputError(
                f"{start_path} carries no gene panel (the published scBERT files do not); pass "
                f"--gene_panel FILE with its {config.gene_num} genes, one per line, in model order")
        if len(panel) != config.gene_num:
            raise utils.InputError(f"the gene panel has {len(panel)} genes but {start_path} was trained on "
                                   f"{config.gene_num}; pass the panel the checkpoint was trained with")
        return list(panel)
    if args.gene_panel:
        return utils.load_gene_panel(args.gene_panel)
    return utils.dataset_panel(adata, args.gene_num, input_format)


def read_labels(adata, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(labelled cell rows, their label strings); cells with a missing label are left out."""
    labels = utils.read_labels(adata, label_key)
    if labels is None:
        raise utils.InputError(f"the data has no obs column {label_key!r} (columns: {utils.obs_columns(adata)}); "
                               f"pass --label_key with the column holding the cell types")
    rows = np.flatnonzero([label is not None for label in labels])
    if len(rows) == 0:
        raise utils.InputError(f"obs[{label_key!r}] is empty for every cell; label the cells or pick another column")
    return rows, labels[rows]


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


def train_split(args, ctx, log, setup: dict[str, Any], split: dict[str, np.ndarray], out_dir: Path) -> dict:
    """Fine-tunes on split['train'], early-stops on split['valid']; writes finetune_best/last.pth in
    out_dir. Returns the best validation scores and the path of the best checkpoint."""
    aligned, codes, label_names = setup["aligned"], setup["codes"], setup["label_names"]
    last_path, best_path = out_dir / "finetune_last.pth", out_dir / "finetune_best.pth"
    resume = utils.read_checkpoint(last_path) if args.resume and last_path.exists() else None
    if args.resume and resume is None:
        raise utils.InputError(f"--resume found no {last_path}; run without --resume to start")
    if resume is not None and resume.get("data_fingerprint") != setup["fingerprint"]:
        raise utils.InputError(f"{last_path} was trained on other data; resume with the same --data_path, "
                               f"or start a new run in another --ckpt_dir")

    if resume is not None:
        model = utils.build_model_from_checkpoint(resume, last_path)
        log(f"resuming from {last_path} (epoch {resume['epoch']} finished)")
    else:
        model = setup["build_model"]()
    unfreeze = args.unfreeze or ("all" if setup["start"] is None else "published")
    what = set_trainable(model, unfreeze)
    model.performer.grad_checkpoint = args.grad_checkpoint
    model.to(ctx.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"training {what}: {sum(p.numel() for p in params):,} parameters")

    precision = utils.Precision(utils.resolve_amp(args.amp, ctx.device), ctx.device)
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    scheduler = utils.make_scheduler(optimizer, args)
    start_epoch, best, bad_epochs = 1, -1.0, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state_dict"])
        scheduler.load_state_dict(resume["scheduler_state_dict"])
        start_epoch = int(resume["epoch"]) + 1
        best, bad_epochs = float(resume["best_metric"]), int(resume["bad_epochs"])
        utils.set_rng_state(resume["rng_state"])
    model, optimizer = precision.prepare(model, optimizer)
    ddp_model = utils.wrap_ddp(model, ctx)

    class_weight = None
    if args.class_weights:
        counts = np.bincount(codes[split["train"]], minlength=len(label_names)).astype(np.float64)
        class_weight = torch.tensor(counts.sum() / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32,
                                    device=ctx.device)
    labels_per_row = setup["labels_per_row"]
    train_set = utils.TokenDataset(aligned, setup["input_format"], model.config.bin_num, labels=labels_per_row,
                                   indices=split["train"])
    valid_set = utils.TokenDataset(aligned, setup["input_format"], model.config.bin_num, labels=labels_per_row,
                                   indices=split["valid"] if len(split["valid"]) else split["train"])
    metrics = utils.MetricsLog(out_dir / "finetune_metrics.csv", resume_epoch=start_epoch - 1 if resume else 0)

    def loss_fn(batch):
        with precision.autocast():
            logits = ddp_model(batch["tokens"].to(ctx.device, torch.long))
        target = batch["label"].to(ctx.device)
        loss = F.cross_entropy(logits.float(), target, weight=class_weight)
        correct = (logits.argmax(-1) == target).sum().item()
        return loss, np.array([loss.item() * len(target), correct, len(target)])

    for epoch in range(start_epoch, args.epoch + 1):
        if bad_epochs >= args.patience:
            break
        started = time.time()
        loader = utils.make_loader(train_set, args.batch_size, ctx, shuffle=True, seed=args.seed, epoch=epoch,
                                   num_workers=args.num_workers)
        totals = utils.train_one_epoch(ddp_model, loader, loss_fn, precision, optimizer, params, args.grad_acc,
                                       args.clip, ctx.is_main, f"epoch {epoch}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        totals = utils.all_reduce_sum(totals, ctx)
        head_input: list[float] = []
        valid = scores(predict(model, valid_set, args.batch_size, ctx, precision, args.num_workers, head_input))
        warn_if_head_is_dead(head_input, ctx)
        improved = valid["macro_f1"] > best
        best, bad_epochs = (valid["macro_f1"], 0) if improved else (best, bad_epochs + 1)
        row = {"epoch": epoch, "train_loss": totals[0] / totals[2], "train_acc": totals[1] / totals[2],
               "valid_acc": valid["accuracy"], "valid_macro_f1": valid["macro_f1"], "lr": lr,
               "seconds": round(time.time() - started, 2)}
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            + (" *" if improved else ""))
        if ctx.is_main:
            state = {"epoch": epoch, "losses": row["train_loss"], **utils.model_checkpoint_fields(model),
                     "optimizer_state_dict": optimizer.state_dict(), "scheduler_state_dict": scheduler.state_dict(),
                     **setup["meta"], "splits": {k: [int(i) for i in v] for k, v in split.items()},
                     "best_metric": best, "bad_epochs": bad_epochs, "rng_state": utils.rng_state(),
                     "args": utils.to_plain(vars(args)), "metrics": row}
            if improved:
                utils.save_checkpoint(best_path, state)
            utils.save_checkpoint(last_path, state)
            metrics.append(row)
            metrics.plot(out_dir / "finetune_loss.png", [("train_loss", "loss (train)"),
                         ("valid_acc", "accuracy (valid)"), ("valid_macro_f1", "macro-F1 (valid)")],
                         "scBERT fine-tuning")
        utils.barrier(ctx)
    utils.check_ranks_agree(model, ctx)
    if bad_epochs >= args.patience:
        log(f"early stop: no better validation macro-F1 in {args.patience} epochs")
    log(f"best validation macro-F1 {best:.4f}: {best_path}")
    return {"best_valid_macro_f1": best, "best_path": best_path}


# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    ctx = utils.setup_distributed(args.device)
    log = logger.info
    ckpt_dir = Path(args.ckpt_dir)
    start, start_path = starting_checkpoint(args, log)

    adata = utils.read_dataset(args.data_path)
    input_format = utils.detect_input_format(adata, args.input_format)
    rows, label_strings = read_labels(adata, args.label_key)
    if len(rows) < adata.n_obs:
        log(f"{adata.n_obs - len(rows)} cells without a label in obs[{args.label_key!r}] are left out")
    if args.min_cells_per_class > 0:
        names, counts = np.unique(label_strings, return_counts=True)
        rare = {str(n) for n, c in zip(names, counts) if c < args.min_cells_per_class}
        if rare:
            keep = ~np.isin(label_strings, list(rare))
            rows, label_strings = rows[keep], label_strings[keep]
            log(f"left out {int((~keep).sum())} cells of {len(rare)} type(s) with fewer than "
                f"{args.min_cells_per_class} cells: {', '.join(sorted(rare))}")
    label_names = sorted(set(label_strings))
    if len(label_names) < 2:
        raise utils.InputError(f"obs[{args.label_key!r}] holds a single cell type ({label_names[0]}); "
                               f"a classifier needs at least two")
    codes_of_labelled = np.searchsorted(label_names, label_strings)
    labels_per_row = np.full(adata.n_obs, -1, dtype=np.int64)
    labels_per_row[rows] = codes_of_labelled
    # splits index rows of the data as read (labelled cells only), so evaluate.py finds the same cells
    if args.folds and args.folds > 1:
        splits = utils.stratified_folds(label_strings, args.folds, args.valid_size, args.seed)
    else:
        splits = [utils.stratified_splits(label_strings, args.test_size, args.valid_size, args.seed)]
    splits = [{k: rows[v] for k, v in s.items()} for s in splits]

    panel = choose_panel(args, start, start_path, adata, input_format)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    found = aligned.uns["scbert_panel_overlap"]
    log(f"data: {len(rows)} labelled cells of {len(label_names)} types; {found['found']} of {found['total']} "
        f"panel genes found ({input_format} input)")
    utils.check_writable_dir(ckpt_dir, "--ckpt_dir")  # after the inputs are known good: an error leaves nothing behind

    def build_model() -> PerformerLM:
        utils.seed_everything(args.seed)
        if start is not None:
            model = utils.build_model_from_checkpoint(start, start_path)
        else:
            config = get_config(args.model, gene_num=len(panel), bin_num=args.bin_num,
                                pos_embed="gene2vec" if args.pos_embed else "none")
            table = (utils.gene2vec_table(args, aligned, panel, config.dim, ctx, ckpt_dir, input_format)
                     if args.pos_embed else None)
            model = PerformerLM(config, pos_table=table)
            model.set_redraw_seed(args.seed)
        return model.attach_classifier(len(label_names), args.cls_dropout)

    setup = {
        "aligned": aligned, "codes": labels_per_row, "labels_per_row": labels_per_row,
        "label_names": label_names, "input_format": input_format, "start": start,
        "fingerprint": utils.data_fingerprint(adata), "build_model": build_model,
        "meta": {"gene_panel": list(panel), "input_format": input_format, "label_names": label_names,
                 "label_key": args.label_key, "data_fingerprint": utils.data_fingerprint(adata),
                 "data_path": args.data_path,
                 "pretrained_from": str(start_path) if start_path else None},
    }
    if len(splits) == 1:
        result = train_split(args, ctx, log, setup, splits[0], ckpt_dir)
        utils.cleanup_distributed()
        return result["best_path"]
    return cross_validate(args, ctx, log, setup, splits, ckpt_dir)


def cross_validate(args, ctx, log, setup, splits, ckpt_dir: Path) -> Path:
    """Trains every fold in ckpt_dir/fold{k}, scores its held-out fold with its best checkpoint, and
    writes a per-fold and mean ± sd table to ckpt_dir/cv_summary.csv."""
    precision = utils.Precision(utils.resolve_amp(args.amp, ctx.device), ctx.device)
    rows = []
    for k, split in enumerate(splits):
        log(f"--- fold {k + 1} of {len(splits)} ---")
        result = train_split(args, ctx, log, setup, split, utils.check_writable_dir(ckpt_dir / f"fold{k}", "--ckpt_dir"))
        model, _ = utils.load_checkpoint(result["best_path"])
        model.to(ctx.device)
        test_set = utils.TokenDataset(setup["aligned"], setup["input_format"], model.config.bin_num,
                                      labels=setup["labels_per_row"], indices=split["test"])
        test = scores(predict(model, test_set, args.batch_size, ctx, precision, args.num_workers))
        rows.append({"fold": k, "n_test": len(split["test"]), **test})
    table = utils.summarise_folds(rows)
    summary = ckpt_dir / "cv_summary.csv"
    if ctx.is_main:
        table.to_csv(summary, index=False)
        log(table.to_string(index=False))
    utils.cleanup_distributed()
    return summary


if __name__ == "__main__":
    utils.run_main(main, build_parser())
