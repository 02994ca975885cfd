"""Generation benchmark: minillm.generate vs transformers' generate, same weights, same prompts, same run.

For each case (batch, prompt length, new tokens) the two implementations take turns, --repeats times each
after one untimed warm-up call each (so machine load hits both alike); every call is greedy, left-padded,
with no end token (every row generates exactly the new tokens), and every call's tokens must be identical
between the two (asserted: a faster generator that picks other tokens would be measuring something else).
Reported per case: tokens/s of each (median over repeats), the ratio minillm / transformers per repeat
(median, min, max). With --compile, minillm's compiled decode step (`generate(..., compile=True)`) is timed in
the same rotation after its compile call (whose time is reported); transformers is always eager.

The model: a random minillm model of --preset (default small: dim 512, 8 layers, vocab 32K, 49M parameters),
saved with minillm.hf.save_pretrained and loaded by transformers' AutoModelForCausalLM (fp32, its default
SDPA attention). Prompt lengths of a case are drawn uniformly from [L/2, L] (fixed seed), so rows differ
and the left padding is exercised.

    python bench/bench_generate.py                                    # batch 1 and 8, prompt 32, 64 new
    python bench/bench_generate.py --cases 1x32x64 8x32x64 32x512x256 --repeats 5 --compile
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.generate import generate  # noqa: E402
from minillm.hf import save_pretrained  # noqa: E402
from minillm.model import Llama, LlamaConfig  # noqa: E402
from minillm.options import parse_options  # noqa: E402


@dataclass(kw_only=True)
class BenchOptions:
    preset: str = "small"  # model size (minillm/model.py PRESETS)
    cases: list[str] = field(default_factory=lambda: ["1x32x64", "8x32x64"])  # BATCHxPROMPTxNEW each
    repeats: int = 3  # timed calls per implementation and case, interleaved
    compile: bool = False  # also time minillm's compiled decode step
    threads: int = 0  # torch.set_num_threads; 0 = torch's default
    json: str = ""  # also write the figures to this file


def transformers_generate(hf_model, prompts, new_tokens):
    """Left-padded batch through transformers' generate; the new tokens of every row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, width:].tolist()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    import transformers

    args = parse_options(BenchOptions, prog="bench/bench_generate.py", description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig.from_preset(args.preset, max_seq_len=1024)
    model = Llama(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters), fp32, greedy", flush=True)
    runners = {"minillm": lambda p, n: generate(model, p, max_new_tokens=n, eos_id=[]),
               "transformers": lambda p, n: transformers_generate(hf_model, p, n)}
    if args.compile:
        runners["minillm compiled"] = lambda p, n: generate(model, p, max_new_tokens=n, eos_id=[], compile=True)
    rows = []
    print("| batch | prompt | new | impl | tokens/s (median) | minillm / transformers: median (min-max) |")
    print("|---:|---:|---:|---|---:|---|")
    for case in args.cases:
        batch, prompt_len, new = (int(x) for x in case.split("x"))
        g = torch.Generator().manual_seed(batch * 1000 + prompt_len)
        lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (batch,), generator=g).tolist()
        prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
        reference = None
        times: dict[str, list[float]] = {name: [] for name in runners}
        first: dict[str, float] = {}
        for rep in range(args.repeats + 1):  # round 0 warms up (and compiles); not timed
            for name, run in runners.items():
                seconds, tokens = timed(lambda: run(prompts, new))
                reference = reference or tokens
                if tokens != reference:
                    bad = sum(a != b for a, b in zip(tokens, reference))
                    raise SystemExit(f"{case}: {name} generated other tokens than {next(iter(runners))} in {bad} "
                                     f"of {batch} rows")
                if rep == 0:
                    first[name] = seconds
                else:
                    times[name].append(seconds)
        n_tokens = batch * new
        for name in runners:
            ratios = [t / m for m, t in zip(times[name], times["transformers"])]
            row = {"batch": batch, "prompt": prompt_len, "new": new, "impl": name,
                   "tokens_per_s": n_tokens / statistics.median(times[name]), "seconds": times[name],
                   "first_call_s": first[name], "ratio_median": statistics.median(ratios),
                   "ratio_min": min(ratios), "ratio_max": max(ratios)}
            rows.append(row)
            ratio = "—" if name == "transformers" else (f"{row['ratio_median']:.2f}x ({row['ratio_min']:.2f}-"
                                                        f"{row['ratio_max']:.2f})")
            extra = f" (first call {first[name]:.0f} s)" if name == "minillm compiled" else ""
            print(f"| {batch} | {prompt_len} | {new} | {name}{extra} | {row['tokens_per_s']:.0f} | {ratio} |",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
