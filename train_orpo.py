"""Stage 3: preference alignment with ORPO (odds-ratio preference optimisation, no reference model).

PLLuM aligns its instruction-tuned models with ORPO on ~40K preference pairs. For each pair the loss
is  NLL(chosen) + lambda * L_OR  (minillm/losses.py writes L_OR out): the model learns the chosen
answer and, at the same time, to give it higher odds than the rejected one. Records are JSONL
{"prompt": str | [messages], "chosen": str | message, "rejected": str | message}, rendered with the
same chat template as SFT, so both answers share the prompt's tokens exactly. Chosen and rejected go
through ONE concatenated forward pass (two passes break DeepSpeed ZeRO: "gradient computed twice").

CPU, one process (the demo):
    python train_orpo.py --init-from runs/demo/sft/model --train-data prefs.jsonl --valid-data prefs_valid.jsonl
One GPU:
    python train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --micro-batch-size 4 --grad-accum 16
8 GPUs:
    torchrun --nproc_per_node=8 train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --zero-stage 3

Metrics (every step, means over the step's pairs on all ranks; val_* on held-out pairs):
    loss             nll + lambda * or_loss, what is minimised
    nll              mean NLL per chosen token that is trained on (response + EOS; + prompt with --nll-on-prompt)
    or_loss          mean L_OR = -log sigmoid(log_odds)
    log_odds         mean log(odds(chosen) / odds(rejected)), odds(y) = P / (1 - P), P = exp(mean token log-prob)
    chosen_logps / rejected_logps   mean per-token log-prob of the chosen / rejected responses
    reward_accuracy  share of pairs whose chosen response has the higher mean log-prob
    margin           mean (chosen_logps - rejected_logps), nats per token
    chosen_length / rejected_length mean response tokens
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minillm.attention import set_attention_backend
from minillm.chat_format import chat_template_jinja, load_preferences
from minillm.data import pack_examples
from minillm.losses import concat_pairs, mean_metrics, orpo_loss, pair_logprobs
from minillm.model import flops_per_token
from minillm.training import (
    MetricsLog,
    Preemption,
    all_reduce_sum,
    batch_to,
    build_engine,
    configure_model,
    engine_step,
    epoch_order,
    export_model,
    load_checkpoint,
    load_model_and_tokenizer,
    log_line,
    lr_at,
    model_inputs,
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
    teardown_distributed,
)


@dataclass
class ORPOConfig:
    # data
    train_data: str = "data/sample/preferences/train.jsonl"  # JSONL files, comma-separated
    valid_data: str = "data/sample/preferences/valid.jsonl"  # '' = no validation (final model exported)
    seq_len: int = 512  # prompt + response; pairs that do not fit are dropped and counted
    # ORPO
    orpo_lambda: float = 0.1  # weight of L_OR (TRL's default; the ORPO authors used 0.05-0.25)
    nll_on_prompt: bool = False  # NLL on response + EOS only, as SFT. TRL's ORPOTrainer also scores the prompt.
    # model: a Hugging Face directory (the SFT stage's OUT_DIR/model)
    init_from: str = "runs/demo/sft/model"
    tokenizer: str = ""
    # optimisation (ORPO paper: lr 8e-6 for 7B models, linear decay, a few epochs)
    epochs: int = 1
    micro_batch_size: int = 4  # pairs per rank per forward (2x rows: chosen + rejected)
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr: float = 2e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 5
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
    out_dir: str = "runs/demo/orpo"
    log_interval: int = 10
    eval_interval: int = 50
    save_interval: int = 200
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 1337
    peak_tflops: float = 0.0


def pair_batch(pairs: list, indices: list[int], nll_on_prompt: bool, seq_len: int, pad_id: int) -> dict:
    """Chosen rows then rejected rows, [2B, T] (T = the longest of them), for one forward pass.

    `labels` are what the NLL term scores, `response_mask` what the odds ratio averages over
    (response + EOS). Each pair is (chosen_ids, chosen_labels, rejected_ids, rejected_labels) with
    labels aligned to ids (-100 on prompt tokens), as the chat template renders them.
    """
    halves = []
    for c_or_r in (0, 1):
        examples = [(pairs[i][2 * c_or_r], pairs[i][2 * c_or_r + 1]) for i in indices]
        rows = pack_examples(examples, seq_len, pad_id=pad_id, pack=False)
        rows["response_mask"] = rows["labels"] != -100
        if nll_on_prompt:  # score every next token of the real sequence, not only the response
            all_tokens = [(ids, list(ids)) for ids, _ in examples]
            rows["labels"] = pack_examples(all_tokens, seq_len, pad_id=pad_id, pack=False)["labels"]
        halves.append(rows)
    batch = concat_pairs(*halves)
    width = int((batch["doc_ids"] == batch["doc_ids"][:, :1]).sum(1).max())  # trim trailing padding
    return {k: v[:, :width] for k, v in batch.items()}


def orpo_step_metrics(engine, batch, n_tokens: float, n_pairs: float, cfg):
    """Forward one micro-batch of pairs; returns (loss for backward, sums for logging)."""
    inputs = model_inputs(batch)
    token_logps = engine(**inputs)
    parts = pair_logprobs(token_logps, batch["labels"], batch["response_mask"])
    loss, metrics = orpo_loss(parts["chosen_nll_sum"] / n_tokens, parts["chosen_logps"], parts["rejected_logps"],
                              cfg.orpo_lambda, chosen_lengths=parts["chosen_lengths"],
                              rejected_lengths=parts["rejected_lengths"], n_pairs=n_pairs)
    return loss, metrics, float(parts["chosen_nll_sum"])


def main():
    cfg = parse_config(ORPOConfig)
    rank, world_size, device = setup_distributed()
    seed_everything(cfg.seed)
    set_attention_backend(cfg.attn)
    save_options(cfg, cfg.out_dir, rank)

    model, tokenizer = load_model_and_tokenizer(cfg.init_from, "", cfg.tokenizer, cfg.seq_len, device)
    configure_model(model, cfg)

    def load(files):
        pairs = []
        for path in (f.strip() for f in files.split(",") if f.strip()):
            got, stats = load_preferences(path, tokenizer, cfg.seq_len)
            pairs += got
            if rank == 0:
                print(f"{path}: {len(got)} pairs " + ", ".join(f"{k} {v}" for k, v in stats.items() if v))
        return pairs

    train_pairs = load(cfg.train_data)
    valid_pairs = load(cfg.valid_data) if cfg.valid_data else []
    pairs_per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
    if len(train_pairs) < pairs_per_step:
        raise ValueError(f"{cfg.train_data}: {len(train_pairs)} usable pairs, fewer than one global batch "
                         f"({pairs_per_step} = micro_batch_size x grad_accum x ranks)")
    # Whole global batches only: the incomplete last one of an epoch is skipped (an empty padding
    # pair would have no response to score); its pairs come back in the next epoch's order.
    epoch_steps = len(train_pairs) // pairs_per_step
    total_steps = cfg.epochs * epoch_steps
    engine, optimizer = build_engine(model, cfg, world_size, device)
    chat_template = chat_template_jinja("chat", tokenizer)

    def run_pairs(pairs, indices_per_micro, train: bool):
        """Forward (and backward if training) a step's micro-batches; returns the step's metrics."""
        batches = [batch_to(pair_batch(pairs, idx, cfg.nll_on_prompt, cfg.seq_len, tokenizer.pad_id), device)
                   for idx in indices_per_micro]
        n_tokens, n_pairs = all_reduce_sum([sum(float((b["labels"][: len(b["labels"]) // 2] != -100).sum())
                                                for b in batches),
                                            sum(len(idx) for idx in indices_per_micro)], device)
        scale = world_size * len(batches)  # DeepSpeed averages over ranks and micro-batches; undo it
        step_metrics, nll_sum, grad_norm = [], 0.0, None
        for batch in batches:
            with torch.set_grad_enabled(train):
                loss, metrics, nll = orpo_step_metrics(engine, batch, n_tokens, n_pairs, cfg)
            if train:
                engine.backward(loss * scale)
                grad_norm = engine_step(engine, model)
            step_metrics.append(metrics)
            nll_sum += nll
        out = mean_metrics(step_metrics, device=device)
        out["nll"] = all_reduce_sum([nll_sum], device)[0] / max(n_tokens, 1)  # exact global token mean
        out["loss"] = out["nll"] + cfg.orpo_lambda * out["or_loss"]
        if train:
            out["grad_norm"] = grad_norm
        return out

    def validate() -> dict:
        engine.eval()
        n = len(valid_pairs)
        per_step = cfg.micro_batch_size * world_size
        results = [run_pairs(valid_pairs, step_slices(n, s, cfg.micro_batch_size, 1, rank, world_size), False)
                   for s in range(max(1, n // per_step))]
        engine.train()
        total = sum(r["pairs"] for r in results)
        return {f"val_{k}": sum(r[k] * r["pairs"] for r in results) / total for k in results[0] if k != "pairs"}

    step, best_val_loss = 0, float("inf")
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir)) is not None:
        step, best_val_loss = state["step"], state["best_val_loss"]
        if rank == 0:
            print(f"resumed from step {step}")

    def checkpoint():
        save_checkpoint(engine, cfg.out_dir, step, {"step": step, "best_val_loss": best_val_loss,
                                                    "options": asdict(cfg)}, keep=cfg.keep_checkpoints)

    metrics_log = MetricsLog(cfg.out_dir, rank)
    preemption = Preemption()
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="orpo", dynamic_ncols=True)
    t_start, start_step, order_epoch, order = time.time(), step, None, None
    if valid_pairs and step == 0:  # where alignment starts from
        record = {"step": 0, **validate()}
        metrics_log.write(record)
        if rank == 0:
            tqdm.write(f"step {0:>6d}/{total_steps:<6d} | val_loss {record['val_loss']:.4f} | "
                       f"val_reward_accuracy {record['val_reward_accuracy']:.3f}")
    while step < total_steps:
        t0 = time.time()
        epoch, step_in_epoch = divmod(step, epoch_steps)
        if order_epoch != epoch:  # one seeded shuffle per epoch
            order_epoch, order = epoch, epoch_order(len(train_pairs), epoch, cfg.seed)
        lr = lr_at(step, cfg, max_steps=total_steps)
        set_lr(optimizer, lr)
        indices = [[order[i] for i in idx] for idx in step_slices(len(train_pairs), step_in_epoch,
                                                                    cfg.micro_batch_size, cfg.grad_accum,
                                                                    rank, world_size)]
        record = run_pairs(train_pairs, indices, train=True)
        step += 1
        dt = time.time() - t0
        tokens = all_reduce_sum([sum(2 * len(idx) for idx in indices) * cfg.seq_len], device)[0]  # upper bound
        peak = peak_flops(device, cfg.peak_tflops) * world_size
        mfu = flops_per_token(model.config, cfg.seq_len) * tokens / dt / peak
        record = {"step": step, "epoch": epoch + 1, "lr": lr, **record,
                  "mfu": mfu,
                  "peak_memory_gb": peak_memory_gb(device)}
        if valid_pairs and (step % cfg.eval_interval == 0 or step == total_steps):
            record.update(validate())
            if record["val_loss"] < best_val_loss:
                best_val_loss, record["best"] = record["val_loss"], True
                export_model(engine, model, Path(cfg.out_dir) / "model", tokenizer, chat_template)
        metrics_log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['reward_accuracy']:.2f}")
        if rank == 0 and (step % cfg.log_interval == 0 or "val_loss" in record):
            eta = (time.time() - t_start) / (step - start_step) * (total_steps - step)
            line = log_line(step, total_steps, record["loss"], lr, tokens / dt, mfu, eta)
            line += f" | reward_acc {record['reward_accuracy']:.3f} | margin {record['margin']:.3f}"
            if "val_loss" in record:
                line += (f" | val_loss {record['val_loss']:.4f} | val_reward_acc {record['val_reward_accuracy']:.3f}"
                         + (" (best)" if record.get("best") else ""))
            tqdm.write(line)
        if step % cfg.save_interval == 0 or step == total_steps:
            checkpoint()
        if preemption.requested(device):
            checkpoint()
            if rank == 0:
                tqdm.write(f"SIGTERM: saved step {step} to {cfg.out_dir}/checkpoints; exiting")
            break
    bar.close()
    metrics_log.close()
    if step == total_steps:
        if not valid_pairs:
            export_model(engine, model, Path(cfg.out_dir) / "model", tokenizer, chat_template)
        if rank == 0:
            print(f"exported {Path(cfg.out_dir) / 'model'} (Hugging Face layout)"
                  + (f" (best val_loss {best_val_loss:.4f})" if valid_pairs else ""))
    teardown_distributed()


if __name__ == "__main__":
    run_cli(main)
