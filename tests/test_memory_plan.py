"""minillm.memory_plan: its parameter counts against the model itself, its activation bytes against what autograd
really saves, and the CLI's last line. (Its per-rank peaks are checked against measured runs by
bench/bench_zero_memory.py: BENCHMARKS.md.)

    .venv/bin/python -m pytest -q tests/test_memory_plan.py
"""
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from minillm.memory_plan import GB, activation_elements, parameter_counts, plan
from minillm.model import PRESETS, Llama, LlamaConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parameter_counts_equal_the_model(preset):
    config = LlamaConfig.from_preset(preset)
    with torch.device("meta"):
        model = Llama(config)
    counts = parameter_counts(config)
    assert counts["P"] == sum(p.numel() for p in model.parameters())
    assert counts["largest"] == max(p.numel() for p in model.parameters())
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert counts["vectors"] == vectors
    block = sum(p.numel() for p in model.layers[0].parameters() if p.dim() == 2)
    assert counts["block"] == block


def saved_elements(config: LlamaConfig, rows: int, width: int) -> int:
    """Elements of every tensor autograd saves in a training forward (the loss included), weights excluded."""
    torch.manual_seed(0)
    model = Llama(config).train()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (rows, width))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights) // 4  # fp32


@pytest.mark.parametrize("shape", [dict(), dict(n_layers=4), dict(dim=256, n_heads=8, n_kv_heads=8),
                                   dict(hidden_dim=512), dict(n_kv_heads=2), dict(head_dim=48)],
                         ids=["base", "deeper", "wider", "mlp", "gqa", "head_dim"])
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_activation_elements_are_what_autograd_saves(shape, checkpointing):
    config = LlamaConfig(**{**dict(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=256,
                                   max_seq_len=256), **shape}, activation_checkpointing=checkpointing)
    kept, _ = activation_elements(config, 2 * 96, checkpointing)
    assert saved_elements(config, 2, 96) == pytest.approx(kept, rel=0.06)


def test_zero3_per_rank_memory_falls_with_ranks_and_zero0_does_not():
    config = LlamaConfig.from_preset("llama3.1-8b")
    zero3 = [plan(config, n, 3, "cuda", 4096, 1, "selective")["peak"] for n in (8, 16, 64)]
    assert zero3[0] > zero3[1] > zero3[2]
    assert plan(config, 8, 0, "cuda")["peak"] == plan(config, 64, 0, "cuda")["peak"]
    # ZeRO-3's model states (16 bytes per parameter in bf16 + fp32 master and Adam) divide by the ranks
    parts8, parts64 = plan(config, 8, 3, "cuda")["parts"], plan(config, 64, 3, "cuda")["parts"]
    assert parts8["optimizer"] == pytest.approx(8 * parts64["optimizer"])


def test_cli_ends_with_the_per_rank_peak():
    out = subprocess.run([sys.executable, "-m", "minillm.memory_plan", "--preset", "llama3.1-8b", "--ranks", "8",
                          "--zero-stage", "3", "--seq-len", "4096", "--activation-checkpointing", "selective"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"per-rank peak: \d+\.\d\d GB", last), out
    expected = plan(LlamaConfig.from_preset("llama3.1-8b"), 8, 3, "cuda", 4096, 1, "selective")["peak"] / GB
    assert float(last.split()[2]) == pytest.approx(expected, abs=0.005)
    table = subprocess.run([sys.executable, "-m", "minillm.memory_plan", "--reference"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "llama3.1-70b" in table and "mistral-nemo-12b" in table and table.count("\n| ") == 1 + 9
