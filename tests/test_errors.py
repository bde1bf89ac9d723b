"""Every problem a user can cause ends pretrain.py / finetune.py with one line naming the problem and
the fix, exit code 2, and no output files; --debug shows the traceback instead."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import finetune
import pretrain
import utils
from helpers import labelled_counts, run_script
from model import PerformerLM, get_config


def run_in_process(module, argv, capsys) -> str:
    """Runs the script's entry as the command line does; returns its stderr."""
    with pytest.raises(SystemExit) as info:
        utils.run_main(module.main, module.build_parser(), argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "; " in err[0], err
    return err[0]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "ckpts"


def assert_nothing_written(path):
    assert not path.exists() or not any(path.iterdir())


def test_missing_data_file(tmp_path, out, capsys):
    err = run_in_process(pretrain, ["--data_path", str(tmp_path / "nope.h5ad"), "--ckpt_dir", str(out)], capsys)
    assert "nope.h5ad does not exist" in err
    assert_nothing_written(out)


def test_wrong_format(tmp_path, out, capsys):
    bad = tmp_path / "cells.xlsx"
    bad.write_text("not a table")
    err = run_in_process(finetune, ["--data_path", str(bad), "--ckpt_dir", str(out)], capsys)
    assert "cells.xlsx" in err
    assert_nothing_written(out)


def test_scaled_data_is_refused_with_the_override_named(tmp_path, out, capsys):
    adata = labelled_counts()
    adata.X = adata.X.toarray() - 3.0  # z-scored-like values
    path = tmp_path / "scaled.h5ad"
    adata.write_h5ad(path)
    err = run_in_process(pretrain, ["--data_path", str(path), "--ckpt_dir", str(out)], capsys)
    assert "negative" in err and "--input_format" in err or "raw counts" in err
    assert_nothing_written(out)


@pytest.mark.parametrize("argv, expected", [
    (["--lable_key", "x"], "unrecognized arguments: --lable_key x; see python"),
    (["--folds", "1"], "--folds 1 makes no ensemble"),
    (["--epoch", "0"], "--epoch 0 must be at least 1"),
])
def test_a_misspelt_flag_or_a_count_out_of_range_is_one_line(argv, expected, out, capsys):
    err = run_in_process(finetune, [*argv, "--from_scratch", "--ckpt_dir", str(out)], capsys)
    assert expected in err
    assert_nothing_written(out)


def test_no_label_column_in_a_file_without_obs(tmp_path, out, capsys):
    adata = labelled_counts()
    adata.obs = adata.obs.iloc[:, :0]  # as a 10x folder reads
    path = tmp_path / "plain.h5ad"
    adata.write_h5ad(path)
    err = run_in_process(finetune, ["--data_path", str(path), "--label_key", "cell_type", "--from_scratch",
                                    "--ckpt_dir", str(out)], capsys)
    assert "no obs columns at all" in err and "--label_key" in err
    assert_nothing_written(out)


def test_a_numeric_label_column_of_a_table_is_named_as_read_as_a_gene(tmp_path, out, capsys):
    adata = labelled_counts()
    table = adata.to_df()
    table.insert(0, "leiden", np.arange(adata.n_obs) % 3)  # cluster ids: numbers, so read as a gene
    table.to_csv(tmp_path / "cells.csv")
    err = run_in_process(finetune, ["--data_path", str(tmp_path / "cells.csv"), "--label_key", "leiden",
                                    "--from_scratch", "--ckpt_dir", str(out)], capsys)
    assert "read as a gene" in err and "as text" in err
    assert_nothing_written(out)


def test_no_label_column(tmp_path, out, capsys):
    err = run_in_process(finetune, ["--label_key", "cell_type_fine", "--ckpt_dir", str(out), "--from_scratch"],
                         capsys)
    assert "cell_type_fine" in err and "--label_key" in err and "bulk_labels" in err
    assert_nothing_written(out)


def test_too_few_cells_per_class(tmp_path, out, capsys):
    adata = labelled_counts()
    labels = adata.obs["celltype"].astype(str).to_numpy()
    labels[0] = "Rare"
    adata.obs["celltype"] = labels
    path = tmp_path / "rare.h5ad"
    adata.write_h5ad(path)
    err = run_in_process(finetune, ["--data_path", str(path), "--ckpt_dir", str(out), "--from_scratch"], capsys)
    assert "Rare" in err
    assert_nothing_written(out)


def pretrained_on_default_genes(tmp_path):
    import scanpy as sc

    genes = list(sc.datasets.pbmc68k_reduced().raw.var_names)
    model = PerformerLM(get_config("tiny", gene_num=len(genes)))
    path = tmp_path / "pre.pth"
    utils.save_checkpoint(path, {"epoch": 1, **utils.model_checkpoint_fields(model), "gene_panel": genes})
    return path, genes


def test_zero_gene_overlap(tmp_path, out, capsys):
    ckpt, _ = pretrained_on_default_genes(tmp_path)
    adata = labelled_counts()  # genes GENE0..: none in the checkpoint's panel
    path = tmp_path / "other_genes.h5ad"
    adata.write_h5ad(path)
    err = run_in_process(finetune, ["--data_path", str(path), "--model_path", str(ckpt), "--ckpt_dir", str(out)],
                         capsys)
    assert "GENE0" in err  # names the data's genes so the mismatch is visible
    assert_nothing_written(out)


def test_checkpoint_and_panel_mismatch(tmp_path, out, capsys):
    ckpt, genes = pretrained_on_default_genes(tmp_path)
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(genes[:100]))
    err = run_in_process(finetune, ["--model_path", str(ckpt), "--gene_panel", str(panel), "--ckpt_dir", str(out)],
                         capsys)
    assert "100 genes" in err and "765" in err
    assert_nothing_written(out)


def test_truncated_checkpoint(tmp_path, out, capsys):
    ckpt, _ = pretrained_on_default_genes(tmp_path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    err = run_in_process(finetune, ["--model_path", str(cut), "--ckpt_dir", str(out)], capsys)
    assert "cut.pth" in err and "truncated" in err
    assert_nothing_written(out)


def test_empty_dataset(tmp_path, out, capsys):
    adata = labelled_counts()[:0].copy()
    path = tmp_path / "empty.h5ad"
    adata.write_h5ad(path)
    err = run_in_process(pretrain, ["--data_path", str(path), "--ckpt_dir", str(out)], capsys)
    assert "empty.h5ad" in err or "no cells" in err or "0 cells" in err
    assert_nothing_written(out)


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    err = run_in_process(pretrain, ["--model", "tiny", "--ckpt_dir", str(blocker / "ckpts")], capsys)
    assert "cannot write" in err and str(blocker) in err


def test_resume_without_a_run(tmp_path, out, capsys):
    err = run_in_process(pretrain, ["--resume", "--ckpt_dir", str(out)], capsys)
    assert "--resume found no" in err


def test_command_line_exit_code_and_debug_traceback(tmp_path):
    result = run_script("finetune.py", "--label_key", "nope", "--from_scratch", "--ckpt_dir", str(tmp_path / "c"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the data has no obs column 'nope'")
    assert "Traceback" not in result.stderr
    debug = run_script("finetune.py", "--label_key", "nope", "--from_scratch", "--ckpt_dir", str(tmp_path / "c"),
                       "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    assert not (tmp_path / "c").exists()
