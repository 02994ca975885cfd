"""Test-set decontamination: drop training records or documents that share text with evaluation items.

    python -m minillm.instructions decontaminate --input tr.jsonl --eval data/eval --out tr.clean.jsonl
    python -m minillm.instructions translate ... --decontaminate data/eval     (also `mix`)
    python -m minillm.prepare ... --decontaminate data/eval

What counts as overlap (GPT-3's and Llama's test, on words): texts are lower-cased and split at whitespace
(ASCII whitespace: so it is normalised; punctuation stays part of its word); a training text overlaps an evaluation
item when they share an n-gram of --ngram words (default 13). Short evaluation sentences (FLORES-style
single sentences, fewer than --ngram words but at least --min-sentence-words) have no 13-gram: a training
text overlaps them when it holds the whole sentence as a run of words.

The evaluation items are the task files evaluate.py reads (`*.task.json`, or directories of them): of every
record of their data and dev_data, every string field, in lists too (the model's input and the references:
source, premise, choices, question, references, target ...). Each item is split into sentences; each
sentence gives its n-grams, or itself when short.

Bounded memory: only 64-bit hashes of the evaluation n-grams are held (and which evaluation sets they come
from); training text is streamed. A word's hash is a polynomial of its UTF-8 bytes modulo 2^64 (stable across
processes), an n-gram's a polynomial of its words' hashes. Both come from prefix sums (polynomial_prefixes),
computed with numpy for a whole batch of texts at once (prepare: a chunk): a few passes over the bytes and the
words whatever the n-gram length, and one bitmap read per window (HashTable). The Python work per text is a
few C calls; the cost is measured in bench/bench_decontaminate.py.

Report (JSON next to the output, `<output>.decontamination.json`): per evaluation set how many training
items overlapped it (an item may overlap several sets), and how many were removed in all (none with
--report-only).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minillm.files import atomic_write, read_jsonl, to_json, write_jsonl
from minillm.options import require_option

DEFAULT_NGRAM = 13
DEFAULT_MIN_SENTENCE_WORDS = 8
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the polynomial hashes
SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")


INVERSE = np.uint64(pow(int(MULTIPLIER), -1, 1 << 64))  # MULTIPLIER is odd, so it has an inverse modulo 2^64
ASCII_SPACE = np.zeros(256, dtype=bool)
ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True  # the separators between words
CACHED_POWERS = 1 << 22  # power tables up to this length are kept (32 MB each); longer batches compute their own
_power_tables: dict[int, np.ndarray] = {}


def powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2^64."""
    table = _power_tables.get(int(base))
    if table is None or len(table) < n:
        size = max(n, 1 << 16, 2 * len(table) if table is not None else 0)
        with np.errstate(over="ignore"):
            table = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, base, dtype=np.uint64)]),
                               dtype=np.uint64)
        if size <= CACHED_POWERS:
            _power_tables[int(base)] = table
    return table[:n]


def polynomial_prefixes(values: np.ndarray) -> np.ndarray:
    """P[k] = sum over t < k of values[t] * INVERSE^t; then the polynomial hash of values[i:j] (first value
    the highest power, sum of values[t] * MULTIPLIER^(j-1-t)) is (P[j] - P[i]) * MULTIPLIER^(j-1): every span's
    hash from one cumulative sum, with no loop over the span's length."""
    prefixes = np.zeros(len(values) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(values.astype(np.uint64) * powers(INVERSE, len(values)), out=prefixes[1:])
    return prefixes


def words_of(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word, index of the text it is in) for texts lower-cased and split at ASCII whitespace,
    all texts at once: the per-text cost is two C calls, the rest is a few numpy passes over the bytes."""
    encoded = [t.lower().encode() for t in texts]
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    word = np.concatenate([[False], ~ASCII_SPACE[data], [False]])
    edges = np.flatnonzero(word[1:] != word[:-1])  # a word's first byte, then one past its last, alternating
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    prefixes = polynomial_prefixes(data)
    with np.errstate(over="ignore"):  # then the word's length, so "a" and "\0a" differ
        hashes = (prefixes[ends] - prefixes[starts]) * powers(MULTIPLIER, len(data))[ends - 1]
        hashes = hashes * MULTIPLIER + (ends - starts).astype(np.uint64)
    text_starts = np.cumsum([0] + [len(e) + 1 for e in encoded])
    words_per_text = np.diff(np.searchsorted(starts, text_starts))
    return hashes, np.repeat(np.arange(len(texts)), words_per_text)


def window_hashes(words: np.ndarray, lengths) -> dict[int, np.ndarray]:
    """For each n in lengths, the polynomial hash of every run of n consecutive word hashes (sum of
    words[i+j] * MULTIPLIER^(n-1-j); empty when fewer than n words)."""
    prefixes = polynomial_prefixes(words)
    scale = powers(MULTIPLIER, len(words))
    out = {}
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        for n in lengths:
            out[n] = (prefixes[n:] - prefixes[:-n]) * scale[n - 1:] if len(words) >= n else np.empty(0, np.uint64)
    return out


def string_fields(value):
    """Every string inside a JSON value (objects' values and lists, recursively)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from string_fields(v)
    elif isinstance(value, list):
        for v in value:
            yield from string_fields(v)


def task_data_files(paths) -> list[tuple[str, Path]]:
    """(evaluation set name, data file) of every task file named or inside a named directory."""
    out = []
    for p in map(Path, paths):
        specs = sorted(p.glob("*.task.json")) if p.is_dir() else [p]
        if p.is_dir() and not specs:
            raise ValueError(f"{p}: no *.task.json files in this directory")
        for spec_path in specs:
            try:
                spec = json.loads(spec_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{spec_path}: cannot read task file ({e})") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
                raise ValueError(f"{spec_path}: a task file needs a 'data' field naming its records")
            name = spec.get("name") or spec_path.name.removesuffix(".json").removesuffix(".task")
            for key in ("data", "dev_data"):
                if isinstance(spec.get(key), str):
                    out.append((name, spec_path.parent / spec[key]))
    return out


class HashTable:
    """The evaluation n-gram hashes of one window length and the evaluation sets each comes from.

    Nearly every training window is in no evaluation set, so membership is first tested in a bitmap of the
    hashes' top bits (about 64 bits per key: about 1 random window in 64 passes; one read per window, against
    a binary search's six or more), then the few that pass are looked up exactly in the sorted keys."""

    def __init__(self, sets_of_hash: dict[int, set]):
        self.keys = np.array(sorted(sets_of_hash), dtype=np.uint64)
        self.owners = [sorted(sets_of_hash[h]) for h in self.keys.tolist()]
        bits = min(24, max(16, (64 * len(self.keys)).bit_length()))
        self.shift = np.uint64(64 - bits)
        self.bitmap = np.zeros(1 << bits, dtype=bool)
        self.bitmap[self.keys >> self.shift] = True

    def maybe_in(self, hashes: np.ndarray) -> np.ndarray:
        """False where a hash is surely not a key (True: maybe)."""
        return self.bitmap[hashes >> self.shift]

    def find(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `hashes` of the keys among them, their indices into self.keys / self.owners)."""
        at = np.minimum(np.searchsorted(self.keys, hashes), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[at] == hashes)
        return hit, at[hit]


class EvalIndex:
    """Hashes of the evaluation sets' n-grams and short sentences; `overlaps(text)` names the sets a text
    shares one with."""

    def __init__(self, eval_paths, ngram: int = DEFAULT_NGRAM, min_sentence_words: int = DEFAULT_MIN_SENTENCE_WORDS):
        if ngram < 1 or not 1 <= min_sentence_words <= ngram:
            raise ValueError(f"--ngram {ngram} / --min-sentence-words {min_sentence_words}: need 1 <= "
                             "min-sentence-words <= ngram")
        self.ngram, self.min_sentence_words = ngram, min_sentence_words
        sets: dict[int, dict[int, set]] = {}  # window length -> hash -> evaluation set indices
        self.names: list[str] = []
        for name, data in task_data_files(eval_paths):
            if name not in self.names:
                self.names.append(name)
            index = self.names.index(name)
            for _, record in read_jsonl(data):
                for text in string_fields(record):
                    for sentence in SENTENCE_END.split(text):
                        words, _ = words_of([sentence])
                        n = min(ngram, len(words))
                        if n < min_sentence_words:
                            continue
                        for h in window_hashes(words, [n])[n].tolist():
                            sets.setdefault(n, {}).setdefault(h, set()).add(index)
        self.tables = {n: HashTable(table) for n, table in sets.items()}

    def __len__(self) -> int:
        return sum(len(table.keys) for table in self.tables.values())

    def overlaps(self, text: str) -> set[int]:
        """Indices (into self.names) of the evaluation sets `text` shares an n-gram or a short sentence with."""
        return self.batch_overlaps([text])[0]

    def batch_overlaps(self, texts: list[str]) -> list[set[int]]:
        """overlaps() of each text, computed for all of them at once (windows never span two texts)."""
        words, text_of = words_of(texts)
        found = [set() for _ in texts]
        for n, windows in window_hashes(words, self.tables).items():
            table = self.tables[n]
            starts = np.flatnonzero(table.maybe_in(windows))
            starts = starts[text_of[starts] == text_of[starts + n - 1]]  # windows never span two texts
            hit, key = table.find(windows[starts])
            for i, k in zip(starts[hit].tolist(), key.tolist()):
                found[text_of[i]].update(table.owners[k])
        return found


class Decontaminator:
    """Counts (and filters) training items against an EvalIndex; report() gives the per-set figures."""

    def __init__(self, index: EvalIndex, report_only: bool = False):
        self.index, self.report_only = index, report_only
        self.seen = self.overlapping = 0
        self.per_set = [0] * len(index.names)

    def keep(self, text: str) -> bool:
        """Whether to keep a training item whose text (all its fields) is `text`; counts it."""
        return self.keep_batch([text])[0]

    def keep_batch(self, texts: list[str]) -> list[bool]:
        """keep() of each text, computed for all at once."""
        out = []
        for found in self.index.batch_overlaps(texts):
            self.seen += 1
            for i in found:
                self.per_set[i] += 1
            self.overlapping += bool(found)
            out.append(self.report_only or not found)
        return out

    def merge(self, counts: dict):
        """Add the counts of another Decontaminator's report (a worker's)."""
        self.seen += counts["items"]
        self.overlapping += counts["overlapping"]
        for i, name in enumerate(self.index.names):
            self.per_set[i] += counts["per_eval_set"][name]

    def report(self) -> dict:
        return {"items": self.seen, "overlapping": self.overlapping,
                "removed": 0 if self.report_only else self.overlapping,
                "per_eval_set": dict(zip(self.index.names, self.per_set)), "ngram": self.index.ngram,
                "min_sentence_words": self.index.min_sentence_words, "eval_hashes": len(self.index)}


def record_text(record) -> str:
    """A training record's text: its string fields, one per line."""
    return "\n".join(string_fields(record))


def decontaminate_records(records: list, eval_paths, ngram: int = DEFAULT_NGRAM,
                          min_sentence_words: int = DEFAULT_MIN_SENTENCE_WORDS,
                          report_only: bool = False) -> tuple[list, dict]:
    """(the records kept, the report)."""
    d = Decontaminator(EvalIndex(eval_paths, ngram, min_sentence_words), report_only)
    keep = d.keep_batch([record_text(r) for r in records])
    kept = [r for r, k in zip(records, keep) if k]
    return kept, d.report()


def report_path(output) -> Path:
    """Where the report of a decontaminated output goes: beside it."""
    output = Path(output)
    return output.with_name(output.name + ".decontamination.json")


def write_report(output, report: dict) -> Path:
    path = report_path(output)
    atomic_write(path, to_json(report))
    return path


def format_report(report: dict) -> str:
    sets = ", ".join(f"{name} {n}" for name, n in report["per_eval_set"].items())
    return (f"decontamination ({report['ngram']}-grams, sentences of >= {report['min_sentence_words']} words): "
            f"{report['overlapping']} of {report['items']} items overlap the evaluation sets ({sets}); "
            f"{report['removed']} removed")


def decontaminate_output(records: list, eval_paths, output, report_only: bool = False, **index_options) -> list:
    """What translate / mix --decontaminate do before writing `output`: filter, write the report beside the
    output, print the counts."""
    kept, report = decontaminate_records(records, eval_paths, report_only=report_only, **index_options)
    write_report(output, report)
    print(format_report(report))
    return kept


@dataclass(kw_only=True)
class DecontaminateOptions:
    """Drop (or count) the records of an SFT JSONL file that overlap evaluation sets."""
    input: str  # training records, JSONL (Alpaca, chat or any JSON objects: every string field is their text)
    eval: list[str]  # task files (*.task.json) or directories of them: the evaluation sets (evaluate.py --tasks)
    out: str = ""  # where the kept records go ('' with --report-only); the report goes beside it
    ngram: int = DEFAULT_NGRAM  # n-gram length in words (GPT-3 / Llama: 13)
    min_sentence_words: int = DEFAULT_MIN_SENTENCE_WORDS  # shorter evaluation sentences are matched whole from this many words on
    report_only: bool = False  # count only: keep every record, write the report (beside --input when no --out)

    def check(self):
        require_option(self.ngram >= 1, "ngram", self.ngram, "must be >= 1")
        require_option(1 <= self.min_sentence_words <= self.ngram, "min_sentence_words", self.min_sentence_words,
                       "must be between 1 and --ngram")
        require_option(bool(self.out) or self.report_only, "out", self.out, "is needed unless --report-only")


def decontaminate_command(args) -> dict:
    records = [record for _, record in read_jsonl(args.input)]
    kept, report = decontaminate_records(records, args.eval, args.ngram, args.min_sentence_words, args.report_only)
    if args.out:
        write_jsonl(args.out, kept)
    path = write_report(args.out or args.input, report)
    print(format_report(report))
    print(f"{len(kept)} records kept" + (f" -> {args.out}" if args.out else "") + f"; report -> {path}")
    return report
