"""End-to-end tests of train_sft.py: gradient accumulation, packing, data parallelism (ZeRO-3),
best-checkpoint export with the chat template, curriculum stages, bad input. Real subprocesses.

    .venv/bin/python -m pytest -q tests/test_train_sft.py
"""
import json
import random

import pytest
import torch
from conftest import read_metrics, run_script

COLOURS = {"red": "punane", "blue": "sinine", "green": "roheline", "black": "must", "white": "valge",
           "yellow": "kollane"}
ANIMALS = {"cat": "kass", "dog": "koer", "cow": "lehm", "bird": "lind", "fish": "kala"}


def translation_records(rng, n, held_out=()):
    records = []
    while len(records) < n:
        c, a = rng.choice(list(COLOURS)), rng.choice(list(ANIMALS))
        if (c, a) in held_out:
            continue
        if rng.random() < 0.5:
            records.append({"instruction": "Translate to Estonian.", "input": f"the {c} {a}",
                            "output": f"{COLOURS[c]} {ANIMALS[a]}"})
        else:
            records.append({"messages": [{"role": "user", "content": f"Translate to Estonian: the {c} {a}"},
                                         {"role": "assistant", "content": f"{COLOURS[c]} {ANIMALS[a]}"}]})
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a tiny random model in Hugging Face layout, and instruction files."""
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    texts = [json.dumps(r) for r in translation_records(random.Random(2), 200)]
    tok = SentencePieceTokenizer.train(iter(texts), root / "tok", 400)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)
    save_pretrained(Llama(config), root / "init", tokenizer=tok)
    held_out = {("white", "fish")}
    for name, n in (("train", 48), ("valid", 8)):
        with open(root / f"{name}.jsonl", "w") as f:
            for r in translation_records(rng, n, held_out):
                f.write(json.dumps(r) + "\n")
    return root


def run(world, out, *args, nproc=1, check=True):
    return run_script("train_sft.py", [
        "--init-from", world / "init", "--train-data", world / "train.jsonl", "--valid-data", world / "valid.jsonl",
        "--seq-len", "96", "--epochs", "1", "--warmup-steps", "1", "--lr", "3e-3", "--log-interval", "1",
        "--out-dir", out, *args], nproc=nproc, check=check)


metrics = read_metrics


def test_accumulation_4x1_equals_batch_1x4(world, tmp_path):
    """Same items per optimizer step, same loss (a mean over response tokens of the whole step)."""
    run(world, tmp_path / "a", "--micro-batch-size", "4", "--grad-accum", "1", "--pack", "false")
    run(world, tmp_path / "b", "--micro-batch-size", "1", "--grad-accum", "4", "--pack", "false")
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a) == len(b) == 12
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y["response_tokens"] == x["response_tokens"]


def test_packed_and_unpacked_give_the_same_loss(world, tmp_path):
    """One step over the whole epoch: packed rows hold the same response tokens as unpacked ones."""
    run(world, tmp_path / "packed", "--micro-batch-size", "64", "--pack", "true")
    run(world, tmp_path / "plain", "--micro-batch-size", "64", "--pack", "false")
    p, u = metrics(tmp_path / "packed")[0], metrics(tmp_path / "plain")[0]
    assert p["response_tokens"] == u["response_tokens"]
    assert p["loss"] == pytest.approx(u["loss"], rel=1e-5)
    assert p["val_loss"] == pytest.approx(u["val_loss"], rel=1e-5)


def test_loss_is_the_token_mean_over_all_responses(world, tmp_path):
    """Step 1's loss (one step = the whole epoch) == mean NLL over every response token, computed
    independently with the plain model and F.cross_entropy in float64."""
    import torch.nn.functional as F

    from minillm.chat_format import render
    from minillm.hf import load_pretrained
    from minillm.sft_data import load_sft_jsonl
    from minillm.tokenizer import load_tokenizer

    run(world, tmp_path, "--micro-batch-size", "64")
    model, tok = load_pretrained(world / "init").double(), load_tokenizer(world / "init")
    nll, count = 0.0, 0
    with torch.no_grad():
        for record in load_sft_jsonl(world / "train.jsonl"):
            ids, mask = render(record, tok)
            logits = model(torch.tensor([ids]))[0, :-1]
            targets = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            nll += F.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += int(keep.sum())
    first = metrics(tmp_path)[0]
    assert first["response_tokens"] == count
    assert first["loss"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.slow
def test_zero3_two_ranks_match_single_process(world, tmp_path):
    run(world, tmp_path / "one", "--micro-batch-size", "4", "--pack", "false")
    run(world, tmp_path / "two", "--micro-batch-size", "2", "--pack", "false", "--zero-stage", "3", nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two)
    for x, y in zip(one, two):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), x["step"]
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-4)


def test_stages_best_export_and_chat_template(world, tmp_path):
    """Two sequential stages in one command; the exported model carries the chat template, and
    transformers' apply_chat_template reproduces the prompt the model was trained with."""
    from transformers import AutoTokenizer

    from minillm.chat_format import render
    from minillm.tokenizer import load_tokenizer

    out = tmp_path / "run"
    train = world / "train.jsonl"
    run(world, out, "--train-data", f"{train};{train}", "--epochs", "2", "--micro-batch-size", "8")
    m = metrics(out)
    assert {r["stage"] for r in m} == {1, 2} and {r["epoch"] for r in m} == {1, 2}
    vals = [r["val_loss"] for r in m if "val_loss" in r]
    assert len(vals) == 4  # end of every epoch of every stage
    best = [r for r in m if r.get("best")]
    assert best and best[-1]["val_loss"] == min(vals)
    model_dir = out / "model"
    assert (model_dir / "model.safetensors").exists()
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    messages = [{"role": "user", "content": "Translate to Estonian: the red cat"},
                {"role": "assistant", "content": "punane kass"}]
    ids, _ = render(messages, tok, template="tulu")
    assert hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False) == list(ids)


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Translate."}, "output"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
])
def test_bad_records_fail_with_file_and_line(world, tmp_path, record, message):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(translation_records(random.Random(1), 1)[0])
    bad.write_text(good + "\n" + json.dumps(record) + "\n")
    proc = run(world, tmp_path / "out", "--train-data", str(bad), check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()[-1]
    assert f"{bad}:2" in err and message in err


@pytest.mark.slow
def test_fine_tuned_tiny_model_answers_a_held_out_instruction(world, tmp_path):
    """Fine-tune a random tiny model on "The <animal> is <colour>. What colour is the <animal>?"
    (both formats) with the white fish held out: it must answer the unseen instruction."""
    from minillm.chat_format import render
    from minillm.generate import generate
    from minillm.hf import load_pretrained, save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import load_tokenizer

    rng = random.Random(3)
    records = []
    while len(records) < 300:
        c, a = rng.choice(list(COLOURS)), rng.choice(list(ANIMALS))
        if (c, a) != ("white", "fish"):
            question = f"The {a} is {c}. What colour is the {a}?"
            records.append({"instruction": question, "input": "", "output": c} if rng.random() < 0.5 else
                           {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": c}]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = load_tokenizer(world / "init")
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128)),
                    tmp_path / "init", tokenizer=tok)
    run(world, tmp_path / "run", "--init-from", str(tmp_path / "init"), "--train-data", str(data),
        "--valid-data", "", "--epochs", "30", "--micro-batch-size", "16", "--warmup-steps", "5",
        "--min-lr", "3e-4", "--log-interval", "50")
    model = load_pretrained(tmp_path / "run" / "model")
    tok = load_tokenizer(tmp_path / "run" / "model")
    prompt, _ = render([{"role": "user", "content": "The fish is white. What colour is the fish?"}], tok,
                       add_generation_prompt=True)
    reply = tok.decode(generate(model, [prompt], max_new_tokens=10, eos_id=tok.eos_id)[0])
    assert reply.strip() == "white"


@pytest.mark.slow
def test_validation_scores_every_example_once_whatever_the_split(world, tmp_path):
    """The validation before the first step (same weights) on 10 held-out records: micro-batch 3, 4, 16,
    packed or not, one process or two ranks: val_loss is the mean NLL over every response token of every
    record, equal to a direct float64 computation."""
    import torch.nn.functional as F

    from minillm.chat_format import render
    from minillm.hf import load_pretrained
    from minillm.sft_data import load_sft_jsonl
    from minillm.tokenizer import load_tokenizer

    valid = tmp_path / "valid10.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in translation_records(random.Random(7), 10)))
    train = tmp_path / "train16.jsonl"
    train.write_text("".join(line + "\n" for line in (world / "train.jsonl").read_text().splitlines()[:16]))
    model, tok = load_pretrained(world / "init").double().eval(), load_tokenizer(world / "init")
    nll, count = 0.0, 0
    with torch.no_grad():
        for record in load_sft_jsonl(valid):
            ids, mask = render(record, tok)
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            logits = model(torch.tensor([ids]))[0, :-1]
            nll += F.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep], reduction="sum").item()
            count += int(keep.sum())
    splits = {"mb3": ["--micro-batch-size", "3"], "mb4-unpacked": ["--micro-batch-size", "4", "--pack", "false"],
              "mb16": ["--micro-batch-size", "16"]}
    for name, args in splits.items():
        run(world, tmp_path / name, "--train-data", train, "--valid-data", valid, *args)
    run(world, tmp_path / "two", "--train-data", train, "--valid-data", valid, "--micro-batch-size", "3",
        "--zero-stage", "3", nproc=2)
    for name in [*splits, "two"]:
        start = metrics(tmp_path / name, with_start=True)[0]
        assert start["step"] == 0 and start["val_tokens"] == count, name
        assert start["val_loss"] == pytest.approx(nll / count, rel=1e-6), name


def test_the_last_step_is_validated_and_the_export_names_its_step(world, tmp_path):
    """--eval-interval 5 over 12 steps: steps 5, 10 and the last one (12) are validated; the exported model
    is the best of them, and the closing line and model/training_state.json say which step it is."""
    proc = run(world, tmp_path, "--micro-batch-size", "4", "--pack", "false", "--eval-interval", "5")
    m = metrics(tmp_path)
    validated = [r["step"] for r in m if "val_loss" in r]
    assert validated == [5, 10, 12]
    best = min((r for r in m if "val_loss" in r), key=lambda r: r["val_loss"])
    state = json.loads((tmp_path / "model" / "training_state.json").read_text())
    assert state["step"] == best["step"] and state["val_loss"] == pytest.approx(best["val_loss"])
    assert f"exported {tmp_path / 'model'} (Hugging Face layout): step {best['step']}, the best val_loss " \
           f"{best['val_loss']:.4f}" in proc.stdout
    assert best["step"] == 12  # the loss is still falling: the last step is the best one, and it was exported


def test_the_initial_model_takes_part_in_best(world, tmp_path):
    """--lr 10 makes every step worse than the initial model on validation: the export is the initial weights
    (bit-identical to --init-from), said; with --initial-can-be-best false it is the best trained step, with the
    note that it did not improve on the start."""
    from safetensors.torch import load_file
    proc = run(world, tmp_path / "a", "--micro-batch-size", "16", "--lr", "10", "--min-lr", "1")
    m = metrics(tmp_path / "a", with_start=True)
    assert m[0]["step"] == 0 and m[0]["best"] and all(r["val_loss"] > m[0]["val_loss"] for r in m[1:] if "val_loss" in r)
    assert f"no step improved on the initial model's val_loss {m[0]['val_loss']:.4f}: exported the initial weights " \
           f"(step 0) to {tmp_path / 'a' / 'model'}" in proc.stdout
    exported, initial = load_file(str(tmp_path / "a" / "model" / "model.safetensors")), \
        load_file(str(world / "init" / "model.safetensors"))
    assert exported.keys() == initial.keys() and all(torch.equal(exported[k], initial[k]) for k in initial)
    assert json.loads((tmp_path / "a" / "model" / "training_state.json").read_text())["step"] == 0
    proc = run(world, tmp_path / "b", "--micro-batch-size", "16", "--lr", "10", "--min-lr", "1",
               "--initial-can-be-best", "false")
    m = metrics(tmp_path / "b", with_start=True)
    best = min((r for r in m[1:] if "val_loss" in r), key=lambda r: r["val_loss"])
    assert "best" not in m[0] and f"step {best['step']}, the best val_loss {best['val_loss']:.4f}; no step " \
        f"improved on the initial model's val_loss {m[0]['val_loss']:.4f}" in proc.stdout


def test_a_tokenizer_json_model_trains_and_aligns_in_its_own_layout(world, tmp_path):
    """A Qwen2-style model (tokenizer.json only, no BOS, ChatML markers): SFT with --template auto renders in
    ChatML and exports its Jinja twin; ORPO from that export picks the same layout from the chat template;
    transformers' apply_chat_template on the exports gives the ids the model was trained on."""
    from transformers import AutoTokenizer

    from minillm.chat_format import chat_template_jinja, render
    from minillm.hf import save_pretrained
    from minillm.hf_tokenizer import HFTokenizer
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import load_tokenizer

    from conftest import write_qwen2_tokenizer

    texts = [json.dumps(r) for r in translation_records(random.Random(2), 300)]
    tok = load_tokenizer(write_qwen2_tokenizer(tmp_path / "tok", texts, vocab_size=400))
    assert isinstance(tok, HFTokenizer) and tok.bos_id is None
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=128, bos_id=tok.bos_id,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id)
    save_pretrained(Llama(config), tmp_path / "init", tokenizer=tok)
    assert not (tmp_path / "init" / "tokenizer.model").exists()
    proc = run(world, tmp_path / "sft", "--init-from", tmp_path / "init", "--micro-batch-size", "8")
    assert "template: chatml" in proc.stdout
    sft = load_tokenizer(tmp_path / "sft" / "model")
    assert sft.chat_template == chat_template_jinja("chatml", tok)
    messages = [{"role": "user", "content": "Translate to Estonian: the red cat"},
                {"role": "assistant", "content": "punane kass"}]
    ids, _ = render(messages, sft, template="chatml")
    assert ids[0] == tok.marker_id("<|im_start|>")  # no BOS
    assert AutoTokenizer.from_pretrained(tmp_path / "sft" / "model").apply_chat_template(
        messages, tokenize=True, return_dict=False) == ids
    # transformers and vLLM stop where the model learned to end a reply: at <|im_end|>
    from transformers import GenerationConfig
    im_end = tok.marker_id("<|im_end|>")
    assert im_end in json.loads((tmp_path / "sft" / "model" / "config.json").read_text())["eos_token_id"]
    assert im_end in GenerationConfig.from_pretrained(tmp_path / "sft" / "model").eos_token_id

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Translate to Estonian: the {c} cat", "chosen": f"{e} kass",
                                         "rejected": "must koer"}) + "\n" for c, e in COLOURS.items()) * 2)
    proc = run_script("train_orpo.py", ["--init-from", tmp_path / "sft" / "model", "--train-data", prefs,
                                        "--valid-data", "", "--seq-len", "96", "--micro-batch-size", "4",
                                        "--warmup-steps", "1", "--log-interval", "1", "--out-dir", tmp_path / "orpo"])
    assert "template: chatml" in proc.stdout
    assert load_tokenizer(tmp_path / "orpo" / "model").chat_template == sft.chat_template
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(tmp_path / "orpo"))
