"""Grammatical error correction.

Records: {"source": erroneous sentence, "references": [one or more corrected versions]}. The model
rewrites the sentence; edits are extracted by token alignment of source->output and source->reference
and scored as precision, recall and F0.5 (minillm.metrics.gec_scores explains how this differs from the
M2 scorer and ERRANT). Edit counts are summed over the corpus before P/R/F are computed; their standard
errors and 95% intervals come from resampling sentences (minillm.metrics.gec_bootstrap).
"""
from __future__ import annotations

import sys

from minillm.metrics import gec_bootstrap, gec_scores
from minillm.tasks.common import default_stop, prompt_and_generate, require_field, require_str_list, verbosity_metrics

PRIMARY = "f0.5"
HIGHER_IS_BETTER = {"precision": True, "recall": True, "f0.5": True}

DEFAULT_PROMPTS = {
    "en": "Correct the grammatical and spelling errors in this sentence.\nSentence: {source}\nCorrected:",
    "et": "Paranda selle lause grammatika- ja õigekirjavead.\nLause: {source}\nParandatud:",
    "pl": "Popraw błędy gramatyczne i ortograficzne w tym zdaniu.\nZdanie: {source}\nPoprawione:",
}


def check_record(record: dict, where: str, spec: dict):
    require_field(record, where, "source", str)
    require_str_list(record, where, "references")


def template_fields(record: dict, spec: dict) -> dict:
    return dict(record)


def default_templates(spec: dict) -> list[str]:
    return [DEFAULT_PROMPTS.get(spec.get("language"), DEFAULT_PROMPTS["en"])]


def gold_answer(record: dict, spec: dict) -> str:
    return record["references"][0]


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    prompts, generations = prompt_and_generate(ctx, spec, sys.modules[__name__], template, split,
                                               default_stop(ctx, single_line=True), desc)
    records = spec[split + "records"]
    hypotheses = [g["text"].strip() for g in generations]
    scores = gec_scores([r["source"] for r in records], hypotheses, [r["references"] for r in records])
    intervals = gec_bootstrap(scores["per_sentence"])  # sentences resampled: stderr and 95% interval
    metrics = {name: {"value": scores[name], **intervals[name]} for name in ("precision", "recall", "f0.5")}
    metrics.update(verbosity_metrics(generations))
    predictions = []
    for record, line, prompt, gen, hyp in zip(records, spec[split + "lines"], prompts, generations, hypotheses):
        one = gec_scores([record["source"]], [hyp], [record["references"]])
        predictions.append({"line": line, "prompt": prompt, "output": gen["text"], "source": record["source"],
                            "references": record["references"], "tp": one["tp"], "fp": one["fp"], "fn": one["fn"],
                            "n_tokens": gen["n_tokens"]})
    return metrics, predictions
