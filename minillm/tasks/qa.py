"""Extractive question answering (SQuAD / EstQA / XQuAD style).

Records: {"context", "question", "answers": [one or more gold answer strings]}. The model generates an
answer; exact match and token F1 use SQuAD normalisation (minillm.metrics; English article removal
only when the task's language is 'en'), each the best over the gold answers, averaged over questions.
"""
from __future__ import annotations

import sys

from minillm.judge import JudgeItem
from minillm.metrics import exact_match, token_f1
from minillm.tasks.common import (default_stop, mean_metric, prompt_and_generate, prompt_words, require_field,
                                  require_str_list, verbosity_metrics)

PRIMARY = "f1"
HIGHER_IS_BETTER = {"exact_match": True, "f1": True, "judge_acc": True}


def check_record(record: dict, where: str, spec: dict):
    require_field(record, where, "context", str)
    require_field(record, where, "question", str)
    require_str_list(record, where, "answers")


def template_fields(record: dict, spec: dict) -> dict:
    return dict(record)


def default_templates(spec: dict) -> list[str]:
    w = prompt_words(spec)
    return [f"{w['context']}: {{context}}\n{w['question']}: {{question}}\n{w['answer']}:"]


def gold_answer(record: dict, spec: dict) -> str:
    return record["answers"][0]


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    prompts, generations = prompt_and_generate(ctx, spec, sys.modules[__name__], template, split,
                                               default_stop(ctx, single_line=True), desc)
    language = spec.get("language", "en")
    predictions, ems, f1s = [], [], []
    for record, line, prompt, gen in zip(spec[split + "records"], spec[split + "lines"], prompts, generations):
        answer = gen["text"].strip()
        ems.append(exact_match(answer, record["answers"], language))
        f1s.append(token_f1(answer, record["answers"], language))
        predictions.append({"line": line, "prompt": prompt, "output": gen["text"], "answers": record["answers"],
                            "exact_match": ems[-1], "f1": f1s[-1], "n_tokens": gen["n_tokens"]})
    return {"exact_match": mean_metric(ems), "f1": mean_metric(f1s), **verbosity_metrics(generations)}, predictions


def judge_items(spec: dict, split: str, predictions: list[dict]) -> list[JudgeItem]:
    """For evaluate.py --judge-url: an exact match (SQuAD normalisation) is correct without asking; any other
    answer goes to the judge, with the first gold answer as the reference (LLAMMAS: string matching first)."""
    return [JudgeItem(question=f"{record['context']}\n\n{record['question']}", answer=pred["output"].strip(),
                      reference=record["answers"][0], string_verdict=True if pred["exact_match"] else None)
            for record, pred in zip(spec[split + "records"], predictions)]
