"""Readers for benchmark files as they are distributed (a task file's "format"), each giving the records of
minillm's own task schemas with the number to cite in errors and predictions (a line, or an item index).

    jsonl      minillm's schemas (the default)
    belebele   Belebele jsonl: flores_passage, question, mc_answer1..4, correct_answer_num ("1".."4")
    xcopa      XCOPA / COPA jsonl: premise, choice1, choice2, question ("cause"|"effect"), label (0|1)
    lm_eval_mc lm-eval-style multiple-choice jsonl: question (or query), choices, label (or gold / answer)
    squad      SQuAD-format JSON (EstQA, PolQA-style): {"data": [{"paragraphs": [{"context", "qas":
               [{"question", "answers": [{"text"}]}]}]}]}, one record per question
    flores     FLORES-200 / FLORES+ aligned text files: "data" the source language's file (e.g.
               eng_Latn.devtest), "target_data" the target's, one sentence per line; the task file gives
               "src_lang" and "tgt_lang"

The original fields stay in each record, so templates may use them ({flores_passage}, {title}, ...).
Problems are one line naming the file, the line (JSON Lines, text) or the item's path (SQuAD JSON), and the
field.
"""
from __future__ import annotations

import json
from pathlib import Path

from minillm.files import read_json_objects

FORMATS = ("jsonl", "belebele", "xcopa", "lm_eval_mc", "squad", "flores")


def _field(record: dict, where: str, name: str, kind=str):
    if name not in record:
        raise ValueError(f"{where}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field '{name}' must be {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
    return value


def _belebele(record: dict, where: str) -> dict:
    passage, question = _field(record, where, "flores_passage"), _field(record, where, "question")
    choices = [_field(record, where, f"mc_answer{i}") for i in range(1, 5)]
    correct = str(_field(record, where, "correct_answer_num", (str, int)))
    if correct not in ("1", "2", "3", "4"):
        raise ValueError(f"{where}: field 'correct_answer_num' must be 1..4, got {correct!r}")
    return {**record, "question": f"{passage}\n{question}", "choices": choices, "label": int(correct) - 1}


def _xcopa(record: dict, where: str) -> dict:
    choices = [_field(record, where, "choice1"), _field(record, where, "choice2")]
    _field(record, where, "premise")
    _field(record, where, "question")
    label = _field(record, where, "label", int)
    return {**record, "choices": choices, "label": label}


def _lm_eval_mc(record: dict, where: str) -> dict:
    question_key = next((k for k in ("question", "query") if k in record), "question")
    label_key = next((k for k in ("label", "gold", "answer") if k in record), "label")
    return {**record, "question": _field(record, where, question_key), "choices": _field(record, where, "choices", list),
            "label": _field(record, where, label_key, int)}


JSONL_READERS = {"belebele": _belebele, "xcopa": _xcopa, "lm_eval_mc": _lm_eval_mc}


def _squad(path: Path) -> list[tuple[int, dict]]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(f"{path}: not SQuAD-format JSON (no top-level 'data' list)")
    out = []
    for a, article in enumerate(document["data"]):
        for p, paragraph in enumerate(_field(article, f"{path}: data[{a}]", "paragraphs", list)):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _field(paragraph, where, "context")
            for q, qa in enumerate(_field(paragraph, where, "qas", list)):
                item = f"{where}.qas[{q}]"
                answers = []
                for i, answer in enumerate(_field(qa, item, "answers", list)):
                    answers.append(_field(answer, f"{item}.answers[{i}]", "text"))
                if not answers:
                    raise ValueError(f"{item}: field 'answers' is empty")
                record = {"context": context, "question": _field(qa, item, "question"), "answers": answers}
                if "id" in qa:
                    record["id"] = qa["id"]
                if isinstance(article.get("title"), str):
                    record["title"] = article["title"]
                out.append((len(out) + 1, record))
    return out


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from None


def _flores(source: Path, spec: dict, target_key: str, spec_path: Path) -> list[tuple[int, dict]]:
    for key in (target_key, "src_lang", "tgt_lang"):
        if not isinstance(spec.get(key), str):
            raise ValueError(f"{spec_path}:1: format 'flores' needs '{key}' (a string)")
    target = spec_path.parent / spec[target_key]
    sources, references = _lines(source), _lines(target)
    if len(sources) != len(references):
        raise ValueError(f"{target}: {len(references)} lines, but {source} has {len(sources)}: FLORES files are "
                         "aligned line by line")
    out = []
    for number, (src, ref) in enumerate(zip(sources, references), 1):
        if not src.strip() or not ref.strip():
            raise ValueError(f"{source if not src.strip() else target}:{number}: empty line")
        out.append((number, {"source": src, "reference": ref, "src_lang": spec["src_lang"],
                             "tgt_lang": spec["tgt_lang"]}))
    return out


def read_records(spec: dict, key: str, data_path: Path, spec_path: Path) -> list[tuple[int, dict]]:
    """(line or item number, record in minillm's schema) for spec[key] ('data' or 'dev_data')."""
    fmt = spec.get("format", "jsonl")
    if fmt == "squad":
        numbered = _squad(data_path)
    elif fmt == "flores":
        numbered = _flores(data_path, spec, "target_data" if key == "data" else "dev_target_data", spec_path)
    else:
        numbered = read_json_objects(data_path)
        if fmt in JSONL_READERS:
            numbered = [(line, JSONL_READERS[fmt](record, f"{data_path}:{line}")) for line, record in numbered]
    if not numbered:
        raise ValueError(f"{data_path}: empty file (no records)")
    return numbered
