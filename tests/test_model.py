"""model.py against the published layout and simple references: exact softmax attention, the plain
FAVOR+ path, and the independent performer-pytorch 1.0.6 (skipped when it is not installed)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import train_utils
from kernels import execution, favor_attention
from model import (
    FastAttention,
    ModelConfig,
    PerformerLM,
    favor_attention_reference,
    get_config,
    infer_config,
    orthogonal_gaussian_matrix,
)

PATHS = {"fast": "fused", "reference": "reference"}  # the attention implementations as execution paths

# REFERENCE.md §5: the 91 entries of the published pretraining model (i = layer)
LAYER_KEYS = {
    "performer.net.layers.{i}.0.norm.weight": (200,),
    "performer.net.layers.{i}.0.norm.bias": (200,),
    "performer.net.layers.{i}.0.fn.fast_attention.projection_matrix": (266, 64),
    "performer.net.layers.{i}.0.fn.to_q.weight": (640, 200),
    "performer.net.layers.{i}.0.fn.to_k.weight": (640, 200),
    "performer.net.layers.{i}.0.fn.to_v.weight": (640, 200),
    "performer.net.layers.{i}.0.fn.to_out.weight": (200, 640),
    "performer.net.layers.{i}.0.fn.to_out.bias": (200,),
    "performer.net.layers.{i}.1.norm.weight": (200,),
    "performer.net.layers.{i}.1.norm.bias": (200,),
    "performer.net.layers.{i}.1.fn.fn.w1.weight": (800, 200),
    "performer.net.layers.{i}.1.fn.fn.w1.bias": (800,),
    "performer.net.layers.{i}.1.fn.fn.w2.weight": (200, 800),
    "performer.net.layers.{i}.1.fn.fn.w2.bias": (200,),
}
PUBLISHED_MLM = {
    "token_emb.weight": (7, 200),
    "pos_emb.emb.weight": (16907, 200),
    "performer.calls_since_last_redraw": (),
    **{k.format(i=i): v for i in range(6) for k, v in LAYER_KEYS.items()},
    "norm.weight": (200,),
    "norm.bias": (200,),
    "to_out.weight": (7, 200),
    "to_out.bias": (7,),
}
CLASSIFIER_HEAD = {
    "to_out.conv1.weight": (1, 1, 1, 200),
    "to_out.conv1.bias": (1,),
    "to_out.fc1.weight": (512, 16907),
    "to_out.fc1.bias": (512,),
    "to_out.fc2.weight": (128, 512),
    "to_out.fc2.bias": (128,),
    "to_out.fc3.weight": (11, 128),
    "to_out.fc3.bias": (11,),
}


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_published_shape_state_dict_matches_reference_both_heads():
    model = PerformerLM(get_config("scbert"))
    assert len(PUBLISHED_MLM) == 91
    assert shapes(model) == PUBLISHED_MLM
    state = model.state_dict()
    assert state["pos_emb.emb.weight"].dtype == torch.float64
    assert state["performer.calls_since_last_redraw"].dtype == torch.int64
    assert not model.pos_emb.emb.weight.requires_grad
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (total, frozen) == (8_388_607, 3_381_400)

    model.attach_classifier(11)
    expected = {k: v for k, v in PUBLISHED_MLM.items() if not k.startswith("to_out.")} | CLASSIFIER_HEAD
    assert len(expected) == 97
    assert shapes(model) == expected


def test_infer_config_reads_architecture_off_shapes():
    config = ModelConfig(gene_num=50, dim=24, depth=3, heads=3, dim_head=8, nb_features=20, ff_mult=2,
                         residual="rezero", pos_embed="learned", bin_num=7)
    model = PerformerLM(config).attach_classifier(5)
    inferred, head, n_classes = infer_config(model.state_dict())
    assert (head, n_classes) == ("classifier", 5)
    assert inferred == config


# --------------------------------------------------------------------------------------------------
# the independent reference: performer-pytorch 1.0.6, the code the published model ran on


class OriginalClassifierHead(nn.Module):
    """The published fine-tuning head, written from REFERENCE.md §4 with the Conv2d as published."""

    def __init__(self, seq_len: int, dim: int, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.fc1 = nn.Linear(seq_len, 512)
        self.fc2 = nn.Linear(512, 128)
        self.fc3 = nn.Linear(128, n_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x[:, None, :, :])).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def original_model(config: ModelConfig, table: torch.Tensor):
    pp = pytest.importorskip("performer_pytorch")
    torch.manual_seed(0)
    ref = pp.PerformerLM(num_tokens=config.num_tokens, max_seq_len=config.seq_len, dim=config.dim,
                         depth=config.depth, heads=config.heads, dim_head=config.dim_head,
                         nb_features=config.nb_features, rotary_position_emb=False, axial_position_emb=False)
    ref.pos_emb.emb = nn.Embedding.from_pretrained(table)  # float64 and frozen, as scBERT builds it
    with torch.no_grad():  # LayerNorms start at identity: make them non-trivial so they are tested
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


@pytest.mark.parametrize("head", ["mlm", "classifier"])
def test_published_layout_loads_without_config_and_matches_reference(tmp_path, head):
    config = ModelConfig(gene_num=149, dim=32, depth=2, heads=4, dim_head=16, nb_features=44)
    table = torch.randn(config.seq_len, config.dim, dtype=torch.float64)
    table[-1] = 0
    ref = original_model(config, table)
    if head == "classifier":
        ref.to_out = OriginalClassifierHead(config.seq_len, config.dim, 6)
    path = tmp_path / "original.pth"
    torch.save({"epoch": 3, "model_state_dict": ref.state_dict(), "optimizer_state_dict": {},
                "scheduler_state_dict": {}, "losses": 0.5}, path)

    model, ckpt = train_utils.load_checkpoint(path)
    assert ckpt["epoch"] == 3 and model.head_kind == head
    assert model.pos_emb.emb.weight.dtype == torch.float64
    tokens = torch.randint(0, config.bin_num + 1, (3, config.seq_len))
    tokens[:, -1] = 0
    for impl in ("fast", "reference"):
        with torch.no_grad(), execution(path=PATHS[impl]):
            for cell in tokens:  # batch size 1: where the published batch-wide key maximum is exact
                expected = ref(cell[None])
                got = model(cell[None])
                assert got.shape == expected.shape
                assert (got - expected).abs().max().item() <= 1e-5, impl

    # and ours load in the original: the same state dict, strictly
    ref.load_state_dict(model.state_dict(), strict=True)


def test_cell_output_does_not_depend_on_its_batch():
    torch.manual_seed(1)
    config = get_config("tiny", gene_num=200)
    model = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64)).eval()
    tokens = torch.randint(0, 6, (5, config.seq_len))
    tokens[0, :] = 5  # a cell with much larger keys than its neighbours moves a batch-wide maximum
    for impl in ("fast", "reference"):
        with torch.no_grad(), execution(path=PATHS[impl], chunk=64):
            together = model(tokens)
            for i in range(len(tokens)):
                alone = model(tokens[i : i + 1])
                assert (alone[0] - together[i]).abs().max().item() <= 1e-5


def test_fast_path_equals_reference_values_and_gradients():
    torch.manual_seed(2)
    b, n, h, d, m = 2, 333, 3, 16, 40
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    proj = orthogonal_gaussian_matrix(m, d).double()
    ref = favor_attention_reference(q, k, v, proj)
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for chunk in (1000, 50, 7):
        with execution(chunk=chunk):
            fast = favor_attention(q, k, v, proj)
            assert (fast - ref).abs().max().item() < 1e-10
            grads = torch.autograd.grad(fast.square().sum(), (q, k, v))
        for g, gr in zip(grads, grads_ref):
            assert (g - gr).abs().max().item() < 1e-8


def test_fast_model_equals_reference_model_fp32():
    torch.manual_seed(3)
    config = get_config("small", gene_num=1500)
    fast = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64)).eval()
    reference = PerformerLM(get_config("small", gene_num=1500)).eval()
    reference.load_state_dict(fast.state_dict())
    tokens = torch.randint(0, 6, (2, config.seq_len))
    with torch.no_grad():
        with execution(chunk=256):
            fast_out = fast(tokens)
        with execution(path="reference"):
            assert (fast_out - reference(tokens)).abs().max().item() <= 1e-4


def exact_softmax_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def test_favor_approximates_softmax_attention_better_with_more_features():
    torch.manual_seed(4)
    b, n, h, d = 1, 256, 2, 16
    q, k, v = (0.5 * torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    exact = exact_softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    errors = []
    for m in (8, 64, 512):
        trials = []
        for seed in range(6):
            proj = orthogonal_gaussian_matrix(m, d, torch.Generator().manual_seed(seed)).double()
            approx = favor_attention_reference(q, k, v, proj)
            trials.append(((approx - exact).norm() / exact.norm()).item())
        errors.append(sum(trials) / len(trials))
    # Monte-Carlo error falls like m^-1/2: 64x the features should cut it well over 4-fold
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 4


def test_random_features_are_orthogonal_blocks_with_gaussian_norms():
    w = orthogonal_gaussian_matrix(40, 16, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.t(), torch.eye(16), atol=1e-5)
    assert 2.5 < w.norm(dim=1).mean().item() < 5.5  # norms of 16-d Gaussians: about 4


def projections(model):
    return [m.projection_matrix.clone() for m in model.modules() if isinstance(m, FastAttention)]


def test_feature_redraw_follows_published_counter_and_never_in_eval():
    torch.manual_seed(5)
    config = get_config("tiny", gene_num=30, feature_redraw_interval=3)
    model = PerformerLM(config)
    tokens = torch.randint(0, 6, (1, config.seq_len))
    start = projections(model)
    model.eval()
    for _ in range(10):
        model(tokens)
    assert int(model.performer.calls_since_last_redraw) == 0
    assert all(torch.equal(a, b) for a, b in zip(start, projections(model)))
    model.train()
    for _ in range(3):  # calls 1..3 count up to the interval
        model(tokens)
        assert all(torch.equal(a, b) for a, b in zip(start, projections(model)))
    assert int(model.performer.calls_since_last_redraw) == 3
    model(tokens)  # the 4th (interval + 1) training call redraws and resets without counting
    after = projections(model)
    assert int(model.performer.calls_since_last_redraw) == 0
    assert all(not torch.equal(a, b) for a, b in zip(start, after))
    assert not torch.equal(after[0], after[1])  # layers get different matrices


def test_ranks_with_different_global_rng_draw_the_same_matrices():
    config = get_config("tiny", gene_num=30, feature_redraw_interval=1)
    models = []
    for rank in range(2):
        torch.manual_seed(0)
        model = PerformerLM(config).train()
        model.set_redraw_seed(2021)
        torch.manual_seed(100 + rank)  # per-rank seeds differ, as in training
        tokens = torch.randint(0, 6, (1, config.seq_len))
        for _ in range(4):
            model(tokens)
        models.append(model)
    assert models[0].performer.redraw_count == 2
    assert all(torch.equal(a, b) for a, b in zip(projections(models[0]), projections(models[1])))


@pytest.mark.parametrize("head", ["mlm", "classifier"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, head):
    torch.manual_seed(6)
    config = get_config("tiny", gene_num=80, residual="rezero" if head == "mlm" else "prenorm")
    model = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64))
    if head == "classifier":
        model.attach_classifier(4)
    model.set_redraw_seed(9)
    path = tmp_path / "ckpt.pth"
    train_utils.save_checkpoint(path, {"epoch": 1, "losses": 0.1, **train_utils.model_checkpoint_fields(model)})
    loaded, ckpt = train_utils.load_checkpoint(path)
    assert not loaded.training and loaded.performer.redraw_seed == 9
    assert loaded.config == config
    tokens = torch.randint(0, 6, (3, config.seq_len))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(7)
    config = get_config("tiny", gene_num=60, feature_redraw_interval=0)
    plain = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64)).train()
    ckpt = PerformerLM(get_config("tiny", gene_num=60, feature_redraw_interval=0)).train()
    ckpt.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 6, (2, config.seq_len))
    for m, grad_checkpoint in ((plain, False), (ckpt, True)):
        with execution(grad_checkpoint=grad_checkpoint):
            m(tokens).logsumexp(-1).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_corrupt_truncated_and_foreign_checkpoints_raise_one_clear_error(tmp_path):
    from data_utils import InputError

    model = PerformerLM(get_config("tiny", gene_num=20))
    good = tmp_path / "good.pth"
    train_utils.save_checkpoint(good, {"epoch": 0, **train_utils.model_checkpoint_fields(model)})
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model_state_dict": {"encoder.weight": torch.zeros(2)}}, foreign)
    for path, words in ((tmp_path / "missing.pth", "does not exist"), (truncated, "not a readable"),
                        (text, "not a readable"), (foreign, "unknown layout")):
        with pytest.raises(InputError, match=words) as info:
            train_utils.load_checkpoint(path)
        assert str(path) in str(info.value)
