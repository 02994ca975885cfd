"""Hugging Face interop against transformers as the oracle (the litgpt HF-parity test, in small).

Run: python -m pytest -q tests/test_hf_parity.py   (needs the test extra: transformers)

A tiny random transformers LlamaForCausalLM (GQA, rope_theta != 10000; untied, tied, and with
Llama-3 rope scaling) is saved with transformers and loaded with minillm, and the other way round;
fp32 logits must agree to 1e-4 and greedy generation must pick the same tokens.
"""
import copy
import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from minillm.generate import generate
from minillm.hf import load_pretrained, save_pretrained, to_hf_name
from minillm.model import Llama, LlamaConfig

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}
CASES = {
    "untied": dict(tie_word_embeddings=False, rope_theta=50000.0),
    "tied": dict(tie_word_embeddings=True, rope_theta=20000.0),
    "llama3-rope": dict(tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
}


def hf_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, **copy.deepcopy(CASES[case]))  # transformers edits the dict in place
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights too, so a swapped norm name cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tiny_minillm(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    config = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, max_seq_len=256,
                  rope_theta=50000.0)
    model = Llama(LlamaConfig(**{**config, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def sample_ids(batch=2, length=40, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_loads_with_same_logits(tmp_path, case):
    ref = hf_model(case)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.tie_embeddings == (case == "tied")
    # transformers >= 5 writes rope settings as "rope_parameters"; they must arrive intact.
    assert model.config.rope_theta == CASES[case]["rope_theta"]
    assert model.config.rope_scaling == CASES[case].get("rope_scaling")
    assert (model.config.n_kv_heads, model.config.hidden_dim, model.config.norm_eps) == (2, 160, 1e-5)
    if case == "tied":
        assert model.output.weight is model.tok_embeddings.weight
    ids = sample_ids()
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids)
    assert got.shape == expected.shape
    assert max_diff(got, expected) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_minillm_checkpoint_loads_in_transformers(tmp_path, case):
    overrides = {"tie_embeddings": CASES[case]["tie_word_embeddings"], "rope_theta": CASES[case]["rope_theta"],
                 "rope_scaling": CASES[case].get("rope_scaling")}
    model = tiny_minillm(**overrides)
    save_pretrained(model, tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (case != "tied")  # a tied head is not written
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = sample_ids()
    with torch.no_grad():
        assert max_diff(model(ids), ref(ids).logits) < 1e-4
    # And back: minillm re-reads its own checkpoint exactly.
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_sharded_checkpoints_load(tmp_path):
    # Written by transformers, sharded: the index is the oracle's, not ours.
    ref = hf_model("untied")
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = load_pretrained(tmp_path / "hf")
    ids = sample_ids()
    with torch.no_grad():
        assert max_diff(model(ids), ref(ids).logits) < 1e-4

    # Written by minillm, sharded: transformers and minillm both read it.
    save_pretrained(model, tmp_path / "ours", max_shard_size="40KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "ours" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    for shard in shards:
        assert os.path.getsize(tmp_path / "ours" / shard) < 40_000 + 20_000  # one tensor may overflow
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    reloaded = load_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert max_diff(again(ids).logits, ref(ids).logits) < 1e-4
        assert torch.equal(reloaded(ids), model(ids))


def test_resave_into_existing_directory_replaces_weights_and_keeps_other_files(tmp_path):
    model = tiny_minillm()
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    (tmp_path / "tokenizer.model").write_bytes(b"keep me")
    save_pretrained(model, tmp_path)  # now a single file: the old shards and index must go
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.model"]
    assert not any(name.startswith(".") for name in os.listdir(tmp_path.parent) if "tmp" in name)


def test_truncated_safetensors_names_the_file(tmp_path):
    save_pretrained(tiny_minillm(), tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = sorted(set(index["weight_map"].values()))[1]  # e.g. model-00002-of-00005.safetensors
    with open(tmp_path / name, "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / name) // 2)
    with pytest.raises(ValueError, match=rf"{name}: unreadable safetensors file \(truncated or corrupted"):
        load_pretrained(tmp_path)


def test_garbage_safetensors_names_the_file(tmp_path):
    save_pretrained(tiny_minillm(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 8 + b"not a header")
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupted"):
        load_pretrained(tmp_path)


def test_missing_tensor_and_shape_mismatch_are_named(tmp_path):
    save_pretrained(tiny_minillm(), tmp_path)
    file = tmp_path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj"):
        load_pretrained(tmp_path)

    save_pretrained(tiny_minillm(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                         r"has shape"):
        load_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_model("untied").config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle bytes that must never be unpickled")
    with pytest.raises(ValueError, match="safetensors"):
        load_pretrained(tmp_path)


def test_bf16_round_trip(tmp_path):
    model = tiny_minillm()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    for dtype in (torch.bfloat16, "auto"):
        loaded = load_pretrained(tmp_path, dtype=dtype)
        assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
        assert loaded.inv_freq.dtype == torch.float32  # rotary frequencies stay exact
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a.to(torch.bfloat16), b), name
    assert all(p.dtype == torch.float32 for p in load_pretrained(tmp_path).parameters())  # default: fp32
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert ref.dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["untied", "llama3-rope"])
def test_greedy_generation_matches_transformers(tmp_path, case):
    ref = hf_model(case, seed=3)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    prompts = [[1, 17, 33, 90, 5, 61, 7], [1, 44, 12]]
    got = generate(model, prompts, max_new_tokens=20, temperature=0.0, eos_id=2)
    for prompt, tokens in zip(prompts, got):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=2,
                           pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = out[0, len(prompt):].tolist()
        if 2 in expected:  # minillm does not return the EOS token itself
            expected = expected[:expected.index(2)]
        assert tokens == expected
    assert sum(len(t) for t in got) >= 20  # the comparison covered real decoding steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_weights_are_the_bytes_safetensors_writes(tmp_path, dtype):
    """save_pretrained writes each file one tensor at a time after a header made from the shapes; the file is
    byte for byte what safetensors.torch.save_file writes for the same tensors (the oracle)."""
    model = tiny_minillm()
    save_pretrained(model, tmp_path / "ours", dtype=dtype, max_shard_size="40KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    params = {to_hf_name(n): p for n, p in model.named_parameters()}
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard]
        save_file({n: params[n].detach().to(dtype).contiguous() for n in names}, str(tmp_path / shard),
                  metadata={"format": "pt"})
        assert (tmp_path / "ours" / shard).read_bytes() == (tmp_path / shard).read_bytes(), shard


def test_shards_named_outside_the_directory_are_refused(tmp_path):
    save_pretrained(tiny_minillm(), tmp_path / "m", max_shard_size="40KB")
    index_file = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside/model-00001-of-00005.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: tensor .* is in '\.\./outside/.*', not a file name"):
        load_pretrained(tmp_path / "m")
