"""Instruction and preference data (minillm/sft_data.py): SFT examples with loss masks, truncation, packing,
the per-rank slices of a step, preference pairs and their one-pass batches, bad records.

Run: .venv/bin/python -m pytest -q tests/test_sft_data.py

Oracles: chat_format.render (the mask each example must carry), hand-built rows, and the tiny model's own
log-likelihood computed unpacked.
"""
import json

import pytest
import torch

from minillm.chat_format import render
from minillm.losses import IGNORE_INDEX
from minillm.model import Llama, LlamaConfig
from minillm.sft_data import (load_preferences, load_sft_examples, load_sft_jsonl, pack_examples, pair_batch,
                              render_preference, step_slices, steps_per_epoch, take_rows, tokenize_sft_examples)

from conftest import THREE_TURNS  # noqa: E402

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tok(chat_tok):
    return chat_tok


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny")).eval()


# ----------------------------------------------------------------------------- examples and masks

def long_record(n_words: int, reply: str = "punane kass") -> dict:
    return {"instruction": " ".join(["tere"] * n_words), "input": "", "output": reply}


def test_labels_are_aligned_and_pack(tok):
    records = [{"messages": THREE_TURNS}, {"instruction": "Translate.", "input": "the cat", "output": "kass"}]
    examples, stats = tokenize_sft_examples(records, tok, seq_len=256)
    assert stats == {"truncated": 0, "dropped_too_long": 0, "dropped_no_trainable_tokens": 0}
    for record, (ids, labels) in zip(records, examples):
        ref_ids, mask = render(record, tok, template="auto")
        assert ids == ref_ids
        assert labels == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        assert labels[0] == IGNORE_INDEX
    rows = pack_examples(examples, 256, pad_id=tok.pad_id)  # pack_examples takes them as they are
    assert int((rows["labels"] != IGNORE_INDEX).sum()) == sum(sum(1 for x in lab if x != IGNORE_INDEX)
                                                              for _, lab in examples)


def test_truncation_and_drop_counts(tok):
    short = {"instruction": "Translate.", "input": "", "output": "kass"}
    records = [short, long_record(60), long_record(60), long_record(300)]
    seq_len = len(render(long_record(60), tok, template="alpaca")[0]) - 2  # the 60-word ones are 2 tokens too long
    reply = tok.encode_continuation("punane kass") + [tok.eos_id]

    right, stats = tokenize_sft_examples(records, tok, seq_len, truncate="right", template="alpaca")
    # 60 words cut at the right: 2 reply tokens are lost but some remain; 300 words: the reply is gone.
    assert stats == {"truncated": 3, "dropped_too_long": 0, "dropped_no_trainable_tokens": 1}
    assert len(right) == 3 and all(len(ids) <= seq_len for ids, _ in right)
    full, _ = render(long_record(60), tok, template="alpaca")
    assert right[1][0] == full[:seq_len]
    assert [t for t in right[1][1] if t != IGNORE_INDEX] == reply[:-2]

    left, stats = tokenize_sft_examples(records, tok, seq_len, truncate="left", template="alpaca")
    assert stats == {"truncated": 3, "dropped_too_long": 0, "dropped_no_trainable_tokens": 0}
    for ids, labels in left[1:]:  # BOS kept, then the last seq_len - 1 tokens: the whole reply survives
        assert len(ids) == seq_len and ids[0] == tok.bos_id and ids[-len(reply):] == reply
        assert [t for t in labels if t != IGNORE_INDEX] == reply

    dropped, stats = tokenize_sft_examples(records, tok, seq_len, truncate="drop", template="alpaca")
    assert stats == {"truncated": 0, "dropped_too_long": 3, "dropped_no_trainable_tokens": 0}
    assert len(dropped) == 1
    with pytest.raises(ValueError, match="truncate"):
        tokenize_sft_examples(records, tok, seq_len, truncate="middle")


def test_zero_trainable_examples_are_dropped_never_kept(tok, tmp_path):
    # train_on='last' with the last reply cut away leaves no trained token even though earlier replies fit.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "tere"},
                {"role": "user", "content": " ".join(["tere"] * 200)}, {"role": "assistant", "content": "kass"}]
    examples, stats = tokenize_sft_examples([{"messages": messages}], tok, 64, train_on="last")
    assert examples == [] and stats["dropped_no_trainable_tokens"] == 1
    examples, stats = tokenize_sft_examples([{"messages": messages}], tok, 64, train_on="assistant")
    assert len(examples) == 1 and stats["dropped_no_trainable_tokens"] == 0
    # what a script prints about each file: the examples it gave and what was dropped
    path = write(tmp_path / "one.jsonl", [{"messages": messages}, GOOD])
    said = []
    load_sft_examples([str(path)], tok, 64, said.append, train_on="last", template="tulu")
    assert said == [f"{path}: 1 examples, truncated 1, dropped_no_trainable_tokens 1"]
    with pytest.raises(ValueError, match="no trainable examples"):
        load_sft_examples([str(write(tmp_path / "none.jsonl", [{"messages": messages}]))], tok, 64, said.append,
                          train_on="last")


# ----------------------------------------------------------------------------- bad input

def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


GOOD = {"instruction": "Translate.", "input": "", "output": "kass"}


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "Translate."}, "missing field 'output'"),
    ({"output": "kass"}, "missing field 'instruction'"),
    ({"text": "no instruction at all"}, "neither 'messages'"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "does not end with an assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing field 'content'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}, "expected a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system message may only come first"),
    ({"instruction": "x", "output": 3}, "field 'output' is int"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "messages[1]: a user turn where an assistant turn must come"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     "messages[1]: an assistant turn where a user turn must come"),
    ("[1, 2]", "expected a JSON object"),
    ('{"instruction": "x", "output": ', "not valid JSON"),
])
def test_bad_sft_records_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path / "bad.jsonl", [GOOD, "", bad, GOOD])  # a blank line 2 does not shift the count
    with pytest.raises(ValueError) as e:
        load_sft_jsonl(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)


def test_empty_file_and_inference_conversations(tmp_path):
    with pytest.raises(ValueError, match="empty file"):
        load_sft_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(ValueError, match="cannot read"):
        load_sft_jsonl(tmp_path / "missing.jsonl")
    prompts = write(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert load_sft_jsonl(prompts, training=False) == [{"messages": [{"role": "user", "content": "hi"}]}]
    mixed = write(tmp_path / "mixed.jsonl", [GOOD, {"messages": THREE_TURNS}, {**GOOD, "kind": "extra fields ok"}])
    assert len(load_sft_jsonl(mixed)) == 3


# ----------------------------------------------------------------------------- preference pairs

def test_preference_pair_shares_the_prompt_ids(tok):
    record = {"prompt": [{"role": "system", "content": "Ole abivalmis."},
                         {"role": "user", "content": "Kus elab Mari?"}],
              "chosen": "Mari elab Kivilas.", "rejected": {"role": "assistant", "content": "Mari elab kass."}}
    pair = render_preference(record, tok, 256)
    prompt, _ = render(record["prompt"], tok, add_generation_prompt=True)
    assert pair["prompt_len"] == len(prompt) and not pair["truncated"]
    for key, reply in (("chosen", "Mari elab Kivilas."), ("rejected", "Mari elab kass.")):
        ids, labels = pair[key]
        full, mask = render(record["prompt"] + [{"role": "assistant", "content": reply}], tok)
        # the rendered conversation up to the reply's EOS: what a template puts after it is never scored
        assert ids == full[:len(ids)] and ids[-1] == tok.eos_id and ids[:len(prompt)] == prompt
        assert all(m == 0 for m in mask[len(ids):])
        assert all(x == IGNORE_INDEX for x in labels[:len(prompt)])
        assert [x for x in labels if x != IGNORE_INDEX] == tok.encode_continuation(reply) + [tok.eos_id]
    # A string prompt is one user turn; a chosen conversation (UltraFeedback layout) is its last reply.
    as_string = {"prompt": "Kus elab Mari?", "chosen": "Kivilas.", "rejected": "Tartus."}
    as_lists = {"prompt": [{"role": "user", "content": "Kus elab Mari?"}],
                "chosen": [{"role": "user", "content": "Kus elab Mari?"}, {"role": "assistant", "content": "Kivilas."}],
                "rejected": [{"role": "assistant", "content": "Tartus."}]}
    assert render_preference(as_string, tok, 256) == render_preference(as_lists, tok, 256)


def test_load_preferences_counts_identical_no_room_and_truncated(tok, tmp_path):
    long_prompt = " ".join(["tere"] * 200)
    lines = [{"prompt": "Kus elab Mari?", "chosen": "Kivilas.", "rejected": "Tartus."},
             {"prompt": "Kus elab Mari?", "chosen": "Kivilas.", "rejected": "Kivilas."},
             {"prompt": long_prompt, "chosen": "Kivilas.", "rejected": "Tartus."},
             {"prompt": "hi", "chosen": " ".join(["kass"] * 100), "rejected": "koer"}]
    path = write(tmp_path / "prefs.jsonl", lines)
    said = []
    pairs, stats = load_preferences(path, tok, 64, report=said.append)
    assert stats == {"dropped_identical": 1, "dropped_no_room": 1, "truncated": 1}
    assert said == [f"{path}:2: chosen and rejected are identical; pair dropped"]
    assert len(pairs) == 2
    chosen_ids, chosen_labels, rejected_ids, rejected_labels = pairs[1]
    assert len(chosen_ids) == 64 and len(chosen_labels) == 64 and chosen_labels[-1] != IGNORE_INDEX
    assert rejected_labels[-1] == rejected_ids[-1] == tok.eos_id  # the short reply keeps its EOS, and ends there
    prompt, _ = render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)
    assert chosen_ids[:len(prompt)] == rejected_ids[:len(prompt)] == prompt


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "x", "chosen": "", "rejected": "b"}, "empty 'chosen' response"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "empty 'rejected' response"),
    ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant turn"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}, "unknown role 'bot'"),
    ({"prompt": "x", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "expected 'assistant'"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}],
      "rejected": "b"}, "does not start with the prompt"),
])
def test_bad_preference_records_name_file_and_line(tok, tmp_path, bad, message):
    good = {"prompt": "x", "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(ValueError) as e:
        load_preferences(path, tok, 64)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)

# ----------------------------------------------------------------------------- rows, slices, pairs

def test_pack_examples_best_fit_and_shifted_labels():
    ex = [([1, 10, 11, 2], [-100, -100, 11, 2]),  # 4 tokens, prompt masked
          ([1, 20, 21, 22, 23, 2], [-100, 20, 21, 22, 23, 2]),  # 6
          ([1, 30, 2], [-100, 30, 2]),  # 3
          ([1, 40, 2], [-100, -100, 2])]  # 3
    b = pack_examples(ex, seq_len=8)
    # best fit in order: row0 = ex0 (room 4); ex1 -> new row1 (room 2); ex2 -> row0 (room 1); ex3 -> new row2
    assert b["input_ids"].tolist() == [[1, 10, 11, 2, 1, 30, 2, 0], [1, 20, 21, 22, 23, 2, 0, 0], [1, 40, 2] + [0] * 5]
    assert b["labels"].tolist() == [[-100, 11, 2, -100, 30, 2, -100, -100],
                                    [20, 21, 22, 23, 2, -100, -100, -100],
                                    [-100, 2, -100, -100, -100, -100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    one = pack_examples(ex, seq_len=8, pack=False)
    assert one["input_ids"].shape == (4, 8) and one["labels"][2].tolist() == [30, 2] + [-100] * 6
    with pytest.raises(ValueError, match="example 1: 6 tokens do not fit seq_len 5"):
        pack_examples(ex, seq_len=5)
    with pytest.raises(ValueError, match="example 0: 2 ids but 1 labels"):
        pack_examples([([1, 2], [2])], seq_len=5)


@torch.no_grad()
def test_packed_and_unpacked_examples_give_the_same_loss(tiny_model):
    g = torch.Generator().manual_seed(1)
    ex = []
    for n in (5, 17, 9, 30, 3, 12, 21):
        ids = [BOS] + torch.randint(3, 500, (n,), generator=g).tolist() + [EOS]
        labels = [-100] * (n // 2 + 1) + ids[n // 2 + 1:]
        ex.append((ids, labels))

    def nll_sum(b):
        logits = tiny_model(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"]).double()
        mask = b["labels"] != -100
        return -logits.log_softmax(-1)[mask].gather(-1, b["labels"][mask][:, None]).sum(), mask.sum()

    packed, unpacked = pack_examples(ex, 40), pack_examples(ex, 40, pack=False)
    assert len(packed["input_ids"]) < len(unpacked["input_ids"])
    (a, na), (b, nb) = nll_sum(packed), nll_sum(unpacked)
    assert na == nb == sum(sum(l != -100 for l in labels[1:]) for _, labels in ex)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_step_slices_cover_each_item_once_whatever_the_split():
    """The items of a step depend only on micro-batch x accumulation x ranks; the last step pads with -1."""
    n = 10
    for micro, accum, world in ((4, 1, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2), (3, 1, 1)):
        per_step = micro * accum * world
        steps = steps_per_epoch(n, micro, accum, world)
        assert steps == -(-n // per_step)
        seen = []
        for s in range(steps):
            items = [i for r in range(world) for idx in step_slices(n, s, micro, accum, r, world) for i in idx]
            assert len(items) == per_step  # every rank takes the same number of rows
            assert sorted(i for i in items if i >= 0) == list(range(s * per_step, min(n, (s + 1) * per_step)))
            seen += [i for i in items if i >= 0]
        assert sorted(seen) == list(range(n))


def test_take_rows_pads_with_rows_without_targets():
    rows = pack_examples([([1, 5, 6, 2], [-100, 5, 6, 2]), ([1, 7, 2], [-100, 7, 2])], 6, pack=False)
    got = take_rows(rows, [1, -1])
    assert torch.equal(got["input_ids"][0], rows["input_ids"][1])
    assert (got["labels"][1] == IGNORE_INDEX).all()


def test_pair_batch_halves_padding_pairs_and_nll_targets(tok, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Kus elab Mari?", "chosen": "Mari elab Kivilas.", "rejected": "Kivilas."},
        {"prompt": [{"role": "system", "content": "Ole abivalmis."}, {"role": "user", "content": "tere"}],
         "chosen": "tere", "rejected": "kass koer"}]))
    pairs, _ = load_preferences(path, tok, 64)
    batch = pair_batch(pairs, [0, 1, -1], nll_on_prompt=False, pad_id=tok.pad_id)
    assert batch["input_ids"].shape[0] == 6 and batch["pair_mask"].tolist() == [True, True, False]
    for row, (side, i) in enumerate([(0, 0), (0, 1), (0, 0), (2, 0), (2, 1), (2, 0)]):
        ids, labels = pairs[i][side], pairs[i][side + 1]
        assert batch["input_ids"][row, :len(ids)].tolist() == ids
        if row % 3 == 2:  # the padding pair: nothing scored
            assert not batch["response_mask"][row].any() and (batch["labels"][row] == IGNORE_INDEX).all()
        else:  # labels are the next token where the reply (and its EOS) is
            assert batch["labels"][row, :len(ids) - 1].tolist() == labels[1:]
            assert torch.equal(batch["response_mask"][row], batch["labels"][row] != IGNORE_INDEX)
    # --nll-on-prompt: every next token from the first to the reply's end-of-turn token, nothing after it
    with_prompt = pair_batch(pairs, [0, 1], nll_on_prompt=True, pad_id=tok.pad_id)
    for row in range(4):
        ids = pairs[row % 2][0 if row < 2 else 2]
        scored = with_prompt["labels"][row][with_prompt["labels"][row] != IGNORE_INDEX].tolist()
        assert scored == ids[1:] and scored[-1] == tok.eos_id
