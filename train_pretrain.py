"""Stage 1: continual pretraining of a Llama on target-language text mixed with some English.

LLAMMAS continued Llama-2-7B on 5B tokens, 75% Estonian / 25% English, context 1024, bf16,
lr 2e-5 -> 2e-6 linearly, 256 sequences per step; PLLuM ends its pretraining with an annealing
(warmup-stable-decay) phase. Data comes from token shards written by `python -m minillm.data prepare`.

CPU, one process (the demo; a group of one is created for DeepSpeed):
    python train_pretrain.py --config configs/demo_pretrain.json
One GPU:
    python train_pretrain.py --init-from llama-2-7b-hf --data et=tok/et,en=tok/en --mixture et=0.75,en=0.25 \
        --seq-len 1024 --micro-batch-size 8 --grad-accum 32 --lr 2e-5 --min-lr 2e-6 --zero-stage 2
8 GPUs (global batch = micro_batch_size * grad_accum * 8 sequences):
    torchrun --nproc_per_node=8 train_pretrain.py --init-from llama-2-7b-hf ... --grad-accum 4 --zero-stage 3
Resume after an interruption or preemption (same out_dir): add --resume.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from minillm.attention import set_attention_backend
from minillm.data import PackedLoader, parse_mixture, parse_sources, validation_batches
from minillm.model import flops_per_token
from minillm.training import (
    MetricsLog,
    Preemption,
    batch_to,
    build_engine,
    configure_model,
    export_model,
    load_checkpoint,
    load_model_and_tokenizer,
    log_line,
    lr_at,
    parse_config,
    peak_flops,
    peak_memory_gb,
    run_cli,
    save_checkpoint,
    save_options,
    seed_everything,
    set_lr,
    setup_distributed,
    teardown_distributed,
    token_byte_lengths,
    token_mean_step,
    validation_metrics,
)


@dataclass
class PretrainConfig:
    # data: shard directories by source name, and the sampling weights of each source
    data: str = "et=runs/demo/tokens/et_train,en=runs/demo/tokens/en_train"
    mixture: str = "et=0.75,en=0.25"  # LLAMMAS: 75% target language, 25% English
    valid_data: str = "et=runs/demo/tokens/et_valid,en=runs/demo/tokens/en_valid"  # '' = no validation
    packing: str = "document"  # 'concat' (LLAMMAS) or 'document' (attention/loss never cross documents)
    seq_len: int = 256
    # model: continue a Hugging Face directory, or a random `preset` sized to the tokenizer
    init_from: str = ""
    preset: str = "demo"
    tokenizer: str = "runs/demo/tokenizer"  # directory with tokenizer.model ('' = init_from's own)
    # optimisation
    max_steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per forward
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_schedule: str = "linear"  # linear | cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd only: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    zero_stage: int = 0  # DeepSpeed ZeRO 0/1/2/3
    deepspeed: str = ""  # optional DeepSpeed JSON merged over the generated config
    activation_checkpointing: str = "none"  # none | selective | full: recompute in backward, save memory
    compile: bool = False  # torch.compile each transformer block (first steps compile; then faster)
    attn: str = "auto"  # auto | triton | sdpa | math
    # logging and checkpoints
    out_dir: str = "runs/demo/pretrain"
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 1337
    peak_tflops: float = 0.0  # for MFU; 0 = look up the GPU (or assume 50 GFLOP/s per CPU core)


def main():
    cfg = parse_config(PretrainConfig)
    rank, world_size, device = setup_distributed()
    seed_everything(cfg.seed)
    set_attention_backend(cfg.attn)
    save_options(cfg, cfg.out_dir, rank)

    model, tokenizer = load_model_and_tokenizer(cfg.init_from, cfg.preset, cfg.tokenizer, cfg.seq_len, device)
    configure_model(model, cfg)
    sources = parse_sources(cfg.data)
    loader = PackedLoader(sources, parse_mixture(cfg.mixture, names=list(sources)), seq_len=cfg.seq_len,
                          batch_size=cfg.micro_batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                          mode=cfg.packing, vocab_size=model.config.vocab_size)
    valid = {name: validation_batches(path, cfg.seq_len, cfg.micro_batch_size, cfg.eval_batches, rank, world_size)
             for name, path in parse_sources(cfg.valid_data).items()} if cfg.valid_data else {}
    byte_lengths = token_byte_lengths(tokenizer)
    engine, optimizer = build_engine(model, cfg, world_size, device)

    step, tokens_seen = 0, 0
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir)) is not None:
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        if rank == 0:
            print(f"resumed from step {step} ({tokens_seen:,} tokens seen)")

    def checkpoint():
        save_checkpoint(engine, cfg.out_dir, step, {"step": step, "tokens_seen": tokens_seen,
                                                    "loader": loader.state_dict(), "options": asdict(cfg)},
                        keep=cfg.keep_checkpoints)

    metrics = MetricsLog(cfg.out_dir, rank)
    preemption = Preemption()
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * world_size
    flops_per_step = flops_per_token(model.config, cfg.seq_len) * tokens_per_step
    peak = peak_flops(device, cfg.peak_tflops) * world_size
    bar = tqdm(total=cfg.max_steps, initial=step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    t_start, start_step = time.time(), step
    while step < cfg.max_steps:
        t0 = time.time()
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        # Fetch the whole step's micro-batches first: the loss is a mean over every target token of
        # the global batch, so the global token count must be known before the first backward.
        micro_batches = [batch_to(loader.next_batch(), device) for _ in range(cfg.grad_accum)]
        loss, _, grad_norm = token_mean_step(engine, model, micro_batches, world_size, device)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.time() - t0

        tok_s = tokens_per_step / dt
        record = {"step": step, "tokens_seen": tokens_seen, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": tok_s,
                  "mfu": flops_per_step / dt / peak, "peak_memory_gb": peak_memory_gb(device)}
        if valid and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            record.update(validation_metrics(engine, valid, byte_lengths, device))
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
        validated = any(k.startswith("val_") for k in record)
        if rank == 0 and (step % cfg.log_interval == 0 or step == cfg.max_steps or validated):
            eta = (time.time() - t_start) / (step - start_step) * (cfg.max_steps - step)
            line = log_line(step, cfg.max_steps, loss, lr, tok_s, record["mfu"], eta)
            vals = " | ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("val_"))
            tqdm.write(line + (f" | {vals}" if vals else ""))
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            checkpoint()
        if preemption.requested(device):
            checkpoint()
            if rank == 0:
                tqdm.write(f"SIGTERM: saved step {step} to {cfg.out_dir}/checkpoints; exiting")
            break
    bar.close()
    metrics.close()
    if step == cfg.max_steps:
        export_model(engine, model, Path(cfg.out_dir) / "model", tokenizer)
        if rank == 0:
            print(f"exported {Path(cfg.out_dir) / 'model'} (Hugging Face layout)")
    teardown_distributed()


if __name__ == "__main__":
    run_cli(main)
