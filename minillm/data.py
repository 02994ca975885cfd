"""Pretraining data: text corpora -> token shards on disk -> a seeded language mixture -> packed batches.

1. Preparation (`python -m minillm.data prepare ...`, or `prepare()`) tokenizes corpora in worker processes
   into a directory of flat token shards:

       DIR/tokens_00000.bin       all documents of the shard back to back, raw uint16 (when every id of the
                                  tokenizer fits, i.e. vocab_size <= 65536) or uint32, read with np.memmap
       DIR/tokens_00000.idx.npy   int64 offsets of the shard's documents: document i is bin[idx[i]:idx[i+1]]
                                  (num_docs + 1 entries; the last one is the shard's length)
       DIR/meta.json              dtype, vocabulary, tokenizer checksum, inputs (path, size, mtime), shard
                                  list with counts, summary. Written LAST.

   Every document is stored as BOS + tokens + EOS, so concatenating documents is exactly "documents joined
   with EOS and BOS" and a reader never has to know the tokenizer. Input documents:
     .txt    one document per line (default), or per blank-line-separated paragraph (txt_docs='paragraph',
             lines of a paragraph joined with '\n'); whitespace-only lines/paragraphs are skipped.
     .jsonl  one JSON object per line; the document is its `text_field` (default "text"). Blank lines are
             skipped; a line that is not JSON, not an object, lacks the field, or whose field is not a string
             is an error naming file and line. Empty texts are skipped (and counted).
     both may be gzip'd (name ends in .gz).
   Atomicity: shards are written to `*.tmp` names first, so bad input found anywhere (or a kill) leaves the
   previous output untouched; only after every input was read does the commit remove meta.json, rename
   the shards into place, and write the new meta.json. A directory without meta.json is never read (a run
   killed inside the commit leaves no meta, so it is re-prepared, never half-used). Re-running with the
   same inputs (path, size, mtime), tokenizer (sha256) and options is a no-op, detected via meta.json.

2. Mixture. Each named source (a shard directory) is an endless token stream: its documents in a seeded
   random order, concatenated, then the next epoch in a new seeded order. Batches are rows of seq_len
   tokens; each row is cut from ONE source, chosen at random with the mixture weights from a seed. Every
   row consumes exactly seq_len tokens of its source (a row reads seq_len + 1 tokens and the next row of
   that source starts at the last of them, so every token is a target exactly once), hence the weights are
   shares of TOKENS (LLAMMAS' 75% Estonian / 25% English is a token share), not of documents.

3. Data parallelism. All rows form one global sequence, identical for any number of processes; micro-batch
   k of the run is global rows [k*B*W, (k+1)*B*W) for B rows per rank and W ranks, and rank r takes rows
   [k*B*W + r*B, k*B*W + (r+1)*B): global row j of a micro-batch goes to rank j // B. So W ranks with B rows
   each see exactly the rows one process with B*W rows sees (the "2 ranks == 1 process" property), and
   every rank advances the whole stream, reading tokens only for its own rows. The loader position
   (row counter, source offsets) is a small JSON-able dict saved with the checkpoint.

4. Packing. A row is built from seq_len + 1 consecutive stream tokens x: input_ids = x[:-1],
   labels = x[1:] (already shifted: labels[t] is the target at position t; -100 = ignored).
     'concat'    (LLAMMAS): nothing else; position_ids 0..T-1, doc_ids all 0; tokens attend across documents.
     'document': position_ids restart at 0 at every document start in the row (a document continued from
                 the previous row restarts at 0 too), doc_ids number the documents of the row 0, 1, ..., and
                 the label that would predict the first token (BOS) of the next document is -100, so
                 neither attention (the model masks by doc_ids) nor the loss crosses a document boundary.
   Padding (end of a validation set, SFT rows) has input pad_id, label -100 and a doc id of its own.
   `pack_examples` packs SFT examples (issue 4) the same way, several per row.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import time
import zlib
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillm.tokenizer import MODEL_FILE, Tokenizer

FORMAT = "minillm-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard; documents never straddle shards
IGNORE = -100


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id 0..vocab_size-1 fits (Llama-2's 32000, TinyLlama), else uint32 (Llama-3)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_names(i: int) -> tuple[str, str]:
    return f"tokens_{i:05d}.bin", f"tokens_{i:05d}.idx.npy"


# ============================================================================ reading corpora

def input_format(path) -> tuple[str, bool]:
    """('txt' | 'jsonl', gzipped?) from the file name."""
    name = str(path).lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl", gz
    if name.endswith((".txt", ".text")):
        return "txt", gz
    raise ValueError(f"{path}: unknown input format (expected .txt or .jsonl, optionally .gz)")


def check_readable(path):
    """Fail before any work starts when an input cannot be opened (or is not really gzip)."""
    input_format(path)
    try:
        with open(path, "rb") as f:
            if str(path).lower().endswith(".gz"):
                with gzip.GzipFile(fileobj=f) as g:
                    g.read(1)
            else:
                f.read(1)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def iter_records(path, txt_docs: str = "line"):
    """Yield (line_no, raw bytes, bytes_read_so_far) for each candidate document of one file.

    For JSONL the raw bytes are the line (parsed later, in a worker); for text they are the document.
    line_no is 1-based, the first line of the document. bytes_read_so_far counts the file on disk
    (compressed bytes for .gz) for the progress bar.
    """
    fmt, gz = input_format(path)
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            paragraph, first = [], 0
            for line_no, line in enumerate(f, 1):
                blank = not line.strip()
                if fmt == "txt" and txt_docs == "paragraph":
                    if blank:
                        if paragraph:
                            yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph), raw.tell()
                        paragraph = []
                    else:
                        first = first if paragraph else line_no
                        paragraph.append(line)
                elif not blank:
                    yield line_no, line.rstrip(b"\r\n"), raw.tell()
            if paragraph:
                yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph), raw.tell()
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated .gz files
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def record_text(path, line_no: int, raw: bytes, fmt: str, text_field: str) -> str:
    """The document text of one record; ValueError 'path:LINE: ...' on bad input."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start})") from None
    if line_no == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark is not text (and not JSON)
    if fmt == "txt":
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{path}:{line_no}: missing field '{text_field}'")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text


# ============================================================================ tokenizing (worker processes)
_worker_tokenizer: Tokenizer | None = None


def _init_worker(model_file: str):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_file)  # each process loads its own copy; nothing is pickled


def _tokenize_chunk(job) -> dict:
    """Parse and tokenize a chunk of records; returns the documents as one flat array plus lengths."""
    path, fmt, text_field, records = job
    texts = [record_text(path, line_no, raw, fmt, text_field) for line_no, raw in records]
    texts = [t for t in texts if t.strip()]
    tok = _worker_tokenizer
    ids = tok.encode_batch(texts, num_threads=1) if texts else []
    # Each document becomes BOS + ids + EOS; built with numpy (a Python loop over every id is the slow part).
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 2
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)  # half the bytes to pickle back
    is_text = np.ones(len(flat), dtype=bool)
    is_text[ends - lengths] = is_text[ends - 1] = False
    flat[ends - lengths], flat[ends - 1] = tok.bos_id, tok.eos_id
    flat[is_text] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(is_text.sum()))
    return {"tokens": flat, "lengths": lengths, "words": sum(len(t.split()) for t in texts),
            "skipped": len(records) - len(texts)}


def _chunks(inputs, fmt_of, text_field, txt_docs, chunk_bytes=1 << 20):
    """Group records into jobs of about chunk_bytes; yields (job, progress bytes of the job)."""
    for path in inputs:
        fmt = fmt_of[path]
        records, size, last_pos = [], 0, 0
        for line_no, raw, pos in iter_records(path, txt_docs):
            records.append((line_no, raw))
            size += len(raw)
            if size >= chunk_bytes:
                yield (str(path), fmt, text_field, records), pos - last_pos
                records, size, last_pos = [], 0, pos
        final = os.path.getsize(path)
        if records or final > last_pos:
            yield (str(path), fmt, text_field, records), final - last_pos


def _run_jobs(jobs, model_file: str, workers: int):
    """Results of _tokenize_chunk in input order. workers > 1: a process pool with a bounded window of jobs
    in flight (Pool.imap would read the whole corpus into its queue)."""
    if workers <= 1:
        _init_worker(model_file)
        for job, nbytes in jobs:
            yield _tokenize_chunk(job), nbytes
        return
    # spawn: workers start clean (no forked torch/OpenMP state); they import this module and load the model.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model_file,)) as pool:
        window = deque()
        for job, nbytes in jobs:
            window.append((pool.apply_async(_tokenize_chunk, (job,)), nbytes))
            if len(window) >= 2 * workers:
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
    shards of an older, larger run that are no longer listed are removed."""
    out_dir = Path(out_dir)
    (out_dir / META_FILE).unlink(missing_ok=True)
    keep = set()
    for s in shards:
        for name in (s["bin"], s["idx"]):
            os.replace(out_dir / (name + ".tmp"), out_dir / name)
            keep.add(name)
    for p in out_dir.glob("tokens_*"):
        if p.name not in keep:
            p.unlink(missing_ok=True)
    write_json_atomic(out_dir / META_FILE, {**meta, "shards": shards})


def write_json_atomic(path: Path, obj):
    """path + '.tmp', fsync, rename: readers see the old file or the new one (with the usual umask
    permissions, unlike a mkstemp file, so other users of a shared data directory can read it)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_leftovers(out_dir: Path):
    """Temp files of a killed run; never read, removed so they do not pile up."""
    for p in list(out_dir.glob("tokens_*.tmp")) + list(out_dir.glob(META_FILE + ".tmp")):
        p.unlink(missing_ok=True)


def write_shards(out_dir, docs, vocab_size: int, *, dtype=None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 meta: dict | None = None) -> dict:
    """Write already-tokenized documents (an iterable of int sequences, each complete with BOS/EOS if
    wanted) as a shard directory. For synthetic data and tests; corpora go through `prepare`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(vocab_size)
    writer = ShardWriter(out_dir, dtype, vocab_size, shard_tokens)
    n_docs = n_tokens = 0
    try:
        for d in docs:
            d = np.asarray(d, dtype=np.int64)
            if len(d) == 0:
                raise ValueError(f"document {n_docs} is empty")
            writer.add(d, np.array([len(d)]))
            n_docs, n_tokens = n_docs + 1, n_tokens + len(d)
        if n_docs == 0:
            raise ValueError(f"{out_dir}: no documents to write")
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    full = {"format": FORMAT, "version": FORMAT_VERSION, "name": out_dir.name, "dtype": dtype.name,
            "vocab_size": vocab_size, "tokenizer": None, "num_docs": n_docs, "num_tokens": n_tokens,
            **(meta or {})}
    commit_shards(out_dir, shards, full)
    return full


# ============================================================================ prepare (the CLI's work)

def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_tokenizer(path) -> Path:
    path = Path(path)
    model_file = path / MODEL_FILE if path.is_dir() else path
    if not model_file.is_file():
        raise ValueError(f"{model_file}: no sentencepiece tokenizer model there")
    return model_file


def _fingerprint(inputs, model_file: Path, dtype, text_field, txt_docs, shard_tokens) -> dict:
    """What the output depends on. Inputs are identified by path, size and mtime (hashing a 100 GB corpus to
    decide that nothing changed would cost as much as tokenizing it); the tokenizer by its sha256."""
    files = []
    for p in inputs:
        st = os.stat(p)
        files.append({"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"version": FORMAT_VERSION, "inputs": files, "tokenizer_sha256": file_sha256(model_file),
            "dtype": np.dtype(dtype).name, "text_field": text_field, "txt_docs": txt_docs,
            "shard_tokens": shard_tokens}


def _up_to_date(out_dir: Path, fingerprint: dict) -> dict | None:
    """The existing meta when out_dir already holds exactly this preparation, intact."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("fingerprint") != fingerprint:
        return None
    for s in meta.get("shards", []):
        bin_file = out_dir / s["bin"]
        if not (out_dir / s["idx"]).is_file() or not bin_file.is_file() or \
                bin_file.stat().st_size != s["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return None
    return meta


def prepare(inputs, tokenizer, out_dir, *, text_field: str = "text", txt_docs: str = "line", workers: int = 1,
            name: str | None = None, dtype=None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            progress: bool = True) -> dict:
    """Tokenize `inputs` (paths) with `tokenizer` (a .model file or a directory holding tokenizer.model)
    into shards in `out_dir`. Returns the meta dict (with "skipped": True when nothing had to be done).
    dtype: None = uint16 when the vocabulary fits, else uint32. See the module docstring for the layout.
    workers > 1 starts 'spawn' processes: a script calling this must guard its entry point with
    `if __name__ == "__main__":` (the CLI does)."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files given")
    if txt_docs not in ("line", "paragraph"):
        raise ValueError(f"txt_docs must be 'line' or 'paragraph', got {txt_docs!r}")
    for p in inputs:
        check_readable(p)
    model_file = _resolve_tokenizer(tokenizer)
    tok = Tokenizer(model_file)
    dtype = np.dtype(dtype) if dtype is not None else token_dtype(tok.vocab_size)
    out_dir = Path(out_dir)
    name = name or out_dir.name
    fingerprint = _fingerprint(inputs, model_file, dtype, text_field, txt_docs, shard_tokens)
    if (meta := _up_to_date(out_dir, fingerprint)) is not None:
        if progress:
            print(f"{out_dir}: up to date (same inputs, tokenizer and options); nothing to do")
        return {**meta, "skipped": True}

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    fmt_of = {p: input_format(p)[0] for p in inputs}
    writer = ShardWriter(out_dir, dtype, tok.vocab_size, shard_tokens)
    n_docs = n_tokens = n_words = n_skipped = 0
    t0 = time.time()
    bar = tqdm(total=sum(os.path.getsize(p) for p in inputs), unit="B", unit_scale=True,
               desc=f"tokenizing {name}", disable=not progress, dynamic_ncols=True)
    results = _run_jobs(_chunks(inputs, fmt_of, text_field, txt_docs), str(model_file), workers)
    try:
        for result, nbytes in results:
            writer.add(result["tokens"], result["lengths"])
            n_docs += len(result["lengths"])
            n_tokens += len(result["tokens"])
            n_words += result["words"]
            n_skipped += result["skipped"]
            bar.update(nbytes)
            bar.set_postfix(docs=f"{n_docs:,}", tokens=f"{n_tokens:,}", refresh=False)
        if n_docs == 0:
            raise ValueError(f"{', '.join(map(str, inputs))}: empty corpus (no non-empty documents"
                             + (f" in field '{text_field}'" if "jsonl" in fmt_of.values() else "") + ")")
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()  # stops the worker pool now, also on error
        bar.close()
    text_tokens = n_tokens - 2 * n_docs  # without each document's BOS and EOS
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "dtype": dtype.name,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "document_layout": "BOS + tokens + EOS",
            "tokenizer": {"path": str(model_file.resolve()), "sha256": fingerprint["tokenizer_sha256"]},
            "fingerprint": fingerprint, "num_docs": n_docs, "num_tokens": n_tokens,
            "num_text_tokens": text_tokens, "num_words": n_words,
            "tokens_per_word": text_tokens / max(n_words, 1), "skipped_empty_docs": n_skipped,
            "seconds": round(time.time() - t0, 3)}
    commit_shards(out_dir, shards, meta)
    meta["shards"] = shards
    if progress:
        print(summary_line(meta, out_dir))
    return {**meta, "skipped": False}


def summary_line(meta: dict, out_dir) -> str:
    return (f"{meta['name']}: {meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens "
            f"({meta.get('num_text_tokens', meta['num_tokens']):,} without BOS/EOS), "
            f"{meta.get('num_words', 0):,} words, {meta.get('tokens_per_word', 0):.3f} tokens/word "
            f"-> {out_dir} ({len(meta['shards'])} shard(s), {meta['dtype']})")


# ============================================================================ reading shards

class TokenShards:
    """Read-only view of a prepared directory: len() documents, doc(i) -> np array, num_tokens.

    Refuses a directory without meta.json (never prepared, or a run killed before its commit) and shards
    whose size disagrees with the meta (truncated or overwritten)."""

    def __init__(self, path):
        self.path = Path(path)
        meta_file = self.path / META_FILE
        try:
            self.meta = json.loads(meta_file.read_text())
        except FileNotFoundError:
            raise ValueError(f"{meta_file}: missing; {self.path} is not a prepared token directory (or its "
                             f"preparation was interrupted): run python -m minillm.data prepare") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_file}: unreadable ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} directory")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._bins, self._idx = [], []
        for s in self.meta["shards"]:
            bin_file = self.path / s["bin"]
            expected = s["num_tokens"] * self.dtype.itemsize
            if not bin_file.is_file() or bin_file.stat().st_size != expected:
                raise ValueError(f"{bin_file}: missing or not {expected} bytes as {meta_file} says; re-run prepare")
            self._bins.append(np.memmap(bin_file, dtype=self.dtype, mode="r", shape=(s["num_tokens"],)))
            idx = np.load(self.path / s["idx"])
            if len(idx) != s["num_docs"] + 1 or idx[-1] != s["num_tokens"]:
                raise ValueError(f"{self.path / s['idx']}: does not match {meta_file}; re-run prepare")
            self._idx.append(idx)
        self._first_doc = np.cumsum([0] + [s["num_docs"] for s in self.meta["shards"]])
        self.num_tokens = int(sum(s["num_tokens"] for s in self.meta["shards"]))
        self.doc_lengths = np.concatenate([np.diff(i) for i in self._idx]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._first_doc[-1])

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (a read-only memmap slice, in the shard's dtype)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents in {self.path})")
        s = int(np.searchsorted(self._first_doc, i, side="right")) - 1
        j = i - self._first_doc[s]
        return self._bins[s][self._idx[s][j]:self._idx[s][j + 1]]

    __getitem__ = doc

    def __repr__(self):
        return f"TokenShards({str(self.path)!r}, docs={len(self)}, tokens={self.num_tokens}, {self.dtype.name})"


# ============================================================================ sources and mixture

def _pairs(spec: str, what: str):
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise ValueError(f"{what} {spec!r}: expected name=value pairs separated by commas, got {item!r}")
        yield name.strip(), value.strip()


def parse_sources(spec: str) -> dict[str, str]:
    """'et=tok/et,en=tok/en' -> {'et': 'tok/et', 'en': 'tok/en'}."""
    out = {}
    for name, path in _pairs(spec, "data sources"):
        if name in out:
            raise ValueError(f"data sources {spec!r}: source {name!r} given twice")
        out[name] = path
    if not out:
        raise ValueError(f"data sources {spec!r}: no sources (expected name=dir,...)")
    return out


def parse_mixture(spec: str, names=None) -> dict[str, float]:
    """'et=0.75,en=0.25' -> weights normalised to sum 1, in the order given.

    names: the known sources; then every weight must name one of them and every source needs a weight (0 is
    allowed; '' = equal weights). Errors: malformed pair, non-number, negative or non-finite weight,
    duplicate, unknown or missing source, zero total."""
    names = list(names) if names is not None else None
    if not spec.strip() and names:
        return {n: 1.0 / len(names) for n in names}
    weights = {}
    for name, value in _pairs(spec, "mixture"):
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"mixture {spec!r}: weight of {name!r} is not a number: {value!r}") from None
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"mixture {spec!r}: weight of {name!r} must be a finite number >= 0, got {value}")
        if name in weights:
            raise ValueError(f"mixture {spec!r}: source {name!r} given twice")
        if names is not None and name not in names:
            raise ValueError(f"mixture {spec!r}: {name!r} names no data source (sources: {', '.join(names)})")
        weights[name] = w
    if names is not None:
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(f"mixture {spec!r}: no weight for source(s) {', '.join(missing)} (give 0 to skip)")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mixture {spec!r}: weights sum to zero")
    return {n: w / total for n, w in weights.items()}


class DocumentStream:
    """One source as an endless token stream addressed by offset: epoch e (offsets [e*N, (e+1)*N) for N
    tokens) is all documents in a permutation seeded by (seed, source name, e), concatenated."""

    def __init__(self, shards: TokenShards, seed: int, name: str = "", shuffle: bool = True):
        self.shards, self.seed, self.shuffle = shards, seed, shuffle
        self.name_key = zlib.crc32(name.encode())  # stable across runs, unlike hash()
        self.lengths = shards.doc_lengths
        self.epoch_tokens = shards.num_tokens
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, e: int):
        if e not in self._epochs:
            n = len(self.lengths)
            perm = (np.random.default_rng([self.seed, self.name_key, e]).permutation(n) if self.shuffle
                    else np.arange(n))
            starts = np.concatenate([[0], np.cumsum(self.lengths[perm])])
            if len(self._epochs) >= 2:  # a read spans at most two epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = (perm, starts)
        return self._epochs[e]

    def read(self, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n tokens from `offset` and a flag per token: True where a document starts."""
        tokens = np.empty(n, dtype=np.int64)
        starts = np.zeros(n, dtype=bool)
        filled = 0
        while filled < n:
            e, within = divmod(offset, self.epoch_tokens)
            perm, doc_starts = self._epoch(e)
            k = int(np.searchsorted(doc_starts, within, side="right")) - 1
            doc = int(perm[k])
            pos = within - int(doc_starts[k])
            take = min(n - filled, int(self.lengths[doc]) - pos)
            tokens[filled:filled + take] = self.shards.doc(doc)[pos:pos + take]
            starts[filled] = pos == 0
            filled += take
            offset += take
        return tokens, starts


# ============================================================================ packing

def block_to_row(tokens: np.ndarray, starts: np.ndarray, seq_len: int, mode: str = "document",
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """One row from up to seq_len + 1 consecutive tokens (and their document-start flags).

    input_ids = tokens[:-1], labels = tokens[1:]; missing tokens at the end are padding (input pad_id,
    label -100, a doc id of its own). See the module docstring for the two modes."""
    if mode not in ("concat", "document"):
        raise ValueError(f"packing mode must be 'concat' or 'document', got {mode!r}")
    n = len(tokens)
    assert n <= seq_len + 1
    m = min(n, seq_len)  # real input positions
    row = {"input_ids": np.full(seq_len, pad_id, dtype=np.int64),
           "labels": np.full(seq_len, IGNORE, dtype=np.int64),
           "position_ids": np.zeros(seq_len, dtype=np.int64),
           "doc_ids": np.zeros(seq_len, dtype=np.int64)}
    row["input_ids"][:m] = tokens[:m]
    if n > 1:
        row["labels"][:n - 1] = tokens[1:]
    idx = np.arange(m)
    if mode == "document" and m:
        new_doc = starts[:m].copy()
        new_doc[0] = True  # a row always starts a segment, even mid-document
        row["doc_ids"][:m] = np.cumsum(new_doc) - 1
        row["position_ids"][:m] = idx - np.maximum.accumulate(np.where(new_doc, idx, 0))
        # never predict the first token of the next document from the previous one
        crossing = starts[1:n]
        row["labels"][:n - 1][crossing] = IGNORE
    else:
        row["position_ids"][:m] = idx
    if m < seq_len:
        row["doc_ids"][m:] = row["doc_ids"][m - 1] + 1 if m else 0
        row["position_ids"][m:] = np.arange(seq_len - m)
    return row


def stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "labels", "position_ids", "doc_ids")
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in keys}


def pack_documents(docs, seq_len: int, mode: str = "document", pad_id: int = 0) -> dict[str, torch.Tensor]:
    """All of `docs` (token sequences, in order) concatenated and cut into rows of seq_len targets:
    row r covers stream tokens [r*seq_len, r*seq_len + seq_len + 1); the last row is padded.
    The same row construction as PackedLoader, for a fixed list of documents."""
    docs = [np.asarray(d, dtype=np.int64) for d in docs if len(d)]
    if not docs:
        raise ValueError("pack_documents: no documents")
    tokens = np.concatenate(docs)
    starts = np.zeros(len(tokens), dtype=bool)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    rows = []
    for off in range(0, max(len(tokens) - 1, 1), seq_len):
        end = min(off + seq_len + 1, len(tokens))
        rows.append(block_to_row(tokens[off:end], starts[off:end], seq_len, mode, pad_id))
    return stack_rows(rows)


def pack_examples(examples, seq_len: int, pad_id: int = 0, pack: bool = True) -> dict[str, torch.Tensor]:
    """SFT rows from examples = [(ids, labels), ...], several examples per row with document masking.

    labels are aligned with ids, NOT shifted (labels[i] = ids[i] where token i is trained on, -100 where
    not, as a loss-mask renderer produces them); this function shifts them, so in the output labels[t] is
    the target of position t and each example's last position predicts nothing (never the next example).
    Packing is best-fit in the given order (each example goes to the fullest row that still has room, or a
    new row), so rows are well filled and no example is split; pack=False gives one example per row
    (same labels, so packed and unpacked training see the same loss). Examples longer than seq_len are
    the caller's to truncate or drop (ValueError here). Position ids restart at 0 for every example; the
    padding at the end of a row has label -100 and a doc id of its own.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i, (ids, labels) in enumerate(examples):
        n = len(ids)
        if n != len(labels):
            raise ValueError(f"example {i}: {n} ids but {len(labels)} labels")
        if n == 0:
            raise ValueError(f"example {i} is empty")
        if n > seq_len:
            raise ValueError(f"example {i}: {n} tokens do not fit seq_len {seq_len}; truncate or drop it first")
        j = bisect.bisect_left(free, (n, -1)) if pack else len(free)
        if j < len(free):
            room, r = free.pop(j)
            rows[r].append(i)
        else:
            rows.append([i])
            room, r = seq_len, len(rows) - 1
        if pack and room - n > 0:
            bisect.insort(free, (room - n, r))
    out = []
    for members in rows:
        row = {"input_ids": np.full(seq_len, pad_id, dtype=np.int64),
               "labels": np.full(seq_len, IGNORE, dtype=np.int64),
               "position_ids": np.zeros(seq_len, dtype=np.int64),
               "doc_ids": np.zeros(seq_len, dtype=np.int64)}
        at = 0
        for doc, i in enumerate(members):
            ids, labels = examples[i]
            n = len(ids)
            row["input_ids"][at:at + n] = np.asarray(ids, dtype=np.int64)
            row["labels"][at:at + n - 1] = np.asarray(labels, dtype=np.int64)[1:]
            row["position_ids"][at:at + n] = np.arange(n)
            row["doc_ids"][at:at + n] = doc
            at += n
        row["doc_ids"][at:] = len(members)
        row["position_ids"][at:] = np.arange(seq_len - at)
        out.append(row)
    if not out:
        raise ValueError("pack_examples: no examples")
    return stack_rows(out)


# ============================================================================ the loader

def _open_sources(sources: dict, vocab_size: int | None) -> dict[str, TokenShards]:
    shards = {name: s if isinstance(s, TokenShards) else TokenShards(s) for name, s in sources.items()}
    checksums = {name: (s.meta.get("tokenizer") or {}).get("sha256") for name, s in shards.items()}
    if len({c for c in checksums.values()}) > 1:
        raise ValueError("data sources were tokenized with different tokenizers: "
                         + ", ".join(f"{n} ({shards[n].path}): {(c or 'unknown')[:12]}" for n, c in checksums.items()))
    for name, s in shards.items():
        if vocab_size is not None and s.vocab_size > vocab_size:
            raise ValueError(f"{s.path}: tokens come from a {s.vocab_size}-piece tokenizer but the model has "
                             f"{vocab_size} embedding rows")
    return shards


class PackedLoader:
    """Endless packed batches from a weighted mixture of token directories, one rank's slice.

    sources: {name: directory or TokenShards}; weights: {name: weight} (parse_mixture). next_batch() returns
    batch_size rows of seq_len (dict of LongTensors [B, T]). The stream depends only on the sources, the
    weights, seed, seq_len and mode -- not on batch_size, rank or world_size (see the module docstring).
    state_dict() / load_state_dict(): the exact position, JSON-serialisable, for checkpoints.
    """

    CHOICE_CHUNK = 4096  # rows whose sources are drawn from one seeded generator

    def __init__(self, sources: dict, weights: dict, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, mode: str = "document", vocab_size: int | None = None,
                 shuffle: bool = True, pad_id: int = 0):
        if mode not in ("concat", "document"):
            raise ValueError(f"packing mode must be 'concat' or 'document', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be positive")
        unknown = [n for n in weights if n not in sources]
        if unknown:
            raise ValueError(f"mixture names unknown source(s) {', '.join(unknown)}")
        self.names = [n for n in sources]
        w = np.array([float(weights.get(n, 0.0)) for n in self.names])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.probs = w / w.sum()
        self.shards = _open_sources(sources, vocab_size)
        self.streams = {n: DocumentStream(self.shards[n], seed, n, shuffle) for n in self.names}
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.seed, self.mode, self.shuffle, self.pad_id = seed, mode, shuffle, pad_id
        self.row = 0  # global rows consumed so far, by all ranks together
        self.offsets = {n: 0 for n in self.names}  # next stream offset of each source
        self._choices = (-1, None)

    def _source_of(self, row: int) -> int:
        chunk = row // self.CHOICE_CHUNK
        if self._choices[0] != chunk:
            rng = np.random.default_rng([self.seed, 0x6D6978, chunk])  # 'mix'
            self._choices = (chunk, rng.choice(len(self.names), size=self.CHOICE_CHUNK, p=self.probs))
        return int(self._choices[1][row % self.CHOICE_CHUNK])

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = []
        first_mine = self.row + self.rank * self.batch_size
        for g in range(self.row, self.row + self.batch_size * self.world_size):
            name = self.names[self._source_of(g)]
            offset = self.offsets[name]
            self.offsets[name] += self.seq_len
            if first_mine <= g < first_mine + self.batch_size:  # other ranks' rows are only skipped over
                tokens, starts = self.streams[name].read(offset, self.seq_len + 1)
                rows.append(block_to_row(tokens, starts, self.seq_len, self.mode, self.pad_id))
        self.row += self.batch_size * self.world_size
        return stack_rows(rows)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def epochs(self) -> dict[str, float]:
        """Passes over each source so far (for logging)."""
        return {n: self.offsets[n] / self.streams[n].epoch_tokens for n in self.names}

    def _identity(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "mode": self.mode, "shuffle": self.shuffle,
                "sources": {n: {"weight": float(p), "num_tokens": self.shards[n].num_tokens,
                                "num_docs": len(self.shards[n])} for n, p in zip(self.names, self.probs)}}

    def state_dict(self) -> dict:
        return {"version": 1, "row": self.row, "offsets": dict(self.offsets), **self._identity()}

    def load_state_dict(self, state: dict):
        """Continue exactly where `state` was taken. The data and settings must be the ones it was taken with
        (batch_size, rank and world_size may differ: the stream is global)."""
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"data loader checkpoint does not match this run: {key} was {state.get(key)!r}, "
                                 f"now {value!r}")
        self.row = int(state["row"])
        self.offsets = {n: int(state["offsets"][n]) for n in self.names}


def validation_batches(path, seq_len: int, batch_size: int, n_batches: int | None = None, rank: int = 0,
                       world_size: int = 1, mode: str = "document", pad_id: int = 0) -> list[dict]:
    """Held-out batches for this rank: the directory's documents in stored order, one pass, no shuffling.

    n_batches per rank (None = enough to cover the set once). Every rank gets the same number of batches
    (collective forwards under ZeRO-3 need that); rows past the end of the data are padding with no targets.
    """
    shards = path if isinstance(path, TokenShards) else TokenShards(path)
    stream = DocumentStream(shards, seed=0, shuffle=False)
    total = shards.num_tokens
    n_rows = max(1, -(-(total - 1) // seq_len))  # rows needed to predict every token once
    if n_batches is None:
        n_batches = -(-n_rows // (batch_size * world_size))
    batches = []
    for b in range(n_batches):
        rows = []
        for g in range(b * batch_size * world_size + rank * batch_size,
                       b * batch_size * world_size + (rank + 1) * batch_size):
            offset = g * seq_len
            n = max(0, min(seq_len + 1, total - offset))
            tokens, starts = stream.read(offset, n) if n > 1 else (np.zeros(0, np.int64), np.zeros(0, bool))
            rows.append(block_to_row(tokens, starts, seq_len, mode, pad_id))
        batches.append(stack_rows(rows))
    return batches


# ============================================================================ CLI

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillm.data",
                                     description="Tokenize corpora into token shards (see module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl(.gz) files into DIR")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model, or a directory holding one")
    p.add_argument("--input", required=True, nargs="+", help="input files (.txt, .jsonl, optionally .gz)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document (default: text)")
    p.add_argument("--txt-docs", default="line", choices=("line", "paragraph"),
                   help=".txt documents: one per line (default) or per blank-line-separated paragraph")
    p.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 16)),
                   help="tokenizer processes (default: number of CPUs, at most 16)")
    p.add_argument("--name", default=None, help="name of this source in the summary (default: DIR's name)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (about)")
    p.add_argument("--dtype", default=None, choices=("uint16", "uint32"), help="default: by vocabulary size")
    i = sub.add_parser("info", help="print the summary of a prepared directory")
    i.add_argument("dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(args.input, args.tokenizer, args.out, text_field=args.text_field, txt_docs=args.txt_docs,
                    workers=args.workers, name=args.name, dtype=args.dtype, shard_tokens=args.shard_tokens)
        else:
            shards = TokenShards(args.dir)
            print(summary_line(shards.meta, args.dir))
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
