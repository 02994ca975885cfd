"""Attention backends against a float64 oracle, on CPU.

    cd /work/main && .venv/bin/python -m pytest -q tests/test_attention.py

Covered backends show up in the test ids: [math...], [sdpa...], [triton...]. The Triton kernels run
in Triton's CPU interpreter (TRITON_INTERPRET=1) inside ONE worker process that this module starts
(`triton_worker`): Triton fixes compiled-vs-interpreted when a kernel (or triton.language itself)
is defined, so the variable must be set before triton is imported, and only there; this process,
the other test files and a GPU run never see interpreted kernels. Without triton installed those
tests are reported as SKIPPED with the reason (`pytest -ra`); CI installs triton (the `test` extra)
so they run. Sizes are tiny: the interpreter executes every block in numpy.

The oracle builds its mask with explicit loops straight from the definition: query i (absolute
position S - T + i) sees key j iff j <= S - T + i and, with document ids, q_doc[i] == k_doc[j];
its softmax is float64.
"""
import contextlib
import importlib.util
import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

import minillm.attention as attn_mod
from minillm.attention import attention, math_attention, visibility_mask


# ------------------------------------------------------------------------------------- the oracle
def oracle_mask(B, T, S, q_doc, k_doc):
    mask = torch.zeros(B, T, S, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(S):
                same_doc = q_doc is None or int(q_doc[b, i]) == int(k_doc[b, j])
                mask[b, i, j] = j <= S - T + i and same_doc
    return mask


def oracle_attention(q, k, v, q_doc=None, k_doc=None):
    """float64 softmax(q k^T / sqrt(d)) v, query head h reading K/V head h // (H / Hkv)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    head_of = torch.tensor([h // (H // Hkv) for h in range(H)])
    k64, v64 = k.double()[:, head_of], v.double()[:, head_of]
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k64) / D ** 0.5
    mask = oracle_mask(B, T, S, q_doc, k_doc)[:, None]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bhsd->bhtd", probs, v64)


def packed_doc_ids(B, T, gen, max_docs=4):
    """Non-decreasing document ids per row, like packed training rows (random boundaries)."""
    rows = []
    for _ in range(B):
        cuts = torch.randint(1, T, (max_docs - 1,), generator=gen).sort().values
        rows.append(torch.bucketize(torch.arange(T), cuts, right=True))
    return torch.stack(rows)


def make_inputs(B, H, Hkv, T, S, D, docs, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    k_doc = packed_doc_ids(B, S, gen) if docs else None
    q_doc = k_doc[:, S - T:] if docs else None
    w = torch.randn(B, H, T, D, generator=gen)  # loss = sum(out * w): a non-trivial upstream gradient
    return q, k, v, q_doc, k_doc, w


def out_and_grads(fn, q, k, v, q_doc, k_doc, w):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, q_doc, k_doc)
    grads = torch.autograd.grad((out.double() * w.double()).sum(), (q, k, v))
    return [out.detach(), *grads]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_all(got, want, tol, what):
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), f"{what}: {name} has non-finite values"
        err = rel_err(g, r)
        assert err < tol, f"{what}: {name} relative error {err:.2e} >= {tol:.0e}"


def forced(backend):
    return lambda q, k, v, q_doc, k_doc: attention(q, k, v, q_doc, k_doc, backend=backend)


# (B, H, Hkv, T, S, head_dim, docs); S > T is a KV cache (decoding), which Triton does not take.
CASES = {
    "causal": (2, 4, 4, 37, 37, 16, False),
    "docs": (2, 4, 4, 37, 37, 16, True),
    "gqa-docs": (2, 6, 2, 37, 37, 32, True),
    "mqa-docs-T70": (1, 4, 1, 70, 70, 16, True),
    "cache-docs": (2, 4, 2, 7, 40, 16, True),
    "cache-causal": (2, 4, 2, 5, 29, 16, False),
    "decode-step": (2, 4, 2, 1, 29, 16, False),
}
TRAINING_CASES = [c for c, shape in CASES.items() if shape[3] == shape[4]]


# ------------------------------------------------------- checks, run here or in the Triton worker
def check_matches_math_fp32(backend, case):
    """Forward and gradients within 1e-3 relative of the math path and of the oracle."""
    q, k, v, q_doc, k_doc, w = make_inputs(*CASES[case])
    got = out_and_grads(forced(backend), q, k, v, q_doc, k_doc, w)
    assert_close_all(got, out_and_grads(math_attention, q, k, v, q_doc, k_doc, w), 1e-3, f"{backend} {case}")
    truth = out_and_grads(oracle_attention, q, k, v, q_doc, k_doc, w)
    assert_close_all(got, truth, 1e-3, f"{backend} {case} vs oracle")


def check_matches_math_16bit(backend, dtype):
    """bf16 / fp16 inputs: within 1e-2 of the math path on the same inputs and of the float64 truth."""
    q, k, v, q_doc, k_doc, w = make_inputs(*CASES["gqa-docs"], dtype=dtype)
    got = out_and_grads(forced(backend), q, k, v, q_doc, k_doc, w)
    assert got[0].dtype == dtype
    ref = out_and_grads(math_attention, q, k, v, q_doc, k_doc, w)
    assert_close_all(got, ref, 1e-2, f"{backend} {dtype} vs math")
    truth = out_and_grads(oracle_attention, q, k, v, q_doc, k_doc, w)
    assert_close_all(got, truth, 1e-2, f"{backend} {dtype} vs oracle")


def check_no_cross_document(backend):
    """Changing the keys/values of document 1 changes nothing for the queries of documents 0 and 2,
    and their loss has zero gradient with respect to document 1's keys and values."""
    q, k, v, _, _, w = make_inputs(2, 4, 2, 37, 37, 16, False)
    doc = torch.tensor([[0] * 12 + [1] * 13 + [2] * 12, [0] * 3 + [1] * 30 + [2] * 4])
    other = (doc == 1)[:, None, :, None]  # [B, 1, T, 1]
    gen = torch.Generator().manual_seed(1)
    k2 = torch.where(other, 10 * torch.randn(k.shape, generator=gen), k)
    v2 = torch.where(other, 10 * torch.randn(v.shape, generator=gen), v)
    w = w * ~other  # loss over documents 0 and 2 only
    base = out_and_grads(forced(backend), q, k, v, doc, doc, w)
    moved = out_and_grads(forced(backend), q, k2, v2, doc, doc, w)
    rows = ~other.expand_as(base[0])
    assert (base[0] - moved[0])[rows].abs().max() < 1e-6, "a query saw another document's keys"
    assert (base[0] - moved[0])[~rows].abs().max() > 1e-2  # the perturbation did reach document 1
    assert moved[2][other.expand_as(moved[2])].abs().max() == 0  # d loss / d k of document 1
    assert moved[3][other.expand_as(moved[3])].abs().max() == 0


def training_losses(backend, steps=3):
    """Losses of a few plain SGD steps of the tiny GQA model on packed documents (SGD by hand:
    constructing a torch.optim optimizer imports torch._dynamo, seconds of test time)."""
    from minillm.model import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=64, attn_backend=backend))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (1, 40), generator=gen)
    doc = packed_doc_ids(1, 40, gen, max_docs=3)
    losses = []
    with contextlib.redirect_stdout(io.StringIO()):  # the dispatcher's one-line notice
        for _ in range(steps):
            logits = model(ids, doc_ids=doc)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.5 * p.grad
            losses.append(loss.item())
    return losses


# Triton-only checks (they run in the worker, where the kernel module is interpreted).
def kernels():
    from minillm.kernels import load_triton_attention
    module = load_triton_attention()
    assert module.INTERPRETED
    return module


def check_triton_uneven_block_shapes():
    """Tiles BLOCK_M != BLOCK_N in every kernel, T = 45 not a multiple of either, MQA, hd 32."""
    q, k, v, q_doc, k_doc, w = make_inputs(2, 4, 1, 45, 45, 32, True, seed=5)
    blocks = {"fwd": (16, 8), "dkdv": (8, 16), "dq": (16, 8)}

    def fn(q, k, v, q_doc, k_doc):
        return kernels().flash_attention(q, k, v, q_doc, k_doc, block_sizes=blocks)

    assert_close_all(out_and_grads(fn, q, k, v, q_doc, k_doc, w),
                     out_and_grads(oracle_attention, q, k, v, q_doc, k_doc, w), 1e-3, "uneven blocks")


def check_triton_doc_tables():
    doc = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 0, 1, 1, 1]])  # row 1 is not sorted
    _, _, kv_lo, q_hi, mono = kernels().doc_tables(doc, doc, 6)
    assert mono.tolist() == [1, 0]
    assert kv_lo.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]  # first key of each query's document
    assert q_hi.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6]  # one past the last query of each key's doc


def poisoned_layout():
    """Docs 0 | 1 | 2 on 16-token blocks (the interpreter's tile); document 1 fills key block 1
    exactly, and its keys and values are NaN."""
    doc = torch.tensor([[0] * 16 + [1] * 16 + [2] * 13])
    q, k, v, _, _, w = make_inputs(1, 2, 2, 45, 45, 16, False, seed=2)
    poison = (doc == 1)[:, None, :, None]
    k_nan = torch.where(poison, float("nan"), k)
    v_nan = torch.where(poison, float("nan"), v)
    return q, k, v, k_nan, v_nan, doc, poison, w * ~poison


def check_triton_skips_other_documents_blocks():
    """A masked-but-loaded NaN block would leak (0 * NaN in P V, or through D = rowsum(dO * O) in
    dK); a skipped one cannot. So documents 0 and 2 must come out finite and exact, forward and
    all three gradients."""
    q, k, v, k_nan, v_nan, doc, poison, w = poisoned_layout()
    got = out_and_grads(kernels().flash_attention, q, k_nan, v_nan, doc, doc, w)
    want = out_and_grads(oracle_attention, q, k, v, doc, doc, w)
    keep = ~poison.expand(1, 2, 45, 16)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(g[keep]).all(), f"{name}: a block of another document was read"
        assert rel_err(g[keep], r[keep]) < 1e-4, name


def check_triton_unsorted_doc_ids():
    """Rows whose ids are not non-decreasing get no skipping but stay exact; and with skipping
    switched off the NaN layout above does leak, which shows the skip check can fail."""
    module = kernels()
    q, k, v, _, _, w = make_inputs(2, 4, 2, 37, 37, 16, False, seed=4)
    doc = torch.tensor([[2] * 10 + [0] * 15 + [2] * 12, [0] * 5 + [1] * 20 + [0] * 12])
    fn = module.flash_attention
    assert_close_all(out_and_grads(fn, q, k, v, doc, doc, w),
                     out_and_grads(oracle_attention, q, k, v, doc, doc, w), 1e-3, "unsorted docs")

    real_tables = module.doc_tables

    def tables_without_skipping(q_doc, k_doc, T):
        q_doc, k_doc, kv_lo, q_hi, mono = real_tables(q_doc, k_doc, T)
        return q_doc, k_doc, torch.zeros_like(kv_lo), torch.full_like(q_hi, T), torch.zeros_like(mono)

    module.doc_tables = tables_without_skipping
    try:
        q, k, v, k_nan, v_nan, doc, poison, w = poisoned_layout()
        out = out_and_grads(fn, q, k_nan, v_nan, doc, doc, w)
    finally:
        module.doc_tables = real_tables
    assert not torch.isfinite(out[0][~poison.expand(1, 2, 45, 16)]).all()


def check_forced_triton_falls_back_for_kv_cache():
    """--attn triton with a KV cache (S > T): sdpa does it, and says so once."""
    attn_mod._announced.clear()
    q, k, v, q_doc, k_doc, _ = make_inputs(*CASES["cache-docs"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = attention(q, k, v, q_doc, k_doc, backend="triton", announce=True)
        attention(q, k, v, q_doc, k_doc, backend="triton", announce=True)
    assert printed.getvalue() == "attention: sdpa (triton requested; query length != key length (KV cache))\n"
    assert rel_err(out, oracle_attention(q, k, v, q_doc, k_doc)) < 1e-5


def counting_forward_launches(module):
    """Wrap the kernel module's forward launcher; returns the list that records each launch."""
    calls = []
    real = module._forward

    def counted(*args):
        calls.append(1)
        return real(*args)

    module._forward = counted
    return calls, real


def check_triton_selective_checkpointing_keeps_the_kernel_output():
    """The kernel is the custom op minillm::flash_attention, so selective checkpointing keeps its
    output and reruns only the elementwise work around it: one forward launch, where full
    checkpointing makes two. Gradients equal the unchecked ones either way."""
    from torch.utils.checkpoint import checkpoint, noop_context_fn

    from minillm.model import _selective_context
    module = kernels()
    q, k, v, q_doc, k_doc, w = make_inputs(*CASES["gqa-docs"])

    def block(q, k, v):
        return torch.tanh(module.flash_attention(q * 1.5, k, v, q_doc, k_doc)) * 2

    want = out_and_grads(lambda q, k, v, *_: block(q, k, v), q, k, v, q_doc, k_doc, w)
    launches = {}
    for name, context in (("selective", _selective_context), ("full", noop_context_fn)):
        calls, real = counting_forward_launches(module)
        try:
            fn = lambda q, k, v, *_: checkpoint(block, q, k, v, use_reentrant=False, context_fn=context)  # noqa: E731
            got = out_and_grads(fn, q, k, v, q_doc, k_doc, w)
        finally:
            module._forward = real
        assert_close_all(got, want, 1e-6, name)
        launches[name] = len(calls)
    assert launches == {"selective": 1, "full": 2}


def check_triton_under_torch_compile():
    """torch.compile around the kernel (the scripts' --compile with --attn triton) calls the custom
    op as an opaque node: same output and gradients as eager, and the kernel really ran."""
    import torch._dynamo
    module = kernels()
    q, k, v, q_doc, k_doc, w = make_inputs(*CASES["gqa-docs"])

    def block(q, k, v, q_doc, k_doc):
        return torch.nn.functional.silu(module.flash_attention(q * 1.5, k, v, q_doc, k_doc)) + q

    want = out_and_grads(block, q, k, v, q_doc, k_doc, w)
    torch._dynamo.reset()
    calls, real = counting_forward_launches(module)
    try:
        got = out_and_grads(torch.compile(block, fullgraph=True), q, k, v, q_doc, k_doc, w)
    finally:
        module._forward = real
    assert_close_all(got, want, 1e-5, "compiled")
    assert len(calls) == 1


# -------------------------------------------------------------------------- the Triton worker
def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # blocked or half-removed
        return False


def _enter_interpreter():
    """Worker initializer: runs before anything in the worker imports triton."""
    assert "triton" not in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def triton_worker():
    """Run a check in a process where Triton interprets kernels on CPU: worker(fn, *args)."""
    if not triton_installed():
        pytest.skip("triton not installed: the Triton backend is NOT covered (pip install triton)")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_enter_interpreter)
    with pool:
        yield lambda fn, *args: pool.submit(fn, *args).result()


@pytest.fixture
def run_check(request):
    """run_check(backend, fn, *args): math and sdpa run here, triton in the interpreter worker."""
    def run(backend, fn, *args):
        if backend == "triton":
            return request.getfixturevalue("triton_worker")(fn, *args)
        return fn(*args)
    return run


# ------------------------------------------------------------------------------ math vs the oracle
def test_oracle_mask_by_hand():
    """The oracle's mask on a hand-checked example: S=4 keys, T=2 queries at positions 2 and 3."""
    doc = torch.tensor([[0, 0, 1, 1]])
    assert oracle_mask(1, 2, 4, doc[:, 2:], doc)[0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    assert oracle_mask(1, 2, 4, None, None)[0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("case", list(CASES))
def test_math_matches_float64_oracle(case):
    q, k, v, q_doc, k_doc, w = make_inputs(*CASES[case])
    got = out_and_grads(math_attention, q, k, v, q_doc, k_doc, w)
    want = out_and_grads(oracle_attention, q, k, v, q_doc, k_doc, w)
    assert_close_all(got, want, 1e-5, f"math {case}")


def test_visibility_mask_matches_oracle():
    gen = torch.Generator().manual_seed(3)
    doc = packed_doc_ids(3, 19, gen)
    assert torch.equal(visibility_mask(6, 19, doc[:, 13:], doc)[:, 0], oracle_mask(3, 6, 19, doc[:, 13:], doc))


def test_math_row_without_visible_key_gives_zeros_not_nan():
    """Query 0's document (7) has no key: out 0, gradients finite (and 0 for that row)."""
    q, k, v, _, _, w = make_inputs(1, 2, 1, 4, 4, 16, False)
    q_doc = torch.tensor([[7, 0, 0, 1]])
    k_doc = torch.tensor([[0, 0, 0, 1]])
    out, dq, dk, dv = out_and_grads(math_attention, q, k, v, q_doc, k_doc, w)
    assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))
    assert out[:, :, 0].abs().max() == 0 and dq[:, :, 0].abs().max() == 0
    assert rel_err(out[:, :, 1:], oracle_attention(q, k, v, q_doc, k_doc)[:, :, 1:]) < 1e-6


# --------------------------------------------------------------------------- backends vs math
@pytest.mark.parametrize("backend,case", [("sdpa", c) for c in CASES] + [("triton", c) for c in TRAINING_CASES])
def test_backend_matches_math_fp32(run_check, backend, case):
    run_check(backend, check_matches_math_fp32, backend, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_backend_matches_math_16bit(run_check, backend, dtype):
    run_check(backend, check_matches_math_16bit, backend, dtype)


@pytest.mark.parametrize("backend", ["math", "sdpa", "triton"])
def test_no_query_attends_across_documents(run_check, backend):
    run_check(backend, check_no_cross_document, backend)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_training_loss_curve_matches_math(run_check, backend):
    """Three SGD steps of the tiny model on packed documents: losses equal math's to 1e-4."""
    got, want = run_check(backend, training_losses, backend), training_losses("math")
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
    assert want[2] < want[0]  # it is training


# ------------------------------------------------------------------------------- Triton specifics
@pytest.mark.parametrize("check", [check_triton_uneven_block_shapes, check_triton_doc_tables,
                                   check_triton_skips_other_documents_blocks, check_triton_unsorted_doc_ids,
                                   check_forced_triton_falls_back_for_kv_cache,
                                   check_triton_selective_checkpointing_keeps_the_kernel_output,
                                   check_triton_under_torch_compile],
                         ids=lambda f: f.__name__.replace("check_", ""))
def test_triton(triton_worker, check):
    triton_worker(check)


def test_triton_kernels_compile_for_h100(tmp_path):
    """The interpreter is more lenient than the compiler: compile all three kernels for sm_90 (bf16,
    head dim 128, document masking) down to a cubin with the ptxas that ships in the triton wheel.
    No GPU needed; runs in a subprocess so the kernels are defined in compiled mode."""
    if not triton_installed():
        pytest.skip("triton not installed: the Triton backend is NOT covered (pip install triton)")
    code = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import minillm.kernels.triton_attention as ta
        assert not ta.INTERPRETED
        consts = {"HEAD_DIM": 128, "HAS_DOC": True, "PRECISION": "tf32", "BLOCK_M": 64, "BLOCK_N": 32}
        pointers = {**dict.fromkeys(["Q", "K", "V", "O", "DO", "DQ", "DK", "DV"], "*bf16"),
                    **dict.fromkeys(["LSE", "DELTA"], "*fp32"),
                    **dict.fromkeys(["QDOC", "KDOC", "KVLO", "QHI", "MONO"], "*i32")}
        for name, kernel in ta._KERNELS.items():
            sig = {arg: "constexpr" if arg in consts else pointers.get(arg, "fp32" if arg.endswith("scale") else "i32")
                   for arg in kernel.arg_names}
            compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 4, "num_stages": 3})
            print(name, len(compiled.asm["cubin"]) > 0)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=root, TRITON_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300, env=env,
                         check=False)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("this triton install has no ptxas: GPU compilation NOT covered")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["fwd", "True", "dkdv", "True", "dq", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the COMPILED Triton kernels are NOT covered (the interpreter tests are)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000, 128, True), (1, 16, 4, 4096, 4096, 64, True),
                                   (2, 4, 4, 333, 333, 128, False)], ids=["gqa-docs-hd128", "gqa-docs-4k", "causal-odd"])
def test_triton_compiled_on_cuda(shape, dtype):
    """On a GPU (bench/gpu_check.sh runs this): the autotuned, compiled kernels against math attention
    on the same device, forward and gradients, at training sizes the interpreter cannot reach."""
    from minillm.kernels import load_triton_attention
    module = load_triton_attention()
    assert not module.INTERPRETED
    q, k, v, q_doc, k_doc, w = (x.cuda() if x is not None else None for x in make_inputs(*shape, dtype=dtype))
    got = out_and_grads(module.flash_attention, q, k, v, q_doc, k_doc, w)
    want = out_and_grads(math_attention, q, k, v, q_doc, k_doc, w)
    assert_close_all(got, want, 1e-3 if dtype == torch.float32 else 1e-2, f"cuda {shape} {dtype}")


# ------------------------------------------------------------------------------------- dispatch
@pytest.fixture
def fresh_dispatch(monkeypatch):
    monkeypatch.setattr(attn_mod, "_announced", set())
    return attn_mod


def test_auto_on_cpu_picks_sdpa_and_says_so_once(fresh_dispatch, capsys):
    q, k, v, q_doc, k_doc, _ = make_inputs(*CASES["docs"])
    out1 = attention(q, k, v, q_doc, k_doc, announce=True)
    out2 = attention(q, k, v, q_doc, k_doc, announce=True)
    assert attention(q, k, v, q_doc, k_doc, backend="math") is not None  # not announced: announce=False
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]
    assert lines == ["attention: sdpa (cpu tensors; triton is for CUDA)"]
    assert torch.equal(out1, out2)
    assert rel_err(out1, oracle_attention(q, k, v, q_doc, k_doc)) < 1e-5


def test_auto_choice_for_cuda_tensors(monkeypatch):
    """The auto rules for CUDA tensors, on stand-ins (only shape, dtype and device are read)."""
    from types import SimpleNamespace

    def fake(shape, dtype=torch.bfloat16):
        return SimpleNamespace(shape=shape, dtype=dtype, is_cuda=True, device=torch.device("cpu"))

    q, kv = fake((2, 8, 64, 128)), fake((2, 2, 64, 128))
    monkeypatch.setattr(attn_mod, "_triton_status", (False, "triton not installed"))
    assert attn_mod.choose_backend(q, kv, kv) == ("sdpa", "triton not installed")
    monkeypatch.setattr(attn_mod, "_triton_status", (True, "triton available"))
    monkeypatch.setattr(attn_mod, "load_triton_attention", lambda: SimpleNamespace(INTERPRETED=False))
    assert attn_mod.choose_backend(q, kv, kv) == ("triton", "CUDA, triton available")
    cache = fake((2, 2, 80, 128))
    assert attn_mod.choose_backend(q, cache, cache) == ("sdpa", "query length != key length (KV cache)")
    q80, kv80 = fake((2, 8, 64, 80)), fake((2, 2, 64, 80))
    assert attn_mod.choose_backend(q80, kv80, kv80)[0] == "sdpa"
    q64 = fake((2, 8, 64, 128), torch.float64)
    assert attn_mod.choose_backend(q64, fake((2, 2, 64, 128), torch.float64), kv)[0] == "sdpa"
    monkeypatch.setattr(attn_mod, "load_triton_attention", lambda: SimpleNamespace(INTERPRETED=True))
    assert attn_mod.choose_backend(q, kv, kv)[0] == "sdpa"


@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_backend_argument_routes_calls(fresh_dispatch, monkeypatch, name):
    calls = []
    real = getattr(attn_mod, f"{name}_attention")
    monkeypatch.setattr(attn_mod, f"{name}_attention", lambda *a: calls.append(name) or real(*a))
    q, k, v, q_doc, k_doc, _ = make_inputs(*CASES["cache-docs"])
    attention(q, k, v, q_doc, k_doc, backend=name)
    assert calls == [name]


@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_model_config_chooses_the_backend(fresh_dispatch, monkeypatch, capsys, name):
    """The backend is the model's choice (config.attn_backend, the scripts' --attn): every layer's call
    goes there, and the dispatcher says so once."""
    from minillm.model import Llama, LlamaConfig
    calls = []
    real = getattr(attn_mod, f"{name}_attention")
    monkeypatch.setattr(attn_mod, f"{name}_attention", lambda *a: calls.append(name) or real(*a))
    model = Llama(LlamaConfig.from_preset("tiny", vocab_size=64, attn_backend=name))
    model(torch.randint(0, 64, (1, 8)))
    assert calls == [name] * model.config.n_layers
    assert capsys.readouterr().out == f"attention: {name} (requested)\n"


def test_unknown_backend_is_rejected():
    q, k, v, _, _, _ = make_inputs(*CASES["docs"])
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, backend="flash")


def test_forced_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, q_doc, k_doc, _ = make_inputs(*CASES["docs"])
    with pytest.raises(RuntimeError, match="attention backend 'triton' requested but"):
        attention(q, k, v, q_doc, k_doc, backend="triton")


def test_shape_errors_are_clear():
    q, k, v, q_doc, k_doc, _ = make_inputs(*CASES["gqa-docs"])
    with pytest.raises(ValueError, match="do not fit"):
        attention(q[:, :5], k, v)  # 5 query heads over 2 K/V heads
    with pytest.raises(ValueError, match="q_doc must be"):
        attention(q, k, v, q_doc[:, :-1], k_doc)


def test_import_and_fallback_without_triton():
    """`import minillm` and attention work when triton cannot be imported at all."""
    code = textwrap.dedent("""
        import sys
        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ModuleNotFoundError("No module named 'triton'")
        sys.meta_path.insert(0, NoTriton())
        import torch, minillm
        from minillm.attention import attention
        from minillm.kernels import triton_status
        print(triton_status())
        q = torch.randn(1, 2, 5, 16)
        print(attention(q, q, q, announce=True).shape)
        try:
            attention(q, q, q, backend="triton")
        except RuntimeError as e:
            print(e)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root}, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "(False, 'triton not installed')",
        "attention: sdpa (cpu tensors; triton is for CUDA)",
        "torch.Size([1, 2, 5, 16])",
        "attention backend 'triton' requested but triton not installed (pip install triton)",
    ]
