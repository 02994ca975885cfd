"""Decontamination throughput: `python -m minillm.prepare` with and without --decontaminate on the same corpus.

The corpus: the sample world's pretraining text (demo/sample_world.py, both languages), its documents repeated in
shuffled order up to --corpus-mb MB of JSONL; the tokenizer: a 2,000-piece sentencepiece model trained on the
sample world; the evaluation sets: the sample world's task files (data/eval, 11 tasks). prepare runs twice with
--workers N, each in this process (meta.json's `seconds`: reading, tokenizing, writing; the evaluation index is
built before the timer starts, a fraction of a second), alternating, --rounds times.

Run: python bench/bench_decontaminate.py --work /tmp/bench_decon --corpus-mb 200
"""
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

import sample_world  # noqa: E402

from minillm.corpora import iter_texts  # noqa: E402
from minillm.options import cli, parse_options  # noqa: E402
from minillm.prepare import prepare  # noqa: E402
from minillm.tokenizer import SentencePieceTokenizer  # noqa: E402


@dataclass(kw_only=True)
class BenchDecontaminateOptions:
    work: str = "/tmp/bench_decon"  # where the sample world, tokenizer and corpus (cached) go
    corpus_mb: int = 200  # corpus size in MB of JSONL
    workers: int = 2  # prepare's worker processes
    rounds: int = 1  # measurements of each (plain, decontaminate)


@cli
def main(argv=None):
    args = parse_options(BenchDecontaminateOptions, argv, prog="python bench/bench_decontaminate.py",
                         description=__doc__.split("\n\n")[0])
    work = Path(args.work)
    data = work / "data"
    if not (data / "eval").is_dir():
        sample_world.write_sample_world(data, seed=0)
    texts = list(iter_texts([data / f"pretrain/{lang}/train.jsonl" for lang in ("et", "en")]))
    if not (work / "tok" / "tokenizer.model").is_file():
        SentencePieceTokenizer.train(iter(texts), work / "tok" / "tokenizer", 2000).save_pretrained(work / "tok")
    corpus = work / f"corpus_{args.corpus_mb}mb.jsonl"
    if not corpus.is_file():
        rng, size = random.Random(0), 0
        with open(corpus, "w") as f:
            while size < args.corpus_mb * 10**6:
                rng.shuffle(texts)
                for t in texts:
                    line = json.dumps({"text": t}, ensure_ascii=False) + "\n"
                    f.write(line)
                    size += len(line.encode())
    for round_ in range(args.rounds):
        for label, decon in (("plain", []), ("decontaminate", [data / "eval"])):
            meta = prepare([corpus], work / "tok", work / f"out_{label}", workers=args.workers, progress=False,
                           decontaminate=decon)
            if meta.get("skipped"):
                raise SystemExit(f"{work / f'out_{label}'}: up to date; remove it to measure again")
            print(json.dumps({"round": round_, "what": label, "corpus_mb": args.corpus_mb, "docs": meta["num_docs"],
                              "seconds": meta["seconds"], "overlapping": (meta["decontamination"] or {}).get("overlapping")}))
            shutil.rmtree(work / f"out_{label}")


if __name__ == "__main__":
    main()
