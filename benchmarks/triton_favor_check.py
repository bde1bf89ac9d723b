"""The Triton FAVOR+ kernels on a GPU: what the CPU tests cannot check (bfloat16 tensor-core dots,
real launches, speed). One prepared run:

1. accuracy: values and q/k/v gradients against the float64 reference on the same GPU at a mid shape
   (default 2,048 positions, the published heads, head width and features), in float32 and bfloat16,
   for each feature block size; also with ties of the key maximum (duplicated keys);
2. speed at the published shape (16,907 positions, 10 heads of 64, 266 features): ms per cell-layer
   of FAVOR+ alone, forward and forward + backward, for the kernels at each feature block size, the
   chunked engine (kernels.favor) and the plain reference.

Usage: python benchmarks/triton_favor_check.py [--positions 16907] [--batch 1] [--blocks 32 64 128]
Prints a markdown table. `--tiny` runs a few positions on the CPU under Triton's interpreter (no
speed), which the tests use to keep this script working.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import favor as engine  # noqa: E402
from kernels import triton_favor  # noqa: E402
from kernels.plan import make_plan  # noqa: E402
from kernels.settings import get_execution  # noqa: E402
from model import favor_attention_reference, orthogonal_gaussian_matrix  # noqa: E402


def inputs(b, n, h, d, m, dtype, device, seed=0, tie=False):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=generator, dtype=torch.float64)
    if tie:
        qkv[:, n // 2:, 1] = qkv[:, : n - n // 2, 1]  # every key twice: the key maximum ties
    proj = orthogonal_gaussian_matrix(m, d, generator=generator)
    return qkv.to(device), proj.to(device)


def errors(qkv, proj, dtype, blocks) -> tuple[float, float]:
    """(output error, largest q/k/v gradient error), each relative to the reference's largest entry."""
    leaf = qkv.to(dtype).double().requires_grad_()
    ref = favor_attention_reference(*leaf.unbind(2), proj.double())
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ours_leaf = qkv.to(dtype).requires_grad_()
    out = triton_favor.favor_attention(*ours_leaf.unbind(2), proj.float(), blocks)
    out.backward(grad.to(dtype))
    rel = lambda x, r: ((x.double() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    return rel(out, ref), max(rel(ours_leaf.grad[:, :, i], leaf.grad[:, :, i]) for i in range(3))


def milliseconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main(args) -> None:
    device = torch.device("cpu" if args.tiny else "cuda")
    h, d, m = (2, 16, 40) if args.tiny else (10, 64, 266)
    n_check = 70 if args.tiny else args.check_positions
    block_n = 16 if args.tiny else triton_favor.GPU_BLOCKS.block_n
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        if not triton_favor.available(device, dtype):
            print(f"the kernels do not run on {device} with {dtype}")
            continue
        for block_m in args.blocks:
            blocks = triton_favor.GPU_BLOCKS._replace(block_n=block_n, block_m=block_m)
            if args.tiny:
                blocks = blocks._replace(num_warps=1, num_stages=1)
            for tie in (False, True):
                qkv, proj = inputs(1, n_check, h, d, m, dtype, device, tie=tie)
                out_error, grad_error = errors(qkv, proj, dtype, blocks)
                rows.append(f"| accuracy | {dtype} | {block_m} | {'ties' if tie else 'random'} | "
                            f"{out_error:.1e} | {grad_error:.1e} |")
    print("| check | dtype | feature block | keys | output error | gradient error |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.tiny:
        return

    b, n = args.batch, args.positions
    print(f"\n| FAVOR+ at ({b}, {n}, {h}, {d}), m = {m} | dtype | forward ms/cell | forward + backward ms/cell |")
    print("|---|---|---|---|")
    plan = make_plan(get_execution(), device, b, n)
    for dtype in (torch.bfloat16, torch.float32):
        qkv, proj = inputs(b, n, h, d, m, dtype, device)
        leaf = qkv.to(dtype).requires_grad_()
        grad = torch.randn(b, n, h, d, device=device, dtype=dtype)
        ways = {f"triton, feature block {block_m}":
                (lambda q, k, v, bm=block_m: triton_favor.favor_attention(
                    q, k, v, proj, triton_favor.GPU_BLOCKS._replace(block_m=bm)))
                for block_m in args.blocks}
        ways["chunked engine (kernels.favor)"] = lambda q, k, v: engine.favor_attention(q, k, v, proj, plan)
        ways["reference (feature maps)"] = lambda q, k, v: favor_attention_reference(q, k, v, proj.to(dtype))
        for name, way in ways.items():
            with torch.no_grad():
                forward = milliseconds(lambda: way(*leaf.unbind(2)), args.repeats) / b
            both = milliseconds(lambda: way(*leaf.unbind(2)).backward(grad), args.repeats) / b
            print(f"| {name} | {dtype} | {forward:.2f} | {both:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=16907)
    parser.add_argument("--check_positions", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128], help="feature block sizes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a CPU smoke run under Triton's interpreter")
    main(parser.parse_args())
