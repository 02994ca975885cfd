"""Machine translation (FLORES style), any number of directions in one task file.

Records: {"source", "reference", "src_lang", "tgt_lang"} (language codes such as 'en', 'et', 'pl').
Corpus BLEU and chrF++ are computed with sacreBLEU for each direction separately and reported with
sacreBLEU's signature string (as LLAMMAS does). With several directions in one file, "bleu" and
"chrf++" are the mean over directions and "bleu[en-et]" etc. give each one. Scores are on sacreBLEU's
0-100 scale. BLEU uses the default 13a tokeniser (FLORES-200's spm tokeniser needs a download). Each
score carries a bootstrap over sentences: its standard deviation "stderr" and 95% interval "ci95".
"""
from __future__ import annotations

import math
import sys

from minillm.metrics import BOOTSTRAP_RESAMPLES, bleu, chrf_pp
from minillm.languages import language_name
from minillm.tasks.common import (default_stop, mean, prompt_and_generate, require_field,
                                  verbosity_metrics)

PRIMARY = "chrf++"
HIGHER_IS_BETTER = {"bleu": True, "chrf++": True}


def check_record(record: dict, where: str, spec: dict):
    for name in ("source", "reference", "src_lang", "tgt_lang"):
        require_field(record, where, name, str)


def template_fields(record: dict, spec: dict) -> dict:
    """The record plus {src_name} / {tgt_name}: English names of the languages ('Estonian')."""
    return {**record, "src_name": language_name(record["src_lang"]), "tgt_name": language_name(record["tgt_lang"])}


def default_templates(spec: dict) -> list[str]:
    return ["Translate the following text from {src_name} into {tgt_name}.\n{src_name}: {source}\n{tgt_name}:"]


def gold_answer(record: dict, spec: dict) -> str:
    return record["reference"]


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    prompts, generations = prompt_and_generate(ctx, spec, sys.modules[__name__], template, split,
                                               default_stop(ctx, single_line=True), desc)
    records = spec[split + "records"]
    by_direction: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_direction.setdefault(f"{record['src_lang']}-{record['tgt_lang']}", []).append(i)
    hypotheses = [g["text"].strip() for g in generations]
    metrics = {}
    for direction, rows in by_direction.items():
        hyps, refs = [hypotheses[i] for i in rows], [records[i]["reference"] for i in rows]
        for name, metric in (("bleu", bleu), ("chrf++", chrf_pp)):
            score = metric(hyps, refs, n_bootstrap=BOOTSTRAP_RESAMPLES)  # + a bootstrap 95% interval
            metrics[f"{name}[{direction}]"] = {"value": score.pop("score"), "n": len(rows), **score}
    if len(by_direction) == 1:
        metrics = {key.split("[")[0]: value for key, value in metrics.items()}
    else:
        for name in ("bleu", "chrf++"):
            per = [v for k, v in metrics.items() if k.startswith(name + "[")]
            errors = [v.get("stderr") for v in per]  # directions are independent samples
            stderr = math.sqrt(sum(e * e for e in errors)) / len(per) if None not in errors else None
            metrics[name] = {"value": mean(v["value"] for v in per), "signature": per[0]["signature"], "stderr": stderr}
    metrics.update(verbosity_metrics(generations))
    predictions = [{"line": line, "prompt": prompt, "output": gen["text"], "hypothesis": hyp,
                    "reference": record["reference"], "direction": f"{record['src_lang']}-{record['tgt_lang']}",
                    "n_tokens": gen["n_tokens"]}
                   for record, line, prompt, gen, hyp in zip(records, spec[split + "lines"], prompts, generations,
                                                              hypotheses)]
    return metrics, predictions
