"""Streamed data sources (data_sources.py): a folder or glob of .h5ad shards, a .zarr store, a
TileDB-SOMA experiment and a large .h5ad give the tokens the in-memory path gives; the block-shuffled
loader gives ranks disjoint cells, equal step counts and an exact mid-epoch position; user mistakes
end the scripts with one line and exit 2; torchrun pretrains from shards and from SOMA."""
from __future__ import annotations

import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import data_sources
import data_utils
import train_utils
import utils
from helpers import ROOT, labelled_counts, run_script

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")

ENV = {"OMP_NUM_THREADS": "1"}


def write_shards(adata: ad.AnnData, folder, parts: int = 3) -> list[ad.AnnData]:
    """Cuts adata into `parts` consecutive .h5ad shards, the second with its genes in another order."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = []
    for k, rows in enumerate(np.array_split(np.arange(adata.n_obs), parts)):
        piece = adata[rows].copy()
        if k == 1:
            piece = piece[:, np.random.default_rng(k).permutation(piece.n_vars)].copy()
        piece.write_h5ad(folder / f"part{k}.h5ad")
        pieces.append(piece)
    return pieces


def default_cells() -> ad.AnnData:
    """The default data (ln(1 + CP10k)) as CSR with its cell types, every other cell (350)."""
    full = utils.read_dataset(None)[::2]
    return ad.AnnData(sp.csr_matrix(full.X, dtype=np.float32), obs=full.obs[["celltype"]].copy(),
                      var=pd.DataFrame(index=full.var_names.copy()))


def count_cells() -> ad.AnnData:
    adata = labelled_counts(n_cells=240, n_genes=300, seed=4)
    adata.var["feature_name"] = [f"SYM{i}" for i in range(adata.n_vars)]
    return adata


@pytest.fixture(scope="module", params=["log1p", "counts"])
def collection(request, tmp_path_factory):
    """One data set written every way a source can be: (in-memory AnnData, {kind: --data_path})."""
    adata = default_cells() if request.param == "log1p" else count_cells()
    root = tmp_path_factory.mktemp(f"sources_{request.param}")
    write_shards(adata, root / "shards")
    adata.write_h5ad(root / "whole.h5ad")
    adata.write_zarr(root / "whole.zarr")
    with ad.settings.override(zarr_write_format=3):
        adata.write_zarr(root / "whole_v3.zarr")
    tiledbsoma_io.from_h5ad(str(root / "soma"), str(root / "whole.h5ad"), measurement_name="RNA")
    paths = {"folder": root / "shards", "glob": f"{root / 'shards'}/part*.h5ad", "zarr": root / "whole.zarr", "zarr v3": root / "whole_v3.zarr",
             "soma": root / "soma", "large h5ad": root / "whole.h5ad"}
    return adata, {k: str(v) for k, v in paths.items()}


def open_source(kind: str, path: str, monkeypatch) -> data_sources.CellSource:
    if kind == "large h5ad":  # any .h5ad storing more values than the threshold is streamed
        monkeypatch.setattr(data_sources, "STREAM_VALUES", 0)
    source = utils.open_cells(path)
    assert isinstance(source, data_sources.CellSource), f"{kind} was read into memory"
    return source


@pytest.mark.parametrize("kind", ["folder", "glob", "zarr", "zarr v3", "soma", "large h5ad"])
def test_each_source_gives_the_in_memory_tokens(collection, kind, monkeypatch):
    adata, paths = collection
    panel = list(adata.var_names)
    fmt = utils.detect_input_format(adata)
    reference = utils.tokenize(data_utils.align_to_panel(adata, panel, input_format=fmt), 5, fmt)
    min_genes = int(np.median((reference[:, :-1] > 0).sum(axis=1)))  # leaves out about half of the cells
    in_memory_filter = data_utils.filter_cells_min_genes(data_utils.align_to_panel(adata, panel, input_format=fmt),
                                                         min_genes, drop=True)

    source = open_source(kind, paths[kind], monkeypatch)
    assert source.n_obs == adata.n_obs and utils.detect_input_format(source) == fmt
    aligned = utils.align_to_panel(source, panel, input_format=fmt)
    tokens = aligned.token_dataset(5)
    assert np.array_equal(tokens.tokens_of_rows(np.arange(adata.n_obs)), reference)
    kept = utils.filter_cells_min_genes(aligned, min_genes, drop=True)
    assert 0 < len(kept) < adata.n_obs and np.array_equal(kept, in_memory_filter)

    # a shuffled epoch: every batch holds the tokens of the cells it names, every cell once
    seen = []
    for batch in tokens.loader(16, 0, 1, shuffle=True, seed=5, epoch=1):
        index = batch["index"].numpy()
        assert np.array_equal(batch["tokens"].numpy(), reference[index])
        seen.append(index)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(adata.n_obs))
    assert list(np.concatenate(seen)) != sorted(np.concatenate(seen))  # shuffled

    labels = source.read_labels("celltype")
    assert list(labels) == list(adata.obs["celltype"].astype(str))
    assert list(source.obs(np.arange(3, 9)).index) == list(adata.obs_names[3:9])


@pytest.mark.parametrize("kind", ["folder", "zarr", "soma", "large h5ad"])
def test_a_panel_that_leaves_out_genes_gives_the_in_memory_tokens_of_scattered_rows(collection, kind, monkeypatch):
    """Values of genes off the panel are dropped where the shards read them (in place for .h5ad/.zarr)."""
    adata, paths = collection
    fmt = utils.detect_input_format(adata)
    panel = list(adata.var_names[::3][::-1]) + ["NOT_A_GENE"]
    reference = utils.tokenize(data_utils.align_to_panel(adata, panel, input_format=fmt), 5, fmt)
    rows = np.sort(np.random.default_rng(3).choice(adata.n_obs, adata.n_obs // 3, replace=False))
    aligned = utils.align_to_panel(open_source(kind, paths[kind], monkeypatch), panel, input_format=fmt)
    assert np.array_equal(aligned.token_dataset(5).tokens_of_rows(rows), reference[rows])
    assert np.array_equal(aligned.read_csr(rows).toarray(),
                          data_utils.align_to_panel(adata, panel, input_format=fmt).X[rows].toarray())


@pytest.mark.parametrize("kind", ["folder", "zarr", "soma"])
def test_a_source_that_has_read_cells_pickles_for_worker_processes(collection, kind, monkeypatch):
    """A DataLoader started by spawn or forkserver pickles the dataset: open handles stay behind."""
    import pickle

    adata, paths = collection
    aligned = utils.align_to_panel(open_source(kind, paths[kind], monkeypatch), list(adata.var_names))
    rows = np.arange(0, adata.n_obs, 7)
    dataset = aligned.token_dataset(5)
    before = dataset.tokens_of_rows(rows)
    copy = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(copy.tokens_of_rows(rows), before)


def test_csr_rows_are_read_span_by_span_into_place(tmp_path):
    """read_csr_rows: rows far apart are separate spans, rows close together one span with the unwanted
    rows dropped; h5py datasets are read straight into the result, `out` buffers are filled and cast."""
    import h5py

    X = sp.random(400, 60, density=0.3, format="csr", random_state=np.random.default_rng(0), dtype=np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["data"], f["indices"] = X.data, X.indices
    rows = np.array([0, 1, 2, 5, 6, 150, 151, 399])
    expected = X[rows]
    with h5py.File(tmp_path / "x.h5", "r") as f:
        for data, indices in [(X.data, X.indices), (f["data"], f["indices"])]:
            for gap in (0, 10, 1 << 20):
                values, cols, ptr = data_utils.read_csr_rows(data, indices, X.indptr.astype(np.int64), rows, gap)
                got = sp.csr_matrix((values, cols, ptr), shape=(len(rows), 60))
                assert np.array_equal(got.toarray(), expected.toarray())
            buffers = (np.full(expected.nnz + 5, -1, np.float64), np.full(expected.nnz + 5, -1, np.int64))
            values, cols, ptr = data_utils.read_csr_rows(data, indices, X.indptr.astype(np.int64), rows, 10,
                                                         out=buffers)
            assert np.shares_memory(values, buffers[0]) and np.shares_memory(cols, buffers[1])
            assert np.array_equal(values, expected.data) and np.array_equal(cols, expected.indices)
            assert (buffers[0][expected.nnz:] == -1).all()


def test_a_single_h5ad_streamed_keeps_its_in_memory_fingerprint(collection, monkeypatch):
    adata, paths = collection
    in_memory = utils.open_cells(paths["large h5ad"])
    assert isinstance(in_memory, ad.AnnData)
    streamed = open_source("large h5ad", paths["large h5ad"], monkeypatch)
    assert utils.data_fingerprint(streamed) == utils.data_fingerprint(in_memory)
    folder = utils.data_fingerprint(utils.open_cells(paths["folder"]))
    assert folder != utils.data_fingerprint(in_memory) and folder == utils.data_fingerprint(
        utils.open_cells(paths["folder"]))


def test_shards_with_different_genes_share_a_panel_and_stream_the_same_highly_variable_genes(tmp_path):
    adata = count_cells()
    pieces = write_shards(adata, tmp_path / "shards")
    pieces[2][:, 40:].copy().write_h5ad(tmp_path / "shards" / "part2.h5ad")  # the last shard lacks 40 genes
    source = utils.open_cells(tmp_path / "shards")
    shared = list(adata.var_names[40:])
    assert utils.data_genes(source) == [g for g in pieces[0].var_names if g in set(shared)]
    panel = list(adata.var_names)
    aligned = utils.align_to_panel(source, panel, input_format="counts")
    expected = np.concatenate([
        utils.tokenize(data_utils.align_to_panel(p, panel, input_format="counts"), 5, "counts")
        for p in (pieces[0], pieces[1], pieces[2][:, 40:].copy())])
    assert np.array_equal(aligned.token_dataset(5).tokens_of_rows(np.arange(adata.n_obs)), expected)
    assert not aligned.found_mask[:40].any() and aligned.found_mask[40:].all()

    # a streamed source is not rescaled: in the other format than the model's, one clear error
    with pytest.raises(utils.InputError, match="trained on log1p data.*normalize_total"):
        utils.align_to_panel(source, panel, input_format="counts", model_format="log1p")

    # --gene_num from a streamed sample: every cell when the data is smaller than the sample
    write_shards(adata, tmp_path / "same")
    same_genes = utils.open_cells(tmp_path / "same")
    assert utils.dataset_panel(same_genes, 50, "counts") == utils.dataset_panel(adata, 50, "counts")


@pytest.fixture(scope="module")
def aligned_counts(tmp_path_factory):
    """aligned_counts(n) -> n raw-count cells in 3 shards, aligned to the genes they share."""
    made = {}

    def make(n_cells: int):
        if n_cells not in made:
            folder = tmp_path_factory.mktemp(f"stream_{n_cells}")
            write_shards(labelled_counts(n_cells=n_cells, n_genes=50, seed=1), folder)
            source = utils.open_cells(folder)
            made[n_cells] = source.align(utils.data_genes(source), input_format="counts")
        return made[n_cells]
    return make


@pytest.mark.parametrize("n_cells,batch_size", [(1000, 16), (997, 7), (130, 32)])
def test_two_ranks_read_disjoint_blocks_covering_the_training_cells_in_equal_steps(n_cells, batch_size,
                                                                                   aligned_counts):
    aligned = aligned_counts(n_cells)
    valid, train = aligned.split_by_block(np.arange(n_cells), 0.1, seed=2)
    assert len(np.intersect1d(valid, train)) == 0 and np.array_equal(np.union1d(valid, train), np.arange(n_cells))
    assert 0 < len(valid) < n_cells // 5
    dataset = aligned.token_dataset(5, indices=train)
    ranks = [dataset.loader(batch_size, r, 2, shuffle=True, seed=9, epoch=3) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    cells = [np.concatenate([b["index"].numpy() for b in loader]) for loader in ranks]
    assert [len(c) for c in cells] == [len(ranks[0].order.items)] * 2  # padded to one length, all steps taken
    assert len(np.intersect1d(cells[0], cells[1])) == 0  # padding repeats a rank's own cells
    assert np.array_equal(np.union1d(cells[0], cells[1]), train)
    # blocks: runs of consecutive cells, the same split on both ranks, a new order each epoch
    plans = [data_sources.epoch_plan(dataset.indices, aligned.source.offsets, dataset.block_size,
                                     dataset.blocks_held, 9, epoch, 0, 2) for epoch in (3, 4)]
    assert not np.array_equal(plans[0].items, plans[1].items)

    # scoring (no shuffle, no padding): every cell exactly once, in order, rank by rank
    scored = [np.concatenate([b["index"].numpy() for b in dataset.loader(batch_size, r, 2, shuffle=False, seed=0,
                                                                          epoch=0, pad=False)]) for r in range(2)]
    assert np.array_equal(np.concatenate(scored), train)


def test_a_batch_mixes_cells_of_several_blocks_and_a_fetch_reads_whole_blocks(aligned_counts):
    dataset = aligned_counts(1000).token_dataset(5)
    order = data_sources.epoch_plan(dataset.indices, dataset.cells.source.offsets, dataset.block_size,
                                    dataset.blocks_held, 1, 1, 0, 1)
    per_batch = [len(np.unique(order.blocks[i:i + 8])) for i in range(0, len(order.items) - 7, 8)]
    assert np.mean(per_batch) > 4  # 16 blocks held: 8 cells come from ~6.5 distinct blocks on average
    bounds = np.append(order.fetches, len(order.items))
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = np.sort(dataset.indices[order.items[a:b]])
        runs = 1 + int((np.diff(rows) != 1).sum())  # runs of consecutive cells read at once
        assert runs <= dataset.blocks_held


def test_a_resumed_epoch_continues_with_the_same_remaining_cells(aligned_counts):
    dataset = aligned_counts(1000).token_dataset(5)
    ctx = train_utils.DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    whole = train_utils.EpochLoader(dataset, 12, ctx, seed=4, epoch=2)
    batches = [(b["index"].clone(), b["tokens"].clone()) for b in whole]
    assert whole.step == len(whole) == len(batches)

    stopped = train_utils.EpochLoader(dataset, 12, ctx, seed=4, epoch=2)
    for k, _ in enumerate(stopped):
        if k == 16:  # mid-fetch: 12 * 17 cells is not a multiple of the cells read at once
            break
    state = stopped.state_dict()
    assert state["step"] == 17 and state["block_size"] == dataset.block_size
    resumed = train_utils.EpochLoader(dataset, 12, ctx, seed=4, epoch=2)
    resumed.load_state_dict(state)
    rest = [(b["index"], b["tokens"]) for b in resumed]
    assert len(rest) == len(batches) - 17
    for (i, t), (j, u) in zip(rest, batches[17:]):
        assert torch.equal(i, j) and torch.equal(t, u)

    other_data = train_utils.EpochLoader(aligned_counts(997).token_dataset(5), 12, ctx, seed=4, epoch=2)
    with pytest.raises(data_utils.InputError, match="cells"):
        other_data.load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# user mistakes: one line, exit 2, nothing written
# ----------------------------------------------------------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, out_dir, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]
    assert not os.path.exists(out_dir)


def test_a_folder_with_no_readable_file(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no cells here\n")
    out = tmp_path / "ckpts"
    result = run_script("pretrain.py", "--data_path", str(tmp_path / "notes"), "--ckpt_dir", str(out), env=ENV)
    assert_one_line_error(result, out, "holds no 10x mtx files, zarr store, TileDB-SOMA experiment or .h5ad")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cells.h5ad").write_bytes(b"not an hdf5 file")
    result = run_script("finetune.py", "--data_path", str(tmp_path / "broken"), "--ckpt_dir", str(out),
                        "--from_scratch", env=ENV)
    assert_one_line_error(result, out, "cells.h5ad", "could not read")

    with pytest.raises(data_utils.InputError, match="no .h5ad file matches"):
        utils.open_cells(str(tmp_path / "nowhere" / "*.h5ad"))


def test_a_shard_sharing_no_gene_with_the_panel(tmp_path):
    adata = count_cells()
    write_shards(adata, tmp_path / "shards", parts=2)
    stranger = adata[:30].copy()
    stranger.var_names = [f"OTHER{i}" for i in range(stranger.n_vars)]
    stranger.var["feature_name"] = [f"NOPE{i}" for i in range(stranger.n_vars)]
    stranger.write_h5ad(tmp_path / "shards" / "part9.h5ad")
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(adata.var_names) + "\n")
    out = tmp_path / "ckpts"
    result = run_script("pretrain.py", "--data_path", str(tmp_path / "shards"), "--gene_panel", str(panel),
                        "--ckpt_dir", str(out), env=ENV)
    assert_one_line_error(result, out, "part9.h5ad")
    with pytest.raises(data_utils.InputError, match="part9.h5ad shares no gene with the shards before it"):
        utils.data_genes(utils.open_cells(tmp_path / "shards"))  # no panel: the genes all shards share


def test_a_bad_soma_uri_or_option(tmp_path, small_sources):
    out = tmp_path / "ckpts"
    result = run_script("pretrain.py", "--data_path", f"file://{tmp_path}/no_experiment", "--ckpt_dir", str(out),
                        env=ENV)
    assert_one_line_error(result, out, "could not open", "as a TileDB-SOMA experiment")
    soma = str(small_sources["soma"])
    result = run_script("finetune.py", "--data_path", f"{soma}/ms", "--from_scratch", "--ckpt_dir", str(out), env=ENV)
    assert_one_line_error(result, out, "as a TileDB-SOMA experiment")
    for options, words in [(utils.SomaOptions(measurement="ATAC"), "no measurement 'ATAC'.*RNA"),
                           (utils.SomaOptions(layer="counts"), "no X layer 'counts'.*data"),
                           (utils.SomaOptions(obs_filter="celltype == 'nothing'"), "no cell .* passes the obs filter"),
                           (utils.SomaOptions(obs_filter="no_such_column > 3"), "could not be applied")]:
        with pytest.raises(data_utils.InputError, match=words):
            utils.open_cells(soma, options)
    with pytest.raises(data_utils.InputError, match="--obs_filter applies to a TileDB-SOMA experiment"):
        utils.open_cells(small_sources["shards"], utils.SomaOptions(obs_filter="celltype == 'x'"))


def test_soma_without_tiledbsoma_names_the_package(small_sources, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import tiledbsoma now raises ImportError
    with pytest.raises(data_utils.InputError, match="needs the optional package tiledbsoma; install it with: pip"):
        utils.open_cells(small_sources["soma"])


def test_a_column_major_shard_is_refused(tmp_path):
    adata = count_cells()
    write_shards(adata, tmp_path / "shards", parts=2)
    csc = adata[:20].copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "shards" / "part5.h5ad")
    with pytest.raises(data_utils.InputError, match="part5.h5ad stores X column-major"):
        utils.open_cells(tmp_path / "shards")


def test_an_obs_filter_selects_the_cells_of_a_soma_experiment(collection):
    adata, paths = collection
    kind = adata.obs["celltype"].astype(str).value_counts().index[0]
    source = utils.open_cells(paths["soma"], utils.SomaOptions(obs_filter=f"celltype == '{kind}'"))
    keep = np.flatnonzero(adata.obs["celltype"].astype(str) == kind)
    panel = list(adata.var_names)
    fmt = utils.detect_input_format(adata)
    expected = utils.tokenize(data_utils.align_to_panel(adata[keep].copy(), panel, input_format=fmt), 5, fmt)
    assert source.n_obs == len(keep)
    assert np.array_equal(source.align(panel, input_format=fmt).token_dataset(5).tokens_of_rows(
        np.arange(len(keep))), expected)
    assert list(source.obs(np.arange(len(keep))).index) == list(adata.obs_names[keep])


# ----------------------------------------------------------------------------------------------
# torchrun: two ranks pretrain the tiny preset from shards and from a SOMA experiment
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_sources(tmp_path_factory, default_subset):
    """The default subset (234 cells) as 3 shards (one in another gene order) and as SOMA."""
    root = tmp_path_factory.mktemp("torchrun_data")
    write_shards(ad.read_h5ad(default_subset), root / "shards")
    tiledbsoma_io.from_h5ad(str(root / "soma"), str(default_subset), measurement_name="RNA")
    return {"shards": root / "shards", "soma": root / "soma"}


@pytest.mark.parametrize("kind", ["shards", "soma"])
def test_torchrun_two_ranks_pretrain_from_a_streamed_source(tmp_path, small_sources, kind):
    out = tmp_path / "ckpts"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "pretrain.py"), "--data_path", str(small_sources[kind]), "--model", "tiny", "--epoch", "1",
               "--batch_size", "8", "--amp", "none", "--no-pos_embed", "--ckpt_dir", str(out), "--log_every", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    ckpt = torch.load(out / "pretrain.pth", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1 and len(ckpt["gene_panel"]) == 765
    assert ckpt["data_path"] == str(small_sources[kind])
    steps = [line for line in result.stderr.splitlines() if line.startswith("epoch 1: step ")]
    assert steps and steps[-1].split()[3].split("/")[0] == steps[-1].split()[3].split("/")[1]
    model, _ = utils.load_checkpoint(out / "pretrain.pth")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_a_gene_map_renames_every_shard_and_the_overlap_table_matches_the_in_memory_one(tmp_path):
    adata = count_cells()
    write_shards(adata, tmp_path / "shards")
    # two dataset genes onto one panel gene (summed), one renamed
    (tmp_path / "map.tsv").write_text("GENE1\tGENE0\nGENE7\tRENAMED7\n")
    mapping = utils.read_gene_map(str(tmp_path / "map.tsv"))
    panel = utils.data_genes(adata, mapping)
    assert "RENAMED7" in panel and "GENE1" not in panel
    source = utils.open_cells(tmp_path / "shards")
    assert utils.data_genes(source, mapping) == panel
    in_memory = data_utils.align_to_panel(adata, panel, input_format="counts", gene_map=mapping)
    streamed = utils.align_to_panel(source, panel, input_format="counts", gene_map=mapping)
    assert np.array_equal(streamed.token_dataset(5).tokens_of_rows(np.arange(adata.n_obs)),
                          utils.tokenize(in_memory, 5, "counts"))
    expected, got = data_utils.gene_overlap_table(in_memory), utils.overlap_table(streamed)
    assert list(got.columns) == list(expected.columns)
    for column in ("panel_gene", "found", "data_genes", "matched_on"):
        assert list(got[column]) == list(expected[column]), column
    # 240 cells: the sample for the count shares is every cell, so they are the in-memory ones
    assert np.allclose(got["count_share"], expected["count_share"], rtol=1e-9, atol=0)
