"""Attention benchmark: forward + backward TFLOP/s of each backend vs sequence length, plain causal
and document-masked, at equal total tokens per step (batch = tokens // seq_len).

FLOPs convention (FlashAttention-2 paper's benchmarks): causal forward = 4 * B * H * T^2 * hd / 2
(QK^T and PV, half the square); backward = 2.5 x forward; so forward + backward = 3.5 x forward.
  "TFLOP/s"         that causal count over the measured time: for document-masked rows this is the
                    causal-equivalent rate, i.e. a direct time comparison with plain causal;
  "useful TFLOP/s"  the FLOPs of the pairs that are actually visible (sum over documents of L^2/2
                    instead of T^2/2) over the time: what skipping other documents buys or costs.
                    The target "document masking costs <= 5% over causal" compares this
                    column with the causal row of the same length.
Documents are packed back to back with lengths drawn uniformly from [doc_len/2, 3*doc_len/2].

    python bench/bench_attention.py                        # CPU, fp32: math and sdpa
    python bench/bench_attention.py --device cuda          # GPU, bf16: triton, sdpa, math; hd 128
    python bench/bench_attention.py --device cuda --seq-lens 1024,2048,4096,8192 --doc-len 1024 --json out.json
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch

from minillm.attention import attention  # noqa: E402
from minillm.files import atomic_write, to_json  # noqa: E402
from minillm.options import parse_options  # noqa: E402


def packed_doc_ids(batch: int, seq_len: int, doc_len: int, gen) -> torch.Tensor:
    """[batch, seq_len] non-decreasing document ids, documents of length ~U[doc_len/2, 3 doc_len/2]."""
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq_len:
            length = int(torch.randint(max(1, doc_len // 2), max(2, 3 * doc_len // 2 + 1), (1,), generator=gen))
            ids.extend([doc] * length)
            doc += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def visible_pairs(doc: torch.Tensor) -> float:
    """sum over rows and documents of L^2 / 2: the convention's count of visible (query, key) pairs."""
    total = 0.0
    for row in doc:
        lengths = torch.unique_consecutive(row, return_counts=True)[1].double()
        total += float((lengths ** 2).sum()) / 2
    return total


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_case(backend, mode, seq_len, args, device, dtype):
    batch = max(1, args.tokens // seq_len)
    gen = torch.Generator().manual_seed(0)
    shape_q = (batch, args.heads, seq_len, args.head_dim)
    shape_kv = (batch, args.kv_heads, seq_len, args.head_dim)
    q = torch.randn(shape_q, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(shape_kv, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(shape_kv, generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn(shape_q, generator=gen).to(device, dtype)
    doc = packed_doc_ids(batch, seq_len, args.doc_len, gen) if mode == "docs" else None
    pairs = visible_pairs(doc) if doc is not None else batch * seq_len ** 2 / 2
    doc = doc.to(device) if doc is not None else None

    def forward():
        with torch.no_grad():
            attention(q, k, v, doc, doc, backend=backend)

    def forward_backward():
        out = attention(q, k, v, doc, doc, backend=backend)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    fwd_ms = time_ms(forward, device, args.warmup, args.iters)
    step_ms = time_ms(forward_backward, device, args.warmup, args.iters)
    causal_flops = 3.5 * 4 * batch * args.heads * seq_len ** 2 * args.head_dim / 2
    useful_flops = 3.5 * 4 * args.heads * args.head_dim * pairs
    return {"backend": backend, "mode": mode, "seq_len": seq_len, "batch": batch, "fwd_ms": fwd_ms,
            "fwd_bwd_ms": step_ms, "tflops": causal_flops / step_ms / 1e9,
            "useful_tflops": useful_flops / step_ms / 1e9,
            "fwd_tflops": causal_flops / 3.5 / fwd_ms / 1e9}


@dataclass(kw_only=True)
class BenchOptions:
    device: str = ""  # cpu or cuda; '' = cuda when available
    dtype: Literal["", "fp32", "bf16", "fp16"] = ""  # '' = bf16 on CUDA, fp32 on CPU
    backends: str = ""  # comma list; '' = triton,sdpa,math on CUDA, sdpa,math on CPU
    modes: str = "causal,docs"  # causal and/or document-masked (docs)
    seq_lens: str = ""  # comma list; '' = 1024..16384 on CUDA, 256..2048 on CPU
    tokens: int = 0  # tokens per step; 0 = 16384 on CUDA, 4096 on CPU
    heads: int = 0  # query heads; 0 = 16 on CUDA, 8 on CPU
    kv_heads: int = 0  # K/V heads; 0 = heads
    head_dim: int = 0  # 0 = 128 on CUDA, 64 on CPU
    doc_len: int = 512  # mean document length in docs mode
    max_math_len: int = 4096  # skip the math backend above this length (its memory is quadratic)
    warmup: int = -1  # untimed calls first; -1 = 5 on CUDA, 1 on CPU
    iters: int = -1  # timed calls; -1 = 20 on CUDA, 3 on CPU
    json: str = ""  # also write the rows to this file


def main(argv=None):
    args = parse_options(BenchOptions, argv, prog="bench/bench_attention.py", description=__doc__)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype or ("bf16" if cuda else "fp32")]
    backends = (args.backends or ("triton,sdpa,math" if cuda else "sdpa,math")).split(",")
    seq_lens = args.seq_lens or ("1024,2048,4096,8192,16384" if cuda else "256,512,1024,2048")
    seq_lens = [int(s) for s in seq_lens.split(",")]
    args.tokens = args.tokens or (16384 if cuda else 4096)
    args.heads = args.heads or (16 if cuda else 8)
    args.kv_heads = args.kv_heads or args.heads
    args.head_dim = args.head_dim or (128 if cuda else 64)
    args.warmup = args.warmup if args.warmup >= 0 else (5 if cuda else 1)
    args.iters = args.iters if args.iters >= 0 else (20 if cuda else 3)

    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# attention fwd+bwd, {name}, {str(dtype).replace('torch.', '')}, heads {args.heads}/{args.kv_heads}, "
          f"head dim {args.head_dim}, {args.tokens} tokens/step, mean doc length {args.doc_len} (docs mode), "
          f"torch {torch.__version__}")
    header = f"{'backend':8s} {'mode':6s} {'seq':>6s} {'batch':>5s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} " \
             f"{'fwd TF/s':>9s} {'TFLOP/s':>8s} {'useful TF/s':>11s}"
    print(header)
    print("-" * len(header))
    rows = []
    for mode in args.modes.split(","):
        for seq_len in seq_lens:
            for backend in backends:
                if backend == "math" and seq_len > args.max_math_len:
                    continue
                try:
                    row = run_case(backend, mode, seq_len, args, device, dtype)
                except (RuntimeError, ValueError) as e:  # OOM, unsupported shape, missing triton
                    if cuda:
                        torch.cuda.empty_cache()
                    print(f"{backend:8s} {mode:6s} {seq_len:6d}  -- {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                rows.append(row)
                print(f"{backend:8s} {mode:6s} {seq_len:6d} {row['batch']:5d} {row['fwd_ms']:9.2f} "
                      f"{row['fwd_bwd_ms']:11.2f} {row['fwd_tflops']:9.3g} {row['tflops']:8.3g} "
                      f"{row['useful_tflops']:11.3g}", flush=True)
    if args.json:
        atomic_write(args.json, to_json({"device": name, "dtype": str(dtype), "args": dataclasses.asdict(args),
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
