"""The presets of real model sizes: parameter counts against the published sizes and against transformers building
the same config, and the MFU line's FLOP count against the 6N rule computed from the parameters themselves.

Run: .venv/bin/python -m pytest -q tests/test_presets.py   (needs the test extra: transformers)

Every model is built on the meta device: shapes only, no memory, no initialisation.
"""
import pytest
import torch
import transformers

from minillm.hf import config_to_hf
from minillm.model import PRESETS, Llama, LlamaConfig
from minillm.monitor import step_flops

# Parameter counts as published on the models' Hub pages (safetensors metadata / model cards).
PUBLISHED = {
    "llama2-7b": 6.74e9,
    "tinyllama-1.1b": 1.10e9,
    "llama3-8b": 8.03e9,
    "llama3.1-8b": 8.03e9,
    "llama3.2-1b": 1.24e9,  # tied embeddings
    "llama3.2-3b": 3.21e9,  # tied embeddings
    "mistral-nemo-12b": 12.2e9,  # head_dim 128 with hidden 5120 and 32 heads
    "qwen2.5-7b": 7.61e9,  # q/k/v biases
}
TEST_SIZES = {"tiny", "demo", "small", "1b"}


def meta_model(config: LlamaConfig) -> Llama:
    with torch.device("meta"):
        return Llama(config)


def test_every_real_size_is_checked():
    assert set(PRESETS) - TEST_SIZES == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_count_matches_the_published_size_and_transformers(name):
    config = LlamaConfig.from_preset(name)
    n = sum(p.numel() for p in meta_model(config).parameters())  # a tied matrix is counted once
    assert n == pytest.approx(PUBLISHED[name], rel=0.01), f"{name}: {n / 1e9:.3f}B"
    # The same config.json built by transformers (its own classes, its own shapes) has exactly as many.
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config, torch.bfloat16))
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                  "qwen2": "Qwen2ForCausalLM"}[config.family]
    assert sum(p.numel() for p in ref.parameters()) == n


@pytest.mark.parametrize("name", list(PUBLISHED) + ["tiny"])
def test_step_flops_is_6n_plus_attention_from_the_parameters(name):
    """6N per token for every matrix the token passes through (forward 2N + backward 4N): the block matrices for
    every token, the output head only for tokens with a label (the chunked loss skips the others); the embedding
    is a lookup, and norms and biases are elementwise. Plus attention's two products, QK^T and PV, 2 * 2 * T *
    n_heads * head_dim per token and layer, halved as causal, times 3 for the backward."""
    config = LlamaConfig.from_preset(name)
    model = meta_model(config)
    matrices = {name: p.numel() for name, p in model.named_parameters() if p.dim() == 2}
    block = sum(n for name, n in matrices.items() if name.startswith("layers."))
    head = model.output.weight.numel()  # tied or not, the head is a [vocab, dim] matmul
    assert sum(matrices.values()) == block + head * (1 if config.tie_embeddings else 2)

    rows, width = 2, 64
    labels = torch.zeros(rows, width, dtype=torch.long)
    labels[0, :10] = -100  # 10 tokens without a target
    batches = [{"input_ids": torch.zeros(rows, width, dtype=torch.long), "labels": labels}] * 3
    tokens, labelled = 3 * rows * width, 3 * (rows * width - 10)
    attention = 3 * (2 * 2 * width * config.n_heads * config.head_dim) / 2 * config.n_layers
    expected = 6 * block * tokens + 6 * head * labelled + attention * tokens
    assert step_flops(config, batches) == pytest.approx(expected, rel=1e-12)
