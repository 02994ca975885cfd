"""Merge benchmark: peak memory (VmHWM) and time of a streamed `python -m minillm.merge` on a model set of
several GB, against the size of the inputs.

Three random float32 models of one Llama shape (--dim, --layers, --vocab; the defaults make ~0.72 GB each, a
2.2 GB set) are written under --work (cached), tensor by tensor; then `python -m minillm.merge --method
chat_vector --target A --instruct B --base C` runs in its own process, which reports its own VmHWM from
/proc/self/status at the end. The target is that peak stays far below one model (acceptance: < 1.5 GB for a
>= 2 GB set): the merge holds one block of rows per input, never a whole tensor or model.

Run: python bench/bench_merge.py --work /tmp/bench_merge
"""
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.hf import config_to_hf, safetensors_header, to_hf_name
from minillm.model import Llama, LlamaConfig
from minillm.options import cli, parse_options

ROOT = Path(__file__).resolve().parents[1]
MEASURE = ("import sys, time; from minillm.merge import main; t = time.time(); main(sys.argv[1:]); "
           "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
           "print('RESULT', int(hwm) * 1024, time.time() - t)")


def write_random_model(path: Path, config: LlamaConfig, seed: int) -> int:
    """A Hugging Face directory of random float32 weights, written one tensor at a time; returns its bytes."""
    if (path / "model.safetensors").is_file():
        return (path / "model.safetensors").stat().st_size
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {to_hf_name(n): p.shape for n, p in Llama(config).named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    with open(path / "model.safetensors.tmp", "wb") as f:
        f.write(safetensors_header(shapes, torch.float32))
        for name in sorted(shapes):
            f.write(torch.randn(shapes[name], generator=generator).numpy().tobytes())
    (path / "model.safetensors.tmp").rename(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config_to_hf(config, torch.float32)))
    return (path / "model.safetensors").stat().st_size


@dataclass(kw_only=True)
class BenchMergeOptions:
    work: str = "/tmp/bench_merge"  # where the three models (cached) and the merge go
    dim: int = 1024  # model width
    layers: int = 24  # transformer layers (24: 0.72 GB per model in float32)
    vocab: int = 32000  # vocabulary size


@cli
def main(argv=None):
    args = parse_options(BenchMergeOptions, argv, prog="python bench/bench_merge.py", description=__doc__.split("\n\n")[0])
    work = Path(args.work)
    config = LlamaConfig.from_preset("tiny", vocab_size=args.vocab, dim=args.dim, n_layers=args.layers,
                                     n_heads=args.dim // 64, n_kv_heads=args.dim // 64)
    sizes = [write_random_model(work / name, config, seed) for seed, name in enumerate(["target", "instruct", "base"])]
    out = work / "merged"
    cmd = [sys.executable, "-c", MEASURE, "--method", "chat_vector", "--target", work / "target", "--instruct",
           work / "instruct", "--base", work / "base", "--out", out, "--max-shard-size", "500MB"]
    start = time.time()
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    _, hwm, seconds = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()
    print(json.dumps({"inputs_gb": round(sum(sizes) / 1e9, 3), "largest_model_gb": round(max(sizes) / 1e9, 3),
                      "peak_rss_gb": round(int(hwm) / 1e9, 3), "merge_s": round(float(seconds), 1),
                      "process_s": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
