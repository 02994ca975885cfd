"""Corpora -> token shards: tokenize text files in worker processes into a directory that
`minillm.pretrain_data` reads (layout: see there).

    python -m minillm.prepare --tokenizer TOKENIZER_DIR --input 'et/*.parquet' --out tok/et --workers 16
    python -m minillm.prepare info tok/et

Inputs are read by minillm.corpora (text, JSONL, Parquet; .gz/.zst; files, directories, globs), streamed in
chunks of about 1 MB that worker processes parse and tokenize; results come back in input order, so the
output does not depend on the number of workers, and --max-docs / --max-tokens cut it at the same document.
Atomicity: shards are written under `*.tmp` names, so bad input found anywhere (or a kill) leaves the
previous output untouched; only after every input was read does the commit remove meta.json, rename the
shards into place and write the new meta.json. Re-running with the same inputs (path, size, mtime),
tokenizer (sha256) and options is a no-op, detected via meta.json.
Documents are stored as BOS + tokens + EOS, or tokens + EOS for a tokenizer without a BOS (Qwen2); meta.json
says which ("document_layout") and holds the tokenizer's bos_id (null then) and eos_id.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from tqdm import tqdm

from minillm.corpora import CHUNK_BYTES, CorpusOptions, check_readable, chunk_texts, corpus_format, expand_inputs, iter_chunks
from minillm.decontaminate import Decontaminator, EvalIndex, format_report, write_report
from minillm.files import atomic_write, to_json
from minillm.options import cli, parse_options, require_option
from minillm.pretrain_data import FORMAT, FORMAT_VERSION, META_FILE, TokenShards, shard_names, token_dtype
from minillm.tokenizer import load_tokenizer

DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard; documents never straddle shards
UNKNOWN_SHARE_WARNING = 0.01  # more unknown tokens than this share of a corpus: the tokenizer does not fit it
JOBS_PER_WORKER = 2  # chunks in flight per worker process (each about corpora.CHUNK_BYTES of text)

# ============================================================================ tokenizing (worker processes)
DEFAULT_MAX_DOC_CHARS = 1_000_000  # longer documents are split: a tokenizer needs ~50x a text's size while encoding it
_worker_tokenizer = None
_worker_max_doc_chars = DEFAULT_MAX_DOC_CHARS
_worker_eval_index = None  # --decontaminate: the evaluation sets' n-gram hashes (minillm.decontaminate)


def _init_worker(tokenizer_path: str, max_doc_chars: int, in_pool: bool = False, eval_index=None):
    global _worker_tokenizer, _worker_max_doc_chars, _worker_eval_index
    _worker_eval_index = eval_index
    if in_pool:  # one thread per worker process: the processes are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)  # each process loads its own copy; nothing is pickled
    _worker_max_doc_chars = max_doc_chars


def split_long_text(text: str, max_chars: int) -> list[str]:
    """`text` in consecutive pieces of at most max_chars characters, each cut at the last whitespace of its second
    half (dropped, as a document's edges carry none), or at max_chars where that half has none."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = max(text.rfind(space, start + max_chars // 2, end) for space in (" ", "\n", "\t"))
        pieces.append(text[start:cut] if cut > start else text[start:end])
        start = cut + 1 if cut > start else end
    pieces.append(text[start:])
    return pieces


def _encode_documents(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """texts -> (one flat int32 array of [BOS] + ids + EOS per text, the lengths), built with numpy (a Python loop
    over every id is the slow part)."""
    ids = tok.encode_batch(texts, num_threads=1) if texts else []
    has_bos = tok.bos_id is not None
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1 + has_bos
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)  # half the bytes to pickle back
    is_text = np.ones(len(flat), dtype=bool)
    is_text[ends - 1] = False
    flat[ends - 1] = tok.eos_id
    if has_bos:
        is_text[ends - lengths] = False
        flat[ends - lengths] = tok.bos_id
    flat[is_text] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(is_text.sum()))
    return flat, lengths


def _tokenize_chunk(chunk) -> dict:
    """Parse and tokenize a corpora.Chunk; returns its non-empty documents as one flat array plus lengths,
    their word counts, the index among the chunk's records each came from (a record longer than the worker's
    max_doc_chars gives several documents) and how many tokens are the unknown token."""
    texts = chunk_texts(chunk)
    limit = _worker_max_doc_chars
    docs, record_of = [], []
    overlap = Decontaminator(_worker_eval_index) if _worker_eval_index is not None else None
    keep = overlap.keep_batch(texts) if overlap is not None else None  # False: shares an n-gram with an evaluation set
    for i, text in enumerate(texts):
        if not text or text.isspace():  # no strip(): it would copy every text
            continue
        if keep is not None and not keep[i]:
            continue
        pieces = split_long_text(text, limit) if limit and len(text) > limit else [text]
        docs += pieces
        record_of += [i] * len(pieces)
    n_records = len(texts)
    del texts
    # Encode in groups of about a chunk's text: the tokenizer's working memory stays bounded whatever one
    # record holds (one long line is one chunk).
    budget, groups, size = max(CHUNK_BYTES, limit), [[]], 0
    for text in docs:
        if groups[-1] and size + len(text) > budget:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += len(text)
    encoded = [_encode_documents(_worker_tokenizer, group) for group in groups]
    flat = np.concatenate([f for f, _ in encoded]) if encoded else np.empty(0, np.int32)
    lengths = np.concatenate([n for _, n in encoded]) if encoded else np.empty(0, np.int64)
    unk_id = getattr(_worker_tokenizer, "unk_id", None)
    words = np.fromiter((len(t.split()) for t in docs), dtype=np.int64, count=len(docs))
    return {"tokens": flat, "lengths": lengths, "words": words, "kept": np.array(record_of, dtype=np.int64),
            "records": n_records, "unknown": int((flat == unk_id).sum()) if unk_id is not None else 0,
            "overlap": overlap.report() if overlap is not None else None}


def _jobs(inputs, fmt, text_field, txt_docs):
    """Every input's chunks, each with the bytes of its file it moves the progress bar by."""
    for path in inputs:
        done = 0
        for chunk, pos in iter_chunks(path, fmt, text_field, txt_docs):
            yield chunk, pos - done
            done = pos


def _docs_within_caps(lengths: np.ndarray, n_docs: int, n_tokens: int, max_docs, max_tokens) -> int:
    """How many of a result's documents to keep: all, or those up to the one that reaches a cap."""
    keep = len(lengths)
    if max_docs is not None:
        keep = min(keep, max_docs - n_docs)
    if max_tokens is not None:
        keep = min(keep, int(np.searchsorted(np.cumsum(lengths), max_tokens - n_tokens)) + 1)
    return keep


def _run_jobs(jobs, tok, tokenizer_path: str, workers: int, max_doc_chars: int, eval_index=None):
    """Results of _tokenize_chunk in input order. workers <= 1: here, with `tok` (already loaded); workers > 1:
    a process pool, each loading tokenizer_path, with a bounded window of jobs in flight (Pool.imap would
    read the whole corpus into its queue)."""
    global _worker_tokenizer, _worker_max_doc_chars, _worker_eval_index
    if workers <= 1:
        _worker_tokenizer, _worker_max_doc_chars, _worker_eval_index = tok, max_doc_chars, eval_index
        for job, nbytes in jobs:
            yield _tokenize_chunk(job), nbytes
        return
    # spawn: workers start clean (no forked torch/OpenMP state); they import this module and load the model.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, max_doc_chars, True, eval_index)) as pool:
        window = deque()
        for job, nbytes in jobs:
            window.append((pool.apply_async(_tokenize_chunk, (job,)), nbytes))
            if len(window) >= JOBS_PER_WORKER * workers:
                result, n = window.popleft()
                yield result.get(), n
        while window:
            result, n = window.popleft()
            yield result.get(), n


# ============================================================================ writing shards

class ShardWriter:
    """Appends documents to `tokens_XXXXX.bin.tmp` files; close() returns the shard list, abort() cleans up.
    Nothing under a final name is touched until commit_shards()."""

    def __init__(self, out_dir, dtype, vocab_size: int, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        self.out_dir, self.dtype, self.vocab_size = Path(out_dir), np.dtype(dtype), vocab_size
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self.tmp_files: list[Path] = []
        self._file = None
        self._offsets: list[np.ndarray] = []
        self._length = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray):
        """Append documents given as one flat id array and their lengths."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token id {int(tokens.max())} outside the vocabulary (size {self.vocab_size})")
        if np.iinfo(self.dtype).max < self.vocab_size - 1:
            raise ValueError(f"dtype {self.dtype} cannot hold ids of a {self.vocab_size}-piece vocabulary")
        starts = np.concatenate([[0], np.cumsum(lengths)])
        i = 0
        while i < len(lengths):
            if self._file is None:
                self._open()
            # whole documents until the shard reaches shard_tokens (so it may exceed it by part of one)
            room = self.shard_tokens - self._length
            j = min(len(lengths), max(i + 1, int(np.searchsorted(starts, starts[i] + room, side="left"))))
            self._file.write(tokens[starts[i]:starts[j]].astype(self.dtype).tobytes())
            self._offsets.append(self._length + starts[i:j] - starts[i])
            self._length += int(starts[j] - starts[i])
            i = j
            if self._length >= self.shard_tokens:
                self._close_shard()

    def _open(self):
        bin_name, _ = shard_names(len(self.shards))
        tmp = self.out_dir / (bin_name + ".tmp")
        self.tmp_files.append(tmp)
        self._file = open(tmp, "wb")
        self._offsets, self._length = [], 0

    def _close_shard(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        bin_name, idx_name = shard_names(len(self.shards))
        idx = np.concatenate(self._offsets + [np.array([self._length], dtype=np.int64)]).astype(np.int64)
        tmp = self.out_dir / (idx_name + ".tmp")
        self.tmp_files.append(tmp)
        with open(tmp, "wb") as f:  # np.save to a file object: it would append .npy to a path
            np.save(f, idx)
            f.flush()
            os.fsync(f.fileno())
        self.shards.append({"bin": bin_name, "idx": idx_name, "num_docs": len(idx) - 1,
                            "num_tokens": self._length})

    def close(self) -> list[dict]:
        if self._file is not None:
            self._close_shard()
        return self.shards

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        for p in self.tmp_files:
            p.unlink(missing_ok=True)


def commit_shards(out_dir, shards: list[dict], meta: dict):
    """Put finished .tmp shards in place and write meta.json last.

    meta.json goes first so that no moment exists where an old meta describes new (or half-renamed) shards;
    shards of an older, larger run that are no longer listed are removed: only those its meta.json listed
    (the directory may hold other files of the user's, whatever their names)."""
    out_dir = Path(out_dir)
    old = set()
    try:
        old = {name for s in json.loads((out_dir / META_FILE).read_text())["shards"] for name in (s["bin"], s["idx"])
               if isinstance(name, str) and Path(name).name == name}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no (readable) manifest: nothing is known to be ours
    (out_dir / META_FILE).unlink(missing_ok=True)
    keep = set()
    for s in shards:
        for name in (s["bin"], s["idx"]):
            os.replace(out_dir / (name + ".tmp"), out_dir / name)
            keep.add(name)
    for name in old - keep:
        (out_dir / name).unlink(missing_ok=True)
    atomic_write(out_dir / META_FILE, to_json({**meta, "shards": shards}))


def _remove_leftovers(out_dir: Path):
    """Temp files of a killed run; never read, removed so they do not pile up."""
    for p in out_dir.glob("tokens_*.tmp"):  # only the names this tool writes (tokens_00000.bin.tmp, ...)
        if re.fullmatch(r"tokens_\d{5}\.(bin|idx\.npy)\.tmp", p.name):
            p.unlink(missing_ok=True)
    (out_dir / (META_FILE + ".tmp")).unlink(missing_ok=True)


# ============================================================================ prepare (the CLI's work)

def _fingerprint(inputs, tokenizer_sha256: str, dtype, **options) -> dict:
    """What the output depends on. Inputs are identified by path, size and mtime (hashing a 100 GB corpus to
    decide that nothing changed would cost as much as tokenizing it); the tokenizer by its sha256 (of
    tokenizer.model, or of tokenizer.json and the special tokens its configs name); then the reading options
    and caps."""
    files = []
    for p in inputs:
        st = os.stat(p)
        files.append({"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"version": FORMAT_VERSION, "inputs": files, "tokenizer_sha256": tokenizer_sha256,
            "dtype": np.dtype(dtype).name, **options}


def _up_to_date(out_dir: Path, fingerprint: dict) -> dict | None:
    """The existing meta when out_dir already holds exactly this preparation, intact."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    for s in meta.get("shards", []):
        bin_file = out_dir / s["bin"]
        if not (out_dir / s["idx"]).is_file() or not bin_file.is_file() or \
                bin_file.stat().st_size != s["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None
    return meta


def prepare(inputs, tokenizer, out_dir, *, fmt: str = "auto", text_field: str = "text", txt_docs: str = "line",
            workers: int = 1, name: str | None = None, dtype=None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            max_docs: int | None = None, max_tokens: int | None = None, max_doc_chars: int = DEFAULT_MAX_DOC_CHARS,
            progress: bool = True, decontaminate=()) -> dict:
    """Tokenize `inputs` (files, directories, glob patterns: corpora.expand_inputs) with `tokenizer` (a
    tokenizer directory, or a tokenizer.model / tokenizer.json file: minillm.tokenizer.load_tokenizer) into
    shards in `out_dir`. Returns the meta dict (with "skipped": True when nothing had to be done).
    dtype: None = uint16 when the vocabulary fits, else uint32.
    max_docs / max_tokens: stop after that many (non-empty) documents / at the first document end at or past
    that many tokens (BOS and EOS included); None = read everything. See the module docstring for the layout.
    max_doc_chars: a longer document is stored as consecutive documents of at most that many characters (cut at
    whitespace; said in a warning), so that memory stays bounded whatever one line holds; 0 = never split.
    workers > 1 starts 'spawn' processes: a script calling this must guard its entry point with
    `if __name__ == "__main__":` (the CLI does).
    decontaminate: task files / directories (minillm.decontaminate); documents sharing a 13-gram or a whole
    short sentence with them are dropped, counted in meta's "decontamination" and in OUT_DIR.decontamination.json."""
    inputs = expand_inputs(inputs, fmt)
    if not inputs:
        raise ValueError("no input files given")
    if txt_docs not in ("line", "paragraph"):
        raise ValueError(f"txt_docs must be 'line' or 'paragraph', got {txt_docs!r}")
    if max_doc_chars < 0:
        raise ValueError(f"max_doc_chars must be >= 0 (0 = never split a document), got {max_doc_chars}")
    for cap, value in (("max_docs", max_docs), ("max_tokens", max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{cap} must be at least 1 (or None for no cap), got {value}")
    for p in inputs:
        check_readable(p, fmt, text_field)
    tok = load_tokenizer(tokenizer)
    eval_index = EvalIndex(decontaminate) if decontaminate else None  # before anything is written: bad task files stop here
    overlap = Decontaminator(eval_index) if eval_index is not None else None
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    name = name or out_dir.name
    fingerprint = _fingerprint(inputs, tok.sha256(), dtype, format=fmt, text_field=text_field, txt_docs=txt_docs,
                               shard_tokens=shard_tokens, max_docs=max_docs, max_tokens=max_tokens,
                               max_doc_chars=max_doc_chars, decontaminate=sorted(map(str, decontaminate)))
    if (meta := _up_to_date(out_dir, fingerprint)) is not None:
        if progress:
            print(f"{out_dir}: up to date (same inputs, tokenizer and options); nothing to do")
        return {**meta, "skipped": True}

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir}: exists and is not a directory")
    created = not out_dir.exists()  # removed again if this run fails: a failed start leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    writer = ShardWriter(out_dir, dtype, tok.vocab_size, shard_tokens)
    n_docs = n_tokens = n_words = n_skipped = n_split = n_unknown = 0
    unk_id = getattr(tok, "unk_id", None)
    capped = False
    t0 = time.time()
    bar = tqdm(total=sum(f["size"] for f in fingerprint["inputs"]), unit="B", unit_scale=True,
               desc=f"tokenizing {name}", disable=not progress or not sys.stderr.isatty(), dynamic_ncols=True)
    results = _run_jobs(_jobs(inputs, fmt, text_field, txt_docs), tok, str(tokenizer), workers, max_doc_chars,
                        eval_index)
    try:
        for result, nbytes in results:
            tokens, lengths, words = result["tokens"], result["lengths"], result["words"]
            keep = _docs_within_caps(lengths, n_docs, n_tokens, max_docs, max_tokens)
            records = result["kept"]  # the record each document came from (a split record gives several)
            if keep < len(lengths):  # a cap cuts this chunk: its first `keep` documents are the last ones
                tokens, lengths, words = tokens[:int(lengths[:keep].sum())], lengths[:keep], words[:keep]
                n_skipped += int(records[keep - 1]) + 1 - len(np.unique(records[:keep]))
            else:
                n_skipped += result["records"] - len(np.unique(records))
            if overlap is not None:  # dropped documents are not empty ones
                overlap.merge(result["overlap"])
                n_skipped -= result["overlap"]["overlapping"]
            n_split += int((np.unique(records[:keep], return_counts=True)[1] > 1).sum())
            n_unknown += result["unknown"] if keep == len(result["lengths"]) else int((tokens == unk_id).sum())
            writer.add(tokens, lengths)
            n_docs += len(lengths)
            n_tokens += len(tokens)
            n_words += int(words.sum())
            bar.update(nbytes)
            bar.set_postfix(docs=f"{n_docs:,}", tokens=f"{n_tokens:,}", refresh=False)
            capped = n_docs == max_docs or (max_tokens is not None and n_tokens >= max_tokens)
            if capped:
                break  # the rest is never read; closing `results` stops the workers
        if n_docs == 0:
            fields = {corpus_format(p, fmt)[0] for p in inputs} - {"text"}
            raise ValueError(f"{', '.join(map(str, inputs))}: empty corpus (no non-empty documents"
                             + (f" in field '{text_field}'" if fields else "") + ")")
        shards = writer.close()
    except BaseException:
        writer.abort()
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        results.close()  # stops the worker pool now, also on error
        bar.close()
    has_bos = tok.bos_id is not None
    text_tokens = n_tokens - (1 + has_bos) * n_docs  # without each document's BOS and EOS
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "dtype": dtype.name,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "document_layout": "BOS + tokens + EOS" if has_bos else "tokens + EOS",
            "tokenizer": {"path": str(Path(tokenizer).resolve()), "sha256": fingerprint["tokenizer_sha256"]},
            "fingerprint": fingerprint, "num_docs": n_docs, "num_tokens": n_tokens,
            "num_text_tokens": text_tokens, "num_words": n_words,
            "tokens_per_word": text_tokens / max(n_words, 1), "skipped_empty_docs": n_skipped,
            "max_docs": max_docs, "max_tokens": max_tokens, "capped": capped, "max_doc_chars": max_doc_chars,
            "split_long_docs": n_split, "unknown_tokens": n_unknown, "seconds": round(time.time() - t0, 3),
            "decontamination": overlap.report() if overlap is not None else None}
    commit_shards(out_dir, shards, meta)
    meta["shards"] = shards
    if n_split:
        print(f"warning: {name}: {n_split:,} document(s) longer than --max-doc-chars {max_doc_chars:,} were each "
              "stored as several consecutive documents (cut at whitespace)")
    if n_unknown > UNKNOWN_SHARE_WARNING * text_tokens:
        print(f"warning: {name}: {n_unknown / max(text_tokens, 1):.1%} of the tokens are the unknown token "
              f"(id {unk_id}): the tokenizer does not cover this corpus's characters; extend it "
              "(python -m minillm.vocab extend) or use one with byte fallback")
    if overlap is not None:
        write_report(out_dir, meta["decontamination"])
        print(format_report(meta["decontamination"]))
    if progress:
        print(summary_line(meta, out_dir))
    return {**meta, "skipped": False}


def summary_line(meta: dict, out_dir) -> str:
    return (f"{meta['name']}: {meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens "
            f"({meta.get('num_text_tokens', meta['num_tokens']):,} without BOS/EOS), "
            f"{meta.get('num_words', 0):,} words, {meta.get('tokens_per_word', 0):.3f} tokens/word "
            f"-> {out_dir} ({len(meta['shards'])} shard(s), {meta['dtype']})")




# ============================================================================ CLI

@dataclass(kw_only=True)
class PrepareOptions(CorpusOptions):
    """Tokenize text corpora into a token shard directory."""
    tokenizer: str  # tokenizer directory (tokenizer.model or tokenizer.json), or one of those files
    out: str  # output directory
    max_docs: int = 0  # stop after this many non-empty documents (the first ones, in input order); 0 = all
    max_tokens: int = 0  # stop at the first document end at or past this many tokens (BOS/EOS included); 0 = all
    max_doc_chars: int = DEFAULT_MAX_DOC_CHARS  # store a longer document as several (cut at whitespace, with a warning): bounds memory; 0 = never split
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, 16)))  # tokenizer processes
    name: str = ""  # name of this source in the summary; '' = the output directory's name
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # tokens per shard (about: documents never straddle shards)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # token dtype on disk; auto = uint16 when the vocabulary fits
    decontaminate: list[str] = field(default_factory=list)  # task files / directories (evaluate.py --tasks): drop documents overlapping them (minillm.decontaminate)

    def check(self):
        require_option(self.workers >= 1, "workers", self.workers, "must be at least 1")
        require_option(self.shard_tokens >= 1, "shard_tokens", self.shard_tokens, "must be at least 1")
        require_option(self.max_docs >= 0, "max_docs", self.max_docs, "must be >= 0 (0 = no cap)")
        require_option(self.max_tokens >= 0, "max_tokens", self.max_tokens, "must be >= 0 (0 = no cap)")
        require_option(self.max_doc_chars >= 0, "max_doc_chars", self.max_doc_chars, "must be >= 0 (0 = never split)")


@dataclass(kw_only=True)
class InfoOptions:
    """Print the summary of a prepared directory (`info DIR` or `info --dir DIR`)."""
    POSITIONAL: ClassVar[str] = "dir"  # the one argument that may be given without its flag
    dir: str  # a directory written by `prepare`


@cli
def main(argv=None):
    command, cfg = parse_options({"prepare": PrepareOptions, "info": InfoOptions}, argv, prog="python -m minillm.prepare",
                                 description=__doc__.split("\n\n")[0])
    if command == "info":
        print(summary_line(TokenShards(cfg.dir).meta, cfg.dir))
        return
    prepare(cfg.input, cfg.tokenizer, cfg.out, fmt=cfg.format, text_field=cfg.text_field, txt_docs=cfg.txt_docs,
            workers=cfg.workers, name=cfg.name or None, dtype=None if cfg.dtype == "auto" else cfg.dtype,
            shard_tokens=cfg.shard_tokens, max_docs=cfg.max_docs or None, max_tokens=cfg.max_tokens or None,
            max_doc_chars=cfg.max_doc_chars, decontaminate=cfg.decontaminate)


if __name__ == "__main__":
    main()
