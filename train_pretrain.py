"""Stage 1: continual pretraining of a Llama on target-language text mixed with some English.

LLAMMAS continued Llama-2-7B on 5B tokens, 75% Estonian / 25% English, context 1024, bf16, lr 2e-5 -> 2e-6
linearly, 256 sequences per step; PLLuM ends its pretraining with an annealing (warmup-stable-decay)
phase. Data: token shards written by `python -m minillm.prepare`.

CPU, one process (the demo's stage; a process group of one is created for DeepSpeed):
    python train_pretrain.py --tokenizer runs/demo/tokenizer --data et=runs/demo/tokens/et_train,en=runs/demo/tokens/en_train
One GPU:
    python train_pretrain.py --init-from llama-2-7b-hf --data et=tok/et,en=tok/en --mixture et=0.75,en=0.25 \\
        --seq-len 1024 --micro-batch-size 8 --grad-accum 32 --lr 2e-5 --min-lr 2e-6 --zero-stage 2
8 GPUs (global batch = micro_batch_size x grad_accum x 8 sequences):
    torchrun --nproc_per_node=8 train_pretrain.py --init-from llama-2-7b-hf ... --grad-accum 4 --zero-stage 3
2 nodes x 8 GPUs: the same command on each node; --out-dir on a filesystem both share, the token shards at the same
path on both (read-only), the global batch micro_batch_size x grad_accum x 16 (SLURM: `srun torchrun ...`, README
"Multi-node"):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB \\
        train_pretrain.py --init-from llama-2-7b-hf ... --grad-accum 2 --zero-stage 3 --out-dir /shared/runs/pt
Resume after an interruption or preemption (same --out-dir): add --resume. On another number of ranks, change
--grad-accum so the global batch stays the same (16 -> 8 GPUs: --grad-accum 2 -> 4); the ZeRO shards are converted
once to DeepSpeed's universal format (README "Resuming on a different number of GPUs").
After extending the vocabulary (python -m minillm.vocab extend), train the embedding and head first, everything else
frozen (--trainable embeddings --lr 1e-4, a few hundred steps), then --init-from that run's model with all weights
trainable, the embeddings optionally faster (--embedding-lr 5e-5 beside --lr 2e-5).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Literal

from minillm.checkpoints import ExportPolicy, load_checkpoint, save_checkpoint_if_due
from minillm.engine import (all_reduce_sum, batch_to, build_engine, exit_distributed, load_model_and_tokenizer, lr_at,
                            model_inputs, optimizer_groups, optimizer_step, print0, set_lr, setup_distributed)
from minillm.losses import IGNORE_INDEX, global_mean_scale
from minillm.monitor import RunLog, StallWatch, peak_flops, peak_memory_gb, step_flops, validation_loss
from minillm.options import cli, parse_options, require_option
from minillm.pretrain_data import PackedLoader, parse_mixture, parse_sources, validation_batches
from minillm.run_dir import Preemption, TrainOptions, lock_run, run_readme, start_run


@dataclass(kw_only=True)
class PretrainOptions(TrainOptions):
    # data
    data: str = "et=runs/demo/tokens/et_train,en=runs/demo/tokens/en_train"  # token shard directories by source name
    mixture: str = "et=0.75,en=0.25"  # token share of each source (LLAMMAS: 75% target language, 25% English)
    valid_data: str = "et=runs/demo/tokens/et_valid,en=runs/demo/tokens/en_valid"  # held-out shards by name; '' = no validation
    eval_tokens: int = 0  # held-out target tokens scored per source at each validation; 0 = all of them
    packing: Literal["document", "concat"] = "document"  # document: attention and loss never cross documents; concat: LLAMMAS
    max_steps: int = 200  # optimizer steps of the run
    # model: continue a Hugging Face directory, or a random `preset` sized to the tokenizer
    preset: str = "demo"  # model size built at random when --init-from is '' (see minillm/model.py PRESETS)
    tokenizer: str = "runs/demo/tokenizer"  # tokenizer directory; '' = init_from's own
    seq_len: int = 256
    trainable: Literal["all", "embeddings"] = "all"  # embeddings: train only the input embedding and the output head, every other weight frozen (first, after extending the vocabulary)
    # optimisation: the demo's tiny model from scratch; continuing a 7B model wants lr 2e-5 (LLAMMAS)
    lr: float = 3e-3
    min_lr: float = 3e-4
    embedding_lr: float = 0.0  # peak learning rate of the embedding and output head, on the same schedule (its end is min_lr x embedding_lr / lr); 0 = --lr
    warmup_steps: int = 20
    weight_decay: float = 0.1
    save_interval: int = 100
    out_dir: str = "runs/demo/pretrain"

    def check(self):
        super().check()
        require_option(self.max_steps >= 1, "max_steps", self.max_steps, "must be at least 1")
        require_option(self.eval_tokens >= 0, "eval_tokens", self.eval_tokens, "must be >= 0 (0 = all)")
        require_option(self.embedding_lr >= 0, "embedding_lr", self.embedding_lr, "must be >= 0 (0 = --lr)")
        require_option(self.trainable == "all" or self.init_from, "trainable", self.trainable,
                       "needs --init-from: training only the embeddings of a random model teaches nothing (it is the first "
                       "stage after extending a trained model's vocabulary)")


@cli
def main(argv=None):
    cfg = parse_options(PretrainOptions, argv, prog="train_pretrain.py", description=__doc__)
    rank, world_size, device = setup_distributed(cfg.seed)
    lock_run(cfg.out_dir, rank, device)  # one run at a time in a run directory

    model, tokenizer = load_model_and_tokenizer(cfg, device, preset=cfg.preset)
    sources = parse_sources(cfg.data)
    loader = PackedLoader(sources, parse_mixture(cfg.mixture, list(sources), warn=print0), seq_len=cfg.seq_len,
                          batch_size=cfg.micro_batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                          mode=cfg.packing, vocab_size=model.config.vocab_size, pad_id=tokenizer.pad_id)
    valid = {name: validation_batches(path, cfg.seq_len, cfg.micro_batch_size, rank, world_size, cfg.eval_tokens,
                                      pad_id=tokenizer.pad_id)
             for name, path in (parse_sources(cfg.valid_data).items() if cfg.valid_data else [])}
    byte_lengths = tokenizer.byte_lengths()
    # --trainable embeddings freezes all but the embedding and head; --embedding-lr scales their rate (set_lr).
    embedding_lr_scale = cfg.embedding_lr / cfg.lr if cfg.embedding_lr else 1.0
    engine, optimizer = build_engine(model, cfg, device,
                                     optimizer_groups(model, cfg.weight_decay, cfg.trainable, embedding_lr_scale))

    step, state = 0, {}
    if cfg.resume and (state := load_checkpoint(engine, cfg.out_dir, model.config.architecture(), cfg.trainable) or {}):
        step = state["step"]
        loader.load_state_dict(state["loader"])
        print0(f"resumed from step {step} ({state['tokens_seen']:,} tokens seen)")
    tokens_seen = state.get("tokens_seen", 0)
    if step >= cfg.max_steps:  # a resume with nothing left to do: say so, touch no file
        print0(f"nothing to do: the checkpoint is at step {step} >= --max-steps {cfg.max_steps}")
        return exit_distributed()
    start_run(cfg, rank, step, run_readme("train_pretrain.py", cfg, "continual pretraining"))
    result = ExportPolicy(engine, model, tokenizer, cfg, by_validation=False)  # the model after the last step

    def trainer_state() -> dict:  # what a checkpoint needs besides DeepSpeed's own state
        return {"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(), "options": asdict(cfg),
                "model_config": model.config.architecture()}

    log = RunLog(cfg.out_dir, rank, cfg.max_steps, step, cfg.log_interval, "pretrain", log_to=cfg.log_to,
                 stall_watch=StallWatch(model.config.vocab_size, cfg.warmup_steps))  # warns of a collapsed run
    if valid and step == 0:  # where pretraining starts from
        log.start({"step": 0, **validation_loss(engine, valid, byte_lengths, device)})
    peak, preemption = peak_flops(device, cfg.peak_tflops) * world_size, Preemption()
    while step < cfg.max_steps and not preemption.stop:
        t0 = time.time()
        lr = lr_at(step, cfg, cfg.max_steps)
        set_lr(optimizer, lr)
        # The loss is the mean NLL over every target token of the global batch (every micro-batch on every
        # rank), so the step's token count is summed over ranks before the first backward.
        micro_batches = [batch_to(loader.next_batch(), device) for _ in range(cfg.grad_accum)]
        n_tokens = all_reduce_sum([sum((b["labels"] != IGNORE_INDEX).sum().item() for b in micro_batches)], device)[0]
        nll_sum = 0.0
        for batch in micro_batches:
            nll = engine(**model_inputs(batch))  # forward: the summed NLL of this micro-batch
            engine.backward(nll * global_mean_scale(n_tokens, world_size, cfg.grad_accum))  # backward: its share
            grad_norm = optimizer_step(engine, model)  # the update happens after the step's last micro-batch
            nll_sum += nll.item()
        loss = all_reduce_sum([nll_sum], device)[0] / max(n_tokens, 1)
        step += 1
        tokens_seen += cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * world_size
        dt = time.time() - t0

        flops = all_reduce_sum([step_flops(model.config, micro_batches)], device)[0]
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": tokens_seen,
                  "tokens_per_s": cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * world_size / dt,
                  "mfu": flops / dt / peak, "peak_memory_gb": peak_memory_gb(device)}
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise ValueError(f"step {step}: the loss is {loss} (gradient norm {grad_norm}); stopped without saving "
                             "or exporting, the last checkpoint is the last finite state (lower --lr?)")
        last = step == cfg.max_steps
        if valid and (last or (cfg.eval_interval and step % cfg.eval_interval == 0)):
            record.update(validation_loss(engine, valid, byte_lengths, device))
        result.update(record, last)
        log.step(record, extra=tuple(k for k in record if k.startswith("val_loss")))
        save_checkpoint_if_due(engine, cfg, step, cfg.max_steps, trainer_state, preemption)  # every N steps, the last, SIGTERM
    log.close(result.summary() if step == cfg.max_steps else f"{preemption.signal}: saved step {step} to {cfg.out_dir}/checkpoints")
    exit_distributed()


if __name__ == "__main__":
    main()
