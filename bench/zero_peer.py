"""The plain-DeepSpeed peer of train_pretrain.py for bench/bench_zero_memory.py: the memory floor.

The same model shape (read from a Hugging Face config.json) and the same DeepSpeed config (the JSON
minillm generates, written by the harness), with none of minillm's training code: random weights
(no checkpoint is read), built under deepspeed.zero.Init for ZeRO-3 so no rank ever holds the whole
model, fused AdamW, --steps optimizer steps on random token ids, no validation, no checkpoint, no
export. Only the model class comes from minillm (minillm.model.Llama).

    python bench/zero_peer.py --model MODEL_DIR --ds-config ds.json --steps 2             # one process
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/zero_peer.py --model MODEL_DIR --ds-config ds.json --seq-len 128 --steps 2  # two ranks

Prints one line at the end (rank 0): the stage, ranks, parameters, last loss and seconds.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillm.model import Llama, LlamaConfig  # noqa: E402
from minillm.options import parse_options  # noqa: E402


@dataclass(kw_only=True)
class PeerOptions:
    """The plain-DeepSpeed peer of train_pretrain.py (bench/bench_zero_memory.py runs it)."""
    model: str  # Hugging Face model directory (only its config.json is read)
    ds_config: str  # DeepSpeed config JSON (the harness writes minillm's)
    seq_len: int = 128  # tokens per row
    steps: int = 2  # optimizer steps
    seed: int = 0
    ds_shm_op: bool = False  # let DeepSpeed JIT-compile its CPU shared-memory all-reduce (minillm does not: both then all-reduce through gloo, and no start can leave the torch_extensions build lock held)


def join_process_group(use_shm_op: bool):
    """torchrun's group, or a group of one on a free port for a plain `python zero_peer.py`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if "RANK" not in os.environ:  # without these DeepSpeed goes looking for MPI
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not torch.cuda.is_available() and not use_shm_op:
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return deepspeed


def model_config(model_dir) -> LlamaConfig:
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    return LlamaConfig(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                       n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def main(argv=None):
    args = parse_options(PeerOptions, argv, prog="zero_peer.py", description=__doc__)
    deepspeed = join_process_group(args.ds_shm_op)
    ds_config = json.loads(Path(args.ds_config).read_text())
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    grad_accum = ds_config.get("gradient_accumulation_steps", 1)
    torch.manual_seed(args.seed + dist.get_rank())
    t0 = time.perf_counter()

    config = model_config(args.model)
    if stage == 3:  # each parameter is partitioned as its module is built: no rank holds the whole model
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = Llama(config)
    else:
        model = Llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    loss, n_scored = torch.zeros(()), 1
    for _ in range(args.steps):
        for _ in range(grad_accum):
            ids = torch.randint(0, config.vocab_size, (micro_batch, args.seq_len), device=engine.device)
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # already shifted
            loss = engine(input_ids=ids, labels=labels)  # summed NLL over the scored tokens
            n_scored = int((labels != -100).sum())
            engine.backward(loss / n_scored)
            engine.step()

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3: the full size
    if dist.get_rank() == 0:
        print(f"zero_peer: stage {stage}, {dist.get_world_size()} rank(s), {n_params:,} parameters, "
              f"last loss {float(loss.detach()) / n_scored:.3f}/token, {time.perf_counter() - t0:.1f} s", flush=True)
    dist.barrier()  # leaving the group to interpreter exit aborts under ZeRO-3 + gloo
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
