"""Projection benchmark: aten's F.linear (MKL sgemm on CPU) vs minillm's inference Linear (oneDNN's matmul).

Why minillm.model.Linear routes fp32 CPU inference through oneDNN: this measures the two on the model's own
projection shapes (q, k/v, o, gate/up, down, head of a --preset) for a few row counts (1 and 8: decoding;
256: a prefill). Each shape gets enough distinct weight matrices to fill --weights-mb (default 96 MB, three times
this machine's 32 MB L3), cycled through, so the weights stream from memory as they do in a real step.
The two run in turns, --repeats rounds; reported per shape and row count: the weight bytes read per second of
each (median), the ratio F.linear seconds / oneDNN seconds (median, min-max), and the largest difference of
oneDNN's products from a float64 re-derivation next to F.linear's own (both fp32 rounding, a few ulps).

    python bench/bench_linear.py                        # small preset, rows 1, 8, 256
    python bench/bench_linear.py --preset 1b --rows 8   # Llama-1B-like shapes
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.model import ONEDNN_LINEAR, Linear, LlamaConfig  # noqa: E402
from minillm.options import parse_options  # noqa: E402


@dataclass(kw_only=True)
class BenchOptions:
    preset: str = "small"  # model shapes (minillm/model.py PRESETS)
    rows: list[int] = field(default_factory=lambda: [1, 8, 256])  # input rows (tokens) per product
    weights_mb: int = 96  # distinct weights per shape, cycled, so they come from memory, not cache
    repeats: int = 5  # rounds, each timing one pass over the weights with each implementation
    json: str = ""  # also write the figures to this file


def shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of every kind of projection in the model."""
    return {"q": (config.n_heads * config.head_dim, config.dim),
            "k/v": (config.n_kv_heads * config.head_dim, config.dim),
            "o": (config.dim, config.n_heads * config.head_dim), "gate/up": (config.hidden_dim, config.dim),
            "down": (config.dim, config.hidden_dim), "head": (config.vocab_size, config.dim)}


def seconds_per_pass(fn, inputs) -> float:
    start = time.perf_counter()
    for args in inputs:
        fn(*args)
    return time.perf_counter() - start


def main():
    args = parse_options(BenchOptions, prog="bench/bench_linear.py", description=__doc__)
    if not ONEDNN_LINEAR:
        raise SystemExit("this torch build has no oneDNN: minillm's Linear is F.linear here")
    config = LlamaConfig.from_preset(args.preset)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, preset {args.preset}, fp32, "
          f"{args.weights_mb} MB of weights per shape")
    print("| shape [out, in] | rows | F.linear GB/s | oneDNN GB/s | F.linear / oneDNN: median (min-max) "
          "| max error vs fp64: F.linear, oneDNN |")
    print("|---|---:|---:|---:|---|---|")
    torch.manual_seed(0)
    results = []
    for name, (out_features, in_features) in shapes(config).items():
        copies = max(1, (args.weights_mb << 20) // (out_features * in_features * 4))
        layers = [Linear(in_features, out_features, bias=False) for _ in range(copies)]
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            with torch.inference_mode():
                exact = F.linear(x.double(), layers[0].weight.double())
                errors = [(F.linear(x, layers[0].weight).double() - exact).abs().max().item(),
                          (layers[0](x).double() - exact).abs().max().item()]
                plain, fast = [], []
                for _ in range(args.repeats + 1):  # the first round warms up
                    plain.append(seconds_per_pass(F.linear, [(x, layer.weight) for layer in layers]))
                    fast.append(seconds_per_pass(lambda layer: layer(x), [(layer,) for layer in layers]))
            plain, fast = plain[1:], fast[1:]
            ratios = [p / f for p, f in zip(plain, fast)]
            gb = copies * out_features * in_features * 4 / 1e9
            row = {"shape": name, "out": out_features, "in": in_features, "rows": rows, "copies": copies,
                   "f_linear_s": plain, "onednn_s": fast, "ratio_median": statistics.median(ratios),
                   "ratio_min": min(ratios), "ratio_max": max(ratios), "max_error": errors}
            results.append(row)
            print(f"| {name} [{out_features}, {in_features}] | {rows} | {gb / statistics.median(plain):.1f} | "
                  f"{gb / statistics.median(fast):.1f} | {row['ratio_median']:.2f}x ({row['ratio_min']:.2f}-"
                  f"{row['ratio_max']:.2f}) | {errors[0]:.1e}, {errors[1]:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
