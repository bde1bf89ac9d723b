"""Masked-expression pretraining of scBERT (REFERENCE.md §2).

    python pretrain.py                                   # small preset on the embedded default data
    torchrun --nproc_per_node=4 pretrain.py --data_path atlas.h5ad --model scbert

Writes ckpts/pretrain.pth every epoch (atomically), pretrain_metrics.csv and pretrain_loss.png;
--resume continues a stopped run exactly where its last checkpoint left it.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import utils
from model import PerformerLM, get_config, PRESETS

logger = logging.getLogger("scbert")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=None, help="cells x genes file (.h5ad, 10x .h5 or mtx folder, "
                      ".csv/.tsv, .loom); default: scanpy's bundled Zheng68K subset")
    data.add_argument("--input_format", default="auto", choices=["auto", "counts", "log1p"])
    data.add_argument("--gene_panel", default=None, help="text file, one gene per line, in model order")
    data.add_argument("--gene_num", type=int, default=None,
                      help="without --gene_panel: keep this many highly variable genes (default: all genes)")
    data.add_argument("--bin_num", type=int, default=5, help="expression bins (tokens 0..bin_num)")
    data.add_argument("--min_genes", type=int, default=200,
                      help="drop cells with fewer expressed panel genes, as published (0 keeps all)")
    data.add_argument("--valid_ratio", type=float, default=0.1, help="fraction of cells for validation")
    data.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="small", choices=sorted(PRESETS), help="architecture preset")
    model.add_argument("--pos_embed", action=argparse.BooleanOptionalAction, default=True,
                       help="Gene2Vec positional embedding (off: none, as the original's flag)")
    model.add_argument("--gene2vec_path", default=None, help="published-format Gene2Vec file (.npy + "
                       "gene list, or word2vec text); default: trained here from the data's co-expression")
    model.add_argument("--grad_checkpoint", action="store_true", help="recompute activations in backward")
    train = p.add_argument_group("training")
    train.add_argument("--epoch", type=int, default=5, help="training epochs (small default for the CPU quick start)")
    train.add_argument("--batch_size", type=int, default=8, help="cells per step and process")
    train.add_argument("--grad_acc", type=int, default=1, help="steps of gradient accumulation")
    utils.add_schedule_flags(train)
    train.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    train.add_argument("--mask_prob", type=float, default=0.15)
    train.add_argument("--replace_prob", type=float, default=0.9)
    train.add_argument("--random_token_prob", type=float, default=0.0)
    run = p.add_argument_group("run")
    run.add_argument("--ckpt_dir", default="ckpts")
    run.add_argument("--save_every_epoch", action="store_true", help="also keep pretrain_epoch{N}.pth")
    run.add_argument("--resume", action="store_true", help="continue from --ckpt_dir/pretrain.pth")
    run.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16", "apex"])
    run.add_argument("--device", default="auto", help="auto, cpu or cuda")
    run.add_argument("--seed", type=int, default=2021)
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def masked_step(model, batch, args, mask_id, generator, device, precision):
    """One forward of the MLM objective: (mean loss over masked positions, #correct, #masked, labels)."""
    tokens = batch["tokens"].to(torch.long)
    masked, labels = utils.mask_expressed_genes(tokens, args.mask_prob, args.replace_prob,
                                                args.random_token_prob, args.bin_num, generator)
    masked, labels = masked.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    with precision.autocast():
        logits = model(masked)
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=mask_id)
    chosen = labels != mask_id
    correct = (logits.argmax(-1)[chosen] == labels[chosen]).sum().item()
    return loss, correct, int(chosen.sum().item()), labels[chosen].cpu()


def main(args: argparse.Namespace) -> Path:
    ctx = utils.setup_distributed(args.device)
    log = logger.info
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_path = ckpt_dir / "pretrain.pth"
    if args.resume and not ckpt_path.exists():
        raise utils.InputError(f"--resume found no {ckpt_path}; run without --resume to start, or point "
                               f"--ckpt_dir at the folder of the run to continue")
    resume_ckpt = utils.read_checkpoint(ckpt_path) if args.resume else None
    if args.resume:
        log(f"resuming from {ckpt_path} (epoch {resume_ckpt['epoch']} finished)")
        args.seed = int(resume_ckpt["args"]["seed"])

    # data: the panel is the checkpoint's on resume, else the given file, else the data's genes
    adata = utils.read_dataset(args.data_path)
    input_format = utils.detect_input_format(adata, args.input_format)
    if resume_ckpt is not None:
        panel = list(resume_ckpt["gene_panel"])
    elif args.gene_panel:
        panel = utils.load_gene_panel(args.gene_panel)
    else:
        panel = utils.dataset_panel(adata, args.gene_num, input_format)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format)
    log(f"data: {aligned.n_obs} cells, {len(panel)} panel genes ({input_format} input)")
    cells = utils.filter_cells_min_genes(aligned, args.min_genes, drop=True) if args.min_genes > 0 \
        else np.arange(aligned.n_obs)
    fingerprint = utils.data_fingerprint(adata)
    if resume_ckpt is not None and resume_ckpt.get("data_fingerprint") != fingerprint:
        raise utils.InputError(f"{ckpt_path} was trained on other data than {args.data_path or 'the default data'}; "
                               f"resume with the same --data_path, or start a new run in another --ckpt_dir")

    utils.check_writable_dir(ckpt_dir, "--ckpt_dir")  # after the inputs are known good: an error leaves nothing behind

    # model
    if resume_ckpt is not None:
        model = utils.build_model_from_checkpoint(resume_ckpt, ckpt_path)
    else:
        config = get_config(args.model, gene_num=len(panel), bin_num=args.bin_num,
                            pos_embed="gene2vec" if args.pos_embed else "none",
                            grad_checkpoint=args.grad_checkpoint)
        table = utils.gene2vec_table(args, aligned, panel, config.dim, ctx, ckpt_dir, input_format) if args.pos_embed else None
        utils.seed_everything(args.seed)
        model = PerformerLM(config, pos_table=table)
        model.set_redraw_seed(args.seed)
    config = model.config
    model.performer.grad_checkpoint = args.grad_checkpoint
    model.to(ctx.device).train()

    # splits (random, seeded: pretraining has no labels)
    order = np.random.default_rng(args.seed).permutation(cells)
    n_valid = int(round(len(order) * args.valid_ratio)) if len(order) > 10 else 0
    valid_idx, train_idx = np.sort(order[:n_valid]), np.sort(order[n_valid:])

    precision = utils.Precision(utils.resolve_amp(args.amp, ctx.device), ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    scheduler = utils.make_scheduler(optimizer, args)
    start_epoch = 1
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer_state_dict"])
        scheduler.load_state_dict(resume_ckpt["scheduler_state_dict"])
        start_epoch = int(resume_ckpt["epoch"]) + 1
    model, optimizer = precision.prepare(model, optimizer)
    ddp_model = utils.wrap_ddp(model, ctx)

    train_set = utils.TokenDataset(aligned, input_format, config.bin_num, indices=train_idx)
    valid_set = utils.TokenDataset(aligned, input_format, config.bin_num, indices=valid_idx)
    metrics = utils.MetricsLog(ckpt_dir / "pretrain_metrics.csv", resume_epoch=start_epoch - 1 if args.resume else 0)
    if resume_ckpt is not None:
        utils.set_rng_state(resume_ckpt["rng_state"])
    log(f"model: preset {args.model if resume_ckpt is None else 'from checkpoint'}, "
        f"{sum(p.numel() for p in params):,} trainable parameters; precision {precision.mode}; "
        f"{ctx.world_size} process(es) on {ctx.device.type}")

    for epoch in range(start_epoch, args.epoch + 1):
        started = time.time()
        loader = utils.make_loader(train_set, args.batch_size, ctx, shuffle=True, seed=args.seed, epoch=epoch,
                                   num_workers=args.num_workers)
        # masking draws from a generator seeded by (seed, rank, epoch): a resumed epoch masks the same way
        generator = torch.Generator().manual_seed(utils.derive_seed(args.seed, ctx.rank, epoch))

        def loss_fn(batch):
            loss, correct, n_masked, _ = masked_step(ddp_model, batch, args, config.mask_token_id,
                                                     generator, ctx.device, precision)
            return loss, np.array([loss.item() * n_masked, correct, n_masked])

        totals = utils.train_one_epoch(ddp_model, loader, loss_fn, precision, optimizer, params, args.grad_acc,
                                       args.clip, ctx.is_main, f"epoch {epoch}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        train = utils.all_reduce_sum(totals, ctx)
        valid = evaluate_masked(model, valid_set, args, ctx, precision)
        seconds = time.time() - started
        row = {"epoch": epoch, "train_loss": train[0] / max(train[2], 1), "train_masked_acc": train[1] / max(train[2], 1),
               **valid, "lr": lr, "seconds": round(seconds, 2),
               "cells_per_s": round(len(train_set) / seconds, 2)}
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if ctx.is_main:
            state = {"epoch": epoch, "losses": row["train_loss"],
                     "optimizer_state_dict": optimizer.state_dict(),
                     "scheduler_state_dict": scheduler.state_dict(),
                     **utils.model_checkpoint_fields(model),
                     "gene_panel": list(panel), "input_format": input_format,
                     "data_fingerprint": fingerprint, "data_path": args.data_path,
                     "rng_state": utils.rng_state(), "args": utils.to_plain(vars(args)),
                     "metrics": {k: v for k, v in row.items() if isinstance(v, (int, float))}}
            utils.save_checkpoint(ckpt_path, state)
            if args.save_every_epoch:
                utils.save_checkpoint(ckpt_dir / f"pretrain_epoch{epoch}.pth", state)
            metrics.append(row)
            metrics.plot(ckpt_dir / "pretrain_loss.png",
                         [("train_loss", "masked loss (train)"), ("valid_loss", "masked loss (valid)"),
                          ("valid_masked_acc", "masked accuracy (valid)")], "scBERT pretraining")
        utils.barrier(ctx)
    utils.check_ranks_agree(model, ctx)
    log(f"pretrained model: {ckpt_path}")
    utils.cleanup_distributed()
    return ckpt_path


@torch.no_grad()
def evaluate_masked(model, dataset, args, ctx, precision) -> dict[str, float]:
    """Masked loss and accuracy over every validation cell (each rank scores its share), beside the
    majority-bin baseline: the accuracy of always predicting the commonest masked bin."""
    if len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(utils.derive_seed(args.seed, ctx.rank, 0, salt=7))
    loader = utils.make_loader(dataset, args.batch_size, ctx, shuffle=False, seed=args.seed, epoch=0,
                               num_workers=args.num_workers, pad=False)
    totals = np.zeros(3)
    label_counts = np.zeros(model.config.num_tokens)
    for batch in loader:
        loss, correct, n_masked, labels = masked_step(model, batch, args, model.config.mask_token_id,
                                                      generator, ctx.device, precision)
        totals += (loss.item() * n_masked, correct, n_masked)
        label_counts += np.bincount(labels.numpy(), minlength=len(label_counts))
    totals = utils.all_reduce_sum(totals, ctx)
    label_counts = utils.all_reduce_sum(label_counts, ctx)
    model.train(was_training)
    n = max(totals[2], 1)
    return {"valid_loss": totals[0] / n, "valid_masked_acc": totals[1] / n,
            "valid_majority_acc": label_counts.max() / n}


if __name__ == "__main__":
    utils.run_main(main, build_parser())
