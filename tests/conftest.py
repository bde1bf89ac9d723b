"""Tests import the top-level modules (model, utils, ...) from the repository root.

One thread per process: the models in the tests are small, and several test processes (torchrun
ranks, killed-and-resumed runs) may share the cores; OpenMP thread pools that outnumber the cores
slow small kernels down many-fold. No torch.compile (see below)."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported; inherited by subprocesses
# no torch.compile in the tests (a cold compilation per shape would dominate them); the eager steps are
# what the equality tests check, and test_compiled_steps_equal_eager_steps compares the two on request
os.environ.setdefault("SCBERT_COMPILE", "off")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402

kernels.set_execution(**kernels.settings_from_environment(os.environ))  # in-process models, as the scripts do


@pytest.fixture(scope="session")
def default_subset(tmp_path_factory):
    """Every third cell of the embedded default data (234 real cells, all 10 types, 765 genes)."""
    import utils

    path = tmp_path_factory.mktemp("data") / "pbmc68k_subset.h5ad"
    utils.read_dataset(None)[::3].copy().write_h5ad(path)
    return path
