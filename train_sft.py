"""Stage 2: supervised instruction tuning with the loss on the responses only.

LLAMMAS: Alpaca + Alpaca-est + English high-quality instructions + translation-task instructions, 3 epochs,
lr 2e-5 -> 2e-6, batch 128, loss on responses only, best checkpoint by validation loss, optionally
sequential (translation tasks first, then general instructions). PLLuM: 3 epochs, lr 1e-5, batch 128,
ZeRO-3. Records are Alpaca {"instruction","input","output"} or chat {"messages": [...]} JSONL, rendered by
minillm/chat_format.py -- the same code that builds prompts at inference -- in the layout --template names
(auto: the one whose markers the tokenizer has: Tulu for minillm's tokenizers, Llama-3's, ChatML for Qwen2).

CPU, one process (the demo's stage):
    python train_sft.py --init-from runs/demo/pretrain/model --train-data data/sample/sft/alpaca_et.jsonl
One GPU:
    python train_sft.py --init-from runs/pt/model --train-data alpaca_et.jsonl,alpaca_en.jsonl,hqi.jsonl \\
        --valid-data valid.jsonl --seq-len 2048 --micro-batch-size 8 --grad-accum 16 --lr 2e-5 --min-lr 2e-6
8 GPUs, sequential curriculum (stages separated by ';', each with its own LR schedule):
    torchrun --nproc_per_node=8 train_sft.py --init-from runs/pt/model \\
        --train-data "trtask.jsonl;alpaca_et.jsonl,alpaca_en.jsonl" --micro-batch-size 4 --grad-accum 4 --zero-stage 3
2 nodes x 8 GPUs: the same command on each node, --out-dir on a filesystem both share, the data at the same path:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB train_sft.py ...
Resume (same --out-dir): add --resume; on another number of ranks keep micro_batch_size x grad_accum x ranks (the
rows of every step depend only on that product); README "Resuming on a different number of GPUs", "Multi-node".
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

from minillm.chat_format import chat_template_jinja, end_ids, resolve_template
from minillm.checkpoints import ExportPolicy, load_checkpoint, save_checkpoint_if_due
from minillm.engine import (all_reduce_sum, batch_to, build_engine, exit_distributed, load_model_and_tokenizer, lr_at,
                            model_inputs, optimizer_step, print0, set_lr, setup_distributed)
from minillm.files import fingerprints
from minillm.losses import IGNORE_INDEX, global_mean_scale
from minillm.monitor import RunLog, StallWatch, peak_flops, peak_memory_gb, step_flops, validation_loss
from minillm.options import cli, parse_options, require_option
from minillm.run_dir import Preemption, TrainOptions, check_same_data, lock_run, run_readme, start_run
from minillm.sft_data import SFTPlan, load_sft_examples, sft_validation_batches


@dataclass(kw_only=True)
class SFTOptions(TrainOptions):
    # data: JSONL files, ',' between the files of one stage, ';' between sequential stages
    train_data: str = "runs/demo/sft/train.jsonl"  # SFT records (Alpaca or chat); ';' separates curriculum stages
    allow_data_change: bool = False  # resume although the training or validation files differ from the checkpoint's (recorded in the checkpoints); without it that is refused
    valid_data: str = "runs/demo/sft/valid.jsonl"  # held-out records; '' = no validation (the last model is exported)
    template: Literal["auto", "tulu", "llama3", "chatml", "mistral", "alpaca"] = "auto"  # how records are rendered and exported as chat_template: a chat layout, the Alpaca prompt, or auto = the chat layout whose markers the tokenizer has
    train_on: Literal["assistant", "last", "all"] = "assistant"  # the loss covers every reply, the last one, or all tokens
    truncate: Literal["right", "left", "drop"] = "right"  # too-long examples: cut the end, cut the start, or drop them
    pack: bool = True  # several examples per row, document-masked (no example sees another)
    epochs: int = 3  # passes over each stage's data (each stage: warmup, then decay to min_lr)
    # model: a Hugging Face directory (the pretraining stage's OUT_DIR/model)
    init_from: str = "runs/demo/pretrain/model"
    eval_interval: int = 0
    initial_can_be_best: bool = True  # the step-0 validation takes part in choosing the exported model: when no step beats it, the initial weights are exported (false: the best trained step, with a note)
    out_dir: str = "runs/demo/sft"

    def check(self):
        super().check()
        require_option(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require_option(self.seq_len >= 2, "seq_len", self.seq_len, "must hold a prompt and a reply token")
        require_option(bool(self.train_data.replace(";", "").replace(",", "").strip()), "train_data", self.train_data,
                       "names no file")


@cli
def main(argv=None):
    cfg = parse_options(SFTOptions, argv, prog="train_sft.py", description=__doc__)
    rank, world_size, device = setup_distributed(cfg.seed)
    lock_run(cfg.out_dir, rank, device)  # one run at a time in a run directory

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    template = resolve_template(cfg.template, tokenizer)
    print0(f"template: {template}")
    model.config.eos_ids = end_ids(model.config.eos_ids or [model.config.eos_id], tokenizer, template)  # exported
    render = {"truncate": cfg.truncate, "train_on": cfg.train_on, "template": template}
    stages = [load_sft_examples([f.strip() for f in files.split(",") if f.strip()], tokenizer, cfg.seq_len, print0, **render)
              for files in cfg.train_data.split(";") if files.strip()]
    # every (stage, epoch) shuffled and packed once; each optimizer step known by its number (SFTPlan)
    plan = SFTPlan(stages, cfg.epochs, cfg.seq_len, tokenizer.pad_id, cfg.pack, cfg.seed, cfg.micro_batch_size,
                   cfg.grad_accum, rank, world_size)
    total_steps = len(plan.steps)
    valid = {"": sft_validation_batches(load_sft_examples(cfg.valid_data.split(","), tokenizer, cfg.seq_len, print0,
                                                          **render), cfg.seq_len, tokenizer.pad_id, cfg.pack,
                                        cfg.micro_batch_size, rank, world_size)} if cfg.valid_data else {}
    data = fingerprints(f.strip() for f in f"{cfg.train_data},{cfg.valid_data}".replace(";", ",").split(",") if f.strip())
    byte_lengths = tokenizer.byte_lengths()
    engine, optimizer = build_engine(model, cfg, device)
    chat_template = chat_template_jinja(template, tokenizer)

    step, state = 0, {}
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir, model.config.architecture()) or {}):
        step = state["step"]
        print0(f"resumed from step {step}")
    data_changes = check_same_data(state, data, cfg.allow_data_change)
    if step >= total_steps:  # a resume with nothing left to do: say so, touch no file
        print0(f"nothing to do: the checkpoint is at step {step} >= the run's {total_steps} steps")
        return exit_distributed()
    start_run(cfg, rank, step, run_readme("train_sft.py", cfg, "instruction tuning (SFT)"))
    # LLAMMAS keeps the model with the best validation loss; without validation, the last one
    result = ExportPolicy(engine, model, tokenizer, cfg, chat_template, by_validation=bool(valid), best=state.get("best"))

    def trainer_state() -> dict:  # what a checkpoint needs besides DeepSpeed's own state
        return {"step": step, "best": result.best, "options": asdict(cfg), "model_config": model.config.architecture(),
                "data": data, "data_changes": data_changes}

    log = RunLog(cfg.out_dir, rank, total_steps, step, cfg.log_interval, "sft", log_to=cfg.log_to,
                 stall_watch=StallWatch(model.config.vocab_size, cfg.warmup_steps))  # warns of a collapsed run
    if valid and step == 0:  # where instruction tuning starts from
        log.start(result.start({"step": 0, **validation_loss(engine, valid, byte_lengths, device)}))
    peak, preemption = peak_flops(device, cfg.peak_tflops) * world_size, Preemption()
    while step < total_steps and not preemption.stop:
        t0 = time.time()
        stage, epoch = plan.steps[step].stage, plan.steps[step].epoch
        lr = lr_at(plan.steps[step].stage_step, cfg, plan.steps[step].stage_steps)
        set_lr(optimizer, lr)
        # The loss is the mean NLL over every response token of the global batch (not a mean of per-example
        # means), so the step's token count is summed over ranks before the first backward.
        micro_batches = [batch_to(b, device) for b in plan.micro_batches(step)]
        n_tokens = all_reduce_sum([sum((b["labels"] != IGNORE_INDEX).sum().item() for b in micro_batches)], device)[0]
        nll_sum = 0.0
        for batch in micro_batches:
            nll = engine(**model_inputs(batch))  # forward: the summed NLL of this micro-batch's responses
            engine.backward(nll * global_mean_scale(n_tokens, world_size, cfg.grad_accum))  # backward: its share
            grad_norm = optimizer_step(engine, model)  # the update happens after the step's last micro-batch
            nll_sum += nll.item()
        loss = all_reduce_sum([nll_sum], device)[0] / max(n_tokens, 1)
        step += 1
        dt = time.time() - t0

        tokens, flops = all_reduce_sum([sum(b["input_ids"].numel() for b in micro_batches),
                                        step_flops(model.config, micro_batches)], device)
        record = {"step": step, "stage": stage + 1, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "response_tokens": n_tokens, "tokens_per_s": tokens / dt, "mfu": flops / dt / peak,
                  "peak_memory_gb": peak_memory_gb(device)}
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: the loss is {loss} (gradient norm {grad_norm}); stopped without saving "
                             "or exporting, the last checkpoint is the last finite state (lower --lr?)")
        last = step == total_steps
        end_of_epoch = last or plan.steps[step][:2] != (stage, epoch)
        if valid and (end_of_epoch if not cfg.eval_interval else last or step % cfg.eval_interval == 0):
            record.update(validation_loss(engine, valid, byte_lengths, device))
        result.update(record, last)
        log.step(record, extra=("val_loss",))
        save_checkpoint_if_due(engine, cfg, step, total_steps, trainer_state, preemption)  # every N steps, the last, SIGTERM
    log.close(result.summary() if step == total_steps else f"{preemption.signal}: saved step {step} to {cfg.out_dir}/checkpoints")
    exit_distributed()


if __name__ == "__main__":
    main()
