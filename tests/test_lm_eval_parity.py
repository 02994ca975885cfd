"""evaluate.py against lm-evaluation-harness itself: its `hf` model (transformers) on the same exported tiny
model, custom local task YAMLs over the very jsonl files evaluate.py reads. Multiple choice (generic and
COPA): `acc`, `acc_norm`, `acc_bytes` item for item and the choices' log-likelihoods; perplexity:
`bits_per_byte`, `byte_perplexity`, `word_perplexity` to 1e-6 and each document's log-likelihood.

BOS settings that match (see the README's evaluation section): minillm scores every context as BOS + text.
lm-eval's multiple choice encodes the context with the tokenizer's own special tokens (add_bos_token left
unset: Llama's tokenizer adds BOS), which is the same; its rolling log-likelihood puts a prefix token (BOS)
before tok_encode(text), so the tokenizer must NOT add another one: add_bos_token=False. The test also
shows that the default there is a different number (<s><s>text).

Both sides run in float64; the two implementations' log-likelihoods still differ by ~3e-8 relative
(float32 steps inside one or both implementations), far below any argmax margin, so
log-likelihoods are compared to 1e-7 relative, bits per byte to 1e-6 absolute. One model, one lm_eval run
per BOS setting, for the whole module.

Run: python -m pytest -q tests/test_lm_eval_parity.py
"""
import json
import math
import sys
from pathlib import Path

import pytest
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from conftest import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402

CORPUS = ["Kass istus matil.", "The cat sat on the mat.", "Tere hommikust, kuidas läheb?", "Mari elab Tartus.",
          "Koer on pruun, sest ta on vana.", "Question: What colour is snow? Answer: white", "Täna on teisipäev.",
          "Pühapäeval sõidame mööda jõge.", "Öösel on külm ja ülikool on kinni."]

# Choices of different lengths in characters and in bytes (õ, ä, ü are two bytes), so that acc, acc_norm and
# acc_bytes can pick different choices: the test asserts they do, so it could see a wrong normalisation.
MC = [{"question": "Mis päev on täna?", "choices": ["teisipäev", "pühapäev", "neljapäev"], "label": 1},
      {"question": "Where does Mari live?", "choices": ["in Tartu", "Tartus", "on the mat", "öösel"], "label": 0},
      {"question": "Mis värvi on koer?", "choices": ["pruun", "must", "valge ja pruun"], "label": 0},
      {"question": "What colour is snow?", "choices": ["white", "brown", "very very white"], "label": 0},
      {"question": "Kus kass istus?", "choices": ["matil", "jõel", "ülikoolis", "Tartus"], "label": 0},
      {"question": "Mida me teeme?", "choices": ["sõidame", "istume", "läheb"], "label": 0},
      {"question": "Kes elab Tartus?", "choices": ["Mari", "kass", "koer", "öö"], "label": 0},
      {"question": "Mis on külm?", "choices": ["öö", "päev", "mööda jõge"], "label": 0},
      {"question": "What is old?", "choices": ["the dog", "the cat", "Mari"], "label": 0},
      {"question": "Millal?", "choices": ["täna", "pühapäeval", "teisipäeval", "öösel"], "label": 3}]
COPA = [{"premise": "The dog is brown.", "question": "cause", "choices": ["It is old.", "It sat on the mat."],
         "label": 0},
        {"premise": "Mari elab Tartus.", "question": "effect", "choices": ["Öösel on külm.", "Koer on pruun."],
         "label": 1},
        {"premise": "Kass istus matil.", "question": "cause", "choices": ["Täna on teisipäev.", "Mari elab Tartus."],
         "label": 0},
        {"premise": "The cat sat.", "question": "effect", "choices": ["Mari lives in Tartu.", "Good morning."],
         "label": 1}]
# Documents that fit the model's context (longer ones are windowed differently by the two, see perplexity.py).
TEXTS = [{"text": "Kass istus matil."}, {"text": "Tere hommikust, kuidas läheb? Täna on teisipäev."},
         {"text": "Pühapäeval sõidame mööda jõge, sest öösel on külm."}, {"text": "The cat sat on the mat."}]

# lm-eval task configs over the same files: the prompts minillm's defaults use (generic: "Question: ...\n
# Answer:", COPA: lm-eval's own copa prompt, premise without its final mark + connector, the choice lowercased).
DATA_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""  # an lm-eval task over one local JSONL file
MC_YAML = DATA_YAML + """output_type: multiple_choice
doc_to_text: "{text}"
doc_to_choice: "{choices}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
  - metric: acc_bytes
"""
PPL_YAML = DATA_YAML + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERIC_TEXT = "Question: {{question}}\\nAnswer:"
COPA_TEXT = "{{premise.strip()[:-1]}} {{'because' if question == 'cause' else 'therefore'}}"
GENERIC_CHOICES = "{{choices}}"
COPA_CHOICES = "[{% for c in choices %}{{(c[0]|lower ~ c[1:])|tojson}},{% endfor %}]"


def write_jsonl(path: Path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The exported model, the task files for both tools, and evaluate.py's results (float64)."""
    root = tmp_path_factory.mktemp("parity")
    save_tiny_llama(root / "model", root / "tok", CORPUS * 10, vocab_size=360)
    tasks, lm_tasks = root / "tasks", root / "lm_eval_tasks"
    tasks.mkdir()
    lm_tasks.mkdir()
    for name, records, spec, text, choices in (
            ("mini_mc", MC, {"type": "multiple_choice", "language": "en"}, GENERIC_TEXT, GENERIC_CHOICES),
            ("mini_copa", COPA, {"type": "multiple_choice", "language": "en"}, COPA_TEXT, COPA_CHOICES)):
        write_jsonl(tasks / f"{name}.jsonl", records)
        (tasks / f"{name}.task.json").write_text(json.dumps({"name": name, "data": f"{name}.jsonl", **spec}))
        (lm_tasks / f"{name}.yaml").write_text(MC_YAML.format(name=name, data=tasks / f"{name}.jsonl",
                                                              cache=root / "hf_cache", text=text,
                                                              choices=choices.replace('"', '\\"')))
    write_jsonl(tasks / "mini_ppl.jsonl", TEXTS)
    (tasks / "mini_ppl.task.json").write_text(json.dumps({"name": "mini_ppl", "type": "perplexity",
                                                          "data": "mini_ppl.jsonl"}))
    (lm_tasks / "mini_ppl.yaml").write_text(PPL_YAML.format(name="mini_ppl", data=tasks / "mini_ppl.jsonl", cache=root / "hf_cache"))
    out = root / "results"
    evaluate.main(["--model", str(root / "model"), "--tasks", str(tasks), "--out", str(out), "--dtype", "float64",
                   "--batch-size", "8", "--progress", "false"])
    return root, tasks, lm_tasks, out


def lm_eval_run(world, tasks: list[str], add_bos_token: bool | None) -> dict:
    root, _, lm_tasks, _ = world
    lm = HFLM(pretrained=str(root / "model"), dtype="float64", batch_size=8, device="cpu",
              add_bos_token=add_bos_token)
    return simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(lm_tasks),
                                                                            include_defaults=False),
                           log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def lm_eval_mc(world):
    """Multiple choice with the tokenizer's own BOS (add_bos_token unset)."""
    return lm_eval_run(world, ["mini_mc", "mini_copa"], None)


@pytest.fixture(scope="module")
def lm_eval_rolling(world):
    """Rolling log-likelihood with BOS only as lm-eval's prefix token (add_bos_token=False)."""
    return lm_eval_run(world, ["mini_ppl"], False)


def ours(world, task: str):
    out = world[3]
    rows = json.loads((out / "results.json").read_text())["results"]
    headline = {r["metric"]: r for r in rows if r["task"] == task and r.get("headline")}
    predictions = [json.loads(x) for x in (out / "predictions" / f"{task}.jsonl").read_text().splitlines()]
    return headline, predictions


@pytest.mark.parametrize("task", ["mini_mc", "mini_copa"])
def test_multiple_choice_equals_lm_eval_item_for_item(world, lm_eval_mc, task):
    headline, predictions = ours(world, task)
    samples = sorted(lm_eval_mc["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(predictions)
    for sample, pred in zip(samples, predictions):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert pred["logprobs"] == pytest.approx(lls, rel=1e-7), pred["line"]
        assert pred["correct"] == bool(sample["acc"]), pred["line"]
        assert (pred["pred_norm"] == pred["label"]) == bool(sample["acc_norm"]), pred["line"]
        assert (pred["pred_bytes"] == pred["label"]) == bool(sample["acc_bytes"]), pred["line"]
    for metric in ("acc", "acc_norm", "acc_bytes"):
        assert headline[metric]["value"] == pytest.approx(lm_eval_mc["results"][task][f"{metric},none"], abs=1e-12)


def test_the_normalisations_are_told_apart(world):
    """The generic task's data make acc, acc_norm (characters) and acc_bytes choose differently somewhere, and
    acc_norm differs from minillm's old byte count of ' ' + choice: a wrong divisor cannot pass unnoticed."""
    _, predictions = ours(world, "mini_mc")
    assert any(p["pred"] != p["pred_norm"] for p in predictions)
    assert any(p["pred_norm"] != p["pred_bytes"] for p in predictions)
    old = [max(range(len(p["logprobs"])), key=lambda j: p["logprobs"][j] / (p["choice_bytes"][j] + 1))
           for p in predictions]
    assert old != [p["pred_norm"] for p in predictions]


def test_perplexity_equals_lm_eval_rolling_loglikelihood(world, lm_eval_rolling):
    headline, predictions = ours(world, "mini_ppl")
    results = lm_eval_rolling["results"]["mini_ppl"]
    assert headline["bits_per_byte"]["value"] == pytest.approx(results["bits_per_byte,none"], abs=1e-6)
    for metric in ("byte_perplexity", "word_perplexity"):  # exponentials: relative agreement
        assert headline[metric]["value"] == pytest.approx(results[f"{metric},none"], rel=1e-6), metric
    samples = sorted(lm_eval_rolling["samples"]["mini_ppl"], key=lambda s: s["doc_id"])
    for sample, pred in zip(samples, predictions):
        loglikelihood, words = sample["word_perplexity"]
        assert -pred["nll"] == pytest.approx(loglikelihood, rel=1e-7)
        assert pred["n_words"] == words and pred["n_bytes"] == sample["bits_per_byte"][1]


def test_lm_eval_default_bos_scores_a_second_bos(world, lm_eval_rolling):
    """With the tokenizer adding BOS itself, lm-eval's rolling log-likelihood scores <s><s>text: a different
    (worse) number than minillm's <s>text, which is why the README says to load it with add_bos_token=False."""
    doubled = lm_eval_run(world, ["mini_ppl"], None)["results"]["mini_ppl"]["bits_per_byte,none"]
    assert not math.isclose(doubled, lm_eval_rolling["results"]["mini_ppl"]["bits_per_byte,none"], abs_tol=1e-4)
