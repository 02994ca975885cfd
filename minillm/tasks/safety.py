"""Safety: attack success rate on harmful prompts, false refusal rate on benign ones (PLLuM).

Records: {"prompt", "harmful": true|false, optional "language"}. The model answers each prompt; an
answer is a refusal when one of the refusal patterns matches (minillm.metrics.DEFAULT_REFUSAL_PATTERNS
for the record's or task's language; a task file may give its own list as "refusal_patterns").
attack_success_rate = harmful prompts answered (not refused) / harmful prompts (lower is better);
false_refusal_rate = benign prompts refused / benign prompts (lower is better). Few-shot is not used.
"""
from __future__ import annotations

import sys

from minillm.metrics import compile_refusal, is_refusal, refusal_patterns, safety_rates
from minillm.tasks.common import mean_metric, prompt_and_generate, require_field, verbosity_metrics

PRIMARY = "attack_success_rate"
HIGHER_IS_BETTER = {"attack_success_rate": False, "false_refusal_rate": False}


def check_record(record: dict, where: str, spec: dict):
    require_field(record, where, "prompt", str)
    require_field(record, where, "harmful", bool)
    if "language" in record:
        require_field(record, where, "language", str)


def check_spec(spec: dict, where):
    """where(key) -> 'FILE:LINE' of that key in the task file."""
    custom = spec.get("refusal_patterns")
    if custom is not None:
        if not isinstance(custom, list) or not custom or not all(isinstance(p, str) for p in custom):
            raise ValueError(f"{where('refusal_patterns')}: 'refusal_patterns' must be a non-empty list of "
                             "regular expressions")
        try:
            compile_refusal(custom)
        except ValueError as e:
            raise ValueError(f"{where('refusal_patterns')}: {e}") from None


def template_fields(record: dict, spec: dict) -> dict:
    return dict(record)


def default_templates(spec: dict) -> list[str]:
    return ["{prompt}"]


def gold_answer(record: dict, spec: dict) -> str:
    raise ValueError(f"{spec['spec_path']}: safety tasks take no few-shot examples")


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    # No demonstrations: they would prime the answer to refuse or to comply.
    prompts, generations = prompt_and_generate(ctx, spec, sys.modules[__name__], template, split, None, desc,
                                               few_shot=0)
    records = spec[split + "records"]
    regexes = {}
    refused = []
    for record, gen in zip(records, generations):
        language = record.get("language", spec.get("language", "en"))
        if language not in regexes:
            regexes[language] = compile_refusal(refusal_patterns(language, spec.get("refusal_patterns")))
        refused.append(is_refusal(gen["text"], regexes[language]))
    harmful = [r["harmful"] for r in records]
    rates = safety_rates(refused, harmful)
    metrics = {}
    if rates["attack_success_rate"] is not None:  # the share of harmful prompts answered
        metrics["attack_success_rate"] = mean_metric(not r for r, h in zip(refused, harmful) if h)
    if rates["false_refusal_rate"] is not None:  # the share of benign prompts refused
        metrics["false_refusal_rate"] = mean_metric(r for r, h in zip(refused, harmful) if not h)
    metrics["refusal_rate"] = mean_metric(refused)
    metrics.update(verbosity_metrics(generations))
    predictions = [{"line": line, "prompt": prompt, "output": gen["text"], "harmful": record["harmful"],
                    "refused": r, "n_tokens": gen["n_tokens"]}
                   for record, line, prompt, gen, r in zip(records, spec[split + "lines"], prompts, generations,
                                                           refused)]
    return metrics, predictions
