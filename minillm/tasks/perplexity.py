"""Perplexity and bits per byte of text documents.

Records: {"text", optional "language"}. Each document is scored as BOS + its tokens (every token
predicted, EOS not); a tokenizer without BOS (Qwen2) starts it with EOS instead, as a document follows the
previous one's EOS in pretraining data (and as lm-evaluation-harness does). Documents longer than the
model's context are scored with a sliding window: each stretch of tokens is predicted with up to
max_seq_len tokens of preceding text as context.
Prompt formats, templates and few-shot do not apply (the template only picks the text: "{text}").

The metrics, over the whole corpus (NLL in nats, summed over documents):
- bits_per_byte = NLL / (ln 2 * UTF-8 bytes), byte_perplexity = exp(NLL / UTF-8 bytes) and
  word_perplexity = exp(NLL / words), words counted as len(re.split(r"\\s+", text)): lm-evaluation-harness's
  loglikelihood_rolling metrics with its definitions (lm_eval/api/task.py count_bytes / count_words,
  api/metrics.py weighted_perplexity / bits_per_byte). The first two do not depend on the tokenizer, so a
  model with an extended vocabulary stays comparable with its base.
- token_perplexity = exp(NLL / tokens): depends on the tokenizer (no lm-eval counterpart).
BOS: minillm scores BOS + text, BOS only as context, never a target. lm-eval's `hf` model scores
prefix_token (BOS) + tok_encode(text); with a tokenizer that adds BOS by itself (Llama's) that is
<s><s>text unless the model is loaded with add_bos_token=False, which gives exactly minillm's scoring.
Documents longer than the context are windowed differently (lm-eval: disjoint windows, one token of
context), so only documents that fit the context compare exactly.
With records of several languages, each also gets "bits_per_byte[et]" etc. Every metric carries a
bootstrap over documents: "stderr" and a 95% interval "ci95".
"""
from __future__ import annotations

import math
import re

from minillm.metrics import bits_per_byte, ratio_bootstrap
from minillm.tasks.common import continuation_logprobs, fill_template, require_field

PRIMARY = "bits_per_byte"
HIGHER_IS_BETTER = {"bits_per_byte": False, "byte_perplexity": False, "word_perplexity": False,
                    "token_perplexity": False}


def check_record(record: dict, where: str, spec: dict):
    require_field(record, where, "text", str)
    if "language" in record:
        require_field(record, where, "language", str)


def template_fields(record: dict, spec: dict) -> dict:
    return dict(record)


def default_templates(spec: dict) -> list[str]:
    return ["{text}"]


def gold_answer(record: dict, spec: dict) -> str:
    raise ValueError(f"{spec['spec_path']}: perplexity tasks take no few-shot examples")


def windows(ids: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that together predict ids[1:] once each. A document that fits
    is one request; a longer one advances by half a context, so every predicted token (after the first
    window) sees at least max_len / 2 tokens before it."""
    if len(ids) - 1 <= max_len:
        return [(ids[:1], ids[1:])]
    stride = max(1, max_len // 2)
    requests = [(ids[:1], ids[1:max_len + 1])]
    start = max_len + 1
    while start < len(ids):
        end = min(start + stride, len(ids))
        requests.append((ids[max(0, end - 1 - max_len):start], ids[start:end]))
        start = end
    return requests


def run(ctx, spec: dict, template: str, split: str = "", desc: str = "") -> tuple[dict, list[dict]]:
    records, lines = spec[split + "records"], spec[split + "lines"]
    texts = [fill_template(template, template_fields(r, spec), f"{spec[split + 'data_path']}:{line}")
             for r, line in zip(records, lines)]
    requests, owners, n_tokens = [], [], []
    for i, text in enumerate(texts):
        tok = ctx.tokenizer
        ids = tok.encode(text, bos=True) if tok.bos_id is not None else [tok.eos_id] + tok.encode(text)
        n_tokens.append(len(ids) - 1)
        for request in windows(ids, ctx.max_len):
            requests.append(request)
            owners.append(i)
    nll = [0.0] * len(texts)
    for i, logprob in zip(owners, _score_nonempty(ctx, requests, desc)):
        nll[i] -= logprob
    n_bytes = [len(t.encode("utf-8")) for t in texts]
    n_words = [count_words(t) for t in texts]
    predictions = [{"line": line, "n_tokens": t, "n_bytes": b, "n_words": w, "nll": x,
                    "bits_per_byte": bits_per_byte(x, b) if b else None}
                   for line, t, b, w, x in zip(lines, n_tokens, n_bytes, n_words, nll)]
    metrics = _summary(nll, n_tokens, n_bytes, n_words)
    languages = sorted({r.get("language", spec.get("language", "")) for r in records})
    if len(languages) > 1:
        for language in languages:
            rows = [i for i, r in enumerate(records) if r.get("language", spec.get("language", "")) == language]
            for name, entry in _summary([nll[i] for i in rows], [n_tokens[i] for i in rows],
                                        [n_bytes[i] for i in rows], [n_words[i] for i in rows]).items():
                metrics[f"{name}[{language}]"] = {**entry, "n": len(rows)}
    return metrics, predictions


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word_perplexity (so '' is one word, and leading or
    trailing whitespace adds one)."""
    return len(re.split(r"\s+", text))


def _summary(nll, n_tokens, n_bytes, n_words) -> dict:
    """The corpus metrics, each with a bootstrap over documents (stderr, 95% interval)."""
    total = sum(nll)

    def ratio(denominators, transform):
        count = sum(denominators)
        return {"value": transform(total / count) if count else None,
                **ratio_bootstrap(nll, denominators, transform)}
    return {"bits_per_byte": ratio(n_bytes, lambda x: x / math.log(2)),
            "byte_perplexity": ratio(n_bytes, math.exp),
            "word_perplexity": ratio(n_words, math.exp),
            "token_perplexity": ratio(n_tokens, math.exp)}


def _score_nonempty(ctx, requests, desc):
    """Scores in request order, 0 for empty documents (nothing to predict after BOS)."""
    scores = iter(continuation_logprobs(ctx, [r for r in requests if r[1]], desc))
    return [next(scores) if r[1] else 0.0 for r in requests]
