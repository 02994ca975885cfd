"""Peak memory of every rank of a DeepSpeed ZeRO run: train_pretrain.py beside a plain-DeepSpeed peer.

For each model size (--sizes HIDDENxLAYERS: intermediate = round_up(8/3 x hidden, 256), heads = hidden / 128,
as many KV heads, vocabulary 32000, untied head, max_position_embeddings 2048), ZeRO stage and number of
ranks, two runs, strictly one at a time (they would share the memory they measure):
  minillm  train_pretrain.py --init-from a random Hugging Face directory of that size (built once, under
           OUT/models/SIZE), on token shards of a tiny random corpus (built once, under OUT/world), with
           no validation and only the final checkpoint: loading, --steps optimizer steps, checkpoint, export
  peer     bench/zero_peer.py: the same model shape and the same DeepSpeed config (minillm's own, from
           minillm.engine.deepspeed_config, written to OUT/ds/), random weights (under zero.Init for
           ZeRO-3), the same steps, nothing else: the floor
Every 0.25 s (--sample-interval) each rank's process (torchrun's workers: the launched process's descendants
whose environment has RANK; with one rank the launched process itself) is read from /proc/PID/status:
VmHWM (the resident high-water mark, the peak reported) and VmRSS (the trace, so the loading and the export
are visible). A rank's peak in its last 0.25 s before exit could be missed by polling, so each run's
maximum is also taken exactly from wait4's ru_maxrss (the largest process of the whole run, the launcher
included; blank when not above the harness's own peak, which it inherits through fork + exec): the "exact
max" column; a max per-rank peak well below it means the polling missed the end.
Allocator: every run gets MALLOC_MMAP_THRESHOLD_=65536 (--glibc-default: not). glibc serves blocks under its
dynamic mmap threshold (up to 32 MB) from the heap and keeps them there when freed; at these sizes most
per-rank tensors are under 32 MB and the resident set then measures glibc's retention (up to +1.4 x the
weights at ZeRO-3, one rank), which neither the seeds' sizes (every tensor far above 32 MB) nor a GPU (the
CUDA caching allocator) have. A fixed threshold maps every tensor on its own, so what is measured is what the
program holds, for minillm and the peer alike; minillm.memory_plan predicts that.
GB = 2^30 bytes. A run that fails (non-zero exit, e.g. killed by the OOM killer) is recorded as failed with
its last peaks and the tail of its log; the harness goes on. A combination whose predicted total
(ranks x minillm.memory_plan's per-rank peak) exceeds --skip-over-gb is skipped.

Outputs in OUT (--out): results.json (every run; a re-run replaces the same run's entry, so several
invocations build one table), table.md (printed too), traces/RUN.csv (t_s, rank, rss_gb), logs/RUN.log.
minillm's run directories (checkpoint + export, OUT/runs) are deleted after each run unless --keep-runs.

CPU (gloo, OMP_NUM_THREADS=1 with 2+ ranks):
    python bench/bench_zero_memory.py --sizes 256x2 --ranks 1,2 --stages 0,3 --steps 2     # a quick check
    python bench/bench_zero_memory.py --sizes 1536x12,2048x12 --ranks 1,2,4 --stages 0,2,3  # the real one
    python bench/bench_zero_memory.py --sizes 1536x12 --only peer                            # the floor only
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.engine import deepspeed_config  # noqa: E402
from minillm.files import atomic_write, to_json  # noqa: E402
from minillm.memory_plan import GB, parameter_counts, plan  # noqa: E402
from minillm.model import LlamaConfig  # noqa: E402
from minillm.options import cli, parse_options, require_option  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 32000
HEAD_DIM = 128
MAX_POSITIONS = 2048
IMPLS = ("minillm", "peer")


@dataclass(kw_only=True)
class BenchOptions:
    """Peak resident memory of every rank: train_pretrain.py vs a plain-DeepSpeed peer."""
    sizes: str = "1536x12,2048x12"  # model sizes, comma-separated HIDDENxLAYERS (hidden a multiple of 128)
    ranks: str = "1,2,4"  # numbers of ranks (processes), comma-separated
    stages: str = "0,2,3"  # ZeRO stages, comma-separated
    seq_len: int = 128  # tokens per row
    micro_batch_size: int = 1  # rows per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    steps: int = 2  # optimizer steps per run
    out: str = "bench/zero_memory"  # results.json, table.md, traces/, logs/, and the built models and data
    only: Literal["both", "minillm", "peer"] = "both"  # which implementation(s) to run
    skip_over_gb: float = 21.0  # skip a combination whose predicted total over all ranks is above this (GB)
    sample_interval: float = 0.25  # seconds between two reads of every rank's /proc/PID/status
    timeout: int = 3600  # seconds before a run is killed and recorded as failed
    keep_runs: bool = False  # keep minillm's run directories (checkpoint and export) in OUT/runs
    offload: Literal["none", "optimizer", "optimizer+params"] = "none"  # train_pretrain.py's --offload, for both; use another --out
    glibc_default: bool = False  # measure with glibc's dynamic mmap threshold (see the docstring); use another --out
    deepspeed: str = ""  # a DeepSpeed JSON merged over minillm's config, for both (e.g. DeepSpeed's own defaults, to see what sizing saves); use another --out

    def check(self):
        for size in self.sizes.split(","):
            try:
                hidden, layers = parse_size(size)
                good = hidden > 0 and hidden % HEAD_DIM == 0 and layers >= 1
            except ValueError:
                good = False
            require_option(good, "sizes", size, f"give HIDDENxLAYERS, hidden a multiple of {HEAD_DIM}")
        for name, allowed in (("ranks", None), ("stages", {0, 1, 2, 3})):
            try:
                values = int_list(getattr(self, name))
            except ValueError:
                values = []
            require_option(bool(values) and all(v >= 1 if allowed is None else v in allowed for v in values), name,
                           getattr(self, name), "comma-separated integers" + (", each 0-3" if allowed else ", each >= 1"))
        for name in ("seq_len", "micro_batch_size", "grad_accum", "steps", "timeout"):
            require_option(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        require_option(self.sample_interval > 0, "sample_interval", self.sample_interval, "must be > 0")


def parse_size(size: str) -> tuple[int, int]:
    hidden, layers = size.strip().lower().split("x")
    return int(hidden), int(layers)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ----------------------------------------------------------------------------- model shape and prediction

def model_shape(size: str) -> dict:
    """The Hugging Face config.json fields of a HIDDENxLAYERS size, by the Llama rules."""
    hidden, layers = parse_size(size)
    intermediate = -(-int(8 * hidden / 3) // 256) * 256  # round_up(8/3 x hidden, 256)
    heads = hidden // HEAD_DIM
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": VOCAB_SIZE,
            "tie_word_embeddings": False, "max_position_embeddings": MAX_POSITIONS}


def model_config(shape: dict) -> LlamaConfig:
    return LlamaConfig(vocab_size=shape["vocab_size"], dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                       n_heads=shape["num_attention_heads"], n_kv_heads=shape["num_key_value_heads"],
                       hidden_dim=shape["intermediate_size"], max_seq_len=shape["max_position_embeddings"],
                       tie_embeddings=shape["tie_word_embeddings"])


def count_params(shape: dict) -> int:
    return parameter_counts(model_config(shape))["P"]


def predicted_rank_gb(shape: dict, ranks: int, stage: int, cfg) -> float:
    """minillm.memory_plan's per-rank peak for this run on this CPU (what the table's "plan" column shows)."""
    return plan(model_config(shape), ranks, stage, "cpu", cfg.seq_len, cfg.micro_batch_size, "none",
                cfg.offload)["peak"] / GB


def minillm_ds_config(micro_batch_size: int, grad_accum: int, zero_stage: int, shape: dict, deepspeed: str = "",
                      offload: str = "none") -> dict:
    """The DeepSpeed config train_pretrain.py builds for these options (its defaults otherwise: grad_clip
    1.0, no --deepspeed file) and this model shape (config.json fields), on this machine's device."""
    options = types.SimpleNamespace(micro_batch_size=micro_batch_size, grad_accum=grad_accum, grad_clip=1.0,
                                    zero_stage=zero_stage, deepspeed=deepspeed, offload=offload)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return deepspeed_config(options, device, model_config(shape))


# ----------------------------------------------------------------------------- inputs, built once (subprocesses)

# A random model of the given config.json fields, saved in the Hugging Face layout (in a child process: the
# harness itself never holds a model).
MAKE_MODEL = r"""
import json, sys, torch
from minillm.hf import save_pretrained
from minillm.model import Llama, LlamaConfig
shape, out = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = Llama(LlamaConfig(vocab_size=shape["vocab_size"], dim=shape["hidden_size"], n_layers=shape["num_hidden_layers"],
                          n_heads=shape["num_attention_heads"], n_kv_heads=shape["num_key_value_heads"],
                          hidden_dim=shape["intermediate_size"], max_seq_len=shape["max_position_embeddings"],
                          tie_embeddings=shape["tie_word_embeddings"]))
save_pretrained(model, out, max_shard_size="1GB")
"""

# A 400-piece sentencepiece tokenizer and token shards of random sentences, as tests/test_train_pretrain.py's
# `world` fixture builds them.
MAKE_WORLD = r"""
import json, random, sys
from pathlib import Path
from minillm.prepare import prepare
from minillm.tokenizer import SentencePieceTokenizer
root = Path(sys.argv[1])
root.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
words = "kass koer maja linn päike õun jõgi mägi tänav sõber väike suur ilus punane roheline vana uus".split()
texts = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
                  for _ in range(rng.randint(1, 6))) for _ in range(600)]
with open(root / "et_train.jsonl", "w") as f:
    f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
SentencePieceTokenizer.train(iter(texts), root / "tok", 400).save_pretrained(root / "tokenizer")
prepare([root / "et_train.jsonl"], root / "tokenizer", root / "et_train", progress=False)
"""


def run_setup(script: str, *args: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"setup failed ({' '.join(args)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def build_world(out: Path) -> Path:
    world = out / "world"
    if not (world / "et_train" / "meta.json").is_file():  # prepare writes meta.json last
        print(f"building the tokenizer and token shards in {world}", flush=True)
        run_setup(MAKE_WORLD, str(world))
    return world


def build_model(out: Path, size: str, shape: dict) -> Path:
    model_dir = out / "models" / size
    if not (model_dir / "config.json").is_file():  # save_pretrained renames a finished directory into place
        print(f"building a random {size} model in {model_dir}", flush=True)
        t0 = time.time()
        run_setup(MAKE_MODEL, json.dumps(shape), str(model_dir))
        print(f"  {time.time() - t0:.0f} s", flush=True)
    return model_dir


# ----------------------------------------------------------------------------- measuring one run

def launch_command(script: str, ranks: int) -> list[str]:
    if ranks == 1:  # as a user runs one process; the script makes its own group of one
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script]


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process in GB ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 / GB for k, v in (line.split(":", 1) for line in f)
                    if k in ("VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return {}


def environ_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (OSError, ValueError):
        pass
    return None


def children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def find_ranks(root: int) -> dict[int, int]:
    """{rank: pid} of the topmost descendants of `root` with RANK in their environment (torchrun's workers;
    their own children, e.g. compile workers, inherit RANK and are not ranks)."""
    tree = children_by_parent()
    found, todo = {}, list(tree.get(root, []))
    while todo:
        pid = todo.pop()
        rank = environ_rank(pid)
        if rank is None:
            todo.extend(tree.get(pid, []))
        else:
            found.setdefault(rank, pid)
    return found


def measure(cmd: list[str], env: dict, ranks: int, log_path: Path, interval: float, timeout: float) -> dict:
    """Run `cmd` to its end, polling every rank's memory; never raises for the run's own failure."""
    peaks: dict[int, float] = {}
    trace: list[tuple[float, int, float]] = []
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True)  # its own process group: killed together on timeout
        rank_pids = {0: proc.pid} if ranks == 1 else {}
        status, usage, timed_out = None, None, False
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                now = time.perf_counter() - t0
                if len(rank_pids) < ranks:
                    rank_pids.update(find_ranks(proc.pid))
                for rank, rank_pid in sorted(rank_pids.items()):
                    mem = proc_status(rank_pid)
                    if mem:
                        peaks[rank] = max(peaks.get(rank, 0.0), mem.get("VmHWM", 0.0))
                        trace.append((round(now, 3), rank, round(mem.get("VmRSS", 0.0), 4)))
                if now > timeout:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(interval)
        finally:
            if status is None:  # interrupted (Ctrl-C): take the run down with us
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            else:
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
            try:  # ranks orphaned by a launcher that died first
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wall = time.perf_counter() - t0
    # A child's ru_maxrss starts at this process's own high-water mark (exec records the mm it replaces, ours
    # after the fork), so a value not above it says nothing about the run.
    exact = usage.ru_maxrss * 1024 / GB if usage else 0.0
    own = proc_status(os.getpid()).get("VmHWM", 0.0)
    return {"exit_code": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 1),
            "rank_peaks_gb": [round(peaks[r], 3) for r in sorted(peaks)], "ranks_seen": len(peaks),
            "exact_max_gb": round(exact, 3) if exact > own + 0.01 else None, "trace": trace}


def run_combination(impl: str, size: str, stage: int, ranks: int, cfg: BenchOptions, inputs: dict) -> dict:
    out = Path(cfg.out)
    key = f"{impl}-{size}-z{stage}-n{ranks}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # the runs' ranks are found by these: none may come from here
    if not cfg.glibc_default:  # see the module docstring
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if ranks >= 2:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's own default; with 2 cores, ranks x threads must not oversubscribe
    run_dir = out / "runs" / key
    if impl == "minillm":
        cmd = launch_command(str(ROOT / "train_pretrain.py"), ranks) + [
            "--init-from", str(inputs["model"]), "--tokenizer", str(inputs["world"] / "tokenizer"),
            "--data", f"et={inputs['world'] / 'et_train'}", "--mixture", "et=1", "--valid-data", "",
            "--seq-len", str(cfg.seq_len), "--micro-batch-size", str(cfg.micro_batch_size),
            "--grad-accum", str(cfg.grad_accum), "--max-steps", str(cfg.steps), "--warmup-steps", "0",
            "--zero-stage", str(stage), "--save-interval", "0", "--log-interval", "1",
            "--out-dir", str(run_dir), "--overwrite", "--offload", cfg.offload,
            *(["--deepspeed", cfg.deepspeed] if cfg.deepspeed else [])]
    else:
        cmd = launch_command(str(ROOT / "bench" / "zero_peer.py"), ranks) + [
            "--model", str(inputs["model"]), "--ds-config", str(inputs["ds_config"]),
            "--seq-len", str(cfg.seq_len), "--steps", str(cfg.steps)]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    r = measure(cmd, env, ranks, out / "logs" / f"{key}.log", cfg.sample_interval, cfg.timeout)
    if not cfg.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    trace_file = out / "traces" / f"{key}.csv"
    with open(trace_file, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["t_s", "rank", "rss_gb"])
        writer.writerows(r.pop("trace"))
    ok = r["exit_code"] == 0 and not r["timed_out"]
    result = {"key": key, "impl": impl, "size": size, "params": inputs["params"],
              "fp32_gb": round(inputs["params"] * 4 / GB, 3), "ranks": ranks, "stage": stage,
              **r, "max_peak_gb": max(r["rank_peaks_gb"], default=None), "ok": ok,
              "predicted_rank_gb": round(inputs["predicted"], 3),
              "seq_len": cfg.seq_len, "micro_batch_size": cfg.micro_batch_size, "grad_accum": cfg.grad_accum,
              "steps": cfg.steps, "trace": str(trace_file), "log": str(out / "logs" / f"{key}.log"),
              "load_avg_before": round(load_before, 2), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not ok:
        result["output_tail"] = (out / "logs" / f"{key}.log").read_text(errors="replace")[-3000:]
    return result


# ----------------------------------------------------------------------------- results

def load_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text())}


def record(results: dict[str, dict], result: dict, path: Path):
    """Add a result (replacing the same run's), and save: a killed harness keeps what it measured. A skip
    never replaces a measurement."""
    if result.get("skipped") and result["key"] in results and not results[result["key"]].get("skipped"):
        return
    results[result["key"]] = result
    atomic_write(path, to_json(sorted(results.values(), key=lambda r: (r["params"], r["stage"], r["ranks"],
                                                                        r["impl"]))))


def cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if result.get("skipped"):
        return f"skipped (plan: {result['ranks']} x {result['predicted_rank_gb']:.1f} GB)"
    peak = f"{result['max_peak_gb']:.2f}" if result["max_peak_gb"] is not None else "?"
    if result["ok"]:
        return peak
    why = "timeout" if result["timed_out"] else f"exit {result['exit_code']}"
    return f"FAILED ({why}) ≥{peak}"


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per size x stage x ranks, each implementation's largest per-rank peak, and the plan."""
    rows = sorted({(r["params"], r["size"], r["stage"], r["ranks"]) for r in results.values()})
    lines = ["| size | params | ZeRO | ranks | minillm max rank GB | peer max rank GB | minillm / peer "
             "| plan GB | plan / minillm | minillm per rank | peer per rank |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for params, size, stage, ranks in rows:
        got = {impl: results.get(f"{impl}-{size}-z{stage}-n{ranks}") for impl in IMPLS}
        measured = {impl: r for impl, r in got.items() if r and r.get("ok")}
        ratio = f"{measured['minillm']['max_peak_gb'] / measured['peer']['max_peak_gb']:.2f}" \
            if len(measured) == 2 else "—"
        planned = next((r["predicted_rank_gb"] for r in got.values() if r and "predicted_rank_gb" in r), None)
        plan_cell = f"{planned:.2f}" if planned is not None else "—"
        plan_ratio = f"{planned / measured['minillm']['max_peak_gb']:.2f}" \
            if planned is not None and "minillm" in measured else "—"
        per_rank = [" ".join(f"{p:.2f}" for p in r["rank_peaks_gb"]) if r and not r.get("skipped") else "—"
                    for r in got.values()]
        lines.append(f"| {size} | {params / 1e6:,.0f}M | {stage} | {ranks} | {cell(got['minillm'])} | "
                     f"{cell(got['peer'])} | {ratio} | {plan_cell} | {plan_ratio} | {per_rank[0]} | {per_rank[1]} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None):
    cfg = parse_options(BenchOptions, argv, prog="bench/bench_zero_memory.py", description=__doc__.split("\n\n")[0])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = load_results(results_path)
    impls = IMPLS if cfg.only == "both" else (cfg.only,)
    world = build_world(out) if "minillm" in impls else None
    for size in cfg.sizes.split(","):
        size = size.strip().lower()
        shape = model_shape(size)
        params = count_params(shape)
        model_dir = None
        for stage in int_list(cfg.stages):
            ds_path = out / "ds" / f"{size}-z{stage}.json"
            ds_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(ds_path, to_json(minillm_ds_config(cfg.micro_batch_size, cfg.grad_accum, stage, shape, cfg.deepspeed,
                                                       cfg.offload)))
            for ranks in int_list(cfg.ranks):
                predicted = predicted_rank_gb(shape, ranks, stage, cfg)
                for impl in impls:
                    key = f"{impl}-{size}-z{stage}-n{ranks}"
                    if predicted * ranks > cfg.skip_over_gb:
                        print(f"{key}: skipped, the plan says {ranks} x {predicted:.1f} GB > --skip-over-gb "
                              f"{cfg.skip_over_gb}", flush=True)
                        record(results, {"key": key, "impl": impl, "size": size, "params": params, "ranks": ranks,
                                         "stage": stage, "skipped": True, "ok": None,
                                         "predicted_rank_gb": round(predicted, 3)}, results_path)
                        continue
                    model_dir = model_dir or build_model(out, size, shape)
                    inputs = {"model": model_dir, "world": world, "ds_config": ds_path, "params": params,
                              "predicted": predicted}
                    r = run_combination(impl, size, stage, ranks, cfg, inputs)
                    record(results, r, results_path)
                    peaks = " ".join(f"{p:.2f}" for p in r["rank_peaks_gb"])
                    print(f"{key}: {'ok' if r['ok'] else 'FAILED (exit %s)' % r['exit_code']}, per-rank peak GB "
                          f"[{peaks}], exact max {r['exact_max_gb'] or '—'}, plan {predicted:.2f} per rank, "
                          f"{r['wall_s']:.0f} s", flush=True)
                    if not r["ok"]:
                        print("  " + r["output_tail"][-1500:].replace("\n", "\n  "), flush=True)
    text = table(results)
    atomic_write(out / "table.md", text)
    print("\n" + text, end="", flush=True)


if __name__ == "__main__":
    main()
