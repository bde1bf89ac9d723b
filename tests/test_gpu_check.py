"""benchmarks/gpu_check.py --dry: the GPU check's own code at tiny shapes on the CPU, so that the one
call a lent GPU gets runs the code the suite has run."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from helpers import ROOT


def test_the_gpu_check_runs_dry_writes_only_its_folder_and_reruns_one_section(tmp_path):
    work, out = tmp_path / "cwd", tmp_path / "out"
    work.mkdir()
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--out", str(out)]
    first = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((out / "gpu_check.json").read_text())
    peer_installed = importlib.util.find_spec("performer_pytorch") is not None
    triton_installed = importlib.util.find_spec("triton") is not None
    for section in ("environment", "correctness", "triton", "favor_core", "model", "model_plain", "peer"):
        if section != "peer" or peer_installed:
            assert "error" not in results[section], (section, results[section])
    if triton_installed:  # the kernels in Triton's interpreter, against the float64 reference
        assert {"float32_block16_random", "float32_block16_ties", "bfloat16_block16_ties"} <= set(results["triton"])
        assert all(v["output_error_rel_max"] < 1e-5 for k, v in results["triton"].items() if k.startswith("float32"))
        assert "triton_block16_forward_backward_ms_per_cell_layer" in results["favor_core"]
    assert results["correctness"]["fp32_tf32_off"]["logits_error_rel_max"] < 1e-4
    assert results["correctness"]["bf16_argmax_agreement_expressed"] >= 0.9
    assert results["model"]["train_b2"]["cells_per_s"] > 0 and len(results["bars"]) == 13
    assert all(bar["met"] is None for bar in results["bars"].values())  # a dry run judges no bar
    assert list(work.iterdir()) == [] and {p.name for p in out.iterdir()} <= {"gpu_check.json", "gpu_check.md",
                                                                            "cache"}
    again = subprocess.run(command + ["--only", "environment"], cwd=work, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((out / "gpu_check.json").read_text())
    assert rerun["model"] == results["model"] and rerun["environment"] != results["environment"]
