"""Model families against transformers as the oracle: Llama, Mistral and Qwen2 configs, head_dim != hidden/heads,
q/k/v biases, tied and untied embeddings, lists of EOS ids.

Run: .venv/bin/python -m pytest -q tests/test_hf_families.py   (needs the test extra: transformers)

Both directions for each family: a random transformers model saved by transformers and loaded by minillm, and a
random minillm model saved by minillm and loaded by transformers' AutoModelForCausalLM (as the family's own class,
with no missing or unexpected tensor); fp32 logits agree to 1e-4, transformers reads back the config it wrote
(nothing that matters lost in the round trip), greedy generation picks the same tokens and stops on every id of
a list of EOS ids, and what minillm does not implement (sliding windows) is refused naming config.json's field.
"""
import json

import pytest
import torch
import transformers

from minillm.generate import generate
from minillm.hf import load_pretrained, save_pretrained
from minillm.model import Llama, LlamaConfig

HF_CONFIGS = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
              "qwen2": transformers.Qwen2Config}
SIZE = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=50000.0)
# (family, tied embeddings, head_dim): 24 * 4 heads = 96 != hidden 64 (q/o projections are not square).
CASES = [("llama", False, 24), ("llama", True, 24), ("mistral", False, 24), ("mistral", True, None),
         ("qwen2", False, 24), ("qwen2", True, None)]
IDS = [f"{family}-{'tied' if tied else 'untied'}-hd{head_dim or 16}" for family, tied, head_dim in CASES]
# Keys of transformers' own config that a round trip through minillm may change: where it was saved, the
# random-init scale (no meaning for trained weights), and Qwen2's max_window_layers (no meaning without
# use_sliding_window; minillm writes n_layers: no layer windowed).
NOT_KEPT = {"_name_or_path", "initializer_range", "max_window_layers"}


def randomise(model):
    """Norm weights and biases away from their 1 / 0 init, so a swapped or dropped name cannot go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model.eval()


def hf_model(family, tied, head_dim, seed=0, **extra):
    torch.manual_seed(seed)
    fields = {**SIZE, "tie_word_embeddings": tied, "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2,
              **extra}
    if head_dim:
        fields["head_dim"] = head_dim  # Qwen2Config has no such field; Qwen2Attention reads it when present
    if family == "mistral":
        fields["sliding_window"] = None  # Mistral-Nemo / v0.3; v0.1's 4096 is refused (test below)
    return randomise(transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[family](**fields)))


def minillm_model(family, tied, head_dim, seed=0):
    torch.manual_seed(seed)
    return randomise(Llama(LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=head_dim,
                                       hidden_dim=160, max_seq_len=256, rope_theta=50000.0, tie_embeddings=tied,
                                       family=family, attention_bias=family == "qwen2")))


def sample_ids(batch=2, length=40, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def hf_config_dict(path) -> dict:
    return {k: v for k, v in transformers.AutoConfig.from_pretrained(path).to_dict().items() if k not in NOT_KEPT}


@pytest.mark.parametrize("family, tied, head_dim", CASES, ids=IDS)
def test_transformers_checkpoint_loads_with_same_logits_and_saves_back_as_its_family(tmp_path, family, tied, head_dim):
    ref = hf_model(family, tied, head_dim)
    ref.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    c = model.config
    assert (c.family, c.tie_embeddings, c.attention_bias) == (family, tied, family == "qwen2")
    assert c.head_dim == (head_dim or 16) and model.layers[0].attention.wq.weight.shape == (4 * c.head_dim, 64)
    ids = sample_ids()
    with torch.no_grad():
        assert max_diff(model(ids), ref(ids).logits) < 1e-4

    save_pretrained(model, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == family
    assert written["architectures"] == [type(ref).__name__]
    assert hf_config_dict(tmp_path / "ours") == hf_config_dict(tmp_path / "hf")  # transformers reads the same config
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(again) is type(ref)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("family, tied, head_dim", CASES, ids=IDS)
def test_minillm_checkpoint_loads_in_transformers_as_its_family(tmp_path, family, tied, head_dim):
    model = minillm_model(family, tied, head_dim)
    save_pretrained(model, tmp_path)
    ref, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert type(ref).__name__ == {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                  "qwen2": "Qwen2ForCausalLM"}[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info  # every bias written, nothing extra
    ids = sample_ids()
    with torch.no_grad():
        assert max_diff(model(ids), ref.eval()(ids).logits) < 1e-4
    again = load_pretrained(tmp_path)
    assert again.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family, tied, head_dim", CASES[::2], ids=IDS[::2])
def test_greedy_generation_matches_transformers_and_stops_on_every_eos_id(tmp_path, family, tied, head_dim):
    prompts = [[1, 17, 33, 90, 5, 61, 7], [1, 44, 12]]
    ref = hf_model(family, tied, head_dim, seed=3)
    free = [ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=[],
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    # A list of EOS ids whose first never occurs and whose others end the rows early: only a model that stops
    # on every id of the list (not just the first) matches transformers here.
    unused = max(set(range(128)) - set(free[0] + free[1]))
    eos = [unused] + [next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i]) for row in free]
    ref = hf_model(family, tied, head_dim, seed=3, eos_token_id=eos)
    ref.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    assert model.config.eos_ids == eos and model.config.eos_id == unused
    got = generate(model, prompts, max_new_tokens=20, temperature=0.0)  # the model's own EOS ids by default
    assert generate(model, prompts, max_new_tokens=20, temperature=0.0, compile=True) == got  # the compiled step
    for prompt, tokens in zip(prompts, got):
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
        assert out[-1] in eos[1:]  # transformers stopped on one of the later ids ...
        assert tokens == out[:-1]  # ... and so did minillm (which does not return the stop token)
    assert min(len(t) for t in got) >= 2  # the comparison covered real decoding steps


def test_eos_ids_are_written_back_as_they_were(tmp_path):
    for eos in ([2, 5, 7], 2):
        hf_model("llama", False, None, eos_token_id=eos).save_pretrained(tmp_path / str(eos))
        model = load_pretrained(tmp_path / str(eos))
        assert model.config.eos_id == 2 and model.config.eos_ids == (eos if isinstance(eos, list) else None)
        save_pretrained(model, tmp_path / f"{eos}-again")
        for name in ("config.json", "generation_config.json"):
            assert json.loads((tmp_path / f"{eos}-again" / name).read_text())["eos_token_id"] == eos
        assert transformers.GenerationConfig.from_pretrained(tmp_path / f"{eos}-again").eos_token_id == eos


@pytest.mark.parametrize("family, field, value, message", [
    ("mistral", "sliding_window", 128, r"config\.json: sliding_window=128 is not supported .* set it to null"),
    ("qwen2", "use_sliding_window", True, r"config\.json: use_sliding_window=True is not supported"),
    ("llama", "attention_bias", True, r"config\.json: attention_bias=True is not supported"),
    ("llama", "model_type", "gemma", r"config\.json: model_type 'gemma' is not supported .*llama, mistral, qwen2"),
])
def test_unimplemented_attention_is_refused_naming_the_field(tmp_path, family, field, value, message):
    hf_model(family, False, None).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", "16", r"head_dim='16' must be a positive integer or null"),
    ("hidden_size", "64", r"hidden_size='64' must be a positive integer"),
    ("num_hidden_layers", -1, r"num_hidden_layers=-1 must be a positive integer"),
    ("rms_norm_eps", "1e-5", r"rms_norm_eps='1e-5' must be a positive number"),
    ("rope_theta", -10000.0, r"rope_theta=-10000.0 must be a positive number"),
    ("max_position_embeddings", "2048", r"max_position_embeddings='2048' must be a positive integer or null"),
    ("eos_token_id", "2", r"eos_token_id='2' must be a token id"),
    ("tie_word_embeddings", "false", r"tie_word_embeddings='false' must be true or false"),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_it(tmp_path, field, value, message):
    hf_model("llama", False, None).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps([config]))
    with pytest.raises(ValueError, match=r"config\.json: must be a JSON object \(found a list\)"):
        load_pretrained(tmp_path)


def test_a_window_as_long_as_the_context_is_full_attention(tmp_path):
    """Qwen2 configs carry sliding_window / max_window_layers unused, and a Mistral window that covers the whole
    context changes nothing: both load (the logits test above covers Qwen2's)."""
    hf_model("mistral", False, None).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["sliding_window"] = config["max_position_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_pretrained(tmp_path).config.family == "mistral"


def test_family_and_biases_must_agree():
    with pytest.raises(ValueError, match="Qwen2 always has q/k/v biases"):
        LlamaConfig(family="qwen2")
    with pytest.raises(ValueError, match="family 'gemma'"):
        LlamaConfig(family="gemma")
