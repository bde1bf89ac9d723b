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


# --------------------------------------------------------------------------------------------------
# the scripts on a GPU node: device, precision, masking, checkpoints, errors


def test_each_process_gets_its_device():
    import train_utils
    from data_utils import InputError

    choose = train_utils.choose_device
    assert choose("auto", 0, 1, 0) == torch.device("cpu") and choose("cpu", 3, 4, 8) == torch.device("cpu")
    assert choose("auto", 3, 4, 8) == torch.device("cuda", 3) and choose("cuda", 3, 4, 1) == torch.device("cuda", 0)
    assert choose("auto", 5, 8, 4) == torch.device("cuda", 1)  # LOCAL_RANK modulo the visible GPUs
    assert choose("cuda:1", 0, 1, 2) == torch.device("cuda", 1)  # honoured, not GPU 0
    for requested, world, gpus, words in (("cuda:2", 1, 2, "2 GPU"), ("cuda:0", 2, 2, "one GPU"),
                                          ("cuda", 1, 0, "no CUDA GPU"), ("gpu", 1, 1, "not understood")):
        with pytest.raises(InputError, match=words):
            choose(requested, 0, world, gpus)


def test_amp_auto_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    import train_utils

    # a V100 or T4: bf16 only emulated, which is_bf16_supported() counts unless told not to
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert train_utils.resolve_amp("auto", torch.device("cuda")) == "none"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # sm80+
    assert train_utils.resolve_amp("auto", torch.device("cuda")) == "bf16"


def test_cuda_generators_are_restored_only_on_as_many_gpus(monkeypatch, caplog):
    import train_utils

    state = train_utils.rng_state()
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    for gpus, saved in ((2, 2), (1, 2)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
        train_utils.set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * saved})
    assert len(restored) == 1 and "come from 2 GPU(s), this node has 1" in caplog.text


def test_a_device_out_of_memory_is_one_line_with_what_to_change(capsys):
    import argparse

    import train_utils

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_acc", type=int, default=1)
    parser.add_argument("--grad_checkpoint", action="store_true")

    def main(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")

    with pytest.raises(SystemExit) as exit_info:
        train_utils.run_main(main, parser, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: the device ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "lower --batch_size (now 8) or add --grad_checkpoint" in err[0]


def test_checkpoints_hold_cpu_copies(tmp_path, monkeypatch):
    """A checkpoint written on a GPU must load anywhere: every tensor in it is copied to the CPU."""
    import train_utils

    net = random_model(get_config("tiny", gene_num=20))
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.zeros(1, 21, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = {"epoch": 1, **train_utils.model_checkpoint_fields(net), "optimizer_state_dict": optimizer.state_dict(),
             "rng_state": train_utils.rng_state()}
    copied = []
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: copied.append(self.shape) or cpu(self, *a, **k))
    train_utils.save_checkpoint(tmp_path / "ckpt.pth", state)
    tensors = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, dict):
            [walk(v) for v in obj.values()]
        elif isinstance(obj, (list, tuple)):
            [walk(v) for v in obj]

    walk(state)
    assert len(copied) == len(tensors) > len(net.state_dict())  # model, optimiser moments and RNG states


def test_masking_and_the_pretraining_step_read_nothing_back(count_host_reads):
    import pretrain
    import utils

    config = get_config("tiny", gene_num=200, feature_redraw_interval=0)
    net = random_model(config).train()
    tokens = torch.zeros(4, config.seq_len, dtype=torch.uint8)
    tokens[:, :60] = torch.randint(0, 6, (4, 60), generator=torch.Generator().manual_seed(2))
    masking = pretrain.Masking(0.15, 0.8, 0.1, config.bin_num)
    precision = utils.Precision("bf16", torch.device("cpu"))
    with count_host_reads:
        loss, stats, counts = pretrain.masked_step(net, {"tokens": tokens}, masking, torch.Generator().manual_seed(3),
                                                   torch.device("cpu"), precision)
        loss.backward()
    assert count_host_reads.reads == []
    masked_positions = int(stats[2])
    assert masked_positions == int(counts.sum()) == sum(-(-int((t[:-1] > 0).sum()) * 15 // 100) for t in tokens)


def test_gene_importance_runs_in_the_annotations_precision():
    import report_utils

    config = get_config("tiny", gene_num=30)
    net = random_model(config).attach_classifier(2).eval()
    dtypes = []
    net.to_out.fc3.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    dataset = [{"tokens": torch.randint(0, 6, (config.seq_len,))} for _ in range(4)]
    genes = [f"G{i}" for i in range(30)]
    report_utils.gene_importance(net, dataset, ["a", "b", "a", "b"], ["a", "b"], genes, torch.device("cpu"), top_n=3,
                                 autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_the_triton_kernels_are_chosen_only_on_a_gpu_that_runs_them(monkeypatch):
    """Dispatch: FAVOR+ goes to the Triton kernels where they run, and a layer then runs as the
    model's modules around them; never on a CPU (the interpreter is for the kernels' own tests)."""
    from kernels import triton_favor

    cuda = torch.device("cuda")
    monkeypatch.setattr(triton_favor, "available", lambda device, dtype: device.type == "cuda")
    assert kernels.triton_runs(cuda, torch.bfloat16) and not kernels.triton_runs(torch.device("cpu"), torch.float32)
    with execution(triton="off"):
        assert not kernels.triton_runs(cuda, torch.bfloat16)

    config = get_config("tiny", gene_num=40, feature_redraw_interval=0)
    net = random_model(config, seed=9).train()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(9))
    expected = net(tokens)
    calls = []
    monkeypatch.setattr(kernels, "triton_runs", lambda device, dtype: True)  # as on an H100
    monkeypatch.setattr(triton_favor, "favor_attention", lambda *args: calls.append(1) or engine_favor.favor_attention(
        *args, engine_plan.make_plan(kernels.get_execution(), "cpu", args[0].shape[0], args[0].shape[1],
                                     args[0].shape[2], args[3].shape[0], args[0].dtype)))
    fused = []
    fused_layer = kernels.fused_layer
    monkeypatch.setattr(kernels, "fused_layer", lambda *a: fused.append(1) or fused_layer(*a))
    got = net(tokens)
    assert len(calls) == config.depth and fused == []  # the modules around the kernels, no fused layer
    assert (got - expected).abs().max().item() < 1e-5
