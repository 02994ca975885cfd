"""Loss benchmark: naive (full logits + F.cross_entropy) vs the chunked losses of minillm.losses.

Implementations:
  naive      F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
  fused-ce   cross_entropy_sum: chunked, gradients computed in forward (pretraining / SFT)
  fused-logp -token_logprobs(...).sum(): chunked, softmax recomputed in backward (per-token
             log-probs for any downstream loss, e.g. ORPO; one more matmul per chunk)
For each vocabulary size and implementation, one forward + backward of the summed token NLL from
hidden states [tokens, hidden] and an output matrix [vocab, hidden], gradients w.r.t. both. Reports
the median wall time, the median process CPU time (all threads; less sensitive to other load on a
shared machine) and the peak memory the step adds on top of its inputs. Every case runs in a fresh
subprocess so peaks never mix:
  CPU:  resident-set high-water mark (VmHWM in /proc/self/status), reset to the current RSS after
        the inputs exist (writing 5 to /proc/self/clear_refs), so "peak +" is what the loss added;
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated.
The peak includes the gradients both implementations must produce (the weight's is [vocab, hidden]).

    python bench/bench_loss.py                                   # CPU fp32, 2048 tokens x 2048 hidden
    python bench/bench_loss.py --device cuda --dtype bf16 --tokens 32768 --hidden 4096 --vocab 128256
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm.files import atomic_write, to_json  # noqa: E402
from minillm.options import parse_options  # noqa: E402

IMPLS = ["naive", "fused-ce", "fused-logp"]


@dataclass(kw_only=True)
class BenchOptions:
    tokens: int = 2048  # tokens per step
    hidden: int = 2048  # hidden size
    vocab: list[int] = field(default_factory=lambda: [32000, 128256])  # vocabulary sizes to measure
    device: str = "cpu"  # cpu or cuda
    dtype: Literal["fp32", "bf16"] = "fp32"  # hidden states and weight
    chunk_size: int = 0  # tokens per chunk; 0 = minillm.losses.default_chunk_size of the vocabulary
    ignore_frac: float = 0.0  # share of labels set to -100
    repeats: int = 3  # timed steps after the measured first one
    impl: list[str] = field(default_factory=lambda: list(IMPLS))  # implementations: naive, fused-ce, fused-logp
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    json: str = ""  # also write the results to this file
    case: str = ""  # internal: "impl:vocab", run in this process


def proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(impl: str, vocab: int, args) -> dict:
    import torch
    import torch.nn.functional as F

    from minillm.losses import cross_entropy_sum, token_logprobs

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, args.hidden, device=device, dtype=dtype) / args.hidden ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (args.tokens,), device=device)
    labels[torch.rand(args.tokens, device=device) < args.ignore_frac] = -100

    def step(hidden=hidden, weight=weight, labels=labels):
        if impl == "naive":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100, reduction="sum")
        elif impl == "fused-ce":
            loss, _ = cross_entropy_sum(hidden, weight, labels, chunk_size=args.chunk_size or None)
        else:
            loss = -token_logprobs(hidden, weight, labels, chunk_size=args.chunk_size or None).sum()
        loss.backward()
        hidden.grad = weight.grad = None  # freed after being produced; the peak already saw them
        return float(loss)

    # A tiny step first, so one-time initialisation (autograd threads, BLAS buffers) is not counted.
    step(hidden[:8].detach().requires_grad_(), weight[:64].detach().requires_grad_(), labels[:8] % 64)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Peak of the first full-size step, measured from the moment the inputs exist.
    if device.type == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = step()
        sync()
        peak_add = torch.cuda.max_memory_allocated() - base
        peak_abs = torch.cuda.max_memory_allocated()
    else:
        try:  # reset VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        base = proc_status_kb("VmRSS") * 1024
        loss = step()
        peak_abs = proc_status_kb("VmHWM") * 1024
        peak_add = peak_abs - base
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"impl": impl, "vocab": vocab, "loss": loss, "time_s": sorted(times)[len(times) // 2],
            "cpu_s": sorted(cpu_times)[len(cpu_times) // 2],
            "peak_add_gb": peak_add / 1e9, "peak_abs_gb": peak_abs / 1e9}


def main():
    args = parse_options(BenchOptions, prog="bench/bench_loss.py", description=__doc__)
    unknown = [i for i in args.impl if i not in IMPLS]
    if unknown:
        raise SystemExit(f"error: --impl {unknown[0]!r}: choose from {', '.join(IMPLS)}")

    if args.case:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
        impl, vocab = args.case.split(":")
        print(json.dumps(run_case(impl, int(vocab), args)))
        return

    argv = sys.argv[1:]
    rows = []
    print(f"loss fwd+bwd, {args.tokens} tokens x hidden {args.hidden}, {args.dtype} on {args.device}, "
          f"chunk {args.chunk_size or 'default'}, ignored {args.ignore_frac:.0%}, median of {args.repeats}")
    print(f"{'vocab':>8} {'impl':>10} {'time s':>8} {'cpu s':>8} {'peak + GB':>10} {'peak abs GB':>12} "
          f"{'loss/token':>11}")
    for vocab in args.vocab:
        for impl in args.impl:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--case", f"{impl}:{vocab}"],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{vocab:>8} {impl:>10} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            n = args.tokens * (1 - args.ignore_frac)
            print(f"{vocab:>8} {impl:>10} {r['time_s']:>8.3f} {r['cpu_s']:>8.2f} {r['peak_add_gb']:>10.3f} "
                  f"{r['peak_abs_gb']:>12.3f} "
                  f"{r['loss'] / max(n, 1):>11.4f}", flush=True)
    floor = {v: (args.tokens + v) * args.hidden * (4 if args.dtype == "fp32" else 2) / 1e9 for v in args.vocab}
    print("gradients alone (hidden + weight), the floor of 'peak +': "
          + ", ".join(f"vocab {v}: {g:.3f} GB" for v, g in floor.items()))
    if args.json:
        atomic_write(args.json, to_json({"args": dataclasses.asdict(args), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
