"""Multiple choice: COPA / EstCOPA style or a generic question with choices.

Records: {"premise", "question": "cause"|"effect", "choices": [...], "label": int} (COPA) or
{"question", "choices": [...], "label": int} (generic); label is the 0-based index of the right choice.

Two ways to score, picked by the task's "mode" (or evaluate.py --mc-mode):
- loglik (default): the sum of the model's log-probabilities of each choice's tokens after the prompt
  (the choice text comes from the task's "choice_format"). The metrics are lm-evaluation-harness's, with
  its definitions (lm_eval/api/task.py, multiple_choice): acc = argmax of that sum; acc_norm = argmax of the
  sum divided by the number of characters of the choice without the target delimiter (the whitespace
  choice_format starts with, " " by default), which stops long choices from being penalised for their extra
  tokens; acc_bytes = the same divided by the choice's UTF-8 bytes (again without the delimiter).
- generate: the prompt lists lettered choices ({choices_block}); the model's answer is matched to a choice
  by its text or its letter (see match_choice). Reports acc and verbosity.
"""
from __future__ import annotations

import re
import sys

from minillm.judge import JudgeItem
from minillm.metrics import normalize_answer
from minillm.tasks.common import (continuation_logprobs, default_stop, demonstrations, encode_choice,
                                  fill_template, mean_metric, prompt_and_generate, prompt_words, require_field,
                                  require_str_list, verbosity_metrics)

PRIMARY = "acc"
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "acc_bytes": True, "judge_acc": True}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# COPA connectors ("The man broke his toe because ...") and questions, per language.
COPA_WORDS = {
    "en": {"cause": "because", "effect": "therefore",
           "cause_question": "What was the cause?", "effect_question": "What happened as a result?"},
    "et": {"cause": "sest", "effect": "seetõttu",
           "cause_question": "Mis oli selle põhjus?", "effect_question": "Mis juhtus selle tagajärjel?"},
    "pl": {"cause": "ponieważ", "effect": "dlatego",
           "cause_question": "Co było przyczyną?", "effect_question": "Co stało się w rezultacie?"},
}


def is_copa(spec: dict) -> bool:
    return "premise" in spec["records"][0]


def check_spec(spec: dict, where):
    """where(key) -> 'FILE:LINE' of that key in the task file."""
    spec.setdefault("mode", "loglik")
    if spec["mode"] not in ("loglik", "generate"):
        raise ValueError(f"{where('mode')}: 'mode' must be 'loglik' or 'generate', got {spec['mode']!r}")
    if "choice_format" in spec and (not isinstance(spec["choice_format"], str) or "{" not in spec["choice_format"]):
        raise ValueError(f"{where('choice_format')}: 'choice_format' must be a string with a {{choice}}, "
                         "{choice_lower} or {letter} placeholder")


def check_record(record: dict, where: str, spec: dict):
    if "premise" in record:
        require_field(record, where, "premise", str)
        question = require_field(record, where, "question", str)
        if question not in ("cause", "effect"):
            raise ValueError(f"{where}: field 'question' must be 'cause' or 'effect' in a COPA record, "
                             f"got {question!r}")
    else:
        require_field(record, where, "question", str)
    choices = require_str_list(record, where, "choices")
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: field 'choices' needs 2 to {len(LETTERS)} choices, got {len(choices)}")
    label = require_field(record, where, "label", int)
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} out of range for {len(choices)} choices (0..{len(choices) - 1})")


def template_fields(record: dict, spec: dict) -> dict:
    """The record's fields plus {choices_block} ('A. ...' lines), {answer_word}, and for COPA records
    {premise_stem} (premise without final punctuation), {connector} and {question_text}."""
    fields = dict(record)
    fields["choices_block"] = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, record["choices"]))
    fields["answer_word"] = prompt_words(spec)["answer"]
    if "premise" in record:
        words = COPA_WORDS.get(spec.get("language"), COPA_WORDS["en"])
        fields["premise_stem"] = record["premise"].rstrip().rstrip(".!?")
        fields["connector"] = words[record["question"]]
        fields["question_text"] = words[record["question"] + "_question"]
    return fields


def default_templates(spec: dict) -> list[str]:
    copa, generate = is_copa(spec), spec.get("mode") == "generate"
    if copa and not generate:
        return ["{premise_stem} {connector}"]  # lm-evaluation-harness's COPA prompt
    if copa:
        return ["{premise}\n{question_text}\n{choices_block}\n{answer_word}:"]
    if not generate:
        return [f"{prompt_words(spec)['question']}: {{question}}\n{{answer_word}}:"]
    return [f"{prompt_words(spec)['question']}: {{question}}\n{{choices_block}}\n{{answer_word}}:"]


def choice_format(spec: dict) -> str:
    """How a choice is written after the prompt in loglik mode: COPA choices are full sentences that
    continue "... because", so their first letter is lowercased (as lm-evaluation-harness does)."""
    return spec.get("choice_format") or (" {choice_lower}" if is_copa(spec) else " {choice}")


def choice_text(spec: dict, record: dict, j: int) -> str:
    choice = record["choices"][j]
    fields = {"choice": choice, "choice_lower": choice[:1].lower() + choice[1:], "letter": LETTERS[j]}
    return fill_template(choice_format(spec), fields, f"{spec['spec_path']}: choice_format")


def choice_without_delimiter(spec: dict, record: dict, j: int) -> str:
    """The choice as lm-evaluation-harness's doc_to_choice gives it, which is what its acc_norm and acc_bytes
    measure: choice_text without the target delimiter, i.e. the whitespace the choice_format starts with."""
    fmt = choice_format(spec)
    delimiter = fmt[:len(fmt) - len(fmt.lstrip())]
    return choice_text(spec, record, j).removeprefix(delimiter)


def gold_answer(record: dict, spec: dict) -> str:
    """The demonstration answer for few-shot prompts."""
    if spec.get("mode") == "generate":
        return LETTERS[record["label"]]
    return choice_text(spec, record, record["label"]).strip()


_LETTER_ANSWER = re.compile(r"^\(?([A-Z])\)?\s*(?:[.):]|$)")


def match_choice(output: str, choices: list[str], language: str) -> int:
    """Index of the choice a generated answer names, or -1.

    In order: the answer IS a choice's text (after SQuAD normalisation); the answer is a letter
    ('B', 'B.', '(B)', 'B: ...'); the answer contains a choice's text (the earliest one, longest on ties).
    Text first, so a choice that itself starts with "A ..." is not read as the letter A."""
    answer = normalize_answer(output, language)
    normalised = [normalize_answer(c, language) for c in choices]
    for j, c in enumerate(normalised):
        if answer == c:
            return j
    letter = _LETTER_ANSWER.match(output.strip())
    if letter and LETTERS.index(letter.group(1)) < len(choices):
        return LETTERS.index(letter.group(1))
    found = [(answer.find(c), -len(c), j) for j, c in enumerate(normalised) if c and c in answer]
    return min(found)[2] if found else -1


_BARE_LETTER = re.compile(r"^\(?([A-Z])\)?[.):]?$")


def exact_choice(output: str, choices: list[str], language: str) -> int:
    """Index of the choice the answer is exactly (its text after SQuAD normalisation, or its bare letter
    'B', 'B.', '(B)'), else -1: what string matching decides before a judge is asked."""
    answer = normalize_answer(output, language)
    for j, choice in enumerate(choices):
        if answer == normalize_answer(choice, language):
            return j
    letter = _BARE_LETTER.match(output.strip())
    return LETTERS.index(letter.group(1)) if letter and LETTERS.index(letter.group(1)) < len(choices) else -1


def judge_items(spec: dict, split: str, predictions: list[dict]) -> list[JudgeItem] | None:
    """For evaluate.py --judge-url, generate mode only: an answer that is exactly one choice is decided by
    string matching (right or wrong); any other goes to the judge with the right choice as the reference."""
    if spec.get("mode") != "generate":
        return None
    items = []
    for record, pred in zip(spec[split + "records"], predictions):
        fields = template_fields(record, spec)
        question = (f"{record['premise']}\n{fields['question_text']}" if "premise" in record else record["question"])
        question += "\n" + fields["choices_block"]
        exact = exact_choice(pred["output"], record["choices"], spec.get("language", "en"))
        items.append(JudgeItem(question=question, answer=pred["output"].strip(),
                               reference=f"{LETTERS[record['label']]}. {record['choices'][record['label']]}",
                               string_verdict=None if exact < 0 else exact == record["label"]))
    return items


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    if spec.get("mode") == "generate":
        return _run_generate(ctx, spec, template, split, desc)
    return _run_loglik(ctx, spec, template, split, desc)


def _run_loglik(ctx, spec, template, split, desc):
    records, lines = spec[split + "records"], spec[split + "lines"]
    k = ctx.shots(spec)
    requests, owners, prompts = [], [], []
    for i, (record, line) in enumerate(zip(records, lines)):
        prompt = fill_template(template, template_fields(record, spec), f"{spec[split + 'data_path']}:{line}")
        shots = demonstrations(spec, sys.modules[__name__], template, i, k, ctx.seed, split)
        for j in range(len(record["choices"])):
            requests.append(encode_choice(ctx, prompt, shots, choice_text(spec, record, j)))
            owners.append(i)
        prompts.append(ctx.tokenizer.decode(requests[-1][0]))  # what the model saw before the choice
    scores = continuation_logprobs(ctx, requests, desc)
    per_record: list[list[float]] = [[] for _ in records]
    for i, score in zip(owners, scores):
        per_record[i].append(score)
    predictions, correct = [], {"acc": [], "acc_norm": [], "acc_bytes": []}
    for i, (record, line) in enumerate(zip(records, lines)):
        choices = [choice_without_delimiter(spec, record, j) for j in range(len(record["choices"]))]
        chars, n_bytes = [len(c) for c in choices], [len(c.encode("utf-8")) for c in choices]
        s = per_record[i]
        # max() keeps the first of equal values, as numpy's argmax in lm-evaluation-harness does
        pred = max(range(len(s)), key=lambda j: s[j])
        pred_norm = max(range(len(s)), key=lambda j: s[j] / chars[j])
        pred_bytes = max(range(len(s)), key=lambda j: s[j] / n_bytes[j])
        for name, p in (("acc", pred), ("acc_norm", pred_norm), ("acc_bytes", pred_bytes)):
            correct[name].append(p == record["label"])
        predictions.append({"line": line, "prompt": prompts[i], "logprobs": s, "choice_chars": chars,
                            "choice_bytes": n_bytes, "pred": pred, "pred_norm": pred_norm, "pred_bytes": pred_bytes,
                            "label": record["label"], "correct": correct["acc"][-1]})
    return {name: mean_metric(hits) for name, hits in correct.items()}, predictions


def _run_generate(ctx, spec, template, split, desc):
    prompts, generations = prompt_and_generate(ctx, spec, sys.modules[__name__], template, split,
                                               default_stop(ctx, single_line=True), desc)
    records, lines = spec[split + "records"], spec[split + "lines"]
    predictions, correct = [], []
    for record, line, prompt, gen in zip(records, lines, prompts, generations):
        pred = match_choice(gen["text"], record["choices"], spec.get("language", "en"))
        correct.append(pred == record["label"])
        predictions.append({"line": line, "prompt": prompt, "output": gen["text"], "pred": pred,
                            "label": record["label"], "correct": correct[-1], "n_tokens": gen["n_tokens"]})
    return {"acc": mean_metric(correct), **verbosity_metrics(generations)}, predictions
