"""Speed and memory of our scBERT against performer-pytorch (issue 7), side by side, in one run.

Same weights, same inputs: our model is built with model.PerformerLM(get_config("scbert", gene_num=G))
and a fixed random Gene2Vec-like table (float64, last row 0); its state dict is loaded into
performer-pytorch 1.0.6 (the code the published scBERT runs; identical keys, pos_emb replaced by a
float64 Embedding.from_pretrained as scBERT does) and 1.1.4 (keys mapped: duplicated under
performer.proj_updater.instance.*, renamed redraw counter, attn_out_bias=True). Tokens: cells of
scanpy's pbmc68k_reduced (.raw.X, min(floor(log2(1 + expm1(x))), 5)) placed at fixed random positions
of the G-gene panel, zeros elsewhere, one 0 token appended.

Every (configuration, task) runs in its own subprocess, so peak RSS (ru_maxrss of that child: the
whole process, imports and compilation included) is its own. Peers run as their users run them:
default allocator and environment, torch's default threads. Configurations:
  peer106-fp32, peer114-fp32                     fp32, eager (peer106-fp32 = the published code as run)
  peer106-bf16, peer114-bf16                     torch.autocast bf16
  peer106-compiled-bf16, peer114-compiled-bf16   torch.compile(model) + autocast bf16
  ours-default    as the scripts ship it: the kernels/ engine (fused chunked layers), bf16 autocast where the
                  CPU has bf16 matmuls (fp32 otherwise), chunk steps torch.compile'd automatically
                  for sequences >= 2,048, glibc told to reuse freed memory (train_utils.
                  reuse_freed_memory, which every script calls at start)
  ours-best       the same allocator setting through the environment (MALLOC_MMAP_MAX_=0,
                  MALLOC_TRIM_THRESHOLD_=-1, the setting that halved the peer's fp32 time); no other
                  setting we tried (chunk 512 / 2,048 / 4,096) was faster
  ours-default-malloc  ours-default with glibc's default allocator (SCBERT_MALLOC=default): what the
                  allocator setting is worth
  ours-fp32       the fast path without autocast (the precision reference for the bf16 rows)
Tasks: "infer" (MLM logits, no grad; batch 1 and --batches), "train" (one pretraining step: MLM
cross-entropy on 15% of the expressed genes replaced by [MASK], backward, Adam over every parameter
but the frozen Gene2Vec table; batch 1). Times are wall-clock seconds per cell; the minimum over the
repeats is reported (the median is in the JSON log). The machine may be shared: before each child
the parent waits for other processes to go quiet (--quiet) and records the cores they used during
the child. MFU = model matmul FLOPs per second over the peak of a 4096^3 bf16 / fp32 matmul measured
in the same run (useful FLOPs only: our recomputation in backward is not counted). A profile (top
ops, one thread) of ours-default follows the tables.

Usage (full run, about an hour):  python benchmarks/speed.py
Quick subset (a few minutes):     python benchmarks/speed.py --quick
Writes benchmarks/results_speed.md (or --out) and a JSON log in benchmarks/out/. Needs
performer-pytorch 1.0.6 installed and 1.1.4 in benchmarks/out/pp114 (pip install --no-deps --target
benchmarks/out/pp114 performer-pytorch==1.1.4) for the peer114-* rows.

Before/after a change (about 25 minutes):  python benchmarks/speed.py --compare REV
ours-default at commit REV (checked out in a git worktree under benchmarks/out/) against the working
tree, same weights and inputs, in alternating child processes (--compare_runs of each, one after the
other, so drift in the machine's load hits both alike): inference at 2,048 genes, batch 1 and 4,
a training step at 2,048 genes, batch 1 and 4, and inference at 16,906 genes, batch 1. Each child
reports the median over --repeats calls after a warm-up (and one child per side is run first, not
counted, to warm the compile cache); the table gives the ratio of the medians over the children
(new / old, < 1 is faster) and each side's spread (max / min, and Q3 / Q1, over its children).
Writes benchmarks/results_compare.md (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
PP114 = OUT / "pp114"  # pip install --no-deps --target benchmarks/out/pp114 performer-pytorch==1.1.4

CONFIGS = {
    "peer106-fp32": dict(impl="peer", version="1.0.6", precision="fp32", compile=False),
    "peer106-bf16": dict(impl="peer", version="1.0.6", precision="bf16", compile=False),
    "peer106-compiled-bf16": dict(impl="peer", version="1.0.6", precision="bf16", compile=True),
    "peer114-fp32": dict(impl="peer", version="1.1.4", precision="fp32", compile=False),
    "peer114-bf16": dict(impl="peer", version="1.1.4", precision="bf16", compile=False),
    "peer114-compiled-bf16": dict(impl="peer", version="1.1.4", precision="bf16", compile=True),
    "ours-default": dict(impl="ours", precision="auto", env={}),
    "ours-best": dict(impl="ours", precision="auto", env={"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "-1"}),
    "ours-default-malloc": dict(impl="ours", precision="auto", env={"SCBERT_MALLOC": "default"}),
    "ours-fp32": dict(impl="ours", precision="fp32", env={}),
}
QUICK_CONFIGS = ["peer106-fp32", "peer106-compiled-bf16", "ours-default"]


# --------------------------------------------------------------------------------------------------
# shared inputs (written once by the parent, read by every child)


def model_flops(genes: int, dim=200, depth=6, heads=10, dim_head=64, features=266, ff_mult=4, tokens=7):
    """Matmul FLOPs of one cell: (forward, forward + backward). The backward counts two matmuls per
    forward matmul except the feature projection x W^T, whose W is a fixed buffer (one)."""
    n = genes + 1
    inner = heads * dim_head
    linear = 2 * n * (dim * 3 * inner + inner * dim + 2 * dim * dim * ff_mult)
    projection = 2 * 2 * n * heads * dim_head * features
    context = 2 * 2 * n * heads * features * (dim_head + 1)
    head = 2 * n * dim * tokens
    forward = depth * (linear + projection + context) + head
    backward = depth * (2 * linear + projection + 2 * context) + 2 * head
    return forward, forward + backward


def prepare_inputs(genes: int, cells: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    import model as ours

    paths = {"weights": OUT / f"weights_{genes}.pt", "tokens": OUT / f"tokens_{genes}.pt"}
    cells = max(cells, 8)
    if all(p.exists() for p in paths.values()) and len(torch.load(paths["tokens"], weights_only=True)) >= cells:
        return {k: str(v) for k, v in paths.items()}
    torch.manual_seed(0)
    config = ours.get_config("scbert", gene_num=genes)
    table = torch.randn(config.seq_len, config.dim, dtype=torch.float64) * 0.5
    table[-1] = 0
    net = ours.PerformerLM(config, pos_table=table)
    torch.save(net.state_dict(), paths["weights"])

    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()
    x = adata.raw.X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    bins = np.minimum(np.floor(np.log2(1 + np.expm1(x))), 5).astype(np.int64)  # (700, 765)
    rng = np.random.default_rng(0)
    slots = rng.choice(genes, size=min(genes, bins.shape[1]), replace=False)
    tokens = np.zeros((cells, genes + 1), dtype=np.int64)
    tokens[:, slots] = bins[rng.choice(bins.shape[0], size=cells, replace=False), : len(slots)]
    torch.save(torch.from_numpy(tokens), paths["tokens"])
    return {k: str(v) for k, v in paths.items()}


# --------------------------------------------------------------------------------------------------
# child: one configuration, one task


def build_model(spec: dict, genes: int, weights: str, tree: Path = ROOT):
    import torch

    state = torch.load(weights, weights_only=True)
    if spec["impl"] == "ours":
        sys.path.insert(0, str(tree))
        import model as ours
        from train_utils import reuse_freed_memory

        reuse_freed_memory()  # as run_main does in every script

        net = ours.PerformerLM(ours.get_config("scbert", gene_num=genes))
        net.load_state_dict(state)
        return net
    sys.path.insert(0, str(ROOT))
    from model import get_config

    return peer_model(state, get_config("scbert", gene_num=genes), spec["version"])


def peer_model(state: dict, config, version: str = "1.0.6"):
    """performer-pytorch's PerformerLM with our weights (config: our ModelConfig of them): 1.0.6 takes
    the state dict as is, 1.1.4 with its keys mapped. The Gene2Vec table becomes a float64
    Embedding.from_pretrained, as scBERT builds it."""
    from torch import nn
    import performer_pytorch as pp

    assert pp.__file__.find("pp114") >= 0 if version == "1.1.4" else True, pp.__file__
    kwargs = dict(num_tokens=config.num_tokens, max_seq_len=config.seq_len, dim=config.dim, depth=config.depth,
                  heads=config.heads, dim_head=config.dim_head, nb_features=config.nb_features,
                  rotary_position_emb=False, axial_position_emb=False)
    if version == "1.1.4":
        kwargs["attn_out_bias"] = True
    net = pp.PerformerLM(**kwargs)
    net.pos_emb.emb = nn.Embedding.from_pretrained(state["pos_emb.emb.weight"])  # float64, frozen (scBERT)
    if version == "1.1.4":
        mapped = {}
        for key, value in state.items():
            if key == "performer.calls_since_last_redraw":
                mapped["performer.proj_updater.calls_since_last_redraw"] = value
                continue
            mapped[key] = value
            if key.startswith("performer.net."):
                mapped["performer.proj_updater.instance." + key[len("performer.net."):]] = value
        state = mapped
    net.load_state_dict(state, strict=True)
    return net


def mask_for_pretraining(tokens, generator):
    """15% of each cell's expressed genes become [MASK] (6); labels elsewhere are ignored (-100)."""
    import torch

    masked = tokens.clone()
    labels = torch.full_like(tokens, -100)
    for i, cell in enumerate(tokens):
        expressed = (cell[:-1] > 0).nonzero().flatten()
        count = max(1, int(round(0.15 * len(expressed))))
        chosen = expressed[torch.randperm(len(expressed), generator=generator)[:count]]
        labels[i, chosen] = cell[chosen]
        masked[i, chosen] = 6
    return masked, labels


def child(args) -> dict:
    import torch

    spec = CONFIGS[args.config]
    genes = args.genes
    result = {"config": args.config, "genes": genes, "task": args.task, "threads": torch.get_num_threads()}
    net = build_model(spec, genes, args.weights)
    all_tokens = torch.load(args.tokens, weights_only=True)
    precision = spec["precision"]
    if precision == "auto":  # what the scripts' --amp auto picks
        from train_utils import resolve_amp

        precision = "bf16" if resolve_amp("auto", torch.device("cpu")) == "bf16" else "fp32"
    result["precision"] = precision
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    runner = torch.compile(net) if spec.get("compile") else net

    def timed(fn, repeats):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    if args.task in ("infer", "profile-infer"):
        net.eval()
        per_batch = {}
        for batch in [1] + [b for b in args.batches if b > 1]:
            tokens = all_tokens[:batch]

            def forward():
                with torch.inference_mode() if not spec.get("compile") else torch.no_grad(), autocast():
                    return runner(tokens)

            start = time.perf_counter()
            logits = forward()
            first = time.perf_counter() - start
            if batch == 1:
                result["first_call_s"] = first
                result["logits_sample"] = logits[0, :64].float().argmax(-1).tolist()
            if args.task == "profile-infer":
                result["profile"] = profile(forward)
                return result
            times = timed(forward, args.repeats)
            per_batch[batch] = {"min": min(times) / batch, "median": statistics.median(times) / batch}
        result["infer"] = per_batch
    else:
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        tokens, labels = mask_for_pretraining(all_tokens[:1], generator)

        def step():
            with autocast():
                logits = runner(tokens)
            loss = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        start = time.perf_counter()
        loss = step()
        result["first_call_s"] = time.perf_counter() - start
        result["loss"] = float(loss)
        if args.task == "profile-train":
            step()
            result["profile"] = profile(step)
            return result
        step()  # the second step still allocates (Adam state) and may recompile
        times = timed(step, args.repeats)
        result["train"] = {"min": min(times), "median": statistics.median(times)}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return result


def compare_child(args) -> dict:
    """One (tree, task, batch) of --compare: the median seconds per cell over --repeats calls."""
    import torch

    net = build_model(CONFIGS["ours-default"], args.genes, args.weights, Path(args.tree))
    from train_utils import resolve_amp

    bf16 = resolve_amp("auto", torch.device("cpu")) == "bf16"
    tokens = torch.load(args.tokens, weights_only=True)[: args.batch]
    if args.task == "infer":
        net.eval()

        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return net(tokens)
        warm_up = 1
    else:
        net.train()
        optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        masked, labels = mask_for_pretraining(tokens, torch.Generator().manual_seed(1))

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(masked)
            torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        warm_up = 2  # the second step still allocates Adam's state
    for _ in range(warm_up):
        call()
    times = [timed_once(call) / args.batch for _ in range(args.repeats)]
    return {"tree": args.tree, "task": args.task, "genes": args.genes, "batch": args.batch,
            "median": statistics.median(times), "times": times}


COMPARE_CASES = (("infer", 2048, 1), ("infer", 2048, 4), ("train", 2048, 1), ("train", 2048, 4), ("infer", 16906, 1))


def compare_trees(args) -> None:
    """--compare REV: REV's tree against the working tree, alternating child processes."""
    old = OUT / f"compare_{args.compare}"
    if not old.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.compare], check=True,
                       capture_output=True)
    trees = {"old": old, "new": ROOT}
    revs = {name: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip() for name, tree in trees.items()}
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    revs["new"] += " + uncommitted changes" if dirty else ""
    log = OUT / f"compare_{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    rows = []
    for task, genes, batch in COMPARE_CASES:
        inputs = prepare_inputs(genes, cells=batch)
        medians = {"old": [], "new": []}
        # run -1 warms the inductor cache of each side (a cold compilation is not what is compared)
        for run in range(-1, args.compare_runs):
            for name in ("old", "new") if run % 2 == 0 else ("new", "old"):
                if args.quiet > 0:
                    wait_until_quiet(args)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", "compare", "--task", task,
                       "--genes", str(genes), "--batch", str(batch), "--repeats", str(args.repeats), "--weights",
                       inputs["weights"], "--tokens", inputs["tokens"], "--tree", str(trees[name])]
                env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SCBERT_"))}
                env["PYTHONPATH"] = str(trees[name])
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{name} {task} {genes} b={batch} failed: {(proc.stderr or proc.stdout)[-2000:]}")
                result = json.loads(lines[-1][len("RESULT "):])
                if run < 0:
                    continue
                medians[name].append(result["median"])
                with log.open("a") as f:
                    f.write(json.dumps({**result, "side": name, "run": run}) + "\n")
                print(json.dumps({"side": name, "task": task, "genes": genes, "batch": batch,
                                  "median_s_per_cell": round(result["median"], 4)}), flush=True)
        old_med, new_med = statistics.median(medians["old"]), statistics.median(medians["new"])
        spread = {k: max(v) / min(v) for k, v in medians.items()}
        quartiles = {k: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for k, v in medians.items()}
        iqr = {k: q[2] / q[0] for k, q in quartiles.items()}
        rows.append(f"| {task} | {genes:,} | {batch} | {old_med:.4f} | {new_med:.4f} | {new_med / old_med:.3f} "
                    f"| {spread['old']:.3f} / {spread['new']:.3f} | {iqr['old']:.3f} / {iqr['new']:.3f} |")
    lines = ["# Speed before and after a change (benchmarks/speed.py --compare)", "",
             f"Command: `{args.command}`  ",
             f"Old: {revs['old']}; new: {revs['new']}. ours-default (as the scripts run the model: bf16 autocast "
             f"where the CPU has bf16 matmuls, compile auto), {args.compare_runs} alternating child processes per "
             f"side and case, each the median of {args.repeats} calls after a warm-up; {os.cpu_count()} CPUs, "
             f"torch's default threads.", "",
             "| task | genes | batch | old s/cell (median) | new s/cell (median) | new / old | spread old / new "
             "(max / min) | quartile ratio old / new (Q3 / Q1) |", "|---|---|---|---|---|---|---|---|", *rows, ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"JSON log: {log}")


def profile(fn) -> str:
    """Top ops of one call, on one thread: the profiler records the calling thread only, and with
    several threads the fast path runs its chunks in worker threads."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    fn()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    torch.set_num_threads(threads)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60)


def matmul_peak(args) -> dict:
    import torch

    result = {"config": "matmul", "threads": torch.get_num_threads()}
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(4096, 4096).to(dtype)
        b = torch.randn(4096, 4096).to(dtype)
        a @ b
        best = min(timed_once(lambda: a @ b) for _ in range(args.repeats + 3))
        result[str(dtype).split(".")[-1]] = 2 * 4096**3 / best / 1e9
    return result


def timed_once(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# parent: run every child, write the table


def child_env(config: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    paths = [str(ROOT)]
    spec = CONFIGS.get(config, {})
    if spec.get("version") == "1.1.4":
        paths.insert(0, str(PP114))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(spec.get("env", {}))
    return env


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine from /proc/stat, in clock ticks."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def wait_until_quiet(args) -> float:
    """Waits (up to --quiet_timeout s) until other processes use < --quiet cores over 5 s; returns
    the cores they used in the last sample. The machine is shared: this keeps others' test runs out
    of the timings where possible, and the table reports what remained."""
    hz = os.sysconf("SC_CLK_TCK")
    deadline = time.time() + args.quiet_timeout
    while True:
        busy0, _ = cpu_jiffies()
        time.sleep(5)
        busy1, _ = cpu_jiffies()
        others = (busy1 - busy0) / hz / 5
        if others < args.quiet or time.time() > deadline:
            return others
        time.sleep(10)


def batches_for(genes: int, args) -> list[int]:
    if args.batches is not None:
        return args.batches
    return [2, 4] if genes <= 4096 else [2]  # the peers' fp32 temporaries grow ~1.5 GB per cell at 16,906


def run_child(config: str, task: str, genes: int, inputs: dict, args) -> dict:
    others_before = wait_until_quiet(args) if args.quiet > 0 else None
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", config, "--task", task,
           "--genes", str(genes), "--repeats", str(args.repeats), "--weights", inputs.get("weights", ""),
           "--tokens", inputs.get("tokens", ""), "--batches", ",".join(map(str, batches_for(genes, args)))]
    load_before = os.getloadavg()[0]
    busy0, _ = cpu_jiffies()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(config), capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy1, _ = cpu_jiffies()
    own = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    others = max(0.0, (busy1 - busy0) / os.sysconf("SC_CLK_TCK") - own) / wall  # other processes' cores
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"config": config, "task": task, "genes": genes, "error": " | ".join(tail), "wall_s": wall,
                "others_during": others}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(wall_s=wall, load_before=load_before, others_before=others_before, others_during=others)
    return result


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def write_report(results: list[dict], args, path: Path) -> str:
    peak = next((r for r in results if r.get("config") == "matmul"), {})
    bf16_peak, fp32_peak = peak.get("bfloat16"), peak.get("float32")
    lines = ["# Speed and memory: ours vs performer-pytorch (issue 7)", ""]
    lines.append(f"Command: `{args.command}`  ")
    lines.append(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                 f"torch threads {peak.get('threads')}; matmul peak measured in this run: "
                 f"bf16 {fmt(bf16_peak, 0)} GFLOP/s, fp32 {fmt(fp32_peak, 0)} GFLOP/s (4096^3).  ")
    lines.append("Times: wall-clock seconds per cell, minimum over the repeats (median in the JSON log). "
                 "RSS: peak resident set of the training child (whole process). The machine is shared: "
                 "each child waited for a quiet moment, and the last column gives the CPU cores other "
                 "processes used while it ran (infer / train); rows with more than ~0.3 are contended.")
    lines.append("")
    for genes in args.genes:
        fwd_flops, train_flops = model_flops(genes)
        rows = {}
        for r in results:
            if r.get("genes") != genes or r.get("config") == "matmul":
                continue
            rows.setdefault(r["config"], {})[r["task"]] = r
        lines.append(f"## {genes:,} genes (sequence {genes + 1:,}): {fwd_flops / 1e9:.1f} GFLOP forward, "
                     f"{train_flops / 1e9:.1f} GFLOP training step per cell")
        lines.append("")
        lines.append("| configuration | precision | infer s/cell (b=1) | infer s/cell (best b) | train step s/cell "
                     "| train peak RSS GB | infer MFU bf16 / fp32 | train MFU bf16 / fp32 | first call s (infer / train) | others' cores |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        summary = {}
        for config in [c for c in CONFIGS if c in rows]:
            infer = rows[config].get("infer", {})
            train = rows[config].get("train", {})
            err = infer.get("error") or train.get("error")
            per_batch = {int(k): v["min"] for k, v in infer.get("infer", {}).items()}
            b1 = per_batch.get(1)
            best_b = min(per_batch, key=per_batch.get) if per_batch else None
            t_train = train.get("train", {}).get("min")
            rss = train.get("peak_rss_gb")
            summary[config] = (b1, per_batch.get(best_b) if best_b else None, t_train, rss)

            def mfu(flops, t):
                if t is None or not bf16_peak:
                    return "—"
                return f"{flops / t / 1e9 / bf16_peak:.0%} / {flops / t / 1e9 / fp32_peak:.0%}"

            best_txt = f"{fmt(per_batch.get(best_b))} (b={best_b})" if best_b else "—"
            first = f"{fmt(infer.get('first_call_s'), 1)} / {fmt(train.get('first_call_s'), 1)}"
            load = f"{fmt(infer.get('others_during'), 2)} / {fmt(train.get('others_during'), 2)}"
            precision = infer.get("precision") or train.get("precision") or ""
            note = f" (error: {err})" if err else ""
            lines.append(f"| {config}{note} | {precision} | {fmt(b1)} | {best_txt} | {fmt(t_train)} | {fmt(rss, 2)} "
                         f"| {mfu(fwd_flops, b1)} | {mfu(train_flops, t_train)} | {first} | {load} |")
        lines.append("")
        lines += ratio_lines(summary, fwd_flops, bf16_peak)
        lines.append("")
    profiles = [r for r in results if r.get("task", "").startswith("profile") and r.get("profile")]
    for r in profiles:
        lines.append(f"## Profile: {r['config']}, {r['genes']:,} genes, {r['task'][len('profile-'):]} (top ops by self CPU time)")
        lines.append("")
        lines.append("```")
        lines.append(r["profile"].rstrip())
        lines.append("```")
        lines.append("")
    text = "\n".join(lines)
    path.write_text(text)
    return text


def ratio_lines(summary: dict, fwd_flops: float, bf16_peak: float | None) -> list[str]:
    ours = summary.get("ours-best") if summary.get("ours-best", (None,))[0] else summary.get("ours-default")
    default = summary.get("ours-default")
    peers = {k: v for k, v in summary.items() if k.startswith("peer")}
    if not default or not peers:
        return []
    out = ["| bar (issue 7) | peer | ours-default | ours-best | needed | met |", "|---|---|---|---|---|---|"]

    def best_of(index):
        values = [(v[index], k) for k, v in peers.items() if v[index] is not None]
        return min(values) if values else (None, None)

    def ratio(peer, mine, invert=False):
        if peer is None or mine is None:
            return None
        return mine / peer if invert else peer / mine

    best = summary.get("ours-best", (None, None, None, None))
    for label, index, need, invert in (("inference b=1 speed-up vs peer's fastest", 0, 2.0, False),
                                       ("training step speed-up vs peer's fastest", 2, 2.0, False),
                                       ("training peak RSS, ours / peer's lowest", 3, 1 / 3, True)):
        value, name = best_of(index)
        r_def, r_best = ratio(value, default[index], invert), ratio(value, best[index], invert)
        cands = [r for r in (r_def, r_best) if r is not None]
        met = (min(cands) <= need if invert else max(cands) >= need) if cands else None
        out.append(f"| {label} | {name} {fmt(value)} | {fmt(r_def, 2)}x | {fmt(r_best, 2)}x | "
                   f"{'<=' if invert else '>='} {need:.2f}x | {'yes' if met else 'no' if met is not None else '—'} |")
    published = summary.get("peer106-fp32", (None,))[0]
    if published:
        r_def, r_best = ratio(published, default[0]), ratio(published, best[0])
        met = max(r for r in (r_def, r_best) if r is not None) >= 15
        out.append(f"| inference vs the published code as run (peer106-fp32) | {fmt(published)} | {fmt(r_def, 1)}x "
                   f"| {fmt(r_best, 1)}x | >= 15x | {'yes' if met else 'no'} |")
    if bf16_peak and default[0]:
        limit = fwd_flops / (bf16_peak * 1e9)
        out.append(f"| distance to the bf16 matmul limit ({limit:.3f} s/cell) | — | {default[0] / limit:.1f}x "
                   f"| {fmt(best[0] / limit if best[0] else None, 1)}x | — | — |")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--genes", default=None, help="comma-separated panel sizes (default 16906,2048)")
    parser.add_argument("--configs", default=None, help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--tasks", default="infer,train", help="infer, train (profile is added for ours-default)")
    parser.add_argument("--batches", default=None,
                        help="extra inference batch sizes tried for 'best batch' (default 2, and 4 up to 4,096 genes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 3; 2 quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"2,048 genes, {', '.join(QUICK_CONFIGS)}, batch 1 only, 2 repeats, no profile")
    parser.add_argument("--no_profile", action="store_true")
    parser.add_argument("--out", default=None, help="report (default benchmarks/results_speed.md, "
                        "or results_compare.md with --compare)")
    parser.add_argument("--compare", default=None, metavar="REV",
                        help="time ours at git revision REV against the working tree instead (see above)")
    parser.add_argument("--compare_runs", type=int, default=5, help="child processes per side and case (--compare)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per child")
    parser.add_argument("--quiet", type=float, default=0.15,
                        help="before each child, wait until other processes use fewer cores than this (0: don't)")
    parser.add_argument("--quiet_timeout", type=int, default=900, help="longest wait for --quiet, seconds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    default_out = "results_compare.md" if args.compare else "results_speed.md"
    args.out = args.out or str(ROOT / "benchmarks" / default_out)
    if args.child:
        args.genes = int(args.genes)
        args.batches = [int(b) for b in (args.batches or "").split(",") if b]
        return args
    if args.compare:
        args.repeats = args.repeats or 3
        return args
    args.genes = [int(g) for g in (args.genes or ("2048" if args.quick else "16906,2048")).split(",")]
    args.configs = (args.configs.split(",") if args.configs else (QUICK_CONFIGS if args.quick else list(CONFIGS)))
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    args.tasks = args.tasks.split(",")
    args.batches = [] if args.quick and args.batches is None else (
        None if args.batches is None else [int(b) for b in args.batches.split(",") if b])
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.no_profile = args.no_profile or args.quick
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        runner = {"matmul": matmul_peak, "compare": compare_child}.get(args.config, child)
        print("RESULT " + json.dumps(runner(args)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    if args.compare:
        compare_trees(args)
        return
    if any(CONFIGS[c].get("version") == "1.1.4" for c in args.configs) and not PP114.exists():
        sys.exit(f"performer-pytorch 1.1.4 is not in {PP114}: pip install --no-deps --target {PP114} "
                 "performer-pytorch==1.1.4 (or leave out the peer114-* configurations)")
    log = OUT / f"speed_{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    results = []

    def record(result):
        results.append(result)
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")
        brief = {k: v for k, v in result.items() if k not in ("profile", "logits_sample")}
        print(json.dumps(brief), flush=True)

    print(f"load average before: {os.getloadavg()}", flush=True)
    record(run_child("matmul", "matmul", 0, {}, args))
    for genes in args.genes:
        inputs = prepare_inputs(genes, cells=max([1] + batches_for(genes, args)))
        for config in args.configs:
            for task in args.tasks:
                record(run_child(config, task, genes, inputs, args))
        if not args.no_profile and "ours-default" in args.configs:
            for task in ("profile-infer", "profile-train"):
                record(run_child("ours-default", task, genes, inputs, args))
    text = write_report(results, args, Path(args.out))
    print(text)
    print(f"\nJSON log: {log}")


if __name__ == "__main__":
    main()
