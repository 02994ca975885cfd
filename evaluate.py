"""Evaluate a model on a battery of local task files; write results JSON, predictions and a Markdown table.

Task files (`<name>.task.json`, schemas in the README's evaluation section) name a task type: perplexity,
multiple_choice, qa, translation, gec or safety. Nothing is downloaded: benchmark data is read from disk.

    python evaluate.py --model runs/demo/sft/model --tasks data/sample/eval/*.task.json --prompt-format chat
    python evaluate.py --model llama-2-7b-hf --tasks data/sample/eval --prompt-format raw --batch-size 16
    python evaluate.py --config my_eval.json --max-new-tokens 64
    python evaluate.py --compare results/base/results.json results/sft/results.json results/orpo/results.json

Options come from the EvalOptions defaults below, then `--config FILE.json`, then `--name value` flags
(`--tasks` and `--compare` take several values). For each task every prompt template is scored; with
several templates the table also gives best / median / worst, and when the task has dev_data the template
that scores best on dev is the one reported (LLAMMAS section 5.6); otherwise the task's first template is.

Output in --out: results.json (rewritten atomically after every task, so a crash loses nothing already
done; a task that fails is logged and recorded as an error entry), predictions/<task>.jsonl (one line per
example and template) and results.md (the table also printed at the end).
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import time
import traceback
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

import minillm
from minillm.files import atomic_write
from minillm.generate import check_sampling
from minillm.hf import load_pretrained
from minillm.judge import Judge
from minillm.metrics import degenerate_outputs
from minillm.options import cli, parse_options, require_option
from minillm.tasks import TASK_TYPES
from minillm.tasks.common import EvalContext, GenerationOptions, load_task
from minillm.tokenizer import check_vocab_fits, load_tokenizer


@dataclass(kw_only=True)
class EvalOptions(GenerationOptions):
    # what to evaluate
    model: str = ""  # Hugging Face layout directory (a minillm export or any HF Llama checkpoint)
    tokenizer: str = ""  # tokenizer directory (tokenizer.model or tokenizer.json); '' = the model directory
    tasks: list[str] = field(default_factory=lambda: ["data/sample/eval"])  # task files or directories of them
    # how to prompt
    prompt_format: Literal["raw", "chat", "alpaca"] = "raw"  # chat (the layout of the model's chat template, else of its tokenizer's markers: tulu, llama3, chatml, mistral), alpaca, or raw for base models
    system_prompt: str = ""  # chat format only: a system turn before every prompt
    few_shot: int = -1  # demonstrations per prompt; -1 = each task file's own "few_shot"
    mc_mode: Literal["", "loglik", "generate"] = ""  # multiple choice by log-likelihood or by generating; '' = each task file's "mode"
    limit: int = 0  # score only the first N records of each split (0 = all): for quick checks
    # hardware (generation options: minillm.tasks.common.GenerationOptions)
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"  # auto = bfloat16 on GPUs that support it, else float32; float64 for exact comparisons with a reference
    # output
    out: str = "results"  # directory for results.json, results.md and predictions/
    progress: bool = True  # a tqdm bar per task
    compare: list[str] = field(default_factory=list)  # two or more results.json files: print them side by side and exit
    # LLM-as-a-judge for QA and generated multiple choice (minillm.judge); API key: $MINILLM_JUDGE_API_KEY
    judge_url: str = ""  # base URL of an OpenAI-compatible API, e.g. http://host:8000/v1; '' = no judge
    judge_model: str = ""  # the model name the judge endpoint serves
    judge_prompt: str = ""  # judge prompt file with {question}, {reference}, {answer}; '' = minillm/judge_prompt.txt
    judge_cache: str = ""  # directory of cached judgements; '' = OUT/judge_cache
    judge_concurrency: int = 4  # judge requests in flight at once
    judge_retries: int = 4  # retries of a failed judge request (exponential backoff from 1 s)
    judge_max_tokens: int = 512  # longest judge reply (its reasoning, then the verdict)


    def check(self):
        if self.compare:
            require_option(len(self.compare) >= 2, "compare", self.compare, "takes two or more results files")
            return
        require_option(bool(self.model), "model", self.model, "is required (a Hugging Face layout directory)")
        require_option(bool(self.tasks), "tasks", self.tasks, "needs at least one task file or directory")
        for name in ("batch_size", "max_new_tokens"):
            require_option(getattr(self, name) >= 1, name, getattr(self, name), "must be at least 1")
        require_option(self.limit >= 0, "limit", self.limit, "must be >= 0 (0 = all)")
        require_option(self.few_shot >= -1, "few_shot", self.few_shot, "must be >= 0, or -1 for each task file's own")
        check_sampling(self)
        require_option(bool(self.judge_model) or not self.judge_url, "judge_model", self.judge_model,
                       "is required with --judge-url (the model name the endpoint serves)")
        require_option(bool(self.judge_url) or not self.judge_model, "judge_url", self.judge_url,
                       "is required with --judge-model")
        require_option(self.judge_concurrency >= 1, "judge_concurrency", self.judge_concurrency, "must be at least 1")
        require_option(self.judge_retries >= 0, "judge_retries", self.judge_retries, "must be >= 0")
        require_option(self.judge_max_tokens >= 1, "judge_max_tokens", self.judge_max_tokens, "must be at least 1")


def task_files(paths: list[str]) -> list[Path]:
    """Task files named directly, plus every *.task.json inside named directories (sorted)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.task.json"))
            if not found:
                raise ValueError(f"{p}: no *.task.json files in this directory")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such task file")
    return files


# ----------------------------------------------------------------------------- one task

def metric_entries(metrics: dict, n_default: int) -> dict[str, dict]:
    """{"name": value-or-dict} from a task module -> {"name": {"value", "n", ...extras}}."""
    out = {}
    for name, m in metrics.items():
        entry = dict(m) if isinstance(m, dict) else {"value": m}
        entry.setdefault("n", n_default)
        value = entry["value"]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            entry["value"] = None
        elif isinstance(value, bool) or not isinstance(value, int):  # counts (empty_outputs) stay ints
            entry["value"] = float(value)
        out[name] = entry
    return out


def direction(module, metric: str) -> bool | None:
    """True if higher is better, False if lower is, None if neither (verbosity)."""
    return module.HIGHER_IS_BETTER.get(metric.split("[")[0])


def pick_best(values: list[float | None], higher: bool) -> int:
    """Index of the best value (the first on ties); None values never win unless all are None."""
    candidates = [i for i, v in enumerate(values) if v is not None]
    if not candidates:
        return 0
    return (max if higher else min)(candidates, key=lambda i: (values[i], -i) if higher else (values[i], i))


def judged(judge: Judge | None, module, spec: dict, metrics: dict, preds: list[dict]) -> dict:
    """With a judge and a task type it grades (QA, generated multiple choice): the judge's metrics added to
    `metrics`, its verdict to each prediction."""
    items = module.judge_items(spec, "", preds) if judge and hasattr(module, "judge_items") else None
    if not items:
        return metrics
    judge_metrics, verdicts = judge.grade(items)
    for pred, verdict in zip(preds, verdicts):
        pred.update(verdict)
    return {**metrics, **judge_metrics}


def evaluate_task(ctx: EvalContext, spec: dict, judge: Judge | None = None) -> tuple[list[dict], list[dict]]:
    """Score every template of a task on its test data (and pick the reported one on dev data; the judge
    grades test data only). Returns (result rows, predictions)."""
    module = TASK_TYPES[spec["type"]]
    templates, name = spec["templates"], spec["name"]
    tnames = [f"t{i}" for i in range(len(templates))]
    per_template, predictions = [], []
    for i, template in enumerate(templates):
        metrics, preds = module.run(ctx, spec, template, "", f"{name} {tnames[i]}")
        metrics = judged(judge, module, spec, metrics, preds)
        per_template.append(metric_entries(metrics, len(spec["records"])))
        predictions += [{"task": name, "template": tnames[i], **p} for p in preds]

    selected, dev_values = 0, None
    if len(templates) > 1 and spec.get("dev_records"):
        dev_values = []
        for i, template in enumerate(templates):
            metrics = metric_entries(module.run(ctx, spec, template, "dev_", f"{name} {tnames[i]} (dev)")[0], 0)
            dev_values.append(metrics.get(module.PRIMARY, {}).get("value"))
        selected = pick_best(dev_values, direction(module, module.PRIMARY) is not False)

    base = {"task": name, "type": spec["type"], "language": spec.get("language")}
    rows = []
    for i, metrics in enumerate(per_template):
        for metric, entry in metrics.items():
            row = {**base, "metric": metric, **entry, "template": tnames[i], "headline": i == selected}
            if i == selected and dev_values is not None:
                row["selected_on"] = "dev"
                if metric == module.PRIMARY:  # the dev scores the choice was made on
                    row["dev_values"] = dict(zip(tnames, dev_values))
            rows.append(row)
    if len(templates) > 1:  # prompt robustness: the spread over templates
        for metric in per_template[0]:
            values = [m.get(metric, {}).get("value") for m in per_template]
            present = [v for v in values if v is not None]
            if not present:
                continue
            n = per_template[0][metric]["n"]
            rows.append({**base, "metric": metric, "value": statistics.median(present), "n": n,
                         "template": "median", "headline": False})
            higher = direction(module, metric)
            if higher is not None:
                for label, best in (("best", higher), ("worst", not higher)):
                    i = pick_best(values, best)
                    rows.append({**base, "metric": metric, "value": values[i], "n": n, "template": label,
                                 "of_template": tnames[i], "headline": False})
    return rows, predictions


# ----------------------------------------------------------------------------- output

def write_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def safe_file_name(name: str) -> str:
    """A task name as a file name inside --out: runs of characters other than letters, digits, '-', '_' and
    '.' become '_', and leading or trailing dots go, so no name can write (or delete) outside --out."""
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.ASCII).strip("._")
    return cleaned[:100] or "task"


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):  # a count
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


# Left out of the printed table to keep it short (results.json has them): mean lengths are shown.
TABLE_SKIPS = ("median_tokens", "median_words", "judge_cache_hits")


def markdown_table(results: dict) -> str:
    """One line per task and metric: the reported (headline) value, its standard error (for corpus metrics
    from a bootstrap), and with several templates best / median / worst over templates. Failed tasks get
    an ERROR line."""
    rows = results["results"]
    spread = {(r["task"], r["metric"], r["template"]): r for r in rows
              if r.get("template") in ("best", "median", "worst")}
    lines = ["| task | metric | value | ± se | n | template | best | median | worst |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['task']} | ERROR | {r['error'].splitlines()[0][:100]} | | | | | | |")
            continue
        if not r.get("headline") or r["metric"] in TABLE_SKIPS:
            continue
        template = r["template"] + (" (dev)" if r.get("selected_on") == "dev" else "")
        cells = [format_value(spread[(r["task"], r["metric"], k)]["value"]) if (r["task"], r["metric"], k) in spread
                 else "" for k in ("best", "median", "worst")]
        lines.append(f"| {r['task']} | {r['metric']} | {format_value(r['value'])} | {format_value(r.get('stderr'))} | "
                     f"{r['n']} | {template} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline_rows(results: dict) -> dict:
    """{(task, metric): the headline row} of one results file ((task, "ERROR"): None for a failed task)."""
    out = {}
    for r in results["results"]:
        if "error" in r:
            out[(r["task"], "ERROR")] = None
        elif r.get("headline"):
            out[(r["task"], r["metric"])] = r
    return out


def compare_table(runs: list[tuple[str, dict]]) -> str:
    """The headline values of several runs (name, results) side by side, each with its standard error
    (± se), the number of items (n; "60/20" when the runs differ), and for two runs the difference B - A."""
    heads = [headline_rows(results) for _, results in runs]
    keys = [key for key in dict.fromkeys(key for head in heads for key in head) if key[1] not in TABLE_SKIPS]
    letters = [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(runs))]
    lines = [f"{letter} = {name} ({results.get('model', '?')})" for letter, (name, results) in zip(letters, runs)]
    delta = len(runs) == 2
    lines += ["", "| task | metric | n | " + " | ".join(letters) + (" | B - A |" if delta else " |"),
              "|---|---|---|" + "---|" * (len(runs) + delta)]
    for key in keys:
        rows = [head.get(key, "missing") for head in heads]
        found = [r for r in rows if isinstance(r, dict)]
        n = "/".join(dict.fromkeys(str(r["n"]) for r in found if r.get("n") is not None))
        cells = []
        for r in rows:
            if not isinstance(r, dict):
                cells.append("failed" if r is None else r)  # the task failed in this run, or is not in it
            else:
                se = r.get("stderr")
                cells.append(format_value(r["value"]) + (f" ± {format_value(se)}" if se is not None else ""))
        line = f"| {key[0]} | {key[1]} | {n} | " + " | ".join(cells) + " |"
        if delta:
            va, vb = (r.get("value") if isinstance(r, dict) else None for r in rows)
            line += f" {vb - va:+.4f} |" if va is not None and vb is not None else "  |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def read_results(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results file: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), list):
        raise ValueError(f"{path}: not a results file written by evaluate.py (no 'results' list)")
    return results


# ----------------------------------------------------------------------------- main

def load_model(cfg: EvalOptions):
    try:
        device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {cfg.device!r}: {e}") from None
    if cfg.dtype == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}[cfg.dtype]
    if dtype == torch.float64:  # checkpoints are never float64: load float32 (exactly), then widen
        model = load_pretrained(cfg.model, dtype=torch.float32, device=device).double()
    else:
        model = load_pretrained(cfg.model, dtype=dtype, device=device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    check_vocab_fits(tokenizer, model.config.vocab_size)
    model.eval()
    return model, tokenizer


def run(cfg: EvalOptions) -> dict:
    """Evaluate every task; returns the results dict (also written to cfg.out)."""
    # Read and check every task file before loading the model: a typo fails in a second, not an hour in.
    specs = []
    for path in task_files(cfg.tasks):
        specs.append(load_task(path, TASK_TYPES, mc_mode=cfg.mc_mode or None, limit=cfg.limit))
    files = [safe_file_name(s["name"]) for s in specs]
    for spec, file in zip(specs, files):
        if files.count(file) > 1:
            raise ValueError(f"two task files are named {spec['name']!r} (as a file name: {file!r}): "
                             + ", ".join(s["spec_path"] for s, f in zip(specs, files) if f == file))

    out = Path(cfg.out)
    judge = None
    if cfg.judge_url:  # the prompt file is read (and checked) now, before the model is loaded
        judge = Judge(cfg.judge_url, cfg.judge_model, cfg.judge_cache or out / "judge_cache", cfg.judge_prompt,
                      concurrency=cfg.judge_concurrency, retries=cfg.judge_retries, max_tokens=cfg.judge_max_tokens)
    model, tokenizer = load_model(cfg)
    generation = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(GenerationOptions)}
    ctx = EvalContext(model=model, tokenizer=tokenizer, prompt_format=cfg.prompt_format, progress=cfg.progress,
                      few_shot=None if cfg.few_shot < 0 else cfg.few_shot, system_prompt=cfg.system_prompt or None,
                      **generation)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("compare",)}
    results = {"model": cfg.model, "minillm_version": minillm.__version__, "settings": settings,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": []}
    if judge:
        results["judge"] = {"url": cfg.judge_url, "prompt": judge.prompt_path, **judge.describe()}
    who = "/".join(Path(cfg.model).resolve().parts[-2:])  # which model each progress line is about ("sft/model")
    for spec in specs:
        t0 = time.time()
        ctx.generated_tokens, ctx.generation_seconds = 0, 0.0
        try:
            rows, predictions = evaluate_task(ctx, spec, judge)
        except Exception as e:  # one failing task must not cost the others their results
            message = f"{type(e).__name__}: {e}"
            print(f"[{who}: {spec['name']}] FAILED: {message}", file=sys.stderr)
            if os.environ.get("MINILLM_TRACEBACK"):
                traceback.print_exc()
            results["results"].append({"task": spec["name"], "type": spec["type"], "error": message})
            (out / "predictions" / f"{safe_file_name(spec['name'])}.jsonl").unlink(missing_ok=True)  # never stale
        else:
            for row in rows:  # generation speed of the whole task (None where it generated nothing: log-likelihoods)
                row["generated_tokens"] = ctx.generated_tokens
                row["tokens_per_s"] = (round(ctx.generated_tokens / ctx.generation_seconds, 1)
                                       if ctx.generated_tokens else None)
            results["results"] += rows
            write_atomic(out / "predictions" / f"{safe_file_name(spec['name'])}.jsonl",
                         "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
            head = [r for r in rows if r["headline"]][:2]
            print(f"[{who}: {spec['name']}] " + ", ".join(f"{r['metric']} {format_value(r['value'])}" for r in head)
                  + f" ({time.time() - t0:.1f}s)", file=sys.stderr)
            counts = {r["metric"]: r["value"] for r in rows if r["headline"]}
            if warning := degenerate_outputs(counts, len(spec["records"])):
                untuned = (" (expected of a model that was not instruction-tuned: it continues a raw prompt, often with "
                           "nothing)" if cfg.prompt_format == "raw" else "")
                print(f"warning: [{who}: {spec['name']}] {warning}: its scores say little about the model{untuned}",
                      file=sys.stderr)
        results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_atomic(out / "results.json", json.dumps(results, ensure_ascii=False, indent=1) + "\n")
    table = markdown_table(results)
    write_atomic(out / "results.md", table)
    print(table)
    return results


@cli
def main(argv=None):
    cfg = parse_options(EvalOptions, argv, prog="evaluate.py", description=__doc__)
    if cfg.compare:
        print(compare_table([(path, read_results(path)) for path in cfg.compare]))
        return None
    results = run(cfg)
    failed = [r["task"] for r in results["results"] if "error" in r]
    if failed:
        raise ValueError(f"{len(failed)} of {len({r['task'] for r in results['results']})} tasks failed "
                         f"({', '.join(failed)}); the others' results are in {cfg.out}")
    return results


if __name__ == "__main__":
    main()
