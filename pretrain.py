"""Masked-expression pretraining of scBERT (REFERENCE.md §2).

    python pretrain.py                                   # small preset on the embedded default data
    torchrun --nproc_per_node=4 pretrain.py --data_path atlas.h5ad --model scbert

Writes ckpts/pretrain.pth every epoch (atomically), pretrain_metrics.csv and pretrain_loss.png;
--resume continues a stopped run exactly where its last checkpoint left it.
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

import utils
from model import PerformerLM, get_config, PRESETS

logger = logging.getLogger("scbert")


@dataclass(frozen=True)
class Masking:
    """How a cell is corrupted for the masked-expression objective (REFERENCE.md §2)."""
    mask_prob: float          # fraction of the expressed genes to predict
    replace_prob: float       # of those, the fraction shown as the mask token
    random_token_prob: float  # ... and as a random bin
    bin_num: int

    def __call__(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return utils.mask_expressed_genes(tokens, self.mask_prob, self.replace_prob, self.random_token_prob,
                                          self.bin_num, generator)


def masked_step(model, batch, masking: Masking, generator, device, precision):
    """One forward of the MLM objective, masked on the device: (mean loss over masked positions, step
    statistics, the masked positions' label counts per bin), all left on the device."""
    mask_id = utils.unwrap(model).config.mask_token_id
    tokens = batch["tokens"].to(device, torch.long, non_blocking=True)
    masked, labels = masking(tokens, generator)
    with precision.autocast():
        logits = model(masked)
    loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=mask_id)
    chosen = labels != mask_id
    correct = ((logits.argmax(-1) == labels) & chosen).sum()
    label_counts = torch.bincount(labels.flatten(), minlength=mask_id + 1)[:mask_id]  # the ignore id last
    return loss, utils.step_statistics(loss, correct, chosen.sum()), label_counts


def masking_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class MaskedLoss:
    """One epoch's training loss. Masking draws from a generator on the device seeded by (seed, rank,
    epoch), so a resumed epoch masks as the interrupted one did; its state is saved with a mid-epoch
    checkpoint (state_dict / load_state_dict) so the masks continue exactly."""

    def __init__(self, model, masking: Masking, seed: int, device: torch.device, precision: utils.Precision):
        self.model, self.masking, self.device, self.precision = model, masking, device, precision
        self.generator = masking_generator(seed, device)

    def __call__(self, batch):
        loss, stats, _ = masked_step(self.model, batch, self.masking, self.generator, self.device, self.precision)
        return loss, stats

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])


def masked_loss(model, masking: Masking, seed: int, ctx: utils.DistContext,
                precision: utils.Precision) -> Callable[[int], MaskedLoss]:
    """The training loss of each epoch (see MaskedLoss)."""
    return lambda epoch: MaskedLoss(model, masking, utils.derive_seed(seed, ctx.rank, epoch), ctx.device, precision)


@torch.no_grad()
def evaluate_masked(model, dataset, masking: Masking, seed: int, batch_size: int, num_workers: int,
                    ctx: utils.DistContext, precision: utils.Precision) -> dict[str, float]:
    """Masked loss and accuracy over every validation cell (each rank scores its share), beside the
    majority-bin baseline: the accuracy of always predicting the commonest masked bin."""
    if len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    generator = masking_generator(utils.derive_seed(seed, ctx.rank, 0, salt=7), ctx.device)
    loader = utils.make_loader(dataset, batch_size, ctx, shuffle=False, seed=seed, epoch=0,
                               num_workers=num_workers, pad=False)
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    label_counts = torch.zeros(model.config.mask_token_id, dtype=torch.long, device=ctx.device)
    for batch in loader:
        _, stats, counts = masked_step(model, batch, masking, generator, ctx.device, precision)
        totals, label_counts = totals + stats, label_counts + counts
    totals = utils.all_reduce_sum(totals.cpu().numpy(), ctx)
    label_counts = utils.all_reduce_sum(label_counts.cpu().numpy().astype(np.float64), ctx)
    model.train(was_training)
    n = max(totals[2], 1)
    return {"valid_loss": totals[0] / n, "valid_masked_acc": totals[1] / n,
            "valid_majority_acc": label_counts.max() / n}


def pretraining_panel(resume: dict[str, Any] | None, gene_panel: str | None, adata, gene_num: int | None,
                      input_format: str, gene_map: utils.GeneMap | None = None) -> list[str]:
    """The checkpoint's panel on resume, else the --gene_panel file, else the data's genes."""
    if resume is not None:
        return list(resume["gene_panel"])
    if gene_panel:
        return utils.load_gene_panel(gene_panel)
    return utils.dataset_panel(adata, gene_num, input_format, gene_map)


def pretraining_model(resume: dict[str, Any] | None, resume_path: Path, preset: str, panel: list[str],
                      bin_num: int, gene2vec: Callable[[int], torch.Tensor] | None, seed: int) -> PerformerLM:
    """The checkpoint's model on resume; else the preset over the panel, with the Gene2Vec table
    `gene2vec(width)` (None: no positional embedding) and weights drawn from the seed."""
    if resume is not None:
        model = utils.build_model_from_checkpoint(resume, resume_path)
    else:
        config = get_config(preset, gene_num=len(panel), bin_num=bin_num,
                            pos_embed="gene2vec" if gene2vec is not None else "none")
        table = gene2vec(config.dim) if gene2vec is not None else None
        utils.seed_everything(seed)
        model = PerformerLM(config, pos_table=table)
        model.set_redraw_seed(seed)
    return model


def split_cells(cells: np.ndarray, valid_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows), a seeded random split: pretraining has no labels."""
    order = np.random.default_rng(seed).permutation(cells)
    n_valid = int(round(len(order) * valid_ratio)) if len(order) > 10 else 0
    return np.sort(order[:n_valid]), np.sort(order[n_valid:])


def main(args: argparse.Namespace) -> Path:
    ctx = utils.setup_distributed(args.device)
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_path = ckpt_dir / "pretrain.pth"

    # data
    adata = utils.open_cells(args.data_path, utils.SomaOptions(args.soma_measurement, args.soma_layer,
                                                               args.obs_filter))
    input_format = utils.detect_input_format(adata, args.input_format)
    fingerprint = utils.data_fingerprint(adata)
    run_args = utils.to_plain(vars(args))
    resume = utils.resume_point(ckpt_path, fingerprint, args.data_path, args.resume, run_args)
    seed = int(resume["args"]["seed"]) if resume is not None else args.seed  # a resumed run keeps its seed
    gene_map = utils.read_gene_map(args.gene_map)
    panel = pretraining_panel(resume, args.gene_panel, adata, args.gene_num, input_format, gene_map)
    aligned = utils.align_to_panel(adata, panel, input_format=input_format, gene_map=gene_map)
    logger.info(f"data: {aligned.n_obs} cells, {len(panel)} panel genes ({input_format} input)")
    cells = utils.filter_cells_min_genes(aligned, args.min_genes, drop=True) if args.min_genes > 0 \
        else np.arange(aligned.n_obs)
    utils.check_writable_dir(ckpt_dir, "--ckpt_dir")  # after the inputs are known good: an error leaves nothing behind
    with utils.guarded_run(ckpt_dir, ctx) as signals:
        pretrain(args, ctx, resume, seed, panel, aligned, cells, input_format, fingerprint, run_args, signals)
    logger.info(f"pretrained model: {ckpt_path}")
    utils.cleanup_distributed()
    return ckpt_path


def pretrain(args, ctx, resume, seed: int, panel: list[str], aligned, cells: np.ndarray, input_format: str,
             fingerprint: str, run_args: dict[str, Any], signals) -> None:
    """Builds the model and trains it, writing the checkpoints, metrics and plot into --ckpt_dir."""
    ckpt_dir = Path(args.ckpt_dir)
    ckpt_path = ckpt_dir / "pretrain.pth"
    utils.write_gene_overlap(aligned, ckpt_dir, ctx)

    # model, split, optimiser
    gene2vec = functools.partial(utils.gene2vec_table, args.gene2vec_path, aligned, panel, seed=seed,
                                 input_format=input_format, out_dir=ckpt_dir, ctx=ctx) if args.pos_embed else None
    model = pretraining_model(resume, ckpt_path, args.model, panel, args.bin_num, gene2vec, seed)
    model.to(ctx.device).train()
    valid_idx, train_idx = (aligned.split_by_block(cells, args.valid_ratio, seed) if utils.is_streamed(aligned)
                            else split_cells(cells, args.valid_ratio, seed))
    schedule = utils.Schedule(args.learning_rate, args.min_lr, args.cycle, args.warmup, args.lr_decay)
    training = utils.prepare_training(model, args.amp, schedule, ctx, resume)
    train_set = utils.token_dataset(aligned, input_format, model.config.bin_num, indices=train_idx)
    valid_set = utils.token_dataset(aligned, input_format, model.config.bin_num, indices=valid_idx)
    logger.info(f"model: preset {args.model if resume is None else 'from checkpoint'}, "
                f"{sum(p.numel() for p in training.params):,} trainable parameters; precision "
                f"{training.precision.mode}; {ctx.world_size} process(es) on {ctx.device.type}")

    # the epochs
    masking = Masking(args.mask_prob, args.replace_prob, args.random_token_prob, args.bin_num)
    plan = utils.EpochPlan(args.epoch, args.batch_size, args.grad_acc, args.clip, seed, args.num_workers,
                           grad_checkpoint=args.grad_checkpoint, save_every_steps=args.save_every_steps,
                           log_every=args.log_every)
    records = utils.EpochRecords(
        checkpoint=ckpt_path, metrics_csv=ckpt_dir / "pretrain_metrics.csv", loss_plot=ckpt_dir / "pretrain_loss.png",
        plot_series=(("train_loss", "masked loss (train)"), ("valid_loss", "masked loss (valid)"),
                     ("valid_masked_acc", "masked accuracy (valid)")),
        plot_title="scBERT pretraining", train_acc_column="train_masked_acc", rate_column=True,
        keep_every_epoch=args.save_every_epoch)
    utils.run_epochs(
        training, train_set, masked_loss(training.stepped, masking, seed, ctx, training.precision),
        lambda: evaluate_masked(training.model, valid_set, masking, seed, args.batch_size, args.num_workers, ctx,
                                training.precision),
        plan, records, ctx,
        checkpoint_fields={"gene_panel": list(panel), "input_format": input_format,
                           "data_fingerprint": fingerprint, "data_path": args.data_path},
        run_args={**run_args, "seed": seed}, signals=signals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_path", default=None, help=f"{utils.DATA_PATH_HELP}; default: scanpy's bundled "
                      "Zheng68K subset")
    utils.add_source_flags(data)
    data.add_argument("--input_format", default="auto", choices=["auto", "counts", "log1p"])
    data.add_argument("--gene_panel", default=None, help="text file, one gene per line, in model order")
    data.add_argument("--gene_num", type=int, default=None,
                      help="without --gene_panel: keep this many highly variable genes (default: all genes)")
    utils.add_gene_map_flag(data)
    data.add_argument("--bin_num", type=int, default=5, help="expression bins (tokens 0..bin_num)")
    data.add_argument("--min_genes", type=int, default=200,
                      help="drop cells with fewer expressed panel genes, as published (0 keeps all)")
    data.add_argument("--valid_ratio", type=float, default=0.1, help="fraction of cells for validation (a "
                      "streamed source: whole blocks of consecutive cells)")
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
    utils.add_fault_flags(run, "pretrain.pth")
    utils.add_run_flags(run)
    return p


if __name__ == "__main__":
    utils.run_main(main, build_parser())
