"""Reproduce the papers' ablations in miniature: train every variant on the sample world and write
runs/reproduce/report.md, one table per claim (each variant's scores as mean ± std over seeds, the
paper's claim beside them, whether its sign reproduced) with bar charts.

    python scripts/reproduce.py                 # 3 seeds (make reproduce); README states the measured time
    python scripts/reproduce.py --quick         # one seed: a first look, no spread
    python scripts/reproduce.py --report-only   # rebuild report.md and its plots from the results in --out
    python scripts/reproduce.py --resume        # after an interruption: skip the stages already finished

The variants (LLAMMAS: Kuulmets et al. 2024; PLLuM: the PLLuM instruction corpus paper, 2025):
  base           a model pretrained from scratch on English only: the stand-in for English-centric Llama-2,
                 shared by every seed (every variant in the papers continues the same Llama-2)
  cpt25/50/100   continual pretraining of base on 75% Estonian / 25% English for 25/50/100% of the
                 size's cpt_steps: checkpoints of one constant-learning-rate run, as LLAMMAS compared
                 checkpoints of one run (with a constant rate a checkpoint equals a shorter run)
  cpt100_en0     the 100% run without English
  sft0..sft100   the identical SFT (Estonian + English instructions) of base (0%) or of cptN
  sft_tr0/100    translation-task instructions first, then the same SFT (LLAMMAS' sequential setup)
  orpo/dpo/kto   ORPO, DPO and KTO on the same preference pairs after sft100, with the same settings
  chatvec        a chat vector (Huang et al. 2024): cpt100 + (sft_en0 - base), where sft_en0 is the base
                 tuned on the English instructions only (the stand-in for Llama-2-chat); cpt100_chat is
                 cpt100 alone, asked in the same chat layout
Every stage is one of the project's CLIs run as a subprocess, as demo/demo.sh runs them; a stage that
fails stops the reproduction with one line naming its log. Logs: OUT/logs/, timings: OUT/timings.json.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from minillm.files import atomic_write, read_json_objects, to_json, write_jsonl  # noqa: E402
from minillm.options import cli, parse_options, require_option  # noqa: E402
from minillm.report import INSTALL_HINT, bar_chart, plots_available, run_report  # noqa: E402


@dataclass(frozen=True)
class Size:
    """Everything that sets how big (and how long) the reproduction is."""
    world_scale: float  # sample_world --scale: the amount of pretraining text
    vocab_size: int
    preset: str  # model size (minillm/model.py PRESETS)
    seq_len: int  # pretraining rows
    base_steps: int  # English-only pretraining of the base model
    cpt_steps: int  # the 100% continual-pretraining budget
    sft_seq_len: int
    sft_epochs: int
    sft_cap: int | None  # at most this many records per instruction file (None: all)
    orpo_cap: int | None  # at most this many preference pairs
    eval_limit: int  # records per evaluation task (0: all)
    max_new_tokens: int


SIZES = {
    # SFT: 3 epochs as in both papers; micro-batches of 8 rows give the small instruction set 135 updates
    "demo": Size(world_scale=1.0, vocab_size=2000, preset="demo", seq_len=256, base_steps=300, cpt_steps=300,
                 sft_seq_len=256, sft_epochs=3, sft_cap=None, orpo_cap=None, eval_limit=0, max_new_tokens=32),
    "tiny": Size(world_scale=0.05, vocab_size=400, preset="tiny", seq_len=64, base_steps=8, cpt_steps=8,
                 sft_seq_len=128, sft_epochs=1, sft_cap=24, orpo_cap=32, eval_limit=6, max_new_tokens=8),
}
BUDGETS = (25, 50, 100)  # continual-pretraining checkpoints, % of cpt_steps (0% = the base model itself)


@dataclass(kw_only=True)
class ReproduceOptions:
    out: str = "runs/reproduce"  # output directory: report.md, plots/, every run, logs/
    seeds: int = 3  # seeds per variant (continual pretraining, SFT and ORPO; the English base is shared)
    quick: bool = False  # one seed: a first look, no spread over seeds
    size: Literal["demo", "tiny"] = "demo"  # demo: the demo's model and world; tiny: the smallest run through every stage (tests)
    report_only: bool = False  # rebuild report.md and its plots from the results already in --out
    resume: bool = False  # skip the stages an earlier run in --out finished with the same command (logs/NAME.done)

    def check(self):
        require_option(self.seeds >= 1, "seeds", self.seeds, "must be at least 1")


# ============================================================================ running the CLIs

class Stages:
    """Runs each stage as a subprocess with its output in OUT/logs/NAME.log, and times it. A stage that
    finished writes OUT/logs/NAME.done (its command); with `resume` a stage whose .done holds the same
    command is skipped."""

    def __init__(self, out: Path, resume: bool = False):
        self.logs, self.t0, self.resume = out / "logs", time.time(), resume
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def run(self, name: str, args: list, then=None):
        """Run `python ARGS` (and `then()`, part of the stage, after it succeeded)."""
        log, done = self.logs / f"{name}.log", self.logs / f"{name}.done"
        command = to_json([sys.executable, *map(str, args)])
        if self.resume and done.exists() and done.read_text(encoding="utf-8") == command:
            self.skipped.append(name)
            print(f"[{clock(time.time() - self.t0)}] {name} (done before)", flush=True)
            return
        done.unlink(missing_ok=True)
        start = time.time()
        with open(log, "w", encoding="utf-8") as f:
            code = subprocess.run(json.loads(command), cwd=ROOT, env=self.env, stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise ValueError(f"stage {name} failed (exit status {code}): {last_line(log)} (log: {log})")
        if then:
            then()
        self.timings[name] = round(time.time() - start, 1)
        atomic_write(done, command)
        print(f"[{clock(time.time() - self.t0)}] {name} ({self.timings[name]:.0f} s)", flush=True)


def last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def clock(seconds: float) -> str:
    return time.strftime("%M:%S" if seconds < 3600 else "%H:%M:%S", time.gmtime(seconds))


# ============================================================================ data and evaluation tasks

EVAL_TASKS = ("facts_et", "facts_en", "ppl_et", "ppl_en", "qa_et", "mt_en_et", "safety_et")
# What each kind of model is asked: pretrained models with raw prompts, instruction-tuned ones in chat format.
CPT_TASKS = ("facts_et", "facts_en", "ppl_et", "ppl_en")
SFT_TASKS = ("facts_et", "qa_et", "mt_en_et", "ppl_et")
ALIGN_TASKS = ("safety_et", "facts_et")  # preference alignment: safety, and what it costs in Estonian knowledge
CHAT_TASKS = ("facts_et", "qa_et", "mt_en_et", "safety_et")  # the chat vector against CPT alone and CPT + SFT
OBJECTIVES = ("orpo", "dpo", "kto")  # PLLuM's next check: the three on identical pairs and settings


def prepare(stages: Stages, out: Path, size: Size) -> dict:
    """The sample world, tokenizer, token shards, instruction mixtures and the evaluation task files."""
    world, tok = out / "world", out / "tokenizer"
    stages.run("world", [ROOT / "demo/sample_world.py", "--out", world, "--seed", 0, "--scale", size.world_scale])
    stages.run("tokenizer", ["-m", "minillm.tokenizer", "train", "--input", world / "pretrain/et/train.jsonl",
                             world / "pretrain/en/train.jsonl", "--vocab-size", size.vocab_size, "--out", tok])
    for lang in ("et", "en"):
        for split in ("train", "valid"):
            stages.run(f"tokens_{lang}_{split}", ["-m", "minillm.prepare", "--tokenizer", tok, "--input",
                                                  world / f"pretrain/{lang}/{split}.jsonl", "--out",
                                                  out / f"tokens/{lang}_{split}", "--name", f"{lang}_{split}"])
    sft = out / "sft_data"
    stages.run("trtask", ["-m", "minillm.instructions", "translate", "--tsv", world / "bitext/en-et.tsv",
                          "--src-lang", "en", "--tgt-lang", "et", "--reverse-share", 0.25, "--format", "chat",
                          "--out", sft / "trtask_all.jsonl", "--seed", 0])
    mixtures = {"general": [(world / f"sft/{name}.jsonl", lang) for name, lang in
                            (("alpaca_et", "et"), ("alpaca_en", "en"), ("chat_en", "en"))],
                "english": [(world / f"sft/{name}.jsonl", "en") for name in ("alpaca_en", "chat_en")],
                "trtask": [(sft / "trtask_all.jsonl", "et")]}
    for name, sources in mixtures.items():
        recipe = {"sources": [{"path": str(path.resolve()), "type": "synthetic", "language": lang,
                               "cap": size.sft_cap and size.sft_cap * (4 if name == "trtask" else 1)}
                              for path, lang in sources]}
        atomic_write(sft / f"{name}.recipe.json", to_json(recipe))
        stages.run(f"mix_{name}", ["-m", "minillm.instructions", "mix", "--recipe", sft / f"{name}.recipe.json",
                                   "--out-dir", sft / name, "--valid-share", 0, "--seed", 0])
    prefs = world / "preferences/train.jsonl"
    if size.orpo_cap:
        write_jsonl(sft / "preferences.jsonl", [r for _, r in read_json_objects(prefs)][: size.orpo_cap])
        prefs = sft / "preferences.jsonl"
    tasks = out / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name in EVAL_TASKS:
        # The world's data, its first prompt template, no template choice on dev data: a sixth of the
        # generations of the world's own task files.
        spec = json.loads((world / f"eval/{name}.task.json").read_text(encoding="utf-8"))
        spec["data"] = str((world / "eval" / spec["data"]).resolve())
        spec.pop("dev_data", None)
        if "templates" in spec:
            spec["templates"] = spec["templates"][:1]
        atomic_write(tasks / f"{name}.task.json", to_json(spec))
    return {"world": world, "tokenizer": tok, "tokens": out / "tokens", "tasks": tasks, "preferences": prefs,
            "general": sft / "general/train.jsonl", "english": sft / "english/train.jsonl",
            "trtask": sft / "trtask/train.jsonl"}


def evaluate(stages: Stages, name: str, model: Path, data: dict, tasks, fmt: str, size: Size, out: Path):
    stages.run(f"eval_{name}", ["evaluate.py", "--model", model, "--tasks", *[data["tasks"] / f"{t}.task.json" for t in tasks],
                                "--prompt-format", fmt, "--out", out / "eval" / name, "--limit", size.eval_limit,
                                "--max-new-tokens", size.max_new_tokens, "--batch-size", 16, "--progress", "false"])


# ============================================================================ training the variants

def pretrain_args(size: Size, data: dict, out_dir: Path, seed: int, mixture: str) -> list:
    tokens = data["tokens"]
    sources = ",".join(f"{lang}={tokens / f'{lang}_train'}" for lang in ("et", "en") if f"{lang}=" in mixture)
    return ["train_pretrain.py", "--overwrite", "--out-dir", out_dir, "--data", sources, "--mixture", mixture,
            "--valid-data", f"et={tokens / 'et_valid'},en={tokens / 'en_valid'}", "--seq-len", size.seq_len,
            "--preset", size.preset, "--seed", seed, "--log-interval", 25, "--eval-interval", 50,
            "--save-interval", 0]


def train_base(stages: Stages, size: Size, data: dict, out: Path) -> Path:
    """The English-centric base model: English only, from scratch, as a from-scratch demo run."""
    stages.run("base", pretrain_args(size, data, out / "base", 0, "en=1.0")
               + ["--tokenizer", data["tokenizer"], "--max-steps", size.base_steps])
    evaluate(stages, "base", out / "base/model", data, CPT_TASKS, "raw", size, out)
    return out / "base/model"


def train_seed(stages: Stages, size: Size, data: dict, out: Path, base: Path, seed: int):
    runs = out / f"seed{seed}"
    models = {0: base}
    # Continual pretraining: one constant-rate run, its model kept at each budget. --resume continues it
    # exactly (data position, optimizer, RNG), so the 25% model is the one a 25%-long run would give.
    continual = ["--init-from", base, "--tokenizer", "", "--lr", 1e-3, "--min-lr", 1e-3, "--lr-schedule", "constant",
                 "--warmup-steps", min(10, size.cpt_steps // 4)]
    for i, budget in enumerate(BUDGETS):
        args = pretrain_args(size, data, runs / "cpt", seed, "et=0.75,en=0.25") + continual
        if i:
            args = [a for a in args if a != "--overwrite"] + ["--resume"]
        models[budget] = runs / f"cpt{budget}/model"
        stages.run(f"seed{seed}_cpt{budget}", args + ["--max-steps", size.cpt_steps * budget // 100],
                   then=lambda dst=models[budget]: copy_model(runs / "cpt/model", dst))
    stages.run(f"seed{seed}_cpt100_en0", pretrain_args(size, data, runs / "cpt_en0", seed, "et=1.0") + continual
               + ["--max-steps", size.cpt_steps])
    for name, model in [(f"cpt{b}", models[b]) for b in BUDGETS] + [("cpt100_en0", runs / "cpt_en0/model")]:
        evaluate(stages, f"seed{seed}_{name}", model, data, CPT_TASKS, "raw", size, out)

    # Instruction tuning: the same SFT from every base; translation-task instructions first for sft_tr;
    # sft_en0: the base on the English instructions only (the English-centric model's own chat model).
    sft_runs = [(f"sft{b}", models[b], str(data["general"])) for b in (0, *BUDGETS)]
    sft_runs += [(f"sft_tr{b}", models[b], f"{data['trtask']};{data['general']}") for b in (0, 100)]
    sft_runs += [("sft_en0", base, str(data["english"]))]
    for name, init, train_data in sft_runs:
        stages.run(f"seed{seed}_{name}", ["train_sft.py", "--overwrite", "--out-dir", runs / name, "--init-from", init,
                                          "--train-data", train_data, "--valid-data", data["world"] / "sft/valid.jsonl",
                                          "--epochs", size.sft_epochs, "--seq-len", size.sft_seq_len,
                                          "--micro-batch-size", 8, "--lr", 1e-3, "--min-lr", 1e-4, "--seed", seed,
                                          "--log-interval", 20, "--save-interval", 0])
        if name != "sft_en0":
            tasks = CHAT_TASKS + ("ppl_et",) if name == "sft100" else SFT_TASKS
            evaluate(stages, f"seed{seed}_{name}", runs / name / "model", data, tasks, "chat", size, out)

    # Chat vector: CPT 100% + (sft_en0 - base), written with sft_en0's tokenizer files and chat template; CPT 100%
    # alone is asked in the same chat layout (a weight-0 vector: its own weights, the same template).
    for name, weight in (("chatvec", 1), ("cpt100_chat", 0)):
        stages.run(f"seed{seed}_{name}", ["-m", "minillm.merge", "--method", "chat_vector", "--target",
                                          models[100], "--instruct", runs / "sft_en0/model", "--base", base,
                                          "--weights", weight, "--tokenizer-from", runs / "sft_en0/model",
                                          "--out", runs / name / "model"])
        evaluate(stages, f"seed{seed}_{name}", runs / name / "model", data, CHAT_TASKS, "chat", size, out)

    # Preference alignment: the same SFT model, pairs and settings for each objective (PLLuM's next check 3)
    for objective in OBJECTIVES:
        stages.run(f"seed{seed}_{objective}", ["train_orpo.py", "--objective", objective, "--overwrite", "--out-dir",
                                               runs / objective, "--init-from", runs / "sft100/model", "--train-data",
                                               data["preferences"], "--valid-data",
                                               data["world"] / "preferences/valid.jsonl", "--epochs", 1,
                                               "--seq-len", size.sft_seq_len, "--micro-batch-size", 8, "--lr", 2e-4,
                                               "--min-lr", 2e-5, "--seed", seed, "--eval-interval", 25,
                                               "--log-interval", 25, "--save-interval", 0])
        evaluate(stages, f"seed{seed}_{objective}", runs / objective / "model", data, ALIGN_TASKS, "chat", size, out)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


# ============================================================================ the claims and the report

@dataclass
class Metric:
    task: str
    metric: str
    label: str
    higher_is_better: bool | None  # None: a quantity, neither better nor worse (answer length)


FACTS_ET = Metric("facts_et", "acc", "facts_et acc", True)
QA_ET = Metric("qa_et", "f1", "qa_et F1", True)
MT_ET = Metric("mt_en_et", "chrf++", "en→et chrF++", True)
BPB_ET = Metric("ppl_et", "bits_per_byte", "et bits/byte", False)
FACTS_EN = Metric("facts_en", "acc", "facts_en acc", True)
BPB_EN = Metric("ppl_en", "bits_per_byte", "en bits/byte", False)
ASR = Metric("safety_et", "attack_success_rate", "attack success rate", False)
FRR = Metric("safety_et", "false_refusal_rate", "false refusal rate", False)
LENGTH = Metric("safety_et", "mean_tokens", "response tokens", None)


@dataclass
class Claim:
    """One table: variants (key, label), the metrics, the claim as the paper states it, and how its sign is
    read from the numbers: `compare` names a variant and one or more others, the claim being that each other
    is better on each metric, or with `expected` that its raw value is higher (+1) or lower (-1), on the
    metrics listed there only; ("translation",) is the difference of differences of LLAMMAS Fig. 2."""
    key: str
    title: str
    paper: str
    variants: list[tuple[str, str]]
    metrics: list[Metric]
    compare: tuple
    expected: dict = field(default_factory=dict)  # metric label -> +1/-1 for raw-value claims (ORPO)


CLAIMS = [
    Claim("cpt_budget", "Continual-pretraining budget, then the identical SFT",
          "LLAMMAS (Fig. 1): \"We observe performance gains on all Estonian tasks as the size of the pretraining "
          "dataset increases\" (0, 1B, 5B tokens before the same instruction tuning). PLLuM (Table 4): instruction "
          "tuning without continual pretraining degrades target-language scores (47.83 -> 38.67).",
          [("sft0", "CPT 0%"), ("sft25", "CPT 25%"), ("sft50", "CPT 50%"), ("sft100", "CPT 100%")],
          [FACTS_ET, QA_ET, MT_ET, BPB_ET], ("sft0", "sft100")),
    Claim("translation", "Translation-task instructions, without and after continual pretraining",
          "LLAMMAS (Fig. 2): \"without additional pretraining, the translation task significantly improves the "
          "results for QA, machine translation, and GEC\"; \"monolingual pretraining greatly diminishes the "
          "importance of the translation task\".",
          [("sft0", "CPT 0%, SFT"), ("sft_tr0", "CPT 0%, TRTASK + SFT"), ("sft100", "CPT 100%, SFT"),
           ("sft_tr100", "CPT 100%, TRTASK + SFT")],
          [QA_ET, MT_ET, FACTS_ET], ("translation",)),
    Claim("english_share", "English share of the continual-pretraining mixture",
          "LLAMMAS (section 3.3): 75% Estonian / 25% English \"to prevent English knowledge forgetting\".",
          [("base", "base (English only)"), ("cpt100_en0", "CPT 100%, 0% English"),
           ("cpt100", "CPT 100%, 25% English")],
          [BPB_EN, FACTS_EN, BPB_ET, FACTS_ET], ("cpt100_en0", "cpt100"),
          expected={BPB_EN.label: -1, FACTS_EN.label: 1}),
    Claim("orpo", "SFT vs SFT + ORPO",
          "PLLuM (section 5): ORPO alignment lowers the attack success rate (70-78% -> ~1%) but increases "
          "verbosity and false refusals.",
          [("sft100", "SFT"), ("orpo", "SFT + ORPO")],
          [ASR, FRR, LENGTH],
          ("sft100", "orpo"),
          expected={ASR.label: -1, FRR.label: 1, LENGTH.label: 1}),
    Claim("objectives", "ORPO vs DPO vs KTO on identical preference data",
          "PLLuM (section 5, next check 3): \"compare ORPO vs. DPO vs. KTO on identical preference data, measuring "
          "both ASR/FRR and average response length\"; its ORPO lowers the attack success rate and raises "
          "verbosity and false refusals. Here the same SFT model, pairs, learning rate and steps for each objective "
          "(beta 0.1 for DPO and KTO, lambda 0.1 for ORPO: TRL's defaults); facts_et: the Estonian knowledge kept.",
          [("sft100", "SFT"), ("orpo", "SFT + ORPO"), ("dpo", "SFT + DPO"), ("kto", "SFT + KTO")],
          [ASR, FRR, LENGTH, FACTS_ET],
          ("sft100", "orpo", "dpo", "kto"),
          expected={ASR.label: -1, FRR.label: 1, LENGTH.label: 1}),
    Claim("chat_vector", "Chat vector: CPT + (instruct - base) without target-language instructions",
          "Chat Vector (Huang et al. 2024), used by the LLAMMAS group's follow-up (EstLLM): adding the difference "
          "of the English instruct model and its base to the continually pretrained model gives it instruction "
          "following and safety without target-language SFT. Here the instruct model is the base tuned on the "
          "English instructions only; all three are asked in its chat layout.",
          [("cpt100_chat", "CPT 100%"), ("chatvec", "CPT 100% + chat vector"), ("sft100", "CPT 100% + SFT")],
          [QA_ET, MT_ET, ASR, FACTS_ET],
          ("cpt100_chat", "chatvec"),
          expected={QA_ET.label: 1, MT_ET.label: 1, ASR.label: -1}),
]


def headline_values(path: Path) -> dict:
    results = json.loads(path.read_text(encoding="utf-8"))
    return {(r["task"], r["metric"]): r["value"] for r in results["results"] if r.get("headline")}


def collect(out: Path, seeds: list[int]) -> dict:
    """{variant: {(task, metric): [value per seed]}} from every results.json under OUT/eval."""
    values: dict = {}
    for variant in {v for claim in CLAIMS for v, _ in claim.variants}:
        names = ["base"] if variant == "base" else [f"seed{s}_{variant}" for s in seeds]
        for name in names:
            path = out / "eval" / name / "results.json"
            if not path.exists():
                raise ValueError(f"{path}: missing (run without --report-only first)")
            for key, value in headline_values(path).items():
                values.setdefault(variant, {}).setdefault(key, []).append(value)
    return values


def mean_std(xs: list) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def cell(xs: list, digits: int = 3) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def verdict(diffs: list, expected: int) -> str:
    """'yes' when the mean difference has the expected sign; 'within noise' when it is not larger than the
    spread of the per-seed differences."""
    m, s = mean_std(diffs)
    if math.isnan(m):
        return "-"
    sign = "yes" if m * expected > 0 else "no"
    return sign + (" (within seed noise)" if len(diffs) > 1 and abs(m) <= s else "")


def metric_values(values: dict, variant: str, m: Metric, n: int) -> list:
    xs = values[variant].get((m.task, m.metric), [None])
    return xs * n if len(xs) == 1 and n > 1 else xs  # the shared base model: one value for every seed


def claim_table(claim: Claim, values: dict, n_seeds: int) -> tuple[str, list]:
    """The Markdown table of one claim and the bar-chart panels."""
    cols = [label for _, label in claim.variants]
    lines = ["| metric | " + " | ".join(cols) + " | difference | sign reproduced |",
             "|---|" + "---|" * (len(cols) + 2)]
    panels = []
    for m in claim.metrics:
        per_variant = [metric_values(values, v, m, n_seeds) for v, _ in claim.variants]
        if claim.compare[0] == "translation":
            (a, tr_a), (b, tr_b) = per_variant[:2], per_variant[2:]
            gain0 = [y - x for x, y in zip(a, tr_a)]
            gain100 = [y - x for x, y in zip(b, tr_b)]
            sign = 1 if m.higher_is_better else -1
            diff = f"TRTASK gain: {cell(gain0)} at CPT 0%, {cell(gain100)} at CPT 100%"
            reproduced = (f"helps at 0%: {verdict(gain0, sign)}; helps less after CPT: "
                          f"{verdict([g0 - g1 for g0, g1 in zip(gain0, gain100)], sign)}")
        else:
            keys, names = [v for v, _ in claim.variants], dict(claim.variants)
            reference = per_variant[keys.index(claim.compare[0])]
            expected = claim.expected.get(m.label, 1 if m.higher_is_better else -1)
            diffs, verdicts = [], []
            for other in claim.compare[1:]:
                d = [y - x for x, y in zip(reference, per_variant[keys.index(other)])]
                diffs.append(f"{names[other]} − {names[claim.compare[0]]}: {cell(d)}")
                verdicts.append(verdict(d, expected) if (claim.expected == {} or m.label in claim.expected)
                                else "(no claim)")
            diff = "; ".join(diffs)
            reproduced = verdicts[0] if len(verdicts) == 1 or verdicts[0] == "(no claim)" else "; ".join(
                f"{names[o].split(' + ')[-1]}: {v}" for o, v in zip(claim.compare[1:], verdicts))
            if claim.key == "cpt_budget":
                means = [mean_std(xs)[0] for xs in per_variant]
                ordered = all((b - a) * (1 if m.higher_is_better else -1) >= 0 for a, b in zip(means, means[1:]))
                reproduced += f"; monotone: {'yes' if ordered else 'no'}"
        arrow = {True: " ↑", False: " ↓", None: ""}[m.higher_is_better]
        lines.append(f"| {m.label}{arrow} | " + " | ".join(cell(xs) for xs in per_variant) + f" | {diff} | {reproduced} |")
        better = {True: " (higher is better)", False: " (lower is better)", None: ""}[m.higher_is_better]
        panels.append((m.label + better, cols,
                       [mean_std(xs)[0] for xs in per_variant], [mean_std(xs)[1] for xs in per_variant]))
    return "\n".join(lines) + "\n", panels


def read_timings(out: Path) -> dict:
    """OUT/timings.json of an earlier run ({} when there is none): each stage's seconds and total_s."""
    path = out / "timings.json"
    if not path.exists():
        return {}
    try:
        timings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged ({e}); delete it to count the stages' times afresh") from None
    if not isinstance(timings, dict):
        raise ValueError(f"{path}: must be a JSON object of each stage's seconds; delete it to count them afresh")
    return timings


def write_report(out: Path, opts: ReproduceOptions, seeds: list[int], timings: dict):
    values = collect(out, seeds)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    total = timings.get("total_s")
    sections = ["# The papers' findings in miniature\n",
                f"Written by `python scripts/reproduce.py{' --quick' if opts.quick else ''} --size {opts.size}` on "
                f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPU cores"
                + (f", in {total / 60:.1f} minutes" if total else "") + f". Seeds: {', '.join(map(str, seeds))} "
                "(mean ± standard deviation over seeds; the English base model is shared). Every number comes "
                "from training on the sample world (see its README, section \"What makes the papers' effects "
                "possible\"); the evaluation tasks are the world's, one prompt template each.\n",
                "A sign is reproduced when the mean difference points the way the paper says; \"within seed "
                "noise\" marks differences no larger than their spread over seeds. A claim that does not "
                "reproduce is reported as it came out.\n"]
    for i, claim in enumerate(CLAIMS, 1):
        table, panels = claim_table(claim, values, len(seeds))
        png = plots / f"{i}_{claim.key}.png"
        drawn = bar_chart(png, f"{i}. {claim.title}", panels)
        sections += [f"## {i}. {claim.title}\n", f"> {claim.paper}\n", table]
        if drawn:
            sections.append(f"![{claim.title}](plots/{png.name})\n")
    training = run_report([p for p in sorted((out / f"seed{seeds[0]}").iterdir()) if (p / "metrics.jsonl").exists()]
                          + [out / "base"], out / "training")
    sections.append(f"Training curves of seed {seeds[0]}'s runs: [{training.relative_to(out)}]"
                    f"({training.relative_to(out)}).\n")
    if not plots_available():
        sections.append(INSTALL_HINT.rstrip(".") + ", then `python scripts/reproduce.py --report-only`.\n")
    report = out / "report.md"
    atomic_write(report, "\n".join(sections))
    return report


# ============================================================================ main

@cli
def main(argv=None):
    opts = parse_options(ReproduceOptions, argv, prog="python scripts/reproduce.py", description=__doc__.split("\n\n")[0])
    out, size = Path(opts.out), SIZES[opts.size]
    seeds = list(range(1, 2 if opts.quick else opts.seeds + 1))
    if opts.report_only:
        print(f"report: {write_report(out, opts, seeds, read_timings(out))}")
        return
    stages = Stages(out, opts.resume)
    data = prepare(stages, out, size)
    base = train_base(stages, size, data, out)
    for seed in seeds:
        train_seed(stages, size, data, out, base, seed)
    # A resumed run's time includes what the skipped stages took before (timings.json of the earlier run).
    before = read_timings(out)
    earlier = {name: before[name] for name in stages.skipped if name in before}
    timings = {**earlier, **stages.timings, "total_s": round(time.time() - stages.t0 + sum(earlier.values()), 1)}
    atomic_write(out / "timings.json", to_json(timings))
    report = write_report(out, opts, seeds, timings)
    print(f"report: {report} ({timings['total_s'] / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
