"""Corpora -> token shards (minillm/prepare.py): round trips in every corpus format, worker processes, caps,
re-runs, atomicity, bad input, bounded memory.

Run: .venv/bin/python -m pytest -q tests/test_prepare.py

Oracles: sentencepiece called directly (what a shard must contain), the shards of the same corpus as plain
.jsonl byte for byte, and the previous output byte for byte.
"""
import gzip
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import zstandard

import minillm
from conftest import write_corpus
from minillm.prepare import main as prepare_main
from minillm.prepare import prepare, split_long_text
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


def test_cli_with_worker_processes_matches_in_process(tok_file, corpus, tmp_path, capsys):
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
    info = [prepare_main(["info", str(tmp_path / "two")]), prepare_main(["info", "--dir", str(tmp_path / "two")])]
    summaries = capsys.readouterr().out.splitlines()
    assert len(summaries) == 2 and summaries[0] == summaries[1] and summaries[0].startswith("et: 70 documents"), info
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


def parquet_bytes(row_group_size=2, **columns) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_size)
    return buf.getvalue()


def zstd_bytes(text: str) -> bytes:
    return zstandard.ZstdCompressor().compress(text.encode())


GOOD_PARQUET = parquet_bytes(id=list(range(200)), text=[f"document {i} " * 20 for i in range(200)])
GOOD_ZSTD = zstd_bytes("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)))

BAD_INPUTS = {  # file name, content (bytes), error pattern (after the path)
    "missing": ("nope.txt", None, r": cannot read \(No such file or directory\)"),
    "directory": ("dir.txt", "DIR", r": no corpus files in this directory"),
    "not json": ("x.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n', r":3: not valid JSON"),
    "no field": ("x.jsonl", b'{"text": "a"}\n{"txt": "b"}\n', r":2: missing field 'text'"),
    "not a string": ("x.jsonl", b'{"text": "a"}\n{"text": 5}\n', r":2: field 'text' is int, expected a string"),
    "not an object": ("x.jsonl", b'["a"]\n', r":1: expected a JSON object, got list"),
    "bad utf-8": ("x.txt", b"fine\nfine\nbad \xff byte\n", r":3: not valid UTF-8"),
    "bad gzip": ("x.txt.gz", b"this is not gzip", r": cannot read \(Not a gzipped file"),
    "unknown format": ("x.csv", b"a,b\n", r": unknown input format"),
    "json null": ("x.jsonl", b'{"text": "a"}\n{"text": null}\n', r":2: field 'text' is null, expected a string"),
    "zst not zstd": ("x.jsonl.zst", b"not zstd at all", r": cannot read \(zstd decompress error: Unknown frame descriptor\)"),
    "zst truncated": ("x.jsonl.zst", GOOD_ZSTD[:len(GOOD_ZSTD) // 2], r": cannot read \(truncated zstd file: it ends inside a frame\)"),
    "zst bad record": ("x.jsonl.zst", zstd_bytes('{"text": "a"}\n{"text": 1}\n'), r":2: field 'text' is int, expected a string"),
    "parquet no column": ("x.parquet", parquet_bytes(id=[1], body=["a"]),
                          r": no column 'text' \(columns: id, body\); choose one with --text-field"),
    "parquet not strings": ("x.parquet", parquet_bytes(text=[1, 2]), r": column 'text' is int64, expected strings"),
    "parquet null": ("x.parquet", parquet_bytes(text=["a", "b", "c", "d", "e", None, "g"]),
                     r": row index 5: column 'text' is null, expected a string"),
    "parquet bad utf-8": ("x.parquet", parquet_bytes(text=pa.array([b"ok", b"ok", b"ok", b"bad \xff"]).view(pa.string())),
                          r": row index 3: column 'text' is not valid UTF-8 \(byte 4\)"),
    "parquet truncated": ("x.parquet", GOOD_PARQUET[:-100], r": cannot read \(.*Parquet"),
    "not parquet": ("x.parquet", b"PAR1 but nothing else", r": cannot read \("),
    "compressed parquet": ("x.parquet.gz", gzip.compress(GOOD_PARQUET), r": a compressed Parquet file cannot be streamed"),
    "empty corpus": ("x.txt", b"\n  \n\n", r": empty corpus"),
    "empty text field": ("x.jsonl", b'{"text": ""}\n', r": empty corpus \(no non-empty documents in field 'text'\)"),
    "empty parquet": ("x.parquet", parquet_bytes(text=[" ", "\n"]), r": empty corpus \(no non-empty documents in field"),
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


@pytest.mark.parametrize("module, name, what", [("pyarrow", "x.parquet", "Parquet"), ("zstandard", "x.jsonl.zst", "zstd")])
def test_a_missing_reader_package_names_the_extra(tok_file, tmp_path, monkeypatch, module, name, what):
    (tmp_path / name).write_bytes(GOOD_PARQUET if module == "pyarrow" else GOOD_ZSTD)
    for m in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, m, None)  # `import module` now raises ImportError
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: reading {what} needs the '{module}' "
                                         r"package: pip install 'minillm\[corpora\]'$"):
        prepare([tmp_path / name], tok_file, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- corpus formats, inputs, caps

@pytest.fixture
def records(tmp_path):
    """The same 60 documents (one whitespace-only, one with newlines) as .jsonl, .jsonl.zst (3 frames) and
    .parquet (row groups of 7), each in its own directory; and the non-empty documents in order."""
    rng = random.Random(3)
    texts = [sentence(rng) for _ in range(60)]
    texts[11], texts[20] = " \t ", texts[20] + "\n" + sentence(rng)
    for name in ("c.jsonl", "c.jsonl.zst", "c.parquet"):
        (tmp_path / name.replace(".", "_")).mkdir()
        write_corpus(tmp_path / name.replace(".", "_") / name, texts, row_group_size=7, zstd_frames=3)
    return tmp_path, [t for t in texts if t.strip()]


def test_parquet_zstd_directories_and_globs_give_the_jsonl_shards(tok_file, records, tmp_path):
    root, texts = records
    want = prepare([root / "c_jsonl" / "c.jsonl"], tok_file, tmp_path / "jsonl", progress=False)
    assert shard_docs(tmp_path / "jsonl") == expected_docs(tok_file, texts) and want["skipped_empty_docs"] == 1
    shards = (tmp_path / "jsonl" / "tokens_00000.bin").read_bytes()
    for out, inputs in [("zst", [root / "c_jsonl_zst" / "c.jsonl.zst"]), ("parquet", [root / "c_parquet" / "c.parquet"]),
                        ("dir", [root / "c_parquet"]), ("glob", [str(root / "c_*" / "*.zst")])]:
        meta = prepare(inputs, tok_file, tmp_path / out, progress=False)
        assert (tmp_path / out / "tokens_00000.bin").read_bytes() == shards, out
        assert (meta["num_docs"], meta["num_words"], meta["skipped_empty_docs"]) == \
            (want["num_docs"], want["num_words"], want["skipped_empty_docs"])
    # a text corpus whose name says nothing: --format text
    (tmp_path / "train.et").write_text("\n".join(texts[:5]) + "\n", encoding="utf-8")
    prepare([tmp_path / "train.et"], tok_file, tmp_path / "et", fmt="text", progress=False)
    assert shard_docs(tmp_path / "et") == expected_docs(tok_file, texts[:5])


def test_caps_stop_at_the_same_document_and_are_part_of_the_fingerprint(tok_file, records, tmp_path):
    root, texts = records
    inputs = [root / "c_parquet" / "c.parquet"]
    docs = expected_docs(tok_file, texts)
    # max_docs: the first N non-empty documents; the whitespace-only record (the 12th) counts as skipped
    # only when it comes before the cut
    for n, skipped in [(11, 0), (12, 1), (len(docs), 1)]:
        meta = prepare(inputs, tok_file, tmp_path / "docs", max_docs=n, progress=False)
        assert shard_docs(tmp_path / "docs") == docs[:n]
        assert (meta["num_docs"], meta["skipped_empty_docs"], meta["max_docs"], meta["capped"]) == (n, skipped, n, True)
        assert meta["num_words"] == sum(len(t.split()) for t in texts[:n])
    # max_tokens: up to the document that reaches the cap (BOS/EOS counted)
    ends = np.cumsum([len(d) for d in docs])
    for cap, n in [(int(ends[9]), 10), (int(ends[9]) + 1, 11), (1, 1)]:
        meta = prepare(inputs, tok_file, tmp_path / "tokens", max_tokens=cap, progress=False)
        assert shard_docs(tmp_path / "tokens") == docs[:n] and meta["num_tokens"] == ends[n - 1] >= cap
        assert meta["max_tokens"] == cap and meta["capped"] is True
    # both caps: whichever comes first; a cap beyond the corpus reads it all and says it was not reached
    meta = prepare(inputs, tok_file, tmp_path / "both", max_docs=3, max_tokens=int(ends[5]), progress=False)
    assert meta["num_docs"] == 3
    meta = prepare(inputs, tok_file, tmp_path / "all", max_docs=10**6, progress=False)
    assert meta["num_docs"] == len(docs) and meta["capped"] is False
    # the caps are in the fingerprint: the same cap is a no-op, another one redoes the work
    assert prepare(inputs, tok_file, tmp_path / "docs", max_docs=len(docs), progress=False)["skipped"] is True
    meta = prepare(inputs, tok_file, tmp_path / "docs", max_docs=5, progress=False)
    assert meta["skipped"] is False and shard_docs(tmp_path / "docs") == docs[:5]
    with pytest.raises(ValueError, match=r"max_docs must be at least 1"):
        prepare(inputs, tok_file, tmp_path / "x", max_docs=0, progress=False)


def test_cli_glob_caps_and_workers_give_the_in_process_result(tok_file, records, tmp_path):
    """Quoted globs are expanded by minillm; with two worker processes the caps cut at the same document."""
    root, texts = records
    write_corpus(root / "c_parquet" / "d.parquet", texts[::-1], row_group_size=3)
    inputs = sorted((root / "c_parquet").glob("*.parquet"))
    cap = int(np.cumsum([len(d) for d in expected_docs(tok_file, texts + texts[::-1])])[80])
    prepare(inputs, tok_file, tmp_path / "one", max_tokens=cap, progress=False)
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "minillm.prepare", "--tokenizer", str(tok_file), "--input",
                        str(root / "c_parquet" / "*.parquet"), "--out", str(tmp_path / "two"), "--workers", "2",
                        "--max-tokens", str(cap)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    one, two = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "two"))
    assert two["num_docs"] == one["num_docs"] == 81 and two["fingerprint"] == one["fingerprint"]
    assert (tmp_path / "one" / "tokens_00000.bin").read_bytes() == (tmp_path / "two" / "tokens_00000.bin").read_bytes()


# A prepare run in a subprocess that reports how far its resident memory grew while it ran (VmHWM minus the
# VmRSS after its imports; getrusage's ru_maxrss would count the parent's memory at fork).
MEASURED_PREPARE = """
import json, sys
import pyarrow.parquet, zstandard
from minillm.prepare import main
def status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
before = status_mb("VmRSS")
main(sys.argv[1:])
print(json.dumps({"before_mb": before, "grew_mb": status_mb("VmHWM") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_memory_stays_bounded_whatever_the_corpus_size(tok_file, tmp_path):
    """256 MB of documents as Parquet and as .jsonl.zst, prepared with two workers: the main process grows by
    under 64 MB (a reader that held a file, or a queue that held the corpus, would grow by 256 MB), and both
    give the shards of the same corpus as plain .jsonl. To keep this fast, 4,000 of the documents are ~80 KB of
    random Unicode whitespace: read, decompressed, parsed and sent to the workers like any other (and hard to
    compress), but skipped as empty before tokenizing; 4,000 real documents are interleaved with them."""
    rng, nprng = random.Random(4), np.random.default_rng(4)
    real = [sentence(rng) for _ in range(4000)]
    spaces = np.array(list(" \u00a0\u0085"))  # space, no-break space, next line: 1.7 bytes and 1.6 bits each
    pads = ["".join(spaces[nprng.integers(0, 3, 3 << 13)]) for _ in range(16)]  # 16 pads of ~40 KB
    texts = [t for i, r in enumerate(real) for t in (r, pads[i % 16] + pads[(i // 16) % 16])]
    assert sum(len(t.encode()) for t in texts) > 256e6
    write_corpus(tmp_path / "big.parquet", texts, row_group_size=64, use_dictionary=False)  # row groups of ~2.6 MB
    with open(tmp_path / "big.jsonl", "w", encoding="utf-8") as f:
        f.writelines('{"text": "%s"}\n' % t for t in texts)  # (no quotes, backslashes or controls to escape)
    with open(tmp_path / "big.jsonl", "rb") as f, open(tmp_path / "big.jsonl.zst", "wb") as out:
        zstandard.ZstdCompressor(level=1).copy_stream(f, out)
    want = prepare([tmp_path / "big.jsonl"], tok_file, tmp_path / "jsonl", progress=False)
    assert want["num_docs"] == 4000 and want["skipped_empty_docs"] == 4000
    assert shard_docs(tmp_path / "jsonl") == expected_docs(tok_file, real)
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    for name in ("big.parquet", "big.jsonl.zst"):
        r = subprocess.run([sys.executable, "-c", MEASURED_PREPARE, "--tokenizer", str(tok_file), "--input",
                            str(tmp_path / name), "--out", str(tmp_path / name.replace(".", "_")), "--workers", "2"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        grew = json.loads(r.stdout.strip().splitlines()[-1])["grew_mb"]
        assert grew < 64, f"{name}: the main process grew by {grew:.0f} MB"
        assert (tmp_path / name.replace(".", "_") / "tokens_00000.bin").read_bytes() == \
            (tmp_path / "jsonl" / "tokens_00000.bin").read_bytes()


def test_long_documents_are_split_at_whitespace_into_consecutive_documents(tok_file, tmp_path, capsys):
    """--max-doc-chars 1000: a 3,500-character line becomes documents of at most 1,000 characters, each cut at
    the last whitespace of its second half, which together are the line; a line without whitespace is cut at
    1,000; short lines are untouched; worker processes give the same shards; the warning counts the lines."""
    rng = random.Random(7)
    long_line = " ".join(sentence(rng, 100, 100) for _ in range(6))[:3500]
    no_space = "x" * 2500
    lines = [sentence(rng), long_line, no_space, sentence(rng)]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare([tmp_path / "c.txt"], tok_file, tmp_path / "one", max_doc_chars=1000, progress=False)
    pieces = split_long_text(long_line, 1000)
    assert " ".join(pieces) == long_line and all(500 <= len(p) <= 1000 for p in pieces[:-1]) and len(pieces) == 4
    want = [lines[0], *pieces, no_space[:1000], no_space[1000:2000], no_space[2000:], lines[3]]
    assert shard_docs(tmp_path / "one") == expected_docs(tok_file, want)
    assert meta["split_long_docs"] == 2 and meta["num_docs"] == len(want) and meta["skipped_empty_docs"] == 0
    assert "warning: one: 2 document(s) longer than --max-doc-chars 1,000 were each stored as several" in \
        capsys.readouterr().out
    prepare([tmp_path / "c.txt"], tok_file, tmp_path / "two", max_doc_chars=1000, workers=2, progress=False)
    assert shard_docs(tmp_path / "two") == shard_docs(tmp_path / "one")
    prepare([tmp_path / "c.txt"], tok_file, tmp_path / "whole", max_doc_chars=0, progress=False)
    assert shard_docs(tmp_path / "whole") == expected_docs(tok_file, lines)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_one_huge_line_is_prepared_in_a_fraction_of_the_memory(tok_file, tmp_path):
    """A 7.5 MB single-line document, one process: tokenized whole (--max-doc-chars 0) the process grows by ~50x
    the line (the tokenizer's working memory, the control that the measurement sees it); split at the default 1M
    characters it grows by under 20x (reading the line, and its token arrays) and under 40% of the control."""
    rng = random.Random(8)
    line = " ".join(rng.choice(WORDS) for _ in range(1_400_000))
    (tmp_path / "long.txt").write_text(line + "\n", encoding="utf-8")
    size_mb = len(line) / 2**20
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    grew = {}
    for max_chars in ("0", "1000000"):
        r = subprocess.run([sys.executable, "-c", MEASURED_PREPARE, "--tokenizer", str(tok_file), "--input",
                            str(tmp_path / "long.txt"), "--out", str(tmp_path / f"out{max_chars}"), "--workers", "1",
                            "--max-doc-chars", max_chars], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        grew[max_chars] = json.loads(r.stdout.strip().splitlines()[-1])["grew_mb"]
    assert grew["0"] > 30 * size_mb, grew
    assert grew["1000000"] < 20 * size_mb and grew["1000000"] < 0.4 * grew["0"], grew
    assert TokenShards(tmp_path / "out1000000").meta["num_docs"] == 8


def test_a_corpus_the_tokenizer_cannot_cover_is_warned_of(tmp_path, capsys):
    """A sentencepiece model without byte fallback trained on Latin text: a corpus with 2% Cyrillic words gets
    <unk> for them, and prepare says which share; the same corpus without them prepares silently."""
    rng = random.Random(9)
    (tmp_path / "train.txt").write_text("\n".join(sentence(rng) for _ in range(300)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=50, byte_fallback=False, character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "plain.model"))
    latin = [sentence(rng, 20, 20) for _ in range(50)]
    mixed = [t if i % 2 else t + " жук" for i, t in enumerate(latin)]
    for name, texts in (("latin", latin), ("mixed", mixed)):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        meta = prepare([tmp_path / f"{name}.txt"], tmp_path / "plain.model", tmp_path / name, progress=False)
        ids = [i for t in texts for i in sp.encode(t)]
        assert meta["unknown_tokens"] == ids.count(sp.unk_id())  # the oracle: sentencepiece itself
    out = capsys.readouterr().out
    share = meta["unknown_tokens"] / meta["num_text_tokens"]
    assert 0.01 < share and f"warning: mixed: {share:.1%} of the tokens are the unknown token (id 0)" in out
    assert "latin:" not in out


def test_only_its_own_shards_are_ever_removed(tok_file, corpus, tmp_path):
    """A re-run with fewer shards removes the shards its meta.json listed, never a user's file whatever its name."""
    inputs, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    mine = {"tokens_notes.txt": "my notes", "tokens_plan.tmp": "draft", "tokens_00099.bin": "not from prepare"}
    for name, text in mine.items():
        (out / name).write_text(text)
    many = prepare(inputs, tok_file, out, text_field="body", shard_tokens=64, progress=False)
    assert len(many["shards"]) > 1
    few = prepare(inputs, tok_file, out, text_field="body", shard_tokens=10**6, progress=False)
    assert len(few["shards"]) == 1
    listed = {name for s in few["shards"] for name in (s["bin"], s["idx"])}
    assert {p.name for p in out.iterdir()} == listed | set(mine) | {"meta.json"}
    assert all((out / name).read_text() == text for name, text in mine.items())
