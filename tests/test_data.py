"""Token shards, mixture sampling, data-parallel slicing, resumable loading and packing (minillm/data.py).

Run: cd /work/main && python -m pytest -q tests/test_data.py   (CPU, about 30 s)

Oracles: sentencepiece called directly (what a shard must contain), hand-computed packed rows, binomial
bounds for the mixture, a single-process loader for the data-parallel slices, and the model's logits for
document masking (a packed document must give the logits it gives alone in its own row).
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
import torch

import minillm
from minillm.data import (PackedLoader, TokenShards, pack_documents, pack_examples, parse_mixture,
                          parse_sources, prepare, token_dtype, validation_batches, write_shards)
from minillm.model import Llama, LlamaConfig
from minillm.tokenizer import Tokenizer

WORDS = ("tere maailm kass koer maja suur väike ilus päev öö homme eile the cat dog house big "
         "small nice day night tomorrow yesterday").split()


def sentence(rng, lo=3, hi=25):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    (d / "train.txt").write_text("\n".join(sentence(rng) for _ in range(300)) + "\n", encoding="utf-8")
    Tokenizer.train(d / "train.txt", d / "tok", vocab_size=300)
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
    cmd = [sys.executable, "-m", "minillm.data", "prepare", "--tokenizer", str(tok_file.parent / "tok.model"),
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


# ----------------------------------------------------------------------------- mixture and loader

BOS, EOS = 1, 2


def synthetic_source(path, lo, hi, n_docs, seed, vocab_size=512):
    """Documents BOS + ids in [lo, hi) + EOS, so every token tells which source it came from."""
    rng = np.random.default_rng(seed)
    docs = [[BOS] + rng.integers(lo, hi, rng.integers(3, 40)).tolist() + [EOS] for _ in range(n_docs)]
    write_shards(path, docs, vocab_size)
    return docs


@pytest.fixture
def sources(tmp_path):
    synthetic_source(tmp_path / "et", 10, 100, 60, seed=0)
    synthetic_source(tmp_path / "en", 100, 200, 50, seed=1)
    synthetic_source(tmp_path / "pl", 200, 300, 20, seed=2)
    return {n: tmp_path / n for n in ("et", "en", "pl")}


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("spec,names,pattern", [
    ("et=0.75,en=-0.25", None, r"weight of 'en' must be a finite number >= 0, got -0.25"),
    ("et=0.5,de=0.5", ["et", "en"], r"'de' names no data source \(sources: et, en\)"),
    ("et=0,en=0", None, r"weights sum to zero"),
    ("et=0.5", ["et", "en"], r"no weight for source\(s\) en"),
    ("et=abc", None, r"weight of 'et' is not a number"),
    ("et0.5", None, r"expected name=value pairs"),
    ("et=0.5,et=0.5", None, r"'et' given twice"),
    ("et=nan", None, r"must be a finite number"),
])
def test_parse_mixture_errors(spec, names, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_mixture(spec, names)


def test_parse_mixture_and_sources():
    assert parse_mixture("et=3, en=1") == {"et": 0.75, "en": 0.25}
    assert parse_mixture("", ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert parse_sources("et=tok/et,en=/x/en") == {"et": "tok/et", "en": "/x/en"}
    with pytest.raises(ValueError, match="given twice"):
        parse_sources("et=a,et=b")


def row_sources(batch):
    """Source of each row from its token ids (each row must come from exactly one source)."""
    ids = batch["input_ids"]
    out = []
    for row in ids:
        text = row[row > EOS]
        kinds = {int(k) for k in torch.unique(text // 100)}
        assert len(kinds) == 1, "a row mixes sources"
        out.append(["et", "en", "pl"][kinds.pop()])
    return out


def test_mixture_hits_its_token_weights(sources):
    weights = parse_mixture("et=0.75,en=0.25,pl=0", list(sources))
    loader = PackedLoader(sources, weights, seq_len=16, batch_size=100, seed=3, mode="concat")
    batches = take(loader, 30)
    picks = [s for b in batches for s in row_sources(b)]
    assert all((b["labels"] != -100).all() for b in batches)  # every row is seq_len real targets
    n = len(picks)
    share = picks.count("et") / n  # rows are equal-sized, so this is also the share of tokens
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5  # 4 sigma of the binomial
    assert "pl" not in picks
    assert loader.epochs()["et"] > 5 and loader.epochs()["pl"] == 0  # several passes over the data


def test_loader_is_deterministic_from_its_seed(sources):
    weights = parse_mixture("et=0.5,en=0.3,pl=0.2")
    a = take(PackedLoader(sources, weights, 24, 4, seed=7), 6)
    b = take(PackedLoader(sources, weights, 24, 4, seed=7), 6)
    c = take(PackedLoader(sources, weights, 24, 4, seed=8), 6)
    assert_batches_equal(a, b)
    assert not torch.equal(cat(a)["input_ids"], cat(c)["input_ids"])


def test_one_source_stream_is_the_shuffled_documents_epoch_after_epoch(tmp_path):
    docs = synthetic_source(tmp_path / "s", 10, 100, 30, seed=4)
    shards = TokenShards(tmp_path / "s")
    seq_len = 8
    loader = PackedLoader({"s": shards}, {"s": 1.0}, seq_len, 1, seed=0, mode="concat")
    n_rows = 3 * shards.num_tokens // seq_len
    rows = [loader.next_batch() for _ in range(n_rows)]
    stream = torch.cat([r["input_ids"][0] for r in rows]).tolist() + [int(rows[-1]["labels"][0, -1])]
    for r, nxt in zip(rows, rows[1:]):  # consecutive rows overlap by one token: every token is a target once
        assert r["labels"][0, -1] == nxt["input_ids"][0, 0]
        assert torch.equal(r["labels"][0, :-1], r["input_ids"][0, 1:])
    epochs = [stream[e * shards.num_tokens:(e + 1) * shards.num_tokens] for e in range(2)]
    for epoch in epochs:  # each epoch: all documents, each once, in some order
        split, cur = [], []
        for t in epoch:
            cur.append(t)
            if t == EOS:
                split.append(cur)
                cur = []
        assert sorted(split) == sorted(docs)
    assert epochs[0] != epochs[1] and epochs[0] != sum(docs, [])  # reshuffled each epoch


@pytest.mark.parametrize("mode", ["concat", "document"])
def test_ranks_together_see_the_single_process_global_batch(sources, mode):
    weights = parse_mixture("et=0.6,en=0.3,pl=0.1")
    single = PackedLoader(sources, weights, 20, 6, seed=5, mode=mode)
    ranks = [PackedLoader(sources, weights, 20, 3, rank=r, world_size=2, seed=5, mode=mode) for r in range(2)]
    for _ in range(5):
        assert_batches_equal([single.next_batch()], [cat([ranks[0].next_batch(), ranks[1].next_batch()])])
    # one process with half the rows per call (gradient accumulation 2x) reads the same rows in the same order
    small = PackedLoader(sources, weights, 20, 3, seed=5, mode=mode)
    three = [PackedLoader(sources, weights, 20, 2, rank=r, world_size=3, seed=5, mode=mode) for r in range(3)]
    assert_batches_equal([cat(take(small, 4))], [cat([cat([l.next_batch() for l in three]) for _ in range(2)])])


def test_state_dict_resumes_the_same_batches(sources):
    weights = parse_mixture("et=0.6,en=0.4,pl=0")
    loader = PackedLoader(sources, weights, 32, 4, rank=1, world_size=2, seed=9)
    take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))  # what the checkpoint stores
    expected = take(loader, 12)  # crosses epoch boundaries of every source
    resumed = PackedLoader(sources, weights, 32, 4, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, 12), expected)
    other = PackedLoader(sources, weights, 16, 4, rank=1, world_size=2, seed=9)
    with pytest.raises(ValueError, match="seq_len was 32, now 16"):
        other.load_state_dict(state)


def test_loader_errors(sources, tmp_path, tok_file):
    with pytest.raises(ValueError, match=r"tokens come from a 512-piece tokenizer but the model has 256"):
        PackedLoader(sources, {"et": 1.0}, 8, 1, vocab_size=256)
    (tmp_path / "x.txt").write_text("tere maailm\n")
    prepare([tmp_path / "x.txt"], tok_file, tmp_path / "real", progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedLoader({"et": sources["et"], "real": tmp_path / "real"}, {"et": 1.0, "real": 1.0}, 8, 1)
    with pytest.raises(ValueError, match="not a prepared token directory"):
        PackedLoader({"et": tmp_path / "nothing"}, {"et": 1.0}, 8, 1)


# ----------------------------------------------------------------------------- packing

def test_packing_by_hand():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2]]  # stream 1 5 6 2 | 1 7 2 | 1 8 9 2: 10 targets, 3 rows of 4
    concat = pack_documents(docs, seq_len=4, mode="concat")
    assert concat["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 2, 0]]  # the final EOS is input, no target
    assert concat["labels"].tolist() == [[5, 6, 2, 1], [7, 2, 1, 8], [9, 2, -100, -100]]
    assert concat["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]]
    assert concat["doc_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]  # padding: its own doc
    doc = pack_documents(docs, seq_len=4, mode="document")
    assert doc["input_ids"].tolist() == concat["input_ids"].tolist()
    assert doc["labels"].tolist() == [[5, 6, 2, -100], [7, 2, -100, 8], [9, 2, -100, -100]]
    assert doc["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]]
    assert doc["doc_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_document_mode_labels_never_cross_a_boundary(sources):
    loader = PackedLoader(sources, parse_mixture("et=1,en=1,pl=1"), 48, 8, seed=1, mode="document")
    for b in take(loader, 5):
        lab, ids, doc = b["labels"], b["input_ids"], b["doc_ids"]
        assert not (lab == BOS).any()  # the first token of a document is never a target
        keep = lab[:, :-1] != -100
        assert torch.equal(lab[:, :-1][keep], ids[:, 1:][keep])
        assert (doc[:, 1:][keep] == doc[:, :-1][keep]).all()
        starts = ids == BOS
        assert (b["position_ids"][starts] == 0).all() and (b["position_ids"][:, 0] == 0).all()
        assert (lab[:, :-1][starts[:, 1:]] == -100).all()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny")).eval()


@torch.no_grad()
def test_document_masking_on_logits(tiny_model):
    g = torch.Generator().manual_seed(0)
    docs = [[BOS] + torch.randint(3, 500, (n,), generator=g).tolist() + [EOS] for n in (9, 14, 6)]
    seq_len = sum(map(len, docs)) - 1
    row = pack_documents(docs, seq_len, mode="document")
    assert row["input_ids"].shape == (1, seq_len)
    logits = tiny_model(row["input_ids"], position_ids=row["position_ids"], doc_ids=row["doc_ids"])
    # each packed document gives exactly the logits it gives alone
    at = 0
    for d in docs:
        n = min(len(d), seq_len - at)
        alone = tiny_model(torch.tensor([d[:n]]))
        torch.testing.assert_close(logits[0, at:at + n], alone[0], atol=1e-5, rtol=1e-5)
        at += n
    # perturbing document A changes A's logits only
    perturbed = row["input_ids"].clone()
    perturbed[0, 1:len(docs[0])] = torch.randint(3, 500, (len(docs[0]) - 1,), generator=g)
    logits2 = tiny_model(perturbed, position_ids=row["position_ids"], doc_ids=row["doc_ids"])
    a = len(docs[0])
    assert (logits2[0, 1:a] - logits[0, 1:a]).abs().max() > 1e-2
    torch.testing.assert_close(logits2[0, a:], logits[0, a:], atol=1e-6, rtol=0)
    # control: in concat mode (no document ids) the same perturbation does reach document B
    plain = pack_documents(docs, seq_len, mode="concat")
    l1 = tiny_model(plain["input_ids"], position_ids=plain["position_ids"], doc_ids=plain["doc_ids"])
    l2 = tiny_model(perturbed, position_ids=plain["position_ids"], doc_ids=plain["doc_ids"])
    assert (l2[0, a:] - l1[0, a:]).abs().max() > 1e-3


def test_pack_examples_best_fit_and_shifted_labels():
    ex = [([1, 10, 11, 2], [-100, -100, 11, 2]),  # 4 tokens, prompt masked
          ([1, 20, 21, 22, 23, 2], [-100, 20, 21, 22, 23, 2]),  # 6
          ([1, 30, 2], [-100, 30, 2]),  # 3
          ([1, 40, 2], [-100, -100, 2])]  # 3
    b = pack_examples(ex, seq_len=8)
    # best fit in order: row0 = ex0 (room 4); ex1 -> new row1 (room 2); ex2 -> row0 (room 1); ex3 -> new row2
    assert b["input_ids"].tolist() == [[1, 10, 11, 2, 1, 30, 2, 0], [1, 20, 21, 22, 23, 2, 0, 0], [1, 40, 2] + [0] * 5]
    assert b["labels"].tolist() == [[-100, 11, 2, -100, 30, 2, -100, -100],
                                    [20, 21, 22, 23, 2, -100, -100, -100],
                                    [-100, 2, -100, -100, -100, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    one = pack_examples(ex, seq_len=8, pack=False)
    assert one["input_ids"].shape == (4, 8) and one["labels"][2].tolist() == [30, 2] + [-100] * 6
    with pytest.raises(ValueError, match="example 1: 6 tokens do not fit seq_len 5"):
        pack_examples(ex, seq_len=5)
    with pytest.raises(ValueError, match="example 0: 2 ids but 1 labels"):
        pack_examples([([1, 2], [2])], seq_len=5)


@torch.no_grad()
def test_packed_and_unpacked_examples_give_the_same_loss(tiny_model):
    g = torch.Generator().manual_seed(1)
    ex = []
    for n in (5, 17, 9, 30, 3, 12, 21):
        ids = [BOS] + torch.randint(3, 500, (n,), generator=g).tolist() + [EOS]
        labels = [-100] * (n // 2 + 1) + ids[n // 2 + 1:]
        ex.append((ids, labels))

    def nll_sum(b):
        logits = tiny_model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]).double()
        mask = b["labels"] != -100
        return -logits.log_softmax(-1)[mask].gather(-1, b["labels"][mask][:, None]).sum(), mask.sum()

    packed, unpacked = pack_examples(ex, 40), pack_examples(ex, 40, pack=False)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])
    (a, na), (b, nb) = nll_sum(packed), nll_sum(unpacked)
    assert na == nb == sum(sum(l != -100 for l in labels[1:]) for _, labels in ex)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_validation_batches_cover_the_set_once_on_every_rank(tmp_path):
    docs = synthetic_source(tmp_path / "v", 10, 100, 7, seed=6)
    total = sum(map(len, docs))
    per_rank = [validation_batches(tmp_path / "v", 16, 2, None, rank=r, world_size=2, mode="concat") for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1  # equal counts: collective forwards under ZeRO-3
    targets = [b["labels"][b["labels"] != -100] for batches in zip(*per_rank) for b in batches]
    assert torch.cat(targets).tolist() == sum(docs, [])[1:]  # every token after the first, once, in order
    assert sum(int((b["labels"] != -100).sum()) for r in per_rank for b in r) == total - 1
    fixed = validation_batches(tmp_path / "v", 16, 2, 50)
    assert len(fixed) == 50 and (fixed[-1]["labels"] == -100).all()  # past the end: padding, no targets
