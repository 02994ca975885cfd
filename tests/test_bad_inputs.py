"""Bad input to every command-line tool: each case must exit non-zero with exactly one line on stderr,
`error: ...`, naming the file (and line or field) or the option and value, with no traceback, and must leave
what was on disk before exactly as it was (nothing written, nothing half-written, nothing deleted).

    .venv/bin/python -m pytest -q tests/test_bad_inputs.py

Every case runs as its own process, forked by tests/cli_zygote.py from one that imported torch and DeepSpeed
once (a fresh interpreter per case would spend minutes importing them).
"""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, pretrain_args

PRETRAIN = ["train_pretrain.py"]
SFT_ARGS = ["train_sft.py", "--init-from", "{w}/init", "--seq-len", "128", "--out-dir", "{ws}/out"]
ORPO_ARGS = ["train_orpo.py", "--init-from", "{w}/init", "--seq-len", "128", "--out-dir", "{ws}/out"]
EVAL_ARGS = ["evaluate.py", "--model", "{w}/init", "--out", "{ws}/results", "--progress", "false"]


def pre(*args):
    """train_pretrain.py on the tiny world into {ws}/out, plus args."""
    return ["__pretrain__", *args]


def write(name, text):
    """A setup step: write text (str, or bytes) to {ws}/name."""
    def setup(ws, w):
        path = ws / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return setup


def jsonl(name, *records):
    return write(name, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def copy_run(ws, w):
    shutil.copytree(w / "run", ws / "out")


def damage(rel, how):
    def setup(ws, w):
        copy_run(ws, w)
        path = ws / "out" / rel
        if how == "truncate":
            path.write_bytes(path.read_bytes()[:100])
        else:
            path.write_text(how)
    return setup


def both(*setups):
    def setup(ws, w):
        for s in setups:
            s(ws, w)
    return setup


GOOD_SFT = {"instruction": "Translate to Estonian.", "input": "the cat", "output": "kass"}
GOOD_PAIR = {"prompt": "Translate: the cat", "chosen": "kass", "rejected": "koer"}

# (id, argv, setup, words the error line must contain)
CASES = [
    # ---------------------------------------------------------------- train_pretrain.py: options
    ("pt-config-type", pre("--config", "{ws}/cfg.json"), write("cfg.json", '{"lr": "fast"}'),
     ["cfg.json", "'lr'", "'fast'", "number"]),
    ("pt-config-unknown", pre("--config", "{ws}/cfg.json"), write("cfg.json", '{"learning_rate": 1}'),
     ["cfg.json", "unknown option 'learning_rate'"]),
    ("pt-config-missing", pre("--config", "{ws}/nope.json"), None, ["nope.json", "cannot read"]),
    ("pt-config-not-json", pre("--config", "{ws}/cfg.json"), write("cfg.json", "{lr: 1"), ["cfg.json", "JSON"]),
    ("pt-save-interval", pre("--save-interval", "-1"), None, ["--save-interval -1", ">= 0"]),
    ("pt-log-interval", pre("--log-interval", "0"), None, ["--log-interval 0", "at least 1"]),
    ("pt-eval-interval", pre("--eval-interval", "-2"), None, ["--eval-interval -2"]),
    ("pt-grad-accum", pre("--grad-accum", "0"), None, ["--grad-accum 0", "at least 1"]),
    ("pt-lr-negative", pre("--lr", "-1"), None, ["--lr -1.0", "positive"]),
    ("pt-lr-text", pre("--lr", "fast"), None, ["--lr 'fast'", "number"]),
    ("pt-lr-schedule", pre("--lr-schedule", "cosin"), None, ["--lr-schedule 'cosin'", "cosine"]),
    ("pt-max-steps", pre("--max-steps", "-5"), None, ["--max-steps -5", "at least 1"]),
    ("pt-min-lr", pre("--lr", "0.1", "--min-lr", "1"), None, ["--min-lr 1.0", "--lr"]),
    ("pt-beta1", pre("--beta1", "1.5"), None, ["--beta1 1.5", "[0, 1)"]),
    ("pt-warmup", pre("--warmup-steps", "-1"), None, ["--warmup-steps -1"]),
    ("pt-decay-fraction", pre("--decay-fraction", "2"), None, ["--decay-fraction 2.0"]),
    ("pt-keep", pre("--keep-checkpoints", "0"), None, ["--keep-checkpoints 0"]),
    ("pt-eval-tokens", pre("--eval-tokens", "-1"), None, ["--eval-tokens -1"]),
    ("pt-zero-stage", pre("--zero-stage", "5"), None, ["--zero-stage '5'", "0, 1, 2, 3"]),
    ("pt-offload-zero0", pre("--offload", "optimizer"), None, ["--offload 'optimizer'", "--zero-stage 1, 2 or 3"]),
    ("pt-offload-params-zero2", pre("--offload", "optimizer+params", "--zero-stage", "2"), None,
     ["--offload 'optimizer+params'", "--zero-stage 3"]),
    ("pt-checkpointing", pre("--activation-checkpointing", "some"), None,
     ["--activation-checkpointing 'some'", "none, selective, full"]),
    ("pt-unknown-option", pre("--max-stepz", "3"), None, ["unknown option --max-stepz"]),
    ("pt-positional", ["train_pretrain.py", "stray"], None, ["unexpected argument 'stray'"]),
    ("pt-two-values", pre("--lr", "1", "2"), None, ["--lr takes one value"]),
    ("pt-resume-overwrite", pre("--resume", "--overwrite"), None, ["--resume and --overwrite"]),
    ("pt-out-dir-file", ["train_pretrain.py", "--out-dir", "{ws}/file"], write("file", "x"),
     ["--out-dir", "file", "not a directory"]),
    ("pt-out-dir-holds-run", pre(), copy_run, ["--out-dir", "holds a run already", "--resume", "--overwrite"]),
    # ---------------------------------------------------------------- train_pretrain.py: data and model
    ("pt-compile-zero2", pre("--compile", "--zero-stage", "2"), None, ["--compile", "--zero-stage 2"]),
    ("pt-mixture-negative", pre("--mixture", "et=-1,en=1"), None, ["mixture", "'et'", ">= 0"]),
    ("pt-mixture-unknown", pre("--mixture", "fr=1"), None, ["mixture", "'fr'"]),
    ("pt-seq-len", pre("--seq-len", "100000"), None, ["--seq-len 100000", "max_seq_len"]),
    ("pt-data-missing", pre("--data", "et={ws}/nothing", "--mixture", "et=1"), None, ["nothing", "meta.json"]),
    ("pt-tokenizer-missing", pre("--tokenizer", "{ws}/notok"), None, ["notok", "no tokenizer"]),
    ("pt-deepspeed-json", pre("--deepspeed", "{ws}/ds.json"), write("ds.json", "{"), ["ds.json", "DeepSpeed config"]),
    ("pt-init-not-hf", pre("--init-from", "{ws}/empty"), write("empty/readme.txt", "x"), ["config.json", "empty"]),
    ("pt-resume-truncated", pre("--resume", "--max-steps", "3"), damage("checkpoints/step_0000002/mp_rank_00_model_states.pt",
                                                                        "truncate"),
     ["step_0000002", "cannot load"]),
    ("pt-resume-latest-outside", pre("--resume", "--max-steps", "3"), damage("checkpoints/latest", "../../../../etc"),
     ["latest", "not a step_NNNNNNN checkpoint directory"]),
    ("pt-resume-state-damaged", pre("--resume", "--max-steps", "3"),
     damage("checkpoints/step_0000002/trainer_state.json", "{"), ["trainer_state.json", "damaged"]),
    ("pt-resume-other-model", pre("--resume", "--max-steps", "3", "--preset", "demo"), copy_run,
     ["trainer_state.json", "another model"]),
    ("pt-resume-other-trainable", pre("--resume", "--max-steps", "3", "--init-from", "{ws}/out/model", "--trainable",
                                      "embeddings"), copy_run,
     ["trainer_state.json", "--trainable all, this run --trainable embeddings", "--init-from"]),
    ("pt-trainable-random", pre("--trainable", "embeddings"), None, ["--trainable 'embeddings'", "needs --init-from"]),
    # ---------------------------------------------------------------- train_sft.py
    ("sft-bad-json", SFT_ARGS + ["--train-data", "{ws}/bad.jsonl"], jsonl("bad.jsonl", GOOD_SFT, '{"instruction": '),
     ["bad.jsonl:2", "not valid JSON"]),
    ("sft-two-user-turns", SFT_ARGS + ["--train-data", "{ws}/bad.jsonl"],
     jsonl("bad.jsonl", GOOD_SFT, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                {"role": "assistant", "content": "c"}]}),
     ["bad.jsonl:2", "messages[1]", "user turn"]),
    ("sft-assistant-first", SFT_ARGS + ["--train-data", "{ws}/bad.jsonl"],
     jsonl("bad.jsonl", {"messages": [{"role": "assistant", "content": "a"}]}), ["bad.jsonl:1", "messages[0]"]),
    ("sft-missing-output", SFT_ARGS + ["--train-data", "{ws}/bad.jsonl"], jsonl("bad.jsonl", {"instruction": "x"}),
     ["bad.jsonl:1", "'output'"]),
    ("sft-template", SFT_ARGS + ["--template", "jinja"], None, ["--template 'jinja'"]),
    ("sft-truncate", SFT_ARGS + ["--truncate", "middle"], None, ["--truncate 'middle'"]),
    ("sft-epochs", SFT_ARGS + ["--epochs", "0"], None, ["--epochs 0"]),
    ("sft-no-data", SFT_ARGS + ["--train-data", ""], None, ["--train-data", "names no file"]),
    ("sft-valid-missing", SFT_ARGS + ["--train-data", "{ws}/ok.jsonl", "--valid-data", "{ws}/nope.jsonl"],
     jsonl("ok.jsonl", GOOD_SFT), ["nope.jsonl", "cannot read"]),
    # ---------------------------------------------------------------- train_orpo.py
    ("orpo-lambda", ORPO_ARGS + ["--orpo-lambda", "-1"], None, ["--orpo-lambda -1.0"]),
    ("orpo-empty-chosen", ORPO_ARGS + ["--train-data", "{ws}/p.jsonl", "--valid-data", ""],
     jsonl("p.jsonl", GOOD_PAIR, {**GOOD_PAIR, "chosen": ""}), ["p.jsonl:2", "chosen"]),
    ("orpo-missing-field", ORPO_ARGS + ["--train-data", "{ws}/p.jsonl", "--valid-data", ""],
     jsonl("p.jsonl", {"prompt": "x", "chosen": "a"}), ["p.jsonl:1", "'rejected'"]),
    ("orpo-too-few-pairs", ORPO_ARGS + ["--train-data", "{ws}/p.jsonl", "--valid-data", "", "--micro-batch-size", "4"],
     jsonl("p.jsonl", GOOD_PAIR), ["p.jsonl", "1 usable pairs", "global batch"]),
    ("dpo-beta", ORPO_ARGS + ["--objective", "dpo", "--beta", "0"], None, ["--beta 0.0", "> 0"]),
    ("orpo-label-smoothing", ORPO_ARGS + ["--label-smoothing", "0.1"], None, ["--label-smoothing 0.1", "dpo only"]),
    ("kto-label-not-bool", ORPO_ARGS + ["--objective", "kto", "--train-data", "{ws}/k.jsonl", "--valid-data", ""],
     jsonl("k.jsonl", {"prompt": "x", "completion": "kass", "label": True},
           {"prompt": "y", "completion": "koer", "label": "yes"}), ["k.jsonl:2", "'label'", "true"]),
    ("kto-missing-completion", ORPO_ARGS + ["--objective", "kto", "--train-data", "{ws}/k.jsonl", "--valid-data", ""],
     jsonl("k.jsonl", {"messages": [{"role": "user", "content": "x"}], "label": False}), ["k.jsonl:1", "'completion'"]),
    ("kto-empty-completion", ORPO_ARGS + ["--objective", "kto", "--train-data", "{ws}/k.jsonl", "--valid-data", ""],
     jsonl("k.jsonl", {"prompt": "x", "completion": " ", "label": True}), ["k.jsonl:1", "empty 'completion'"]),
    ("kto-half-pair", ORPO_ARGS + ["--objective", "kto", "--train-data", "{ws}/k.jsonl", "--valid-data", ""],
     jsonl("k.jsonl", {"prompt": "x", "chosen": "kass"}), ["k.jsonl:1", "'rejected'"]),
    # ---------------------------------------------------------------- evaluate.py
    ("eval-model-missing", ["evaluate.py", "--model", "{ws}/nomodel", "--tasks", "{w}/data/eval", "--out", "{ws}/r"],
     None, ["nomodel", "config.json"]),
    ("eval-temperature", EVAL_ARGS + ["--temperature", "-1"], None, ["--temperature -1.0"]),
    ("eval-top-p", EVAL_ARGS + ["--top-p", "0"], None, ["--top-p 0.0"]),
    ("eval-batch-size", EVAL_ARGS + ["--batch-size", "0"], None, ["--batch-size 0"]),
    ("eval-prompt-format", EVAL_ARGS + ["--prompt-format", "jinja"], None, ["--prompt-format 'jinja'"]),
    ("eval-tasks-missing", EVAL_ARGS + ["--tasks", "{ws}/none.task.json"], None, ["none.task.json", "no such task"]),
    ("eval-task-type", EVAL_ARGS + ["--tasks", "{ws}/t.task.json"],
     both(write("t.task.json", '{"type": "summary", "data": "t.jsonl"}'), jsonl("t.jsonl", {"text": "x"})),
     ["t.task.json:1", "unknown task type 'summary'"]),
    ("eval-compare-one", ["evaluate.py", "--compare", "{ws}/a.json"], None, ["--compare", "two or more results files"]),
    ("eval-compare-not-results", ["evaluate.py", "--compare", "{ws}/a.json", "{ws}/a.json"], write("a.json", "[]"),
     ["a.json", "not a results file"]),
    ("eval-judge-no-model", EVAL_ARGS + ["--tasks", "{w}/data/eval", "--judge-url", "http://127.0.0.1:9/v1"], None,
     ["--judge-model", "required with --judge-url"]),
    ("eval-judge-prompt-placeholder", EVAL_ARGS + ["--tasks", "{w}/data/eval", "--judge-url", "http://127.0.0.1:9/v1",
                                                   "--judge-model", "j", "--judge-prompt", "{ws}/judge.txt"],
     write("judge.txt", "Is {answer} right? [[CORRECT]] or [[INCORRECT]]"),
     ["judge.txt", "lacks {question}, {reference}"]),
    ("eval-belebele-field", EVAL_ARGS + ["--tasks", "{ws}/b.task.json"],
     both(write("b.task.json", '{"type": "multiple_choice", "format": "belebele", "data": "b.jsonl"}'),
          jsonl("b.jsonl", {"flores_passage": "p", "question": "q", "mc_answer1": "a", "mc_answer2": "b",
                            "mc_answer4": "d", "correct_answer_num": "1"})),
     ["b.jsonl:1", "missing field 'mc_answer3'"]),
    ("eval-flores-unaligned", EVAL_ARGS + ["--tasks", "{ws}/f.task.json"],
     both(write("f.task.json", '{"type": "translation", "format": "flores", "data": "en.devtest", '
                               '"target_data": "et.devtest", "src_lang": "en", "tgt_lang": "et"}'),
          both(write("en.devtest", "a\nb\n"), write("et.devtest", "x\n"))),
     ["et.devtest", "1 lines, but", "en.devtest has 2"]),
    # ---------------------------------------------------------------- python -m minillm.prepare
    ("prepare-input-missing", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/nope.txt",
                               "--out", "{ws}/out"], None, ["nope.txt", "cannot read"]),
    ("prepare-bad-json", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.jsonl", "--out",
                          "{ws}/out", "--workers", "1"], jsonl("c.jsonl", {"text": "ok"}, '{"text": '),
     ["c.jsonl:2", "not valid JSON"]),
    ("prepare-field", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.jsonl", "--out", "{ws}/out",
                       "--workers", "1"], jsonl("c.jsonl", {"body": "ok"}), ["c.jsonl:1", "missing field 'text'"]),
    ("prepare-workers", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt", "--out", "{ws}/o",
                         "--workers", "0"], write("c.txt", "tere\n"), ["--workers 0"]),
    ("prepare-max-doc-chars", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt", "--out",
                               "{ws}/o", "--max-doc-chars", "-5"], write("c.txt", "tere\n"), ["--max-doc-chars -5", ">= 0"]),
    ("prepare-format", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt", "--out", "{ws}/o",
                        "--format", "xml"], write("c.txt", "tere\n"), ["--format 'xml'"]),
    ("prepare-unnamed-text", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/train.et", "--out",
                              "{ws}/o"], write("train.et", "tere\n"), ["train.et", "--format"]),
    ("prepare-command", ["-m", "minillm.prepare", "frobnicate"], None, ["unknown command 'frobnicate'"]),
    ("prepare-out-file", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt", "--out",
                          "{ws}/c.txt"], write("c.txt", "tere\n"), ["--out", "c.txt", "not a directory"]),
    ("prepare-out-unwritable", ["-m", "minillm.prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt", "--out",
                                "/proc/minillm-out"], write("c.txt", "tere\n"), ["/proc/minillm-out"]),
    # ---------------------------------------------------------------- python -m minillm.tokenizer
    ("tokenizer-vocab", ["-m", "minillm.tokenizer", "train", "--input", "{ws}/c.txt", "--vocab-size", "0", "--out",
                         "{ws}/t"], write("c.txt", "tere\n"), ["--vocab-size 0"]),
    ("tokenizer-missing", ["-m", "minillm.tokenizer", "train", "--input", "{ws}/nope.txt", "--vocab-size", "50",
                           "--out", "{ws}/t"], None, ["nope.txt", "cannot read"]),
    ("tokenizer-vocab-too-big", ["-m", "minillm.tokenizer", "train", "--input", "{ws}/c.txt", "--vocab-size", "5000",
                                 "--out", "{ws}/t"], write("c.txt", "tere maailm\n"),
     ["c.txt: sentencepiece training failed", "Vocabulary size"]),
    ("reproduce-timings", ["scripts/reproduce.py", "--report-only", "--out", "{ws}/r"], write("r/timings.json", "{bad"),
     ["r/timings.json: damaged", "delete it"]),
    ("tokenizer-format", ["-m", "minillm.tokenizer", "train", "--input", "{ws}/c.csv", "--vocab-size", "50", "--out",
                          "{ws}/t"], write("c.csv", "a,b\n"), ["c.csv", "unknown input format"]),
    # ---------------------------------------------------------------- python -m minillm.vocab
    ("vocab-model-no-config", ["-m", "minillm.vocab", "extend", "--base", "{w}/tok", "--corpus", "{ws}/et.txt",
                               "--new-vocab-size", "450", "--out", "{ws}/o", "--model-in", "{ws}/m", "--model-out",
                               "{ws}/m2"], both(write("et.txt", "tere maailm\n"), write("m/x.txt", "x")),
     ["--model-in", "config.json"]),
    ("vocab-model-pair", ["-m", "minillm.vocab", "extend", "--base", "{w}/tok", "--corpus", "{ws}/et.txt",
                          "--new-vocab-size", "450", "--out", "{ws}/o", "--model-in", "{w}/init"],
     write("et.txt", "tere\n"), ["--model-in and --model-out"]),
    ("vocab-base-missing", ["-m", "minillm.vocab", "extend", "--base", "{ws}/nobase", "--corpus", "{ws}/et.txt",
                            "--new-vocab-size", "450", "--out", "{ws}/o"], write("et.txt", "tere\n"),
     ["nobase", "no tokenizer"]),
    ("vocab-out-is-base", ["-m", "minillm.vocab", "extend", "--base", "{ws}/tok", "--corpus", "{ws}/et.txt",
                           "--new-vocab-size", "450", "--out", "{ws}/tok/"],
     both(write("et.txt", "tere\n"), lambda ws, w: shutil.copytree(w / "tok", ws / "tok")),
     ["--out", "is --base", "overwritten"]),
    ("vocab-out-file", ["-m", "minillm.vocab", "extend", "--base", "{w}/tok", "--corpus", "{ws}/et.txt",
                        "--new-vocab-size", "450", "--out", "{ws}/et.txt"], write("et.txt", "tere\n"),
     ["--out", "et.txt", "not a directory"]),
    # ---------------------------------------------------------------- python -m minillm.instructions
    ("instructions-misaligned", ["-m", "minillm.instructions", "translate", "--src", "{ws}/en.txt", "--tgt",
                                 "{ws}/et.txt", "--out", "{ws}/o.jsonl"],
     both(write("en.txt", "a cat\nthe dog\n"), write("et.txt", "kass\n")), ["en.txt has 2 lines", "et.txt"]),
    ("instructions-share", ["-m", "minillm.instructions", "translate", "--tsv", "{ws}/b.en-et.tsv", "--reverse-share", "2",
                            "--out", "{ws}/o.jsonl"], write("b.en-et.tsv", "a\tb\n"), ["--reverse-share 2.0"]),
    ("instructions-tsv", ["-m", "minillm.instructions", "translate", "--tsv", "{ws}/b.tsv", "--src-lang", "en",
                          "--tgt-lang", "et", "--out", "{ws}/o.jsonl"],
     write("b.tsv", "a\tb\nc\td\te\n"), ["b.tsv:2", "2 tab-separated columns"]),
    ("instructions-languages", ["-m", "minillm.instructions", "translate", "--src", "{ws}/train.src", "--tgt",
                                "{ws}/train.tgt", "--out", "{ws}/o.jsonl"],
     both(write("train.src", "a cat\n"), write("train.tgt", "kass\n")),
     ["train.src", "cannot tell the languages", "--src-lang", "known: en, et, pl"]),
    ("instructions-language-unknown", ["-m", "minillm.instructions", "translate", "--tsv", "{ws}/b.tsv", "--src-lang",
                                       "en", "--tgt-lang", "pt", "--out", "{ws}/o.jsonl"], write("b.tsv", "a\tb\n"),
     ["--tgt-lang 'pt'", "known: en, et, pl"]),
    ("instructions-recipe", ["-m", "minillm.instructions", "mix", "--recipe", "{ws}/r.json", "--out-dir", "{ws}/mix"],
     write("r.json", '{"sources": [{"path": "x.jsonl", "type": "scraped", "language": "et"}]}'),
     ["r.json", "sources[0]", "'scraped'"]),
    ("instructions-command", ["-m", "minillm.instructions", "frobnicate"], None, ["unknown command 'frobnicate'"]),
    # ---------------------------------------------------------------- python -m minillm.chat
    ("chat-model-missing", ["-m", "minillm.chat", "--model", "{ws}/nomodel"], None, ["nomodel", "config.json"]),
    ("chat-config-list", ["-m", "minillm.chat", "--model", "{ws}/m"], write("m/config.json", "[1, 2]"),
     ["m/config.json", "must be a JSON object"]),
    ("chat-config-type", ["-m", "minillm.chat", "--model", "{ws}/m"],
     write("m/config.json", '{"hidden_size": "64", "intermediate_size": 128, "num_hidden_layers": 2, '
                            '"num_attention_heads": 4, "vocab_size": 100}'),
     ["m/config.json", "hidden_size='64'", "positive integer"]),
    ("chat-temperature", ["-m", "minillm.chat", "--model", "{w}/init", "--temperature", "-1"], None,
     ["--temperature -1.0"]),
    ("chat-top-p", ["-m", "minillm.chat", "--model", "{w}/init", "--top-p", "0"], None, ["--top-p 0.0"]),
    # ---------------------------------------------------------------- demo/sample_world.py
    ("world-scale", ["demo/sample_world.py", "--out", "{ws}/world", "--scale", "-1"], None, ["--scale -1.0"]),
    ("world-out-file", ["demo/sample_world.py", "--out", "{ws}/f", "--scale", "0.01"], write("f", "x"),
     ["--out", "not a directory"]),
    # ---------------------------------------------------------------- outputs that cannot be written
    ("pt-out-dir-unwritable", ["train_pretrain.py", *["{pretrain}"], "--out-dir", "/proc/minillm-run"], None,
     ["/proc/minillm-run"]),
    ("eval-out-unwritable", EVAL_ARGS[:-4] + ["--tasks", "{w}/data/eval/mt_en_et.task.json", "--limit", "1",
                                              "--out", "/proc/minillm-results"], None, ["/proc/minillm-results"]),
    ("tokenizer-out-unwritable", ["-m", "minillm.tokenizer", "train", "--input", "{ws}/c.txt", "--vocab-size", "50",
                                  "--out", "/proc/minillm-tok"], write("c.txt", "tere\n"), ["/proc/minillm-tok"]),
    # ---------------------------------------------------------------- minillm.merge, decontamination
    ("merge-no-base", ["-m", "minillm.merge", "--method", "task_arithmetic", "--models", "{w}/init", "--out", "{ws}/o"],
     None, ["task_arithmetic needs --base"]),
    ("merge-missing-model", ["-m", "minillm.merge", "--method", "linear", "--models", "{ws}/nope", "--out", "{ws}/o"],
     None, ["nope/config.json", "not found"]),
    ("merge-truncated", ["-m", "minillm.merge", "--method", "linear", "--models", "{w}/init", "{ws}/m", "--out", "{ws}/o"],
     lambda ws, w: (shutil.copytree(w / "init", ws / "m"), (ws / "m/model.safetensors").write_bytes(b"\x10" + b"\0" * 20)),
     ["m/model.safetensors"]),
    ("merge-dtype", ["-m", "minillm.merge", "--method", "linear", "--models", "{w}/init", "--out", "{ws}/o", "--dtype",
                     "int8"], None, ["--dtype int8"]),
    ("decon-task-no-data", ["-m", "minillm.instructions", "decontaminate", "--input", "{ws}/t.jsonl", "--eval",
                            "{ws}/e.task.json", "--out", "{ws}/o.jsonl"],
     both(jsonl("t.jsonl", GOOD_SFT), write("e.task.json", '{"type": "qa"}')), ["e.task.json", "'data'"]),
    ("decon-eval-bad-line", ["-m", "minillm.instructions", "decontaminate", "--input", "{ws}/t.jsonl", "--eval",
                             "{ws}/e.task.json", "--out", "{ws}/o.jsonl"],
     both(jsonl("t.jsonl", GOOD_SFT), write("e.task.json", '{"type": "qa", "data": "e.jsonl"}'),
          write("e.jsonl", '{"question": "a"}\n{oops\n')), ["e.jsonl:2", "JSON"]),
    ("decon-ngram", ["-m", "minillm.instructions", "decontaminate", "--input", "{ws}/t.jsonl", "--eval", "{w}/data/eval",
                     "--ngram", "0", "--out", "{ws}/o.jsonl"], jsonl("t.jsonl", GOOD_SFT), ["--ngram 0"]),
    ("prepare-decon-missing", ["-m", "minillm.prepare", "prepare", "--tokenizer", "{w}/tok", "--input", "{ws}/c.txt",
                               "--out", "{ws}/shards", "--decontaminate", "{ws}/nowhere.task.json"],
     write("c.txt", "tere\n"), ["nowhere.task.json", "cannot read"]),
    ("instructions-out-unwritable", ["-m", "minillm.instructions", "translate", "--tsv", "{w}/data/bitext/en-et.tsv",
                                     "--out", "/proc/minillm/o.jsonl"], None, ["/proc/minillm"]),
]


def snapshot(path: Path) -> dict:
    """Every file under path and the sha256 of its bytes (directories as entries too)."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = str(p.relative_to(path))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def results(tiny_world, tmp_path_factory):
    """Run every case once (in the zygote) and collect exit status, stderr and the workspace before/after."""
    base = tmp_path_factory.mktemp("bad_inputs")
    world_before = snapshot(tiny_world)
    cases, before = [], {}
    for case_id, argv, setup, _ in CASES:
        ws = base / case_id
        ws.mkdir()
        if setup:
            setup(ws, tiny_world)
        if argv[0] == "__pretrain__":
            argv = ["train_pretrain.py", *pretrain_args(tiny_world, ws / "out"), *argv[1:]]
        if "{pretrain}" in argv:  # the tiny-world pretraining options, then the case's own
            i = argv.index("{pretrain}")
            argv = argv[:i] + pretrain_args(tiny_world, ws / "out") + argv[i + 1:]
        argv = [a.replace("{w}", str(tiny_world)).replace("{ws}", str(ws)) for a in argv]
        before[case_id] = snapshot(ws)
        cases.append({"argv": argv, "cwd": str(ws), "stdout": str(base / f"{case_id}.out"),
                      "stderr": str(base / f"{case_id}.err"), "env": {"OMP_NUM_THREADS": "1"}})
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_zygote.py")], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for (case_id, *_), code in zip(CASES, codes):
        out[case_id] = {"code": code, "stderr": (base / f"{case_id}.err").read_text(),
                        "before": before[case_id], "after": snapshot(base / case_id)}
    assert snapshot(tiny_world) == world_before  # the shared inputs are never touched
    return out


def test_there_are_enough_cases_across_all_clis():
    tools = {argv[1] if argv[0] == "-m" else argv[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 50
    assert {"__pretrain__", "train_sft.py", "train_orpo.py", "evaluate.py", "minillm.prepare", "minillm.tokenizer",
            "minillm.vocab", "minillm.instructions", "minillm.chat", "demo/sample_world.py"} <= tools


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(results, case):
    words = next(c[3] for c in CASES if c[0] == case)
    r = results[case]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["code"] != 0, r["stderr"]
    assert "Traceback" not in r["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: "), r["stderr"]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert r["after"] == r["before"], "the failed command changed what was on disk"


# ----------------------------------------------------------------------------- --help of every command

HELP = [["train_pretrain.py"], ["train_sft.py"], ["train_orpo.py"], ["evaluate.py"], ["-m", "minillm.prepare", "prepare"],
        ["-m", "minillm.prepare", "info"], ["-m", "minillm.tokenizer", "train"], ["-m", "minillm.vocab", "extend"],
        ["-m", "minillm.instructions", "translate"], ["-m", "minillm.instructions", "mix"], ["-m", "minillm.chat"],
        ["demo/sample_world.py"], ["demo/heldout_check.py"], ["demo/pretrain_as_sft.py"], ["bench/bench_train_step.py"],
        ["bench/bench_loss.py"], ["bench/bench_attention.py"], ["-m", "minillm.merge"],
        ["-m", "minillm.instructions", "decontaminate"]]


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    base = tmp_path_factory.mktemp("help")
    cases = [{"argv": argv + ["--help"], "cwd": str(base), "stdout": str(base / f"{i}.out"),
              "stderr": str(base / f"{i}.err")} for i, argv in enumerate(HELP)]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_zygote.py")], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    return {" ".join(argv): (code, (base / f"{i}.out").read_text()) for i, (argv, code) in enumerate(zip(HELP, codes))}


@pytest.mark.parametrize("command", [" ".join(argv) for argv in HELP])
def test_help_describes_every_option(helps, command):
    """Every option: its flag and type, one line saying what it does, and its default (or 'required')."""
    code, text = helps[command]
    assert code == 0, text
    lines = text.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  --")]
    assert len(options) >= 2, text
    for i in options:
        description = lines[i + 1].strip()
        assert description.endswith(")") and ("(default: " in description or description.endswith("(required)")), \
            (lines[i], description)
        said = description[:description.rfind("(")].strip()
        assert len(said) >= 8, f"{command}: {lines[i].strip()} has no description"
