"""Corpus readers (minillm/corpora.py): every format and compression gives back the documents written, in
order; globs and directories; chunking; the tokenizer trainer's CLI reads corpora the same way.
(Bad input and what `prepare` makes of these readers: tests/test_prepare.py.)

Run: .venv/bin/python -m pytest -q tests/test_corpora.py

Oracles: the documents the test wrote with the reference writers (json, gzip, zstandard, pyarrow), and for the
tokenizer CLI a tokenizer trained on those documents directly.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minillm
from conftest import write_corpus
from minillm.corpora import check_readable, chunk_texts, corpus_format, expand_inputs, iter_chunks, iter_texts
from minillm.tokenizer import SentencePieceTokenizer

DOCS = ["Tere, maailm!", "  leading spaces and trailing  ", "õun ja öö, šokolaad ja žürii", "中文 and emoji 🙂",
        "quotes \" and \\ backslashes", "tabs\tinside"] + [f"document {i} " + "sõna " * (i % 7) for i in range(40)]
MULTILINE = ["first line\nsecond line", "a\n\nb"]  # JSONL and Parquet documents may hold newlines


@pytest.mark.parametrize("name", ["c.jsonl", "c.ndjson", "c.jsonl.gz", "c.jsonl.zst", "c.jsonl.zstd", "c.parquet"])
def test_every_record_format_gives_the_documents_written(tmp_path, name):
    docs = DOCS + MULTILINE
    path = write_corpus(tmp_path / name, docs, field="body", row_group_size=7, zstd_frames=3)
    check_readable(path, text_field="body")
    assert list(iter_texts([path], text_field="body")) == docs
    # small chunks: same documents, progress rising to the file's size, Parquet chunks know their first row
    chunks = list(iter_chunks(path, text_field="body", chunk_bytes=40))
    assert len(chunks) > 5
    assert [t for chunk, _ in chunks for t in chunk_texts(chunk)] == docs
    positions = [pos for _, pos in chunks]
    assert positions == sorted(positions) and positions[-1] == path.stat().st_size
    if name.endswith(".parquet"):
        assert [c.start for c, _ in chunks] == [sum(len(a) for c2, _ in chunks[:i] for a in c2.records)
                                                for i in range(len(chunks))]


@pytest.mark.parametrize("name", ["c.txt", "c.text", "c.txt.gz", "c.txt.zst"])
def test_text_files_lines_and_paragraphs(tmp_path, name):
    path = write_corpus(tmp_path / name, ["one", "two", "", "three", "", "", "four"], zstd_frames=2)
    assert list(iter_texts([path])) == ["one", "two", "three", "four"]  # blank lines are not documents
    assert list(iter_texts([path], txt_docs="paragraph")) == ["one\ntwo", "three", "four"]


def test_format_from_the_name_or_given(tmp_path):
    assert corpus_format("a/b.JSONL.ZST") == ("jsonl", "zstd")
    assert corpus_format("b.txt.gz") == ("text", "gzip")
    assert corpus_format("b.parquet") == ("parquet", "")
    assert corpus_format("train.et", "text") == ("text", "")
    assert corpus_format("dump.json.gz", "jsonl") == ("jsonl", "gzip")  # C4 / mC4 name their JSON Lines .json.gz
    with pytest.raises(ValueError, match=r"^train\.et: unknown input format .* --format text\|jsonl\|parquet$"):
        corpus_format("train.et")
    with pytest.raises(ValueError, match=r"^x\.parquet\.gz: a compressed Parquet file cannot be streamed"):
        corpus_format("x.parquet.gz")
    path = write_corpus(tmp_path / "train.txt", ["tere", "maailm"]).rename(tmp_path / "train.et")
    assert list(iter_texts([path], fmt="text")) == ["tere", "maailm"]


def test_inputs_from_globs_and_directories(tmp_path):
    d = tmp_path / "data"
    for rel in ["b/2.jsonl.zst", "b/10.jsonl", "a.parquet", "a.txt", "c/d/e.txt.gz", "notes.md", ".hidden.txt",
                "_SUCCESS", ".cache/x.txt", "_tmp/y.txt", "b/README"]:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("x\n")
    # a directory: every corpus name, recursively, sorted; never hidden or underscore names, never other names
    names = lambda paths: [str(p.relative_to(d)) for p in paths]  # noqa: E731
    assert names(expand_inputs([d])) == ["a.parquet", "a.txt", "b/10.jsonl", "b/2.jsonl.zst", "c/d/e.txt.gz"]
    # with an explicit format every file counts (a text corpus of .et files)
    assert names(expand_inputs([d / "b"], "text")) == ["b/10.jsonl", "b/2.jsonl.zst", "b/README"]
    # patterns: what they match (like a shell: dot names only when spelt out), sorted, ** at any depth;
    # matched directories expand; the order given is kept
    assert names(expand_inputs([str(d / "**" / "*.txt*")])) == ["_tmp/y.txt", "a.txt", "c/d/e.txt.gz"]
    assert names(expand_inputs([str(d / "b" / "*"), str(d / "a.*")])) == [
        "b/10.jsonl", "b/2.jsonl.zst", "b/README", "a.parquet", "a.txt"]
    assert names(expand_inputs([str(d / "[bc]")])) == ["b/10.jsonl", "b/2.jsonl.zst", "c/d/e.txt.gz"]
    # an existing file is itself even when its name looks like a pattern
    odd = d / "odd[1].txt"
    odd.write_text("x\n")
    assert expand_inputs([odd]) == [odd]
    with pytest.raises(ValueError, match=r"nothing\*\.parquet: no files match$"):
        expand_inputs([str(d / "nothing*.parquet")])
    (tmp_path / "empty" / ".git").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty: no corpus files in this directory \(names: \.txt"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match=r"a\.txt: named twice in the inputs \(also as .*a\.txt\)"):
        expand_inputs([d / "a.txt", str(d / "*.txt")])


def test_tokenizer_cli_trains_on_a_parquet_glob_like_on_the_documents(tmp_path):
    """`python -m minillm.tokenizer train` reads corpora through the same readers (quoted glob, Parquet,
    --text-field): the model equals one trained on the same documents given as a list."""
    docs = [f"{w} " * 3 + w.upper() for w in "tere maailm kass koer maja suur väike ilus päev öö".split()] * 30
    write_corpus(tmp_path / "p-1.parquet", docs[:150], field="body", row_group_size=16)
    write_corpus(tmp_path / "p-2.parquet", docs[150:], field="body", row_group_size=16)
    env = {**os.environ, "PYTHONPATH": str(Path(minillm.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "minillm.tokenizer", "train", "--input", str(tmp_path / "p-*.parquet"),
                        "--text-field", "body", "--vocab-size", "320", "--out", str(tmp_path / "cli")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    direct = SentencePieceTokenizer.train(iter(docs), tmp_path / "direct", 320)
    assert (tmp_path / "cli" / "tokenizer.model").read_bytes() == direct.model_proto


def test_a_fifo_among_the_inputs_is_refused_not_read_forever(tmp_path):
    import os
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("tere\n")
    os.mkfifo(d / "b.txt")
    with pytest.raises(ValueError, match=r"b\.txt: not a regular file \(a FIFO"):
        expand_inputs([d])
    with pytest.raises(ValueError, match=r"b\.txt: not a regular file"):
        expand_inputs([d / "b.txt"])
