"""What a training run reports: the fixed-format step line, metrics.jsonl, validation loss, MFU and memory.

Every script prints, on rank 0 only, one line per logged step:
    step    120/400    | loss  2.3417 | lr 2.500e-04 |     51234 tok/s | MFU 31.20% | ETA 00:04:10 | ...
and appends one JSON object per step to OUT_DIR/metrics.jsonl (rank 0, flushed each write). The tqdm bar
is drawn only when stdout is a terminal: in CI, `nohup` or cluster logs there are just the step lines.
With --log-to tensorboard the same numbers also go to TensorBoard event files in OUT_DIR/tensorboard
(`tensorboard --logdir OUT_DIR`), through torch.utils.tensorboard (needs the tensorboard package).
"""
from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minillm.engine import all_reduce_sum, batch_to, end_validation, model_inputs

TENSORBOARD_HINT = "--log-to tensorboard needs the tensorboard package: pip install 'minillm[tensorboard]'"

# ----------------------------------------------------------------------------- MFU

# Dense bf16 peak (TFLOP/s, without sparsity) of GPUs by name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L40S": 362.0, "L4": 121.0,
               "4090": 165.0}


def peak_flops(device, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device, for MFU: --peak-tflops when given, the published bf16 figure of known GPUs,
    and on CPUs (which publish none) the measured fp32 throughput of a large matmul with the threads the
    training step uses: MFU on CPU is the share of what this machine's matmul achieves."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((t for key, t in PEAK_TFLOPS.items() if key in name), 312.0) * 1e12
    return measured_cpu_matmul_flops(torch.get_num_threads())


@functools.lru_cache(maxsize=4)
def measured_cpu_matmul_flops(threads: int, n: int = 2048, repeats: int = 4) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(config, batches: list[dict]) -> float:
    """Training FLOPs of the micro-batches of one step, on this rank, from their real shapes: the 6N rule
    per token for the block matrices (forward 2N + backward 4N; q and o are n_heads * head_dim wide, which
    need not be dim), attention's score and value products (6 * 2 * n_layers * T * n_heads * head_dim per
    token, halved as causal: PaLM appendix B, nanoGPT's estimate_mfu), and the output head only for the
    tokens that have a label (the chunked loss skips the others). Norms and biases are elementwise: not
    counted. tests/test_presets.py re-derives it from the parameters of every preset."""
    d, hd = config.dim, config.head_dim
    block = config.n_layers * (2 * d * config.n_heads * hd + 2 * d * config.n_kv_heads * hd
                               + 3 * d * config.hidden_dim)
    total = 0.0
    for b in batches:
        rows, width = b["input_ids"].shape
        labelled = int((b["labels"] != -100).sum())
        total += rows * width * (6 * block + 6 * config.n_layers * width * config.n_heads * hd)
        total += labelled * 6 * config.vocab_size * d
    return total


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # resident-set high-water mark of this process
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validation_loss(engine, sets: dict, byte_lengths: torch.Tensor, device) -> dict:
    """Held-out loss (nats per target token), bits per byte and target tokens: val_loss / val_bpb over
    every set together, and val_loss_NAME / val_bpb_NAME per named set (a set named '' has none). Sums over
    every row of every rank are divided once, so the values do not depend on how rows fall into
    micro-batches or ranks; pad rows (label -100 everywhere) add nothing."""
    engine.eval()
    out, totals = {}, [0.0, 0.0, 0.0]
    byte_lengths = byte_lengths.to(device)
    for name, batches in sets.items():
        nll = tokens = nbytes = 0.0
        for batch in batches:
            batch = batch_to(batch, device)
            nll += engine(**model_inputs(batch)).item()  # Llama.forward with labels: the summed NLL
            mask = batch["labels"] != -100
            tokens += mask.sum().item()
            nbytes += byte_lengths[batch["labels"][mask]].sum().item()
        nll, tokens, nbytes = all_reduce_sum([nll, tokens, nbytes], device)
        totals = [totals[0] + nll, totals[1] + tokens, totals[2] + nbytes]
        if name:
            out[f"val_loss_{name}"] = nll / max(tokens, 1)
            out[f"val_bpb_{name}"] = nll / math.log(2) / max(nbytes, 1)
    end_validation(engine)
    nll, tokens, nbytes = totals
    return {"val_loss": nll / max(tokens, 1), "val_bpb": nll / math.log(2) / max(nbytes, 1), "val_tokens": tokens,
            **out}


# ----------------------------------------------------------------------------- logging

def log_line(record: dict, total: int, eta_s: float, extra: tuple[str, ...] = ()) -> str:
    """The one fixed-format progress line: step/total | loss | lr | tok/s | MFU | ETA, then `extra` keys of
    the record that are present (validation metrics, ORPO's reward accuracy)."""
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "--:--:--"
    mfu = record.get("mfu")
    line = (f"step {record['step']:>6d}/{total:<6d} | loss {record['loss']:7.4f} | lr {record['lr']:.3e} | "
            f"{record['tokens_per_s']:9.0f} tok/s | MFU " + (f"{100 * mfu:5.2f}%" if mfu is not None else "  n/a ")
            + f" | ETA {eta}")
    for key in extra:
        if key in record:
            value = record[key]
            line += f" | {key} {value:.4f}" if isinstance(value, float) else f" | {key} {value}"
    return line + (" (best)" if record.get("best") else "")


def tensorboard_writer(out_dir, start: int):
    """A SummaryWriter for OUT_DIR/tensorboard. A resumed run (start > 0) purges the events after its
    checkpoint that an interrupted run wrote, as it rewrites those lines of metrics.jsonl."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(TENSORBOARD_HINT) from None
    return SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=start + 1 if start else None,
                         flush_secs=10)


def scalars(record: dict) -> dict:
    """The numbers of a metrics.jsonl record, as TensorBoard scalars (step is the axis; flags such as "best"
    and missing values such as a grad_norm of None are left out)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


COUNT_KEYS = ("_pairs", "_examples", "_desirable", "_undesirable")  # validation counts: printed as integers


class StallWatch:
    """Training that has stopped learning without a NaN, said once each as a warning (the run goes on: the user
    decides). A loss that stays within 1% of ln(vocab size), the cross-entropy of a uniform prediction, for
    `patience` steps after warmup: an absurd learning rate flattens the output distribution, which is finite and
    therefore passes the NaN check. A gradient norm of exactly 0: no weight can learn (all frozen, or no target
    token in the batch). The loss watched is the language-model NLL ("nll" where a script's loss adds other
    terms, as ORPO's does), else "loss"."""

    def __init__(self, vocab_size: int, warmup_steps: int, patience: int = 20, tolerance: float = 0.01):
        self.uniform_loss = math.log(vocab_size) if vocab_size > 1 else None
        self.warmup_steps, self.patience, self.tolerance = warmup_steps, patience, tolerance
        self.steps_at_uniform, self.said = 0, set()

    def check(self, record: dict) -> list[str]:
        """The warnings this step's record raises (each at most once per run)."""
        warnings, step = [], record["step"]
        loss = record.get("nll", record.get("loss"))
        at_uniform = (self.uniform_loss is not None and step > self.warmup_steps and loss is not None
                      and abs(loss - self.uniform_loss) <= self.tolerance * self.uniform_loss)
        self.steps_at_uniform = self.steps_at_uniform + 1 if at_uniform else 0
        if self.steps_at_uniform >= self.patience and "uniform" not in self.said:
            self.said.add("uniform")
            warnings.append(f"warning: step {step}: the loss has stayed at {loss:.4f}, within 1% of ln(vocabulary) = "
                            f"{self.uniform_loss:.4f} (a uniform prediction), for {self.patience} steps after warmup: "
                            "the model has collapsed and is not learning (lower --lr?)")
        if record.get("grad_norm") == 0.0 and "zero_grad" not in self.said:
            self.said.add("zero_grad")
            warnings.append(f"warning: step {step}: the gradient norm is 0: no weight is learning (every weight "
                            "frozen, or no target token in the batch?)")
        return warnings


class RunLog:
    """What rank 0 reports while a script trains: metrics.jsonl (one JSON object per step, flushed), the
    fixed-format step line every `log_interval` steps, at every validation and after the last step, a
    tqdm bar when stdout is a terminal, with log_to="tensorboard" the same numbers as TensorBoard scalars,
    and the StallWatch's warnings."""

    def __init__(self, out_dir, rank: int, total: int, start: int, log_interval: int, desc: str, log_to: str = "",
                 stall_watch: StallWatch | None = None):
        self.rank, self.total, self.first, self.log_interval, self.t0 = rank, total, start, log_interval, time.time()
        self.stall_watch = stall_watch
        self.file = open(Path(out_dir) / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
        self.tensorboard = tensorboard_writer(out_dir, start) if rank == 0 and log_to == "tensorboard" else None
        self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                        disable=rank != 0 or not (sys.stdout.isatty() and sys.stderr.isatty()))

    def write(self, record: dict):
        """One line of metrics.jsonl (and its scalars in TensorBoard)."""
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard:
            for key, value in scalars(record).items():
                self.tensorboard.add_scalar(key, value, record["step"])

    def step(self, record: dict, extra: tuple[str, ...] = ()):
        """metrics.jsonl, the bar, and the step line when it is due (with the `extra` keys of the record)."""
        self.write(record)
        self.bar.update(1)
        for warning in self.stall_watch.check(record) if self.stall_watch else []:
            self.print(warning)
        step = record["step"]
        if step % self.log_interval == 0 or step == self.total or "val_loss" in record:
            eta = (time.time() - self.t0) / max(step - self.first, 1) * (self.total - step)
            self.print(log_line(record, self.total, eta, extra))

    def start(self, record: dict):
        """The step-0 record (validation before the first step: where training starts from)."""
        self.write(record)
        self.print(f"step {0:>6d}/{self.total:<6d} | " + " | ".join(
            f"{k} {int(v)}" if k.endswith(COUNT_KEYS) else f"{k} {v:.4f}" for k, v in record.items()
            if k.startswith("val_") and "tokens" not in k))

    def print(self, text: str):
        if self.rank == 0:
            if self.bar.disable:
                print(text, flush=True)
            else:
                self.bar.write(text)

    def close(self, text: str = ""):
        self.bar.close()
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
        if text:
            self.print(text)
