"""The execution settings (kernels.settings): which path runs, how the engine plans a pass, what the
scripts read from the environment, and checkpoints and keywords of the previous release."""
from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import pytest
import torch

import kernels
import model
import train_utils
from kernels import ExecutionSettings, execution
from kernels import layer as engine_layer
from kernels import settings as engine_settings
from kernels.plan import COMPILE_MIN_LEN, DEFAULT_CHUNK, KEEP_MAX_BYTES, make_plan
from model import PerformerLM, get_config
from helpers import ROOT


@pytest.fixture
def restore_process_settings(monkeypatch):
    """set_execution changes the process; put it back after the test."""
    monkeypatch.setattr(engine_settings, "_process_settings", engine_settings._process_settings)


def random_model(config, seed=0, dtype=torch.float64):
    """Random weights with non-trivial LayerNorms and biases; dtype None keeps float32 parameters and
    the float64 Gene2Vec table, as a checkpoint holds them."""
    torch.manual_seed(seed)
    net = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64))
    net = net if dtype is None else net.to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return net


def count_calls(monkeypatch, owner, name, calls):
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("residual", ["prenorm", "rezero"])
def test_settings_select_the_engine_or_the_plain_modules(monkeypatch, residual):
    config = get_config("tiny", gene_num=40, feature_redraw_interval=0, residual=residual)
    net = random_model(config).train()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(1))
    calls = {}
    for owner, name in ((kernels, "fused_layer"), (kernels, "favor_attention"), (model, "favor_attention_reference")):
        count_calls(monkeypatch, owner, name, calls)
    results = {}
    for path in ("fused", "modules", "reference"):
        calls.clear()
        with execution(path=path):
            net.zero_grad()
            out = net(tokens)
            out.square().sum().backward()
            with torch.no_grad():
                assert torch.equal(net(tokens), out.detach())  # inference takes the same path
        results[path] = out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]
        fused = path == "fused" and residual == "prenorm"  # ReZero layers have no fused op
        expected = ({"fused_layer": 2 * config.depth} if fused else
                    {"favor_attention_reference" if path == "reference" else "favor_attention": 2 * config.depth})
        assert calls == expected, (path, calls)
    for path in ("modules", "reference"):  # every path computes the same function
        assert (results[path][0] - results["fused"][0]).abs().max().item() < 1e-10
        for got, want in zip(results[path][1], results["fused"][1]):
            assert (got - want).abs().max().item() <= 1e-9 * (want.abs().max().item() + 1e-30)
    assert kernels.favor.KERNEL_EPS == model.KERNEL_EPS  # the engine computes the published features


def plan(settings, device_type, batch, positions, keep_bytes_needed=None, free_memory=None):
    """make_plan at the published widths: 10 heads of 266 features, bf16."""
    return make_plan(settings, device_type, batch, positions, 10, 266, torch.bfloat16, free_memory, keep_bytes_needed)


def test_the_cpu_plan_obeys_explicit_settings_and_chooses_otherwise():
    default = ExecutionSettings()
    torch_threads = torch.get_num_threads()
    short, long = plan(default, "cpu", 1, 1000), plan(default, "cpu", 1, COMPILE_MIN_LEN)
    assert not short.compile and long.compile
    assert short.workers == 1 and plan(default, "cpu", 4, 2049).workers == torch_threads
    assert max(s.stop - s.start for s in short.chunks) <= DEFAULT_CHUNK
    assert plan(default, "cpu", 1, 1000, KEEP_MAX_BYTES).keep and not plan(default, "cpu", 1, 1000,
                                                                           KEEP_MAX_BYTES + 1).keep
    assert not plan(default, "cpu", 1, 1000).keep  # nothing to keep in inference
    assert plan(ExecutionSettings(compile="on"), "cpu", 1, 10).compile
    assert not plan(ExecutionSettings(compile="off"), "cpu", 1, 10**5).compile
    assert plan(ExecutionSettings(threads=3), "cpu", 1, 200).workers == 3
    assert plan(ExecutionSettings(chunk=100), "cpu", 1, 1000).chunks[0] == slice(0, 100)
    assert not plan(ExecutionSettings(grad_checkpoint=True), "cpu", 1, 1000, 1).keep
    assert plan(ExecutionSettings(grad_checkpoint=True, keep_bytes=10), "cpu", 1, 1000, 10).keep
    with pytest.raises(ValueError, match="path"):
        ExecutionSettings(path="flash")
    with pytest.raises(ValueError, match="threads"), execution(threads=0):
        pass


def test_the_cuda_plan_takes_few_large_chunks_on_one_thread_within_its_memory():
    """The plan's GPU decisions need no GPU: a device type and a free-memory figure."""
    default, gib = ExecutionSettings(), 2**30
    n = 16907  # the published sequence
    for batch in (8, 16, 64):
        gpu = plan(default, "cuda", batch, n, free_memory=80 * gib)
        assert gpu.device_type == "cuda" and gpu.workers == 1 and gpu.compile
        assert 1 <= len(gpu.chunks) <= 8 and gpu.chunks[-1].stop == n
        temporaries = batch * max(s.stop - s.start for s in gpu.chunks) * 10 * 266 * 4 * 6
        assert temporaries <= 0.25 * 80 * gib  # half of the budget, itself half the free memory
    assert len(plan(default, "cuda", 8, n, free_memory=80 * gib).chunks) == 1
    few = plan(default, "cuda", 64, n, free_memory=8 * gib)
    assert len(few.chunks) > len(plan(default, "cuda", 64, n, free_memory=80 * gib).chunks)
    assert len(plan(ExecutionSettings(memory_budget=gib), "cuda", 64, n, free_memory=80 * gib).chunks) > 8
    kept = 8 * n * (3 * 640 + 800) * 2  # q, k, v and the hidden layer of one layer, bf16, batch 8
    assert plan(default, "cuda", 8, n, kept, free_memory=80 * gib).keep  # fits in an eighth of 40 GiB
    assert not plan(default, "cuda", 8, n, kept, free_memory=4 * gib).keep  # an eighth of 2 GiB
    assert not plan(ExecutionSettings(grad_checkpoint=True), "cuda", 8, n, kept, free_memory=80 * gib).keep
    assert plan(ExecutionSettings(threads=4), "cuda", 1, 10**5).workers == 1  # threads are a CPU setting
    explicit = plan(ExecutionSettings(chunk=4096), "cuda", 1, n).chunks  # explicit wins
    assert len(explicit) == 5 and max(s.stop - s.start for s in explicit) <= 4096
    assert plan(ExecutionSettings(compile="off"), "cuda", 8, n).compile is False
    forced = plan(ExecutionSettings(plan_device="cuda"), "cpu", 64, n)  # no free-memory figure: 80 GiB assumed
    assert forced.device_type == "cuda" and forced.chunks == plan(default, "cuda", 64, n, free_memory=80 * gib).chunks


def test_blocks_nest_and_override_the_process_settings(restore_process_settings):
    process = kernels.set_execution(chunk=512)
    assert kernels.get_execution() == process and process.chunk == 512
    with execution(compile="on") as outer:
        assert (outer.chunk, outer.compile) == (512, "on")
        with execution(ExecutionSettings(), threads=2) as inner:
            assert kernels.get_execution() == inner == ExecutionSettings(threads=2)
        assert kernels.get_execution() == outer
        seen = []
        thread = threading.Thread(target=lambda: seen.append(kernels.get_execution()))
        thread.start()
        thread.join()
        assert seen == [process]  # another thread: the process settings, not the block
    assert kernels.get_execution() == process


def test_chunk_threads_run_the_plan_of_the_caller(monkeypatch):
    """The caller's block decides the chunks even on worker threads, whose own context is empty."""
    config = get_config("tiny", gene_num=90, feature_redraw_interval=0)
    net = random_model(config, seed=2).eval()
    tokens = torch.randint(0, 6, (1, config.seq_len), generator=torch.Generator().manual_seed(3))
    seen = []
    step = engine_layer._layer_keys_step

    def spy(x_c, *args):
        seen.append((threading.current_thread().name, x_c.shape[1], kernels.get_execution().chunk))
        return step(x_c, *args)

    monkeypatch.setattr(engine_layer, "_layer_keys_step", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            plain = net(tokens)
            seen.clear()
            with execution(threads=2, chunk=8):
                threaded = net(tokens)
    finally:
        torch.set_num_threads(before)
    assert {name.startswith("favor") for name, _, _ in seen} == {True}
    assert max(rows for _, rows, _ in seen) <= 8
    assert {chunk for _, _, chunk in seen} == {None}  # the workers never read the settings themselves
    assert (threaded - plain).abs().max().item() < 1e-12


@pytest.mark.parametrize("path", ["modules", "reference"])
def test_grad_checkpointed_layers_recompute_with_the_settings_of_their_forward(path):
    config = get_config("tiny", gene_num=30, feature_redraw_interval=0)
    net = random_model(config, seed=4).train()
    tokens = torch.randint(0, 6, (2, config.seq_len), generator=torch.Generator().manual_seed(5))
    grads = []
    for grad_checkpoint in (False, True):
        net.zero_grad()
        with execution(path=path, grad_checkpoint=grad_checkpoint, chunk=7):
            loss = net(tokens).square().sum()
        loss.backward()  # outside the block: a recomputation must still take `path`
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, rtol=1e-12, atol=1e-14)


def test_a_checkpoint_of_the_previous_release_loads_and_gives_the_same_outputs(tmp_path):
    """The previous release stored attention, attn_chunk and grad_checkpoint in the config."""
    config = get_config("tiny", gene_num=50)
    net = random_model(config, seed=6, dtype=None).attach_classifier(3)
    net.set_redraw_seed(11)
    old_config = {**config.to_dict(), "attention": "fast", "attn_chunk": 1024, "grad_checkpoint": False}
    path = tmp_path / "finetune_best.pth"
    train_utils.save_checkpoint(path, {"epoch": 2, "losses": 0.3, "model_state_dict": net.state_dict(),
                                       "config": old_config, "head": "classifier", "redraw_seed": 11,
                                       "redraw_count": 0, "versions": train_utils.versions()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning for a stored config
        loaded, ckpt = train_utils.load_checkpoint(path)
    assert loaded.config == config and "attention" not in loaded.config.to_dict()
    assert loaded.performer.execution_overrides == {} and loaded.performer.redraw_seed == 11
    tokens = torch.randint(0, 6, (4, config.seq_len), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), net.eval()(tokens))
    assert set(train_utils.model_checkpoint_fields(loaded)["config"]) == set(config.to_dict())


def test_deprecated_keywords_still_choose_how_to_execute(monkeypatch, restore_process_settings):
    with pytest.warns(DeprecationWarning, match="execution settings"):
        config = get_config("tiny", gene_num=30, attention="reference", attn_chunk=8)
    assert "attention" not in config.to_dict() and config == get_config("tiny", gene_num=30)
    net = random_model(config, seed=8).eval()
    calls = {}
    count_calls(monkeypatch, model, "favor_attention_reference", calls)
    tokens = torch.randint(0, 6, (1, config.seq_len))
    with torch.no_grad():
        out = net(tokens)
        assert calls == {"favor_attention_reference": config.depth}
        with execution(path="reference", chunk=8):
            assert torch.equal(out, random_model(get_config("tiny", gene_num=30), seed=8).eval()(tokens))
    with pytest.warns(DeprecationWarning, match="set_execution"):
        model.set_fast_compile("on")
    assert kernels.get_execution().compile == "on"


def test_scripts_read_scbert_compile_at_start_up_and_model_does_not(restore_process_settings, monkeypatch):
    train_utils.configure_from_environment({"SCBERT_COMPILE": " ON ", "SCBERT_MALLOC": "default"})
    assert kernels.get_execution().compile == "on"
    with pytest.raises(train_utils.InputError, match="SCBERT_COMPILE='fast' is not one of auto, on, off"):
        train_utils.configure_from_environment({"SCBERT_COMPILE": "fast"})
    monkeypatch.setenv("SCBERT_COMPILE", "off")
    parser = __import__("argparse").ArgumentParser()
    assert train_utils.run_main(lambda args: kernels.get_execution().compile, parser, []) == "off"

    env = {"SCBERT_COMPILE": "on", "PATH": "/usr/bin:/bin"}
    code = "import model, kernels; print(kernels.get_execution().compile)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["auto"]  # importing the model reads no environment
    bad = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--data_path", "missing.h5ad"], cwd=ROOT,
                         env={**env, "SCBERT_COMPILE": "fast"}, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        "error: SCBERT_COMPILE='fast' is not one of auto, on, off; unset it or set it to auto, on or off"]
