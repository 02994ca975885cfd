"""The run directory around the checkpoints: one run at a time in it (its lock), what a run writes when it
really starts (options.json, README.md, metrics.jsonl kept up to the resumed step), the data a resume must
continue on, and the signals that stop a run at a step boundary (SIGTERM, Ctrl-C). Checkpoints and the
exported model themselves: minillm.checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import torch.distributed as dist

from minillm.engine import all_reduce_sum, print0
from minillm.files import atomic_write, lock_directory, to_json
from minillm.options import RUN_FILES


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
