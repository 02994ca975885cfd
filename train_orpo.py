"""Stage 3: preference alignment, by default with ORPO (odds-ratio preference optimisation, no reference model).

PLLuM aligns its instruction-tuned models with ORPO on ~40K preference pairs. Per pair the loss is
NLL(chosen) + lambda * L_OR (minillm/losses.py writes L_OR out): the model learns the chosen answer and, at
the same time, to give it higher odds than the rejected one. Records are JSONL {"prompt": str | [messages],
"chosen": str | message, "rejected": str | message}, rendered with SFT's chat layout (--template), so both
answers share the prompt's tokens exactly. Chosen and rejected go through ONE concatenated forward pass.

--objective picks the loss (PLLuM's next check compares them on identical data); the loop is the same:
    orpo  NLL(chosen) + lambda * odds-ratio loss; no reference model (Hong et al. 2024). The default.
    dpo   -log sigmoid(beta * (log-ratio(chosen) - log-ratio(rejected))), log-ratio = log pi - log pi_ref of
          the response (Rafailov et al. 2023); --label-smoothing > 0 is cDPO.
    ipo   (per-token log-ratio gap - 1 / (2 beta))^2: DPO that stops at a finite margin (Azar et al. 2023).
    kto   unpaired examples, each desirable or undesirable: 1 - sigmoid(beta * (log-ratio - z0)) (or of
          z0 - log-ratio), z0 a batch estimate of KL(pi || pi_ref) (Ethayarajh et al. 2024). Reads the pairs
          above (chosen: desirable, rejected: undesirable) and records {"prompt" | "messages", "completion",
          "label": true | false}.
pi_ref is the initial model: its log-probs of every example are computed once before the first step and kept
in OUT_DIR/reference_logps.safetensors (minillm/preference.py), so training holds one model, as ORPO.

CPU, one process (the demo's stage):
    python train_orpo.py --init-from runs/demo/sft/model --train-data prefs.jsonl --valid-data prefs_valid.jsonl
    python train_orpo.py --objective dpo --beta 0.1 ...
One GPU:
    python train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --micro-batch-size 4 --grad-accum 16
8 GPUs:
    torchrun --nproc_per_node=8 train_orpo.py --init-from runs/sft/model --train-data prefs.jsonl --zero-stage 3
2 nodes x 8 GPUs: the same command on each node, --out-dir on a filesystem both share, the data at the same path:
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB train_orpo.py ...
Resume (same --out-dir): add --resume; on another number of ranks keep micro_batch_size x grad_accum x ranks (the
rows of every step depend only on that product); README "Resuming on a different number of GPUs", "Multi-node".

Metrics (every step: over the step's pairs on all ranks; val_*: over every held-out pair, each once):
  orpo:
    loss             nll + lambda * or_loss, what is minimised
    nll              mean NLL per chosen token trained on (response + end-of-turn; + prompt with --nll-on-prompt)
    or_loss          mean L_OR = -log sigmoid(log_odds) over pairs
    log_odds         mean log(odds(chosen) / odds(rejected)), odds(y) = P / (1 - P), P = exp(mean token log-prob)
    chosen_logps / rejected_logps   mean over pairs of the response's mean token log-prob
    reward_accuracy  share of pairs whose chosen response has the higher mean log-prob
    margin           mean (chosen_logps - rejected_logps), nats per token
    chosen_length / rejected_length mean response tokens per pair
  dpo, ipo, kto (TRL's names; KTO's per-side means are over its desirable / undesirable examples):
    loss             the objective's mean loss per pair (KTO: per example)
    rewards/chosen, rewards/rejected   mean beta * log-ratio of the chosen / rejected responses
    rewards/margins  rewards/chosen - rewards/rejected;  rewards/accuracies (dpo, ipo): share with chosen > rejected
    logps/chosen, logps/rejected       mean summed log-prob of the responses
    kl               (kto) the reference point z0 of the step
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

from minillm.chat_format import chat_template_jinja, end_ids, resolve_template
from minillm.checkpoints import ExportPolicy, load_checkpoint, save_checkpoint_if_due
from minillm.engine import (all_reduce_sum, build_engine, exit_distributed, load_model_and_tokenizer, lr_at,
                            optimizer_step, print0, set_lr, setup_distributed)
from minillm.files import fingerprints
from minillm.losses import global_mean_scale
from minillm.monitor import RunLog, StallWatch, peak_flops, peak_memory_gb, step_flops
from minillm.options import cli, parse_options, require_option
from minillm.preference import LOGGED, PreferenceObjective, load_kto_files, load_reference, save_reference
from minillm.run_dir import Preemption, TrainOptions, check_same_data, lock_run, run_readme, start_run
from minillm.sft_data import load_preference_files


@dataclass(kw_only=True)
class ORPOOptions(TrainOptions):
    # data
    train_data: str = "data/sample/preferences/train.jsonl"  # preference JSONL files, comma-separated
    allow_data_change: bool = False  # resume although the training or validation files differ from the checkpoint's (recorded in the checkpoints); without it that is refused
    valid_data: str = "data/sample/preferences/valid.jsonl"  # held-out pairs; '' = no validation (the last model is exported)
    initial_can_be_best: bool = True  # the step-0 validation takes part in choosing the exported model: when no step beats it, the initial weights are exported (false: the best trained step, with a note)
    template: Literal["auto", "tulu", "llama3", "chatml", "mistral", "alpaca"] = "auto"  # how pairs are rendered (SFT's template): a chat layout, the Alpaca prompt, or auto = the chat layout whose markers the tokenizer has
    objective: Literal["orpo", "dpo", "ipo", "kto"] = "orpo"  # the preference loss (the docstring above)
    # ORPO
    orpo_lambda: float = 0.1  # weight of L_OR (TRL's default; the ORPO paper used 0.05-0.25)
    nll_on_prompt: bool = False  # the NLL also scores the prompt (TRL's ORPOTrainer); default: response + end-of-turn only
    # DPO, IPO, KTO: the reference is the initial model
    beta: float = 0.1  # strength of the tie to the reference (TRL's default); IPO's target log-ratio gap is 1 / (2 beta)
    label_smoothing: float = 0.0  # DPO: probability that a pair's preference is wrong (cDPO); 0 = DPO
    desirable_weight: float = 1.0  # KTO: weight of the desirable examples' loss
    undesirable_weight: float = 1.0  # KTO: weight of the undesirable examples' loss
    epochs: int = 1  # passes over the training pairs
    max_steps: int = 0  # stop after this many optimizer steps (the LR schedule ends there); 0 = all the epochs' steps
    # model: a Hugging Face directory (the SFT stage's OUT_DIR/model); the ORPO paper: lr 8e-6 for 7B models
    init_from: str = "runs/demo/sft/model"
    micro_batch_size: int = 4  # pairs per rank per forward (2x rows: chosen + rejected)
    lr: float = 2e-4
    min_lr: float = 2e-5
    warmup_steps: int = 5
    out_dir: str = "runs/demo/orpo"

    def check(self):
        super().check()
        require_option(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require_option(self.max_steps >= 0, "max_steps", self.max_steps, "must be >= 0 (0 = all the epochs' steps)")
        require_option(self.orpo_lambda >= 0 and math.isfinite(self.orpo_lambda), "orpo_lambda", self.orpo_lambda,
                       "must be >= 0")
        require_option(bool(self.train_data.replace(",", "").strip()), "train_data", self.train_data, "names no file")
        require_option(self.beta > 0 and math.isfinite(self.beta), "beta", self.beta, "must be > 0")
        require_option(0 <= self.label_smoothing < 0.5, "label_smoothing", self.label_smoothing, "must be in [0, 0.5)")
        require_option(self.label_smoothing == 0 or self.objective == "dpo", "label_smoothing", self.label_smoothing,
                       "applies to --objective dpo only")
        for name in ("desirable_weight", "undesirable_weight"):
            require_option(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@cli
def main(argv=None):
    cfg = parse_options(ORPOOptions, argv, prog="train_orpo.py", description=__doc__)
    rank, world_size, device = setup_distributed(cfg.seed)
    lock_run(cfg.out_dir, rank, device)  # one run at a time in a run directory

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    template = resolve_template(cfg.template, tokenizer)
    print0(f"template: {template}")
    model.config.eos_ids = end_ids(model.config.eos_ids or [model.config.eos_id], tokenizer, template)  # exported
    load = load_kto_files if cfg.objective == "kto" else load_preference_files  # KTO: unpaired examples
    train_set = load(cfg.train_data.split(","), tokenizer, cfg.seq_len, print0, template)
    valid_set = load(cfg.valid_data.split(","), tokenizer, cfg.seq_len, print0, template) if cfg.valid_data else []
    # one seeded shuffle per epoch, whole global batches only; the micro-batches, the loss and the metrics of
    # --objective, with the reference log-probs once they exist (PreferenceObjective)
    objective = PreferenceObjective(cfg, {"train": train_set, "valid": valid_set}, tokenizer.pad_id, rank, world_size,
                                    device)
    total_steps = objective.total_steps
    data = fingerprints(f.strip() for f in f"{cfg.train_data},{cfg.valid_data}".replace(";", ",").split(",") if f.strip())
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
    start_run(cfg, rank, step, run_readme("train_orpo.py", cfg, f"preference alignment ({cfg.objective.upper()})"))
    if objective.sides and state:  # a resume: the model is no longer the reference; read what the run started with
        objective.reference = load_reference(cfg.out_dir, data, objective.reference_sizes())
    elif objective.sides:  # DPO, IPO, KTO, once before the first step: the initial model is the reference
        objective.reference = objective.reference_logprobs(engine)
        save_reference(cfg.out_dir, objective.reference, data, rank)
    # the model with the best validation loss; without validation, the last one
    result = ExportPolicy(engine, model, tokenizer, cfg, chat_template, by_validation=bool(valid_set), best=state.get("best"))

    def trainer_state() -> dict:  # what a checkpoint needs besides DeepSpeed's own state
        return {"step": step, "best": result.best, "options": asdict(cfg), "model_config": model.config.architecture(),
                "data": data, "data_changes": data_changes}

    log = RunLog(cfg.out_dir, rank, total_steps, step, cfg.log_interval, cfg.objective, log_to=cfg.log_to,
                 stall_watch=StallWatch(model.config.vocab_size, cfg.warmup_steps))  # warns of a collapsed run
    if valid_set and step == 0:  # where alignment starts from
        log.start(result.start({"step": 0, **objective.validate(engine)}))
    peak, preemption = peak_flops(device, cfg.peak_tflops) * world_size, Preemption()
    while step < total_steps and not preemption.stop:
        t0 = time.time()
        epoch, indices = objective.step_indices(step)  # this rank's pairs of each micro-batch
        lr = lr_at(step, cfg, total_steps)
        set_lr(optimizer, lr)
        # NLL: a mean over every chosen token of the global batch; L_OR (and DPO's, IPO's, KTO's loss): a mean over
        # its pairs (KTO: examples). Both counts, and KTO's reference point, are summed over ranks before the first backward.
        micro_batches, n_tokens, n_items = objective.batches("train", indices)
        kl = objective.reference_point(engine, "train", indices)  # KTO: z0 of the step, a forward without gradient
        totals: dict[str, float] = {}
        for batch in micro_batches:
            loss, sums = objective.loss_and_sums(engine, batch, n_tokens, n_items, kl)  # forward
            # backward: its share (the loss is already divided by the step's global counts, hence 1)
            engine.backward(loss * global_mean_scale(1, world_size, cfg.grad_accum))
            grad_norm = optimizer_step(engine, model)  # the update happens after the step's last micro-batch
            totals = {k: totals.get(k, 0.0) + v for k, v in sums.items()}
        totals = dict(zip(totals, all_reduce_sum(list(totals.values()), device)))
        step += 1
        dt = time.time() - t0

        tokens, flops = all_reduce_sum([sum(b["input_ids"].numel() for b in micro_batches),
                                        step_flops(model.config, micro_batches)], device)
        record = {"step": step, "epoch": epoch + 1, "lr": lr, **objective.means(totals, kl),
                  "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "mfu": flops / dt / peak,
                  "peak_memory_gb": peak_memory_gb(device)}
        if not math.isfinite(record["loss"]) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: the loss is {record['loss']} (gradient norm {grad_norm}); stopped without "
                             "saving or exporting, the last checkpoint is the last finite state (lower --lr?)")
        last = step == total_steps
        if valid_set and (last or (cfg.eval_interval and step % cfg.eval_interval == 0)):
            record.update(objective.validate(engine))
        result.update(record, last)
        log.step(record, extra=LOGGED[cfg.objective])
        save_checkpoint_if_due(engine, cfg, step, total_steps, trainer_state, preemption)  # every N steps, the last, SIGTERM
    log.close(result.summary() if step == total_steps else f"{preemption.signal}: saved step {step} to {cfg.out_dir}/checkpoints")
    exit_distributed()


if __name__ == "__main__":
    main()
