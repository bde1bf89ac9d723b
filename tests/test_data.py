"""Tests of data_utils: bins against hand-computed values, masking rules, panel alignment, input
detection, datasets, splits, readers, fingerprints and Gene2Vec. CPU only, small data."""
from __future__ import annotations

import gzip
import math
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_utils as du  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PBMC3K = SHARED_DATA / "pbmc3k_silver.h5ad"


def make_adata(X, genes=None, cells=None, **var_cols) -> ad.AnnData:
    X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    genes = genes or [f"G{i}" for i in range(X.shape[1])]
    cells = cells or [f"c{i}" for i in range(X.shape[0])]
    var = pd.DataFrame(var_cols, index=pd.Index(genes))
    return ad.AnnData(X=X, obs=pd.DataFrame(index=cells), var=var)


@pytest.fixture(scope="module")
def default_data() -> ad.AnnData:
    return du.read_dataset(None)


@pytest.fixture(scope="module")
def pbmc3k() -> ad.AnnData:
    if not PBMC3K.is_file():
        pytest.skip(f"{PBMC3K} not present")
    return du.read_dataset(PBMC3K)


def toy_counts(n_cells=40, n_genes=30, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(rng.gamma(0.5, 2.0, size=(n_cells, n_genes))).astype(np.float32)
    X[:, 0] += 1  # no empty cell
    return make_adata(X)


# ----------------------------------------------------------------------------------------------
# Binning (REFERENCE §1 table)
# ----------------------------------------------------------------------------------------------

EDGES = [1, 3, 7, 15, 31]


def test_counts_bins_at_and_just_below_every_edge():
    # Each cell's total is chosen so that CP10k = count * 10,000 / total is exactly an edge (rows 0-2)
    # or just below it (row 3: total 10,001). Filler genes bring the total up.
    cells = []
    # m = 41 and 49: naive float32 / float64 arithmetic (count * (1e4 / total)) lands below the edge
    for m in (1, 2, 7, 41, 49):                      # totals 10,000 / 20,000 / 70,000 / ...
        edge_counts = [m * e for e in EDGES]
        cells.append(edge_counts + [m * 10000 - sum(edge_counts), 0])
    cells.append(EDGES + [10001 - sum(EDGES), 0])
    X = np.array(cells, dtype=np.float64)
    tokens = du.tokenize_matrix(sp.csr_matrix(X), "counts", 5)
    expected = np.array([[1, 2, 3, 4, 5, 5, 0, 0]] * 5 + [[0, 1, 2, 3, 4, 5, 0, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.dtype == np.uint8
    # the same through a dense block and through float32 storage
    np.testing.assert_array_equal(du.tokenize_matrix(X, "counts", 5), expected)
    np.testing.assert_array_equal(du.tokenize_matrix(sp.csr_matrix(X.astype(np.float32)), "counts", 5), expected)


def test_counts_bins_inside_bins_and_cap():
    # total 10,000 so CP10k = count; values inside each bin and far above the top edge
    counts = [0.0, 2, 4, 6, 8, 14, 16, 30, 32, 9000 - 112 - 0]
    counts[-1] = 10000 - sum(counts[:-1])
    tokens = du.tokenize_matrix(np.array([counts]), "counts", 5)
    np.testing.assert_array_equal(tokens[0], [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 0])
    # other bin_num: 3 caps early; 7 adds the edges 63 and 127
    row = np.array([[31, 63, 127, 10000 - 221]], dtype=float)
    np.testing.assert_array_equal(du.tokenize_matrix(row, "counts", 3)[0], [3, 3, 3, 3, 0])
    np.testing.assert_array_equal(du.tokenize_matrix(row, "counts", 7)[0], [5, 6, 7, 7, 0])
    np.testing.assert_array_equal(du.tokenize_matrix(np.array([[62.0, 10000 - 62]]), "counts", 7)[0], [5, 7, 0])


def test_empty_cell_and_duplicate_entries():
    X = sp.csr_matrix((np.array([1.0, 9999, 0.5, 0.5]), np.array([0, 1, 0, 0]), np.array([0, 2, 2, 4])), shape=(3, 2))
    tokens = du.tokenize_matrix(X, "counts", 5)
    # row 2 stores gene 0 twice (0.5 + 0.5 = its only count: CP10k 10,000)
    np.testing.assert_array_equal(tokens, [[1, 5, 0], [0, 0, 0], [5, 0, 0]])


def test_log1p_bins_at_and_just_below_every_edge():
    edges = np.array(EDGES, dtype=np.float64)
    for dtype in (np.float32, np.float64):
        at = np.log1p(edges).astype(dtype)
        below = np.log1p(edges * (1 - 1e-4)).astype(dtype)
        big = np.log1p([1000.0]).astype(dtype)
        X = np.array([np.concatenate([at, big]), np.concatenate([below, big])])
        tokens = du.tokenize_matrix(sp.csr_matrix(X), "log1p", 5)
        np.testing.assert_array_equal(tokens, [[1, 2, 3, 4, 5, 5, 0], [0, 1, 2, 3, 4, 5, 0]])


def test_log1p_not_renormalised():
    # one gene at CP10k 3 in a cell whose values sum to far less than 10,000: stays bin 2
    X = np.array([[np.log1p(3.0), 0.0, np.log1p(0.5)]])
    np.testing.assert_array_equal(du.tokenize_matrix(X, "log1p", 5)[0], [2, 0, 0, 0])


def test_data_in_the_other_format_is_rescaled_to_tokenise_as_the_model_was_trained():
    # a panel of a third of the genes: CP10k over it would lift every gene by ~log2(3) bins
    rng = np.random.default_rng(8)
    X = rng.poisson(rng.gamma(0.3, 1.0, size=(30, 3000))).astype(np.float64)
    counts = make_adata(X.astype(np.float32))
    log1p = make_adata((np.log1p(X * 1e4 / X.sum(1, keepdims=True))).astype(np.float32))  # over all 3,000 genes
    panel = list(counts.var_names[::3])
    on_log1p = du.tokenize(du.align_to_panel(log1p, panel), 5, "log1p")
    for_log1p_model = du.align_to_panel(counts, panel, model_format="log1p")
    assert for_log1p_model.uns["scbert_input_format"] == "log1p"
    assert for_log1p_model.uns["scbert_data_format"] == "counts"
    np.testing.assert_array_equal(du.tokenize(for_log1p_model, 5, "log1p"), on_log1p)
    on_counts = du.tokenize(du.align_to_panel(counts, panel), 5, "counts")
    assert (on_counts != on_log1p).mean() > 0.1  # what the model would have seen without the rescaling
    for_counts_model = du.align_to_panel(log1p, panel, model_format="counts")
    assert for_counts_model.uns["scbert_input_format"] == "counts"
    same = du.tokenize(for_counts_model, 5, "counts") == on_counts  # float32 storage may move a value at an edge
    assert same.mean() > 0.999, same.mean()
    # the format the model records is what its cells already are: unchanged
    np.testing.assert_array_equal(du.align_to_panel(counts, panel, model_format="counts").X.toarray(),
                                  du.align_to_panel(counts, panel).X.toarray())


def test_tokenize_in_small_row_slices(monkeypatch):
    # rows are binned a slice of stored values at a time; slices smaller than a row must not matter
    a = toy_counts(25, 40, seed=4)
    X = a.X.toarray().astype(np.float64)
    cp10k = X * 1e4 / X.sum(1, keepdims=True)
    expected = np.minimum(np.floor(np.log2(1 + cp10k)), 5)
    for block in (1, 7, 64):
        monkeypatch.setattr(du, "_BLOCK_NNZ", block)
        np.testing.assert_array_equal(du.tokenize(a)[:, :-1], expected)
        np.testing.assert_array_equal(du.tokenize_matrix(np.log1p(cp10k), "log1p", 5)[:, :-1], expected)


def test_tokenize_appends_zero_and_matches_matrix():
    a = toy_counts()
    tokens = du.tokenize(a)
    assert tokens.shape == (a.n_obs, a.n_vars + 1) and tokens.dtype == np.uint8
    assert not tokens[:, -1].any()
    np.testing.assert_array_equal(tokens, du.tokenize_matrix(a.X, "counts", 5))
    X = a.X.toarray().astype(np.float64)
    ref = np.minimum(np.floor(np.log2(1 + X * 1e4 / X.sum(1, keepdims=True))), 5)
    np.testing.assert_array_equal(tokens[:, :-1], ref)


# ----------------------------------------------------------------------------------------------
# Masking (REFERENCE §2)
# ----------------------------------------------------------------------------------------------

def token_rows(nonzero_counts, seq_len=130, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    t = np.zeros((len(nonzero_counts), seq_len), dtype=np.int64)
    for r, k in enumerate(nonzero_counts):
        pos = rng.choice(seq_len - 1, k, replace=False)
        t[r, pos] = rng.integers(1, 6, k)
    return torch.from_numpy(t)


def test_mask_counts_follow_ceil_rule():
    tokens = token_rows([100, 7, 1, 0, 129])
    masked, labels = du.mask_expressed_genes(tokens, generator=torch.Generator().manual_seed(0))
    chosen = (labels != 6).sum(dim=1).tolist()
    assert chosen == [15, 2, 1, 0, 20]
    # 0.55 * 100 is 55.00000000000001 in floating point: the rule means the real product
    _, labels = du.mask_expressed_genes(tokens, mask_prob=0.55, generator=torch.Generator().manual_seed(0))
    assert (labels != 6).sum(dim=1).tolist() == [55, 4, 1, 0, 71]
    assert max(chosen) <= math.ceil(0.15 * tokens.shape[1])
    # mask_prob 1: every candidate chosen, never more than the sequence allows
    _, labels = du.mask_expressed_genes(tokens, mask_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert (labels != 6).sum(dim=1).tolist() == [100, 7, 1, 0, 129]


def test_mask_only_nonzero_and_never_last_position():
    tokens = token_rows([60, 60, 60, 60])
    tokens[:, -1] = 3  # even a non-zero last position is never a candidate
    for seed in range(5):
        masked, labels = du.mask_expressed_genes(tokens, mask_prob=0.9, generator=torch.Generator().manual_seed(seed))
        chosen = labels != 6
        assert not chosen[tokens == 0].any()
        assert not chosen[:, -1].any()
        assert chosen.sum(dim=1).tolist() == [54] * 4


def test_mask_replace_prob_and_labels():
    tokens = token_rows([50, 80])
    g = torch.Generator().manual_seed(1)
    masked, labels = du.mask_expressed_genes(tokens, replace_prob=1.0, generator=g)
    chosen = labels != 6
    assert torch.equal(labels[chosen], tokens[chosen])
    assert (masked[chosen] == 6).all()
    assert torch.equal(masked[~chosen], tokens[~chosen])
    masked0, labels0 = du.mask_expressed_genes(tokens, replace_prob=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(masked0, tokens)
    assert (labels0 != 6).sum() == chosen.sum()
    # default 0.9: about 90% of chosen positions hidden over many cells
    big = token_rows([100] * 200, seq_len=200)
    m, lab = du.mask_expressed_genes(big, generator=torch.Generator().manual_seed(2))
    frac = (m[lab != 6] == 6).float().mean().item()
    assert 0.85 < frac < 0.95


def test_mask_random_tokens():
    tokens = token_rows([100] * 20, seq_len=150)
    m, lab = du.mask_expressed_genes(tokens, replace_prob=0.0, random_token_prob=1.0,
                                     generator=torch.Generator().manual_seed(3))
    chosen = lab != 6
    assert not (m == 6).any()
    assert ((m[chosen] >= 1) & (m[chosen] <= 5)).all()
    assert (m[chosen] != tokens[chosen]).float().mean() > 0.5  # random, not the original token
    with pytest.raises(du.InputError):
        du.mask_expressed_genes(tokens, replace_prob=0.9, random_token_prob=0.2)


def test_mask_reproducible_and_uniform():
    tokens = token_rows([40, 90, 10])
    a = du.mask_expressed_genes(tokens, generator=torch.Generator().manual_seed(7))
    b = du.mask_expressed_genes(tokens, generator=torch.Generator().manual_seed(7))
    c = du.mask_expressed_genes(tokens, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # every candidate is equally likely: 20 candidates, 3 chosen per draw -> 0.15 each
    row = token_rows([20] * 2000, seq_len=60)
    _, lab = du.mask_expressed_genes(row, generator=torch.Generator().manual_seed(9))
    freq = ((lab != 6).float().sum(0) / (row > 0).float().sum(0).clamp_min(1))[(row > 0).any(0)]
    assert freq.min() > 0.10 and freq.max() < 0.20


# ----------------------------------------------------------------------------------------------
# Input detection
# ----------------------------------------------------------------------------------------------

def test_detect_counts_and_log1p():
    import scanpy as sc

    a = toy_counts(60, 40)
    assert du.detect_input_format(a) == "counts"
    b = a.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    assert du.detect_input_format(b) == "log1p"
    assert du.detect_input_format(b, override="counts") == "counts"


def test_detect_rejects_scaled_nan_and_other_scales():
    import scanpy as sc

    a = toy_counts(60, 40)
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    scaled = a.copy()
    scaled.X = scaled.X.toarray()
    sc.pp.scale(scaled)
    with pytest.raises(du.InputError, match="negative"):
        du.detect_input_format(scaled)
    with pytest.raises(du.InputError, match="negative"):
        du.detect_input_format(scaled, override="log1p")  # no format can bin negative values
    nan = a.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 4] = np.nan
    with pytest.raises(du.InputError, match="NaN"):
        du.detect_input_format(nan)
    cp10k = toy_counts(60, 40)
    sc.pp.normalize_total(cp10k, target_sum=1e4)  # normalised but not logged: large non-integers
    with pytest.raises(du.InputError, match="--input_format"):
        du.detect_input_format(cp10k)
    log2 = toy_counts(60, 40)
    sc.pp.normalize_total(log2, target_sum=1e4)
    sc.pp.log1p(log2, base=2)
    with pytest.raises(du.InputError, match="10,000"):
        du.detect_input_format(log2)
    raw_log = toy_counts(60, 40)
    sc.pp.log1p(raw_log)
    with pytest.raises(du.InputError, match="without per-cell normalisation"):
        du.detect_input_format(raw_log)
    with pytest.raises(du.InputError, match="not known"):
        du.detect_input_format(a, override="tpm")


# ----------------------------------------------------------------------------------------------
# Gene panel and alignment
# ----------------------------------------------------------------------------------------------

def test_align_symbols_case_missing_and_order():
    a = make_adata([[1, 2, 3], [4, 0, 6]], genes=["cd3d", "MS4A1", "Lyz"])
    a.obs["celltype"] = ["T", "B"]
    out = du.align_to_panel(a, ["LYZ", "CD3D", "NEWGENE", "MS4A1"], min_overlap=0.5)
    assert sp.isspmatrix_csr(out.X) and out.X.dtype == np.float32
    assert list(out.var_names) == ["LYZ", "CD3D", "NEWGENE", "MS4A1"]
    np.testing.assert_array_equal(out.X.toarray(), [[3, 1, 0, 2], [6, 4, 0, 0]])
    assert list(out.obs["celltype"]) == ["T", "B"]
    assert out.uns["scbert_panel_overlap"]["found"] == 3 and out.uns["scbert_panel_overlap"]["total"] == 4
    assert out.uns["scbert_input_format"] == "counts"
    assert list(out.var["in_data"]) == [True, True, False, True]


def test_align_ensembl_ids_with_versions():
    a = make_adata([[1, 2, 3]], genes=["A", "B", "C"],
                   gene_ids=["ENSG00000000001.4", "ENSG00000000002.1", "ENSG00000000003"])
    out = du.align_to_panel(a, ["ensg00000000003.7", "ENSG00000000001", "ENSG00000000009"])
    np.testing.assert_array_equal(out.X.toarray(), [[3, 1, 0]])
    assert out.uns["scbert_panel_overlap"]["matched_on"] == "var['gene_ids']"
    # the other way round: versioned IDs as var_names, unversioned panel
    b = make_adata([[5, 7]], genes=["ENSG00000000002.11", "ENSG00000000001.2"])
    np.testing.assert_array_equal(du.align_to_panel(b, ["ENSG00000000001", "ENSG00000000002"]).X.toarray(), [[7, 5]])


def test_align_sums_duplicates_counts_and_log1p():
    a = make_adata([[1, 2, 4], [0, 3, 0]], genes=["GeneA", "GENEA", "GeneB"])
    np.testing.assert_array_equal(du.align_to_panel(a, ["GENEA", "GENEB"]).X.toarray(), [[3, 4], [3, 0]])
    # log1p values are summed on the expression scale: ln(1+2) and ln(1+3) -> ln(1+5)
    lg = make_adata(np.log1p([[2.0, 3.0, 1.5]]), genes=["X", "x", "Y"])
    out = du.align_to_panel(lg, ["X", "Y"], input_format="log1p")
    np.testing.assert_allclose(out.X.toarray(), np.log1p([[5.0, 1.5]]), rtol=1e-6)


def test_align_low_overlap_error_names_genes():
    a = make_adata(np.ones((2, 12)), genes=[f"DATAGENE{i}" for i in range(12)])
    panel = ["DATAGENE0"] + [f"PANELGENE{i}" for i in range(19)]
    with pytest.raises(du.InputError) as err:
        du.align_to_panel(a, panel, min_overlap=0.1)
    msg = str(err.value)
    assert "1 of 20" in msg and "DATAGENE" in msg and "PANELGENE" in msg and ";" in msg
    assert du.align_to_panel(a, panel, min_overlap=0.05).uns["scbert_panel_overlap"]["found"] == 1


def test_load_gene_panel(tmp_path):
    p = tmp_path / "panel.txt"
    p.write_text("CD3D\n\n  MS4A1 \nLYZ\n\n")
    assert du.load_gene_panel(p) == ["CD3D", "MS4A1", "LYZ"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(du.InputError, match="no genes"):
        du.load_gene_panel(tmp_path / "empty.txt")
    with pytest.raises(du.InputError, match="does not exist"):
        du.load_gene_panel(tmp_path / "missing.txt")
    (tmp_path / "dup.txt").write_text("CD3D\ncd3d\n")
    with pytest.raises(du.InputError, match="more than once"):
        du.load_gene_panel(tmp_path / "dup.txt")
    a = make_adata([[1, 1, 1]], genes=["A", "B", "a"])
    assert du.panel_from_data(a) == ["A", "B"]


def test_expressed_gene_counts_and_filter():
    X = np.zeros((3, 300))
    X[0, :250] = 1
    X[1, :150] = 2
    X[2, :200] = 1
    a = make_adata(X)
    np.testing.assert_array_equal(du.expressed_gene_counts(a.X), [250, 150, 200])
    np.testing.assert_array_equal(du.expressed_gene_counts(a), [250, 150, 200])
    np.testing.assert_array_equal(du.filter_cells_min_genes(a, 200, drop=True), [0, 2])
    np.testing.assert_array_equal(du.filter_cells_min_genes(a, 200, drop=False), [0, 1, 2])
    assert a.uns["scbert_cell_filter"]["n_below"] == 1


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

def test_dataset_honours_indices_and_labels():
    a = toy_counts(50, 30)
    tokens = du.tokenize(a)
    labels = np.arange(50) % 4
    idx = np.array([17, 3, 42, 3, 0])
    ds = du.TokenDataset(a, "counts", 5, labels=labels, indices=idx)
    assert len(ds) == 5
    for i, row in enumerate(idx):
        item = ds[i]
        assert item["index"] == row
        assert item["tokens"].dtype == torch.uint8 and item["tokens"].shape == (31,)
        assert torch.equal(item["tokens"], torch.from_numpy(tokens[row]))
        assert item["label"].dtype == torch.int64 and item["label"].item() == labels[row]
    batch = ds.__getitems__([4, 2, 1, 0])  # the batched paths keep the requested order too
    assert [b["index"] for b in batch] == [0, 42, 3, 17]
    np.testing.assert_array_equal(np.stack([b["tokens"].numpy() for b in batch]), tokens[[0, 42, 3, 17]])
    batch = ds[[4, 2, 1, 0]]
    assert batch["index"].tolist() == [0, 42, 3, 17] and batch["label"].tolist() == [0, 2, 3, 1]
    np.testing.assert_array_equal(batch["tokens"].numpy(), tokens[[0, 42, 3, 17]])


def test_dataloader_workers_and_distributed_sampler():
    a = toy_counts(70, 25, seed=1)
    tokens = du.tokenize(a)
    ds = du.TokenDataset(a, labels=np.zeros(70, dtype=int))
    dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, shuffle=True,
                                     generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in dl:
        assert batch["tokens"].dtype == torch.uint8
        np.testing.assert_array_equal(batch["tokens"].numpy(), tokens[batch["index"].numpy()])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(70))
    # the batched path: one read + tokenisation per batch, in workers, under a DistributedSampler
    parts = []
    for rank in range(2):
        sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        seen = []
        for batch in du.token_loader(ds, 8, sampler=sampler, num_workers=2):
            assert batch["tokens"].shape[1] == 26 and batch["tokens"].dtype == torch.uint8
            assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
            np.testing.assert_array_equal(batch["tokens"].numpy(), tokens[batch["index"].numpy()])
            seen += batch["index"].tolist()
        parts.append(seen)
    assert len(parts[0]) == len(parts[1]) == 35 and not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(70))


def test_backed_dataset_matches_memory(tmp_path):
    a = toy_counts(90, 40, seed=2)
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(40)]
    path = tmp_path / "toy.h5ad"
    a.write_h5ad(path)
    backed = du.read_dataset(path, backed=True)
    assert backed.isbacked
    assert du.detect_input_format(backed) == "counts"
    np.testing.assert_array_equal(du.tokenize(backed), du.tokenize(a))
    ds = du.TokenDataset(backed, indices=np.arange(5, 90, 2))
    tokens = du.tokenize(a)
    for dl in (torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=True),
               du.token_loader(ds, 8, shuffle=True, num_workers=2)):
        n = 0
        for batch in dl:
            np.testing.assert_array_equal(batch["tokens"].numpy(), tokens[batch["index"].numpy()])
            n += len(batch["index"])
        assert n == len(ds)
    # a panel given to the dataset aligns each batch lazily, as align_to_panel would
    panel = [f"G{i}" for i in range(39, 9, -1)] + ["MISSING"]
    lazy = du.TokenDataset(backed, panel=panel)
    eager = du.tokenize(du.align_to_panel(a, panel))
    np.testing.assert_array_equal(np.stack([b["tokens"].numpy() for b in lazy.__getitems__(list(range(90)))]), eager)
    assert du.data_fingerprint(backed) == du.data_fingerprint(a)


def test_backed_file_with_a_gene_stored_twice_in_a_row(tmp_path):
    """A hand-made CSR file may store a column twice in a row: its values are summed (as scipy and
    `tokenize` do), in the main process and in workers, never scattered over each other."""
    a = toy_counts(30, 12, seed=5)
    X = sp.csr_matrix(a.X)
    data, indices, indptr = list(X.data), list(X.indices), X.indptr.copy()
    # row 3: its first stored gene once more, with a count large enough to change its bin
    at = indptr[3]
    data.insert(at, 50.0)
    indices.insert(at, indices[at])
    indptr[4:] += 1
    dup = ad.AnnData(sp.csr_matrix((np.array(data, np.float32), np.array(indices, np.int32), indptr), shape=X.shape),
                     obs=a.obs, var=a.var)
    assert not dup.X.has_canonical_format
    path = tmp_path / "dup.h5ad"
    dup.write_h5ad(path)
    expected = du.tokenize(dup)  # sums the duplicate
    summed = X.copy().toarray()
    summed[3, X.indices[X.indptr[3]]] += 50
    np.testing.assert_array_equal(expected, du.tokenize(make_adata(summed)))
    ds = du.TokenDataset(du.read_dataset(path, backed=True))
    for workers in (0, 2):
        batches = list(du.token_loader(ds, 7, num_workers=workers))
        np.testing.assert_array_equal(torch.cat([b["tokens"] for b in batches]).numpy(), expected)


def test_backed_dense_and_csc(tmp_path):
    a = toy_counts(30, 12, seed=5)
    dense = ad.AnnData(X=a.X.toarray(), obs=a.obs, var=a.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    backed = du.read_dataset(tmp_path / "dense.h5ad", backed=True)
    np.testing.assert_array_equal(du.TokenDataset(backed)[[3, 1, 2]]["tokens"].numpy(), du.tokenize(a)[[3, 1, 2]])
    csc = ad.AnnData(X=sp.csc_matrix(a.X), obs=a.obs, var=a.var)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(du.InputError, match="CSC"):
        du.TokenDataset(du.read_dataset(tmp_path / "csc.h5ad", backed=True))


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def test_stratified_splits_disjoint_and_stratified():
    labels = np.array(["a"] * 500 + ["b"] * 300 + ["c"] * 200)
    s = du.stratified_splits(labels, test_size=0.2, valid_size=0.1, seed=2021)
    parts = [set(s[k].tolist()) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == 1000 and set().union(*parts) == set(range(1000))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(s["test"]) == 200 and len(s["valid"]) == 80  # valid_size is a fraction of the non-test cells
    for key, n in (("test", 200), ("valid", 80)):
        frac = pd.Series(labels[s[key]]).value_counts() / n
        assert abs(frac["a"] - 0.5) < 0.02 and abs(frac["c"] - 0.2) < 0.02
    again = du.stratified_splits(labels, seed=2021)
    other = du.stratified_splits(labels, seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["test"], other["test"])


def test_splits_too_few_cells_error():
    labels = ["a"] * 50 + ["rare"] * 2 + ["b"] * 50
    with pytest.raises(du.InputError, match="rare"):
        du.stratified_splits(labels)
    with pytest.raises(du.InputError, match="rare \\(2\\)"):
        du.stratified_folds(labels, 5)


def test_stratified_folds():
    labels = np.array(["a"] * 60 + ["b"] * 30 + ["c"] * 10)
    folds = du.stratified_folds(labels, 4, test_size=0.2, seed=3)
    assert len(folds) == 4
    test = folds[0]["test"]
    assert len(test) == 20 and (labels[test] == "c").sum() == 2  # one outer test part, stratified
    assert all(np.array_equal(f["test"], test) for f in folds)
    assert np.array_equal(test, du.stratified_splits(labels, 0.2, 0.1, seed=3)["test"])  # the single split's test
    valids = np.concatenate([f["valid"] for f in folds])
    assert sorted(valids.tolist()) == sorted(set(range(100)) - set(test.tolist()))  # each non-test cell once
    for f in folds:
        assert not set(f["train"]) & set(f["valid"]) and not (set(f["train"]) | set(f["valid"])) & set(test)
        assert len(f["train"]) + len(f["valid"]) == 80 and (labels[f["valid"]] == "c").sum() == 2
    everything = du.stratified_folds(labels, 4, test_size=0, seed=3)
    assert all(len(f["test"]) == 0 and len(f["train"]) + len(f["valid"]) == 100 for f in everything)


def test_folds_with_a_valid_size_train_on_as_many_cells_as_one_split():
    """finetune.py --folds K: each fold validates on --valid_size of the non-test cells, drawn from its
    own part (disjoint), and trains on all the others, as the single split's model does."""
    labels = np.array(["a"] * 600 + ["b"] * 300 + ["c"] * 20 + ["rare"] * 5)
    single = du.stratified_splits(labels, 0.2, 0.1, seed=3, min_valid_per_class=2)
    folds = du.stratified_folds(labels, 3, 0.2, seed=3, valid_size=0.1, min_valid_per_class=2)
    plain = du.stratified_folds(labels, 3, 0.2, seed=3)
    for f, whole in zip(folds, plain):
        assert np.array_equal(f["test"], single["test"])
        assert set(f["valid"]) <= set(whole["valid"])  # drawn from the fold's own part
        assert abs(len(f["train"]) - len(single["train"])) <= 2 and len(f["valid"]) < len(whole["valid"]) / 2
        assert sorted(np.concatenate([f["train"], f["valid"], f["test"]]).tolist()) == list(range(len(labels)))
        assert (labels[f["valid"]] == "c").sum() == 2 and (labels[f["valid"]] == "rare").sum() >= 1
        assert set(labels[f["train"]]) == {"a", "b", "c", "rare"}
    valids = [set(f["valid"]) for f in folds]
    assert not (valids[0] & valids[1]) and not (valids[0] & valids[2]) and not (valids[1] & valids[2])
    common = labels[:920]  # K = 1 / valid_size: plain K-fold
    ten = du.stratified_folds(common, 10, 0.2, seed=3, valid_size=0.1)
    assert all(np.array_equal(f["valid"], g["valid"]) for f, g in zip(ten, du.stratified_folds(common, 10, 0.2, seed=3)))


def test_min_valid_per_class_tops_up_rare_types():
    labels = np.array(["a"] * 300 + ["b"] * 100 + ["rare"] * 12)
    plain = du.stratified_splits(labels, 0.2, 0.1, seed=2021)
    assert (labels[plain["valid"]] == "rare").sum() < 3
    topped = du.stratified_splits(labels, 0.2, 0.1, seed=2021, min_valid_per_class=3)
    assert np.array_equal(topped["test"], plain["test"])
    assert (labels[topped["valid"]] == "rare").sum() == 3
    assert ((labels[topped["valid"]] == "a").sum(), (labels[topped["valid"]] == "b").sum()) == \
        ((labels[plain["valid"]] == "a").sum(), (labels[plain["valid"]] == "b").sum())  # common types untouched
    parts = [set(topped[k].tolist()) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(labels) and set().union(*parts) == set(range(len(labels)))
    # never more than half of a type's non-test cells: 4 non-test cells give 2 to validation at most
    few = np.array(["a"] * 300 + ["tiny"] * 5)
    s = du.stratified_splits(few, 0.2, 0.1, seed=1, min_valid_per_class=10)
    non_test = (few[s["train"]] == "tiny").sum() + (few[s["valid"]] == "tiny").sum()
    assert (few[s["valid"]] == "tiny").sum() == non_test // 2 and (few[s["train"]] == "tiny").sum() >= 1


# ----------------------------------------------------------------------------------------------
# Readers and fingerprint
# ----------------------------------------------------------------------------------------------

def write_10x_h5(path: Path, a: ad.AnnData) -> None:
    import h5py

    X = sp.csc_matrix(a.X.T)  # 10x stores genes x cells in CSC
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(a.obs_names, dtype="S")
        m["data"], m["indices"], m["indptr"] = X.data.astype(np.int32), X.indices, X.indptr
        m["shape"] = np.array(X.shape)
        feat = m.create_group("features")
        feat["id"] = np.array(a.var["gene_ids"], dtype="S")
        feat["name"] = np.array(a.var_names, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * a.n_vars, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * a.n_vars, dtype="S")


def test_readers_all_formats(tmp_path):
    import scipy.io

    a = toy_counts(12, 6, seed=3)
    a.var["gene_ids"] = [f"ENSG{i:011d}" for i in range(6)]
    dense = a.X.toarray()
    a.write_h5ad(tmp_path / "d.h5ad")
    df = pd.DataFrame(dense, index=a.obs_names, columns=a.var_names)
    df.to_csv(tmp_path / "d.csv")
    df.to_csv(tmp_path / "d.tsv", sep="\t")
    a.write_loom(tmp_path / "d.loom")
    write_10x_h5(tmp_path / "d.h5", a)
    # Cell Ranger v3 folder (gzipped, features.tsv) and v2 folder (genes.tsv, matrix.mtx)
    v3, v2 = tmp_path / "mtx_v3", tmp_path / "mtx_v2"
    v3.mkdir()
    v2.mkdir()
    counts = sp.coo_matrix(a.X.T.astype(np.int64))
    with gzip.open(v3 / "matrix.mtx.gz", "wb") as f:
        scipy.io.mmwrite(f, counts)
    scipy.io.mmwrite(v2 / "matrix.mtx", counts)
    features = pd.DataFrame({"id": a.var["gene_ids"], "name": a.var_names, "t": "Gene Expression"})
    features.to_csv(v3 / "features.tsv.gz", sep="\t", header=False, index=False)
    features.iloc[:, :2].to_csv(v2 / "genes.tsv", sep="\t", header=False, index=False)
    pd.Series(a.obs_names).to_csv(v3 / "barcodes.tsv.gz", header=False, index=False)
    pd.Series(a.obs_names).to_csv(v2 / "barcodes.tsv", header=False, index=False)
    for name in ("d.h5ad", "d.csv", "d.tsv", "d.loom", "d.h5", "mtx_v3", "mtx_v2", "mtx_v2/matrix.mtx"):
        r = du.read_dataset(tmp_path / name)
        assert r.shape == (12, 6), name
        assert list(r.var_names) == list(a.var_names), name
        X = r.X.toarray() if sp.issparse(r.X) else np.asarray(r.X)
        np.testing.assert_array_equal(X, dense, err_msg=name)
        assert du.detect_input_format(r) == "counts"
    # a table with a column of cell types beside the genes (a space-separated .txt.gz too): it becomes obs
    labelled = df.copy()
    labelled.insert(0, "cell_type", ["B" if i % 2 else "T" for i in range(12)])
    labelled.to_csv(tmp_path / "l.csv")
    labelled.to_csv(tmp_path / "l.txt.gz", sep=" ")
    for name in ("l.csv", "l.txt.gz"):
        r = du.read_dataset(tmp_path / name)
        assert r.shape == (12, 6) and list(r.var_names) == list(a.var_names), name
        np.testing.assert_array_equal(r.X.toarray(), dense, err_msg=name)
        assert list(du.read_labels(r, "cell_type")) == list(labelled["cell_type"]), name
    # a gene named twice keeps its name (the panel alignment sums it), an empty value is 0
    (tmp_path / "twice.csv").write_text("cell,ACTB,ACTB,CD3E,type\nc1,1,2,3,T\nc2,4,,6,B\n")
    r = du.read_dataset(tmp_path / "twice.csv")
    assert list(r.var_names) == ["ACTB", "ACTB", "CD3E"] and list(r.obs["type"]) == ["T", "B"]
    np.testing.assert_array_equal(r.X.toarray(), [[1, 2, 3], [4, 0, 6]])
    np.testing.assert_array_equal(du.align_to_panel(r, ["ACTB", "CD3E"], input_format="counts").X.toarray(),
                                  [[3, 3], [4, 6]])
    pd.DataFrame({"type": ["a", "b"]}, index=["c1", "c2"]).to_csv(tmp_path / "nogenes.csv")
    with pytest.raises(du.InputError, match="no numeric column"):
        du.read_dataset(tmp_path / "nogenes.csv")


def test_reader_errors(tmp_path):
    with pytest.raises(du.InputError, match="does not exist"):
        du.read_dataset(tmp_path / "nope.h5ad")
    (tmp_path / "x.xlsx").write_text("hello")
    with pytest.raises(du.InputError, match="unknown file type.*h5ad"):
        du.read_dataset(tmp_path / "x.xlsx")
    (tmp_path / "broken.h5ad").write_bytes(b"not an hdf5 file at all")
    with pytest.raises(du.InputError, match="broken.h5ad.*accepted formats"):
        du.read_dataset(tmp_path / "broken.h5ad")


def test_fingerprint_stable_and_sensitive():
    a = toy_counts(30, 10)
    fp = du.data_fingerprint(a)
    assert fp == du.data_fingerprint(a.copy())
    dense = a.copy()
    dense.X = a.X.toarray().astype(np.float64)
    assert du.data_fingerprint(dense) == fp
    changed = a.copy()
    changed.X.data[0] += 1  # the first cell is always among the sampled ones
    assert du.data_fingerprint(changed) != fp
    renamed = a.copy()
    renamed.obs_names = [f"x{i}" for i in range(30)]
    assert du.data_fingerprint(renamed) != fp


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------

def test_default_data_is_pbmc68k_log1p(default_data):
    a = default_data
    assert a.shape == (700, 765)
    assert a.obs["celltype"].nunique() == 10 and isinstance(a.obs["celltype"].iloc[0], str)
    assert du.detect_input_format(a) == "log1p"
    X = a.X.toarray().astype(np.float64)
    # not renormalised over the 765 genes: expm1 of a cell sums to ~2,000, not 10,000
    assert np.median(np.expm1(X).sum(1)) < 5000
    tokens = du.tokenize(a)
    ref = np.minimum(np.floor(np.log2(1 + np.expm1(X))), 5)
    agree = (tokens[:, :-1] == ref).mean()
    assert agree >= 0.99
    expressed = X > 0
    assert (tokens[:, :-1][expressed] == ref[expressed]).mean() >= 0.99
    assert du.data_fingerprint(a) == du.data_fingerprint(du.read_dataset(None))


def test_pbmc3k_tokens_match_hand_formula(pbmc3k):
    assert du.detect_input_format(pbmc3k) == "counts"
    tokens = du.tokenize(pbmc3k)
    X = pbmc3k.X.toarray().astype(np.float64)
    cp10k = X * 1e4 / X.sum(axis=1, keepdims=True)
    ref = np.minimum(np.floor(np.log2(1 + cp10k)), 5).astype(np.uint8)
    np.testing.assert_array_equal(tokens[:, :-1], ref)
    # aligned to an Ensembl panel (reordered, one missing gene): CP10k over the panel genes only
    panel = list(pbmc3k.var["gene_ids"][:3000][::-1]) + ["ENSG99999999999"]
    aligned = du.align_to_panel(pbmc3k, panel)
    sub = X[:, :3000][:, ::-1]
    tot = sub.sum(1, keepdims=True)
    ref = np.minimum(np.floor(np.log2(1 + sub * 1e4 / np.where(tot > 0, tot, 1))), 5)
    np.testing.assert_array_equal(du.tokenize(aligned)[:, :3000], ref)


# ----------------------------------------------------------------------------------------------
# Gene2Vec
# ----------------------------------------------------------------------------------------------

def test_load_gene2vec_formats(tmp_path):
    vectors = np.arange(12, dtype=np.float64).reshape(4, 3) + 1
    genes = ["CD3D", "MS4A1", "ENSG00000000005.2", "LYZ"]
    npy = du.save_gene2vec(tmp_path / "g2v", vectors, genes)
    assert npy.name == "g2v.npy" and (tmp_path / "g2v.txt").read_text().split() == genes
    panel = ["lyz", "NOTHERE", "CD3D", "ENSG00000000005"]
    table, n_found = du.load_gene2vec(npy, panel)
    assert table.dtype == np.float64 and table.shape == (5, 3) and n_found == 3
    np.testing.assert_array_equal(table, [vectors[3], [0, 0, 0], vectors[0], vectors[2], [0, 0, 0]])
    text = "\n".join(f"{g}\t{' '.join(map(str, v))}" for g, v in zip(genes, vectors))
    (tmp_path / "w2v.txt").write_text(text + "\n")
    (tmp_path / "w2v_header.txt").write_text("4 3\n" + text.replace("\t", " ") + "\n")
    for name in ("w2v.txt", "w2v_header.txt"):
        t, n = du.load_gene2vec(tmp_path / name, panel)
        np.testing.assert_array_equal(t, table)
        assert n == 3
    with pytest.raises(du.InputError, match="none of the"):
        du.load_gene2vec(npy, ["A", "B"])
    # scBERT's own layout: a bare .npy already in panel order
    bare = tmp_path / "bare" / "gene2vec_4.npy"
    bare.parent.mkdir()
    np.save(bare, vectors)
    t, n = du.load_gene2vec(bare, genes)
    assert n == 4 and np.array_equal(t[:-1], vectors) and not t[-1].any()
    with pytest.raises(du.InputError, match="no gene list"):
        du.load_gene2vec(bare, genes + ["EXTRA", "MORE"])


def test_train_gene2vec_reproducible(default_data):
    sub = default_data[:, :150].copy()
    v1, g1 = du.train_gene2vec(sub, dim=16, seed=5)
    v2, _ = du.train_gene2vec(sub, dim=16, seed=5)
    assert v1.shape == (150, 16) and v1.dtype == np.float32 and g1 == list(sub.var_names)
    np.testing.assert_array_equal(v1, v2)
    assert (np.linalg.norm(v1, axis=1) > 0).all()  # genes without a pair still get a vector


def test_gene2vec_markers_cluster(pbmc3k):
    import scanpy as sc

    markers = {"B": ["MS4A1", "CD79A", "CD79B"], "Mono": ["CD14", "LYZ", "S100A8"]}
    norm = pbmc3k.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=800)
    keep = norm.var["highly_variable"].to_numpy() | pbmc3k.var_names.isin(sum(markers.values(), []))
    vectors, genes = du.train_gene2vec(pbmc3k[:, keep].copy(), dim=64, seed=2021)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    pos = {g: i for i, g in enumerate(genes)}
    within = [unit[pos[a]] @ unit[pos[b]] for m in markers.values() for i, a in enumerate(m) for b in m[i + 1:]]
    cross = [unit[pos[a]] @ unit[pos[b]] for a in markers["B"] for b in markers["Mono"]]
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(genes), (2, 2000))
    random_pairs = (unit[i] * unit[j]).sum(1)[i != j]
    assert np.mean(within) > np.mean(random_pairs) + 0.3
    assert np.mean(within) > np.mean(cross) + 0.3
