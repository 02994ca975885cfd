"""Corpus preparation benchmark: `python -m minillm.prepare` throughput and peak memory against the
tokenizer alone encoding the same text on the same cores (the ceiling).

The corpus (generated once, cached under --work): web-like documents of pseudo-words with a Zipf
distribution (a ~100K-word lexicon of Estonian-looking syllables, sentences, paragraphs, numbers; about 2.5 KB
per document), about --corpus-mb MB of text, written as Parquet (snappy, row groups of 1000 documents,
columns id/url/text) and as .jsonl.zst (zstd level 3) and .jsonl (records id/url/text), --files files each.
The tokenizer: --tokenizer DIR, or one of --vocab-size tokens trained on the corpus's first ~40 MB of
documents (cached): --tokenizer-kind bytelevel (the default) a byte-level BPE tokenizer.json in the Llama-3
layout (its pre-tokenizer regex, <|begin_of_text|> / <|end_of_text|>), trained with the `tokenizers`
trainer, or sentencepiece a Llama-2-style tokenizer.model (minillm.tokenizer.SentencePieceTokenizer.train).

Each round measures, in this order, each in its own subprocess:
  ceiling   the texts (read into memory first, not timed), in batches of 1000 documents, split over
            --workers processes forked after loading (each encodes every N-th batch with one thread;
            RAYON_NUM_THREADS=1 for `tokenizers`): the tokenizer alone on every core, the bound for any
            pipeline; the ratios are to this one
  batch-api the same batches in this one process with the tokenizer's batch call:
            SentencePieceProcessor.encode(batch, num_threads=--workers), or for a tokenizer.json
            tokenizers.Tokenizer.encode_batch with RAYON_NUM_THREADS=--workers
  FORMAT    python -m minillm.prepare --workers N on that format: text tokens (num_text_tokens) / the
            seconds prepare reports (from its start to the commit, worker start-up included); peak RSS
            (VmHWM) of the main process and of the largest worker
Ratios are within one round (these machines are shared: compare the ratio, not absolute figures across
rounds): "of ceiling" = tokens/s over the ceiling's tokens/s; "CPU effic." = the ceiling's CPU seconds per
token over prepare's (main process from its start of work + every worker, start-up included), the same
comparison by CPU time; "busy" = CPU seconds / (seconds x workers), how much of its cores a measurement got
and used; "load" = the 1-minute load average after it (this benchmark's own processes included).
Results go to WORK/results.jsonl, one JSON line per measurement.

    python bench/bench_prepare.py                                   # ~1 GB, all cores, 2 rounds
    python bench/bench_prepare.py --corpus-mb 100 --rounds 1        # a quick look
    python bench/bench_prepare.py --tokenizer path/to/llama-3-tokenizer-dir
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minillm.files import atomic_write, to_json  # noqa: E402
from minillm.options import parse_options, require_option  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS_PER_ROW_GROUP = 1000
CEILINGS = {"ceiling": "processes", "batch-api": "batch"}  # what -> the CEILING script's mode


@dataclass(kw_only=True)
class BenchOptions:
    """Benchmark python -m minillm.prepare against the tokenizer's raw batch encode."""
    work: str = "runs/bench_prepare"  # cache of the generated corpus and tokenizer, outputs, results.jsonl
    corpus_mb: int = 1000  # MB of document text to generate
    files: int = 4  # files per format
    tokenizer: str = ""  # tokenizer directory (tokenizer.model or tokenizer.json); '' = train one (cached)
    tokenizer_kind: Literal["bytelevel", "sentencepiece"] = "bytelevel"  # the kind trained when --tokenizer is ''
    vocab_size: int = 32000  # pieces of the trained tokenizer (Llama-2 has 32000)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # prepare's worker processes = the ceiling's processes (and batch-api's threads)
    measure: list[str] = field(default_factory=lambda: ["ceiling", "batch-api", "parquet", "jsonl.zst"])  # what each
        # round measures, in order: ceiling, batch-api, and prepare on parquet, jsonl.zst or jsonl
    rounds: int = 2  # rounds of --measure; 0 = only generate the corpus and the tokenizer
    seed: int = 0  # corpus generator seed

    def check(self):
        require_option(self.corpus_mb >= 1, "corpus_mb", self.corpus_mb, "must be at least 1")
        require_option(self.files >= 1, "files", self.files, "must be at least 1")
        require_option(self.workers >= 1, "workers", self.workers, "must be at least 1")
        require_option(self.rounds >= 0, "rounds", self.rounds, "must be >= 0")
        for m in self.measure:
            require_option(m in (*CEILINGS, "parquet", "jsonl.zst", "jsonl"), "measure", m,
                           "choose ceiling, batch-api, parquet, jsonl.zst or jsonl")
        require_option("ceiling" in self.measure, "measure", self.measure, "must include ceiling (the ratios' base)")


# ----------------------------------------------------------------------------- the corpus

def lexicon(rng, size: int = 100_000) -> list[str]:
    onsets = ["", "k", "t", "p", "s", "m", "n", "l", "r", "v", "h", "j", "kr", "st", "pr", "tr", "g", "d", "b", "š"]
    vowels = ["a", "e", "i", "o", "u", "õ", "ä", "ö", "ü", "aa", "ee", "ii", "oo", "uu", "ai", "ei", "au"]
    codas = ["", "", "", "n", "s", "t", "l", "k", "d", "m", "r", "st", "ks", "ng"]
    words = set()
    while len(words) < size:
        n = 1 + min(int(rng.expovariate(0.6)), 5)
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n)))
    return sorted(words, key=lambda w: (len(w), w))  # short words first: they get the high Zipf ranks


def documents(words, seed: int, target_bytes: int):
    """Yield web-like documents of `words` (a lexicon) until about target_bytes of UTF-8 text."""
    import numpy as np
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    words = np.array(words, dtype=object)
    cum = np.cumsum(1.0 / np.arange(1, len(words) + 1) ** 1.07)
    cum /= cum[-1]
    done = 0
    while done < target_bytes:
        n = int(np.clip(nprng.lognormal(5.8, 0.8), 20, 20000))  # words: median ~330, mean ~460
        toks = words[np.searchsorted(cum, nprng.random(n))].tolist()
        for i in nprng.integers(0, n, n // 40).tolist():  # numbers
            toks[i] = str(int(nprng.integers(1, 2030)))
        for i in nprng.integers(0, n, n // 12).tolist():  # commas
            toks[i] += ","
        ends = np.cumsum(nprng.integers(4, 28, n // 4 + 2))
        ends = ends[ends < n].tolist() + [n]
        marks = rng.choices(".....?!:", k=len(ends))
        breaks = (nprng.random(len(ends)) < 0.2).tolist()  # paragraph ends
        start = 0
        for end, mark, br in zip(ends, marks, breaks):
            toks[start] = toks[start].capitalize()
            toks[end - 1] = toks[end - 1].rstrip(",") + mark + ("\n" if br else "")
            start = end
        text = " ".join(toks).replace("\n ", "\n").rstrip()
        done += len(text.encode("utf-8"))
        yield text


def generate_corpus(cfg: BenchOptions, corpus_dir: Path) -> dict:
    """The corpus in every format (cached: corpus_dir/done.json marks a finished one)."""
    done = corpus_dir / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    corpus_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per_file = cfg.corpus_mb * 1_000_000 // cfg.files
    n_docs = n_bytes = 0
    words = lexicon(random.Random(cfg.seed))
    schema = pa.schema([("id", pa.string()), ("url", pa.string()), ("text", pa.string())])
    for f in range(cfg.files):
        name = corpus_dir / f"part-{f:05d}"
        parquet = pq.ParquetWriter(f"{name}.parquet", schema, compression="snappy")
        with open(f"{name}.jsonl.zst", "wb") as raw, \
                zstandard.ZstdCompressor(level=3).stream_writer(raw) as zst, open(f"{name}.jsonl", "wb") as plain:
            batch = []
            for text in documents(words, cfg.seed * 1000 + f, per_file):
                batch.append({"id": f"doc-{f}-{n_docs}", "url": f"https://example.ee/{f}/{n_docs}", "text": text})
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
                if len(batch) == DOCS_PER_ROW_GROUP:
                    write_batch(batch, parquet, zst, plain, pa)
                    batch = []
            if batch:
                write_batch(batch, parquet, zst, plain, pa)
        parquet.close()
        print(f"  {name}: {n_docs:,} documents so far, {n_bytes / 1e6:,.0f} MB ({time.time() - t0:.0f} s)", flush=True)
    info = {"docs": n_docs, "text_bytes": n_bytes, "files": cfg.files, "seed": cfg.seed,
            "seconds": round(time.time() - t0, 1)}
    atomic_write(done, to_json(info))
    return info


def write_batch(batch, parquet, zst, plain, pa):
    parquet.write_table(pa.Table.from_pylist(batch, schema=parquet.schema))
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch).encode("utf-8")
    zst.write(lines)
    plain.write(lines)


def corpus_files(corpus_dir: Path, fmt: str) -> list[str]:
    return sorted(str(p) for p in corpus_dir.glob(f"part-*.{fmt}"))


# ----------------------------------------------------------------------------- the tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama-3's pre-tokenizer regex (its tokenizer.json)


def train_bytelevel(texts, out: Path, vocab_size: int):
    """A byte-level BPE tokenizer directory in the Llama-3 layout (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([bos, eos])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    atomic_write(out / "tokenizer_config.json", to_json({"bos_token": bos, "eos_token": eos}))


def tokenizer_dir(cfg: BenchOptions, work: Path, corpus_dir: Path) -> Path:
    if cfg.tokenizer:
        return Path(cfg.tokenizer)
    out = work / f"tokenizer-{cfg.tokenizer_kind}-{cfg.vocab_size}-seed{cfg.seed}"
    if (out / "tokenizer.model").is_file() or (out / "tokenizer_config.json").is_file():
        return out
    from minillm.corpora import iter_texts
    from minillm.tokenizer import SentencePieceTokenizer

    def sample(limit=40_000_000):  # the first ~40 MB of documents
        n = 0
        for text in iter_texts(corpus_files(corpus_dir, "parquet")):
            yield text
            n += len(text)
            if n >= limit:
                return
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.tokenizer_kind == "bytelevel":
        train_bytelevel(sample(), out, cfg.vocab_size)
    else:
        SentencePieceTokenizer.train(sample(), out / "tokenizer", cfg.vocab_size,
                                     num_threads=cfg.workers).save_pretrained(out)
    print(f"  trained a {cfg.vocab_size}-token {cfg.tokenizer_kind} tokenizer in {time.time() - t0:.0f} s -> {out}",
          flush=True)
    return out


# ----------------------------------------------------------------------------- measurements (subprocesses)

CEILING = r"""
import json, multiprocessing, resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq
mode, tok_dir, threads, files = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
texts = [t for f in files for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]
batches = [texts[i:i + 1000] for i in range(0, len(texts), 1000)]
spm_file = tok_dir / "tokenizer.model" if tok_dir.is_dir() else tok_dir
if spm_file.is_file():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    encode, kind = (lambda batch: sp.encode(batch, num_threads=1 if mode == "processes" else threads)), "sentencepiece"
else:
    import tokenizers  # reads RAYON_NUM_THREADS, set by the caller
    tk = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    encode, kind = (lambda batch: [e.ids for e in tk.encode_batch(batch, add_special_tokens=False)]), "tokenizers"
def share(k):  # every `threads`-th batch from the k-th
    return sum(len(ids) for batch in batches[k::threads] for ids in encode(batch))
t0, cpu0 = time.perf_counter(), time.process_time()
if mode == "processes":  # forked after loading: the texts are shared, nothing is sent
    with multiprocessing.get_context("fork").Pool(threads) as pool:
        n_tokens = sum(pool.map(share, range(threads)))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 -= children.ru_utime + children.ru_stime
else:
    n_tokens = sum(map(len, (ids for batch in batches for ids in encode(batch))))
seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(json.dumps({"kind": kind, "docs": len(texts), "text_tokens": n_tokens, "seconds": seconds, "cpu_seconds": cpu}))
"""

# Peak RSS: VmHWM, per process (getrusage's ru_maxrss would include the RSS of the parent that forked it).
# The workers' is polled every 0.2 s from here (their peak in the last 0.2 s of their life may be missed).
PREPARE = r"""
import json, os, resource, sys, threading, time
def hwm_mb(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return 0.0
workers = {}
def poll():
    me = str(os.getpid())
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = f.read().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if ppid == me:
                workers[pid] = max(workers.get(pid, 0.0), hwm_mb(pid))
        time.sleep(0.2)
threading.Thread(target=poll, daemon=True).start()
from minillm.prepare import main
cpu0 = time.process_time()
main(sys.argv[1:])
children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined by now
print(json.dumps({"main_rss_mb": hwm_mb(), "worker_rss_mb": max(workers.values(), default=0.0),
                  "cpu_seconds": time.process_time() - cpu0 + children.ru_utime + children.ru_stime}))
"""


def run_json(args: list[str], env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[1:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_ceiling(cfg, tok: Path, corpus_dir: Path, mode: str) -> dict:
    r = run_json([CEILING, mode, str(tok), str(cfg.workers), *corpus_files(corpus_dir, "parquet")],
                 {"RAYON_NUM_THREADS": str(1 if mode == "processes" else cfg.workers), "TOKENIZERS_PARALLELISM": "true"})
    return {**r, "tokens_per_s": r["text_tokens"] / r["seconds"]}


def measure_prepare(cfg, tok: Path, corpus_dir: Path, fmt: str, work: Path) -> dict:
    out = work / f"out-{fmt}"
    for p in out.glob("*") if out.is_dir() else []:
        p.unlink()  # a re-run would be a no-op
    t0 = time.perf_counter()
    r = run_json([PREPARE, "--tokenizer", str(tok), "--input", *corpus_files(corpus_dir, fmt), "--out", str(out),
                  "--workers", str(cfg.workers)])
    wall = time.perf_counter() - t0
    meta = json.loads((out / "meta.json").read_text())
    return {**r, "docs": meta["num_docs"], "text_tokens": meta["num_text_tokens"], "seconds": meta["seconds"],
            "wall_seconds": wall, "tokens_per_s": meta["num_text_tokens"] / meta["seconds"]}


def main(argv=None):
    cfg = parse_options(BenchOptions, argv, prog="bench/bench_prepare.py", description=__doc__.split("\n\n")[0])
    work = Path(cfg.work)
    corpus_dir = work / f"corpus-{cfg.corpus_mb}MB-{cfg.files}files-seed{cfg.seed}"
    print(f"corpus: {corpus_dir}", flush=True)
    info = generate_corpus(cfg, corpus_dir)
    print(f"  {info['docs']:,} documents, {info['text_bytes'] / 1e6:,.0f} MB of text", flush=True)
    tok = tokenizer_dir(cfg, work, corpus_dir)
    print(f"tokenizer: {tok}; {cfg.workers} worker(s) / thread(s); os.cpu_count() = {os.cpu_count()}", flush=True)
    print(f"{'round':>5} {'what':<10} {'text tokens':>13} {'s':>8} {'tokens/s':>11} {'of ceiling':>10} "
          f"{'CPU s':>8} {'CPU effic.':>10} {'busy':>5} {'main RSS MB':>11} {'worker RSS MB':>13} {'load':>5}", flush=True)
    with open(work / "results.jsonl", "a") as log:
        for rnd in range(1, cfg.rounds + 1):
            ceiling = None
            for what in sorted(cfg.measure, key=lambda m: m != "ceiling"):  # the ceiling first
                r = measure_ceiling(cfg, tok, corpus_dir, CEILINGS[what]) if what in CEILINGS else \
                    measure_prepare(cfg, tok, corpus_dir, what, work)
                ceiling = r if what == "ceiling" else ceiling
                r.update(round=rnd, what=what, workers=cfg.workers, corpus_mb=cfg.corpus_mb, tokenizer=str(tok),
                         of_ceiling=r["tokens_per_s"] / ceiling["tokens_per_s"], load_avg=os.getloadavg()[0],
                         cpu_of_ceiling=ceiling["cpu_seconds"] / ceiling["text_tokens"] * r["text_tokens"]
                         / r["cpu_seconds"], busy=r["cpu_seconds"] / r["seconds"] / cfg.workers,
                         date=time.strftime("%Y-%m-%d %H:%M:%S"))
                log.write(json.dumps(r) + "\n")
                log.flush()
                main_rss = f"{r['main_rss_mb']:11.0f}" if "main_rss_mb" in r else f"{'':>11}"
                worker = f"{r['worker_rss_mb']:13.0f}" if "worker_rss_mb" in r else f"{'':>13}"
                print(f"{rnd:>5} {what:<10} {r['text_tokens']:>13,} {r['seconds']:>8.1f} {r['tokens_per_s']:>11,.0f} "
                      f"{r['of_ceiling']:>10.1%} {r['cpu_seconds']:>8.0f} {r['cpu_of_ceiling']:>10.1%} {r['busy']:>5.0%} "
                      f"{main_rss} "
                      f"{worker} {r['load_avg']:>5.1f}", flush=True)



if __name__ == "__main__":
    main()
