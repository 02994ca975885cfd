"""A run's directory: resumable checkpoints, the exported model, the options, and what protects them.

    OUT_DIR/options.json            the options of the run (written once the run has really started)
    OUT_DIR/metrics.jsonl           one JSON object per step (minillm.monitor.MetricsLog)
    OUT_DIR/checkpoints/step_N/     DeepSpeed's shards, trainer_state.json, RNG states (safetensors)
    OUT_DIR/checkpoints/step_N/universal/   the same state in DeepSpeed's universal format (one file per
                                    parameter and state), written when a run resumes it on another number of
                                    ranks, or at save with --universal-checkpoints
    OUT_DIR/checkpoints/latest      the name of the newest complete checkpoint ("step_0000200")
    OUT_DIR/model/                  the exported model in Hugging Face layout, + training_state.json
    OUT_DIR/README.md               what is where, how to resume, how to evaluate

Promises (each tested): a checkpoint appears complete or not at all (written under checkpoints/.tmp,
renamed in, then `latest` replaced atomically); `latest` never names a missing directory; a step is saved
once; a failed save (a full disk) removes its temporary files, leaves `latest` and the older
checkpoints as they were, and stops with one line naming the path and the free space; resuming loads
no pickled object other than tensors and DeepSpeed's own bookkeeping types (a planted pickle is
refused), and `latest` must name a step_N directory of this run.

Another number of ranks: a checkpoint records the world size it was written by (trainer_state.json). A resume
on another one must keep the global batch (micro-batch x grad-accum x ranks, refused in one line otherwise);
its ZeRO 1-3 shards are then converted once into DeepSpeed's universal format (step_N/universal, written
under step_N/.universal.tmp and renamed in when complete: `latest` keeps naming step_N, the shards stay) and
loaded from there. ZeRO-0's checkpoint is the whole model and optimizer, which loads on any number of ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from minillm.engine import all_reduce_sum, print0
from minillm.files import atomic_write, to_json
from minillm.hf import save_pretrained

TAG = re.compile(r"step_\d{7}")


def options_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- saving

def latest_tag(root: Path) -> str | None:
    try:
        return (root / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _write_error(e: BaseException, path: Path, previous: str | None) -> str:
    """One line for a failed checkpoint write: what failed, where, how much space is left, and what is left
    to resume from (`previous`: the checkpoint `latest` names, if any)."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
    except OSError:
        free = -1
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    no_space = getattr(e, "errno", None) == errno.ENOSPC or "no space left" in str(e).lower() or 0 <= free < 16 << 20
    reason = "no space left on device" if no_space else text
    space = f" ({free / 2**30:.2f} GiB free there)" if free >= 0 else ""
    kept = f"the previous one ({previous}) and 'latest' are intact" if previous else \
        "there is no earlier checkpoint of this run"
    return f"cannot write checkpoint {path}: {reason}{space}; removed the partial checkpoint, {kept}"


def weights_finite(model, device) -> bool:
    """Whether every weight (this rank's ZeRO-3 partition, or the whole tensor) is finite, on all ranks."""
    bad = 0.0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps each rank's slice there
        t = p.detach() if t is None else t
        if t.numel() and not torch.isfinite(t).all():
            bad = 1.0
            break
    return all_reduce_sum([bad], device)[0] == 0


def save_checkpoint(engine, out_dir, step: int, trainer_state: dict, keep: int = 2, universal: bool = False) -> Path:
    """Write `out_dir/checkpoints/step_N` (every rank calls this), then point `latest` at it.

    DeepSpeed writes each rank's shard into `.tmp/step_N`; only when every rank succeeded does rank 0
    rename it into place, replace `latest` (atomic_write) and delete the oldest checkpoints beyond `keep`
    (never the one `latest` names). trainer_state (step, data position, options) goes in
    trainer_state.json with the world size, RNG states in safetensors: nothing of ours is pickled.
    universal: rank 0 also converts the shards into step_N/universal before the rename (any number of
    ranks can then resume it without a conversion)."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    tag = f"step_{step:07d}"
    final, tmp = root / tag, root / ".tmp" / tag
    rank = dist.get_rank()
    if latest_tag(root) == tag and final.is_dir():
        return final  # this step is saved already (a step is saved once)
    if not weights_finite(engine.module, engine.device):  # never save (or rotate away a good one) over NaN
        raise ValueError(f"step {step}: the weights are not finite; stopped without saving, the last checkpoint "
                         f"({latest_tag(root) or 'none'}) is the last finite state (lower --lr?)")
    failed, error = 0.0, None
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(root / ".tmp"), tag=tag, save_latest=False)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / f"rng_state_rank{rank}.safetensors"))
        if rank == 0:
            atomic_write(tmp / "trainer_state.json",
                         to_json({**trainer_state, "world_size": dist.get_world_size()}, indent=1))
    except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
        failed, error = 1.0, e
    _agree_or_remove(failed, error, tmp, root, engine.device)
    if rank == 0 and (missing := _unseen_rank_files(tmp, engine.zero_optimization_stage(), dist.get_world_size())):
        failed, error = 1.0, OSError(f"{missing[0]} (written by another rank) is not there: is --out-dir on a "
                                     "filesystem that every node shares?")
    _agree_or_remove(failed, error, tmp, root, engine.device)
    if universal and engine.zero_optimization_stage() > 0:  # every shard is written now
        failed = 0.0
        if rank == 0:
            try:
                convert_to_universal(tmp)
            except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
                failed, error = 1.0, e
        _agree_or_remove(failed, error, tmp, root, engine.device)
    if rank == 0:
        if final.exists():  # a leftover that `latest` does not name (checked above): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(root / ".tmp", ignore_errors=True)
        atomic_write(root / "latest", tag)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != tag)
        for p in old[: max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _unseen_rank_files(tmp: Path, zero_stage: int, world_size: int, patience_s: float = 30.0) -> list[str]:
    """The files of other ranks that rank 0 cannot see in the checkpoint being written. On several nodes every
    rank writes into the run directory, so it must be one directory that every node shares; a network
    filesystem may show another node's new file a little late, hence the patience."""
    deadline = time.monotonic() + patience_s
    while True:
        rng_files = [f"rng_state_rank{r}.safetensors" for r in range(world_size)]
        missing = missing_shards(tmp, zero_stage, world_size) + [n for n in rng_files if not (tmp / n).is_file()]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def _agree_or_remove(failed: float, error, tmp: Path, root: Path, device):
    """Every rank learns whether any failed; if one did, rank 0 removes the temporary checkpoint and every
    rank raises the same one-line OSError."""
    if all_reduce_sum([failed], device)[0] > 0:
        message = _write_error(error, tmp, latest_tag(root)) if failed else \
            f"cannot write checkpoint {tmp}: another rank failed"
        if dist.get_rank() == 0:
            shutil.rmtree(root / ".tmp", ignore_errors=True)
        raise OSError(message) from None


# ----------------------------------------------------------------------------- another number of ranks

def convert_to_universal(path: Path) -> Path:
    """Convert the ZeRO 1-3 shards of checkpoint `path` into DeepSpeed's universal format, `path/universal`
    (one process: rank 0). Written under `path/.universal.tmp` and renamed in only when complete, so an
    interrupted conversion is never used (the next one starts afresh); the shards are kept. DeepSpeed's
    converter reads the shards with weights-only unpickling like every load here."""
    import io
    import types

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    final, tmp = path / "universal", path / ".universal.tmp"
    if final.is_dir():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # inject_missing_state: our checkpoints carry no universal_checkpoint_info (no tensor parallelism to
    # describe); one worker: converting in-process (workers would re-import torch and DeepSpeed)
    args = types.SimpleNamespace(input_folder=str(path), output_folder=str(tmp / "universal"),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)
    try:
        with weights_only_loading(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal(args)  # (it also writes tmp/latest_universal, which goes with tmp)
        os.replace(tmp / "universal", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _ranks(n: int) -> str:
    return f"{n} rank{'s' * (n != 1)}"


def missing_shards(path: Path, zero_stage: int, world_size: int) -> list[str]:
    """The per-rank files DeepSpeed writes for a checkpoint of `world_size` ranks that are not in `path`
    (its optimizer shards are named bf16_zero_pp_rank_* in bf16 runs)."""
    if zero_stage == 0:
        names = ["mp_rank_00_model_states.pt"]
    else:
        names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]
        names += ([f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] if zero_stage == 3
                  else ["mp_rank_00_model_states.pt"])
    return [n for n in names if not (path / n).is_file() and not (path / f"bf16_{n}").is_file()]


def check_resumable(path: Path, state: dict, engine, world_size: int) -> int:
    """The world size checkpoint `path` was written by, once its ZeRO stage, global batch and rank shards are
    found fit for this run (each problem one ValueError naming the checkpoint and what differs)."""
    options = state.get("options", {})
    saved_world = state.get("world_size") or len(list(path.glob("rng_state_rank*.safetensors")))
    stage, saved_stage = engine.zero_optimization_stage(), options.get("zero_stage")
    if saved_stage is not None and saved_stage != stage:
        raise ValueError(f"checkpoint {path}: written with --zero-stage {saved_stage}, this run uses --zero-stage "
                         f"{stage}; resume with --zero-stage {saved_stage}")
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    saved_micro, saved_accum = options.get("micro_batch_size", micro), options.get("grad_accum", accum)
    saved_rows, rows = saved_world * saved_micro * saved_accum, world_size * micro * accum
    if saved_rows != rows:
        if saved_rows % (world_size * micro) == 0:
            advice = f"use --grad-accum {saved_rows // (world_size * micro)} to keep the global batch"
        elif saved_rows % (world_size * accum) == 0:
            advice = f"use --micro-batch-size {saved_rows // (world_size * accum)} to keep the global batch"
        else:
            advice = (f"{saved_rows} rows do not split over {_ranks(world_size)}: resume on a number of ranks that "
                      f"divides {saved_rows}")
        raise ValueError(f"checkpoint {path.name} was written by {_ranks(saved_world)} x micro-batch {saved_micro} x "
                         f"grad-accum {saved_accum} = {saved_rows} rows per step; {_ranks(world_size)} x {micro} x "
                         f"{accum} = {rows}: {advice}")
    converted = saved_world != world_size and stage > 0 and (path / "universal").is_dir()
    if not converted and (missing := missing_shards(path, stage, saved_world)):
        raise ValueError(f"checkpoint {path}: {missing[0]} is missing (the checkpoint was written by "
                         f"{_ranks(saved_world)}; every rank's shard is needed)")
    return saved_world


# ----------------------------------------------------------------------------- loading

def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's checkpoints hold (ZeRO 0-3, fp32 and bf16): bookkeeping enums
    and containers. Everything else is refused when resuming."""
    import collections

    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    safe = [ZeroStageEnum, fragment_address, collections.OrderedDict, collections.defaultdict, dict, set]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        safe += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    return safe


@contextlib.contextmanager
def weights_only_loading():
    """Every torch.load inside (DeepSpeed's too, which asks for weights_only=False) unpickles only tensors,
    plain containers and DeepSpeed's bookkeeping types."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def _load_universal(engine, universal: Path):
    """engine.load_checkpoint from a universal copy, with two repairs of DeepSpeed 0.19's ZeRO-3 reader: it
    gives every parameter group the first group's settings (weight decay, lr_scale; ours are the run's
    options, put back here), and one shared `step` tensor to every group's Adam state, which the fused
    AdamW then advances once per group at every step (wrong bias correction): each gets its own copy."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    engine._config.load_universal_checkpoint = True  # what {"checkpoint": {"load_universal": true}} sets
    try:
        loaded, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
    finally:
        engine._config.load_universal_checkpoint = False
    for group, settings in zip(engine.optimizer.param_groups, groups):
        group.update(settings)
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return loaded


def load_checkpoint(engine, out_dir, model_config: dict | None = None, trainable: str | None = None) -> dict | None:
    """Restore engine (weights, optimizer, DeepSpeed state) and RNG from the `latest` checkpoint.
    Returns its trainer_state, or None when there is nothing to resume. Every problem (a `latest` that
    does not name a checkpoint of this run, missing or damaged files, a checkpoint of another model or of
    another --trainable, a file holding anything but tensors) is a ValueError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(out_dir) / "checkpoints"
    tag = latest_tag(root)
    if tag is None:  # a kill between a checkpoint's rename and the first `latest`: never start over it
        complete = sorted(p.name for p in root.glob("step_*") if TAG.fullmatch(p.name) and p.is_dir())
        if not complete:
            return None
        tag = complete[-1]
        print0(f"{root / 'latest'} is missing; resuming from the newest complete checkpoint, {tag}")
    path = root / tag
    if not TAG.fullmatch(tag) or not path.is_dir() or path.is_symlink() or path.resolve().parent != root.resolve():
        raise ValueError(f"{root / 'latest'}: names {tag[:60]!r}, which is not a step_NNNNNNN checkpoint directory "
                         f"of this run")
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_file}: missing or damaged ({e})") from None
    if model_config is not None and state.get("model_config") not in (None, model_config):
        diff = [k for k in model_config if state["model_config"].get(k) != model_config[k]]
        raise ValueError(f"{state_file}: the checkpoint is of another model ({', '.join(diff[:3])} differ); "
                         "resume with the options it was written with")
    saved_trainable = state.get("options", {}).get("trainable", trainable)
    if trainable is not None and saved_trainable != trainable:  # the optimizer state has other parameter groups
        raise ValueError(f"{state_file}: the checkpoint trains --trainable {saved_trainable}, this run --trainable "
                         f"{trainable}; resume with --trainable {saved_trainable}, or start a new run with --init-from "
                         f"{Path(out_dir) / 'model'} --trainable {trainable}")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    saved_world = check_resumable(path, state, engine, world_size)
    # Another number of ranks under ZeRO 1-3: DeepSpeed reads the universal copy (converted here once, by rank 0)
    universal = saved_world != world_size and engine.zero_optimization_stage() > 0
    if universal:  # every rank reaches the agreement: whether a copy was there is rank 0's to see and say
        failed, error = 0.0, ""
        if rank == 0 and not (path / "universal").is_dir():
            print0(f"checkpoint {path.name}: written by {_ranks(saved_world)}, resumed on {world_size}: converting it "
                   f"to DeepSpeed's universal format ({path / 'universal'})")
            try:
                convert_to_universal(path)
            except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below
                text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                failed, error = 1.0, text[:200]
        if all_reduce_sum([failed], engine.device)[0] > 0:
            raise ValueError(f"checkpoint {path}: cannot convert it to the universal format for {_ranks(world_size)} "
                             f"({error or 'failed on rank 0'}); the checkpoint itself is unchanged")
    try:
        with weights_only_loading():
            if universal:
                loaded = _load_universal(engine, path / "universal")
            else:
                loaded, _ = engine.load_checkpoint(str(root), tag=tag)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise ValueError(f"{path}: refused to load: a file there holds a pickled object that is not a tensor or "
                         f"DeepSpeed state ({culprit.group(1) if culprit else 'unknown type'}); resume only from "
                         "checkpoints minillm wrote") from None
    except (RuntimeError, OSError, EOFError, KeyError, AssertionError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load this checkpoint ({text[:200]})") from None
    if loaded is None:
        raise ValueError(f"{path}: DeepSpeed found no checkpoint there (files missing?)")
    # On another number of ranks every rank takes rank 0's RNG state. Nothing the scripts train with draws from
    # torch's global generator (the model has no dropout; data orders have their own seeded generators), so
    # the losses do not depend on it; it is restored for whatever might.
    rng_file = path / f"rng_state_rank{rank if saved_world == world_size else 0}.safetensors"
    try:
        rng = load_file(str(rng_file))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{rng_file}: missing or damaged ({e})") from None
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


# ----------------------------------------------------------------------------- exporting

def export_model(engine, model, out_dir, tokenizer, chat_template: str | None = None, state: dict | None = None):
    """Write the model in Hugging Face layout (+ tokenizer, chat template and training_state.json: which step,
    which validation loss, which options) to out_dir, for the next stage, transformers, vLLM or lm-eval.
    Every rank calls this; rank 0 writes. Under ZeRO-3 each rank holds a slice of every weight: the export
    gathers one tensor at a time and rank 0 adds it to the safetensors shard being filled (save_pretrained),
    so no rank ever holds more than one shard plus one tensor. The files are the same bytes as a ZeRO-0
    export of the same weights. A failed write (a full disk) is one error on every rank, the previous
    export left as it was."""
    import deepspeed


    if not weights_finite(model, engine.device):
        raise ValueError(f"{out_dir}: the weights are not finite; not exported (the previous export is kept)")
    rank = dist.get_rank()
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:  # weights DeepSpeed prefetched for the next forward may still be in flight: let them land first
        engine.empty_partition_cache()
    failed, error = 0.0, None
    if zero3 or rank == 0:
        try:
            save_pretrained(model, out_dir, tokenizer=tokenizer, chat_template=chat_template,
                            extra_files={"training_state.json": to_json(state or {})}, writes=rank == 0,
                            gathered=deepspeed.zero.GatheredParameters if zero3 else None)
        except OSError as e:  # every rank must reach the agreement below
            failed, error = 1.0, e
    if all_reduce_sum([failed], engine.device)[0] > 0:
        text = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else "a write failed"
        raise OSError(f"cannot export {out_dir}: {text}; the previous export is left as it was") from None


class ExportPolicy:
    """Which model a stage exports to OUT_DIR/model, and when: with `by_validation` the model with the best
    validation loss so far (LLAMMAS keeps that checkpoint), else the model after the last step. `start(record)` takes the step-0
    validation: with cfg.initial_can_be_best (the default) the initial weights are exported then and stay the
    result unless a step beats them, else step 0 is only the baseline the summary compares with. `update(record,
    last)` after every step exports when the record makes it so (and marks the record "best");
    training_state.json in the directory names the step, its validation loss and the options' hash; `best` goes
    into checkpoints so a resumed run keeps comparing against it."""

    def __init__(self, engine, model, tokenizer, cfg, chat_template: str | None = None, by_validation: bool = True,
                 best: dict | None = None):
        self.engine, self.model, self.tokenizer, self.cfg = engine, model, tokenizer, cfg
        self.chat_template, self.by_validation = chat_template, by_validation
        self.best = best or {"step": 0, "val_loss": None}
        self.path = Path(cfg.out_dir) / "model"

    def start(self, record: dict) -> dict:
        """The step-0 record (validation of the initial weights), returned for the log."""
        if not self.by_validation:
            return record
        if getattr(self.cfg, "initial_can_be_best", False):
            self.update(record, last=False)  # exports the initial weights: the result until a step beats them
        else:
            self.best = {**self.best, "initial_val_loss": record.get("val_loss")}
        return record

    def update(self, record: dict, last: bool):
        val = record.get("val_loss")
        if val is not None and not math.isfinite(val) and record["step"] == 0:
            raise ValueError(f"step 0: the initial model's validation loss is {val}; stopped before training, nothing "
                             "exported (a damaged --init-from?)")
        if val is not None and not math.isfinite(val):
            raise ValueError(f"step {record['step']}: the validation loss is {val}; stopped without exporting over "
                             f"{self.path} (the best so far: step {self.best['step']})")
        better = self.by_validation and val is not None and (self.best["val_loss"] is None or val < self.best["val_loss"])
        if better or (last and not self.by_validation):
            self.best = {**self.best, "step": record["step"], "val_loss": val}
            if self.by_validation:  # the step line says "(best)"
                record["best"] = True
            export_model(self.engine, self.model, self.path, self.tokenizer, self.chat_template,
                         state={"step": record["step"], "val_loss": val, "options_sha256": options_hash(self.cfg)})

    def summary(self) -> str:
        if self.by_validation and self.best["val_loss"] is None:
            return f"no validation happened, so nothing was exported to {self.path}"
        if not self.by_validation:
            return f"exported {self.path} (Hugging Face layout): step {self.best['step']}, the last step"
        if self.best["step"] == 0:
            return (f"no step improved on the initial model's val_loss {self.best['val_loss']:.4f}: exported the "
                    f"initial weights (step 0) to {self.path} (--initial-can-be-best false exports the best trained "
                    "step instead)")
        line = (f"exported {self.path} (Hugging Face layout): step {self.best['step']}, the best val_loss "
                f"{self.best['val_loss']:.4f}")
        initial = self.best.get("initial_val_loss")
        if initial is not None and self.best["val_loss"] >= initial:
            line += f"; no step improved on the initial model's val_loss {initial:.4f} (--initial-can-be-best false)"
        return line


def save_checkpoint_if_due(engine, cfg, step: int, total: int, trainer_state, preemption):
    """save_checkpoint after every --save-interval steps (0 = none in between), after the last step, and when a
    SIGTERM arrived (every rank agrees; the loop then stops, see Preemption.stop). trainer_state() gives
    what the checkpoint records besides DeepSpeed's state."""
    if preemption.requested(engine.device) or step == total or (cfg.save_interval and step % cfg.save_interval == 0):
        save_checkpoint(engine, cfg.out_dir, step, trainer_state(), keep=cfg.keep_checkpoints,
                        universal=cfg.universal_checkpoints)
