"""train_orpo.py --objective dpo|ipo|kto against TRL's DPOTrainer and KTOTrainer (one optimizer step from the same
tiny model on the same token ids: loss, every preference metric, every weight), the same run on 2 ranks with
ZeRO-2/3 and another micro-batch split, a bit-exact resume, and the stored reference log-probs' checks.

    .venv/bin/python -m pytest -q tests/test_preference.py
"""
import json
import random
import shutil

import pytest
import torch
from conftest import read_metrics, run_script
from safetensors.torch import load_file

COLOURS = {"red": "punane", "blue": "sinine", "green": "roheline", "black": "must", "white": "valge"}
ANIMALS = {"cat": "kass", "dog": "koer", "cow": "lehm", "bird": "lind", "fish": "kala"}
LR, BETA = 1e-3, 0.1


def pairs(rng, n):
    """Distinct prompts (so KTO's mismatched completion of example i is example i-1's, as TRL's rotation)."""
    out = []
    for c, a in rng.sample([(c, a) for c in COLOURS for a in ANIMALS], n):
        wrong = rng.choice([x for x in COLOURS if x != c])
        out.append({"prompt": f"Translate to Estonian: the {c} {a}", "chosen": f"{COLOURS[c]} {ANIMALS[a]}",
                    "rejected": f"{COLOURS[wrong]} {ANIMALS[a]}"})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("preference")
    records = pairs(random.Random(0), 23)
    tok = SentencePieceTokenizer.train(iter(json.dumps(r) for r in records * 4), root / "tok", 300)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)),
                    root / "init", tokenizer=tok)
    # 8 pairs: one step of DPO/IPO; KTO: the same 8 records, 4 desirable and 4 undesirable, unpaired
    (root / "pairs8.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    unpaired = [{"prompt": r["prompt"], "completion": r["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
                for i, r in enumerate(records[:8])]
    (root / "kto8.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:16]))
    (root / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[16:]))  # 7: padding on 2 ranks
    return root


def train(world, out, objective, *args, nproc=1, check=True):
    return run_script("train_orpo.py", [
        "--objective", objective, "--init-from", world / "init", "--seq-len", "64", "--log-interval", "1",
        "--beta", BETA, "--out-dir", out, *args], nproc=nproc, check=check)


# ----------------------------------------------------------------------------- TRL parity

def trl_two_steps(world, objective, tmp_path):
    """Two steps (two epochs of one batch) of TRL's DPOTrainer (loss_type sigmoid / ipo) or KTOTrainer on the ids minillm renders: TRL's
    tokenizer call is replaced by a lookup of those ids, so both trainers see identical prompt and completion
    tokens. Returns (the two losses, TRL's two logged metric records, the trained weights)."""
    import trl.trainer.dpo_trainer as trl_dpo
    import trl.trainer.kto_trainer as trl_kto
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.preference import load_kto_files
    from minillm.sft_data import load_preferences
    from minillm.tokenizer import load_tokenizer

    tok = load_tokenizer(world / "init")
    hf_tok = AutoTokenizer.from_pretrained(world / "init")
    eos = hf_tok.eos_token
    ids_of = {}  # TRL's text -> minillm's ids

    def split(ids, labels):
        start = next(i for i, t in enumerate(labels) if t != -100)
        return ids[:start], ids[start:]

    if objective == "kto":
        rows = []
        for i, ex in enumerate(load_kto_files([world / "kto8.jsonl"], tok, 64, report=lambda line: None)):
            prompt, completion = split(ex["ids"], ex["labels"])
            assert prompt == ex["prompt_ids"]
            ids_of[f"P{i}"], ids_of[f"P{i}C{i}{eos}"] = prompt, prompt + completion
            rows.append({"prompt": f"P{i}", "completion": f"C{i}", "label": ex["desirable"]})
        module, trainer_class, config_class = trl_kto, trl_kto.KTOTrainer, trl_kto.KTOConfig
        extra = {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    else:
        rows = []
        for i, (c_ids, c_labels, r_ids, r_labels) in enumerate(load_preferences(world / "pairs8.jsonl", tok, 64)[0]):
            (prompt, chosen), (prompt_r, rejected) = split(c_ids, c_labels), split(r_ids, r_labels)
            assert prompt == prompt_r
            ids_of[f"P{i}"], ids_of[f"P{i}C{i}{eos}"], ids_of[f"P{i}R{i}{eos}"] = prompt, prompt + chosen, prompt + rejected
            rows.append({"prompt": f"P{i}", "chosen": f"C{i}", "rejected": f"R{i}"})
        module, trainer_class, config_class = trl_dpo, trl_dpo.DPOTrainer, trl_dpo.DPOConfig
        extra = {"loss_type": ["sigmoid" if objective == "dpo" else "ipo"]}

    def lookup(processing_class, text, **kwargs):
        return {"input_ids": list(ids_of[text])}

    losses = []

    class Recording(trainer_class):  # the loss before HF's logging rounds it
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(loss.item())
            return loss

    original = module._tokenize
    module._tokenize = lookup
    try:
        config = config_class(
            output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=2, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
            weight_decay=0.0, max_grad_norm=1.0, beta=BETA, logging_steps=1, report_to=[], save_strategy="no",
            use_cpu=True, bf16=False, max_length=None, seed=0, dataloader_num_workers=0, disable_tqdm=True, **extra)
        model = AutoModelForCausalLM.from_pretrained(world / "init", dtype=torch.float32)
        trainer = Recording(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=hf_tok)
        trainer.train()
    finally:
        module._tokenize = original
    return losses, trainer.state.log_history[:2], {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto"])
def test_two_steps_equal_trl_trainer(world, tmp_path, objective):
    """Step 1 starts at the reference (rewards 0, KL 0); step 2 sees the policy after one update: loss, every
    preference metric TRL logs, and the weights after both updates agree."""
    data = world / ("kto8.jsonl" if objective == "kto" else "pairs8.jsonl")
    train(world, tmp_path / "ours", objective, "--train-data", data, "--valid-data", "", "--micro-batch-size", 8,
          "--epochs", 2, "--lr", LR, "--lr-schedule", "constant", "--warmup-steps", 0, "--weight-decay", 0,
          "--grad-clip", 1.0)
    ours = read_metrics(tmp_path / "ours")
    assert len(ours) == 2
    losses, theirs, trl_weights = trl_two_steps(world, objective, tmp_path)
    keys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]
    keys += ["kl"] if objective == "kto" else ["rewards/accuracies"]
    for step, (mine, loss, trl_metrics) in enumerate(zip(ours, losses, theirs), 1):
        assert mine["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
        for key in keys:
            assert mine[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), (step, key)
    assert abs(ours[1]["rewards/margins"]) > 1e-3  # the first update moved the policy away from the reference
    # The weights: every tensor's change over the two steps equals TRL's to 1e-4 in norm (seen: <= 1.1e-5), each
    # element to 1e-5 absolute, 1% of one step's size: where a gradient component is near Adam's eps (1e-8), the
    # update g / (|g| + eps) turns summation-order differences of g into visible ones.
    mine = load_file(str(tmp_path / "ours" / "model" / "model.safetensors"))
    initial = load_file(str(world / "init" / "model.safetensors"))
    assert mine.keys() <= trl_weights.keys()
    for name, value in mine.items():
        step_ours, step_trl = value - initial[name], trl_weights[name] - initial[name]
        assert step_trl.norm() > 0, name
        assert (step_ours - step_trl).norm() <= 1e-4 * step_trl.norm(), name
        torch.testing.assert_close(value, trl_weights[name], rtol=1e-5, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------- ranks, ZeRO, resume


@pytest.mark.slow
@pytest.mark.parametrize("objective, zero_stage", [("kto", 3), ("dpo", 2)])
def test_two_ranks_equal_one_process_and_a_resume_is_bit_exact(world, tmp_path, objective, zero_stage):
    """16 training pairs (KTO: 32 examples, 1 epoch; DPO: 2 epochs) in steps of 4 x 2 on one process and 2 x 2 x 2 ranks with ZeRO: the same metrics
    (validation at step 0, every 2 steps and at the end: 7 held-out pairs, padded differently); the one-process run
    stopped half-way and resumed (reading back its reference log-probs) gives exactly the same run."""
    data = world / "train.jsonl"
    epochs = 1 if objective == "kto" else 2  # 4 steps either way: KTO makes each pair two examples
    steps = epochs * (32 if objective == "kto" else 16) // 8
    stop = steps // 2  # checkpoints at stop and steps (two are kept)
    args = ["--train-data", data, "--valid-data", world / "valid.jsonl", "--epochs", epochs, "--lr", 3e-3,
            "--warmup-steps", 1, "--eval-interval", 2, "--save-interval", stop, "--grad-accum", 2]
    train(world, tmp_path / "one", objective, *args, "--micro-batch-size", 4)
    train(world, tmp_path / "two", objective, *args, "--micro-batch-size", 2, "--zero-stage", zero_stage, nproc=2)
    one, two = read_metrics(tmp_path / "one", with_start=True), read_metrics(tmp_path / "two", with_start=True)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(steps + 1))
    for x, y in zip(one, two):
        for key, value in x.items():
            # Up to step 1 the policy IS the reference: every reward is 0 up to float32 noise, and which side of a
            # tie the noise falls on decides rewards/accuracies. kl: a small difference of sums of log-probs ~ -18.
            if key.endswith("rewards/accuracies") and x["step"] <= 1:
                continue
            if key.startswith(("val_", "loss", "rewards/", "logps/", "kl")):
                assert y[key] == pytest.approx(value, rel=1e-4, abs=5e-5 if key.endswith("kl") else 1e-5), (x["step"], key)
    assert any(r.get("val_rewards/margins", 0) != 0 for r in one[1:])

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "one", part)
    shutil.rmtree(part / "model")
    for later in (part / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > stop:
            shutil.rmtree(later)
    (part / "checkpoints" / "latest").write_text(f"step_{stop:07d}")
    train(world, part, objective, *args, "--micro-batch-size", 4, "--resume")
    resumed = read_metrics(part, with_start=True)
    drop = ("tokens_per_s", "mfu", "peak_memory_gb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in one]
    # the export is the best validation loss's model: written again by the resumed run if that came after the stop
    if (part / "model").exists():
        w_one, w_part = (load_file(str(run / "model" / "model.safetensors")) for run in (tmp_path / "one", part))
        assert all(torch.equal(w_one[k], w_part[k]) for k in w_one)
