"""OpenAI's HTTP API, the part minillm.serve speaks: request bodies checked and turned into prompts and
sampling settings, and the response, chunk and error objects in OpenAI's shapes.

    POST /v1/chat/completions  {"model", "messages", "max_tokens", "temperature", "top_p", "stop", "seed",
                                "n": 1, "stream", "stream_options": {"include_usage"}}
    POST /v1/completions       the same with "prompt" (a string, or a list of token ids) for "messages"

Every field has its OpenAI type and range; a request that breaks one gets an `ApiError` (HTTP 400, naming
the field), never a guess. Fields OpenAI knows but minillm does not implement (logprobs, logit_bias,
presence/frequency penalties, n > 1) are accepted only at their neutral values. `top_k` and
`repetition_penalty` are extensions (vLLM's names): the LLAMMAS paper samples with repetition penalty 1.2.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from minillm.chat_format import check_messages, render
from minillm.generate import Sampling

MAX_STOP_STRINGS = 4  # OpenAI's limit


class ApiError(Exception):
    """A request minillm will not serve: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(kw_only=True)
class GenerationRequest:
    """A checked request: what to continue, how far, how to sample, how to answer."""
    chat: bool  # /v1/chat/completions (else /v1/completions)
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


# ----------------------------------------------------------------------------- fields

NUMBER, INTEGER, STRING, BOOL, OBJECT, ARRAY = "number", "integer", "string", "boolean", "object", "array"
COMMON_FIELDS = {
    "model": (STRING,), "max_tokens": (INTEGER,), "temperature": (NUMBER,), "top_p": (NUMBER,),
    "stop": (STRING, ARRAY), "seed": (INTEGER,), "n": (INTEGER,), "stream": (BOOL,), "stream_options": (OBJECT,),
    "user": (STRING,), "top_k": (INTEGER,), "repetition_penalty": (NUMBER,), "frequency_penalty": (NUMBER,),
    "presence_penalty": (NUMBER,), "logit_bias": (OBJECT,), "logprobs": (BOOL, INTEGER),
}
CHAT_FIELDS = {**COMMON_FIELDS, "messages": (ARRAY,), "max_completion_tokens": (INTEGER,), "top_logprobs": (INTEGER,)}
COMPLETION_FIELDS = {**COMMON_FIELDS, "prompt": (STRING, ARRAY), "echo": (BOOL,), "best_of": (INTEGER,),
                     "suffix": (STRING,)}
# Fields minillm does not implement, and the one value each may have (what OpenAI does by default).
NEUTRAL = {"n": 1, "best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False,
           "top_logprobs": 0, "echo": False, "suffix": ""}


def json_type(value) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    return {str: STRING, list: ARRAY, dict: OBJECT}.get(type(value), "null")


def check_fields(body, fields: dict) -> dict:
    """The body's fields, null ones left out, each checked against its JSON type."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {json_type(body)}")
    out = {}
    for name, value in body.items():
        if name not in fields:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
        if value is None:
            continue
        kind = json_type(value)
        allowed = fields[name]
        if kind not in allowed and not (kind == INTEGER and NUMBER in allowed):
            raise ApiError(400, f"'{name}' must be {' or '.join(allowed)}, got {kind} {value!r}"[:300], param=name)
        if name in NEUTRAL and value != NEUTRAL[name] and not (name == "logprobs" and value == 0):
            raise ApiError(400, f"'{name}' {value!r} is not supported by minillm (only {NEUTRAL[name]!r})",
                           param=name)
        out[name] = value
    return out


def in_range(ok: bool, name: str, value, allowed: str):
    if not ok:
        raise ApiError(400, f"'{name}' {value!r}: {allowed}", param=name)


def sampling_of(fields: dict) -> Sampling:
    """OpenAI's defaults: temperature 1, top_p 1."""
    temperature, top_p = fields.get("temperature", 1.0), fields.get("top_p", 1.0)
    top_k, penalty = fields.get("top_k", 0), fields.get("repetition_penalty", 1.0)
    in_range(0 <= temperature <= 2, "temperature", temperature, "must be between 0 and 2 (0 = greedy)")
    in_range(0 <= top_p <= 1, "top_p", top_p, "must be between 0 and 1")
    in_range(top_k >= 0, "top_k", top_k, "must be >= 0 (0 = all tokens)")
    in_range(0 < penalty <= 10, "repetition_penalty", penalty, "must be in (0, 10]")
    seed = fields.get("seed")
    in_range(seed is None or -2**63 <= seed < 2**64, "seed", seed, "must fit in 64 bits")
    return Sampling(temperature=float(temperature), top_p=float(top_p), top_k=top_k,
                    repetition_penalty=float(penalty), seed=seed)


def stop_strings(fields: dict) -> list[str]:
    stop = fields.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    in_range(len(stop) <= MAX_STOP_STRINGS, "stop", stop, f"at most {MAX_STOP_STRINGS} stop strings")
    for s in stop:
        in_range(isinstance(s, str) and s != "", "stop", stop, "must be a string or a list of non-empty strings")
    return stop


def message_text(i: int, content) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                           "are supported", param="messages")
        return "".join(p["text"] for p in content)
    return content


def chat_prompt(messages: list, tokenizer, template: str | None) -> list[int]:
    """The conversation rendered by the model's chat template, ending in the assistant's turn header."""
    if template is None:
        raise ApiError(400, "this model has no chat layout (its tokenizer has none of the tulu, llama3 or chatml "
                       "markers): use /v1/completions with a raw prompt", param="messages")
    messages = [{**m, "content": message_text(i, m.get("content"))} if isinstance(m, dict) else m
                for i, m in enumerate(messages)]
    try:
        check_messages(messages, training=False)
        if messages[-1]["role"] == "assistant":
            raise ValueError("the last message is the assistant's; the reply follows a user (or system) message")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        return render(messages, tokenizer, template=template, add_generation_prompt=True)[0]
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None


def completion_prompt(prompt, tokenizer) -> list[int]:
    """A raw prompt: a string (encoded as a text start, with BOS when the tokenizer has one), a list of one
    string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, bos=tokenizer.bos_id is not None)
    if prompt and all(json_type(t) == INTEGER for t in prompt):
        bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
        in_range(not bad, "prompt", bad[:3], f"token ids must be in 0..{tokenizer.vocab_size - 1}")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of one string, or a non-empty list of token ids "
                   "(one prompt per request)", param="prompt")


def parse_request(body, chat: bool, tokenizer, template: str | None, max_seq_len: int, model_name: str,
                  default_max_tokens: int) -> GenerationRequest:
    """A checked GenerationRequest for a parsed JSON body, or ApiError."""
    fields = check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    need = "messages" if chat else "prompt"
    for name in ("model", need):
        if name not in fields:
            raise ApiError(400, f"missing required field '{name}'", param=name)
    if fields["model"] != model_name:
        raise ApiError(404, f"The model '{fields['model']}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")
    sampling, stop = sampling_of(fields), stop_strings(fields)
    options = fields.get("stream_options", {})
    if options and not fields.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    include_usage = options.get("include_usage", False)
    in_range(isinstance(include_usage, bool), "stream_options.include_usage", include_usage, "must be a boolean")
    prompt = chat_prompt(fields["messages"], tokenizer, template) if chat else completion_prompt(fields["prompt"],
                                                                                                 tokenizer)
    name = "max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"
    room = max_seq_len - len(prompt)
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens; the prompt alone has "
                       f"{len(prompt)}", param=need, code="context_length_exceeded")
    max_tokens = fields.get(name)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    in_range(max_tokens >= 1, name, max_tokens, "must be at least 1")
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                       f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in the "
                       "completion)", param=name, code="context_length_exceeded")
    return GenerationRequest(chat=chat, prompt_ids=prompt, max_tokens=max_tokens, sampling=sampling, stop=stop,
                             stream=fields.get("stream", False), include_usage=include_usage)


# ----------------------------------------------------------------------------- responses

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(request: GenerationRequest, rid: str, model: str, text: str, finish_reason: str,
             completion_tokens: int) -> dict:
    """The whole answer of a request that does not stream."""
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion" if request.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(len(request.prompt_ids), completion_tokens)}


def chunk(request: GenerationRequest, rid: str, model: str, text: str | None, finish_reason: str | None = None,
          first: bool = False, usage_counts: dict | None = None) -> dict:
    """One server-sent event of a streamed answer: a piece of text, the finish reason, or (choices empty)
    the usage counts."""
    if usage_counts is not None:
        choices = []
    elif request.chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk" if request.chat else "text_completion",
           "created": int(time.time()), "model": model, "choices": choices}
    if request.include_usage:
        out["usage"] = usage_counts
    return out
