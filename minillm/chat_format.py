"""Chat templates: one function, `render`, turns a record into token ids and a loss mask, for training and
(with add_generation_prompt=True) for the inference prompt; `chat_template_jinja` is its Jinja twin.

Two record formats (JSONL, one record a line):
  Alpaca  {"instruction": str, "input": str (optional, may be ""), "output": str}
  chat    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
Four templates (`template=`; "auto" picks one from the tokenizer, see resolve_template):
  tulu    the Tulu layout of LLAMMAS / open-instruct, multi-turn, with an optional leading system turn:
              <s><|system|>\\n{system}\\n<|user|>\\n{user}\\n<|assistant|>\\n{reply}</s>\\n<|user|>\\n...
          where <s>/</s> are BOS/EOS; the inference prompt ends with "<|assistant|>\\n".
  llama3  Meta's Llama-3 layout (contents trimmed, as Meta's template trims them):
              <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
              <|start_header_id|>assistant<|end_header_id|>\\n\\n{reply}<|eot_id|>...
  chatml  ChatML, as Qwen2.5 (no BOS unless the tokenizer has one):
              <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n...
  mistral Mistral's own instruct layout, exactly as mistral-common's MistralTokenizer.encode_chat_completion
          renders it. With [INST] / [/INST] as control tokens (Tekken v3: Mistral-Nemo; sentencepiece v3:
          Mistral-7B-Instruct-v0.3):
              <s>[INST]{user}[/INST]{reply}</s>[INST]{user}[/INST]...
          without them (sentencepiece v1: Mistral-7B-Instruct-v0.1) the markers are text, "[INST] {user} [/INST]".
          Every user text and reply is encoded on its own as a text start (a sentencepiece tokenizer puts its
          dummy-prefix '▁' before each, Tekken nothing), as mistral-common encodes each message; v3 drops the
          trailing spaces of a reply (" " only, as mistral-common does). Mistral has no
          system turn: the system prompt is put before the text of the LAST user message (v3; the FIRST in
          v1), followed by a blank line. So in a multi-turn conversation with a system prompt the earlier
          replies are trained, as Mistral trains them, without the system prompt before them, and only the
          last reply's inference prompt is a prefix of the training ids.
  alpaca  the exact Stanford Alpaca prompt (ALPACA_PROMPT_WITH_INPUT / ALPACA_PROMPT_NO_INPUT), then the
          response and EOS.
Contents are used verbatim except by llama3 (open-instruct strips them; we do not, so a record renders as
written). An Alpaca record rendered with a chat layout becomes one user turn (instruction, then a blank line
and the input when there is one) and one assistant turn; a conversation rendered with the Alpaca template
must be one user turn and at most one assistant turn.

Markers are ids, text is text. Every marker (<|user|>, <|eot_id|>, <|im_start|>, BOS, EOS) is put in by id;
every content is encoded as text, and the tokenizers never turn a marker's spelling in text into the marker
(minillm.tokenizer), so a message that contains "<|user|>" or "<|im_start|>" cannot forge a turn. A layout
needs its markers as single tokens of the tokenizer (`marker_id`); render names any that are missing.

ONE function, `render`, serves training and the inference prompt, so the two can never disagree;
`chat_template_jinja` writes the same template as Jinja for Hugging Face's tokenizer_config.json, and a test
checks that transformers' apply_chat_template gives exactly render's ids.

Why the ids equal apply_chat_template's. The rendered conversation is cut where a special id sits and where
an assistant reply starts, and each piece is encoded as one string, as Hugging Face encodes the text between
two special tokens: text at the start or right after BOS like the start of a document (with sentencepiece's
dummy prefix: Hugging Face adds none after BOS, so the Jinja template writes it as a space, "<s> Below is"),
any other text as a continuation. The one cut Hugging Face does not make is at a reply's start: it encodes
the template text before a reply ("<|assistant|>" "\\n") and the reply as one string. render encodes the
reply on its own because that is how the model produces it, after the inference prompt. Both agree whenever
no token would span that cut: always for Llama-style sentencepiece tokenizers (the text before a reply ends
in "\\n", a byte piece no other piece contains) and for byte-level BPE unless a reply begins with whitespace
holding a line break (tulu, chatml; llama3 trims). So the training ids of a conversation always start with
the inference prompt ids of the conversation up to each reply.

The loss mask covers each assistant reply and the end-of-turn token after it (EOS, <|eot_id|>, <|im_end|>)
(train_on='assistant', every turn; 'last': the last reply only; 'all': every token but BOS).
minillm.sft_data turns records into batches.
"""
from __future__ import annotations

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "last", "all")
TEMPLATES = ("auto", "tulu", "llama3", "chatml", "mistral", "alpaca")
CHAT_LAYOUTS = ("tulu", "llama3", "chatml", "mistral")  # the order in which "auto" looks for a layout's markers

# Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

# The markers of each layout (single tokens of the tokenizer). Tulu's are minillm.tokenizer.CHAT_TOKENS.
TULU_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"  # Llama-3
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML
INST, END_INST = "[INST]", "[/INST]"  # Mistral
MARKERS = {"tulu": tuple(TULU_MARKERS.values()), "llama3": (HEADER_START, HEADER_END, EOT),
           "chatml": (IM_START, IM_END), "mistral": (INST, END_INST), "alpaca": ()}


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


# ============================================================================ the layouts, as parts

# A rendered record is a list of parts (kind, value, turn):
#   ("special", "bos" | "eos" | a marker, turn)  one id; turn >= 0 marks the end-of-turn token of assistant
#                                                turn `turn` (the loss covers it), -1 any other special id
#   ("prompt", text, -1)                          template text and the contents of system and user turns
#   ("reply", text, turn)                         the content of assistant turn `turn` (0, 1, ...)

def _tulu(messages, add_generation_prompt):
    parts = [("special", "bos", -1)]
    turn = 0
    for m in messages:
        parts.append(("special", TULU_MARKERS[m["role"]], -1))
        if m["role"] == "assistant":
            parts += [("prompt", "\n", -1), ("reply", m["content"], turn), ("special", "eos", turn),
                      ("prompt", "\n", -1)]
            turn += 1
        else:
            parts.append(("prompt", "\n" + m["content"] + "\n", -1))
    if add_generation_prompt:
        parts += [("special", TULU_MARKERS["assistant"], -1), ("prompt", "\n", -1)]
    return parts


def _llama3(messages, add_generation_prompt):
    def header(role):
        return [("special", HEADER_START, -1), ("prompt", role, -1), ("special", HEADER_END, -1), ("prompt", "\n\n", -1)]

    parts = [("special", "bos", -1)]
    turn = 0
    for m in messages:
        parts += header(m["role"])
        if m["role"] == "assistant":
            parts += [("reply", m["content"].strip(), turn), ("special", EOT, turn)]
            turn += 1
        else:
            parts += [("prompt", m["content"].strip(), -1), ("special", EOT, -1)]
    return parts + (header("assistant") if add_generation_prompt else [])


def _chatml(messages, add_generation_prompt):
    parts = [("special", "bos", -1)]
    turn = 0
    for m in messages:
        parts += [("special", IM_START, -1), ("prompt", m["role"] + "\n", -1)]
        if m["role"] == "assistant":
            parts += [("reply", m["content"], turn), ("special", IM_END, turn)]
            turn += 1
        else:
            parts += [("prompt", m["content"], -1), ("special", IM_END, -1)]
        parts.append(("prompt", "\n", -1))
    if add_generation_prompt:
        parts += [("special", IM_START, -1), ("prompt", "assistant\n", -1)]
    return parts


def _alpaca(record, add_generation_prompt):
    a = as_alpaca(record)
    template = ALPACA_PROMPT_WITH_INPUT if a["input"] else ALPACA_PROMPT_NO_INPUT
    parts = [("special", "bos", -1), ("prompt", template.format(instruction=a["instruction"], input=a["input"]), -1)]
    if not add_generation_prompt:  # the prompt already ends with "### Response:\n"
        parts += [("reply", a["output"], 0), ("special", "eos", 0)]
    return parts


def _mistral(messages, add_generation_prompt, markers_as_text=False):
    """mistral-common's InstructTokenizerV3 (control markers) or V1 (markers_as_text). Its inference prompt is
    the conversation itself: the model answers right after [/INST]."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    with_system = (users[0] if markers_as_text else users[-1]) if users and system else None
    parts = [("special", "bos", -1)]
    turn = 0
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            reply = m["content"] if markers_as_text else m["content"].rstrip(" ")  # v3 drops a reply's trailing spaces
            parts += [("reply", reply, turn), ("special", "eos", turn)]
            turn += 1
            continue
        text = system + "\n\n" + m["content"] if i == with_system else m["content"]
        if markers_as_text:
            parts.append(("prompt", f"{INST} {text} {END_INST}", -1))
        else:
            parts += [("special", INST, -1), ("prompt", text, -1), ("special", END_INST, -1)]
    return parts


LAYOUTS = {"tulu": _tulu, "llama3": _llama3, "chatml": _chatml, "mistral": _mistral}
TEXT_STARTS = ("mistral",)  # layouts whose every text is encoded as the start of a text (see the docstring)


def mistral_markers_as_text(tokenizer) -> bool:
    """Mistral's v1 format: the tokenizer has no [INST] / [/INST] control tokens, so they are written as text."""
    return bool(missing_markers(tokenizer, "mistral"))


def template_parts(record, template: str, add_generation_prompt: bool = False,
                   markers_as_text: bool = False) -> list[tuple[str, str, int]]:
    """The record rendered with `template` (tulu, llama3, chatml, mistral or alpaca) as parts (see above),
    the neighbouring prompt texts joined. markers_as_text: Mistral's v1 format (mistral_markers_as_text)."""
    if template == "alpaca":
        parts = _alpaca(record, add_generation_prompt)
    elif template == "mistral":
        messages = as_messages(record)
        check_messages(messages, training=False)
        parts = _mistral(messages, add_generation_prompt, markers_as_text)
    elif template in LAYOUTS:
        messages = as_messages(record)
        check_messages(messages, training=False)
        parts = LAYOUTS[template](messages, add_generation_prompt)
    else:
        raise ValueError(f"unknown template {template!r} (expected {', '.join(TEMPLATES)})")
    out = []
    for part in parts:
        if out and part[0] == "prompt" and out[-1][0] == "prompt":
            out[-1] = ("prompt", out[-1][1] + part[1], -1)
        else:
            out.append(part)
    return out


def part_mask(parts, train_on: str) -> list[int]:
    """1 for the parts the loss covers: replies and their end-of-turn token (every turn, or the last), or
    everything but BOS."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"unknown train_on {train_on!r} (expected assistant, last or all)")
    if train_on == "all":
        return [int(part[:2] != ("special", "bos")) for part in parts]
    last = max([turn for _, _, turn in parts], default=-1)
    return [int(turn >= 0 and (train_on == "assistant" or turn == last)) for _, _, turn in parts]


# ============================================================================ parts -> token ids

def missing_markers(tokenizer, template: str) -> list[str]:
    """The markers of `template` that are not single control tokens of the tokenizer."""
    return [m for m in MARKERS.get(template, ()) if tokenizer.marker_id(m) is None]


def check_template(tokenizer, template: str):
    """ValueError naming the missing markers when the tokenizer cannot render `template`."""
    if template not in TEMPLATES[1:]:
        raise ValueError(f"unknown template {template!r} (expected {', '.join(TEMPLATES)})")
    missing = missing_markers(tokenizer, template)
    if missing and template != "mistral":  # mistral without its control tokens is Mistral's v1 format
        usable = [t for t in CHAT_LAYOUTS if not missing_markers(tokenizer, t)]
        raise ValueError(
            f"template {template!r} needs {', '.join(missing)} as single control tokens, and {tokenizer!r} has "
            f"no such token; use {' or '.join(repr(t) for t in usable + ['alpaca'])}, or add the Tulu markers with "
            "`python -m minillm.vocab extend --add-chat-tokens`")


def encode_parts(parts, tokenizer, texts_start: bool = False) -> list[list[int]]:
    """Token ids of every part: special parts are their id (BOS none when the tokenizer has no BOS), text
    right after BOS (or at the start) is encoded like a text start, any other text as a continuation
    (texts_start: every text like a text start, as mistral-common encodes each message on its own)."""
    ids, at_start = [], True
    for kind, value, _ in parts:
        if kind == "special":
            if value == "bos":
                ids.append([tokenizer.bos_id] if tokenizer.bos_id is not None else [])
            else:
                ids.append([tokenizer.eos_id if value == "eos" else tokenizer.marker_id(value)])
            at_start = value == "bos"
        else:
            ids.append(tokenizer.encode(value) if at_start or texts_start else tokenizer.encode_continuation(value))
            at_start = False
    return ids


def render(record, tokenizer, template: str = "auto", train_on: str = "assistant",
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one record (Alpaca dict, {"messages": [...]} or a list of messages).

    template: tulu, llama3, chatml, mistral, alpaca, or auto (resolve_template). The mask is 1 on tokens the loss
    covers (train_on: 'assistant' = every reply + its end-of-turn token, 'last' = the last reply + its
    end-of-turn token, 'all' = everything but BOS), 0 elsewhere. add_generation_prompt=True returns the
    inference prompt: the conversation followed by the assistant's turn header (or the Alpaca prompt
    without the output). Training ids of a conversation always start with the inference prompt ids of the
    conversation up to that reply."""
    template = resolve_template(template, tokenizer)
    markers_as_text = template == "mistral" and mistral_markers_as_text(tokenizer)
    parts = template_parts(record, template, add_generation_prompt, markers_as_text)
    part_ids = encode_parts(parts, tokenizer, texts_start=template in TEXT_STARTS)
    mask = part_mask(parts, train_on)
    ids, loss_mask = [], []
    for p_ids, m in zip(part_ids, mask):
        ids += p_ids
        loss_mask += [m] * len(p_ids)
    return ids, loss_mask


def resolve_template(template: str, tokenizer) -> str:
    """The concrete template: `template` itself (checked: the tokenizer has its markers), or for 'auto' the
    template whose Jinja twin is the tokenizer's own chat_template (a minillm export says what it was trained
    with), else the first chat layout whose markers the tokenizer has: tulu, llama3, chatml, mistral."""
    if template != "auto":
        check_template(tokenizer, template)
        return template
    usable = [t for t in CHAT_LAYOUTS if not missing_markers(tokenizer, t)]
    if tokenizer.chat_template is not None:
        for name in usable + ["alpaca"]:
            if tokenizer.chat_template == chat_template_jinja(name, tokenizer):
                return name
    if not usable:
        raise ValueError(f"template 'auto': {tokenizer!r} has the markers of no chat layout (tulu: "
                         f"{' '.join(MARKERS['tulu'])}; llama3: {' '.join(MARKERS['llama3'])}; chatml: "
                         f"{' '.join(MARKERS['chatml'])}; mistral: {' '.join(MARKERS['mistral'])}); use the alpaca "
                         "or mistral (its v1 format, markers as text) template, or add the Tulu markers with "
                         "`python -m minillm.vocab extend --add-chat-tokens`")
    return usable[0]


TURN_END = {"llama3": EOT, "chatml": IM_END}  # the layouts whose replies end with a marker, not with EOS


def end_ids(model_eos: list[int], tokenizer, template: str) -> list[int]:
    """What an exported model's config.json / generation_config.json must list as eos_token_id so that
    transformers and vLLM stop where the model was trained to end a reply: its own EOS ids, the tokenizer's,
    and the layout's end-of-turn token (<|eot_id|>, <|im_end|>)."""
    end = [tokenizer.marker_id(TURN_END[template])] if template in TURN_END else []
    return list(dict.fromkeys([*model_eos, *tokenizer.eos_ids, *end]))


def stop_ids(tokenizer, template: str) -> list[int]:
    """Token ids that end a generated reply: every end id the tokenizer declares and every marker of the
    layout (its end-of-turn token, or the start of a new turn, which also means the reply is over)."""
    markers = (tokenizer.marker_id(m) for m in MARKERS[template])
    return list(dict.fromkeys([*tokenizer.eos_ids, *(i for i in markers if i is not None)]))


# ============================================================================ the Hugging Face chat template

def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def space_after_bos(tokenizer=None) -> bool:
    """Whether the Jinja Alpaca template must put a ' ' between BOS and the text.

    render encodes the text after BOS like a text start: with sentencepiece's dummy-prefix '▁' ('▁Below').
    Hugging Face's tokenizer adds no dummy prefix to text that follows a special token, so the template
    writes the '▁' as a space. Without a tokenizer, a Llama-style sentencepiece one is assumed."""
    if tokenizer is None:
        return True
    plain = tokenizer.encode("Below is")
    if plain == tokenizer.encode_continuation("Below is"):
        return False
    if plain == tokenizer.encode_continuation(" Below is"):
        return True
    raise ValueError(f"{tokenizer!r}: cannot express its start-of-text encoding in a chat template")


def chat_template_jinja(template: str = "tulu", tokenizer=None) -> str:
    """A Jinja chat template (for tokenizer_config.json) that renders messages exactly as `render` does:
    transformers' apply_chat_template(messages, tokenize=True) gives render(messages, template=template)'s
    ids (see the module docstring for the one exception). Pass the tokenizer unless it is a minillm-trained
    sentencepiece one (it decides whether there is a BOS, and the space after it). One known difference,
    transformers' own: content that contains a special token's spelling ("<|user|>", "</s>") is read as that
    token by Hugging Face's tokenizer, while render keeps it as text."""
    s = _jinja_string
    has_bos = tokenizer.bos_id is not None if tokenizer is not None else template != "chatml"
    lead = "{{ bos_token }}" if has_bos else ""
    unknown_role = "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    roles = "{% if message['role'] in ['system', 'user', 'assistant'] %}"

    if template == "tulu":
        def turn(role: str, suffix: str) -> str:
            return "{{ " + s(TULU_MARKERS[role] + "\n") + " + message['content'] + " + suffix + " }}"
        return (lead + "{% for message in messages %}"
                "{% if message['role'] == 'system' %}" + turn("system", s("\n"))
                + "{% elif message['role'] == 'user' %}" + turn("user", s("\n"))
                + "{% elif message['role'] == 'assistant' %}" + turn("assistant", "eos_token + " + s("\n"))
                + unknown_role + "{% endfor %}"
                "{% if add_generation_prompt %}{{ " + s(TULU_MARKERS["assistant"] + "\n") + " }}{% endif %}")
    if template == "llama3":
        return (lead + "{% for message in messages %}" + roles
                + "{{ " + s(HEADER_START) + " + message['role'] + " + s(HEADER_END + "\n\n")
                + " + message['content'] | trim + " + s(EOT) + " }}" + unknown_role + "{% endfor %}"
                "{% if add_generation_prompt %}{{ " + s(HEADER_START + "assistant" + HEADER_END + "\n\n")
                + " }}{% endif %}")
    if template == "chatml":
        return (lead + "{% for message in messages %}" + roles
                + "{{ " + s(IM_START) + " + message['role'] + " + s("\n") + " + message['content'] + "
                + s(IM_END + "\n") + " }}" + unknown_role + "{% endfor %}"
                "{% if add_generation_prompt %}{{ " + s(IM_START + "assistant\n") + " }}{% endif %}")
    if template == "mistral":
        return _mistral_jinja(lead, tokenizer)
    if template == "alpaca":
        lead += "{{ ' ' }}" if has_bos and space_after_bos(tokenizer) else ""
        no_input_head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
        return (
            "{% if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' or "
            "(messages | length == 2 and messages[1]['role'] != 'assistant') %}"
            "{{ raise_exception('The Alpaca template holds one user instruction and at most one assistant reply') }}"
            "{% endif %}"
            + lead + "{{ " + s(no_input_head) + " + messages[0]['content'] + " + s(tail) + " }}"
            "{% if messages | length == 2 %}{{ messages[1]['content'] + eos_token }}{% endif %}")
    raise ValueError(f"unknown template {template!r} (expected tulu, llama3, chatml, mistral or alpaca)")


def _mistral_jinja(lead: str, tokenizer=None) -> str:
    """The Jinja twin of _mistral. Each text is a text start in render; Hugging Face encodes text after a
    special token with no dummy prefix, so for a sentencepiece tokenizer the template writes that prefix as a
    space, as Mistral's published templates do ('[INST] ' + content, ' ' + reply)."""
    s = _jinja_string
    prefix = " " if space_after_bos(tokenizer) else ""
    space = s(prefix) + " + " if prefix else ""
    as_text = tokenizer is not None and mistral_markers_as_text(tokenizer)
    if as_text:  # v1: "[INST] {text} [/INST]" is text, the system prompt goes before the first user text
        head, tail = s(prefix + INST + " ") + " + ", " + " + s(" " + END_INST)
    else:
        head, tail = s(INST) + " + " + space, " + " + s(END_INST)
    return (
        "{% set ns = namespace(system='', offset=0, with_system=-1) %}"
        "{% if messages | length > 0 and messages[0]['role'] == 'system' %}"
        "{% set ns.system = messages[0]['content'] %}{% set ns.offset = 1 %}{% endif %}"
        "{% for message in messages[ns.offset:] %}{% if message['role'] == 'user' and ns.system and "
        + ("ns.with_system < 0" if as_text else "true") + " %}{% set ns.with_system = loop.index0 %}{% endif %}"
        "{% endfor %}" + lead
        + "{% for message in messages[ns.offset:] %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.index0 == ns.with_system %}{% set text = ns.system + " + s("\n\n") + " + message['content'] %}"
        "{% else %}{% set text = message['content'] %}{% endif %}"
        "{{ " + head + "text" + tail + " }}"
        "{% elif message['role'] == 'assistant' %}{{ " + space + "message['content']" + ("" if as_text else ".rstrip(' ')")
        + " + eos_token }}"
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}{% endfor %}")
