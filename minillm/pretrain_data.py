"""Pretraining data on disk and in batches: token shards -> a seeded language mixture -> packed rows.

Shards (written by `python -m minillm.prepare`):
    DIR/tokens_00000.bin       the shard's documents back to back, raw uint16 (vocab <= 65536) or uint32
    DIR/tokens_00000.idx.npy   int64 document offsets: document i is bin[idx[i]:idx[i+1]]
    DIR/meta.json              dtype, vocabulary, tokenizer checksum, inputs, shard list, summary; written last,
                               so a directory without it is never read
Every document is stored as BOS + tokens + EOS (no BOS for tokenizers without one), so a reader never
needs the tokenizer.

Mixture. Each named source is an endless token stream: its documents in a seeded order per epoch,
concatenated. A row of seq_len tokens is cut from ONE source, drawn with the mixture weights from a seeded
generator; every row consumes exactly seq_len tokens of its source (it reads seq_len + 1, and the next row
of that source starts at the last of them), so the weights are shares of TOKENS (LLAMMAS' 75% Estonian).

Data parallelism. All rows form one global sequence, the same for any number of processes: micro-batch k
is global rows [k*B*W, (k+1)*B*W) and rank r takes rows [k*B*W + r*B, k*B*W + (r+1)*B). W ranks with B
rows see exactly the rows one process with B*W rows sees. The position (row counter, source offsets) is a
small JSON dict saved with each checkpoint.

Packing. A row of seq_len + 1 stream tokens x gives input_ids = x[:-1], labels = x[1:] (already shifted;
-100 = not scored).
    'concat'    (LLAMMAS) nothing else: positions 0..T-1, doc_ids all 0, attention crosses documents.
    'document'  positions restart at every document start, doc_ids number the row's documents, and the
                label predicting the next document's first token is -100: neither attention nor loss
                crosses a document boundary.
Padding (the end of a validation set) has input pad_id, label -100 and a document id of its own.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import torch

from minillm.losses import IGNORE_INDEX

FORMAT = "minillm-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id 0..vocab_size-1 fits (Llama-2's 32000), else uint32 (Llama-3's 128256)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_names(i: int) -> tuple[str, str]:
    return f"tokens_{i:05d}.bin", f"tokens_{i:05d}.idx.npy"


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
                             f"preparation was interrupted): run python -m minillm.prepare") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{meta_file}: unreadable ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} directory")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self._bins, self._idx = [], []
        for s in self.meta["shards"]:
            for key in ("bin", "idx"):  # prepare writes plain file names; anything else would leave the directory
                if not isinstance(s.get(key), str) or Path(s[key]).name != s[key] or s[key] in ("", ".", ".."):
                    raise ValueError(f"{meta_file}: shard {key} {s.get(key)!r} is not a file name in {self.path}")
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


def parse_mixture(spec: str, names=None, warn=None) -> dict[str, float]:
    """'et=0.75,en=0.25' -> weights normalised to sum 1, in the order given.

    names: the known sources; then every weight must name one of them and every source needs a weight (0 is
    allowed; '' = equal weights). Errors: malformed pair, non-number, negative or non-finite weight,
    duplicate, unknown or missing source, zero total. Weights that do not sum to 1 are renormalised, and
    warn(message) is told the weights used."""
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
    out = {n: w / total for n, w in weights.items()}
    if abs(total - 1) > 1e-6 and warn is not None:
        warn(f"warning: mixture {spec!r} sums to {total:g}; renormalised to "
             + ",".join(f"{n}={w:.4g}" for n, w in out.items()))
    return out


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

ROW_KEYS = ("input_ids", "labels", "position_ids", "doc_ids")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A row of seq_len padding positions (input pad_id, label -100, position and doc id 0) for the packers
    to fill: block_to_row here, sft_data.pack_examples for instruction data."""
    return {"input_ids": np.full(seq_len, pad_id, dtype=np.int64),
            "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
            "position_ids": np.zeros(seq_len, dtype=np.int64),
            "doc_ids": np.zeros(seq_len, dtype=np.int64)}


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
    row = empty_row(seq_len, pad_id)
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
        row["labels"][:n - 1][crossing] = IGNORE_INDEX
    else:
        row["position_ids"][:m] = idx
    if m < seq_len:
        row["doc_ids"][m:] = row["doc_ids"][m - 1] + 1 if m else 0
        row["position_ids"][m:] = np.arange(seq_len - m)
    return row


def stack_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Rows (empty_row's keys, numpy) as one batch dict of LongTensors [R, T]."""
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in ROW_KEYS}


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


def validation_batches(path, seq_len: int, batch_size: int, rank: int = 0, world_size: int = 1,
                       max_tokens: int = 0, mode: str = "document", pad_id: int = 0) -> list[dict]:
    """This rank's held-out batches: the directory's documents in stored order, one pass, no shuffling.

    The rows cover the first `max_tokens` target tokens (0 = all of them), each token scored exactly once
    whatever batch_size and world_size are: global row j goes to micro-batch j // (B*W), rank (j // B) % W.
    Every rank gets the same number of batches (collective forwards under ZeRO-3 need that); rows past
    the end are padding without targets, so sums over all ranks are the same for any split."""
    shards = path if isinstance(path, TokenShards) else TokenShards(path)
    stream = DocumentStream(shards, seed=0, shuffle=False)
    total = shards.num_tokens if max_tokens <= 0 else min(shards.num_tokens, max_tokens + 1)
    n_rows = max(1, -(-(total - 1) // seq_len))  # rows needed to predict every token once
    batches = []
    for b in range(-(-n_rows // (batch_size * world_size))):
        rows = []
        for g in range(b * batch_size * world_size + rank * batch_size,
                       b * batch_size * world_size + (rank + 1) * batch_size):
            offset = g * seq_len
            n = max(0, min(seq_len + 1, total - offset))
            tokens, starts = stream.read(offset, n) if n > 1 else (np.zeros(0, np.int64), np.zeros(0, bool))
            rows.append(block_to_row(tokens, starts, seq_len, mode, pad_id))
        batches.append(stack_rows(rows))
    return batches
