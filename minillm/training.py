"""What the three training scripts share: options, the process group, the DeepSpeed engine, the LR
schedule, the loss wrapper, checkpoints, logging. The training *loops* stay in the scripts.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import types
import typing
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from minillm.losses import cross_entropy_sum, token_logprobs

# ----------------------------------------------------------------------------- options

def parse_config(config_cls, argv=None, description: str = ""):
    """Build a script's options dataclass from defaults, then `--config file.json`, then `--name value`.

    Names may use dashes or underscores (`--max-steps 10` == `--max_steps=10`); booleans accept
    true/false/1/0 or a bare `--flag`; list-typed options take every value up to the next flag (so a
    shell glob works). Unknown names are an error, so a typo never goes unnoticed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    if "-h" in argv or "--help" in argv:
        if description:
            print(description)
        print(f"options ({config_cls.__name__}; defaults shown):")
        for f in dataclasses.fields(config_cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"  --{f.name.replace('_', '-'):28s} {default!r}")
        print(f"  --{'config FILE.json':28s} options as a JSON object (flags override it)")
        sys.exit(0)
    pairs: list[tuple[str, list[str]]] = []  # (name, the values that follow it)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            pairs.append((key.replace("-", "_"), [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(arg)
        else:
            raise SystemExit(f"error: unexpected argument {arg!r} (options look like --name value)")
    values: dict = {}
    for key, vals in pairs:  # the config file first, so explicit flags override it
        if key != "config":
            continue
        if len(vals) != 1:
            raise SystemExit("error: --config takes one file")
        try:
            file_values = json.loads(Path(vals[0]).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: {vals[0]}: cannot read config file: {e}")
        if not isinstance(file_values, dict):
            raise SystemExit(f"error: {vals[0]}: a config file must be a JSON object")
        for k, v in file_values.items():
            k = k.replace("-", "_")
            if k not in names:
                raise SystemExit(f"error: {vals[0]}: unknown option {k!r}")
            values[k] = [v] if _is_list(hints[k]) and isinstance(v, str) else v
    for key, vals in pairs:
        if key == "config":
            continue
        if key not in names:
            raise SystemExit(f"error: unknown option --{key.replace('_', '-')}; see --help")
        typ = hints[key]
        if _is_list(typ):
            values[key] = vals
        elif typ is bool and not vals:
            values[key] = True
        elif len(vals) != 1:
            raise SystemExit(f"error: option --{key.replace('_', '-')} takes one value, got {len(vals)}")
        else:
            values[key] = _coerce(vals[0], typ, key)
    return config_cls(**values)


def _is_list(typ) -> bool:
    return typ is list or typing.get_origin(typ) is list


def _coerce(text: str, typ, key: str):
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X]: 'none' means None
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in typing.get_args(typ) if a is not type(None))
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes"):
                return True
            if text.lower() in ("0", "false", "no"):
                return False
            raise ValueError(text)
        return typ(text)
    except (TypeError, ValueError):
        raise SystemExit(f"error: option --{key.replace('_', '-')}: cannot read {text!r} as {typ.__name__}")


def run_cli(main):
    """Run a script's main(); bad input (ValueError / OSError) becomes one `error: ...` line and exit 1.
    Set MINILLM_TRACEBACK=1 to see the full traceback instead."""
    try:
        main()
    except (ValueError, OSError) as e:
        if os.environ.get("MINILLM_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- processes

def setup_distributed():
    """Join (or create) the process group; returns (rank, world_size, device).

    Under torchrun the environment names the group. A plain `python train_x.py` becomes a group of
    one on a free local port: without RANK/WORLD_SIZE DeepSpeed would try MPI discovery and fail
    with "No module named 'mpi4py'".
    """
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def teardown_distributed():
    """Destroy the group explicitly: leaving it to interpreter exit aborts (SIGABRT) under ZeRO-3 + gloo."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few Python scalars over ranks (never tensors of logits: metrics travel as scalars)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- engine

def use_bf16(device) -> bool:
    """bf16 on GPUs that support it; fp32 on CPU (CPU bf16 matmuls are slow and not what tests need)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg, world_size: int, device) -> dict:
    """The DeepSpeed JSON built from the script's options; a user's `--deepspeed file.json` is merged on top."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": use_bf16(device)},
        "steps_per_print": 10**9,  # we print our own log line
        "wall_clock_breakdown": False,
    }
    if cfg.zero_stage == 3:
        # Gather the whole model when saving, so export needs no offline conversion.
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if getattr(cfg, "deepspeed", None):
        user = json.loads(Path(cfg.deepspeed).read_text())
        ds = _merge(ds, user)
        for key, ours in (("train_micro_batch_size_per_gpu", cfg.micro_batch_size),
                          ("gradient_accumulation_steps", cfg.grad_accum)):
            if ds.get(key, ours) != ours:  # the data loader and LR schedule are built from ours
                raise SystemExit(f"error: {cfg.deepspeed}: {key}={ds[key]} disagrees with --{key} {ours}; "
                                 "set it through the script option")
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def configure_model(model: nn.Module, cfg):
    """The scripts' memory and speed options on the model, before the engine wraps it.

    activation_checkpointing: none | selective | full (see minillm/model.py). compile: torch.compile
    each transformer block rather than the whole model ("regional" compilation): every block has the
    same code, so one compiled graph serves them all and compiling takes seconds, not minutes; the
    chunked loss and the DeepSpeed engine stay eager. With ZeRO 0, 1 and 3 two ranks give the loss
    curve of one process (tested); with ZeRO-2 they do not (its gradient hooks, DeepSpeed 0.19), so
    that combination is refused.
    """
    from minillm.model import CHECKPOINTING

    if cfg.activation_checkpointing not in CHECKPOINTING:
        raise SystemExit(f"error: --activation-checkpointing {cfg.activation_checkpointing!r}: choose one of "
                         f"{', '.join(CHECKPOINTING)}")
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        if cfg.zero_stage == 2:
            raise SystemExit("error: --compile gives wrong gradients with --zero-stage 2; use ZeRO 1 or 3, "
                             "or drop --compile")
        for layer in model.layers:
            layer.compile()


def build_engine(model: nn.Module, cfg, world_size: int, device):
    """AdamW (decoupled weight decay on matrices only, as Llama) inside a DeepSpeed engine."""
    import deepspeed

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per step, on CPU too (torch >= 2.4). The default multi-tensor path allocates
    # a temporary the size of all parameters (sqrt of the second moment) during every step.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    loss_model = TokenLogprobs(model)
    if cfg.zero_stage == 3:
        # The fused loss reads the output matrix directly instead of calling its module, so
        # ZeRO-3 must be told to gather it when the wrapper runs.
        deepspeed.zero.register_external_parameter(loss_model, model.output.weight)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=loss_model, optimizer=optimizer, config=deepspeed_config(cfg, world_size, device))
    return engine, optimizer


class TokenLogprobs(nn.Module):
    """model + output matrix -> log p(label) per token ([B, T], 0 where label == -100), or with
    sum_nll=True just the summed negative log-likelihood (a scalar).

    Every stage's loss is built from these: pretraining/SFT need only the sum (cheaper: its
    gradients come out of the forward pass), ORPO averages log-probs per response. The logits are
    computed chunk by chunk (minillm/losses.py), so [B, T, vocab] never exists in fp32 at once.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids=None, doc_ids=None, sum_nll: bool = False):
        hidden = self.model.hidden_states(input_ids, position_ids=position_ids, doc_ids=doc_ids)
        if sum_nll:
            return cross_entropy_sum(hidden, self.model.output.weight, labels)[0]
        return token_logprobs(hidden, self.model.output.weight, labels)


def engine_step(engine, model) -> float | None:
    """engine.step() for one micro-batch; at the end of the accumulation window it updates the
    weights and returns the global gradient norm before clipping (None between updates).

    DeepSpeed's ZeRO and bf16 optimizers report that norm; its plain fp32 path (ZeRO-0, as on CPU)
    does not, so there it is computed here from the averaged gradients, before the update clears them.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    own = None
    if boundary and engine.zero_optimization_stage() == 0:
        norms = [p.grad.float().norm() for p in model.parameters() if p.grad is not None]
        own = float(torch.stack(norms).norm()) if norms else 0.0
    engine.step()
    if not boundary:
        return None
    reported = engine.get_global_grad_norm()
    return own if reported is None or own is not None else float(reported)


def token_mean_step(engine, model, micro_batches: list, world_size: int, device):
    """One optimizer step over this rank's micro-batches with the loss = mean NLL over every target
    token of the global batch (all micro-batches of all ranks), as pretraining and SFT define it.

    The global token count must be known before the first backward, so it is all-reduced first;
    `global_mean_scale` then turns each micro-batch's summed NLL into its share. Returns
    (loss, global target-token count, gradient norm).
    """
    n_local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    n_tokens = all_reduce_sum([n_local], device)[0]
    scale = global_mean_scale(n_tokens, world_size, len(micro_batches))
    nll_sum, grad_norm = 0.0, None
    for batch in micro_batches:
        nll = engine(**model_inputs(batch), sum_nll=True)
        engine.backward(nll * scale)
        grad_norm = engine_step(engine, model)  # updates only after the step's last micro-batch
        nll_sum += nll.item()
    return all_reduce_sum([nll_sum], device)[0] / max(n_tokens, 1), n_tokens, grad_norm


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids") if k in batch}


def global_mean_scale(n_tokens_global: float, world_size: int, grad_accum: int) -> float:
    """Factor turning a micro-batch's summed NLL into its share of the global token-mean loss.

    DeepSpeed divides each backward by grad_accum and averages gradients over ranks; multiplying by
    world_size * grad_accum undoes both, so the step's gradient is that of sum(NLL) / n_tokens over
    the whole global batch: every token weighs the same, however tokens fall across
    micro-batches and ranks (not a mean of per-sequence or per-micro-batch means).
    """
    return world_size * grad_accum / max(n_tokens_global, 1.0)


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg, max_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` (default cfg.max_steps).

    warmup: linear from 0 to lr over warmup_steps. Then by `lr_schedule`:
      linear  - straight down to min_lr at max_steps (LLAMMAS: 2e-5 -> 2e-6)
      cosine  - half a cosine down to min_lr
      wsd     - warmup-stable-decay: hold lr, then decay linearly to min_lr over the last
                decay_fraction of the run (the "annealing phase" PLLuM ends pretraining with).
      constant
    """
    max_steps = cfg.max_steps if max_steps is None else max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = max(max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / total, 1.0)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.lr_schedule == "wsd":
        decay_start = max_steps - int(cfg.decay_fraction * max_steps)
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * (step - decay_start) / max(max_steps - decay_start, 1)
    raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r} (linear, cosine, wsd, constant)")


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(engine, out_dir, step: int, trainer_state: dict, keep: int = 2):
    """Atomically write `out_dir/checkpoints/step_XXXXXXX`, then point `latest` at it.

    DeepSpeed writes each rank's shard into a `.tmp` directory; only when every rank is done does
    rank 0 rename it into place and replace `latest` (temp file + rename). A crash or SIGTERM in
    the middle therefore leaves the previous good checkpoint and `latest` untouched.
    trainer_state (step, data-loader position, options) goes in trainer_state.json; RNG states per
    rank in a safetensors file: nothing of ours is pickled.
    """
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    tag = f"step_{step:07d}"
    tmp_root = root / ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp_root / tag, ignore_errors=True)
        (tmp_root / tag).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp_root), tag=tag, save_latest=False)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp_root / tag / f"rng_state_rank{rank}.safetensors"))
    if rank == 0:
        (tmp_root / tag / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    dist.barrier()
    if rank == 0:
        final = root / tag
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp_root / tag, final)
        _write_atomic(root / "latest", tag)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name != tag)
        for p in old[: max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return root / tag


def load_checkpoint(engine, out_dir) -> dict | None:
    """Restore engine (weights, optimizer, DeepSpeed state) and RNG from the `latest` checkpoint.

    Returns trainer_state, or None when there is nothing to resume. The DeepSpeed shards contain
    pickled optimizer metadata: resume only from checkpoints your own run wrote. Weights meant
    for exchange are exported as safetensors (save_pretrained).
    """
    from safetensors.torch import load_file

    root = Path(out_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise SystemExit(f"error: {root / tag}: DeepSpeed could not load this checkpoint")
    rng = load_file(str(root / tag / f"rng_state_rank{dist.get_rank()}.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((root / tag / "trainer_state.json").read_text())


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_model(engine, model, out_dir, tokenizer=None, chat_template: str | None = None):
    """Write the trained model in Hugging Face layout (+ tokenizer) for the next stage or transformers.

    Under ZeRO-3 each rank holds a slice of every weight; GatheredParameters assembles them for
    the duration of the save (rank 0 writes).
    """
    import deepspeed

    params = list(model.parameters())
    zero3 = engine.zero_optimization_stage() == 3
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else _nullcontext()
    with ctx:
        if dist.get_rank() == 0:
            model.save_pretrained(out_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir, chat_template=chat_template)
    dist.barrier()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class Preemption:
    """SIGTERM (cluster preemption) sets a flag; the loop saves a checkpoint and exits at the next step.

    Every rank checks `requested()` together (an all-reduce), so all save the same step even if
    the signal reached only some of them.
    """

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.flag = True

    def requested(self, device) -> bool:
        return all_reduce_sum([float(self.flag)], device)[0] > 0


# ----------------------------------------------------------------------------- logging

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "4090": 165.0}


def peak_flops(device, override_tflops: float | None = None) -> float:
    """Dense peak of the device in FLOP/s, for MFU: the published bf16 figure of known GPUs. CPUs
    have no such figure, so there it is measured once: the fp32 throughput of a large matmul on
    this machine (MFU on CPU is thus relative to what a plain matmul achieves). --peak-tflops overrides."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return 312e12
    return _measured_cpu_matmul_flops()


@functools.lru_cache(maxsize=1)
def _measured_cpu_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


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


def log_line(step: int, total: int, loss: float, lr: float, tok_s: float, mfu: float, eta_s: float) -> str:
    """The one fixed-format progress line every script prints (rank 0 only)."""
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "--:--:--"
    return (f"step {step:>6d}/{total:<6d} | loss {loss:7.4f} | lr {lr:.3e} | "
            f"{tok_s:9.0f} tok/s | MFU {100 * mfu:5.2f}% | ETA {eta}")


class MetricsLog:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0 only), flushed each write."""

    def __init__(self, out_dir, rank: int, name: str = "metrics.jsonl"):
        self.file = None
        if rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(out_dir) / name, "a", encoding="utf-8")

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def save_options(cfg, out_dir, rank: int):
    """The options the run used, next to its outputs (and inside every checkpoint's trainer_state)."""
    if rank == 0:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        _write_atomic(Path(out_dir) / "options.json", json.dumps(dataclasses.asdict(cfg), indent=1))


# ----------------------------------------------------------------------------- model + data helpers

def load_model_and_tokenizer(init_from: str, preset: str, tokenizer_path: str, seq_len: int, device):
    """Continue a Hugging Face Llama directory (`init_from`), or build `preset` at random for the
    vocabulary of `tokenizer_path`. Fails early, with both numbers, if the tokenizer or the context
    does not fit the model."""
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import Tokenizer, check_vocab_fits

    if init_from:
        model = Llama.from_pretrained(init_from)
        tokenizer = Tokenizer.from_pretrained(tokenizer_path or init_from)
    else:
        tokenizer = Tokenizer.from_pretrained(tokenizer_path)
        config = LlamaConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        model = Llama(config)
    check_vocab_fits(tokenizer, model.config.vocab_size)
    if seq_len > model.config.max_seq_len:
        raise SystemExit(f"error: seq_len {seq_len} is larger than the model's context "
                         f"(max_seq_len {model.config.max_seq_len})")
    return model.to(device), tokenizer


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for, so validation can report bits per byte: a measure
    that does not depend on the tokenizer (an extended vocabulary stays comparable)."""
    lengths = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.id_to_piece(i)
        if i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) or (piece.startswith("<") and
                                                                           piece.endswith(">") and len(piece) > 2
                                                                           and not piece.startswith("<0x")):
            lengths.append(0)  # control symbols and <unk>: no text
        elif piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            lengths.append(1)  # byte-fallback piece
        else:
            lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.float64)


@torch.no_grad()
def validation_metrics(engine, batches_by_name: dict, byte_lengths: torch.Tensor, device) -> dict:
    """Held-out loss (nats/token) and bits per byte for each named validation set, over all ranks."""
    engine.eval()
    out = {}
    for name, batches in batches_by_name.items():
        nll = tokens = nbytes = 0.0
        for batch in batches:
            batch = batch_to(batch, device)
            nll += engine(**model_inputs(batch), sum_nll=True).item()
            mask = batch["labels"] != -100
            tokens += mask.sum().item()
            nbytes += byte_lengths.to(device)[batch["labels"][mask]].sum().item()
        nll, tokens, nbytes = all_reduce_sum([nll, tokens, nbytes], device)
        out[f"val_loss_{name}"] = nll / max(tokens, 1)
        out[f"val_bpb_{name}"] = nll / math.log(2) / max(nbytes, 1)
    engine.train()
    return out


# ----------------------------------------------------------------------------- epoch-based stages (SFT, ORPO)

def epoch_order(n_items: int, epoch: int, seed: int) -> list[int]:
    """A seeded permutation per epoch: the same on every rank and after a resume."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_items, generator=g).tolist()


def steps_per_epoch(n_items: int, micro_batch_size: int, grad_accum: int, world_size: int) -> int:
    return max(1, -(-n_items // (micro_batch_size * grad_accum * world_size)))


def step_slices(n_items: int, step: int, micro_batch_size: int, grad_accum: int, rank: int,
                world_size: int) -> list[list[int]]:
    """Indices of this rank's micro-batches for optimizer step `step` of an epoch.

    Step s covers items [s*G, (s+1)*G), G = micro_batch_size * grad_accum * world_size; micro-batch k
    goes to ranks in turn. The set of items in a step depends only on G, so 4 micro-batches x 1 item,
    1 x 4, or 2 ranks x 2 all train on the same items. Indices past the end are -1: padding with no
    targets, so every rank runs the same number of forwards (ZeRO-3 needs that) at no cost to the loss.
    """
    per_micro = micro_batch_size * world_size
    out = []
    for k in range(grad_accum):
        first = step * micro_batch_size * grad_accum * world_size + k * per_micro + rank * micro_batch_size
        out.append([i if i < n_items else -1 for i in range(first, first + micro_batch_size)])
    return out


def take_rows(rows: dict, indices: list[int]) -> dict:
    """Rows of a packed [R, T] batch dict; index -1 gives an all-padding row (label -100)."""
    idx = torch.tensor([max(i, 0) for i in indices])
    out = {k: v[idx].clone() for k, v in rows.items()}
    pad = torch.tensor([i < 0 for i in indices])
    if pad.any():
        out["labels"][pad] = -100
    return out
