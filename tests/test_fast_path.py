"""The fast path (kernels/: chunked FAVOR+ with hand-written gradients, the fused layer) against the
plain module path and autograd: float64 values and gradients, gradcheck, chunkings that do not divide
the sequence, batch independence, frozen layers, and bf16 predictions against float32 on real cells."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import kernels
from kernels import execution, favor_attention
from kernels import layer as engine_layer
from kernels import plan as engine_plan
from kernels.plan import make_plan, split_sequence
from model import PerformerLM, favor_attention_reference, get_config, orthogonal_gaussian_matrix


def module_path():
    """Routes every layer through the plain modules (prenorm wrappers, autograd) instead of the
    fused layer."""
    return execution(path="modules")


def random_model(config, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64)).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so their gradients are tested too
        for name, p in net.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


def loss_and_grads(net, tokens):
    net.zero_grad()
    out = net(tokens)
    (out.square().sum() + out[..., 2].exp().sum()).backward()
    return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.fixture(params=["kept", "recomputed"])
def backward_path(request):
    """Both backwards of the fused layer: short training inputs keep q, k, v and the hidden layer for
    it, long ones recompute them."""
    with execution(keep_bytes=10**12 if request.param == "kept" else 0):
        yield request.param


@pytest.mark.parametrize("gene_num, chunk, batch", [(49, 16, 2), (32, 7, 1), (40, 1000, 3)])
def test_fused_layer_equals_module_path_values_and_gradients(backward_path, gene_num, chunk, batch):
    config = get_config("tiny", gene_num=gene_num, feature_redraw_interval=0)
    net = random_model(config).train()
    tokens = torch.randint(0, 6, (batch, config.seq_len), generator=torch.Generator().manual_seed(1))
    assert all(layer.fusable() for layer in net.performer.net.layers)
    with execution(chunk=chunk):
        fused_out, fused = loss_and_grads(net, tokens)
        with module_path():
            plain_out, plain = loss_and_grads(net, tokens)
    assert (fused_out - plain_out).abs().max().item() < 1e-12
    assert fused.keys() == plain.keys() and "pos_emb.emb.weight" not in fused
    for name in plain:
        scale = plain[name].abs().max().item() + 1e-30
        assert (fused[name] - plain[name]).abs().max().item() / scale < 1e-10, name


def test_training_inputs_keep_q_k_v_and_the_hidden_layer_up_to_the_byte_budget(monkeypatch):
    config = get_config("tiny", gene_num=49, feature_redraw_interval=0)
    net = random_model(config).train()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(3))
    width = 3 * config.heads * config.dim_head + config.ff_mult * config.dim  # q, k, v, hidden layer
    needed = 2 * config.seq_len * width * 8  # float64
    passed = []
    for name, count in (("_layer_queries_grad_step", 9), ("_layer_keys_grad_step", 7)):  # required arguments
        step = getattr(engine_layer, name)
        spy = lambda *args, step=step, count=count: passed.append(len(args) - count) or step(*args)  # noqa: E731
        monkeypatch.setattr(engine_layer, name, spy)
    for budget, kept in ((needed, [2, 1]), (needed - 1, [0, 0])):
        passed.clear()
        with execution(chunk=16, keep_bytes=budget):
            loss_and_grads(net, tokens)
        chunks = len(split_sequence(config.seq_len, 16, 2))
        assert passed == ([kept[0]] * chunks + [kept[1]] * chunks) * config.depth, budget


@pytest.fixture
def two_threads():
    """The tests run with one OpenMP thread (conftest); here torch has two, and the fast path spreads
    its chunks over two worker threads whatever the input's length."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with execution(threads=2):
        yield
    torch.set_num_threads(before)


def test_chunks_spread_over_threads_give_the_same_values_and_gradients(two_threads, backward_path):
    config = get_config("tiny", gene_num=90, feature_redraw_interval=0)
    net = random_model(config, seed=9).train()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(10))
    with execution(chunk=8):
        threaded_out, threaded = loss_and_grads(net, tokens)
        again_out, again = loss_and_grads(net, tokens)  # fixed shares per thread: bitwise reproducible
        assert torch.equal(again_out, threaded_out) and all(torch.equal(again[k], threaded[k]) for k in threaded)
        with torch.inference_mode():
            assert torch.allclose(net.eval()(tokens), threaded_out, rtol=0, atol=1e-12)
        net.train()
        with module_path():
            plain_out, plain = loss_and_grads(net, tokens)
    assert (threaded_out - plain_out).abs().max().item() < 1e-12
    for name in plain:
        assert torch.allclose(threaded[name], plain[name], rtol=1e-10, atol=1e-13), name

    q, k, v = (torch.randn(2, 50, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    proj = orthogonal_gaussian_matrix(6, 4).double()
    ref = favor_attention_reference(q, k, v, proj)
    with execution(chunk=6):
        fast = favor_attention(q, k, v, proj)
    assert (fast - ref).abs().max().item() < 1e-12
    for g, gr in zip(torch.autograd.grad(fast.square().sum(), (q, k, v)),
                     torch.autograd.grad(ref.square().sum(), (q, k, v))):
        assert (g - gr).abs().max().item() < 1e-10


def test_ties_in_the_key_maximum_share_its_gradient():
    """Identical positions give identical keys: the key maximum is attained several times and its
    gradient is split between them as torch.amax splits it."""
    config = get_config("tiny", gene_num=30, feature_redraw_interval=0, pos_embed="none")
    net = random_model(config).train()
    tokens = torch.full((1, config.seq_len), 5)  # every position the same token, no positional signal
    with execution(chunk=8):
        _, fused = loss_and_grads(net, tokens)
        with module_path():
            _, plain = loss_and_grads(net, tokens)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-9, atol=1e-12), name

    q, k, v = (torch.randn(1, 20, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with torch.no_grad():
        k[:, 10:] = k[:, :10]
    proj = orthogonal_gaussian_matrix(6, 4).double()
    grads_ref = torch.autograd.grad(favor_attention_reference(q, k, v, proj).sum(), (q, k, v))
    with execution(chunk=7):
        grads = torch.autograd.grad(favor_attention(q, k, v, proj).sum(), (q, k, v))
    for g, gr in zip(grads, grads_ref):
        assert torch.allclose(g, gr, rtol=1e-9, atol=1e-12)


def test_gradcheck_fast_attention_and_fused_layer():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 9, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    proj = orthogonal_gaussian_matrix(6, 4).double()
    with execution(chunk=4):
        assert torch.autograd.gradcheck(lambda q, k, v: favor_attention(q, k, v, proj), (q, k, v), fast_mode=True)

    config = get_config("tiny", gene_num=6, dim=8, heads=2, dim_head=4, nb_features=6)
    net = random_model(config, seed=3)
    layer = net.performer.net.layers[0]
    attn, ff = layer
    x = torch.randn(1, config.seq_len, config.dim, dtype=torch.float64, requires_grad=True)
    weights = [attn.fn.to_k.weight, ff.fn.fn.w1.bias, attn.norm.weight]
    with execution(chunk=3):
        assert torch.autograd.gradcheck(lambda x, *w: kernels.fused_layer(x, layer.engine_weights()), (x, *weights),
                                        fast_mode=True)


def test_a_cells_gradient_does_not_depend_on_its_batch():
    config = get_config("tiny", gene_num=50, feature_redraw_interval=0)
    net = random_model(config, seed=4).train()
    tokens = torch.randint(0, 6, (3, config.seq_len), generator=torch.Generator().manual_seed(5))
    tokens[0] = 5  # much larger keys than its neighbours: a batch-wide maximum would move
    with execution(chunk=16):
        _, together = loss_and_grads(net, tokens)
        alone = [loss_and_grads(net, tokens[i : i + 1])[1] for i in range(3)]
    for name, g in together.items():
        assert torch.allclose(g, sum(a[name] for a in alone), rtol=1e-9, atol=1e-12), name


def test_frozen_layers_build_no_graph_and_trainable_layers_get_module_path_gradients():
    """Published fine-tuning: only one encoder layer (and the head) trains."""
    config = get_config("tiny", gene_num=40, feature_redraw_interval=0)
    net = random_model(config, seed=6).train()
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.performer.net.layers[0].parameters():
        p.requires_grad_(True)
    tokens = torch.randint(0, 6, (2, config.seq_len))
    with execution(chunk=16):
        _, fused = loss_and_grads(net, tokens)
        assert set(fused) == {k for k, p in net.named_parameters() if p.requires_grad}
        with module_path():
            _, plain = loss_and_grads(net, tokens)
    for name in plain:
        assert torch.allclose(fused[name], plain[name], rtol=1e-9, atol=1e-12), name

    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, config.seq_len, config.dim, dtype=torch.float64)
    assert kernels.fused_layer(x, net.performer.net.layers[1].engine_weights()).grad_fn is None


def test_short_inputs_run_on_the_calling_thread(two_threads):
    with execution(threads=None):  # the engine's own choice
        workers = lambda b, n: make_plan(kernels.get_execution(), "cpu", b, n, 10, 266, torch.bfloat16).workers  # noqa: E731
        assert workers(1, 2049) == 1 and workers(2, 2049) == 2
        assert workers(1, 16907) == 2


def test_chunks_cover_the_sequence_without_a_tiny_tail():
    for n, chunk, batch, workers in [(16907, 1024, 1, 1), (16907, 1024, 1, 2), (2049, 1024, 1, 2), (333, 7, 1, 1),
                                     (766, 1024, 100, 2), (10, 1024, 1, 2)]:
        slices = split_sequence(n, chunk, batch, workers)
        assert len(slices) % workers == 0 or n < 64 * workers  # the threads finish together
        assert slices[0].start == 0 and slices[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
        sizes = [s.stop - s.start for s in slices]
        assert max(sizes) - min(sizes) <= 1 and max(sizes) <= max(min(chunk, 64), chunk // batch)
        assert min(sizes) > 1


def real_tokens():
    data_utils = pytest.importorskip("data_utils")
    adata = data_utils.read_dataset(None)  # pbmc68k_reduced: 700 cells, 765 genes, real cell types
    tokens = torch.from_numpy(data_utils.tokenize(adata)).long()
    labels = torch.as_tensor(adata.obs["celltype"].astype("category").cat.codes.to_numpy().copy()).long()
    return tokens, labels


def test_bf16_keeps_fp32_predictions_on_real_cells():
    """bf16 autocast on the fast path against the same fast path in float32, on the 700 cells of
    pbmc68k_reduced. Classifier: like the published head, one score per gene read off the
    encodings (here channel 0), then a ridge read-out of the real cell types fitted on the float32
    scores. It separates the types (~85%) with realistic margins: 2% noise on the encodings already
    changes more than 0.5% of its predictions; bf16 changes the encodings by ~0.1%."""
    tokens, labels = real_tokens()
    config = get_config("tiny", gene_num=tokens.shape[1] - 1, dim=32, heads=2, dim_head=16, nb_features=44)
    torch.manual_seed(7)
    net = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64)).eval()

    def encodings(bf16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.cat([net(part, return_encodings=True).double() for part in tokens.split(175)])

    enc32, enc16 = encodings(False), encodings(True)
    assert ((enc16 - enc32).norm() / enc32.norm()).item() < 0.01
    mean, std = enc32[..., 0].mean(0), enc32[..., 0].std(0) + 1e-9
    design = lambda e: torch.cat(((e[..., 0] - mean) / std, torch.ones(len(e), 1, dtype=e.dtype)), 1)  # noqa: E731
    x = design(enc32)
    ridge = x.t() @ x + 100.0 * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    readout = torch.linalg.solve(ridge, x.t() @ nn.functional.one_hot(labels).double())
    pred32, pred16 = (x @ readout).argmax(1), (design(enc16) @ readout).argmax(1)
    majority = torch.bincount(labels).max().item() / len(labels)
    assert (pred32 == labels).double().mean().item() > majority + 0.3  # it does read the cell types
    agreement = (pred32 == pred16).double().mean().item()
    assert agreement >= 0.995, agreement

    with torch.inference_mode():  # and the per-position predictions of the MLM head, on 100 cells
        logits32 = net(tokens[:100])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits16 = net(tokens[:100]).float()
    assert (logits32.argmax(-1) == logits16.argmax(-1)).double().mean().item() >= 0.995


@pytest.mark.skipif(os.environ.get("SCBERT_TEST_COMPILE") != "1",
                    reason="compiles the chunk steps (minutes on two cores): SCBERT_TEST_COMPILE=1")
def test_compiled_steps_equal_eager_steps(backward_path):
    config = get_config("tiny", gene_num=60, feature_redraw_interval=0)
    net = random_model(config, seed=8, dtype=torch.float32).train()
    tokens = torch.randint(0, 6, (2, config.seq_len))
    with execution(chunk=16):
        eager_out, eager = loss_and_grads(net, tokens)
        # no silent eager fallback
        with execution(compile="on"), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            compiled_out, compiled = loss_and_grads(net, tokens)
    steps = (engine_layer._layer_keys_step, engine_layer._layer_queries_step, engine_layer._layer_queries_grad_step,
             engine_layer._layer_keys_grad_step)
    assert all((step, "cpu", 1) in engine_plan._compiled_steps for step in steps) and not engine_plan._failed_steps
    assert torch.allclose(compiled_out, eager_out, atol=1e-5)
    for name in eager:  # relative to the largest entry: compiled kernels sum in another order
        scale = eager[name].abs().max().item() + 1e-30
        assert (compiled[name] - eager[name]).abs().max().item() / scale < 1e-5, name




def test_a_failed_compilation_falls_back_to_the_eager_steps_once(monkeypatch):
    attempts = []

    def broken_compile(fn, **kwargs):  # what torch.compile does without a C++ compiler: fail when called
        def compiled(*args):
            attempts.append(fn.__name__)
            raise RuntimeError("no C++ compiler")

        return compiled

    config = get_config("tiny", gene_num=60, feature_redraw_interval=0)
    net = random_model(config, seed=8).eval()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), execution(chunk=16):
        eager = net(tokens)
        monkeypatch.setattr(engine_plan, "_compiled_steps", {})
        monkeypatch.setattr(engine_plan, "_failed_steps", set())
        monkeypatch.setattr(torch, "compile", broken_compile)
        with execution(compile="on"), pytest.warns(RuntimeWarning, match="no C.. compiler") as warned:
            fallback = net(tokens)
    assert torch.equal(fallback, eager)
    assert sorted(attempts) == ["_layer_keys_step", "_layer_queries_step"]  # once per step, not per chunk
    assert len(warned) == 2
