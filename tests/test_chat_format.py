"""Chat / Alpaca templates and their loss masks, and the exported Jinja twin (minillm/chat_format.py).

Run: cd /work/main && python -m pytest -q tests/test_chat_format.py
Oracles: hand-written template strings and token spans; tokenizing the whole rendered string at once;
transformers' AutoTokenizer.apply_chat_template with the exported Jinja template (test-only dependency).
"""
import random

import pytest

from minillm.chat_format import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, chat_template_jinja, render
from minillm.tokenizer import CHAT_TOKENS, Tokenizer

# The Stanford Alpaca prompts, typed here independently of the module's constants.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

from conftest import THREE_TURNS, WORDS  # noqa: E402

MARKER = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


@pytest.fixture(scope="module")
def hf_dirs(tok, tmp_path_factory):
    """Tokenizer directories written by Tokenizer.save_pretrained with the chat / Alpaca Jinja template."""
    dirs = {}
    for fmt in ("chat", "alpaca"):
        d = tmp_path_factory.mktemp(f"hf_{fmt}")
        tok.save_pretrained(d, chat_template=chat_template_jinja(fmt))
        dirs[fmt] = d
    return dirs


def whole_string_ids(text: str, tok) -> list[int]:
    """The oracle: BOS + the whole rendered text (with '</s>' marking EOS) tokenized at once, EOS as an id."""
    chunks = text.split("</s>")
    ids = [tok.bos_id] + tok.encode(chunks[0])
    for chunk in chunks[1:]:
        ids += [tok.eos_id] + tok.encode_continuation(chunk)
    return ids


def mask_runs(mask):
    """[(start, end)] of the maximal runs of 1s."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def random_text(rng) -> str:
    vocabulary = WORDS + ["12,50", "2024", "😀", "漢字", "a\nb", "  ", "x\ty", "Õ"]
    words = [rng.choice(vocabulary) for _ in range(rng.randint(0, 8))]
    text = rng.choice([" ", "  ", ""]).join(words)
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", " ", "\n", "."])


def random_conversation(rng, end_with_assistant=True):
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return messages if end_with_assistant else messages[:-1]


# ----------------------------------------------------------------------------- the masks, by hand

def test_three_turn_chat_mask_is_exactly_the_assistant_spans(tok):
    ids, mask = render(THREE_TURNS, tok, fmt="chat")
    B, E, enc, cont = tok.bos_id, tok.eos_id, tok.encode, tok.encode_continuation
    # The Tulu layout, written out by hand; each reply is followed by EOS (an id) and "\n".
    prompt0 = "<|system|>\nOle abivalmis.\n<|user|>\nTranslate to Estonian: the red cat\n<|assistant|>\n"
    prompt1 = "\n<|user|>\nAnd the dog?\n<|assistant|>\n"
    prompt2 = "\n<|user|>\nKus elab Mari?\n<|assistant|>\n"
    pieces = [([B] + enc(prompt0), 0), (cont("punane kass") + [E], 1), (cont(prompt1), 0), (cont("koer") + [E], 1),
              (cont(prompt2), 0), (cont("Mari elab Kivilas.") + [E], 1), (cont("\n"), 0)]
    assert ids == [t for p, _ in pieces for t in p]
    assert mask == [m for p, m in pieces for _ in p]
    # Exactly three trained spans; each decodes to its reply, ends with EOS and follows "<|assistant|>" "\n".
    runs = mask_runs(mask)
    assert len(runs) == 3
    for (start, end), reply in zip(runs, ["punane kass", "koer", "Mari elab Kivilas."]):
        assert tok.decode(ids[start:end]) == reply and ids[end - 1] == E
        assert tok.id_to_piece(ids[start - 1]) == "<0x0A>" and tok.id_to_piece(ids[start - 2]) == "<|assistant|>"
    assert sum(mask) == sum(len(cont(r)) + 1 for r in ["punane kass", "koer", "Mari elab Kivilas."])
    assert ids == whole_string_ids(prompt0 + "punane kass</s>" + prompt1 + "koer</s>" + prompt2
                                   + "Mari elab Kivilas.</s>\n", tok)


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_mask_is_exactly_the_response_and_eos(tok, with_input):
    record = {"instruction": "Translate to Estonian.", "input": "the red cat" if with_input else "",
              "output": "punane kass"}
    ids, mask = render(record, tok, fmt="alpaca")
    prompt = (ALPACA_WITH_INPUT if with_input else ALPACA_NO_INPUT).format(**record)
    prompt_ids = tok.encode(prompt, bos=True)
    reply_ids = tok.encode_continuation("punane kass") + [tok.eos_id]
    assert ids == prompt_ids + reply_ids
    assert mask == [0] * len(prompt_ids) + [1] * len(reply_ids)
    assert tok.decode(ids[:len(prompt_ids)]) == prompt  # the exact Stanford text
    assert tok.id_to_piece(ids[1]).startswith("▁")  # BOS, then the dummy prefix (as Llama encodes a document)
    assert ids == whole_string_ids(prompt + "punane kass</s>", tok)
    # The module's constants are the Stanford text too.
    assert ALPACA_PROMPT_WITH_INPUT == ALPACA_WITH_INPUT and ALPACA_PROMPT_NO_INPUT == ALPACA_NO_INPUT


def test_train_on_variants(tok):
    ids, every = render(THREE_TURNS, tok, train_on="assistant")
    _, last = render(THREE_TURNS, tok, train_on="last")
    _, everything = render(THREE_TURNS, tok, train_on="all")
    runs = mask_runs(every)
    assert mask_runs(last) == runs[-1:]
    assert everything == [0] + [1] * (len(ids) - 1)  # everything but BOS
    for train_on in ("assistant", "last", "all"):  # the mask never changes the ids
        assert render(THREE_TURNS, tok, train_on=train_on)[0] == ids
    with pytest.raises(ValueError, match="train_on"):
        render(THREE_TURNS, tok, train_on="user")


def test_alpaca_record_as_chat_and_conversation_as_alpaca(tok):
    record = {"instruction": "Translate.", "input": "the cat", "output": "kass"}
    chat = [{"role": "user", "content": "Translate.\n\nthe cat"}, {"role": "assistant", "content": "kass"}]
    assert render(record, tok, fmt="chat") == render(chat, tok, fmt="chat")
    assert render({"messages": chat}, tok, fmt="auto") == render(chat, tok, fmt="chat")
    assert render(record, tok, fmt="auto") == render(record, tok, fmt="alpaca")
    one_turn = [{"role": "user", "content": "Translate."}, {"role": "assistant", "content": "kass"}]
    assert render(one_turn, tok, fmt="alpaca") == render({"instruction": "Translate.", "output": "kass"}, tok,
                                                         fmt="alpaca")
    with pytest.raises(ValueError, match="Alpaca"):
        render(THREE_TURNS, tok, fmt="alpaca")


# ----------------------------------------------------------------------------- tokens == whole string

def test_ids_equal_whole_string_tokenization_on_random_conversations(tok):
    rng = random.Random(1)
    naive_differs = 0
    for _ in range(200):
        messages = random_conversation(rng)
        ids, mask = render(messages, tok)
        text = "".join(MARKER[m["role"]] + m["content"] + ("</s>\n" if m["role"] == "assistant" else "\n")
                       for m in messages)
        assert ids == whole_string_ids(text, tok)
        assert len(mask) == len(ids)
        # The pitfall: encoding every segment on its own (a dummy prefix each time) gives other tokens.
        naive = [tok.bos_id]
        for m in messages:
            naive += tok.encode(MARKER[m["role"]]) + tok.encode(m["content"])
            naive += ([tok.eos_id] if m["role"] == "assistant" else []) + tok.encode("\n")
        naive_differs += naive != ids
    assert naive_differs > 100


def test_generation_prompt_is_a_prefix_of_the_training_ids(tok):
    ids, mask = render(THREE_TURNS, tok)
    starts = [start for start, _ in mask_runs(mask)]
    assistant_at = [i for i, m in enumerate(THREE_TURNS) if m["role"] == "assistant"]
    for start, k in zip(starts, assistant_at):
        prompt, prompt_mask = render(THREE_TURNS[:k], tok, add_generation_prompt=True)
        assert prompt == ids[:start] and len(prompt) == start
    record = {"instruction": "Translate.", "input": "the cat", "output": "kass"}
    full, _ = render(record, tok, fmt="alpaca")
    prompt, _ = render({**record, "output": ""}, tok, fmt="alpaca", add_generation_prompt=True)
    assert full[:len(prompt)] == prompt and full[len(prompt):] == tok.encode_continuation("kass") + [tok.eos_id]


def test_tokenizer_that_merges_across_the_reply_start_is_refused(tmp_path):
    lines = ["tere maailm the red cat kõik hästi"] * 50
    merging = Tokenizer.train(iter(lines), tmp_path / "m", 300, user_defined_symbols=CHAT_TOKENS + ("\nte",))
    with pytest.raises(ValueError, match="merges text across the start of an assistant reply"):
        render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "tere"}], merging)


# ----------------------------------------------------------------------------- Hugging Face chat template

def test_exported_chat_template_reproduces_training_ids_through_transformers(tok, hf_dirs):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dirs["chat"])
    rng = random.Random(2)
    cases = [THREE_TURNS] + [random_conversation(rng) for _ in range(60)]
    for messages in cases:
        ids, _ = render(messages, tok, fmt="chat")
        assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
    for messages in [THREE_TURNS[:-1]] + [random_conversation(rng, end_with_assistant=False) for _ in range(30)]:
        prompt, _ = render(messages, tok, add_generation_prompt=True)
        assert hf.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True) == prompt


def test_exported_alpaca_template_reproduces_training_ids_through_transformers(tok, hf_dirs):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(hf_dirs["alpaca"])
    rng = random.Random(3)
    for _ in range(30):
        messages = [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
        ids, _ = render(messages, tok, fmt="alpaca")
        assert hf.apply_chat_template(messages, tokenize=True, return_dict=False) == ids
        prompt, _ = render(messages[:1], tok, fmt="alpaca", add_generation_prompt=True)
        assert hf.apply_chat_template(messages[:1], tokenize=True, return_dict=False,
                                      add_generation_prompt=True) == prompt
    with pytest.raises(Exception, match="Alpaca"):
        hf.apply_chat_template(THREE_TURNS, tokenize=False)


def test_template_reloads_through_from_pretrained(tok, hf_dirs):
    assert Tokenizer.from_pretrained(hf_dirs["chat"]).chat_template == chat_template_jinja()
    for fmt in ("chat", "alpaca"):  # the tokenizer-specific template equals the default for a minillm tokenizer
        assert chat_template_jinja(fmt, tok) == chat_template_jinja(fmt)
