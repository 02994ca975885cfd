"""Stage 3: preference alignment with ORPO (odds-ratio preference optimisation, no reference model).

PLLuM aligns its instruction-tuned models with ORPO on ~40K preference pairs. Per pair the loss is
NLL(chosen) + lambda * L_OR (minillm/losses.py writes L_OR out): the model learns the chosen answer and, at
the same time, to give it higher odds than the rejected one. Records are JSONL {"prompt": str | [messages],
"chosen": str | message, "rejected": str | message}, rendered with SFT's chat layout (--template), so both
answers share the prompt's tokens exactly. Chosen and rejected go through ONE concatenated forward pass.

CPU, one process (the demo's stage):
    python train_orpo.py --init-from runs/demo/sft/model --train-data prefs.jsonl --valid-data prefs_valid.jsonl
One GPU:
    python train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --micro-batch-size 4 --grad-accum 16
8 GPUs:
    torchrun --nproc_per_node=8 train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --zero-stage 3
2 nodes x 8 GPUs: the same command on each node, --out-dir on a filesystem both share, the data at the same path:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB train_orpo.py ...
Resume (same --out-dir): add --resume; on another number of ranks keep micro_batch_size x grad_accum x ranks (the
rows of every step depend only on that product); README "Resuming on a different number of GPUs", "Multi-node".

Metrics (every step: over the step's pairs on all ranks; val_*: over every held-out pair, each once):
    loss             nll + lambda * or_loss, what is minimised
    nll              mean NLL per chosen token trained on (response + end-of-turn; + prompt with --nll-on-prompt)
    or_loss          mean L_OR = -log sigmoid(log_odds) over pairs
    log_odds         mean log(odds(chosen) / odds(rejected)), odds(y) = P / (1 - P), P = exp(mean token log-prob)
    chosen_logps / rejected_logps   mean over pairs of the response's mean token log-prob
    reward_accuracy  share of pairs whose chosen response has the higher mean log-prob
    margin           mean (chosen_logps - rejected_logps), nats per token
    chosen_length / rejected_length mean response tokens per pair
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from minillm.chat_format import chat_template_jinja, end_ids, resolve_template
from minillm.checkpoints import (ExportedModel, Preemption, check_same_data, load_checkpoint, lock_run,
                                 run_readme, save_checkpoint_if_due, start_run)
from minillm.engine import (all_reduce_sum, batch_to, build_engine, end_validation, engine_step, load_model_and_tokenizer, lr_at,
                            model_inputs, print0, set_lr, setup_distributed, teardown_distributed)
from minillm.files import fingerprints
from minillm.losses import IGNORE_INDEX, orpo_loss, orpo_means, pair_logprobs, split_pairs
from minillm.monitor import RunLog, StallWatch, peak_flops, peak_memory_gb, step_flops
from minillm.options import TrainOptions, cli, parse_options, require
from minillm.sft_data import epoch_order, load_preference_files, pair_batch, step_slices, steps_per_epoch


@dataclass(kw_only=True)
class ORPOOptions(TrainOptions):
    # data
    train_data: str = "data/sample/preferences/train.jsonl"  # preference JSONL files, comma-separated
    allow_data_change: bool = False  # resume although the training or validation files differ from the checkpoint's (recorded in the checkpoints); without it that is refused
    valid_data: str = "data/sample/preferences/valid.jsonl"  # held-out pairs; '' = no validation (the last model is exported)
    initial_can_be_best: bool = True  # the step-0 validation takes part in choosing the exported model: when no step beats it, the initial weights are exported (false: the best trained step, with a note)
    template: Literal["auto", "tulu", "llama3", "chatml", "alpaca"] = "auto"  # how pairs are rendered (SFT's template): a chat layout, the Alpaca prompt, or auto = the chat layout whose markers the tokenizer has
    # ORPO
    orpo_lambda: float = 0.1  # weight of L_OR (TRL's default; the ORPO paper used 0.05-0.25)
    nll_on_prompt: bool = False  # the NLL also scores the prompt (TRL's ORPOTrainer); default: response + end-of-turn only
    epochs: int = 1  # passes over the training pairs
    # model: a Hugging Face directory (the SFT stage's OUT_DIR/model); the ORPO paper: lr 8e-6 for 7B models
    init_from: str = "runs/demo/sft/model"
    micro_batch_size: int = 4  # pairs per rank per forward (2x rows: chosen + rejected)
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 5
    out_dir: str = "runs/demo/orpo"

    def check(self):
        super().check()
        require(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require(self.orpo_lambda >= 0 and math.isfinite(self.orpo_lambda), "orpo_lambda", self.orpo_lambda,
                "must be >= 0")
        require(bool(self.train_data.replace(",", "").strip()), "train_data", self.train_data, "names no file")


def pair_sums(engine, batch, n_tokens: float, n_pairs: float, cfg) -> tuple[torch.Tensor, dict]:
    """One micro-batch of pairs forward: the loss to backpropagate and the sums the metrics are made of."""
    token_logps = -engine(**model_inputs(batch), reduction="none")  # forward: per-token log-probs [2B, T]
    parts = pair_logprobs(token_logps, batch["labels"], batch["response_mask"])
    real = batch["pair_mask"]
    loss, sums = orpo_loss(parts["chosen_nll_sum"] / max(n_tokens, 1), parts["chosen_logps"],
                           parts["rejected_logps"], cfg.orpo_lambda, n_pairs=max(n_pairs, 1), pair_mask=real,
                           chosen_lengths=parts["chosen_lengths"], rejected_lengths=parts["rejected_lengths"])
    sums.update(nll_sum=parts["chosen_nll_sum"].item(), nll_tokens=float(parts["chosen_nll_tokens"]))
    return loss, sums


@cli
def main(argv=None):
    cfg = parse_options(ORPOOptions, argv, prog="train_orpo.py", description=__doc__)
    rank, world_size, device = setup_distributed(cfg.seed)
    lock_run(cfg.out_dir, rank, device)  # one run at a time in a run directory

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    template = resolve_template(cfg.template, tokenizer)
    print0(f"template: {template}")
    model.config.eos_ids = end_ids(model.config.eos_ids or [model.config.eos_id], tokenizer, template)  # exported
    train_pairs = load_preference_files(cfg.train_data.split(","), tokenizer, cfg.seq_len, print0, template)
    valid_pairs = (load_preference_files(cfg.valid_data.split(","), tokenizer, cfg.seq_len, print0, template)
                   if cfg.valid_data else [])
    data = fingerprints(f.strip() for f in f"{cfg.train_data},{cfg.valid_data}".replace(";", ",").split(",") if f.strip())
    pairs_per_step = cfg.micro_batch_size * cfg.grad_accum * world_size
    if len(train_pairs) < pairs_per_step:
        raise ValueError(f"{cfg.train_data}: {len(train_pairs)} usable pairs, fewer than one global batch "
                         f"({pairs_per_step} = micro_batch_size x grad_accum x ranks)")
    # Whole global batches only: the incomplete last one of an epoch is skipped (its pairs come back in the
    # next epoch's order), so every training step weighs the same number of pairs.
    epoch_steps = len(train_pairs) // pairs_per_step
    total_steps = cfg.epochs * epoch_steps
    engine, optimizer = build_engine(model, cfg, device)
    chat_template = chat_template_jinja(template, tokenizer)

    def batches(pairs, indices_per_micro) -> tuple[list[dict], float, float]:
        """The micro-batches of a step (or a validation slice) and the step's global chosen-token and pair counts."""
        out = [batch_to(pair_batch(pairs, idx, cfg.nll_on_prompt, tokenizer.pad_id), device) for idx in indices_per_micro]
        n_tokens, n_pairs = all_reduce_sum([sum((split_pairs(b["labels"])[0] != IGNORE_INDEX).sum().item() for b in out),
                                            sum(b["pair_mask"].sum().item() for b in out)], device)
        return out, n_tokens, n_pairs

    @torch.no_grad()
    def validate() -> dict:
        """Every held-out pair scored once on any number of ranks and micro-batch size; exact means."""
        engine.eval()
        totals: dict[str, float] = {}
        for s in range(steps_per_epoch(len(valid_pairs), cfg.micro_batch_size, 1, world_size)):
            micro, n_tokens, n_pairs = batches(valid_pairs, step_slices(len(valid_pairs), s, cfg.micro_batch_size, 1,
                                                                        rank, world_size))
            for sums in (pair_sums(engine, b, n_tokens, n_pairs, cfg)[1] for b in micro):
                totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        end_validation(engine)
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), device)))
        return {f"val_{k}": v for k, v in orpo_means(totals, cfg.orpo_lambda).items()}

    step, state = 0, {}
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir, model.config.architecture()) or {}):
        step = state["step"]
        print0(f"resumed from step {step}")
    data_changes = check_same_data(state, data, cfg.allow_data_change)
    if step >= total_steps:  # a resume with nothing left to do: say so, touch no file
        print0(f"nothing to do: the checkpoint is at step {step} >= the run's {total_steps} steps")
        return teardown_distributed()
    start_run(cfg, rank, step, run_readme("train_orpo.py", cfg, "preference alignment (ORPO)"))
    # the model with the best validation loss; without validation, the last one
    result = ExportedModel(engine, model, tokenizer, cfg, chat_template, by_validation=bool(valid_pairs),
                           best=state.get("best"))

    def trainer_state() -> dict:  # what a checkpoint needs besides DeepSpeed's own state
        return {"step": step, "best": result.best, "options": asdict(cfg), "model_config": model.config.architecture(),
                "data": data, "data_changes": data_changes}

    log = RunLog(cfg.out_dir, rank, total_steps, step, cfg.log_interval, "orpo", log_to=cfg.log_to,
                 stall_watch=StallWatch(model.config.vocab_size, cfg.warmup_steps))  # warns of a collapsed run
    if valid_pairs and step == 0:  # where alignment starts from
        log.start(result.start({"step": 0, **validate()}))
    peak, preemption, order_epoch, order = peak_flops(device, cfg.peak_tflops) * world_size, Preemption(), None, None
    while step < total_steps and not preemption.stop:
        t0 = time.time()
        epoch, step_in_epoch = divmod(step, epoch_steps)
        if order_epoch != epoch:  # one seeded shuffle per epoch
            order_epoch, order = epoch, epoch_order(len(train_pairs), epoch, cfg.seed)
        lr = lr_at(step, cfg, total_steps)
        set_lr(optimizer, lr)
        # NLL: a mean over every chosen token of the global batch; L_OR: a mean over its pairs. Both counts
        # are summed over ranks before the first backward.
        slices = step_slices(len(train_pairs), step_in_epoch, cfg.micro_batch_size, cfg.grad_accum, rank, world_size)
        micro_batches, n_tokens, n_pairs = batches(train_pairs, [[order[i] for i in idx] for idx in slices])
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, sums = pair_sums(engine, batch, n_tokens, n_pairs, cfg)  # forward
            engine.backward(loss * world_size * cfg.grad_accum)  # backward (DeepSpeed averages; this undoes it)
            grad_norm = engine_step(engine, model)  # the update happens after the step's last micro-batch
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), device)))
        step += 1
        dt = time.time() - t0

        tokens, flops = all_reduce_sum([sum(b["input_ids"].numel() for b in micro_batches),
                                        step_flops(model.config, micro_batches)], device)
        record = {"step": step, "epoch": epoch + 1, "lr": lr, **orpo_means(totals, cfg.orpo_lambda),
                  "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "mfu": flops / dt / peak,
                  "peak_memory_gb": peak_memory_gb(device)}
        if not math.isfinite(record["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: the loss is {record['loss']} (gradient norm {grad_norm}); stopped without "
                             "saving or exporting, the last checkpoint is the last finite state (lower --lr?)")
        last = step == total_steps
        if valid_pairs and (last or (cfg.eval_interval and step % cfg.eval_interval == 0)):
            record.update(validate())
        result.update(record, last)
        log.step(record, extra=("reward_accuracy", "margin", "val_loss", "val_reward_accuracy"))
        save_checkpoint_if_due(engine, cfg, step, total_steps, trainer_state, preemption)  # every N steps, the last, SIGTERM
    log.close(result.summary() if step == total_steps else f"{preemption.signal}: saved step {step} to {cfg.out_dir}/checkpoints")
    teardown_distributed()


if __name__ == "__main__":
    main()
