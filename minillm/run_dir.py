"""The run directory around the checkpoints, and the options every training run shares (TrainOptions, whose
check refuses an out_dir that holds a run): one run at a time in it (its lock), what a run writes when it
really starts (options.json, README.md, metrics.jsonl kept up to the resumed step), the data a resume must
continue on, and the signals that stop a run at a step boundary (SIGTERM, Ctrl-C). Checkpoints and the
exported model themselves: minillm.checkpoints.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import signal
import typing
from pathlib import Path

import torch.distributed as dist

from minillm.engine import all_reduce_sum, print0
from minillm.files import atomic_write, lock_directory, to_json
from minillm.monitor import TENSORBOARD_HINT
from minillm.options import OptionError, require_option

REFERENCE_LOGPS = "reference_logps.safetensors"  # DPO/IPO/KTO: log pi_ref of every example (minillm.preference)
RUN_FILES = ("options.json", "metrics.jsonl", "checkpoints", "model", "tensorboard", REFERENCE_LOGPS)  # what marks an out_dir as holding a run


@dataclasses.dataclass(kw_only=True)
class TrainOptions:
    """What the three training scripts share: model, optimisation, run directory."""
    # model
    init_from: str = ""  # Hugging Face model directory to continue
    tokenizer: str = ""  # tokenizer directory; '' = init_from's own
    seq_len: int = 512  # tokens per row
    attn: typing.Literal["auto", "triton", "sdpa", "math"] = "auto"  # attention backend; auto = triton on CUDA if installed, else sdpa
    activation_checkpointing: typing.Literal["none", "selective", "full"] = "none"  # recompute in backward to save memory: selective reruns only elementwise work, full whole blocks
    compile: bool = False  # torch.compile each transformer block (the first steps compile, then faster; not with ZeRO-2)
    # optimisation
    micro_batch_size: int = 8  # rows per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro_batch_size x grad_accum x ranks
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the decay
    lr_schedule: typing.Literal["linear", "cosine", "wsd", "constant"] = "linear"  # decay after warmup; wsd = warmup-stable-decay (PLLuM's annealing)
    warmup_steps: int = 10  # steps of linear warmup from 0 to lr
    decay_fraction: float = 0.2  # wsd only: share of the steps spent decaying, at the end
    weight_decay: float = 0.0  # AdamW weight decay of the matrices (never of norms)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    zero_stage: typing.Literal[0, 1, 2, 3] = 0  # DeepSpeed ZeRO stage (3 shards weights, gradients and optimizer state)
    offload: typing.Literal["none", "optimizer", "optimizer+params"] = "none"  # ZeRO-Offload, for fewer GPUs than the model states need: AdamW's state and the fp32 weights in CPU memory (ZeRO 1-3), +params also ZeRO-3's weight partitions
    deepspeed: str = ""  # a DeepSpeed JSON merged over the generated config
    # run directory, logging, checkpoints
    out_dir: str = "runs/demo/run"  # where metrics, checkpoints and the exported model go
    log_interval: int = 10  # print the step line every N steps (and at every validation and the last step)
    log_to: typing.Literal["", "tensorboard"] = ""  # also write every metric to TensorBoard event files in OUT_DIR/tensorboard (needs the tensorboard package)
    eval_interval: int = 50  # validate every N steps and after the last one; 0 = only at epoch ends and after the last step
    save_interval: int = 200  # checkpoint every N steps and after the last one; 0 = only after the last step (and on SIGTERM)
    keep_checkpoints: int = 2  # checkpoints kept in OUT_DIR/checkpoints (the oldest are deleted)
    universal_checkpoints: bool = False  # also write each checkpoint in DeepSpeed's universal format at save (a resume on another number of ranks converts it otherwise; costs the optimizer's size again on disk)
    resume: bool = False  # continue the run in out_dir from its latest checkpoint
    overwrite: bool = False  # start afresh in an out_dir that holds a run (its checkpoints, metrics and model are deleted)
    seed: int = 1337  # seed of initialisation, data order and sampling
    peak_tflops: float = 0.0  # device peak for MFU; 0 = the published figure of known GPUs, measured on CPU

    def check(self):
        positive = ("seq_len", "micro_batch_size", "grad_accum", "log_interval", "keep_checkpoints")
        for name in positive:
            require_option(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        for name in ("warmup_steps", "eval_interval", "save_interval"):
            require_option(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")
        require_option(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "must be a positive number")
        require_option(0 <= self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be between 0 and --lr ({self.lr})")
        require_option(0 <= self.decay_fraction <= 1, "decay_fraction", self.decay_fraction, "must be between 0 and 1")
        require_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            require_option(0 <= getattr(self, name) < 1, name, getattr(self, name), "must be in [0, 1)")
        require_option(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        require_option(self.peak_tflops >= 0, "peak_tflops", self.peak_tflops, "must be >= 0")
        require_option(self.offload == "none" or self.zero_stage >= 1, "offload", self.offload,
                       "needs --zero-stage 1, 2 or 3 (ZeRO-0 keeps every state on the GPU)")
        require_option(self.offload != "optimizer+params" or self.zero_stage == 3, "offload", self.offload,
                       "needs --zero-stage 3 (only ZeRO-3 partitions the weights); use --offload optimizer")
        if self.log_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise OptionError(TENSORBOARD_HINT)
        if self.resume and self.overwrite:
            raise OptionError("--resume and --overwrite exclude each other: continue the run, or start it afresh")
        # A re-run must never silently replace a finished model or mix two runs' metrics.
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise OptionError(f"--out-dir {out}: exists and is not a directory")
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found and not (self.resume or self.overwrite):
            raise OptionError(f"--out-dir {out}: holds a run already ({', '.join(found)}); add --resume to continue "
                              "it or --overwrite to start afresh")


def lock_run(out_dir, rank: int, device):
    """Rank 0 takes the run directory's lock (minillm.files.lock_directory) before anything is read or written;
    every rank stops with the same one line if another run holds it."""
    failed, message = 0.0, "another run holds the run directory"
    if rank == 0:
        try:
            if note := lock_directory(out_dir):
                print(note, flush=True)
        except ValueError as e:
            failed, message = 1.0, str(e)
    if all_reduce_sum([failed], device)[0] > 0:
        raise ValueError(message)


def start_run(cfg, rank: int, resumed_step: int, readme: str):
    """Once the run has really started (data read, engine built): with --overwrite delete the old run's
    files, keep only metrics of steps up to the resumed one, write options.json and README.md (rank 0)."""
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite:
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        metrics = out / "metrics.jsonl"
        if metrics.exists():  # a resumed run rewrites the steps after its checkpoint
            kept = [line for line, record in _metric_records(metrics) if record.get("step", 0) <= resumed_step]
            atomic_write(metrics, "".join(line + "\n" for line in kept))
        atomic_write(out / "options.json", to_json(dataclasses.asdict(cfg)))
        atomic_write(out / "README.md", readme)
    if dist.is_initialized():
        dist.barrier()


def _metric_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of every line of metrics.jsonl. A torn last line (a kill while it was written) is dropped
    with a warning naming it; damage anywhere else is an error naming the file and line."""
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                print(f"warning: {path}:{n}: a torn last line (the run was killed while writing it), dropped",
                      flush=True)
                break
            raise ValueError(f"{path}:{n}: damaged ({str(e).splitlines()[0]}); only the last line may be torn") \
                from None
        records.append((line, record))
    return records


def run_readme(script: str, cfg, what: str) -> str:
    """The README.md written into each run directory."""
    return f"""# {Path(cfg.out_dir).name}: {what}

Written by `{script}`; `options.json` holds every option of the run.

| path | what |
|---|---|
| `options.json` | the options this run used (also saved inside every checkpoint) |
| `metrics.jsonl` | one JSON object per optimizer step: loss, learning rate, tokens/s, MFU, validation metrics |
| `checkpoints/step_N/` | resumable state: weights, optimizer, data position, RNG (DeepSpeed format) |
| `checkpoints/latest` | the name of the newest complete checkpoint |
| `model/` | the result in Hugging Face layout (safetensors, config, tokenizer); `training_state.json` says which step it is |

Resume after an interruption: the same command with `--resume` (same `--out-dir`); on another number of GPUs
keep micro-batch x grad-accum x GPUs (the checkpoint is converted to DeepSpeed's universal format once).
Plots: `python -m minillm.report {cfg.out_dir}`.
Evaluate: `python evaluate.py --model {Path(cfg.out_dir) / 'model'} --tasks TASK_DIR --prompt-format chat`
(`raw` for a pretrained model).
"""


# ----------------------------------------------------------------------------- resuming and stopping

def check_same_data(state: dict, data: dict[str, dict], allow_change: bool) -> list:
    """Whether a resume trains on the data its checkpoint was written with (`data`: files.fingerprints of the
    run's data files, the checkpoint's under state["data"]). A file added, missing, or with other contents is
    one ValueError naming it, unless `allow_change` (--allow-data-change), which is then said and recorded:
    returns the checkpoint's list of allowed changes, with this one appended."""
    changes = list(state.get("data_changes", []))
    before = state.get("data")
    if before is None:  # a checkpoint from before fingerprints were recorded
        return changes
    differ = [(path, "not in the checkpoint's data") for path in data if path not in before]
    differ += [(path, "in the checkpoint's data, not in this run's") for path in before if path not in data]
    differ += [(path, f"its contents changed ({before[path]['size']:,} -> {data[path]['size']:,} bytes, another "
                      "sha256)" if before[path]["size"] != data[path]["size"] else "its contents changed (another sha256)")
               for path in data if path in before and before[path]["sha256"] != data[path]["sha256"]]
    if not differ:
        return changes
    path, why = differ[0]
    step = state.get("step")
    if not allow_change:
        raise ValueError(f"{path}: {why} since the checkpoint of step {step}; resume with the data it was trained on, "
                         "or add --allow-data-change to continue on this data")
    print0(f"warning: --allow-data-change: {path}: {why} since the checkpoint of step {step}; continuing on this data"
           + (f" ({len(differ)} files differ)" if len(differ) > 1 else ""))
    return changes + [{"step": step, "files": [p for p, _ in differ]}]


class Preemption:
    """SIGTERM (cluster preemption) or Ctrl-C (SIGINT) sets a flag; at the end of the step every rank asks
    `requested()` together (an all-reduce), so all save the same step even if the signal reached only some of
    them; then `stop` is True and the loop ends. `signal` names what came. A second Ctrl-C leaves at once,
    without saving."""

    def __init__(self):
        self.flag, self.stop, self.signal = False, False, ""
        signal.signal(signal.SIGTERM, self._handler)
        signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("Ctrl-C: saving at the end of this step (again: leave at once, without saving)", flush=True)
        self.flag, self.signal = True, signal.Signals(signum).name

    def requested(self, device) -> bool:
        self.stop = all_reduce_sum([float(self.flag)], device)[0] > 0
        self.signal = self.signal or ("a signal to another rank" if self.stop else "")
        return self.stop
