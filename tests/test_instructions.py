"""Instruction-data builders (minillm/instructions.py): bitext filters, translation instructions, mixtures.

Run: cd /work/main && python -m pytest -q tests/test_instructions.py
Oracles: hand-made sentence pairs with a known verdict per filter, hand-computed counts for the reverse
share and the composition table, and the chat template's render for token counts.
"""
import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from minillm.chat_format import render
from minillm.instructions import (
    FILTERS, FilterConfig, build_translation_instructions, digit_runs, filter_pairs, first_failing_filter,
    format_filter_report, main, numbers, terminal_punctuation,
)
from minillm.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": "punane", "blue": "sinine", "green": "roheline", "black": "must", "white": "valge"}
ANIMALS = {"cat": "kass", "dog": "koer", "cow": "lehm", "bird": "lind"}


def good_pairs(n: int) -> list[tuple[str, str]]:
    """n distinct, clean English -> Estonian pairs."""
    out = []
    for i in range(n):
        c, a = list(COLOURS)[i % 5], list(ANIMALS)[(i // 5) % 4]
        out.append((f"The {c} {a} number {i} is here.", f"{COLOURS[c].capitalize()} {ANIMALS[a]} number {i} on siin."))
    return out


# ----------------------------------------------------------------------------- filters, one hand case each

@pytest.mark.parametrize("src, tgt, expected", [
    ("", "Tere.", "empty"),
    ("Hello.", "   ", "empty"),
    ("Heino has a dog.", "Heino  has a dog.", "identical"),
    ("Look at " + "x" * 41, "Vaata " + "x" * 41, "long_word"),
    ("word " * 101, "sõna " * 101, "length"),
    ("Hello.", "Tere, kuidas sul täna läheb, mu kallis sõber?", "length_ratio"),
    ("Call 555-1234-5678!", "Helista 555-1234-5678!", "alpha"),
    ("Is it raining?", "Kas sajab vihma.", "terminal_punct"),
    ("Is it raining?", "Kas sajab vihma", "terminal_punct"),
    ("A cake costs 8.00 euros.", "Kook maksab 13,00 eurot.", "numerals"),
    ("Tiina has 3 cats.", "Tiinal on kolm kassi.", "numerals"),
    ("Tiina has 0 cats.", "Tiinal on üks kass.", "numerals"),
    ("Tab\there.", "Tabel\x07 siin.", "control_chars"),
    ("Bell \x1b[1m here.", "Kell siin.", "control_chars"),
    # kept: a missing final period, the word for zero, equal values written differently
    ("It is raining", "Sajab vihma.", None),
    ("Unknown media type.", "Tundmatu meedia tüüp", None),
    ("division by 0", "nulliga jagamine", None),
    # kept: NULL on both sides is an identifier, not Estonian's "null" (zero); in Estonian alone it is zero
    ("The value is NULL.", "Väärtus on NULL.", None),
    ("Set the pointer to NULL before freeing it.", "Määra osuti enne vabastamist NULL-iks.", None),
    ("It costs 1.50 euros.", "See maksab 1,5 eurot.", None),
    ("Line one.\nLine\ttwo.", "Rida üks.\nRida\tkaks.", None),
    # kept: separators between digits are ignored, terminal punctuation is read past closing quotes
    ("A loaf of bread costs 6.30 euros.", "Leib maksab 6,30 eurot.", None),
    ("12,500 people live in Kivila.", "Kivilas elab 12 500 inimest.", None),
    ("Today is Monday, July 19.", "Täna on esmaspäev, 19. juuli.", None),
    ('She asked: "Why?"', 'Ta küsis: "Miks?"', None),
    ("the red cat", "punane kass", None),
])
def test_each_filter_on_a_hand_case(src, tgt, expected):
    assert first_failing_filter(src, tgt, FilterConfig(), "en", "et") == expected


@pytest.mark.parametrize("src, tgt", [
    ("It is raining", "Sajab vihma."),
    ("Unknown media type.", "Tundmatu meedia tüüp"),
])
def test_strict_terminal_punctuation(src, tgt):
    assert first_failing_filter(src, tgt, FilterConfig(strict_terminal_punct=True)) == "terminal_punct"


@pytest.mark.parametrize("src, tgt", [
    ("division by 0", "nulliga jagamine"),
    ("It costs 1.50 euros.", "See maksab 1,5 eurot."),
])
def test_strict_numerals(src, tgt):
    assert first_failing_filter(src, tgt, FilterConfig(strict_numerals=True)) == "numerals"


def test_numbers_as_values():
    assert numbers("1,50 or 1.5 or 12,500 or 12 500 and 0007", "en") == sorted(
        [Decimal("1.5"), Decimal("1.5"), Decimal(12500), Decimal(12500), Decimal(7)])
    assert numbers("jagamine nulliga, null korda", "et") == [0, 0]
    assert numbers("zero, nought, none", "en") == [0, 0]
    assert numbers("podzielić przez zero, bez zer, zerwać", "pl") == [0, 0]
    assert numbers("Nulliga", "de") == []  # no list of zero words for the language: no words counted


def test_filter_helpers():
    assert digit_runs("costs 1.50 or 12,500 or 12 500, year 2024") == sorted(["150", "12500", "12500", "2024"])
    assert terminal_punctuation('Ta ütles: "Tere!" ') == "!"
    assert terminal_punctuation("Ilmateade") == ""
    assert first_failing_filter("Hello there.", "Tere seal.", FilterConfig(max_length_ratio=1.1)) == "length_ratio"
    assert first_failing_filter("one two three.", "üks kaks kolm.", FilterConfig(max_words=2)) == "length"


def test_filter_report_counts_each_pair_once_under_its_first_failing_filter():
    pairs = good_pairs(20)
    bad = [("", ""),                                          # empty (also identical, counted once)
           ("The dog.", "The dog."),                          # identical
           pairs[3],                                          # duplicate of a kept pair
           (" " + pairs[4][0] + " ", pairs[4][1] + "  "),     # duplicate after whitespace normalisation
           ("A cake costs 8.00 euros.", "Kook maksab 13,00 eurot."),  # numerals
           ("Yes.", "Jah, seda ma tõesti arvan ja usun kindlalt.")]   # length_ratio
    kept, report = filter_pairs(pairs + bad)
    examples = report.pop("examples")
    assert report == {"empty": 1, "control_chars": 0, "identical": 1, "long_word": 0, "length": 0, "length_ratio": 1,
                      "alpha": 0, "terminal_punct": 0, "numerals": 1, "duplicate": 2, "kept": 20, "total": 26}
    assert [line for line, _, _ in kept] == list(range(1, 21))
    assert set(report) == set(FILTERS) | {"kept", "total"}
    # the first two removals of each filter, with their lines, in the report and its printout
    assert examples["duplicate"] == [[23, pairs[3][0], pairs[3][1]], [24, pairs[4][0], pairs[4][1]]]
    assert examples["numerals"] == [[25, "A cake costs 8.00 euros.", "Kook maksab 13,00 eurot."]]
    assert set(examples) == {"empty", "identical", "duplicate", "numerals", "length_ratio"}
    printed = format_filter_report({**report, "examples": examples})
    assert "  numerals (line 25): 'A cake costs 8.00 euros.' | 'Kook maksab 13,00 eurot.'" in printed


# ----------------------------------------------------------------------------- translation instructions

def is_estonian(text: str) -> bool:
    return any(w in text for w in ANIMALS.values()) and " on siin" in text


def test_reverse_share_templates_and_placement():
    pairs = good_pairs(400)
    records = build_translation_instructions(pairs, "en", "et", reverse_share=0.25, seed=3)
    assert len(records) == 400
    reversed_ = [r for r in records if not is_estonian(r["output"])]
    assert len(reversed_) == 100  # exactly round(0.25 * 400)
    by_text = dict(pairs)
    back = {t: s for s, t in pairs}
    inline = 0
    for r in records:
        forward = is_estonian(r["output"])
        source = r["input"] or next(s for s in (by_text if forward else back) if s in r["instruction"])
        assert (by_text if forward else back)[source] == r["output"]  # the instruction asks for the right answer
        if not r["input"]:
            inline += 1
            assert source in r["instruction"]
        # The instruction names the language to translate into, in the template's own language.
        target_names = ("Estonian", "eesti keel") if forward else ("English", "inglise keel")
        assert any(name in r["instruction"] for name in target_names), r
    assert 150 < inline < 250  # --inline-share 0.5
    english = sum(r["instruction"].startswith(("Translate", "Please", "Provide", "How", "What")) for r in records)
    estonian = sum(r["instruction"].startswith(("Tõlgi", "Palun", "Kuidas")) for r in records)
    assert english + estonian == 400 and 150 < english < 250
    assert len({r["instruction"].split(":")[0] for r in records if r["input"]}) >= 6  # several templates each


def test_polish_templates_and_chat_format():
    records = build_translation_instructions([("the red cat", "czerwony kot")], "en", "pl", reverse_share=0.0,
                                             fmt="chat", seed=0, template_langs=["pl"], inline_share=1.0)
    user, assistant = records[0]["messages"]
    assert user["role"] == "user" and "the red cat" in user["content"] and "angielsk" not in user["content"]
    assert ("na język polski" in user["content"] or "po polsku" in user["content"])
    assert assistant == {"role": "assistant", "content": "czerwony kot"}
    with pytest.raises(ValueError, match="no language names for 'xx'"):
        build_translation_instructions([("a", "b")], "en", "xx")


def write_bitext(tmp_path, pairs):
    (tmp_path / "en.txt").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "et.txt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    (tmp_path / "pairs.en-et.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    (tmp_path / "pairs.en-et.jsonl").write_text("".join(json.dumps({"en": s, "et": t}) + "\n" for s, t in pairs),
                                          encoding="utf-8")


def test_translate_cli_inputs_agree_and_report(tmp_path, capsys):
    pairs = good_pairs(40) + [("", "Tere."), ("Hello.", "Hello.")]
    write_bitext(tmp_path, pairs)
    outputs = []
    for name, source in (("files", ["--src", str(tmp_path / "en.txt"), "--tgt", str(tmp_path / "et.txt")]),
                         ("tsv", ["--tsv", str(tmp_path / "pairs.en-et.tsv")]),
                         ("jsonl", ["--jsonl", str(tmp_path / "pairs.en-et.jsonl")])):
        out = tmp_path / f"{name}.jsonl"
        report = main(["translate", *source, "--src-lang", "en", "--tgt-lang", "et", "--reverse-share", "0.25",
                       "--format", "alpaca", "--out", str(out), "--seed", "0", "--report", str(tmp_path / "r.json")])
        assert report["kept"] == 40 and report["empty"] == 1 and report["identical"] == 1 and report["reversed"] == 10
        assert json.loads((tmp_path / "r.json").read_text()) == report
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] == outputs[2]
    records = [json.loads(line) for line in outputs[0].splitlines()]
    assert len(records) == 40 and all(set(r) == {"instruction", "input", "output"} for r in records)
    printed = capsys.readouterr().out
    assert "kept" in printed and "40" in printed and "empty" in printed


def test_misaligned_bitext_names_both_files_and_writes_nothing(tmp_path, capsys):
    write_bitext(tmp_path, good_pairs(10))
    (tmp_path / "et.txt").write_text("".join(t + "\n" for _, t in good_pairs(9)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["translate", "--src", str(tmp_path / "en.txt"), "--tgt", str(tmp_path / "et.txt"), "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'en.txt'} has 10 lines" in err and f"{tmp_path / 'et.txt'} has 9 lines" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content, message", [
    ("a\tb\nc\td\te\n", ":2: expected 2 tab-separated columns"),
    ("a\tb\n\xff\n", None),  # written as bytes below: not UTF-8
])
def test_bad_tsv_names_file_and_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.en-et.tsv"
    if message is None:
        path.write_bytes(b"a\tb\n\xff\tc\n")
        message = ":2: not valid UTF-8"
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["translate", "--tsv", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert f"{path}{message}" in capsys.readouterr().err


def test_bad_jsonl_bitext_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.en-et.jsonl"
    path.write_text(json.dumps({"en": "a", "et": "b"}) + "\n" + json.dumps({"en": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        main(["translate", "--jsonl", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert f"{path}:2: missing fields 'en' and 'et'" in capsys.readouterr().err


def test_cli_runs_as_a_module(tmp_path):
    write_bitext(tmp_path, good_pairs(8))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "minillm.instructions", "translate", "--tsv",
                           str(tmp_path / "pairs.en-et.tsv"), "--format", "chat", "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 8
    assert "kept" in proc.stdout


def test_languages_come_from_the_options_or_the_file_names_and_are_said(tmp_path, capsys):
    """train.en / train.pl give en -> pl, said; a name that tells nothing, or a code without prompts, is refused
    listing the known codes (a default of Estonian once turned Polish bitext into Estonian instructions)."""
    pairs = good_pairs(8)
    (tmp_path / "train.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "train.pl").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    main(["translate", "--src", str(tmp_path / "train.en"), "--tgt", str(tmp_path / "train.pl"), "--reverse-share",
          "0", "--template-langs", "en", "--out", str(tmp_path / "o.jsonl")])
    assert "languages: en -> pl (from the file names)" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all("Polish" in r["instruction"] and "Estonian" not in r["instruction"] for r in records)
    (tmp_path / "pairs.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    for args, message in (([], "pairs.tsv: cannot tell the languages from the file name(s); give --src-lang and "
                               "--tgt-lang (known: en, et, pl)"),
                          (["--src-lang", "en", "--tgt-lang", "xx"], "--tgt-lang 'xx': no instruction prompts for this "
                                                                     "language (known: en, et, pl)")):
        with pytest.raises(SystemExit) as e:
            main(["translate", "--tsv", str(tmp_path / "pairs.tsv"), *args, "--out", str(tmp_path / "n.jsonl")])
        assert e.value.code == 1 and message in capsys.readouterr().err and not (tmp_path / "n.jsonl").exists()


def test_missing_input_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["translate", "--tsv", str(tmp_path / "missing.en-et.tsv"), "--out", str(tmp_path / "o.jsonl")])
    assert e.value.code == 1 and "missing.en-et.tsv: cannot read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- mixtures

def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def recipe(tmp_path):
    """Four sources with hand-countable sizes (words per record in the comments)."""
    organic = [{"instruction": f"kus elab {i}", "input": "", "output": f"ta elab {i}"} for i in range(50)]  # 6
    converted = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
                 for i in range(1200)]  # 4 words, over the default cap of 1000
    small = [{"messages": [{"role": "user", "content": f"x {i}"}, {"role": "assistant", "content": f"y {i}"}]}
             for i in range(40)]  # 4 words; weight 0.5, cap null
    synthetic = [{"instruction": f"one {i}", "output": "two"} for i in range(13)]  # 3 words
    synthetic += organic[:5]  # 5 duplicates of another source (first occurrence wins)
    synthetic += [{"messages": [{"role": "user", "content": "one 0"}, {"role": "assistant", "content": "two"}]},
                  synthetic[1]]  # 2 duplicates within the source (a chat record equal to an Alpaca one)
    jsonl(tmp_path / "organic_et.jsonl", organic)
    jsonl(tmp_path / "converted_et.jsonl", converted)
    jsonl(tmp_path / "small.jsonl", small)
    jsonl(tmp_path / "synthetic_en.jsonl", synthetic)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"sources": [
        {"path": "organic_et.jsonl", "type": "organic", "language": "et"},
        {"path": "converted_et.jsonl", "type": "converted", "language": "et"},
        {"path": "small.jsonl", "type": "converted", "language": "en", "weight": 0.5, "cap": None},
        {"path": str(tmp_path / "synthetic_en.jsonl"), "type": "synthetic", "language": "en", "weight": 2,
         "name": "synth"},
    ]}))
    return path


def test_mix_composition_numbers(recipe, tmp_path, capsys):
    out = tmp_path / "mix"
    c = main(["mix", "--recipe", str(recipe), "--out-dir", str(out), "--valid-share", "0.1", "--seed", "0"])
    rows = {r["source"]: r for r in c["sources"]}
    # organic: 50 -> 5 valid, 45 train. converted: capped at 1000 -> 100 valid, 900 train.
    # small: 40 x 0.5 = 20 -> 2 valid, 18 train. synth: 20 records, 7 duplicates, 13 unique x 2 = 26
    # -> round(0.1 x 13) = 1 valid, 25 train (12 unique examples, twice, plus one more).
    expect = {"organic_et": (50, 0, 45, 5, 45 * 6), "converted_et": (1200, 0, 900, 100, 900 * 4),
              "small": (40, 0, 18, 2, 18 * 4), "synth": (20, 7, 25, 1, 25 * 3)}
    for name, (records, dups, n_train, n_valid, words) in expect.items():
        r = rows[name]
        assert (r["records"], r["duplicates"], r["train_examples"], r["valid_examples"], r["train_size"]) == \
            (records, dups, n_train, n_valid, words), name
    assert rows["converted_et"]["cap"] == 1000 and rows["small"]["cap"] is None
    assert c["unit"] == "words"
    assert c["by_type"] == {"organic": {"train_examples": 45, "valid_examples": 5, "train_size": 270},
                            "converted": {"train_examples": 918, "valid_examples": 102, "train_size": 3672},
                            "synthetic": {"train_examples": 25, "valid_examples": 1, "train_size": 75}}
    assert c["by_language"] == {"et": {"train_examples": 945, "valid_examples": 105, "train_size": 3870},
                                "en": {"train_examples": 43, "valid_examples": 3, "train_size": 147}}
    assert (c["train_examples"], c["valid_examples"], c["train_size"]) == (988, 108, 4017)

    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    valid = [json.loads(x) for x in (out / "valid.jsonl").read_text().splitlines()]
    assert len(train) == 988 and len(valid) == 108
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in valid}  # no example in both splits
    assert json.loads((out / "composition.json").read_text()) == c
    table = capsys.readouterr().out
    for number in ("945", "3870", "988", "4017", "918"):
        assert number in table
    # Deterministic for a seed.
    main(["mix", "--recipe", str(recipe), "--out-dir", str(tmp_path / "again"), "--valid-share", "0.1"])
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()


def test_mix_counts_tokens_with_a_tokenizer(recipe, tmp_path):
    lines = ["kus elab ta q a x y one two"] * 100
    tok = SentencePieceTokenizer.train(iter(lines), tmp_path / "tok" / "sp", 300)
    tok.save_pretrained(tmp_path / "tok")
    out = tmp_path / "mix"
    c = main(["mix", "--recipe", str(recipe), "--out-dir", str(out), "--valid-share", "0.1",
              "--tokenizer", str(tmp_path / "tok")])
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert c["unit"] == "tokens"
    assert c["train_size"] == sum(len(render(r, tok, template="auto")[0]) for r in train)


@pytest.mark.parametrize("change, message", [
    ({"type": "scraped"}, "sources[0]: unknown type 'scraped'"),
    ({"weight": 0}, "sources[0]: weight must be a positive number"),
    ({"cap": 0}, "sources[0]: cap must be a positive integer"),
    ({"wieght": 2}, "sources[0]: unknown key(s) ['wieght']"),
    ({"language": ""}, "sources[0]: missing field 'language'"),
    ({"path": "nope.jsonl"}, "nope.jsonl: cannot read"),
])
def test_bad_recipe_is_refused_and_nothing_written(recipe, tmp_path, capsys, change, message):
    spec = json.loads(recipe.read_text())
    spec["sources"][0].update(change)
    recipe.write_text(json.dumps(spec))
    out = tmp_path / "mix"
    with pytest.raises(SystemExit):
        main(["mix", "--recipe", str(recipe), "--out-dir", str(out)])
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_source_record_names_file_and_line(recipe, tmp_path, capsys):
    bad = tmp_path / "synthetic_en.jsonl"
    bad.write_text(bad.read_text() + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    n = len(bad.read_text().splitlines())
    with pytest.raises(SystemExit):
        main(["mix", "--recipe", str(recipe), "--out-dir", str(tmp_path / "mix")])
    assert f"{bad}:{n}: conversation does not end with an assistant turn" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()
