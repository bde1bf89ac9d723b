"""What makes the model fast on a GPU, checked on the CPU: no host reads (each would stall a GPU
stream), the CUDA plan run on CPU tensors against the reference, the published shape at batch 64
under the CUDA plan on meta tensors, and frozen weights' gradients left uncomputed."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import execution
from kernels import favor as engine_favor
from kernels import plan as engine_plan
from model import PerformerLM, get_config

# operators that copy a tensor's data to the host (or decide on it there)
HOST_READ_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::equal",
                 "aten::is_nonzero", "aten::masked_select", "aten::item"}


class HostReads(TorchDispatchMode):
    """Records host reads and (optionally) the operators run, on the threads that enter it."""

    def __init__(self, record_ops: bool = False):
        super().__init__()
        self.reads: list[str] = []
        self.ops: list[str] = []
        self.record_ops = record_ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_READ_OPS or name.startswith("aten::unique") or name.startswith("aten::_unique"):
            self.reads.append(name)
        if self.record_ops:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_host_reads(monkeypatch):
    """A HostReads mode that also sees the engine's worker threads, and counts Tensor.tolist/numpy/item."""
    mode = HostReads()
    run_groups = engine_favor.run_groups

    def in_every_thread(fn, plan):
        def counted(group):
            with mode:
                return fn(group)

        return run_groups(counted, plan)

    monkeypatch.setattr(engine_favor, "run_groups", in_every_thread)
    for method in ("tolist", "numpy", "item"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, original=original, method=method, **kwargs):
            mode.reads.append(f"Tensor.{method}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    return mode


def random_model(config, seed=0):
    torch.manual_seed(seed)
    table = torch.randn(config.seq_len, config.dim, dtype=torch.float64) if config.pos_embed == "gene2vec" else None
    net = PerformerLM(config, pos_table=table)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("pos_embed", ["gene2vec", "none"])
@pytest.mark.parametrize("path", ["fused", "modules"])
def test_no_host_reads_in_training_or_inference(count_host_reads, monkeypatch, pos_embed, path):
    config = get_config("tiny", gene_num=120, pos_embed=pos_embed, feature_redraw_interval=1)
    net = random_model(config).train()
    tokens = torch.zeros(4, config.seq_len, dtype=torch.long)
    tokens[:, :30] = torch.randint(1, 6, (4, 30), generator=torch.Generator().manual_seed(1))
    tokens[1] = 0  # a cell with every position alike: without positions its key maximum is tied
    fused_calls = []
    fused_layer = kernels.fused_layer
    monkeypatch.setattr(kernels, "fused_layer", lambda *a: fused_calls.append(1) or fused_layer(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with execution(path=path, threads=2, chunk=32), torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):  # the second call redraws the features
                with count_host_reads:
                    loss = net(tokens).float().square().mean()
                    loss.backward()
            net.eval()
            with count_host_reads, torch.inference_mode():
                net(tokens)
    finally:
        torch.set_num_threads(before)
    assert count_host_reads.reads == []
    assert len(fused_calls) == (4 * config.depth if path == "fused" else 0)  # the engine is what ran
    assert net.performer.redraw_count == 1 and int(net.performer.calls_since_last_redraw) == 1


def test_the_cuda_plan_on_cpu_tensors_equals_the_reference():
    """One thread, few chunks (here several, from a small memory budget), the GPU's keep rule."""
    config = get_config("tiny", gene_num=90, feature_redraw_interval=0)
    net = random_model(config, seed=3).double().train()
    tokens = torch.randint(0, 6, (3, config.seq_len), generator=torch.Generator().manual_seed(4))
    plans = []
    make_plan = engine_plan.make_plan

    def recorded(*args):
        plans.append(make_plan(*args))
        return plans[-1]

    results = []
    for settings in ({"plan_device": "cuda", "memory_budget": 200_000}, {"path": "reference"}):
        net.zero_grad()
        with execution(**settings), pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine_plan, "make_plan", recorded)
            out = net(tokens)
        (out.square().sum() + out[..., 1].exp().sum()).backward()
        results.append((out.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}))
    assert plans and all(p.device_type == "cuda" and p.workers == 1 and len(p.chunks) > 1 for p in plans)
    (cuda_out, cuda_grads), (ref_out, ref_grads) = results
    assert (cuda_out - ref_out).abs().max().item() < 1e-10
    assert cuda_grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert (cuda_grads[name] - ref).abs().max().item() <= 1e-9 * (ref.abs().max().item() + 1e-30), name


def test_the_published_shape_at_batch_64_under_the_cuda_plan_on_meta_tensors(monkeypatch):
    """Shapes and plans of a pretraining step at the published size, without memory or a GPU: any
    host read or data-dependent shape would fail on meta tensors."""
    with torch.device("meta"):
        net = PerformerLM(get_config("scbert")).train()
    tokens = torch.zeros(64, net.config.seq_len, dtype=torch.long, device="meta")
    plans = []
    make_plan = engine_plan.make_plan
    monkeypatch.setattr(engine_plan, "make_plan", lambda *args: plans.append(make_plan(*args)) or plans[-1])
    with execution(plan_device="cuda", compile="off"):
        logits = net(tokens)
        logits.float().logsumexp(-1).mean().backward()
    assert logits.shape == (64, 16907, 7) and net.token_emb.weight.grad.shape == (7, 200)
    assert len(plans) == net.config.depth
    for plan in plans:  # 80 GiB assumed free: a few large chunks, activations recomputed
        assert plan.device_type == "cuda" and plan.workers == 1 and 1 < len(plan.chunks) <= 8 and not plan.keep


def test_frozen_weights_get_no_gradient_work_in_the_fused_backward():
    """Published fine-tuning trains one layer; the layer above it only passes gradients down."""
    config = get_config("tiny", gene_num=60, feature_redraw_interval=0)
    net = random_model(config, seed=5).train()
    layer = net.performer.net.layers[1]
    x = torch.randn(2, config.seq_len, config.dim, requires_grad=True)
    matmuls = {}
    for frozen in (False, True):
        for p in layer.parameters():
            p.requires_grad_(not frozen)
            p.grad = None
        mode = HostReads(record_ops=True)
        y = kernels.fused_layer(x, layer.engine_weights())
        with mode:
            y.square().sum().backward()
        matmuls[frozen] = sum(op in ("aten::mm", "aten::bmm") for op in mode.ops)
        assert all((p.grad is None) == frozen for p in layer.parameters())
    chunks = len(engine_plan.split_sequence(config.seq_len, engine_plan.DEFAULT_CHUNK, 2))
    assert matmuls[True] == matmuls[False] - 5 * chunks  # w2, w1, to_out, to_q and (k, v) per chunk


def test_the_redraw_counter_lives_in_python_and_survives_a_checkpoint(tmp_path):
    """Forwards count without reading the buffer; a loaded model continues the published count."""
    import train_utils

    config = get_config("tiny", gene_num=20, feature_redraw_interval=5)
    net = random_model(config, seed=6).train()
    tokens = torch.randint(0, 6, (1, config.seq_len))
    for _ in range(3):
        net(tokens)
    assert net.performer.calls == 3 and int(net.performer.calls_since_last_redraw) == 3
    path = tmp_path / "pretrain.pth"
    train_utils.save_checkpoint(path, {"epoch": 1, **train_utils.model_checkpoint_fields(net)})
    loaded, _ = train_utils.load_checkpoint(path)
    assert loaded.performer.calls == 3
    loaded.train()
    projections = [m.projection_matrix.clone() for m in loaded.modules() if hasattr(m, "projection_matrix")]
    for _ in range(2):  # calls 4 and 5 count up to the interval; the 6th redraws
        loaded(tokens)
    assert loaded.performer.redraw_count == 0
    loaded(tokens)
    assert loaded.performer.redraw_count == 1 and int(loaded.performer.calls_since_last_redraw) == 0
    after = [m.projection_matrix for m in loaded.modules() if hasattr(m, "projection_matrix")]
    assert all(not torch.equal(a, b) for a, b in zip(projections, after))
