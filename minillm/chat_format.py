"""Chat templates: one function, `render`, turns a record into token ids and a loss mask, for training and
(with add_generation_prompt=True) for the inference prompt; `chat_template_jinja` is its Jinja twin.

Two record formats (JSONL, one record a line):
  Alpaca  {"instruction": str, "input": str (optional, may be ""), "output": str}
  chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
Two templates:
  alpaca  the exact Stanford Alpaca prompt (ALPACA_PROMPT_WITH_INPUT / ALPACA_PROMPT_NO_INPUT), then the
          response and EOS.
  chat    the Tulu layout of LLAMMAS / open-instruct, multi-turn, with an optional leading system turn:
              <|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}</s>\\n<|user|>\\n...
          where </s> is the EOS token (an id, never the text "</s>"). The inference prompt ends with
          "<|assistant|>\\n". Contents are used verbatim (open-instruct strips them; we do not, so a record
          renders as written).
An Alpaca record rendered with the chat template becomes one user turn (instruction, then a blank line and
the input when there is one) and one assistant turn; a conversation rendered with the Alpaca template must
be one user turn and at most one assistant turn.

ONE function, `render`, turns a record into token ids and a loss mask, for training and (with
add_generation_prompt=True) for the inference prompt, so the two can never disagree. `chat_template_jinja`
writes the same template as Jinja for Hugging Face's tokenizer_config.json; a test checks that
transformers' apply_chat_template gives exactly render's ids.

Why the ids equal tokenizing the whole rendered string. sentencepiece puts a dummy-prefix '▁' in front of
every text it encodes, so encoding a conversation piece by piece can give different tokens than encoding
the whole string (what apply_chat_template + tokenizer does). The rendered text is cut only where a special
id sits (BOS, EOS) and where an assistant reply starts; the text between two special ids is encoded as ONE
string, as Hugging Face's tokenizer encodes the text between two special tokens: the text right after BOS
with Tokenizer.encode (a dummy prefix, as Llama encodes a document, except before a chat marker; Hugging
Face adds none after a special token, so the Jinja template writes it as a space: "<s> Below is ..."),
text after an EOS without a dummy prefix (Tokenizer.encode_continuation). A reply starts
right after a "\\n", and Llama-style tokenizers have no piece containing "\\n" (it is the byte piece
<0x0A>), so no token can straddle that cut; `render` checks this on every example (the pieces' tokens
must concatenate to the whole text's tokens) and raises if a tokenizer ever merges across it.

The loss mask covers each assistant reply and the EOS that ends it (train_on='assistant', every turn;
'last': the last reply only; 'all': every token but BOS). minillm.sft_data turns records into batches.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")
FORMATS = ("chat", "alpaca")

# Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

# Tulu / open-instruct chat layout. The markers are minillm.tokenizer.CHAT_TOKENS (single pieces).
SYSTEM_PREFIX, USER_PREFIX, ASSISTANT_PREFIX = "<|system|>\n", "<|user|>\n", "<|assistant|>\n"
TURN_END = "\n"  # after a system or user turn's content, and after the EOS that ends an assistant turn


# ============================================================================ records -> template parts

def record_kind(record) -> str:
    """'chat' for {"messages": [...]} or a bare list of messages, 'alpaca' for {"instruction", ...}."""
    if isinstance(record, list) or (isinstance(record, dict) and "messages" in record):
        return "chat"
    return "alpaca"


def as_messages(record) -> list[dict]:
    """The conversation of a record. An Alpaca record becomes one user turn (instruction, then a blank line
    and the input if any) and, when its output is not None, one assistant turn."""
    if isinstance(record, list):
        return record
    if "messages" in record:
        return record["messages"]
    user = record["instruction"]
    if record.get("input"):
        user += "\n\n" + record["input"]
    out = [{"role": "user", "content": user}]
    if record.get("output") is not None:
        out.append({"role": "assistant", "content": record["output"]})
    return out


def as_alpaca(record) -> dict:
    """The Alpaca fields of a record; a conversation must be one user turn and at most one assistant turn."""
    if record_kind(record) == "alpaca":
        return {"instruction": record["instruction"], "input": record.get("input") or "",
                "output": record.get("output") or ""}
    messages = as_messages(record)
    roles = [m.get("role") for m in messages]
    if roles not in (["user"], ["user", "assistant"]):
        raise ValueError(f"the Alpaca template holds one user instruction and at most one assistant reply; "
                         f"got a conversation with roles {roles}")
    return {"instruction": messages[0]["content"], "input": "",
            "output": messages[1]["content"] if len(messages) == 2 else ""}


def check_messages(messages, training: bool = True) -> None:
    """ValueError (without file/line; callers prefix it) unless `messages` is a valid conversation."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is {type(m).__name__}, expected an object with 'role' and 'content'")
        if "role" not in m:
            raise ValueError(f"messages[{i}]: missing field 'role'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}]: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if "content" not in m:
            raise ValueError(f"messages[{i}]: missing field 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}]: field 'content' is {type(m['content']).__name__}, expected a string")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    offset = len(messages) - len(turns)
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"messages[{i + offset}]: {_a(role)} turn where {_a(expected)} turn must come (turns "
                             "alternate user, assistant, ... after an optional system message)")
    if training:
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"conversation does not end with an assistant turn (last role "
                             f"{messages[-1]['role']!r}); there is no reply to train on")


def _a(word: str) -> str:
    return ("an " if word == "assistant" else "a ") + word


def check_alpaca(record: dict) -> None:
    for field in ("instruction", "output"):
        if field not in record:
            raise ValueError(f"missing field '{field}'")
        if not isinstance(record[field], str):
            raise ValueError(f"field '{field}' is {type(record[field]).__name__}, expected a string")
    if not isinstance(record.get("input", ""), (str, type(None))):
        raise ValueError(f"field 'input' is {type(record['input']).__name__}, expected a string")


def check_record(record, training: bool = True) -> str:
    """Validate one SFT record; returns its kind ('chat' or 'alpaca'). ValueError names the problem."""
    if not isinstance(record, (dict, list)):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    kind = record_kind(record)
    if kind == "chat":
        check_messages(as_messages(record), training)
    elif "instruction" not in record and "output" not in record:
        raise ValueError("record has neither 'messages' (chat format) nor 'instruction' and 'output' "
                         "(Alpaca format)")
    else:
        check_alpaca(record)
    return kind


def template_parts(record, fmt: str = "chat", add_generation_prompt: bool = False) -> list[tuple[str, str, int]]:
    """The rendered record as (kind, text, turn) parts in order.

    kind: 'bos' / 'eos' (a special id, text ''), 'prompt' (template text, system and user turns) or
    'reply' (the content of an assistant turn); turn numbers the assistant turns 0, 1, ... (-1 elsewhere).
    fmt 'auto' uses the record's own format."""
    if fmt == "auto":
        fmt = record_kind(record)
    if fmt not in FORMATS:
        raise ValueError(f"unknown template {fmt!r} (expected chat, alpaca or auto)")
    parts = [("bos", "", -1)]
    if fmt == "alpaca":
        a = as_alpaca(record)
        template = ALPACA_PROMPT_WITH_INPUT if a["input"] else ALPACA_PROMPT_NO_INPUT
        parts.append(("prompt", template.format(instruction=a["instruction"], input=a["input"]), -1))
        if not add_generation_prompt:  # the prompt already ends with "### Response:\n"
            parts += [("reply", a["output"], 0), ("eos", "", 0)]
        return parts
    messages = as_messages(record)
    check_messages(messages, training=False)
    turn = 0
    for m in messages:
        if m["role"] == "assistant":
            parts += [("prompt", ASSISTANT_PREFIX, -1), ("reply", m["content"], turn), ("eos", "", turn),
                      ("prompt", TURN_END, -1)]
            turn += 1
        else:
            parts.append(("prompt", (SYSTEM_PREFIX if m["role"] == "system" else USER_PREFIX)
                          + m["content"] + TURN_END, -1))
    if add_generation_prompt:
        parts.append(("prompt", ASSISTANT_PREFIX, -1))
    return merge_prompt_parts(parts)


def merge_prompt_parts(parts):
    """Join neighbouring prompt parts: the text between two cuts is encoded as one string anyway."""
    out = []
    for part in parts:
        if out and part[0] == "prompt" and out[-1][0] == "prompt":
            out[-1] = ("prompt", out[-1][1] + part[1], -1)
        else:
            out.append(part)
    return out


def part_mask(parts, train_on: str) -> list[int]:
    """1 for the parts the loss covers: replies and their EOS (every turn, or the last), or all but BOS."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown train_on {train_on!r} (expected assistant, last or all)")
    last = max([turn for _, _, turn in parts], default=-1)
    if train_on == "all":
        return [int(kind != "bos") for kind, _, _ in parts]
    return [int(kind in ("reply", "eos") and (train_on == "assistant" or turn == last)) for kind, _, turn in parts]


# ============================================================================ parts -> token ids

def encode_parts(parts, tokenizer) -> list[list[int]]:
    """Token ids of every part, identical to encoding each run of text between special ids as one string
    (see the module docstring); raises if the tokenizer merges text across a part boundary."""
    ids: list[list[int]] = [[] for _ in parts]
    run: list[int] = []  # indices of the text parts since the last special id
    after_bos = True  # the text right after BOS is encoded like a text start (dummy prefix)

    def encode(text: str, start: bool) -> list[int]:
        return tokenizer.encode(text) if start else tokenizer.encode_continuation(text)

    def flush():
        if not run:
            return
        for j, i in enumerate(run):
            ids[i] = encode(parts[i][1], after_bos and j == 0)
        # A run is a prompt, or a prompt and the reply after it (a reply always ends at its EOS).
        if len(run) > 1 and sum((ids[i] for i in run), []) != encode("".join(parts[i][1] for i in run), after_bos):
            before, reply = parts[run[-2]][1], parts[run[-1]][1]
            raise ValueError(
                f"the tokenizer merges text across the start of an assistant reply ({before[-20:]!r} | "
                f"{reply[:20]!r}): the tokens of the whole text differ from the tokens of its parts, so loss "
                f"mask and inference prompt would not line up. Use a Llama-style tokenizer (newline as a "
                f"byte piece).")
        run.clear()

    for i, (kind, _, _) in enumerate(parts):
        if kind in ("bos", "eos"):
            flush()
            ids[i] = [tokenizer.bos_id if kind == "bos" else tokenizer.eos_id]
            after_bos = kind == "bos"
        else:
            run.append(i)
    flush()
    return ids


def render(record, tokenizer, fmt: str = "chat", train_on: str = "assistant",
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one record (Alpaca dict, {"messages": [...]} or a list of messages).

    fmt: 'chat' (Tulu layout), 'alpaca' (Stanford Alpaca prompt) or 'auto' (the record's own format).
    The mask is 1 on tokens the loss covers (train_on: 'assistant' = every reply + its EOS, 'last' = the
    last reply + its EOS, 'all' = everything but BOS), 0 elsewhere. add_generation_prompt=True returns
    the inference prompt: the conversation followed by "<|assistant|>\\n" (chat), or the Alpaca prompt
    without the output. Training ids of a conversation always start with the inference prompt ids of the
    conversation up to that reply."""
    parts = template_parts(record, fmt, add_generation_prompt)
    part_ids = encode_parts(parts, tokenizer)
    mask = part_mask(parts, train_on)
    ids, loss_mask = [], []
    for p_ids, m in zip(part_ids, mask):
        ids += p_ids
        loss_mask += [m] * len(p_ids)
    return ids, loss_mask


# ============================================================================ the Hugging Face chat template

def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def space_after_bos(tokenizer=None, fmt: str = "chat") -> bool:
    """Whether the Jinja template must put a ' ' between BOS and the text.

    render encodes the text after BOS like a text start: with the dummy-prefix '▁' (Alpaca: '▁Below'),
    except before a chat marker that is a piece of its own (Tokenizer.encode). Hugging Face's tokenizer
    adds no dummy prefix to text that follows a special token, so the template writes the '▁' as a space.
    Without a tokenizer, a Llama-style one with CHAT_TOKENS is assumed."""
    start = "Below is" if fmt == "alpaca" else USER_PREFIX
    if tokenizer is None:
        return fmt == "alpaca"
    plain = tokenizer.encode(start)
    if plain == tokenizer.encode_continuation(start):
        return False
    if plain == tokenizer.encode_continuation(" " + start):
        return True
    raise ValueError(f"{tokenizer!r}: cannot express its start-of-text encoding in a chat template")


def chat_template_jinja(fmt: str = "chat", tokenizer=None) -> str:
    """A Jinja chat template (for tokenizer_config.json) that renders messages exactly as `render` does:
    transformers' apply_chat_template(messages, tokenize=True) gives render(messages, fmt=fmt)'s ids.
    Pass the tokenizer when it is not a minillm-trained (Llama-style, with chat markers) one.
    One known difference, transformers' own: content that contains the literal text "<s>" or "</s>" is
    read as BOS/EOS by Hugging Face's tokenizer, while render keeps it as text."""
    s = _jinja_string
    lead = "{{ bos_token }}" + ("{{ ' ' }}" if space_after_bos(tokenizer, fmt) else "")
    def turn(prefix: str, suffix: str) -> str:
        return "{{ " + s(prefix) + " + message['content'] + " + suffix + " }}"

    if fmt == "chat":
        return (lead + "{% for message in messages %}"
                "{% if message['role'] == 'system' %}" + turn(SYSTEM_PREFIX, s(TURN_END))
                + "{% elif message['role'] == 'user' %}" + turn(USER_PREFIX, s(TURN_END))
                + "{% elif message['role'] == 'assistant' %}" + turn(ASSISTANT_PREFIX, "eos_token + " + s(TURN_END))
                + "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
                "{% endfor %}"
                "{% if add_generation_prompt %}{{ " + s(ASSISTANT_PREFIX) + " }}{% endif %}")
    if fmt == "alpaca":
        no_input_head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
        return (
            "{% if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' or "
            "(messages | length == 2 and messages[1]['role'] != 'assistant') %}"
            "{{ raise_exception('The Alpaca template holds one user instruction and at most one assistant reply') }}"
            "{% endif %}"
            + lead + "{{ " + s(no_input_head) + " + messages[0]['content'] + " + s(tail) + " }}"
            "{% if messages | length == 2 %}{{ messages[1]['content'] + eos_token }}{% endif %}")
    raise ValueError(f"unknown template {fmt!r} (expected chat or alpaca)")
