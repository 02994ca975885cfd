"""End-to-end tests of train_orpo.py: the one concatenated pass on the real model, ORPO raising reward
accuracy, ZeRO-3 on 2 ranks == 1 process, exact validation on any split, and bad preference data. Real
subprocesses.

    .venv/bin/python -m pytest -q tests/test_train_orpo.py
"""
import json
import math
import random
import re

import pytest
import torch
from conftest import read_metrics, run_script

COLOURS = {"red": "punane", "blue": "sinine", "green": "roheline", "black": "must", "white": "valge"}
ANIMALS = {"cat": "kass", "dog": "koer", "cow": "lehm", "bird": "lind", "fish": "kala"}


def preference_records(rng, n):
    """chosen: the right Estonian phrase; rejected: a wrong colour (a wrong fact)."""
    out = []
    for _ in range(n):
        c, a = rng.choice(list(COLOURS)), rng.choice(list(ANIMALS))
        wrong = rng.choice([x for x in COLOURS if x != c])
        prompt = f"Translate to Estonian: the {c} {a}"
        if rng.random() < 0.5:
            prompt = [{"role": "user", "content": prompt}]
        out.append({"prompt": prompt, "chosen": f"{COLOURS[c]} {ANIMALS[a]}",
                    "rejected": {"role": "assistant", "content": f"{COLOURS[wrong]} {ANIMALS[a]}"}})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("orpo")
    rng = random.Random(0)
    records = preference_records(rng, 80)
    tok = SentencePieceTokenizer.train(iter(json.dumps(r) for r in records), root / "tok", 400)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)),
                    root / "init", tokenizer=tok)
    for name, recs in (("train", records[:64]), ("valid", records[64:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def run(world, out, *args, nproc=1, check=True):
    return run_script("train_orpo.py", [
        "--init-from", world / "init", "--train-data", world / "train.jsonl", "--valid-data", world / "valid.jsonl",
        "--seq-len", "96", "--warmup-steps", "1", "--log-interval", "1", "--out-dir", out, *args],
        nproc=nproc, check=check)


metrics = read_metrics


def test_one_concatenated_pass_equals_two_passes(world):
    """Log-probs and gradients of the [chosen; rejected] batch equal those of two separate passes."""
    from minillm.hf import load_pretrained
    from minillm.losses import split_pairs, token_logprobs
    from minillm.sft_data import load_preferences, pair_batch
    from minillm.tokenizer import load_tokenizer

    model = load_pretrained(world / "init")
    tok = load_tokenizer(world / "init")
    pairs, _ = load_preferences(world / "train.jsonl", tok, 96)
    batch = pair_batch(pairs, [0, 1, 2], nll_on_prompt=False, pad_id=tok.pad_id)

    def logps(b):
        hidden = model.hidden_states(b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"])
        return token_logprobs(hidden, model.output.weight, b["labels"])

    joint = logps(batch)
    joint.sum().backward()
    grads_joint = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    halves = [{k: split_pairs(v)[i] for k, v in batch.items() if k != "pair_mask"} for i in (0, 1)]
    separate = [logps(h) for h in halves]
    (separate[0].sum() + separate[1].sum()).backward()
    torch.testing.assert_close(joint, torch.cat(separate), rtol=1e-5, atol=1e-6)
    for g_joint, p in zip(grads_joint, model.parameters()):
        torch.testing.assert_close(g_joint, p.grad, rtol=1e-4, atol=1e-6)
    # The response mask covers exactly each reply and its EOS, identically for the two renderings.
    chosen_mask, rejected_mask = split_pairs(batch["response_mask"])
    assert chosen_mask.any(1).all() and rejected_mask.any(1).all()
    assert torch.equal(batch["response_mask"], batch["labels"] != -100)  # default: NLL on responses only
    # --nll-on-prompt (TRL's choice): the NLL labels also cover the prompt, the odds ratio still not.
    with_prompt = pair_batch(pairs, [0, 1, 2], nll_on_prompt=True, pad_id=tok.pad_id)
    assert torch.equal(with_prompt["response_mask"], batch["response_mask"])
    scored = with_prompt["labels"] != -100
    assert (scored >= batch["response_mask"]).all() and scored.sum() > batch["response_mask"].sum()
    real = with_prompt["input_ids"][:, 1:][scored[:, :-1]]
    assert torch.equal(with_prompt["labels"][:, :-1][scored[:, :-1]], real)  # labels are the next tokens


def test_orpo_raises_reward_accuracy_and_exports(world, tmp_path):
    proc = run(world, tmp_path, "--epochs", "6", "--micro-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
               "--eval-interval", "24")
    # The log holds what a person needs: no warnings, no progress bar when stdout is not a terminal.
    assert proc.stderr == "", proc.stderr
    known = re.compile(r"(template: \w+|.*: \d+ pairs.*|attention: .*|step +\d+/\d+ +\| .*|exported .*)")
    assert all(known.fullmatch(line) for line in proc.stdout.splitlines()), proc.stdout
    m = metrics(tmp_path, with_start=True)
    start, end = m[0], m[-1]
    assert start["step"] == 0 and "val_reward_accuracy" in start
    assert end["val_reward_accuracy"] >= 0.9 and end["val_reward_accuracy"] > start["val_reward_accuracy"]
    assert end["val_margin"] > start["val_margin"]
    for key in ("loss", "nll", "or_loss", "log_odds", "chosen_logps", "rejected_logps", "reward_accuracy",
                "margin", "chosen_length", "rejected_length", "grad_norm", "lr"):
        assert key in end and end[key] == end[key], key  # present and not NaN
    assert (tmp_path / "model" / "model.safetensors").exists()
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(world, tmp_path):
    run(world, tmp_path / "one", "--epochs", "1", "--micro-batch-size", "4", "--eval-interval", "1000")
    run(world, tmp_path / "two", "--epochs", "1", "--micro-batch-size", "2", "--zero-stage", "3",
        "--eval-interval", "1000", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) > 2
    for x, y in zip(one, two):
        for key in ("loss", "nll", "or_loss", "reward_accuracy", "margin", "chosen_length"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


@pytest.mark.slow
def test_selective_checkpointing_and_compile_give_the_same_curve(world, tmp_path):
    """ORPO backpropagates through per-token log-probs (token_logprobs), not a fused scalar loss:
    recomputed and compiled blocks must give the same metrics there too."""
    args = ["--epochs", "1", "--micro-batch-size", "4", "--eval-interval", "1000"]
    run(world, tmp_path / "plain", *args)
    run(world, tmp_path / "lean", *args, "--activation-checkpointing", "selective", "--compile")
    plain, lean = metrics(tmp_path / "plain"), metrics(tmp_path / "lean")
    assert len(plain) == len(lean) > 2
    for x, y in zip(plain, lean):
        for key in ("loss", "nll", "or_loss", "margin"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_max_steps_ends_the_run_and_its_schedule_early(world, tmp_path):
    """--max-steps 3 of 6 epochs: three steps, the linear schedule (warmup 1) decaying over those three: 1e-3,
    1e-3, then halfway to --min-lr 1e-4."""
    run(world, tmp_path, "--epochs", "6", "--micro-batch-size", "8", "--max-steps", "3", "--lr", "1e-3", "--min-lr",
        "1e-4", "--valid-data", "")
    assert [(r["step"], r["lr"]) for r in metrics(tmp_path)] == [(1, 1e-3), (2, 1e-3), (3, pytest.approx(5.5e-4))]
    assert json.loads((tmp_path / "model" / "training_state.json").read_text())["step"] == 3


def test_bad_pairs(world, tmp_path):
    good = preference_records(random.Random(5), 12)
    same = dict(good[0], rejected=good[0]["chosen"])
    long_prompt = dict(good[1], prompt="Translate to Estonian: " + "the red cat " * 60)
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good + [same, long_prompt]))
    proc = run(world, tmp_path / "mixed", "--train-data", str(data), "--valid-data", "", "--micro-batch-size", "4")
    assert "12 pairs" in proc.stdout and "dropped_identical 1" in proc.stdout and "dropped_no_room 1" in proc.stdout
    assert all(r["loss"] == r["loss"] for r in metrics(tmp_path / "mixed"))  # no NaN
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(good[0]) + "\n" + json.dumps(dict(good[1], chosen="")) + "\n")
    proc = run(world, tmp_path / "e", "--train-data", str(empty), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{empty}:2" in last and "chosen" in last


# ----------------------------------------------------------------------------- exact validation


def float64_orpo_metrics(world, valid_file, beta=0.1):
    """The ORPO validation metrics of the initial model, computed directly: every pair rendered with the chat
    template, scored by the plain model in float64 (full logits, log_softmax), averaged once."""
    from minillm.chat_format import render
    from minillm.files import read_jsonl
    from minillm.hf import load_pretrained
    from minillm.sft_data import preference_parts
    from minillm.tokenizer import load_tokenizer

    model = load_pretrained(world / "init").double().eval()
    tok = load_tokenizer(world / "init")
    per_pair, nll, n_tokens = [], 0.0, 0
    with torch.no_grad():
        for _, record in read_jsonl(valid_file):
            messages, chosen, rejected = preference_parts(record)
            sides = []
            for reply in (chosen, rejected):
                ids, mask = render(messages + [{"role": "assistant", "content": reply}], tok, train_on="last")
                logp = torch.log_softmax(model(torch.tensor([ids]))[0, :-1], -1)
                picked = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                scored = torch.tensor(mask[1:], dtype=torch.bool)  # targets: the reply and its EOS
                sides.append((float(picked[scored].mean()), int(scored.sum()), float(-picked[scored].sum())))
            (a, len_a, nll_a), (b, len_b, _) = sides
            log_odds = (a - b) - (math.log1p(-math.exp(a)) - math.log1p(-math.exp(b)))
            per_pair.append({"or_loss": -math.log(1 / (1 + math.exp(-log_odds))), "log_odds": log_odds,
                             "chosen_logps": a, "rejected_logps": b, "reward_accuracy": float(a > b),
                             "margin": a - b, "chosen_length": len_a, "rejected_length": len_b})
            nll, n_tokens = nll + nll_a, n_tokens + len_a
    out = {f"val_{k}": sum(p[k] for p in per_pair) / len(per_pair) for k in per_pair[0]}
    out["val_nll"] = nll / n_tokens
    out["val_loss"] = out["val_nll"] + beta * out["val_or_loss"]
    out["val_pairs"] = len(per_pair)
    return out


@pytest.mark.slow
def test_validation_scores_every_pair_once_with_exact_means(world, tmp_path):
    """10 held-out pairs, micro-batch 3, 4 and 16 on one process and 3 on two ranks: the validation before
    the first step (same weights) scores each pair exactly once and every metric is the mean it names,
    equal to a direct float64 computation (per pair for per-pair quantities, per token for the NLL)."""
    records = [json.loads(line) for line in (world / "valid.jsonl").read_text().splitlines()]
    records += preference_records(random.Random(9), 10 - len(records))
    valid = tmp_path / "valid10.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in records[:10]))
    train = tmp_path / "train16.jsonl"
    train.write_text("".join(line + "\n" for line in (world / "train.jsonl").read_text().splitlines()[:16]))
    want = float64_orpo_metrics(world, valid)
    assert want["val_pairs"] == 10
    runs = {"mb3": ([], 1), "mb4": ([], 1), "mb16": ([], 1), "2 ranks mb3": (["--zero-stage", "3"], 2)}
    for name, (extra, nproc) in runs.items():
        mb = name.split("mb")[1]
        run(world, tmp_path / name.replace(" ", "_"), "--train-data", train, "--valid-data", valid,
            "--micro-batch-size", "8" if mb == "16" else mb, *extra, nproc=nproc)  # 8: 16 training pairs = 1 step
        start = metrics(tmp_path / name.replace(" ", "_"), with_start=True)[0]
        assert start["step"] == 0
        for key, value in want.items():
            assert start[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, key)
