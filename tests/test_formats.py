"""Benchmark files in their own formats (a task file's "format", minillm/tasks/formats.py): fixtures written
here in exactly the published layouts (Belebele, FLORES-200 devtest files, SQuAD JSON, XCOPA, lm-eval-style
multiple choice), read into the records minillm's task types score, and one evaluate.py run over a task file
of each, end to end, with the same scores as the same records written in minillm's own jsonl schema.

Run: python -m pytest -q tests/test_formats.py
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from minillm.hf import save_pretrained  # noqa: E402
from minillm.model import Llama, LlamaConfig  # noqa: E402
from minillm.tasks import TASK_TYPES  # noqa: E402
from minillm.tasks.common import load_task  # noqa: E402
from minillm.tokenizer import SentencePieceTokenizer  # noqa: E402

BELEBELE = [{"link": "https://en.wikibooks.org/wiki/x", "question_number": 1, "flores_passage": "Mari elab Tartus.",
             "question": "Kus Mari elab?", "mc_answer1": "Tallinnas", "mc_answer2": "Tartus", "mc_answer3": "Pärnus",
             "mc_answer4": "Narvas", "correct_answer_num": "2", "dialect": "est_Latn", "ds": "2023-05-03"}]
XCOPA = [{"premise": "Koer on pruun.", "choice1": "Ta on vana.", "choice2": "Kass istus.", "question": "cause",
          "label": 0, "idx": 0, "changed": False},
         {"premise": "Mari elab Tartus.", "choice1": "Kass istus.", "choice2": "Ta käib ülikoolis.",
          "question": "effect", "label": 1, "idx": 1, "changed": False}]
LM_EVAL_MC = [{"query": "Question: What colour is snow?\nAnswer:", "choices": ["white", "brown"], "gold": 0}]
SQUAD = {"version": "1.1", "data": [{"title": "Mari", "paragraphs": [
    {"context": "Mari elab Tartus.", "qas": [{"id": "q1", "question": "Kus Mari elab?",
                                              "answers": [{"text": "Tartus", "answer_start": 10}]}]},
    {"context": "Koer on pruun.", "qas": [{"id": "q2", "question": "Mis värvi on koer?",
                                           "answers": [{"text": "pruun", "answer_start": 8},
                                                       {"text": "pruun", "answer_start": 8}]}]}]}]}
FLORES_EN = ["The cat sat on the mat.", "Good morning."]
FLORES_ET = ["Kass istus matil.", "Tere hommikust."]

NATIVE = {
    "belebele": ("multiple_choice", [{"question": "Mari elab Tartus.\nKus Mari elab?",
                                      "choices": ["Tallinnas", "Tartus", "Pärnus", "Narvas"], "label": 1}]),
    "xcopa": ("multiple_choice", [{"premise": r["premise"], "question": r["question"],
                                   "choices": [r["choice1"], r["choice2"]], "label": r["label"]} for r in XCOPA]),
    "lm_eval_mc": ("multiple_choice", [{"question": "Question: What colour is snow?\nAnswer:",
                                        "choices": ["white", "brown"], "label": 0}]),
    "squad": ("qa", [{"context": "Mari elab Tartus.", "question": "Kus Mari elab?", "answers": ["Tartus"]},
                     {"context": "Koer on pruun.", "question": "Mis värvi on koer?", "answers": ["pruun", "pruun"]}]),
    "flores": ("translation", [{"source": s, "reference": r, "src_lang": "en", "tgt_lang": "et"}
                               for s, r in zip(FLORES_EN, FLORES_ET)]),
}


def jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_format_tasks(d: Path) -> dict[str, Path]:
    """A task file per format over its file in the published layout, and the same records in minillm's jsonl."""
    (d / "est_Latn.jsonl").write_text(jsonl(BELEBELE))
    (d / "xcopa_et.test.jsonl").write_text(jsonl(XCOPA))
    (d / "mc.jsonl").write_text(jsonl(LM_EVAL_MC))
    (d / "estqa.json").write_text(json.dumps(SQUAD, ensure_ascii=False, indent=2))
    (d / "eng_Latn.devtest").write_text("\n".join(FLORES_EN) + "\n")
    (d / "est_Latn.devtest").write_text("\n".join(FLORES_ET) + "\n")
    specs = {
        "belebele": {"type": "multiple_choice", "format": "belebele", "language": "et", "data": "est_Latn.jsonl"},
        "xcopa": {"type": "multiple_choice", "format": "xcopa", "language": "et", "data": "xcopa_et.test.jsonl"},
        "lm_eval_mc": {"type": "multiple_choice", "format": "lm_eval_mc", "data": "mc.jsonl", "templates": ["{question}"]},
        "squad": {"type": "qa", "format": "squad", "language": "et", "data": "estqa.json"},
        "flores": {"type": "translation", "format": "flores", "language": "et", "data": "eng_Latn.devtest",
                   "target_data": "est_Latn.devtest", "src_lang": "en", "tgt_lang": "et"},
    }
    paths = {}
    for name, spec in specs.items():
        paths[name] = d / f"{name}.task.json"
        paths[name].write_text(json.dumps({"name": name, **spec}))
        native = {k: v for k, v in spec.items() if k not in ("format", "data", "target_data", "src_lang", "tgt_lang")}
        (d / "native").mkdir(exist_ok=True)
        (d / "native" / f"{name}.jsonl").write_text(jsonl(NATIVE[name][1]))
        (d / "native" / f"{name}.task.json").write_text(json.dumps({"name": name, **native, "data": f"{name}.jsonl"}))
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """evaluate.py over the five format tasks, and over the same records in minillm's jsonl."""
    d = tmp_path_factory.mktemp("formats")
    tok = SentencePieceTokenizer.train(iter((FLORES_EN + FLORES_ET + [r["premise"] for r in XCOPA]) * 20),
                                       d / "tok", vocab_size=320)
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128, bos_id=tok.bos_id,
                                     eos_id=tok.eos_id)
    save_pretrained(Llama(config), d / "model", tokenizer=tok)
    paths = write_format_tasks(d)
    common = ["--model", str(d / "model"), "--progress", "false", "--max-new-tokens", "3", "--dtype", "float32"]
    ours = evaluate.main(common + ["--tasks", *map(str, paths.values()), "--out", str(d / "formats")])
    native = evaluate.main(common + ["--tasks", str(d / "native"), "--out", str(d / "native_out")])
    return paths, ours, native


@pytest.mark.parametrize("name", list(NATIVE))
def test_each_format_reads_into_the_task_schema(runs, name):
    paths, _, _ = runs
    spec = load_task(paths[name], TASK_TYPES)
    kind, expected = NATIVE[name]
    assert spec["type"] == kind
    assert [{k: r[k] for k in e} for r, e in zip(spec["records"], expected)] == expected
    assert len(spec["records"]) == len(expected)
    if name == "belebele":
        assert spec["records"][0]["flores_passage"] == "Mari elab Tartus."  # original fields stay, for templates
    if name in ("flores", "squad"):
        assert spec["lines"] == [1, 2]


def test_every_format_runs_end_to_end_as_its_native_twin(runs):
    _, ours, native = runs
    assert not [r for r in ours["results"] if "error" in r]
    rows = {(r["task"], r["metric"], r["template"]): r["value"] for r in ours["results"]}
    twins = {(r["task"], r["metric"], r["template"]): r["value"] for r in native["results"]}
    assert rows == twins
    assert {task for task, _, _ in rows} == set(NATIVE)
    assert ("flores", "chrf++", "t0") in rows and ("squad", "f1", "t0") in rows and ("belebele", "acc_norm", "t0") in rows


def test_format_errors_name_file_line_and_field(tmp_path):
    def error(spec: dict, name: str, content: str) -> str:
        (tmp_path / name).write_text(content)
        (tmp_path / "t.task.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError) as e:
            load_task(tmp_path / "t.task.json", TASK_TYPES)
        return str(e.value)
    bad = dict(BELEBELE[0])
    del bad["mc_answer3"]
    assert error({"type": "multiple_choice", "format": "belebele", "data": "b.jsonl"}, "b.jsonl",
                 jsonl(BELEBELE + [bad])) == f"{tmp_path / 'b.jsonl'}:2: missing field 'mc_answer3'"
    assert error({"type": "multiple_choice", "format": "belebele", "data": "b.jsonl"}, "b.jsonl",
                 jsonl([{**BELEBELE[0], "correct_answer_num": "5"}])).endswith(
        "b.jsonl:1: field 'correct_answer_num' must be 1..4, got '5'")
    broken = json.loads(json.dumps(SQUAD))
    del broken["data"][0]["paragraphs"][1]["qas"][0]["question"]
    assert error({"type": "qa", "format": "squad", "data": "s.json"}, "s.json", json.dumps(broken)) == (
        f"{tmp_path / 's.json'}: data[0].paragraphs[1].qas[0]: missing field 'question'")
    (tmp_path / "en.devtest").write_text("a\nb\nc\n")
    assert error({"type": "translation", "format": "flores", "data": "en.devtest", "target_data": "et.devtest",
                  "src_lang": "en", "tgt_lang": "et"}, "et.devtest", "x\ny\n") == (
        f"{tmp_path / 'et.devtest'}: 2 lines, but {tmp_path / 'en.devtest'} has 3: FLORES files are aligned line by line")
    assert error({"type": "multiple_choice", "format": "xcopa", "data": "x.jsonl"}, "x.jsonl",
                 jsonl([{k: v for k, v in XCOPA[0].items() if k != "choice2"}])).endswith("x.jsonl:1: missing field 'choice2'")
    assert error({"type": "qa", "format": "arrow", "data": "x.jsonl"}, "x.jsonl", "{}").startswith(
        f"{tmp_path / 't.task.json'}:1: unknown format 'arrow'")
