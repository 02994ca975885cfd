"""The whole pipeline on the bases people adapt today, in miniature: a random tiny Llama-3-layout model and a
random tiny Qwen2-style one (q/k/v biases, no BOS), each with a tokenizer.json tokenizer only (no
tokenizer.model). prepare -> pretrain -> SFT -> ORPO -> evaluate -> chat, every stage through its CLI; the
exported model loads in transformers with the same logits and the same chat-template ids.

    .venv/bin/python -m pytest -q tests/test_pipeline_families.py
"""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, read_metrics, run_script, write_llama3_tokenizer, write_qwen2_tokenizer

FAMILIES = {
    "llama3": (write_llama3_tokenizer, dict(family="llama", rope_theta=500000.0), "<|eot_id|>"),
    "qwen2": (write_qwen2_tokenizer, dict(family="qwen2", attention_bias=True, rope_theta=1000000.0), "<|im_end|>"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_pipeline_on_a_tokenizer_json_base(tiny_world, tmp_path, family):
    import transformers

    from minillm.chat_format import render
    from minillm.corpora import iter_texts
    from minillm.hf import load_pretrained, save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import load_tokenizer

    write_tokenizer, overrides, turn_end = FAMILIES[family]
    data = tiny_world / "data"
    texts = list(iter_texts([data / "pretrain/et/train.jsonl", data / "pretrain/en/train.jsonl"]))
    texts += [json.dumps(r) for r in (json.loads(line) for line in (data / "sft/alpaca_et.jsonl").open())]
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok", texts, vocab_size=700))
    assert not (tmp_path / "tok" / "tokenizer.model").exists()
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                     pad_id=tok.pad_id, **overrides)
    save_pretrained(Llama(config), tmp_path / "base", tokenizer=tok)

    subprocess.run([sys.executable, "-m", "minillm.prepare", "--tokenizer", str(tmp_path / "base"), "--input",
                    str(data / "pretrain/et/train.jsonl"), "--out", str(tmp_path / "shards"), "--workers", "1"],
                   check=True, capture_output=True, cwd=ROOT)
    run_script("train_pretrain.py", ["--init-from", tmp_path / "base", "--tokenizer", "", "--data",
                                     f"et={tmp_path / 'shards'}", "--mixture", "et=1", "--valid-data", "",
                                     "--seq-len", "64", "--micro-batch-size", "4", "--max-steps", "3",
                                     "--warmup-steps", "1", "--out-dir", tmp_path / "pt"])
    sft = run_script("train_sft.py", ["--init-from", tmp_path / "pt" / "model", "--train-data",
                                      data / "sft/alpaca_et.jsonl", "--valid-data", data / "sft/valid.jsonl",
                                      "--seq-len", "128", "--micro-batch-size", "8", "--epochs", "1",
                                      "--out-dir", tmp_path / "sft"])
    layout = {"llama3": "llama3", "qwen2": "chatml"}[family]
    assert f"template: {layout}" in sft.stdout
    run_script("train_orpo.py", ["--init-from", tmp_path / "sft" / "model", "--train-data",
                                 data / "preferences/train.jsonl", "--valid-data", data / "preferences/valid.jsonl",
                                 "--seq-len", "128", "--micro-batch-size", "4", "--epochs", "1",
                                 "--out-dir", tmp_path / "orpo"])
    for stage in ("pt", "sft", "orpo"):
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(tmp_path / stage))
    export = tmp_path / "orpo" / "model"
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(export), "--tasks",
                           str(data / "eval/mt_en_et.task.json"), str(data / "eval/ppl_et.task.json"),
                           "--prompt-format", "chat", "--limit", "3", "--max-new-tokens", "8", "--progress", "false",
                           "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert {r["task"] for r in results} == {"mt_en_et", "ppl_et"} and not any("error" in r for r in results)
    proc = subprocess.run([sys.executable, "-m", "minillm.chat", "--model", str(export), "--temperature", "0",
                           "--max-new-tokens", "8"], input="Tere!\n", capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]

    # The export, as transformers reads it: the family it was, the same logits, the same chat-template ids.
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["model_type"] == overrides["family"]
    assert tok.marker_id(turn_end) in hf_config["eos_token_id"]
    ours = load_pretrained(export).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Tere, kuidas läheb? Mari elab Kivilas.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-4)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    messages = [{"role": "user", "content": "Tõlgi inglise keelde: punane kass"},
                {"role": "assistant", "content": "red cat"}]
    assert hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False) == \
        render(messages, load_tokenizer(export), template=layout)[0]
