"""Run by tests/test_zero3_start_export.py under torchrun: start a model from a Hugging Face directory the way
the training scripts do (minillm.engine.load_model_and_tokenizer + build_engine), then write its logits on fixed
tokens, export it (minillm.checkpoints.export_model, and save_pretrained with small shards), and record how
much each rank's resident memory rose during the start and during each export.

    torchrun --nproc_per_node=2 tests/zero3_probe.py MODEL_DIR OUT_DIR ZERO_STAGE SHARD_SIZE
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from minillm.checkpoints import export_model
from minillm.engine import build_engine, load_model_and_tokenizer, setup_distributed, exit_distributed
from minillm.hf import save_pretrained
from minillm.run_dir import TrainOptions


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rise_mb(work) -> tuple[object, float]:
    """What `work()` returns, and how far this process's resident set rose above where it was (VmHWM after a
    reset to the current RSS, minus that RSS), in MB."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = _kb("VmRSS")
    out = work()
    return out, (_kb("VmHWM") - before) / 1024


def main(model_dir: str, out_dir: str, zero_stage: int, shard_size: str):
    rank, _, device = setup_distributed(seed=0)
    out = Path(out_dir)
    cfg = SimpleNamespace(**{**TrainOptions().__dict__, "init_from": model_dir, "seq_len": 16, "micro_batch_size": 1,
                             "zero_stage": zero_stage, "out_dir": out_dir})
    (model, tokenizer), start_mb = rise_mb(lambda: load_model_and_tokenizer(cfg, device))
    engine, _ = build_engine(model, cfg, device)
    engine.eval()
    tokens = torch.arange(12, device=device).view(1, 12) % model.config.vocab_size
    with torch.no_grad():
        logits = engine(tokens).float()
    _, export_mb = rise_mb(lambda: export_model(engine, model, out / "export", tokenizer, state={"step": 0}))
    zero3 = engine.zero_optimization_stage() == 3
    _, shards_mb = rise_mb(lambda: save_pretrained(
        model, out / "shards", max_shard_size=shard_size, writes=rank == 0,
        gathered=deepspeed.zero.GatheredParameters if zero3 else None))
    dist.barrier()
    if rank == 0:
        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
    (out / f"memory_rank{rank}.json").write_text(json.dumps(
        {"start_mb": start_mb, "export_mb": export_mb, "shards_mb": shards_mb,
         "partition_numel": sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())}))
    exit_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
