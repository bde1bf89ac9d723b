"""The GPU check: one command that measures what the model does on one CUDA GPU, in about five minutes.

    python benchmarks/gpu_check.py --out DIR                 # every section, on cuda:0
    python benchmarks/gpu_check.py --out DIR --only model    # one section again
    python benchmarks/gpu_check.py --dry --out DIR           # the same code at tiny shapes on the CPU

Sections (each with its own deadline; DIR/gpu_check.json is rewritten after each, so it comes back
even when a later section overruns):
  environment  versions, the GPU, a bf16 matmul's TFLOP/s (8192^3) and a device copy's TB/s
  correctness  our fp32 plan against the float64 reference (values and every gradient), TF32 off and
               on; bf16 against fp32: argmax agreement of the MLM output at expressed positions at the
               published shape (weights perturbed p += 0.05 randn so the logits are not near-tied)
  triton       the fused Triton FAVOR+ kernels (kernels/triton_favor.py) against the float64 reference
               on the GPU, values and q/k/v gradients, fp32 (ieee) and bf16, with and without ties of
               the key maximum, at feature blocks of 32 and 64
  favor_core   FAVOR+ alone at the published shape (batch 8, 16,907 positions, 10 x 64, 266 features),
               bf16: ms per cell-layer, forward and forward + backward, by the plain plan (the chunked
               engine) and by the Triton kernels at feature blocks of 32, 64 and 128
  model        the published model as the scripts run it (bf16 autocast, the CUDA plan, the Triton
               kernels where they run): inference at batch 8 and 64, a pretraining step (MLM on 15% of
               the expressed genes, Adam) at batch 8: cells/s, the first call's seconds, peak GB
  model_plain  the same with the Triton kernels off (the plain plan)
  peer         performer-pytorch 1.0.6 (what scBERT runs) with the same weights and batch: fp32 eager,
               bf16 autocast and torch.compile'd, inference and a training step
The bars of the GPU issue are evaluated at the end ("bars" in the JSON, and DIR/gpu_check.md).

It imports only torch, our model.py and kernels/, and performer-pytorch (with stand-ins for its two
imports that these settings never use, local-attention and axial-positional-embedding, when they are
missing). It writes only under --out (compile caches included); --dry writes nowhere else either.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import signal
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "triton", "favor_core", "model", "model_plain", "peer")
DEADLINES = {"environment": 15, "correctness": 35, "triton": 30, "favor_core": 35, "model": 70, "model_plain": 45,
             "peer": 70}  # seconds: 300 in all


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupts the section's Python code after `seconds` (a CUDA call returns first)."""

    def expire(*_):
        raise SectionTimeout(f"deadline of {seconds:.0f} s passed")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Check:
    """The shapes, device and clock of one run (tiny on the CPU with --dry)."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.dry = args.dry
        self.device = torch.device("cpu" if args.dry else args.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU is visible; run with --dry for the CPU version of this check")
        self.genes = 127 if args.dry else 16906
        self.infer_batches = (2, 4) if args.dry else (8, 64)
        self.train_batch = 2 if args.dry else 8
        self.repeats = 2 if args.dry else 3
        self.matmul = 256 if args.dry else 8192

    def config(self, **overrides):
        from model import get_config

        if self.dry:
            return get_config("tiny", gene_num=self.genes, **overrides)
        return get_config("scbert", gene_num=self.genes, **overrides)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def seconds(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def best(self, fn, repeats: int | None = None) -> float:
        return min(self.seconds(fn) for _ in range(repeats or self.repeats))

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated(self.device) / 1e9

    def reset_peak(self):
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def autocast(self, enabled: bool = True):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=enabled)

    def tokens(self, batch: int, seed: int = 0):
        """Cells like real ones: 500-1,500 expressed genes each, bins 1-5 skewed to the low ones."""
        torch = self.torch
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.zeros(batch, self.genes + 1, dtype=torch.long)
        bins = torch.tensor([0.55, 0.25, 0.12, 0.05, 0.03])
        for cell in tokens:
            expressed = int(torch.randint(min(500, self.genes // 4), min(1500, self.genes // 2) + 1, (1,),
                                          generator=generator))
            genes = torch.randperm(self.genes, generator=generator)[:expressed]
            cell[genes] = torch.multinomial(bins, expressed, replacement=True, generator=generator) + 1
        return tokens.to(self.device)

    def model(self, seed: int = 0, **overrides):
        from model import PerformerLM

        torch = self.torch
        config = self.config(**overrides)
        torch.manual_seed(seed)
        table = torch.randn(config.seq_len, config.dim, dtype=torch.float64) * 0.5
        table[-1] = 0
        return PerformerLM(config, pos_table=table).to(self.device)


# --------------------------------------------------------------------------------------------------
# sections


def environment(check: Check) -> dict:
    torch = check.torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "device": str(check.device),
           "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 1e9,
                   multiprocessors=props.multi_processor_count)
    size = check.matmul
    a = torch.randn(size, size, device=check.device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=check.device, dtype=torch.bfloat16)
    a @ b
    out["bf16_matmul_tflops"] = 2 * size**3 / check.best(lambda: a @ b) / 1e12
    big = torch.empty((2**20 if check.dry else 2**30,), device=check.device, dtype=torch.float32)
    copy_to = torch.empty_like(big)
    copy_to.copy_(big)
    out["copy_tb_per_s"] = 2 * big.numel() * 4 / check.best(lambda: copy_to.copy_(big)) / 1e12  # read + write
    return out


@contextlib.contextmanager
def matmul_precision(precision: str):
    """fp32 matmuls in TF32 ("high", as the scripts run on a GPU) or in full fp32 ("highest", torch's
    default and how the published code ran)."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _loss_and_grads(net, tokens):
    net.zero_grad()
    logits = net(tokens)
    (logits.double().square().mean() + logits[..., 1].double().exp().mean()).backward()
    return logits.detach().double(), {k: p.grad.double() for k, p in net.named_parameters() if p.grad is not None}


def correctness(check: Check) -> dict:
    import kernels

    torch = check.torch
    out = {}
    config = check.config(feature_redraw_interval=0) if check.dry else None
    small = check.model(seed=1, feature_redraw_interval=0) if check.dry else None
    if small is None:  # the small preset at 2,048 genes: every path of the plan, fast enough for float64
        from model import PerformerLM, get_config

        config = get_config("small", gene_num=2047, feature_redraw_interval=0)
        torch.manual_seed(1)
        small = PerformerLM(config, pos_table=torch.randn(config.seq_len, config.dim, dtype=torch.float64))
        small = small.to(check.device)
    with torch.no_grad():
        for name, p in small.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    small.train()
    tokens = check.tokens(2, seed=2)[:, : config.seq_len]
    reference = copy.deepcopy(small).double()
    with kernels.execution(path="reference"):
        ref_logits, ref_grads = _loss_and_grads(reference, tokens)
    scale = ref_logits.abs().max().item()
    for tf32 in (False, True):
        with matmul_precision("high" if tf32 else "highest"):
            logits, grads = _loss_and_grads(small, tokens)
        worst = max(((grads[k] - g).abs().max() / (g.abs().max() + 1e-30)).item() for k, g in ref_grads.items())
        out[f"fp32_tf32_{'on' if tf32 else 'off'}"] = {"logits_error_rel_max": (logits - ref_logits).abs().max().item()
                                                       / scale, "worst_gradient_error_rel_max": worst}
    # bf16 against fp32 at the published shape, weights perturbed so the logits are not near-tied
    net = check.model(seed=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dtype != torch.float64:
                p.add_(0.05 * torch.randn_like(p))
    tokens = check.tokens(4 if check.dry else 8, seed=4)
    with torch.inference_mode():
        fp32 = net(tokens).argmax(-1)
        with check.autocast():
            bf16 = net(tokens).argmax(-1)
    expressed = tokens > 0
    out["bf16_argmax_agreement_expressed"] = (fp32 == bf16)[expressed].double().mean().item()
    return out


def _triton_blocks(check: Check, block_m: int):
    from kernels import triton_favor

    if check.dry:  # the interpreter runs one program at a time: small tiles
        return triton_favor.INTERPRETER_BLOCKS._replace(block_n=16, block_m=16)
    return triton_favor.GPU_BLOCKS._replace(block_m=block_m)


def triton(check: Check) -> dict:
    """The Triton kernels against the float64 reference on this device (with --dry: in Triton's
    interpreter, where dots run in float32)."""
    from kernels import triton_favor
    from model import favor_attention_reference, orthogonal_gaussian_matrix

    torch = check.torch
    out = {}
    b, n, h, d, m = (1, 70, 2, 16, 40) if check.dry else (1, 2048, 10, 64, 266)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        if not triton_favor.available(check.device, dtype):
            out[name] = "the kernels do not run here"
            continue
        for block_m in ((16,) if check.dry else (32, 64)):
            for tie in (False, True):
                generator = torch.Generator().manual_seed(block_m)
                qkv = torch.randn(b, n, 3, h, d, generator=generator, dtype=torch.float64)
                if tie:
                    qkv[:, n // 2:, 1] = qkv[:, : n - n // 2, 1]  # every key twice: the key maximum ties
                projection = orthogonal_gaussian_matrix(m, d, generator=generator).to(check.device)
                reference = qkv.to(check.device).to(dtype).double().requires_grad_()
                expected = favor_attention_reference(*reference.unbind(2), projection.double())
                upstream = torch.randn_like(expected)
                expected.backward(upstream)
                leaf = qkv.to(check.device, dtype).requires_grad_()
                got = triton_favor.favor_attention(*leaf.unbind(2), projection, _triton_blocks(check, block_m))
                got.backward(upstream.to(dtype))
                rel = lambda x, r: ((x.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
                out[f"{name}_block{block_m}_{'ties' if tie else 'random'}"] = {
                    "output_error_rel_max": rel(got, expected),
                    "gradient_error_rel_max": max(rel(leaf.grad[:, :, i], reference.grad[:, :, i]) for i in range(3))}
    return out


def favor_core(check: Check) -> dict:
    import kernels
    from kernels import triton_favor
    from model import orthogonal_gaussian_matrix

    torch = check.torch
    config = check.config()
    batch = check.train_batch
    shape = (batch, config.seq_len, config.heads, config.dim_head)
    q, k, v = (0.5 * torch.randn(shape, device=check.device, dtype=torch.bfloat16) for _ in range(3))
    projection = orthogonal_gaussian_matrix(config.nb_features, config.dim_head).to(check.device)
    out = {"shape": list(shape), "features": config.nb_features}
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ways = {"plain": lambda *qkv: kernels.favor_attention(*qkv, projection)}
    if triton_favor.available(check.device, torch.bfloat16):
        for block_m in ((16,) if check.dry else (32, 64, 128)):
            blocks = _triton_blocks(check, block_m)
            ways[f"triton_block{block_m}"] = lambda *qkv, blocks=blocks: triton_favor.favor_attention(
                *qkv, projection, blocks)
    for way, attention in ways.items():
        def forward(attention=attention):
            with torch.inference_mode():
                attention(q, k, v)

        def training(attention=attention):
            attention(*leaves).float().square().mean().backward()

        with kernels.execution(triton="off"):  # "plain" is the chunked engine even where the kernels run
            for name, fn in (("forward", forward), ("forward_backward", training)):
                out[f"{way}_{name}_first_call_s"] = check.seconds(fn)
                out[f"{way}_{name}_ms_per_cell_layer"] = 1e3 * check.best(fn) / batch
    return out


def _pretraining_step(check, net, batch):
    """An MLM step: 15% of each cell's expressed genes masked, cross-entropy on them, Adam."""
    from speed import mask_for_pretraining

    torch = check.torch
    masked, labels = mask_for_pretraining(check.tokens(batch, seed=5).cpu(), torch.Generator().manual_seed(6))
    masked, labels = masked.to(check.device), labels.to(check.device)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with check.autocast():
            logits = net(masked)
        loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _throughput(check, make_call, batch) -> dict:
    check.reset_peak()
    call = make_call()
    first = check.seconds(call)
    seconds = check.best(call)
    return {"batch": batch, "cells_per_s": batch / seconds, "first_call_s": first, "peak_gb": check.peak_gb()}


def model_section(check: Check) -> dict:
    with matmul_precision("high"):  # as the scripts set it on a GPU
        return _model_section(check)


def model_plain(check: Check) -> dict:
    """The model with the Triton kernels off: the plain plan (the chunked engine's fused layers)."""
    import kernels

    with matmul_precision("high"), kernels.execution(triton="off"):
        return _model_section(check, infer_batches=check.infer_batches[:1])


def _model_section(check: Check, infer_batches: tuple[int, ...] | None = None) -> dict:
    torch = check.torch
    out = {}
    net = check.model(seed=7)
    net.eval()
    for batch in infer_batches or check.infer_batches:
        tokens = check.tokens(batch, seed=batch)

        def make_call(tokens=tokens):
            def call():
                with torch.inference_mode(), check.autocast():
                    net(tokens)
            return call

        out[f"inference_b{batch}"] = _throughput(check, make_call, batch)
    net.train()
    out[f"train_b{check.train_batch}"] = _throughput(check, lambda: _pretraining_step(check, net, check.train_batch),
                                                     check.train_batch)
    return out


def _import_peer():
    """performer-pytorch 1.0.6, with stand-ins for the two imports it never uses here."""
    for missing in ("local_attention", "axial_positional_embedding"):
        try:
            __import__(missing)
        except ImportError:
            stub = types.ModuleType(missing)
            name = "LocalAttention" if missing == "local_attention" else "AxialPositionalEmbedding"
            setattr(stub, name, type(name, (), {"__init__": lambda self, *a, **k: (_ for _ in ()).throw(
                RuntimeError(f"{missing} is a stand-in: not used with these settings"))}))
            sys.modules[missing] = stub
    import performer_pytorch

    return performer_pytorch


def peer(check: Check) -> dict:
    with matmul_precision("highest"):  # torch's default: the published code as run
        return _peer(check)


def _peer(check: Check) -> dict:
    from speed import peer_model

    torch = check.torch
    pp = _import_peer()
    ours = check.model(seed=7)
    net = peer_model(ours.state_dict(), ours.config, "1.0.6").to(check.device)
    del ours
    out = {"version": getattr(pp, "__version__", "1.0.6")}
    batch = check.infer_batches[0]
    tokens = check.tokens(batch, seed=batch)
    compiled = torch.compile(net, backend="eager" if check.dry else "inductor")  # --dry: no code generation
    for name, runner, bf16 in (("fp32", net, False), ("bf16", net, True), ("compiled_bf16", compiled, True)):
        net.eval()

        def make_call(runner=runner, bf16=bf16):
            def call():
                with torch.no_grad(), check.autocast(bf16):
                    runner(tokens)
            return call

        out[f"inference_{name}_b{batch}"] = _throughput(check, make_call, batch)
    net.train()

    step = _pretraining_step(check, net, check.train_batch)

    def fp32_step():
        with check.autocast(False):
            step()

    out[f"train_fp32_b{check.train_batch}"] = _throughput(check, lambda: fp32_step, check.train_batch)
    return out


RUNNERS = {"environment": environment, "correctness": correctness, "triton": triton, "favor_core": favor_core,
           "model": model_section, "model_plain": model_plain, "peer": peer}


# --------------------------------------------------------------------------------------------------
# bars and report


def bars(results: dict, dry: bool) -> dict:
    """The GPU issues' bars: the execution plan's (issue 15: the plain plan, model_plain) and the
    Triton kernels' (issue 16: the model as it runs, against the plain plan and the peer's fastest)."""
    model, plain = results.get("model", {}), results.get("model_plain", {})
    peer_results, correct, kernels_check = results.get("peer", {}), results.get("correctness", {}), results.get(
        "triton", {})

    def entry(section, prefix):
        return next((v for k, v in section.items() if k.startswith(prefix) and isinstance(v, dict)), {})

    def rate(section, prefix):
        return max((v.get("cells_per_s") or 0 for k, v in section.items() if k.startswith(prefix)
                    and isinstance(v, dict)), default=0) or None

    def ratio(a, b):
        return a / b if a and b else None

    train, infer8 = entry(model, "train_b"), entry(model, "inference_b")
    plain_train, plain_infer8 = entry(plain, "train_b"), entry(plain, "inference_b")
    peer_infer, peer_train = entry(peer_results, "inference_fp32"), entry(peer_results, "train_fp32")
    peer_fastest = rate(peer_results, "inference_")
    fp32_kernel_errors = [v["output_error_rel_max"] for k, v in kernels_check.items()
                          if k.startswith("float32") and isinstance(v, dict)]
    checks = {
        "plain plan: inference >= 400 cells/s": (rate(plain, "inference_b"), 400),
        "plain plan: training step >= 100 cells/s": (plain_train.get("cells_per_s"), 100),
        "plain plan: inference >= 10x performer-pytorch fp32 eager (same batch)": (
            ratio(plain_infer8.get("cells_per_s"), peer_infer.get("cells_per_s")), 10),
        "plain plan: training >= 10x performer-pytorch fp32 eager (same batch)": (
            ratio(plain_train.get("cells_per_s"), peer_train.get("cells_per_s")), 10),
        "kernels: inference >= 1000 cells/s": (rate(model, "inference_b"), 1000),
        "kernels: pretraining step >= 250 cells/s": (train.get("cells_per_s"), 250),
        "kernels: inference >= 2x the plain plan (batch 8)": (
            ratio(infer8.get("cells_per_s"), plain_infer8.get("cells_per_s")), 2),
        "kernels: training >= 2x the plain plan": (ratio(train.get("cells_per_s"), plain_train.get("cells_per_s")), 2),
        "kernels: inference >= 2x performer-pytorch's fastest mode (batch 8)": (
            ratio(infer8.get("cells_per_s"), peer_fastest), 2),
        "kernels: fp32 (ieee) outputs within 1e-4 of float64": (max(fp32_kernel_errors, default=None), 1e-4),
        "fp32 (TF32 off) logits within 1e-4 of float64": (correct.get("fp32_tf32_off", {}).get(
            "logits_error_rel_max"), 1e-4),
        "fp32 (TF32 on) logits within 1e-2 of float64": (correct.get("fp32_tf32_on", {}).get(
            "logits_error_rel_max"), 1e-2),
        "bf16 argmax agreement >= 99.5%": (correct.get("bf16_argmax_agreement_expressed"), 0.995),
    }
    out = {}
    for name, (value, bar) in checks.items():
        met = None if value is None else (value <= bar if "within" in name else value >= bar)
        out[name] = {"value": value, "bar": bar, "met": None if dry else met}
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    lines = ["# GPU check (benchmarks/gpu_check.py)", ""]
    env = results.get("environment", {})
    lines.append(f"{env.get('gpu', env.get('device'))}, torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
                 f"{env.get('triton')}; bf16 matmul {env.get('bf16_matmul_tflops', 0):.0f} TFLOP/s, copy "
                 f"{env.get('copy_tb_per_s', 0):.2f} TB/s.")
    def text(value):
        if isinstance(value, dict):
            return ", ".join(f"{k} {text(v)}" for k, v in value.items())
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines += ["", "| section | measurement | value |", "|---|---|---|"]
    for section in SECTIONS[1:]:
        for key, value in results.get(section, {}).items():
            lines.append(f"| {section} | {key} | {text(value)} |")
    lines += ["", "| bar | value | needed | met |", "|---|---|---|---|"]
    for name, bar in results.get("bars", {}).items():
        lines.append(f"| {name} | {text(bar['value'])} | {text(bar['bar'])} | {bar['met']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json / .md and the compile caches")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on the CPU, in seconds")
    parser.add_argument("--device", default="cuda", help="the GPU (default cuda, i.e. the current one)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for variable, folder in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ[variable] = str(out_dir / "cache" / folder)  # the only place it writes
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on the CPU, before they are defined
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    check = Check(args)
    import kernels

    if args.dry:
        kernels.set_execution(compile="off")  # seconds on a CPU, and nothing cached outside --out
    json_path = out_dir / "gpu_check.json"
    results = json.loads(json_path.read_text()) if args.only and json_path.exists() else {}
    for section in args.only or SECTIONS:
        started = time.perf_counter()
        try:
            with deadline(DEADLINES[section] * (3 if args.dry else 1)):
                results[section] = RUNNERS[section](check)
        except (Exception, SectionTimeout) as err:  # one failing section must not cost the others
            results[section] = {"error": f"{type(err).__name__}: {err}"[:500]}
        results[section]["seconds"] = time.perf_counter() - started
        results["bars"] = bars(results, args.dry)
        write_atomic(json_path, json.dumps(results, indent=1, default=str))
        print(json.dumps({section: results[section]}, default=str), flush=True)
    write_atomic(out_dir / "gpu_check.md", markdown(results))
    return results


if __name__ == "__main__":
    main()
