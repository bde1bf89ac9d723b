"""Fold ensembles: the file `finetune.py --folds K` writes beside its fold checkpoints, and what
evaluate.py does with it.

    ckpts/ensemble.pth   {"ensemble": [fold0/finetune_best.pth, ...] (relative to the file),
                          the fine-tuning fields of a finetune_best.pth (gene panel, input format,
                          label names and key, data fingerprint and path, splits), "members_sha256"}

Fold k validates on --valid_size of the non-test cells drawn from its own K-th part and trains on
all the others (as many cells as one split trains on), from --seed + k (data_utils.stratified_folds,
finetune.train_split). The file holds no weights: each member is an ordinary fine-tuned checkpoint
(loadable on its own and by the original code). evaluate.py --model_path ckpts/ensemble.pth scores every member and
averages their softmax probabilities; the embeddings, UMAP, gene importance and kNN transfer use the
first member. Per cell it also reports the fold agreement: the share of members whose own top type is
the ensemble's (1 where every fold calls the same type; below 1, the cells the folds dispute).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import utils

ENSEMBLE_KEY = "ensemble"


def is_ensemble(ckpt: Mapping[str, Any]) -> bool:
    return ENSEMBLE_KEY in ckpt and "model_state_dict" not in ckpt


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_ensemble(path: Path, members: Sequence[Path], fields: Mapping[str, Any]) -> Path:
    """Writes the ensemble file listing `members` (paths relative to its folder) with `fields`."""
    folder = path.parent.resolve()
    relative = [str(Path(m).resolve().relative_to(folder)) for m in members]
    utils.save_checkpoint(path, {**fields, ENSEMBLE_KEY: relative,
                                 "members_sha256": [file_sha256(Path(m)) for m in members]})
    return path


def member_paths(path: Path, ckpt: Mapping[str, Any]) -> list[Path]:
    """The members of the ensemble file at `path`, checked to exist and to be the files it was
    written with (a fold re-trained since would make the ensemble a mixture of two runs)."""
    paths = [path.parent / m for m in ckpt[ENSEMBLE_KEY]]
    if not paths:
        raise utils.InputError(f"{path} lists no fold checkpoints; re-run finetune.py --folds K")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise utils.InputError(f"{path} lists fold checkpoints that are missing: {', '.join(missing[:3])}; keep the "
                               f"fold folders beside the ensemble file, or re-run finetune.py --folds K")
    for member, digest in zip(paths, ckpt.get("members_sha256") or []):
        if file_sha256(member) != digest:
            raise utils.InputError(f"{member} has changed since {path} was written; re-run finetune.py --folds K "
                                   f"so the ensemble and its folds belong to one run")
    return paths


def load_members(path: Path, ckpt: Mapping[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(model, checkpoint) of every member, on the CPU; they must share the panel and the classes."""
    loaded = [utils.load_checkpoint(p, map_location="cpu") for p in member_paths(path, ckpt)]
    first = loaded[0][1]
    for (model, member), p in zip(loaded, ckpt[ENSEMBLE_KEY]):
        if model.head_kind != "classifier":
            raise utils.InputError(f"{p} in {path} has no classifier head; an ensemble averages fine-tuned models")
        for key in ("gene_panel", "label_names"):
            if list(member.get(key) or []) != list(first.get(key) or []):
                raise utils.InputError(f"the fold checkpoints of {path} differ in their {key.replace('_', ' ')}; "
                                       f"re-run finetune.py --folds K")
    return loaded


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mean_probabilities(logits: Sequence[np.ndarray]) -> np.ndarray:
    """The members' softmax probabilities averaged (cells, classes)."""
    return np.mean([softmax(np.asarray(x, dtype=np.float64)) for x in logits], axis=0)


def mean_log_probabilities(logits: Sequence[np.ndarray]) -> np.ndarray:
    """The log of the members' averaged probabilities: logits whose softmax is that average."""
    return np.log(np.maximum(mean_probabilities(logits), 1e-30))


def fold_agreement(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Per cell, the share of members whose own top class is the top class of the averaged
    probabilities (1.0: every member calls it; with 3 members 2/3 or 1/3 where they split)."""
    called = mean_probabilities(logits).argmax(axis=1)
    own = np.stack([np.asarray(x).argmax(axis=1) for x in logits])
    return (own == called).mean(axis=0)
