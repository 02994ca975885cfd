"""What every task type shares: reading task files (with file:line errors), filling prompt templates,
wrapping prompts (chat / Alpaca / raw) with optional few-shot examples, batched generation and batched
log-likelihood scoring.

A task file `<name>.task.json` describes one task:
    {"name": "estcopa", "type": "multiple_choice", "language": "et", "data": "estcopa.test.jsonl",
     "dev_data": "estcopa.dev.jsonl", "templates": ["{premise} ...", ...], "few_shot": 0}
Paths are relative to the task file. Records are JSON Lines, one object per line; each task module lists
the fields it needs and checks them (the README's evaluation section lists every schema).
"""
from __future__ import annotations

import functools
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from minillm.chat_format import render, resolve_template
from minillm.chat_format import stop_ids as template_stop_ids
from minillm.files import json_object
from minillm.generate import generate
from minillm.losses import IGNORE_INDEX, token_logprobs
from minillm.metrics import mean_stderr, verbosity
from minillm.tasks.formats import FORMATS, read_records

SPEC_KEYS = {"name", "type", "language", "data", "dev_data", "templates", "few_shot", "description",
             "mode", "choice_format",  # multiple_choice
             "refusal_patterns",  # safety
             "format", "target_data", "dev_target_data", "src_lang", "tgt_lang"}  # benchmark files (formats.py)


# ----------------------------------------------------------------------------- reading task files

def _line_of_key(text: str, key: str) -> int:
    """1-based line of `"key"` in a JSON text (for errors about the task spec itself), else 1."""
    for number, line in enumerate(text.splitlines(), 1):
        if f'"{key}"' in line:
            return number
    return 1


def require_field(record: dict, where: str, name: str, kind, allow_empty: bool = False):
    """record[name], checked to exist and be of `kind` (a type or tuple of types); returns the value."""
    if name not in record:
        raise ValueError(f"{where}: missing field '{name}'")
    value = record[name]
    if isinstance(value, bool) and kind is not bool and (kind is int or (isinstance(kind, tuple) and bool not in kind)):
        raise ValueError(f"{where}: field '{name}' must be {_kind_name(kind)}, got bool")
    if not isinstance(value, kind):
        raise ValueError(f"{where}: field '{name}' must be {_kind_name(kind)}, got {type(value).__name__}")
    if not allow_empty and isinstance(value, (str, list)) and len(value) == 0:
        raise ValueError(f"{where}: field '{name}' is empty")
    return value


def require_str_list(record: dict, where: str, name: str) -> list[str]:
    values = require_field(record, where, name, list)
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f"{where}: field '{name}'[{i}] must be a string, got {type(v).__name__}")
    return values


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", list: "a list", bool: "true or false", dict: "an object"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def fill_template(template: str, fields: dict, where: str) -> str:
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise ValueError(f"{where}: template uses {{{e.args[0]}}} but the record has no field '{e.args[0]}' "
                         f"(available: {', '.join(sorted(fields))})") from None
    except (IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: cannot fill template {template!r}: {e}") from None


def load_task(spec_path, task_types: dict, mc_mode: str | None = None, limit: int = 0) -> dict:
    """Read and validate a task file and its data. Returns the spec dict with 'records', 'lines',
    'data_path' (and 'dev_records', 'dev_lines', 'dev_data_path' with dev_data), 'spec_path' and
    'templates' (the task type's defaults when the file gives none). mc_mode overrides a multiple-choice
    task's "mode"; limit > 0 keeps the first `limit` records of each split.
    Every problem is a ValueError 'FILE:LINE: message'."""
    spec_path = Path(spec_path)
    try:
        text = spec_path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{spec_path}:1: cannot read task file ({e.strerror or e})") from None
    if not text.strip():
        raise ValueError(f"{spec_path}:1: empty task file")
    spec = json_object(text, spec_path)
    for key in spec:
        if key not in SPEC_KEYS:
            raise ValueError(f"{spec_path}:{_line_of_key(text, key)}: unknown key '{key}' "
                             f"(known: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("type", "data"):
        if key not in spec:
            raise ValueError(f"{spec_path}:1: missing field '{key}'")
    task_type = spec["type"]
    if task_type not in task_types:
        raise ValueError(f"{spec_path}:{_line_of_key(text, 'type')}: unknown task type {task_type!r} "
                         f"(known: {', '.join(task_types)})")
    module = task_types[task_type]
    spec = dict(spec)
    spec.setdefault("name", spec_path.name.removesuffix(".json").removesuffix(".task"))
    spec.setdefault("language", "en")
    few_shot = spec.setdefault("few_shot", 0)
    if not isinstance(few_shot, int) or isinstance(few_shot, bool) or few_shot < 0:
        raise ValueError(f"{spec_path}:{_line_of_key(text, 'few_shot')}: 'few_shot' must be a non-negative integer")
    templates = spec.get("templates")
    if templates is not None:
        if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
            raise ValueError(f"{spec_path}:{_line_of_key(text, 'templates')}: 'templates' must be a non-empty "
                             "list of strings")
    if spec.get("format", "jsonl") not in FORMATS:
        raise ValueError(f"{spec_path}:{_line_of_key(text, 'format')}: unknown format {spec['format']!r} "
                         f"(known: {', '.join(FORMATS)})")
    spec["spec_path"] = str(spec_path)
    if mc_mode and task_type == "multiple_choice":
        spec["mode"] = mc_mode
    for key in ("data", "dev_data"):
        if key not in spec:
            continue
        if not isinstance(spec[key], str):
            raise ValueError(f"{spec_path}:{_line_of_key(text, key)}: '{key}' must be a file name")
        data_path = spec_path.parent / spec[key]
        numbered = read_records(spec, key, data_path, spec_path)
        records, lines = [r for _, r in numbered], [n for n, _ in numbered]
        if limit > 0:
            records, lines = records[:limit], lines[:limit]
        prefix = "" if key == "data" else "dev_"
        spec[prefix + "records"], spec[prefix + "lines"], spec[prefix + "data_path"] = records, lines, str(data_path)
        for record, line in zip(records, lines):
            module.check_record(record, f"{data_path}:{line}", spec)
    if hasattr(module, "check_spec"):  # task-type options in the spec
        module.check_spec(spec, lambda key: f"{spec_path}:{_line_of_key(text, key)}")
    if templates is None:
        spec["templates"] = module.default_templates(spec)
    # Every template must fill for every record: a typo in a placeholder is found now, not mid-run.
    for key in ("", "dev_"):
        for record, line in zip(spec.get(key + "records", []), spec.get(key + "lines", [])):
            fields = module.template_fields(record, spec)
            for i, template in enumerate(spec["templates"]):
                fill_template(template, fields, f"{spec[key + 'data_path']}:{line}: template {i}")
    return spec


# ----------------------------------------------------------------------------- evaluation context

@dataclass(kw_only=True)
class GenerationOptions:
    """How generative tasks generate: greedy by default; LLAMMAS samples with temperature 0.6, top_p 0.9,
    repetition_penalty 1.2."""
    max_new_tokens: int = 128  # longest answer, in tokens
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling mass, in (0, 1]
    repetition_penalty: float = 1.0  # > 1 makes tokens already seen less likely (CTRL)
    seed: int = 0  # sampling seed
    batch_size: int = 8  # prompts per forward pass
    compile: bool = False  # decode through torch.compile of the model's decoding step (each new batch shape compiles first)


@dataclass(kw_only=True)
class EvalContext(GenerationOptions):
    """The model, its tokenizer and the run's settings, handed to every task."""
    model: torch.nn.Module
    tokenizer: object
    prompt_format: str = "raw"  # 'chat' | 'alpaca' | 'raw'
    progress: bool = True
    few_shot: int | None = None  # overrides every task file's "few_shot" when set
    system_prompt: str | None = None  # chat format only: a system turn before the prompt
    # Generation speed, summed over generate_texts calls (evaluate.py reports tokens/s per task from them).
    generated_tokens: int = 0
    generation_seconds: float = 0.0

    def shots(self, spec: dict) -> int:
        return spec.get("few_shot", 0) if self.few_shot is None else self.few_shot

    @functools.cached_property
    def template(self) -> str:
        """chat_format's template for the prompts: 'chat' = the layout the tokenizer's chat template or
        markers name (chat_format.resolve_template), 'alpaca' = Alpaca; '' for raw prompts."""
        if self.prompt_format == "raw":
            return ""
        return resolve_template("alpaca" if self.prompt_format == "alpaca" else "auto", self.tokenizer)

    @functools.cached_property
    def stop_ids(self) -> list[int]:
        """What ends a generated answer: the tokenizer's end ids, and in chat prompts the layout's markers."""
        return template_stop_ids(self.tokenizer, self.template) if self.template else list(self.tokenizer.eos_ids)

    @property
    def max_len(self) -> int:
        return self.model.config.max_seq_len

    def bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress or not sys.stderr.isatty(), leave=False,
                    dynamic_ncols=True)


# ----------------------------------------------------------------------------- prompts

def few_shot_examples(spec: dict, index: int, k: int, seed: int, split: str = "") -> list[dict]:
    """k demonstration records for record `index`: from dev_data when the task has it (and we are not
    evaluating dev itself), else from the evaluated split without the record itself; the same seeded
    draw every run."""
    if k <= 0:
        return []
    if split != "dev_" and spec.get("dev_records"):
        pool = spec["dev_records"]
    else:
        records = spec[split + "records"]
        pool = records[:index] + records[index + 1:]
    rng = random.Random(f"{seed}:{spec['name']}:{split}:{index}")
    return rng.sample(pool, min(k, len(pool)))


def wrapped_record(ctx: EvalContext, text: str, shots=(), reply: str | None = None):
    """The prompt (and optionally the assistant's reply) as a record for minillm.chat_format.render:
    chat: a conversation, each demonstration a user turn and an assistant turn;
    alpaca: one Alpaca instruction holding the demonstrations and the prompt."""
    if ctx.prompt_format == "chat":
        messages = [{"role": "system", "content": ctx.system_prompt}] if ctx.system_prompt else []
        for p, a in shots:
            messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": text})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        return messages
    if ctx.prompt_format == "alpaca":
        prefix = "".join(f"{p} {a}\n\n" for p, a in shots)
        return {"instruction": prefix + text, "input": "", "output": reply or ""}
    raise ValueError(f"unknown prompt format {ctx.prompt_format!r} (chat, alpaca or raw)")


def build_prompt(ctx: EvalContext, text: str, shots: list[tuple[str, str]] = ()) -> list[int]:
    """Token ids of a prompt wrapped for the model, with (prompt, answer) demonstrations before it.

    raw: BOS + 'prompt1 answer1\\n\\nprompt2 answer2\\n\\ntext' (base models).
    chat / alpaca: minillm.chat_format.render's inference prompt (the code SFT trains with), see
    wrapped_record.
    """
    if ctx.prompt_format == "raw":
        prefix = "".join(f"{p} {a}\n\n" for p, a in shots)
        return ctx.tokenizer.encode(prefix + text, bos=True)
    record = wrapped_record(ctx, text, shots)
    return list(render(record, ctx.tokenizer, template=ctx.template, add_generation_prompt=True)[0])


def truncate_left(ids: list[int], limit: int, bos_id: int | None) -> tuple[list[int], bool]:
    """Keep the first token when it is BOS, and the last ones up to `limit` (the question sits at the end
    of a prompt); True if anything was cut."""
    if len(ids) <= limit:
        return ids, False
    head = 1 if bos_id is not None and ids[:1] == [bos_id] else 0
    return ids[:head] + ids[len(ids) - (limit - head):], True


def default_stop(ctx: EvalContext, single_line: bool) -> list[str] | None:
    """Short-answer tasks on base models stop at the end of the line, as lm-evaluation-harness does;
    chat and Alpaca models end their turn with an end-of-turn token."""
    return ["\n"] if single_line and ctx.prompt_format == "raw" else None


def encode_choice(ctx: EvalContext, prompt: str, shots: list[tuple[str, str]], continuation: str
                  ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for log-likelihood scoring of `continuation` after `prompt`.

    raw: as lm-evaluation-harness, the context's trailing whitespace moves to the continuation and the
    pair is tokenised as ONE text, so the scored tokens are exactly how the model would see the whole
    string; the continuation is what follows the context's own tokens.
    chat / alpaca: the continuation (leading/trailing whitespace stripped) is the assistant's reply, with
    exactly the tokens chat_format.render gives a reply in training; its end-of-turn token is not scored."""
    tokenizer = ctx.tokenizer
    if ctx.prompt_format != "raw":
        prompt_ids = build_prompt(ctx, prompt, shots)
        record = wrapped_record(ctx, prompt, shots, reply=continuation.strip())
        ids, mask = render(record, tokenizer, template=ctx.template, train_on="last")
        if ids[:len(prompt_ids)] != prompt_ids:
            raise ValueError("chat_format.render: the conversation does not start with its inference prompt")
        n_reply = sum(mask[len(prompt_ids):]) - 1  # the mask covers the reply and its end-of-turn token
        return prompt_ids, ids[len(prompt_ids):len(prompt_ids) + n_reply]
    context = "".join(f"{p} {a}\n\n" for p, a in shots) + prompt
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tokenizer.encode(stripped + continuation, bos=True)
    n_context = len(tokenizer.encode(stripped, bos=True))
    if n_context >= len(whole):  # the continuation merged into the context's last token
        n_context = len(whole) - 1
    return whole[:n_context], whole[n_context:]


# ----------------------------------------------------------------------------- batched model calls

def generate_texts(ctx: EvalContext, prompts: list[list[int]], stop: list[str] | None, desc: str
                   ) -> list[dict]:
    """Generate for every prompt in batches (longest first, so a batch holds similar lengths and little
    padding; generation is padding-invariant, so the order does not change any output).
    Returns per prompt {"text", "n_tokens", "truncated"} in the original order."""
    limit = max(2, ctx.max_len - ctx.max_new_tokens)
    prepared = [truncate_left(p, limit, ctx.tokenizer.bos_id) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prepared[i][0]))
    results: list[dict | None] = [None] * len(prompts)
    with ctx.bar(len(prompts), desc) as bar:
        for batch_index, start in enumerate(range(0, len(order), ctx.batch_size)):
            batch = order[start:start + ctx.batch_size]
            start_time = time.perf_counter()
            outs = generate(ctx.model, [prepared[i][0] for i in batch], max_new_tokens=ctx.max_new_tokens,
                            temperature=ctx.temperature, top_k=ctx.top_k, top_p=ctx.top_p,
                            repetition_penalty=ctx.repetition_penalty, eos_id=ctx.stop_ids,
                            stop_strings=stop, tokenizer=ctx.tokenizer,
                            seed=None if ctx.temperature == 0 else ctx.seed + batch_index, compile=ctx.compile)
            ctx.generation_seconds += time.perf_counter() - start_time
            ctx.generated_tokens += sum(len(tokens) for tokens in outs)
            for i, tokens in zip(batch, outs):
                results[i] = {"text": ctx.tokenizer.decode(tokens), "n_tokens": len(tokens),
                              "truncated": prepared[i][1]}
            bar.update(len(batch))
    return results


@torch.inference_mode()
def continuation_logprobs(ctx: EvalContext, requests: list[tuple[list[int], list[int]]], desc: str
                          ) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context_ids, continuation_ids) pair.

    Sequences are right-padded into batches (causal attention: padding after a sequence cannot affect
    it) and only the continuation positions go through the output layer. A context too long for the
    model loses tokens from its left (after BOS), as in lm-evaluation-harness."""
    model = ctx.model
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    sequences = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("continuation_logprobs: empty continuation")
        full, _ = truncate_left(list(context) + list(continuation), ctx.max_len + 1, ctx.tokenizer.bos_id)
        sequences.append((full, min(len(continuation), len(full) - 1)))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    scores = [0.0] * len(sequences)
    try:
        with ctx.bar(len(sequences), desc) as bar:
            for start in range(0, len(order), ctx.batch_size):
                batch = order[start:start + ctx.batch_size]
                T = max(len(sequences[i][0]) for i in batch) - 1
                inputs = torch.zeros(len(batch), T, dtype=torch.long)
                labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
                for row, i in enumerate(batch):
                    full, n_cont = sequences[i]
                    inputs[row, :len(full) - 1] = torch.tensor(full[:-1])
                    # position t predicts token t+1: the continuation occupies the last n_cont targets
                    labels[row, len(full) - 1 - n_cont:len(full) - 1] = torch.tensor(full[-n_cont:])
                hidden = model.hidden_states(inputs.to(device))
                logps = token_logprobs(hidden, model.output.weight, labels.to(device))
                for row, i in enumerate(batch):
                    scores[i] = float(logps[row].double().sum())
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return scores


# ----------------------------------------------------------------------------- result helpers

def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def demonstrations(spec: dict, module, template: str, index: int, k: int, seed: int, split: str = ""
                   ) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the few-shot examples for record `index`, filled with `template`."""
    return [(fill_template(template, module.template_fields(r, spec), "few-shot example"), module.gold_answer(r, spec))
            for r in few_shot_examples(spec, index, k, seed, split)]


def prompt_and_generate(ctx: EvalContext, spec: dict, module, template: str, split: str, stop, desc: str,
                        few_shot: int | None = None) -> tuple[list[str], list[dict]]:
    """Fill `template` for every record of the split, wrap it (few-shot demonstrations included) and
    generate. Returns (the model's input text per record, as decoded from its token ids: what the model
    saw, chat markers and demonstrations included; generations as generate_texts gives them)."""
    records, lines = spec[split + "records"], spec[split + "lines"]
    k = ctx.shots(spec) if few_shot is None else few_shot
    ids = []
    for i, (record, line) in enumerate(zip(records, lines)):
        prompt = fill_template(template, module.template_fields(record, spec), f"{spec[split + 'data_path']}:{line}")
        ids.append(build_prompt(ctx, prompt, demonstrations(spec, module, template, i, k, ctx.seed, split)))
    return [ctx.tokenizer.decode(p) for p in ids], generate_texts(ctx, ids, stop, desc)


def mean_metric(scores) -> dict:
    """A metric that is the mean of per-example scores: {"value", "n", "stderr"} (the standard error of the
    mean, minillm.metrics.mean_stderr)."""
    scores = [float(x) for x in scores]
    return {"value": mean(scores), "n": len(scores), "stderr": mean_stderr(scores)}


def verbosity_metrics(generations: list[dict]) -> dict:
    """Response length (every generative task reports it: alignment tends to lengthen answers); the means
    with their standard errors."""
    texts, tokens = [g["text"] for g in generations], [g["n_tokens"] for g in generations]
    out = verbosity(texts, tokens)
    if out:
        out["mean_tokens"] = mean_metric(tokens)
        out["mean_words"] = mean_metric(len(t.split()) for t in texts)
    return out


# Words for the default prompts of the languages the papers evaluate; other languages get English.
PROMPT_WORDS = {
    "en": {"context": "Context", "question": "Question", "answer": "Answer"},
    "et": {"context": "Kontekst", "question": "Küsimus", "answer": "Vastus"},
    "pl": {"context": "Kontekst", "question": "Pytanie", "answer": "Odpowiedź"},
}


def prompt_words(spec: dict) -> dict:
    return PROMPT_WORDS.get(spec.get("language"), PROMPT_WORDS["en"])
