"""Test-set decontamination (minillm/decontaminate.py; `python -m minillm.instructions decontaminate`,
translate --decontaminate): planted overlaps are found and removed, near-misses kept, counts exact.

Run: .venv/bin/python -m pytest -q tests/test_decontaminate.py
Oracle: the planted records themselves: which evaluation set each one shares 13 words (or a whole short
sentence) with is known by construction; near-misses share 12 of 13 words, or 8 of a 9-word sentence.
The vectorised hashes (prefix sums of powers of the multiplier's inverse) against their definition in plain
Python integers modulo 2^64, word by word and window by window.
"""
import json
import random

import pytest

from minillm import decontaminate
from minillm.decontaminate import EvalIndex, decontaminate_records, window_hashes, words_of
from minillm.instructions import main as instructions_main
from minillm.prepare import prepare
from minillm.pretrain_data import TokenShards

LONG = "the quick brown fox jumps over the lazy dog while mari reads her book in the quiet garden"  # 18 words
SHORT = "Kus elab Mari ja tema kolm lehma täna?"  # 8 words: a whole-sentence match from 8 words on
TINY = "Tere hommikust kõigile"  # 3 words: too short to match


def filler(rng, n):
    return " ".join(rng.choice(["kass", "koer", "maja", "päike", "river", "hill", "town"]) for _ in range(n))


@pytest.fixture
def eval_dir(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "mt.task.json").write_text(json.dumps({"name": "mt", "type": "translation", "data": "mt.jsonl"}))
    (d / "mt.jsonl").write_text(json.dumps({"source": "Some source. " + LONG.capitalize() + ".", "references": ["Viide."]}) + "\n")
    (d / "qa.task.json").write_text(json.dumps({"name": "qa", "type": "qa", "data": "qa.jsonl", "dev_data": "qa.dev.jsonl"}))
    (d / "qa.jsonl").write_text(json.dumps({"question": SHORT, "answers": [TINY]}) + "\n")
    (d / "qa.dev.jsonl").write_text(json.dumps({"question": "x", "answers": ["dev answer with many words " + LONG]}) + "\n")
    return d


def planted(rng):
    """(record, the evaluation sets it overlaps)"""
    words = LONG.split()
    cases = [
        ({"instruction": "Translate", "input": filler(rng, 5) + " " + " ".join(words[2:15]).upper() + " " + filler(rng, 3),
          "output": "x"}, {"mt", "qa"}),  # 13 words, other case: LONG is in mt and in qa's dev data
        ({"instruction": filler(rng, 4), "input": "", "output": "\n ".join(words[0:13])}, {"mt", "qa"}),  # other whitespace
        ({"instruction": " ".join(words[3:15]), "input": filler(rng, 6), "output": "y"}, set()),  # 12 of 13: kept
        ({"instruction": " ".join(words[:12]) + " cat " + " ".join(words[13:]), "output": "z"}, set()),  # one word changed
        ({"messages": [{"role": "user", "content": "Vasta: kus elab mari ja tema kolm lehma täna? " + filler(rng, 2)},
                       {"role": "assistant", "content": "Kivilas."}]}, {"qa"}),  # the whole short sentence
        ({"instruction": "Kus elab Mari ja tema kolm lehma", "output": "täna"}, set()),  # 7 of its 8 words in a run
        ({"instruction": TINY, "output": TINY}, set()),  # a sentence below --min-sentence-words
    ]
    return cases + [({"instruction": filler(rng, 20), "output": filler(rng, 10)}, set()) for _ in range(40)]


def test_planted_overlaps_are_removed_and_near_misses_kept(eval_dir):
    rng = random.Random(0)
    cases = planted(rng)
    rng.shuffle(cases)
    records = [r for r, _ in cases]
    kept, report = decontaminate_records(records, [eval_dir])
    assert kept == [r for r, sets in cases if not sets]
    assert report["per_eval_set"] == {"mt": 2, "qa": 3}
    assert report["items"] == 47 and report["overlapping"] == report["removed"] == 3
    index = EvalIndex([eval_dir])
    for record, sets in cases:
        text = "\n".join(v if isinstance(v, str) else " ".join(m["content"] for m in v) for v in record.values())
        assert {index.names[i] for i in index.overlaps(text)} == sets, record
    kept, report = decontaminate_records(records, [eval_dir], report_only=True)
    assert kept == records and report["overlapping"] == 3 and report["removed"] == 0
    kept, _ = decontaminate_records(records, [eval_dir], ngram=12)  # 12-grams: both 12-word near-misses now overlap
    assert len(kept) == len(records) - 5


def test_command_and_translate_option(eval_dir, tmp_path, capsys):
    rng = random.Random(1)
    cases = planted(rng)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r, _ in cases))
    instructions_main(["decontaminate", "--input", str(train), "--eval", str(eval_dir), "--out", str(tmp_path / "clean.jsonl")])
    clean = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert clean == [r for r, sets in cases if not sets]
    report = json.loads((tmp_path / "clean.jsonl.decontamination.json").read_text())
    assert report["per_eval_set"] == {"mt": 2, "qa": 3} and report["removed"] == 3
    assert "3 of 47 items overlap the evaluation sets (mt 2, qa 3); 3 removed" in capsys.readouterr().out
    # translate --decontaminate: the bitext line that is the evaluation sentence does not become an instruction
    pairs = [("The red cat sleeps on the warm roof today.", "Punane kass magab täna soojal katusel."),
             ("My dog runs in the green park every day.", "Minu koer jookseb iga päev rohelises pargis."),
             (LONG.capitalize() + ".", "Kiire pruun rebane hüppab üle laisa koera, kui Mari aias raamatut loeb.")]
    (tmp_path / "bi.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    instructions_main(["translate", "--tsv", str(tmp_path / "bi.tsv"), "--src-lang", "en", "--tgt-lang", "et",
                       "--out", str(tmp_path / "tr.jsonl"), "--decontaminate", str(eval_dir)])
    written = (tmp_path / "tr.jsonl").read_text()
    assert len(written.splitlines()) == 2 and "fox" not in written
    assert json.loads((tmp_path / "tr.jsonl.decontamination.json").read_text())["per_eval_set"] == {"mt": 1, "qa": 1}


def test_prepare_drops_overlapping_documents(eval_dir, tmp_path, chat_tok):
    rng = random.Random(2)
    texts = [filler(rng, 30) for _ in range(60)]
    texts[7] = filler(rng, 10) + " " + LONG + " " + filler(rng, 5)  # overlaps mt and qa (dev)
    texts[30] = "Ta küsis: " + SHORT + " " + filler(rng, 3)  # overlaps qa
    texts[31] = " ".join(LONG.split()[:12]) + " " + filler(rng, 8)  # 12 of 13 words: kept
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    chat_tok.save_pretrained(tmp_path / "tok")
    plain = prepare([corpus], tmp_path / "tok", tmp_path / "plain", progress=False)
    meta = prepare([corpus], tmp_path / "tok", tmp_path / "clean", workers=2, progress=False, decontaminate=[eval_dir])
    assert plain["num_docs"] == 60 and meta["num_docs"] == 58 and meta["skipped_empty_docs"] == 0
    assert meta["decontamination"]["per_eval_set"] == {"mt": 1, "qa": 2} and meta["decontamination"]["removed"] == 2
    assert json.loads((tmp_path / "clean.decontamination.json").read_text()) == meta["decontamination"]
    kept = [list(TokenShards(tmp_path / "clean").doc(i)) for i in range(58)]
    assert kept == [chat_tok.encode(t, bos=True, eos=True) for i, t in enumerate(texts) if i not in (7, 30)]


M = int(decontaminate.MULTIPLIER)


def polynomial(values) -> int:
    """sum of values[t] * M^(len-1-t) modulo 2^64: the hashes' definition, in Python integers."""
    h = 0
    for v in values:
        h = (h * M + int(v)) % (1 << 64)
    return h


@pytest.mark.parametrize("cached", [True, False])
def test_hashes_equal_their_definition_in_python_integers(monkeypatch, cached):
    if not cached:  # batches longer than the cached power tables compute their own
        monkeypatch.setattr(decontaminate, "CACHED_POWERS", 16)
        monkeypatch.setattr(decontaminate, "_power_tables", {})
    rng = random.Random(3)
    alphabet = ["a", "Ü", "õ", "Z", "9", ".", "\u4e2d", "\0", " ", "\t", "\n", "\r\n", "\x0b", "\x0c", "  "]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60))) for _ in range(50)]
    texts[5] = "x" * 70_000 + " y"  # longer than the first power table
    hashes, text_of = words_of(texts)
    expected, owners = [], []
    for i, t in enumerate(texts):
        for w in t.lower().encode().split():  # bytes.split(): ASCII whitespace, as words_of
            expected.append((polynomial(w) * M + len(w)) % (1 << 64))
            owners.append(i)
    assert hashes.tolist() == expected and text_of.tolist() == owners
    windows = window_hashes(hashes, [1, 2, 13])
    for n in (1, 2, 13):
        assert windows[n].tolist() == [polynomial(expected[i:i + n]) for i in range(len(expected) - n + 1)]
    assert window_hashes(hashes[:5], [13])[13].tolist() == []


def test_a_batch_finds_what_each_text_finds_alone(eval_dir):
    rng = random.Random(4)
    cases = planted(rng) * 3
    rng.shuffle(cases)
    texts = ["\n".join(str(v) for v in r.values()) for r, _ in cases]
    index = EvalIndex([eval_dir])
    assert index.batch_overlaps(texts) == [index.overlaps(t) for t in texts]
    assert sum(map(bool, index.batch_overlaps(texts))) == 9
