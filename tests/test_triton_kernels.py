"""The fused Triton FAVOR+ kernels (kernels.triton_favor) against the float64 reference, values and
gradients, at awkward shapes. Without a CUDA GPU the kernels run in Triton's interpreter: this file
sets TRITON_INTERPRET=1 before anything imports the kernels (kernels itself never imports triton).
The interpreter runs one program at a time and its bfloat16 dot is wrong, so there the kernels cast
dot operands to float32: bfloat16 storage and casts are tested here, bfloat16 tensor-core dots are
not. The compile checks build the kernels for sm_90 and sm_80 in a subprocess without the
interpreter (whose kernels cannot be compiled)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from helpers import ROOT  # noqa: E402
from kernels import favor as engine  # noqa: E402
from kernels import triton_favor  # noqa: E402
from kernels.plan import make_plan  # noqa: E402
from kernels.settings import ExecutionSettings  # noqa: E402
from model import KERNEL_EPS, favor_attention_reference, orthogonal_gaussian_matrix  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_favor.triton_importable(),
                                reason="triton (the compiler of the CUDA kernels) is not installed")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = triton_favor.Blocks(block_n=16, block_m=16, key_tiles=2, num_warps=1, num_stages=1)

# (b, n, h, d, m, blocks): position tails, m not a multiple of the feature block, several key
# programs per head (merged), d not a power of two, n below one tile, 300 positions
SHAPES = [
    (2, 70, 2, 16, 40, SMALL),
    (1, 9, 3, 24, 17, SMALL),
    (1, 300, 2, 16, 40, triton_favor.Blocks(block_n=32, block_m=32, key_tiles=3, num_warps=1, num_stages=1)),
]


def reference(q, k, v, projection, detach=()):
    """model.favor_attention_reference in float64, with the key maximum ("keys") or the queries'
    row maxima ("queries") optionally detached: what a kernel would compute if it lost the
    gradient through them."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    c = q.shape[-1] ** -0.25
    w = c * projection.to(q.dtype)

    def features(x, kind):
        p = x @ w.t()
        top = p.amax(-1, keepdim=True) if kind == "queries" else p.amax((1, 2, 3), keepdim=True)
        top = top.detach() if kind in detach else top
        return torch.exp(p - (x * x).sum(-1, keepdim=True) * (c * c / 2) - top) + KERNEL_EPS

    fq, fk = features(q, "queries"), features(k, "keys")
    out = (fq @ (fk.transpose(-1, -2) @ v)) / (fq @ fk.sum(2)[..., None])
    return out.transpose(1, 2)


def qkv_views(qkv: torch.Tensor, dtype: torch.dtype):
    """Strided q, k, v (b, n, h, d) views of one (b, n, 3, h, d) leaf, as the model makes them."""
    leaf = qkv.to(DEVICE, dtype).requires_grad_()
    return leaf, leaf.unbind(2)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()


def grad_errors(leaf: torch.Tensor, ref_leaf: torch.Tensor) -> list[float]:
    """Per q, k, v: the largest error of the gradient relative to its largest entry."""
    return [relative_error(leaf.grad[:, :, i], ref_leaf.grad[:, :, i]) for i in range(3)]


@pytest.mark.parametrize("b, n, h, d, m, blocks", SHAPES)
def test_values_and_gradients_match_the_float64_reference(b, n, h, d, m, blocks):
    generator = torch.Generator().manual_seed(n)
    qkv = torch.randn(b, n, 3, h, d, generator=generator, dtype=torch.float64)
    proj = orthogonal_gaussian_matrix(m, d, generator=generator)
    ref_leaf = qkv.clone().requires_grad_()
    ref = favor_attention_reference(*ref_leaf.unbind(2), proj.double())
    leaf, (q, k, v) = qkv_views(qkv, torch.float32)
    assert not q.is_contiguous()

    out = triton_favor.favor_attention(q, k, v, proj.to(DEVICE), blocks)
    assert out.dtype == torch.float32 and out.shape == (b, n, h, d)
    assert relative_error(out, ref) < 1e-5
    plan = make_plan(ExecutionSettings(compile="off", threads=1), "cpu", b, n, h, m, torch.float32)
    chunked = engine.favor_attention(*qkv.float().unbind(2), proj, plan)  # today's engine, the same function
    assert relative_error(out, chunked.double()) < 1e-5

    grad = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    ref.backward(grad)
    out.backward(grad.to(DEVICE, out.dtype))
    assert max(grad_errors(leaf, ref_leaf)) < 1e-5


def test_bfloat16_storage_with_float32_accumulation():
    b, n, h, d, m = 2, 70, 2, 16, 40
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(b, n, 3, h, d, generator=generator, dtype=torch.float64).bfloat16().double()
    # d = 16: c = 1/2, so c W in bfloat16 (what the kernels multiply by) is c times W in bfloat16
    proj = orthogonal_gaussian_matrix(m, d, generator=generator).bfloat16()
    ref_leaf = qkv.clone().requires_grad_()
    ref = favor_attention_reference(*ref_leaf.unbind(2), proj.double())
    leaf, (q, k, v) = qkv_views(qkv, torch.bfloat16)
    out = triton_favor.favor_attention(q, k, v, proj.float().to(DEVICE), SMALL)
    assert out.dtype == torch.bfloat16
    error = relative_error(out, ref)
    assert 1e-4 < error < 1e-2  # bfloat16 output and context, not float32 in disguise
    grad = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    ref.backward(grad)
    out.backward(grad.to(DEVICE, out.dtype))
    assert leaf.grad.dtype == torch.bfloat16
    assert max(grad_errors(leaf, ref_leaf)) < 2e-2


def tied_inputs():
    """Dyadic inputs (d = 16, so c = 1/2: every projection exact in float32 and float64) whose key
    maximum is attained 4 times in cell 0 (two positions, in different heads, key programs and
    tiles, times two equal features in different feature blocks) and twice in cell 1 (the last,
    partial tile), and many of whose query rows tie at their maximum."""
    b, n, h, d, m = 2, 70, 2, 16, 40
    generator = torch.Generator().manual_seed(1)
    proj = torch.randint(-2, 3, (m, d), generator=generator).double() / 2
    proj[37] = proj[5]
    qkv = torch.randint(-3, 4, (b, n, 3, h, d), generator=generator).double() / 4
    for cell, position, head in [(0, 3, 0), (0, 50, 1), (1, 69, 0)]:
        qkv[cell, position, 1, head] = 2 * proj[5]  # the largest key projection
    return qkv, proj


def test_ties_in_the_maxima_share_their_gradients():
    qkv, proj = tied_inputs()
    q, k, _ = qkv.unbind(2)
    w = 0.5 * proj
    p_keys = k.transpose(1, 2) @ w.t()  # (b, h, n, m)
    key_ties = (p_keys == p_keys.amax((1, 2, 3), keepdim=True)).sum((1, 2, 3))
    p_queries = q.transpose(1, 2) @ w.t()
    row_ties = (p_queries == p_queries.amax(-1, keepdim=True)).sum(-1)  # (b, h, n)
    assert key_ties.tolist() == [4, 2] and (row_ties > 1).sum() > 10

    state = torch.ops.scbert.triton_favor(*qkv.float().to(DEVICE).unbind(2), w.float().to(DEVICE), *SMALL, False)
    assert state[5].tolist() == [4.0, 2.0]  # the key maximum's ties, counted in the forward
    assert torch.equal(state[8].cpu(), row_ties.float())

    grad = torch.randn(qkv.shape[:2] + qkv.shape[3:], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_leaf = qkv.clone().requires_grad_()
    reference(*ref_leaf.unbind(2), proj).backward(grad)
    leaf, views = qkv_views(qkv, torch.float32)
    triton_favor.favor_attention(*views, proj.float().to(DEVICE), SMALL).backward(grad.to(DEVICE, torch.float32))
    assert max(grad_errors(leaf, ref_leaf)) < 1e-5
    # the test sees the gradient through each maximum: without it dq or dk would be far off
    for detached, index in (("queries", 0), ("keys", 1)):
        lost = qkv.clone().requires_grad_()
        reference(*lost.unbind(2), proj, detach=(detached,)).backward(grad)
        assert grad_errors(lost, ref_leaf)[index] > 10 * 1e-5

    with torch.no_grad():
        assert torch.allclose(reference(*qkv.unbind(2), proj), favor_attention_reference(*qkv.unbind(2), proj),
                              rtol=0, atol=1e-14)


def small_op_inputs(requires_grad: bool = True):
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 20, 3, 1, 16, generator=generator).to(DEVICE)
    q, k, v = (t.requires_grad_(requires_grad) for t in qkv.unbind(2))
    w = triton_favor.scaled_projection(orthogonal_gaussian_matrix(20, 16, generator=generator), torch.float32)
    return q, k, v, w.to(DEVICE)


def test_custom_ops_pass_opcheck():
    """Schema, fake (shape) functions, autograd registration and AOT dispatch of both ops."""
    q, k, v, w = small_op_inputs()
    config = (*SMALL, False)
    torch.library.opcheck(torch.ops.scbert.triton_favor.default, (q, k, v, w, *config))
    with torch.no_grad():
        out, *state = torch.ops.scbert.triton_favor(q, k, v, w, *config)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.scbert.triton_favor_backward.default,
                          (q.detach(), k.detach(), v.detach(), w, out, grad, *state, *config),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_traces_the_op_with_fake_tensors():
    q, k, v, w = small_op_inputs()
    proj = w * 16**0.25

    def loss(q, k, v):
        return triton_favor.favor_attention(q, k, v, proj, SMALL).square().sum()

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep_graph(module, inputs):  # AOTAutograd traced it with fake tensors; run it as it is
        graphs.append(str(module.graph))
        return make_boxed_func(module)

    compiled = torch.compile(loss, backend=aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph),
                             fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, e in zip(grads, eager):
        assert torch.equal(g, e)
    assert len(graphs) == 2 and "scbert.triton_favor.default" in graphs[0]
    assert "scbert.triton_favor_backward.default" in graphs[1]

    # the published shape, as fake tensors: the fake functions give every output's shape and dtype
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(2, 16907, 3, 10, 64, dtype=torch.bfloat16, device=DEVICE)
        proj = torch.empty(266, 64, device=DEVICE)
        q, k, v = qkv.unbind(2)
        w = triton_favor.scaled_projection(proj, torch.bfloat16)
        out, context, k_sum, v_sum, key_max, key_count, row_max, den, row_count = torch.ops.scbert.triton_favor(
            q, k, v, w, *triton_favor.GPU_BLOCKS, False)
        assert out.shape == (2, 16907, 10, 64) and out.dtype == torch.bfloat16
        assert context.shape == (2, 10, 266, 64) and context.dtype == torch.float32
        assert key_max.shape == key_count.shape == (2,) and row_max.shape == den.shape == (2, 10, 16907)
        dq, dk, dv = torch.ops.scbert.triton_favor_backward(q, k, v, w, out, out, context, k_sum, v_sum, key_max,
                                                            key_count, row_max, den, row_count,
                                                            *triton_favor.GPU_BLOCKS, False)
        assert dq.shape == q.shape and dk.dtype == torch.bfloat16


def test_availability_and_refused_inputs():
    cpu = torch.device("cpu")
    assert triton_favor.available(cpu, torch.float32) == triton_favor.interpreting()
    assert triton_favor.available(cpu, torch.bfloat16) == triton_favor.interpreting()
    assert not triton_favor.available(cpu, torch.float16)
    assert not triton_favor.available(cpu, torch.float64)
    if not torch.cuda.is_available():
        assert not triton_favor.available(torch.device("cuda"), torch.bfloat16)
    q, k, v, w = small_op_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="one dtype"):
        triton_favor.favor_attention(q.half(), k.half(), v.half(), w * 2)
    with pytest.raises(ValueError, match="shape"):
        triton_favor.favor_attention(q, k[:, :5], v, w * 2)


def test_kernels_import_without_triton():
    """triton is a dev requirement only: `import kernels` and the module itself must not need it."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels, kernels.triton_favor as t\n"
            "assert not t.available(torch.device('cpu'), torch.float32)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)


COMPILE_CHECK = """
import json, sys
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as error:
    print("API:", error); sys.exit(3)
from kernels import triton_favor
try:
    report = [row for capability in (90, 80) for row in triton_favor.compile_report(capability)]
except (TypeError, AttributeError, KeyError) as error:
    print("API:", type(error).__name__, error); sys.exit(3)
print(json.dumps(report))
"""

SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # per block, opted in


def test_kernels_compile_for_hopper_and_ampere_without_spills(tmp_path):
    """Compile-only (no GPU needed): the kernels at the GPU block sizes, bfloat16, d = 64, for sm_90
    and sm_80; zero spills, and registers and shared memory within each architecture's limits."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's default, said explicitly (3.9 warns when unset)
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode == 3:
        pytest.skip(f"this triton's API for compiling CUDA kernels without a GPU differs: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n".join(json.dumps(row) for row in report))
    assert len(report) == 8
    for row in report:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] <= 255, row
        assert row["shared_bytes"] + row["static_shared_bytes"] <= SHARED_MEMORY_LIMIT[row["capability"]], row
