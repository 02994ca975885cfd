"""evaluate.py vs lm-evaluation-harness's `hf` model: wall time on the same items, with the same numbers.

The model: an exported model (default runs/demo/pretrain/model, written by `make demo`), raw prompts (a base
model's evaluation), fp32. The items: the sample world's facts_et (multiple choice by log-likelihood) and
mt_en_et / mt_et_en (greedy translation of one line, at most --max-new-tokens), written as minillm task files with
one template and no dev split (so each tool scores each prompt once) and as lm-eval task configs (YAML) over the
same JSONL files. Both run in this process with the same batch size, alternating: one untimed round (imports,
lm-eval's data cache), then --rounds timed ones; each time is the whole call (loading the model and the data,
scoring, metrics with their default standard errors), as a user would time it after `import`.

Asserted every round (a faster evaluator that scores something else would not be measuring the same thing):
multiple choice correct item for item and the same acc; translations equal item for item (after stripping
whitespace); BLEU equal to 1e-9.

With --random-preset the weights are random (seed 0) at a preset's shape and the vocabulary of --model's
tokenizer: the same items at a size where the model's own work shows (a random model seldom ends a line, so
translations run to --max-new-tokens); its byte-fallback pieces are never generated (see random_model).

    make demo && python bench/bench_evaluate.py --model runs/demo/pretrain/model --data data/sample --rounds 2
    python bench/bench_evaluate.py --model runs/demo/pretrain/model --data data/sample --random-preset small
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from minillm.hf import read_config, save_pretrained  # noqa: E402
from minillm.languages import language_name  # noqa: E402
from minillm.model import Llama, LlamaConfig  # noqa: E402
from minillm.options import cli, parse_options  # noqa: E402
from minillm.tokenizer import load_tokenizer  # noqa: E402


@dataclass(kw_only=True)
class BenchEvaluateOptions:
    model: str = "runs/demo/pretrain/model"  # an exported model directory (make demo writes this one)
    data: str = "data/sample"  # the sample world (make demo writes it): its eval/ holds the items
    batch_size: int = 8  # prompts per forward pass, both tools
    max_new_tokens: int = 128  # longest translation, both tools
    dtype: Literal["float32", "float64"] = "float32"  # both tools
    rounds: int = 2  # timed calls of each tool, alternating
    random_preset: str = ""  # instead of --model's weights: random ones of this shape (PRESETS, e.g. small), its tokenizer
    json: str = ""  # also write the figures to this file


DATA_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""  # an lm-eval task over one local JSONL file
MC_YAML = DATA_YAML + """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
MT_YAML = DATA_YAML + """output_type: generate_until
doc_to_text: {prompt}
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_new_tokens}
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: bleu
"""
TRANSLATION_PROMPT = "Translate the following text from {src} into {tgt}.\n{src}: {{{{source}}}}\n{tgt}:"  # minillm's default


def write_tasks(eval_dir: Path, work: Path, max_new_tokens: int) -> list[str]:
    """facts_et, mt_en_et, mt_et_en as minillm task files (work/tasks) and lm-eval YAML (work/lm_eval_tasks)."""
    tasks, lm_tasks = work / "tasks", work / "lm_eval_tasks"
    tasks.mkdir(parents=True)
    lm_tasks.mkdir()
    names = ["facts_et", "mt_en_et", "mt_et_en"]
    for name in names:
        data = tasks / f"{name}.jsonl"
        shutil.copy(eval_dir / f"{name}.jsonl", data)
        kind = "multiple_choice" if name.startswith("facts") else "translation"
        spec = {"name": name, "type": kind, "language": "et", "data": data.name, "few_shot": 0}
        if kind == "multiple_choice":
            spec["templates"] = ["{question}"]
            yaml = MC_YAML.format(name=name, data=data, cache=work / "hf_cache")
        else:
            first = json.loads(data.read_text(encoding="utf-8").splitlines()[0])
            src, tgt = language_name(first["src_lang"]), language_name(first["tgt_lang"])
            yaml = MT_YAML.format(name=name, data=data, cache=work / "hf_cache", max_new_tokens=max_new_tokens,
                                  prompt=json.dumps(TRANSLATION_PROMPT.format(src=src, tgt=tgt)))
        (tasks / f"{name}.task.json").write_text(json.dumps(spec))
        (lm_tasks / f"{name}.yaml").write_text(yaml)
    return names


def random_model(trained: Path, preset: str, out: Path) -> str:
    """A random model of `preset`'s shape with the trained model's vocabulary, ids and tokenizer files."""
    config, _ = read_config(trained)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_preset(preset, vocab_size=config.vocab_size, bos_id=config.bos_id,
                                          eos_id=config.eos_id, max_seq_len=config.max_seq_len))
    # Byte-fallback pieces get a zero output row, so they are never the argmax (about 1,700 random logits are
    # higher): sentencepiece and Hugging Face decode an invalid UTF-8 byte run differently ('\ufffdI' against
    # '\ufffd\ufffd' for <0xC3><0x49>), which would make equal token ids compare as different texts.
    byte_pieces = [i for i, piece in enumerate(load_tokenizer(trained).pieces()) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)]
    with torch.no_grad():
        model.output.weight[byte_pieces] = 0
    save_pretrained(model, out)
    for f in trained.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return str(out)


def run_minillm(args, work: Path, out: Path) -> dict:
    """{task: (per-item results, headline metrics)} from evaluate.py's files."""
    evaluate.main(["--model", args.model, "--tasks", str(work / "tasks"), "--out", str(out), "--dtype", args.dtype,
                   "--prompt-format", "raw", "--batch-size", str(args.batch_size), "--max-new-tokens",
                   str(args.max_new_tokens), "--progress", "false"])
    rows = json.loads((out / "results.json").read_text())["results"]
    got = {}
    for task in {r["task"] for r in rows}:
        predictions = [json.loads(x) for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
        items = [p["correct"] if "correct" in p else p["hypothesis"].strip() for p in predictions]
        headline = {r["metric"]: r["value"] for r in rows if r["task"] == task and r.get("headline")}
        got[task] = (items, headline.get("acc", headline.get("bleu")))
    return got


def run_lm_eval(args, work: Path, names: list[str]) -> dict:
    lm = HFLM(pretrained=args.model, dtype=args.dtype, batch_size=args.batch_size, device="cpu")
    result = simple_evaluate(model=lm, tasks=names, log_samples=True,  # its default standard errors, as evaluate.py's
                             task_manager=TaskManager(include_path=str(work / "lm_eval_tasks"), include_defaults=False))
    got = {}
    for task in names:
        samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
        if task.startswith("facts"):
            got[task] = ([bool(s["acc"]) for s in samples], result["results"][task]["acc,none"])
        else:
            got[task] = ([s["filtered_resps"][0].strip() for s in samples], result["results"][task]["bleu,strip"])
    return got


def check_same(ours: dict, theirs: dict):
    for task, (items, value) in theirs.items():
        mine, my_value = ours[task]
        differ = [i for i, (a, b) in enumerate(zip(mine, items)) if a != b]
        if len(mine) != len(items) or differ:
            first = differ[0] if differ else 0
            raise SystemExit(f"{task}: items differ at {differ[:5]} ({len(mine)} vs {len(items)} items); "
                             f"item {first}: minillm {mine[first]!r} lm-eval {items[first]!r}")
        if abs(my_value - value) > 1e-9:
            raise SystemExit(f"{task}: minillm {my_value} vs lm-eval {value}")


@cli
def main(argv=None):
    args = parse_options(BenchEvaluateOptions, argv, prog="python bench/bench_evaluate.py",
                         description=__doc__.split("\n\n")[0])
    work = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    try:
        names = write_tasks(Path(args.data) / "eval", work, args.max_new_tokens)
        if args.random_preset:
            args.model = random_model(Path(args.model), args.random_preset, work / "random_model")
        times: dict[str, list[float]] = {"minillm": [], "lm-eval": []}
        for round_ in range(args.rounds + 1):  # round 0 warms up (imports, the data cache) and is not counted
            start = time.perf_counter()
            ours = run_minillm(args, work, work / f"out{round_}")
            mine = time.perf_counter() - start
            start = time.perf_counter()
            theirs = run_lm_eval(args, work, names)
            theirs_seconds = time.perf_counter() - start
            check_same(ours, theirs)
            if round_:
                times["minillm"].append(mine)
                times["lm-eval"].append(theirs_seconds)
            print(json.dumps({"round": round_ or "warm-up", "minillm": round(mine, 2),
                              "lm-eval": round(theirs_seconds, 2),
                              "numbers": {t: round(v, 4) for t, (_, v) in ours.items()}}), flush=True)
        summary = {"model": args.random_preset or args.model, "batch_size": args.batch_size, "rounds": times,
                   "median_seconds": {k: statistics.median(v) for k, v in times.items()},
                   "items": {t: len(items) for t, (items, _) in ours.items()}}
        summary["lm_eval_over_minillm"] = summary["median_seconds"]["lm-eval"] / summary["median_seconds"]["minillm"]
        print(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
