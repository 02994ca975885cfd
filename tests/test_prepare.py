"""Corpora -> token shards (minillm/prepare.py): round trips, worker processes, re-runs, atomicity, bad input.

Run: .venv/bin/python -m pytest -q tests/test_prepare.py

Oracles: sentencepiece called directly (what a shard must contain) and the previous output byte for byte.
"""
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import minillm
from minillm.prepare import prepare
from minillm.pretrain_data import TokenShards, token_dtype
from minillm.tokenizer import SentencePieceTokenizer, load_tokenizer

WORDS = ("tere maailm kass koer maja suur väike ilus päev öö homme eile the cat dog house big "
         "small nice day night tomorrow yesterday").split()


def sentence(rng, lo=3, hi=25):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    (d / "train.txt").write_text("\n".join(sentence(rng) for _ in range(300)) + "\n", encoding="utf-8")
    SentencePieceTokenizer.train(d / "train.txt", d / "tok", vocab_size=300)
    return d / "tok.model"


@pytest.fixture
def corpus(tmp_path):
    """A .txt (one document per line, with a blank line), a gzip'd .jsonl (other field name, one empty
    text), and the documents each should yield, in order."""
    rng = random.Random(1)
    txt_docs = [sentence(rng) for _ in range(40)]
    (tmp_path / "a.txt").write_text("\n".join(txt_docs[:20]) + "\n\n" + "\n".join(txt_docs[20:]) + "\n",
                                    encoding="utf-8")
    json_docs = [sentence(rng) + "\nsecond line" for _ in range(30)]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, t in enumerate(json_docs):
            f.write(json.dumps({"id": i, "body": t}) + "\n")
            if i == 5:
                f.write(json.dumps({"id": "empty", "body": ""}) + "\n\n")
    return [tmp_path / "a.txt", tmp_path / "b.jsonl.gz"], txt_docs + json_docs


def expected_docs(tok_file, texts):
    sp = spm.SentencePieceProcessor(model_file=str(tok_file))
    return [[sp.bos_id()] + sp.encode(t) + [sp.eos_id()] for t in texts]


def shard_docs(path):
    shards = TokenShards(path)
    return [shards.doc(i).tolist() for i in range(len(shards))]


# ----------------------------------------------------------------------------- preparation

def test_shards_round_trip_uint16(tok_file, corpus, tmp_path):
    inputs, texts = corpus
    meta = prepare(inputs, tok_file, tmp_path / "out", text_field="body", progress=False)
    want = expected_docs(tok_file, texts)
    assert shard_docs(tmp_path / "out") == want
    shards = TokenShards(tmp_path / "out")
    assert shards.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert shards.num_tokens == sum(map(len, want)) == meta["num_tokens"]
    assert (tmp_path / "out" / "tokens_00000.bin").stat().st_size == 2 * shards.num_tokens
    assert meta["num_docs"] == len(texts) and meta["skipped_empty_docs"] == 1
    assert meta["num_words"] == sum(len(t.split()) for t in texts)
    assert meta["tokens_per_word"] == pytest.approx((shards.num_tokens - 2 * len(texts)) / meta["num_words"])
    assert meta["skipped"] is False


def test_shards_round_trip_uint32_many_shards_and_paragraphs(tok_file, tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32  # Llama-3's 128256 -> uint32
    rng = random.Random(2)
    paragraphs = ["\n".join(sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(25)]
    (tmp_path / "p.txt").write_text("\n\n\n".join(paragraphs) + "\n", encoding="utf-8")
    meta = prepare([tmp_path / "p.txt"], tok_file, tmp_path / "out", txt_docs="paragraph", dtype="uint32",
                   shard_tokens=200, progress=False)
    want = expected_docs(tok_file, paragraphs)
    assert shard_docs(tmp_path / "out") == want
    assert meta["dtype"] == "uint32" and len(meta["shards"]) > 3
    for s in meta["shards"]:  # whole documents per shard, each shard just past shard_tokens
        assert (tmp_path / "out" / s["bin"]).stat().st_size == 4 * s["num_tokens"]
        idx = np.load(tmp_path / "out" / s["idx"])
        assert idx[0] == 0 and idx[-1] == s["num_tokens"] and len(idx) == s["num_docs"] + 1
        assert s is meta["shards"][-1] or idx[-2] < 200 <= idx[-1]
    # re-preparing into fewer shards removes the old run's extra shards
    prepare([tmp_path / "p.txt"], tok_file, tmp_path / "out", txt_docs="paragraph", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokens_00000.bin",
                                                                    "tokens_00000.idx.npy"]
    assert shard_docs(tmp_path / "out") == want


def test_cli_with_worker_processes_matches_in_process(tok_file, corpus, tmp_path):
    inputs, _ = corpus
    prepare(inputs, tok_file, tmp_path / "one", text_field="body", workers=1, progress=False)
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    cmd = [sys.executable, "-m", "minillm.prepare", "prepare", "--tokenizer", str(tok_file.parent / "tok.model"),
           "--input", *map(str, inputs), "--out", str(tmp_path / "two"), "--text-field", "body",
           "--workers", "2", "--name", "et"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "et: 70 documents" in r.stdout and "tokens/word" in r.stdout
    assert (tmp_path / "one" / "tokens_00000.bin").read_bytes() == (tmp_path / "two" / "tokens_00000.bin").read_bytes()
    # bad input through the CLI: one line on stderr, exit status 1
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok"\n')
    r = subprocess.run(cmd[:7] + [str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad"), "--workers", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
    last = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert r.returncode == 1 and last.startswith(f"error: {tmp_path / 'bad.jsonl'}:2: not valid JSON")
    assert "Traceback" not in r.stderr


def test_rerun_is_a_noop_until_inputs_change(tok_file, corpus, tmp_path):
    inputs, _ = corpus
    out = tmp_path / "out"
    prepare(inputs, tok_file, out, text_field="body", progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prepare(inputs, tok_file, out, text_field="body", progress=False)["skipped"] is True
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # other options, or a changed input, mean real work
    assert prepare(inputs, tok_file, out, text_field="body", dtype="uint32", progress=False)["skipped"] is False
    inputs[0].write_text("just one document now\n")
    meta = prepare(inputs, tok_file, out, text_field="body", dtype="uint32", progress=False)
    assert meta["skipped"] is False and meta["num_docs"] == 31


def test_half_written_shards_are_never_used(tok_file, corpus, tmp_path):
    inputs, texts = corpus
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokens_00000.bin").write_bytes(b"\x07" * 64)  # a killed run: shards renamed, no meta yet
    (out / "tokens_00000.bin.tmp").write_bytes(b"\x07" * 10)  # ... or still being written
    (out / "meta.json.tmp").write_text('{"format": "minillm-tokens"')
    with pytest.raises(ValueError, match=r"meta\.json: missing; .* not a prepared token directory"):
        TokenShards(out)
    prepare(inputs, tok_file, out, text_field="body", progress=False)
    assert shard_docs(out) == expected_docs(tok_file, texts)
    assert not list(out.glob("*.tmp"))
    # a shard that no longer matches its meta (truncated on disk) is refused, and prepare redoes it
    data = (out / "tokens_00000.bin").read_bytes()
    (out / "tokens_00000.bin").write_bytes(data[:-2])
    with pytest.raises(ValueError, match=r"tokens_00000\.bin: missing or not \d+ bytes"):
        TokenShards(out)
    assert prepare(inputs, tok_file, out, text_field="body", progress=False)["skipped"] is False
    assert (out / "tokens_00000.bin").read_bytes() == data


BAD_INPUTS = {  # file name, content (bytes), error pattern (after the path)
    "missing": ("nope.txt", None, r": cannot read \(No such file or directory\)"),
    "directory": ("dir.txt", "DIR", r": cannot read \(Is a directory\)"),
    "not json": ("x.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', r":3: not valid JSON"),
    "no field": ("x.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r":2: missing field 'text'"),
    "not a string": ("x.jsonl", b'{"text": "a"}\n{"text": 5}\n', r":2: field 'text' is int, expected a string"),
    "not an object": ("x.jsonl", b'["a"]\n', r":1: expected a JSON object, got list"),
    "bad utf-8": ("x.txt", b"fine\nfine\nbad \xff byte\n", r":3: not valid UTF-8"),
    "bad gzip": ("x.txt.gz", b"this is not gzip", r": cannot read \(Not a gzipped file"),
    "unknown format": ("x.csv", b"a,b\n", r": unknown input format"),
    "empty corpus": ("x.txt", b"\n  \n\n", r": empty corpus"),
    "empty text field": ("x.jsonl", b'{"text": ""}\n', r": empty corpus \(no non-empty documents in field 'text'\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_file_and_line_and_keeps_previous_output(tok_file, corpus, tmp_path, case):
    inputs, texts = corpus
    out = tmp_path / "out"
    prepare(inputs, tok_file, out, text_field="body", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    name, content, pattern = BAD_INPUTS[case]
    bad = tmp_path / name
    if content == "DIR":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    files = [bad] if case.startswith("empty") else [inputs[0], bad]  # the good file comes first
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}{pattern}") as e:
        prepare(files, tok_file, out, progress=False)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost, no temp files left
    assert shard_docs(out) == expected_docs(tok_file, texts)


def test_plain_text_of_any_name_with_format_text(tok_file, tmp_path):
    """`train.et` is not named .txt: --format text (prepare and the tokenizer trainer) reads it as text."""
    rng = random.Random(5)
    texts = [sentence(rng) for _ in range(30)]
    (tmp_path / "train.et").write_text("\n".join(texts) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.et: unknown input format .* --format"):
        prepare([tmp_path / "train.et"], tok_file, tmp_path / "auto", progress=False)
    prepare([tmp_path / "train.et"], tok_file, tmp_path / "out", fmt="text", progress=False)
    assert shard_docs(tmp_path / "out") == expected_docs(tok_file, texts)
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "minillm.tokenizer", "train", "--input", str(tmp_path / "train.et"),
                        "--format", "text", "--vocab-size", "300", "--out", str(tmp_path / "tok")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(tmp_path / "tok").vocab_size == 300
