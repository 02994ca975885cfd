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
processes), an n-gram's a polynomial of its words' hashes; both are computed with numpy for a whole batch of
texts at once (prepare: a chunk), so the Python work per text is a few C calls.

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
MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the n-gram polynomial
SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|\n+")


ASCII_SPACE = np.zeros(256, dtype=bool)
ASCII_SPACE[[9, 10, 11, 12, 13, 32]] = True  # the separators between words
MAX_WORD_BYTES = 1 << 12  # byte positions in a word beyond this reuse the powers from the start (hash only)
with np.errstate(over="ignore"):
    BYTE_POWERS = np.cumprod(np.concatenate([[np.uint64(1)], np.full(MAX_WORD_BYTES - 1, MULTIPLIER)]), dtype=np.uint64)


def words_of(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word, index of the text it is in) for texts lower-cased and split at ASCII whitespace,
    all texts at once: the per-text cost is a few C calls, the rest is numpy over the bytes."""
    encoded = [t.lower().encode() for t in texts]
    data = np.frombuffer(b"\n".join(encoded), dtype=np.uint8)
    text_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    word = ~ASCII_SPACE[data]
    first = word & np.concatenate([[True], ~word[:-1]]) if len(data) else word
    starts = np.flatnonzero(first)
    if not len(starts):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    positions = np.flatnonzero(word)
    word_of_byte = np.cumsum(first[positions]) - 1
    offset = positions - starts[word_of_byte]
    with np.errstate(over="ignore"):
        contributions = data[positions].astype(np.uint64) * BYTE_POWERS[offset % MAX_WORD_BYTES]
    hashes = np.add.reduceat(contributions, np.flatnonzero(first[positions]))
    with np.errstate(over="ignore"):  # the word's length too, so "a" and "a\0" differ
        hashes = hashes * MULTIPLIER + np.bincount(word_of_byte).astype(np.uint64)
    return hashes, np.searchsorted(text_starts, starts, side="right") - 1


def window_hashes(words: np.ndarray, n: int) -> np.ndarray:
    """The polynomial hash of every run of n consecutive word hashes (empty when fewer than n words)."""
    if len(words) < n:
        return np.empty(0, dtype=np.uint64)
    out = np.zeros(len(words) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        for j in range(n):
            out = out * MULTIPLIER + words[j:len(words) - n + 1 + j]
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
                        for h in window_hashes(words, n).tolist():
                            sets.setdefault(n, {}).setdefault(h, set()).add(index)
        # Sorted hash arrays per window length (searchsorted), and each hash's evaluation sets.
        self.tables = {n: (np.array(sorted(table), dtype=np.uint64), [sorted(table[h]) for h in sorted(table)])
                       for n, table in sets.items()}

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self.tables.values())

    def overlaps(self, text: str) -> set[int]:
        """Indices (into self.names) of the evaluation sets `text` shares an n-gram or a short sentence with."""
        return self.batch_overlaps([text])[0]

    def batch_overlaps(self, texts: list[str]) -> list[set[int]]:
        """overlaps() of each text, computed for all of them at once (windows never span two texts)."""
        words, text_of = words_of(texts)
        found = [set() for _ in texts]
        for n, (keys, owners) in self.tables.items():
            windows = window_hashes(words, n)
            if not len(windows):
                continue
            at = np.minimum(np.searchsorted(keys, windows), len(keys) - 1)
            hit = (keys[at] == windows) & (text_of[:len(windows)] == text_of[n - 1:])
            for i in np.flatnonzero(hit).tolist():
                found[text_of[i]].update(owners[at[i]])
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
