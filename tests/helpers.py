"""Shared by the test files: running the scripts as a user would, and small data sets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600,
               launcher: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """python <repo>/<script> args..., from `cwd`, capturing output; never raises on failure."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [*(launcher or [sys.executable]), str(ROOT / script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def state_dict_of(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


def labelled_counts(n_cells: int = 60, n_genes: int = 300, classes: tuple[str, ...] = ("A", "B", "C"),
                    seed: int = 0):
    """A small raw-count AnnData whose classes differ in a block of marker genes each."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    labels = np.array([classes[i % len(classes)] for i in range(n_cells)])
    rates = np.full((n_cells, n_genes), 0.8)
    for k, name in enumerate(classes):
        rates[labels == name, k * 20:(k + 1) * 20] = 12.0
    counts = rng.poisson(rates).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"GENE{i}" for i in range(n_genes)]
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.obs["celltype"] = labels
    return adata
