"""The training machinery the three scripts share: process group, DeepSpeed engine, LR schedule, metric sums.

The scripts hold the loop; this module holds what one loop iteration calls: `setup_distributed` (a group
of one for `python script.py`, the torchrun group otherwise), `build_engine` (AdamW in a DeepSpeed
engine, ZeRO 0-3), `lr_at`, `optimizer_step` (one micro-batch's optimizer step, returning the gradient
norm at each update) and `all_reduce_sum` (scalars summed over ranks: every logged metric is a global
sum / count).
"""
from __future__ import annotations

import atexit
import math
import os
import random
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from minillm.files import read_json_object
from minillm.hf import full_shape, load_pretrained, load_weights, read_config
from minillm.model import Llama, LlamaConfig
from minillm.tokenizer import check_vocab_fits, load_tokenizer

# ----------------------------------------------------------------------------- processes


def setup_distributed(seed: int):
    """Join (or create) the process group and seed every generator; returns (rank, world_size, device).

    Under torchrun the environment names the group. A plain `python train_x.py` becomes a group of one on
    a free local port (without RANK/WORLD_SIZE DeepSpeed tries MPI discovery: "No module named 'mpi4py'").
    On CPU, DeepSpeed's shared-memory all-reduce extension is not used: it is JIT-compiled at every
    start under a lock in ~/.cache/torch_extensions, and a start killed while holding that lock makes
    every later DeepSpeed process on the machine wait forever. gloo's all-reduce serves instead.
    """
    import importlib

    if not torch.cuda.is_available():  # say so ourselves: else DeepSpeed warns "unable to detect" in every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if not cuda:  # (the attribute deepspeed.comm.torch is PyTorch itself: fetch the submodule by name)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    seed_everything(seed)
    return dist.get_rank(), dist.get_world_size(), device


def exit_distributed():
    """The scripts' last call: leave the process group, then end the process without the interpreter's
    exit-time teardown (after what `atexit` holds has run: the run directory's lock is released there).

    Why not a normal exit: `deepspeed.initialize` keeps a process group referenced where nothing can release
    it, so after `destroy_process_group` one gloo group's worker threads still run (seen in /proc/self/task:
    a plain torch script has none left). Threads left running while the interpreter and the C++ runtime tear
    themselves down made a rank abort now and then ("terminate called without an active exception", SIGABRT,
    a failed run to torchrun) after everything had been written. Nothing is left to write at this point.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a few Python scalars over ranks, in float64 (metrics travel as sums, never as tensors of logits)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def print0(*args, **kwargs):
    """print on rank 0 only (every rank runs the script; one of them speaks)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """The keys of a batch that Llama.forward takes."""
    return {k: batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids") if k in batch}


# ----------------------------------------------------------------------------- engine

def use_bf16(device) -> bool:
    """bf16 on GPUs that support it; fp32 on CPU (CPU bf16 matmuls are slow and not what tests need)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def deepspeed_config(cfg, device, model_config) -> dict:
    """The DeepSpeed JSON built from the script's options and the model's shape; a user's `--deepspeed
    file.json` is merged on top (any key there wins, e.g. a bucket size).

    ZeRO's buffers are sized to the model, as transformers' DeepSpeed integration does for "auto": gradients
    are reduced, and ZeRO-3 weights prefetched, in buckets of about one dim x dim matrix, ZeRO-3 keeps
    vectors (norms, biases: under 10 x dim elements) whole on every rank instead of gathering them for each
    use, and holds about two blocks' weights whole at a time. DeepSpeed's defaults are sized for nothing: a
    5e8-element gradient bucket (2 GB in fp32) that every rank fills, and up to 1e9 weights kept whole from
    forward to backward, whatever the number of ranks (bench/bench_zero_memory.py, BENCHMARKS.md)."""
    c, dim = model_config, model_config.dim
    block = c.dim * (2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim + 3 * c.dim * c.hidden_dim  # q, o, k, v, MLP
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage in (1, 2):
        zero.update(reduce_bucket_size=dim * dim, allgather_bucket_size=dim * dim)
    if cfg.zero_stage == 3:
        zero.update(reduce_bucket_size=dim * dim, stage3_prefetch_bucket_size=int(0.9 * dim * dim),
                    stage3_param_persistence_threshold=10 * dim,
                    # whole weights on a rank at once: the block being computed and the next one (or the head);
                    # a weight stays whole only if it is used again within one block. DeepSpeed's 1e9 for both
                    # keeps a model of up to 0.5e9 parameters whole on every rank from forward to backward.
                    stage3_max_live_parameters=max(2 * block, c.vocab_size * dim), stage3_max_reuse_distance=block,
                    # gather the whole model when DeepSpeed itself saves 16-bit weights (we export ourselves)
                    stage3_gather_16bit_weights_on_model_save=True)
    if cfg.offload != "none":  # pinned CPU memory, so the copies to and from the GPU are asynchronous
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if cfg.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(device)},
        "steps_per_print": 10**9,  # we print our own log line
        "wall_clock_breakdown": False,
        # Offloaded, the optimizer stays torch's fused AdamW (its CPU kernel is vectorised), with the same groups,
        # rates and --trainable behaviour as on the GPU; DeepSpeed would otherwise insist on its own CPU Adam, a
        # C++ extension compiled at the first start.
        "zero_force_ds_cpu_optimizer": False,
    }
    if cfg.deepspeed:
        ds = _merge(ds, read_json_object(cfg.deepspeed, "DeepSpeed config"))
        for key, option, ours in (("train_micro_batch_size_per_gpu", "--micro-batch-size", cfg.micro_batch_size),
                                  ("gradient_accumulation_steps", "--grad-accum", cfg.grad_accum)):
            if ds.get(key, ours) != ours:  # the data loader and the LR schedule are built from ours
                raise ValueError(f"{cfg.deepspeed}: {key}={ds[key]} disagrees with {option} {ours}; "
                                 "set it through the script option")
        if ds["zero_optimization"].get("stage", cfg.zero_stage) != cfg.zero_stage:
            raise ValueError(f"{cfg.deepspeed}: zero_optimization.stage={ds['zero_optimization']['stage']} "
                             f"disagrees with --zero-stage {cfg.zero_stage}; set it through the script option")
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_model_and_tokenizer(cfg, device, preset: str = ""):
    """What a training script starts from, with the options' memory and speed settings applied: the Hugging
    Face directory cfg.init_from (and its tokenizer, unless cfg.tokenizer names another), or the model
    `preset` at random, sized to cfg.tokenizer's vocabulary. Fails early, naming both numbers, if the
    tokenizer or the context does not fit the model.

    Under ZeRO-3 the model is born partitioned (`deepspeed.zero.Init`: each module's weights are split over
    the ranks as soon as the module is built, in the training dtype) and filled one tensor at a time, so no
    rank ever holds the whole model: rank 0 reads each tensor from the memory-mapped safetensors files while
    it is gathered, and leaving the gathering hands every rank its slice. A random preset is initialised the
    same way, tensor by tensor with the same random numbers as a plain start (Llama.init_weights), so both
    starts give the same model."""
    if cfg.init_from:
        config = read_config(cfg.init_from)[0]
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.init_from)
    else:
        if not cfg.tokenizer:
            raise ValueError("--tokenizer is required to build a random --preset model (or give --init-from)")
        tokenizer = load_tokenizer(cfg.tokenizer)
        config = LlamaConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    check_vocab_fits(tokenizer, config.vocab_size)
    if cfg.seq_len > config.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is larger than the model's context (max_seq_len "
                         f"{config.max_seq_len}): use --seq-len {config.max_seq_len} or less")
    if cfg.zero_stage == 3:
        import deepspeed

        def gathered(params):  # whole while inside; rank 0's values become every rank's partition
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

        with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg, device, config)):
            model = Llama(config, init=False)
        if cfg.init_from:
            load_weights(model, cfg.init_from, gathered, reads=dist.get_rank() == 0)
        else:
            model.init_weights(gathered)
    else:  # built (or read) straight in the dtype DeepSpeed trains in: no fp32 copy of a bf16 model on the GPU
        dtype = torch.bfloat16 if use_bf16(device) else torch.float32
        model = load_pretrained(cfg.init_from, dtype, device) if cfg.init_from else Llama(config).to(device, dtype)
    configure_model(model, cfg)
    return model, tokenizer


def configure_model(model: nn.Module, cfg):
    """The scripts' memory and speed options on the model, before the engine wraps it.

    attn and activation_checkpointing are model settings (config.attn_backend, config.activation_checkpointing).
    compile: torch.compile each transformer block rather than the whole model ("regional" compilation):
    every block has the same code, so one compiled graph serves them all and compiling takes seconds; the
    chunked loss and the DeepSpeed engine stay eager. With ZeRO 0, 1 and 3 two ranks give the loss curve
    of one process (tested); with ZeRO-2 they do not (its gradient hooks, DeepSpeed 0.19): refused.
    """
    model.config.attn_backend = cfg.attn
    model.config.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        if cfg.zero_stage == 2:
            raise ValueError("--compile gives wrong gradients with --zero-stage 2; use ZeRO 1 or 3, or drop --compile")
        for layer in model.layers:
            layer.compile()


def optimizer_groups(model: nn.Module, weight_decay: float, trainable: str = "all",
                     embedding_lr_scale: float = 1.0) -> list[dict]:
    """AdamW's parameter groups: matrices with weight decay (as Llama), vectors (norms, biases) without, and the
    input embedding and output head (one matrix when tied) as their own group, whose learning rate is the
    schedule's times "lr_scale" (set_lr). trainable="embeddings" trains that group alone and freezes every
    other parameter (requires_grad False: no gradient, no optimizer state, the weights stay bit-identical),
    what continual pretraining after vocabulary extension does first, while the new rows settle in."""
    if trainable not in ("all", "embeddings"):
        raise ValueError(f"trainable {trainable!r}: choose all or embeddings")
    embedding_ids = {id(model.tok_embeddings.weight), id(model.output.weight)}
    matrices, vectors, embeddings = [], [], []
    for p in model.parameters():  # a tied matrix is listed once
        if id(p) in embedding_ids:
            embeddings.append(p)
        elif trainable == "embeddings":
            p.requires_grad_(False)
        elif p.requires_grad:  # (a ZeRO-3 parameter born partitioned is an empty 1-d tensor: its full shape)
            (matrices if len(full_shape(p)) >= 2 else vectors).append(p)
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0},
            {"params": embeddings, "weight_decay": weight_decay, "lr_scale": embedding_lr_scale}]


def build_engine(model: nn.Module, cfg, device, param_groups: list[dict] | None = None):
    """AdamW (decoupled weight decay on matrices only, as Llama) inside a DeepSpeed engine.

    param_groups: [{"params": [...], "lr_scale": x, ...}], default `optimizer_groups(model, cfg.weight_decay)`."""
    import deepspeed

    groups = [g for g in (param_groups or optimizer_groups(model, cfg.weight_decay)) if g["params"]]
    # fused: one kernel per step, on CPU too (torch >= 2.4). The default multi-tensor path allocates a
    # temporary the size of all parameters (sqrt of the second moment) during every step.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=deepspeed_config(cfg, device, model.config))
    return engine, optimizer


def end_validation(engine):
    """Back to training after a validation pass. Under ZeRO-3 DeepSpeed prefetches weights along the module
    order it recorded on its first step; a forward-only validation before any training step (the step-0
    validation) must not become that record: the training step's backward would not follow it, and with
    selective checkpointing its recomputation would then differ from its forward. So a record still being
    taken is dropped, and the first training step records its own. (A complete record is left alone.)"""
    engine.train()
    if engine.zero_optimization_stage() == 3:
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        if coordinator.is_record_trace():
            coordinator._invalidate_trace()


def optimizer_step(engine, model) -> float | None:
    """engine.step() after one micro-batch's backward, returning the gradient norm: at the end of the
    accumulation window DeepSpeed updates the weights and this returns the global gradient norm before
    clipping; between updates it returns None.

    DeepSpeed's ZeRO and bf16 optimizers report that norm; its plain fp32 path (ZeRO-0, as on CPU) does
    not, so there it is computed here from the averaged gradients, before the update clears them."""
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


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run (or SFT stage) of `max_steps` steps.

    warmup: linear from 0 to lr over warmup_steps. Then by `lr_schedule`:
      linear   straight down to min_lr at max_steps (LLAMMAS: 2e-5 -> 2e-6)
      cosine   half a cosine down to min_lr
      wsd      warmup-stable-decay: hold lr, then decay linearly to min_lr over the last decay_fraction of
               the run (the "annealing phase" PLLuM ends pretraining with)
      constant lr throughout
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min((step - cfg.warmup_steps) / max(max_steps - cfg.warmup_steps, 1), 1.0)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)  # wsd
    if step < decay_start:
        return cfg.lr
    return cfg.lr + (cfg.min_lr - cfg.lr) * (step - decay_start) / max(max_steps - decay_start, 1)


def set_lr(optimizer, lr: float):
    """Every parameter group at `lr` times its "lr_scale" (1 unless the script set one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
