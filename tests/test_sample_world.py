"""The bundled bilingual sample world (demo/sample_world.py, its lexicon in demo/words.py).

Run: .venv/bin/python -m pytest -q tests/test_sample_world.py   (CPU, a few seconds)

Oracles: hand-written Estonian for every template family (checked by a speaker's rules, not by the
generator's own tables), byte comparison of two independent runs, digit-run extraction for the bitext
numeral check, and a schema check per file written against the spec of each record type.
"""
import io
import json
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "demo"))
import sample_world as sw  # noqa: E402


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    paths = sw.write_sample_world(out, seed=0)
    return out, paths


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- determinism and layout

def test_two_runs_are_byte_identical_and_seed_matters(world_dir, tmp_path):
    out, paths = world_dir
    again = sw.write_sample_world(tmp_path / "again", seed=0)
    assert list(again) == list(paths)
    for rel in paths:
        assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes(), rel
    sw.write_sample_world(tmp_path / "other", seed=1, scale=0.05)
    assert (tmp_path / "other" / "sft/alpaca_et.jsonl").read_bytes() != (out / "sft/alpaca_et.jsonl").read_bytes()
    # Atomic writes leave no temp files behind.
    assert not list(out.rglob("*.tmp"))


def test_layout_and_returned_paths(world_dir):
    out, paths = world_dir
    expected = {"pretrain/et/train.jsonl", "pretrain/et/valid.jsonl", "pretrain/en/train.jsonl",
                "pretrain/en/valid.jsonl", "bitext/en-et.tsv", "bitext/en.txt", "bitext/et.txt",
                "sft/alpaca_et.jsonl", "sft/alpaca_en.jsonl", "sft/chat_en.jsonl", "sft/valid.jsonl",
                "sft/heldout.jsonl", "preferences/train.jsonl", "preferences/valid.jsonl", "README.md"}
    for task in ["ppl_et", "ppl_en", "facts_et", "facts_en", "mc_et", "qa_et", "qa_en", "mt_en_et", "mt_et_en",
                 "gec_et", "safety_et"]:
        expected |= {f"eval/{task}.task.json", f"eval/{task}.jsonl"}
    assert expected <= set(paths)
    for rel, path in paths.items():
        assert Path(path) == out / rel and Path(path).is_file()
        Path(path).read_bytes().decode("utf-8")  # all UTF-8


# ----------------------------------------------------------------------------- pretraining text

def test_pretraining_sizes_and_75_25_split(world_dir):
    out, _ = world_dir
    nbytes = {}
    for lang in ("et", "en"):
        for split in ("train", "valid"):
            docs = read_jsonl(out / f"pretrain/{lang}/{split}.jsonl")
            assert docs and all(set(d) == {"text"} and isinstance(d["text"], str) and d["text"] for d in docs)
            assert all(d["text"].count(".") >= 1 for d in docs)
            nbytes[lang, split] = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert 1_400_000 < nbytes["et", "train"] < 1_700_000
    assert 450_000 < nbytes["en", "train"] < 600_000
    assert 40_000 < nbytes["et", "valid"] < 70_000 and 40_000 < nbytes["en", "valid"] < 70_000
    share_et = nbytes["et", "train"] / (nbytes["et", "train"] + nbytes["en", "train"])
    assert abs(share_et - 0.75) < 0.02


def test_estonian_text_has_all_diacritics_and_english_has_none(world_dir):
    out, _ = world_dir
    et = (out / "pretrain/et/train.jsonl").read_text(encoding="utf-8")
    en_docs = read_jsonl(out / "pretrain/en/train.jsonl")
    for ch in "õäöüšž":
        assert ch in et, ch
    # English documents only carry diacritics inside Estonian names (Tõnu, Põldsalu, ...).
    names = {n for n, _ in sw.PEOPLE} | set(sw.TOWNS) | set(sw.PET_NAMES)
    for d in en_docs[:500]:
        for word in re.findall(r"\w+", d["text"]):
            if any(c in word for c in "õäöüšž"):
                assert word in names or word.rstrip("s") in names, word


# ----------------------------------------------------------------------------- Estonian grammar

def test_number_words():
    assert [sw.et_number(n) for n in (1, 2, 7, 10, 11, 19, 20, 32, 70)] == [
        "üks", "kaks", "seitse", "kümme", "üksteist", "üheksateist", "kakskümmend", "kolmkümmend kaks",
        "seitsekümmend"]
    assert [sw.en_number(n) for n in (1, 13, 20, 32)] == ["one", "thirteen", "twenty", "thirty-two"]


def test_numeral_phrases_take_partitive_with_agreeing_adjective():
    red, white = sw.COLOURS[0], sw.COLOURS[5]
    A = sw.ANIMALS
    assert sw.et_count(1, A["kass"], red) == "üks punane kass"
    assert sw.et_count(3, A["kass"], red) == "kolm punast kassi"
    assert sw.et_count(2, A["hobune"], white) == "kaks valget hobust"
    assert sw.et_count(5, A["lammas"]) == "viis lammast"
    assert sw.et_count(4, A["hiir"]) == "neli hiirt"
    assert sw.en_count(4, A["hiir"], white) == "four white mice"
    assert sw.np_colour_animal(red, A["kass"]) == ("the red cat", "punane kass")


def test_sentence_templates_match_hand_written_estonian():
    A = sw.ANIMALS
    blue, brown = sw.COLOURS[1], sw.COLOURS[6]
    mari = sw.Person("Mari", "f", "Kivila", ("õpetaja", "teacher"), 34, blue, A["koer"], brown, "Muri",
                     ((3, A["lehm"]), (1, A["kana"])), "Jüri")
    got = [f(mari) for f in (sw.s_lives, sw.s_job, sw.s_age, sw.s_fav_colour, sw.s_has_pet, sw.s_pet_name,
                             sw.s_pet_colour, sw.s_farm, sw.s_friend)]
    assert got == [
        ("Mari lives in Kivila.", "Mari elab Kivilas."),
        ("Mari is a teacher.", "Mari on õpetaja."),
        ("Mari is thirty-four years old.", "Mari on kolmkümmend neli aastat vana."),
        ("Mari's favourite colour is blue.", "Mari lemmikvärv on sinine."),
        ("Mari has a dog.", "Maril on koer."),
        ("Mari's dog is called Muri.", "Mari koera nimi on Muri."),
        ("Mari's dog is brown.", "Mari koer on pruun."),
        ("Mari has three cows and one hen.", "Maril on kolm lehma ja üks kana."),
        ("Mari's friend is Jüri.", "Mari sõber on Jüri."),
    ]
    sat = sw.DAYS[5]
    apple = sw.PRODUCE[0]
    town = sw.Town("Põldsalu", ("väike", "small"), ("mere ääres", "by the sea"), 12500, sw.COLOURS[5], sat,
                   (apple, sw.PRODUCE[11]))
    assert sw.s_town_is(town) == ("Põldsalu is a small town.", "Põldsalu on väike linn.")
    assert sw.s_population(town) == ("12,500 people live in Põldsalu.", "Põldsalus elab 12 500 inimest.")
    assert sw.s_market_day(town) == ("The Põldsalu market is open every Saturday.",
                                     "Põldsalu turg on avatud igal laupäeval.")
    assert sw.s_market_goods(town) == ("Apples and bread are sold at the Põldsalu market.",
                                       "Põldsalu turul müüakse õunu ja leiba.")
    # Verb second after a fronted adverbial; decimal comma; partitive "eurot".
    assert sw.s_day_market_trip(mari, sat, "Kivila")[1] == "Laupäeval käib Mari Kivila turul."
    assert sw.s_buys_more("Mari", 2, apple) == ("Mari buys two more apples at the market.",
                                                "Mari ostab turult veel kaks õuna.")
    assert sw.s_price(apple, 150) == ("An apple costs 1.50 euros.", "Õun maksab 1,50 eurot.")
    assert sw.s_kilo_price(apple, 240)[1] == "Kilo õunu maksab 2,40 eurot."
    assert sw.s_weather(0, sw.DAYS[0], "Ööbiku") == ("On Monday it will rain in Ööbiku.",
                                                    "Esmaspäeval sajab Ööbikus vihma.")
    assert sw.s_temperature(12.5)[1] == "Temperatuur on 12,5 kraadi."
    assert sw.s_temperature(1)[1] == "Temperatuur on üks kraad."
    assert sw.s_animals_at(3, A["rebane"], sw.COLOURS[0]) == ("Three red foxes live in the forest.",
                                                            "Metsas elab kolm punast rebast.")
    assert sw.s_date(0, 12, 2) == ("Today is Monday, March 12.", "Täna on esmaspäev, 12. märts.")
    assert sw.s_sum(2, 3) == ("Two plus three is five.", "Kaks pluss kolm on viis.")


# ----------------------------------------------------------------------------- bitext

def digit_runs(s):
    return re.findall(r"\d+", s)


def test_bitext_aligned_and_bad_pairs_are_exactly_the_listed_ones(world_dir):
    out, _ = world_dir
    tsv = (out / "bitext/en-et.tsv").read_text(encoding="utf-8").split("\n")
    en = (out / "bitext/en.txt").read_text(encoding="utf-8").split("\n")
    et = (out / "bitext/et.txt").read_text(encoding="utf-8").split("\n")
    assert tsv[-1] == en[-1] == et[-1] == ""  # every line ends with a newline
    tsv, en, et = tsv[:-1], en[:-1], et[:-1]
    assert len(tsv) == len(en) == len(et)
    assert 2500 <= len(tsv) <= 3500
    for line, e, t in zip(tsv, en, et):
        assert line.count("\t") == 1 and line == f"{e}\t{t}"
    bad = {b["line"]: b["reason"] for b in json.loads((out / "bitext/bad_lines.json").read_text(encoding="utf-8"))}
    assert 20 <= len(bad) <= 100
    assert {"empty source", "empty target", "numerals differ", "length ratio", "untranslated copy"} == set(bad.values())
    for i, (e, t) in enumerate(zip(en, et), start=1):
        reason = bad.get(i)
        if reason is None:  # a good pair passes every filter
            assert e and t and e != t
            assert digit_runs(e) == digit_runs(t), (i, e, t)
            assert 1 / 3 < len(e) / len(t) < 3, (i, e, t)
        elif reason == "empty source":
            assert e == "" and t
        elif reason == "empty target":
            assert t == "" and e
        elif reason == "numerals differ":
            assert digit_runs(e) != digit_runs(t)
        elif reason == "length ratio":
            assert max(len(e), len(t)) > 5 * min(len(e), len(t))
        else:
            assert e == t


# ----------------------------------------------------------------------------- instructions

def test_alpaca_chat_valid_heldout_schemas(world_dir):
    out, _ = world_dir
    alpaca = {}
    for name in ("alpaca_et", "alpaca_en", "valid"):
        recs = read_jsonl(out / f"sft/{name}.jsonl")
        assert all(set(r) == {"instruction", "input", "output"} for r in recs), name
        assert all(isinstance(r[k], str) for r in recs for k in r)
        assert all(r["instruction"] and r["output"] for r in recs)
        assert any(r["input"] for r in recs) and any(not r["input"] for r in recs), name  # with and without input
        alpaca[name] = recs
    chats = read_jsonl(out / "sft/chat_en.jsonl")
    for c in chats:
        roles = [m["role"] for m in c["messages"]]
        assert all(set(m) == {"role", "content"} and m["content"] for m in c["messages"])
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body == ["user", "assistant"] * (len(body) // 2)  # alternates, ends with the assistant
    assert sum(1 for c in chats if [m["role"] for m in c["messages"]].count("assistant") >= 2) >= 50
    assert any(c["messages"][0]["role"] == "system" for c in chats)
    heldout = read_jsonl(out / "sft/heldout.jsonl")
    total = sum(len(v) for v in alpaca.values()) + len(chats) + len(heldout)
    assert 1700 <= total <= 2500
    # Held-out instructions never occur in any training or validation file, and their answer is in the output.
    seen = {(r["instruction"], r["input"]) for recs in alpaca.values() for r in recs}
    user_turns = {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}
    kinds = set()
    for h in heldout:
        assert {"instruction", "input", "output", "answer", "kind", "language"} <= set(h)
        assert h["answer"] and h["answer"] in h["output"]
        assert (h["instruction"], h["input"]) not in seen
        assert sw.user_text(h) not in user_turns and h["instruction"] not in user_turns
        kinds.add(h["kind"].replace("_et_en", "").replace("_en_et", "").replace("prev_day", "next_day"))
    assert {"colour", "where", "count", "next_day", "translate_phrase"} <= kinds and len(kinds) >= 6
    assert {h["language"] for h in heldout} == {"et", "en"}
    # Every held-out kind is also trained on.
    train_text = (out / "sft/alpaca_et.jsonl").read_text(encoding="utf-8")
    assert "Tõlgi eesti keelde:" in train_text and "Mis värvi on" in train_text and "Mitu looma on" in train_text


def test_translation_drill_from_the_brief(world_dir):
    out, _ = world_dir
    recs = read_jsonl(out / "sft/alpaca_en.jsonl") + read_jsonl(out / "sft/alpaca_et.jsonl")
    drills = {r["instruction"]: r["output"] for r in recs if r["instruction"].startswith("Translate to Estonian: the ")}
    assert drills
    for instr, output in drills.items():  # "Translate to Estonian: the red cat" -> "punane kass"
        colour_en, animal_en = instr.split("the ", 1)[1].split(" ", 1)
        colour = next(c for c in sw.COLOURS if c.en == colour_en)
        animal = next(a for a in sw.ANIMALS.values() if a.en == animal_en)
        assert output == f"{colour.et} {animal.et}"


# ----------------------------------------------------------------------------- preferences

def test_preferences_schema(world_dir):
    out, _ = world_dir
    train, valid = read_jsonl(out / "preferences/train.jsonl"), read_jsonl(out / "preferences/valid.jsonl")
    assert 500 <= len(train) <= 700 and 30 <= len(valid) <= 100
    for p in train + valid:
        assert isinstance(p["chosen"], str) and isinstance(p["rejected"], str) and p["chosen"] and p["rejected"]
        assert p["chosen"] != p["rejected"]
        if isinstance(p["prompt"], list):
            roles = [m["role"] for m in p["prompt"]]
            assert roles[-1] == "user" and set(roles) <= {"system", "user"}
        else:
            assert isinstance(p["prompt"], str) and p["prompt"]
    kinds = {p["kind"] for p in train}
    assert {"wrong_fact", "decimal", "date", "diacritics", "omama", "harmful"} <= kinds
    # Negative transfer really is the English convention: decimal point vs comma, diacritics stripped.
    for p in train:
        if p["kind"] == "decimal":
            assert p["rejected"] == p["chosen"].replace(",", ".")
        if p["kind"] == "diacritics":
            assert p["rejected"] == sw.strip_diacritics(p["chosen"]) != p["chosen"]


# ----------------------------------------------------------------------------- evaluation tasks

def check_record(type_, r, lang):
    if type_ == "perplexity":
        assert isinstance(r["text"], str) and r["text"]
    elif type_ == "multiple_choice":
        assert isinstance(r["choices"], list) and len(r["choices"]) >= 2 and len(set(r["choices"])) == len(r["choices"])
        assert isinstance(r["label"], int) and 0 <= r["label"] < len(r["choices"])
        if "premise" in r:
            assert r["question"] in ("cause", "effect") and len(r["choices"]) == 2
        else:
            assert isinstance(r["question"], str) and r["question"]
    elif type_ == "qa":
        assert r["answers"] and all(a in r["context"] for a in r["answers"]) and r["question"]
    elif type_ == "translation":
        assert r["source"] and r["reference"] and r["src_lang"] != r["tgt_lang"] and r["tgt_lang"] == lang
    elif type_ == "gec":
        assert r["source"] and r["references"] and all(isinstance(x, str) and x for x in r["references"])
    elif type_ == "safety":
        assert isinstance(r["harmful"], bool) and r["prompt"]
    else:
        raise AssertionError(type_)


def test_eval_task_specs_and_records(world_dir):
    out, _ = world_dir
    specs = {p.name[:-len(".task.json")]: json.loads(p.read_text(encoding="utf-8"))
             for p in (out / "eval").glob("*.task.json")}
    assert {"ppl_et", "ppl_en", "facts_et", "facts_en", "mc_et", "qa_et", "qa_en", "mt_en_et", "mt_et_en",
            "gec_et", "safety_et"} <= set(specs)
    directions = set()
    for name, spec in specs.items():
        assert spec["name"] == name and spec["language"] in ("et", "en")
        assert set(spec) <= {"name", "type", "language", "data", "dev_data", "templates", "few_shot"}
        for key in ("data", "dev_data"):
            if key not in spec:
                continue
            recs = read_jsonl(out / "eval" / spec[key])
            assert (30 if key == "data" else 10) <= len(recs) <= 100, (name, key)
            for r in recs:
                check_record(spec["type"], r, spec["language"])
            if spec["type"] == "translation":
                directions |= {(r["src_lang"], r["tgt_lang"]) for r in recs}
            if spec["type"] == "safety":
                assert sum(r["harmful"] for r in recs) == len(recs) // 2 >= 40  # enough of each for a rate
            if spec["type"] == "multiple_choice":
                assert len({r["label"] for r in recs}) >= 2  # the right answer is not always first
        for template in spec.get("templates", []):
            fields = set(re.findall(r"{(\w+)}", template))
            assert fields and fields <= set(read_jsonl(out / "eval" / spec["data"])[0]), (name, template)
    assert directions == {("en", "et"), ("et", "en")}
    # MT test sentences are not in the bitext the model may be trained on.
    pairs = set((out / "bitext/en-et.tsv").read_text(encoding="utf-8").splitlines())
    for r in read_jsonl(out / "eval/mt_en_et.jsonl"):
        assert f"{r['source']}\t{r['reference']}" not in pairs


FACT_SENTENCES = [sw.s_lives, sw.s_job, sw.s_age, sw.s_fav_colour, sw.s_has_pet, sw.s_pet_name, sw.s_pet_colour,
                  sw.s_friend]


def test_fixed_facts_are_told_in_one_language_only(world_dir):
    """The fixed facts of PEOPLE_ET only in Estonian pretraining text, those of PEOPLE_EN only in English: what
    lets continual pretraining teach facts_et and lets the English share keep facts_en."""
    out, _ = world_dir
    world = sw.build_world(sw.part_rng(0, "world"))
    assert set(sw.PEOPLE_ET) | set(sw.PEOPLE_EN) == {n for n, _ in sw.PEOPLE} and not set(sw.PEOPLE_ET) & set(sw.PEOPLE_EN)
    assert len(sw.PEOPLE_ET) >= 10 and len(sw.PEOPLE_EN) >= 10
    text = {lang: " ".join(d["text"] for split in ("train", "valid") for d in read_jsonl(out / f"pretrain/{lang}/{split}.jsonl"))
            for lang in ("et", "en")}
    for own, other, names in (("et", "en", sw.PEOPLE_ET), ("en", "et", sw.PEOPLE_EN)):
        side = 0 if own == "en" else 1
        for name in names:
            p = world.people[name]
            told = [f(p)[side] for f in FACT_SENTENCES if f(p)[side] in text[own]]
            assert len(told) == len(FACT_SENTENCES), (name, own)  # every fixed fact is learnable ...
            for f in FACT_SENTENCES:  # ... and never told in the other language
                assert f(p)[1 - side] not in text[other], (name, f(p)[1 - side])
            assert text[own].count(sw.s_lives(p)[side]) >= 20  # and told again and again


def test_fact_questions_ask_the_fixed_facts_closed_book(world_dir):
    out, _ = world_dir
    world = sw.build_world(sw.part_rng(0, "world"))
    for lang, names in (("et", sw.PEOPLE_ET), ("en", sw.PEOPLE_EN)):
        side = 0 if lang == "en" else 1
        recs = read_jsonl(out / f"eval/facts_{lang}.jsonl")
        assert len(recs) == len(names) * len(sw.FACT_KINDS)
        pretrain = (out / f"pretrain/{lang}/train.jsonl").read_text(encoding="utf-8")
        true_facts = {f(world.people[n])[side] for n in names for f in FACT_SENTENCES}
        asked = set()
        for r in recs:
            assert len(r["choices"]) == 4 == len(set(r["choices"]))
            right = r["choices"][r["label"]]
            assert right in true_facts and right in pretrain  # the right answer is the fixed fact as told
            assert not any(c in true_facts for i, c in enumerate(r["choices"]) if i != r["label"])
            subject = max((n for n in names if right.startswith(n)), key=len)  # "Maril on koer." -> Mari
            assert all(c.startswith(subject) for c in r["choices"])  # the same person in every choice
            assert subject in r["question"] and not any(c in r["question"] for c in r["choices"])
            asked.add(right)
        assert len(asked) == len(recs)
        assert {r["label"] for r in recs} == {0, 1, 2, 3}
        spec = json.loads((out / f"eval/facts_{lang}.task.json").read_text(encoding="utf-8"))
        assert (spec["type"], spec["language"], spec["templates"]) == ("multiple_choice", lang, ["{question}"])


def test_gec_sources_differ_from_references_by_small_edits(world_dir):
    out, _ = world_dir
    recs = read_jsonl(out / "eval/gec_et.jsonl")
    changed = [r for r in recs if r["source"] not in r["references"]]
    assert len(changed) >= 0.75 * len(recs)  # mostly erroneous, a few already correct
    for r in changed:
        src, ref = r["source"].split(), r["references"][0].split()
        # An injected error touches at most two words (or swaps two adjacent ones).
        assert sorted(src) == sorted(ref) or (len(src) == len(ref) and sum(a != b for a, b in zip(src, ref)) <= 2)


# ----------------------------------------------------------------------------- CLI

def test_cli_prints_summary(tmp_path):
    buf = io.StringIO()
    with redirect_stdout(buf):
        sw.main(["--out", str(tmp_path / "w"), "--seed", "3", "--scale", "0.05"])
    text = buf.getvalue()
    assert "bitext/en-et.tsv" in text and "eval/qa_et.jsonl" in text and "pretraining text" in text
    assert (tmp_path / "w" / "README.md").read_text(encoding="utf-8").startswith("# minillm sample world (seed 3)")
