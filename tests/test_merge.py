"""python -m minillm.merge (minillm/merge.py): linear and task_arithmetic against mergekit tensor for tensor,
every method against a plain float64 PyTorch re-derivation, the chat vector on a vocabulary-extended target,
streaming in blocks, sharded output with the named model's tokenizer, and the one-line errors.

Run: .venv/bin/python -m pytest -q tests/test_merge.py
Oracles: mergekit's run_merge (the reference implementation of these merge methods); the formulas in float64
on tensors loaded with safetensors.torch.load_file; transformers loading the merged directory.
"""
import json
import re
import shutil

import pytest
import torch
from mergekit.config import MergeConfiguration  # test-only oracle
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from minillm.hf import save_pretrained
from minillm.merge import main as merge_main, merge_models
from minillm.model import Llama, LlamaConfig
from minillm.tokenizer import SentencePieceTokenizer, load_tokenizer

from conftest import chat_lines  # noqa: E402


def weights_of(path) -> dict:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer and four tiny random models of one shape (float32), all with that tokenizer."""
    root = tmp_path_factory.mktemp("merge")
    tok = SentencePieceTokenizer.train(iter(chat_lines(500)), root / "sp", 400)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    for i, name in enumerate(["base", "a", "b", "c"]):
        torch.manual_seed(i)
        model = Llama(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)  # norms away from 1, so every tensor differs between models
        save_pretrained(model, root / name, tokenizer=tok)
    return root


def mergekit_merge(config: dict, out):
    run_merge(MergeConfiguration.model_validate(config), str(out), options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False))
    return weights_of(out)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_equal_to_mergekit_and_to_float64(world, tmp_path, method):
    models, w = [world / "a", world / "b", world / "c"], [0.5, 0.3, 0.7]
    kwargs = {"base": world / "base"} if method == "task_arithmetic" else {}
    ours = weights_of(merge_models(method, tmp_path / "ours", models, w, block_bytes=4096, **kwargs))
    config = {"merge_method": method, "dtype": "float32", "out_dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": x}} for m, x in zip(models, w)]}
    if method == "task_arithmetic":
        config["base_model"] = str(world / "base")
    theirs = mergekit_merge(config, tmp_path / "mergekit")
    assert set(ours) == set(theirs) and len(ours) > 10
    inputs = [weights_of(m) for m in models]
    base = weights_of(world / "base")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7)  # mergekit computes in float32
        x = [t[name].double() for t in inputs]
        if method == "linear":
            expected = sum(wi * xi for wi, xi in zip(w, x)) / sum(w)
        else:
            expected = base[name].double() + sum(wi * (xi - base[name].double()) for wi, xi in zip(w, x))
        assert torch.equal(ours[name], expected.float()), name  # float64, rounded once: exactly
        assert not torch.equal(ours[name], inputs[0][name])


def test_chat_vector_on_an_extended_vocabulary(world, tmp_path):
    """target (vocabulary extended by 20 rows) + 0.8 * (instruct - base): the shared rows get the vector, the new
    rows keep the target's values, the tokenizer and template are the target's."""
    tok = load_tokenizer(world / "base")
    target = tmp_path / "target"
    shutil.copytree(world / "c", target)
    state = weights_of(target)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.randn(20, state[name].shape[1])])
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 20}))
    (target / "chat_template.jinja").write_text("{{ 'target template' }}")
    out = merge_models("chat_vector", tmp_path / "merged", weights=[0.8], target=target, instruct=world / "a",
                       base=world / "base", max_shard_size="100KB", block_bytes=2048)
    merged, instruct, base = weights_of(out), weights_of(world / "a"), weights_of(world / "base")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    n = tok.vocab_size
    for name, t in merged.items():
        expected = state[name].double()
        expected[:n] += 0.8 * (instruct[name].double() - base[name].double())
        assert torch.equal(t, expected.float()), name
    assert torch.equal(merged["lm_head.weight"][n:], state["lm_head.weight"][n:])
    assert (out / "chat_template.jinja").read_text() == "{{ 'target template' }}"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n + 20
    hf = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(hf.lm_head.weight.detach(), merged["lm_head.weight"])


def test_one_line_errors(world, tmp_path, capsys):
    target = tmp_path / "t"
    shutil.copytree(world / "c", target)
    state = weights_of(target)
    state["lm_head.weight"] = torch.cat([state["lm_head.weight"], torch.zeros(4, state["lm_head.weight"].shape[1])])
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"], torch.zeros(4, 64)])
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    # a tokenizer that spells the shared ids differently
    SentencePieceTokenizer.train(iter(chat_lines(500, seed=5)), tmp_path / "sp3", 380).save_pretrained(target)
    cases = [
        (["--method", "chat_vector", "--target", target, "--instruct", world / "a", "--base", world / "base"],
         "token \\d+ is .* but .* a chat vector needs the shared rows"),
        (["--method", "linear", "--models", world / "a", target], "tensor '.*' has different shapes"),
        (["--method", "task_arithmetic", "--models", world / "a"], "task_arithmetic needs --base"),
        (["--method", "linear", "--models", world / "a", world / "b", "--weights", "1"], "2 models but 1 weights"),
        (["--method", "linear", "--models", tmp_path / "nowhere"], "config.json: not found"),
    ]
    for args, pattern in cases:
        with pytest.raises(SystemExit) as stop:  # the command's main, in-process: what the CLI prints
            merge_main([str(a) for a in args] + ["--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert stop.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
