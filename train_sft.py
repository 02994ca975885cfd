"""Stage 2: supervised instruction tuning with the loss on responses only.

LLAMMAS: Alpaca + Alpaca-est + English high-quality instructions + translation-task instructions,
3 epochs, lr 2e-5 -> 2e-6, batch 128, loss on responses only, best checkpoint by validation loss,
optionally sequential (first translation tasks, then general instructions). PLLuM: 3 epochs, lr 1e-5,
batch 128, ZeRO-3. Records are Alpaca {"instruction","input","output"} or chat {"messages": [...]}
JSONL, rendered by minillm/chat_format.py — the same code that builds prompts at inference.

CPU, one process (the demo):
    python train_sft.py --config configs/demo_sft.json
One GPU:
    python train_sft.py --init-from runs/pt/model --train-data alpaca_et.jsonl,alpaca_en.jsonl,hqi.jsonl \
        --valid-data valid.jsonl --seq-len 2048 --micro-batch-size 8 --grad-accum 16 --lr 2e-5 --min-lr 2e-6
8 GPUs, sequential curriculum (stages separated by ';', each with its own LR schedule):
    torchrun --nproc_per_node=8 train_sft.py --init-from runs/pt/model \
        --train-data "trtask.jsonl;alpaca_et.jsonl,alpaca_en.jsonl" --micro-batch-size 4 --grad-accum 4 --zero-stage 3
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from minillm.attention import set_attention_backend
from minillm.chat_format import chat_template_jinja, load_sft_jsonl, tokenize_sft_examples
from minillm.data import pack_examples
from minillm.model import flops_per_token
from minillm.training import (
    MetricsLog,
    Preemption,
    batch_to,
    build_engine,
    configure_model,
    epoch_order,
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
    step_slices,
    steps_per_epoch,
    take_rows,
    teardown_distributed,
    token_byte_lengths,
    token_mean_step,
    validation_metrics,
)


@dataclass
class SFTConfig:
    # data: JSONL files, ',' between files of one stage, ';' between sequential stages
    train_data: str = "runs/demo/sft/train.jsonl"
    valid_data: str = "runs/demo/sft/valid.jsonl"  # '' = no validation (the final model is exported)
    template: str = "chat"  # chat (Tulu layout, the exported chat_template) | alpaca | auto (each record its own)
    train_on: str = "assistant"  # assistant (every assistant turn) | last (last turn only) | all
    truncate: str = "right"  # too-long examples: right (cut the end) | left (cut the start) | drop
    pack: bool = True  # several examples per row, document-masked (no example sees another)
    seq_len: int = 512
    # model: a Hugging Face directory (e.g. the pretraining stage's OUT_DIR/model)
    init_from: str = "runs/demo/pretrain/model"
    tokenizer: str = ""  # '' = init_from's own
    # optimisation (per stage: warmup, then decay to min_lr over the stage's epochs)
    epochs: int = 3
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "linear"
    warmup_steps: int = 10
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    zero_stage: int = 0
    deepspeed: str = ""
    activation_checkpointing: str = "none"  # none | selective | full: recompute in backward, save memory
    compile: bool = False  # torch.compile each transformer block (first steps compile; then faster)
    attn: str = "auto"
    # logging and checkpoints
    out_dir: str = "runs/demo/sft"
    log_interval: int = 10
    eval_interval: int = 0  # validate every N steps; 0 = at the end of every epoch
    save_interval: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 1337
    peak_tflops: float = 0.0


def load_examples(files: str, tokenizer, cfg, rank: int):
    """Tokenize every record of the given files into (ids, labels) pairs; report what was dropped."""
    examples, totals = [], {}
    for path in (f.strip() for f in files.split(",") if f.strip()):
        got, stats = tokenize_sft_examples(load_sft_jsonl(path), tokenizer, cfg.seq_len, truncate=cfg.truncate,
                                           train_on=cfg.train_on, fmt=cfg.template)
        examples += got
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        if rank == 0:
            print(f"{path}: {len(got)} examples " + ", ".join(f"{k} {v}" for k, v in stats.items() if v))
    if not examples:
        raise ValueError(f"{files}: no trainable examples")
    return examples, totals


def main():
    cfg = parse_config(SFTConfig)
    rank, world_size, device = setup_distributed()
    seed_everything(cfg.seed)
    set_attention_backend(cfg.attn)
    save_options(cfg, cfg.out_dir, rank)

    model, tokenizer = load_model_and_tokenizer(cfg.init_from, "", cfg.tokenizer, cfg.seq_len, device)
    configure_model(model, cfg)
    stages = [load_examples(files, tokenizer, cfg, rank) for files in cfg.train_data.split(";") if files.strip()]
    valid = {}
    if cfg.valid_data:  # this rank's share of the validation rows, as micro-batches
        valid_rows = pack_examples(load_examples(cfg.valid_data, tokenizer, cfg, rank)[0], cfg.seq_len,
                                   pad_id=tokenizer.pad_id, pack=cfg.pack)
        n_valid = valid_rows["input_ids"].shape[0]
        valid = {"sft": [take_rows(valid_rows, idx)
                         for s in range(steps_per_epoch(n_valid, cfg.micro_batch_size, 1, world_size))
                         for idx in step_slices(n_valid, s, cfg.micro_batch_size, 1, rank, world_size)]}
    byte_lengths = token_byte_lengths(tokenizer)
    engine, optimizer = build_engine(model, cfg, world_size, device)
    chat_template = chat_template_jinja("alpaca" if cfg.template == "alpaca" else "chat", tokenizer)

    # The whole run is planned upfront: every (stage, epoch) shuffles its examples with a seeded order and
    # packs them into rows, so each optimizer step is known by its number alone, which is all a
    # checkpoint needs to record. Each stage has its own LR schedule (warmup, then decay to min_lr).
    def epoch_rows(stage: int, epoch: int) -> dict:
        examples = stages[stage][0]
        order = epoch_order(len(examples), 1000 * stage + epoch, cfg.seed)
        return pack_examples([examples[i] for i in order], cfg.seq_len, pad_id=tokenizer.pad_id, pack=cfg.pack)

    plan = []  # (stage, epoch, step within the epoch, step within the stage, steps in the stage)
    for stage in range(len(stages)):
        epoch_steps = [steps_per_epoch(len(epoch_rows(stage, e)["input_ids"]), cfg.micro_batch_size,
                                       cfg.grad_accum, world_size) for e in range(cfg.epochs)]
        stage_total, stage_step = sum(epoch_steps), 0
        for epoch, n in enumerate(epoch_steps):
            for s in range(n):
                plan.append((stage, epoch, s, stage_step, stage_total))
                stage_step += 1
    total_steps = len(plan)

    step, best_val_loss = 0, float("inf")
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir)) is not None:
        step, best_val_loss = state["step"], state["best_val_loss"]
        if rank == 0:
            print(f"resumed from step {step}")

    def checkpoint():
        save_checkpoint(engine, cfg.out_dir, step, {"step": step, "best_val_loss": best_val_loss,
                                                    "options": asdict(cfg)}, keep=cfg.keep_checkpoints)

    metrics = MetricsLog(cfg.out_dir, rank)
    preemption = Preemption()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="sft", dynamic_ncols=True)
    t_start, start_step, rows_key, rows = time.time(), step, None, None
    while step < total_steps:
        t0 = time.time()
        stage, epoch, step_in_epoch, stage_step, stage_total = plan[step]
        if rows_key != (stage, epoch):
            rows_key, rows = (stage, epoch), epoch_rows(stage, epoch)
        lr = lr_at(stage_step, cfg, max_steps=stage_total)
        set_lr(optimizer, lr)
        n_rows = rows["input_ids"].shape[0]
        micro_batches = [batch_to(take_rows(rows, idx), device) for idx in
                         step_slices(n_rows, step_in_epoch, cfg.micro_batch_size, cfg.grad_accum, rank, world_size)]
        # The loss is the mean over every response token of the global batch (not a mean of means).
        loss, n_tokens, grad_norm = token_mean_step(engine, model, micro_batches, world_size, device)
        step += 1
        dt = time.time() - t0

        tokens = cfg.micro_batch_size * cfg.grad_accum * world_size * cfg.seq_len
        peak = peak_flops(device, cfg.peak_tflops) * world_size
        mfu = flops_per_token(model.config, cfg.seq_len) * tokens / dt / peak
        record = {"step": step, "stage": stage + 1, "epoch": epoch + 1, "loss": loss, "lr": lr,
                  "response_tokens": n_tokens, "grad_norm": grad_norm,
                  "tokens_per_s": tokens / dt, "mfu": mfu, "peak_memory_gb": peak_memory_gb(device)}
        end_of_epoch = step == total_steps or plan[step][1] != epoch or plan[step][0] != stage
        due = step % cfg.eval_interval == 0 if cfg.eval_interval else end_of_epoch
        if valid and due:
            record.update(validation_metrics(engine, valid, byte_lengths, device))
            if record["val_loss_sft"] < best_val_loss:  # keep the best model (LLAMMAS picks it by val loss)
                best_val_loss, record["best"] = record["val_loss_sft"], True
                export_model(engine, model, Path(cfg.out_dir) / "model", tokenizer, chat_template)
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if rank == 0 and (step % cfg.log_interval == 0 or "val_loss_sft" in record):
            eta = (time.time() - t_start) / (step - start_step) * (total_steps - step)
            line = log_line(step, total_steps, loss, lr, tokens / dt, mfu, eta)
            if "val_loss_sft" in record:
                line += f" | val_loss {record['val_loss_sft']:.4f}" + (" (best)" if record.get("best") else "")
            tqdm.write(line)
        if step % cfg.save_interval == 0 or step == total_steps:
            checkpoint()
        if preemption.requested(device):
            checkpoint()
            if rank == 0:
                tqdm.write(f"SIGTERM: saved step {step} to {cfg.out_dir}/checkpoints; exiting")
            break
    bar.close()
    metrics.close()
    if step == total_steps:
        if not valid:  # without validation the final model is the result
            export_model(engine, model, Path(cfg.out_dir) / "model", tokenizer, chat_template)
        if rank == 0:
            best = f" (best val_loss {best_val_loss:.4f})" if valid else ""
            print(f"exported {Path(cfg.out_dir) / 'model'} (Hugging Face layout){best}")
    teardown_distributed()


if __name__ == "__main__":
    run_cli(main)
