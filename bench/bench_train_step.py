"""Training-step benchmark: minillm vs Hugging Face transformers' LlamaForCausalLM, same config, same run.

Reports tokens/s, MFU (6N + attention FLOPs per token over the device's peak) and peak memory of
one optimizer step (forward + backward + AdamW) on random tokens. Each implementation runs in its
own subprocess so peak memory (CPU: the process's resident high-water mark, which includes what the
imports themselves take, shown separately) is not shared. Both use minillm's optimizer (fused AdamW);
--activation-checkpointing and --compile apply to both (transformers has no "selective").

    python bench/bench_train_step.py --preset small --seq-len 512 --batch-size 2          # CPU, fp32
    python bench/bench_train_step.py --preset 1b --seq-len 4096 --batch-size 1 --dtype bf16  # one GPU
    python bench/bench_train_step.py --preset tiny --vocab-size 128256 --seq-len 1024 --batch-size 2
Needs `transformers` (the test extra) for the peer column; `--only minillm` skips it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.options import parse_options  # noqa: E402


def run_one(impl: str, args) -> dict:
    import torch

    from minillm.model import Llama, LlamaConfig
    from minillm.monitor import peak_flops, peak_memory_gb, step_flops

    torch.manual_seed(0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    overrides = {"max_seq_len": max(args.seq_len, 256)}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    config = LlamaConfig.from_preset(args.preset, **overrides)
    if impl == "minillm":
        base_gb = peak_memory_gb(device)
        model = Llama(config).to(device=device, dtype=dtype)
        model.config.activation_checkpointing = args.activation_checkpointing
        blocks = model.layers

        def loss_fn(ids, labels):
            return model(ids, labels=labels) / (labels != -100).sum()
    else:
        from transformers import LlamaConfig as HFConfig
        from transformers import LlamaForCausalLM
        base_gb = peak_memory_gb(device)
        hf = HFConfig(vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
                      num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, head_dim=config.head_dim,
                      num_key_value_heads=config.n_kv_heads, max_position_embeddings=config.max_seq_len,
                      rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False)
        model = LlamaForCausalLM(hf).to(device=device, dtype=dtype)
        if args.activation_checkpointing == "full":
            model.gradient_checkpointing_enable()
        elif args.activation_checkpointing != "none":
            raise SystemExit(f"transformers has no {args.activation_checkpointing!r} activation checkpointing")
        model.config.use_cache = False
        blocks = model.model.layers

        def loss_fn(ids, labels):
            # transformers shifts labels itself; hand it the unshifted ids as labels.
            return model(input_ids=ids, labels=ids).loss
    if args.compile:  # regional compilation, as the scripts' --compile: every block on its own
        for block in blocks:
            block.compile()
    # The optimizer minillm's scripts use (minillm.engine.build_engine), for both implementations.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens = args.batch_size * args.seq_len
    return {"impl": impl, "tok_s": tokens / dt, "step_s": dt,
            "mfu": step_flops(config, [{"input_ids": ids, "labels": labels}]) / dt / peak_flops(device),
            "peak_mem_gb": peak_memory_gb(device), "base_mem_gb": base_gb, "loss": float(loss)}


@dataclass(kw_only=True)
class BenchOptions:
    preset: str = "small"  # model size (minillm/model.py PRESETS)
    vocab_size: int = 0  # override the preset's vocabulary; 0 = the preset's
    seq_len: int = 512  # tokens per row
    batch_size: int = 2  # rows per step
    steps: int = 5  # timed steps (the median is reported)
    warmup: int = 2  # untimed steps first
    dtype: Literal["fp32", "bf16"] = "fp32"  # weights and activations
    device: str = ""  # cpu or cuda; '' = cuda when available
    activation_checkpointing: Literal["none", "selective", "full"] = "none"  # selective is minillm's only (no transformers run)
    compile: bool = False  # torch.compile every block (both implementations)
    only: Literal["", "minillm", "transformers"] = ""  # run one implementation only
    child: str = ""  # internal: run this implementation in this process and print its JSON


def main():
    args = parse_options(BenchOptions, prog="bench/bench_train_step.py", description=__doc__)
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    impls = [args.only] if args.only else ["minillm", "transformers"]
    if args.activation_checkpointing == "selective":
        impls = [i for i in impls if i == "minillm"]
    rows = []
    for impl in impls:
        out = subprocess.run([sys.executable, *sys.argv, "--child", impl], capture_output=True, text=True)
        if out.returncode:
            print(f"{impl} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"preset={args.preset} vocab={args.vocab_size or 'preset'} seq={args.seq_len} batch={args.batch_size} "
          f"dtype={args.dtype} device={args.device} steps={args.steps} (median step) "
          f"checkpointing={args.activation_checkpointing} compile={args.compile}")
    print("| impl | tok/s | step s | MFU | peak mem GB | of which imports GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['impl']} | {r['tok_s']:.0f} | {r['step_s']:.3f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gb']:.2f} "
              f"| {r['base_mem_gb']:.2f} |")
    if len(rows) == 2:
        print(f"ratio minillm/transformers: tok/s {rows[0]['tok_s'] / rows[1]['tok_s']:.2f}x, "
              f"peak memory {rows[0]['peak_mem_gb'] / rows[1]['peak_mem_gb']:.2f}x")


if __name__ == "__main__":
    main()
