"""End-to-end tests of train_pretrain.py: distributed == single process, resume == uninterrupted,
continuing a Hugging Face directory, training only the embeddings, the embeddings' own learning rate, bad
options. Each run is a real subprocess (python or torchrun).

    .venv/bin/python -m pytest -q tests/test_train_pretrain.py
"""
import json
import random
import signal
import time

import pytest
import torch
from conftest import build_pretrain_world, read_metrics, run_script

STEPS = 4
EMBEDDINGS = {"model.embed_tokens.weight", "lm_head.weight"}  # the input embedding and the output head (untied)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer and token shards for two "languages" (conftest.build_pretrain_world)."""
    return build_pretrain_world(tmp_path_factory.mktemp("pretrain"))


def run(world, out, *args, nproc=1, check=True, popen=False):
    return run_script("train_pretrain.py", [
        "--preset", "tiny", "--tokenizer", world / "tokenizer",
        "--data", f"et={world / 'et_train'},en={world / 'en_train'}", "--mixture", "et=0.75,en=0.25",
        "--valid-data", f"et={world / 'et_valid'}", "--seq-len", "32", "--max-steps", STEPS, "--warmup-steps", "2",
        "--lr", "1e-2", "--min-lr", "1e-3", "--eval-interval", "2", "--eval-tokens", "128", "--log-interval", "1",
        "--out-dir", out, *args], nproc=nproc, check=check, popen=popen)


metrics = read_metrics


def weights(model_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model" / "model.safetensors"))


def moved(before: dict, after: dict) -> set:
    """The tensors that are not bit-identical."""
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def single(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run(world, out, "--micro-batch-size", "4", "--grad-accum", "2")
    return out


def test_single_process_learns_and_exports(single):
    m = metrics(single)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    assert m[-1]["loss"] < m[0]["loss"]
    assert "val_loss_et" in m[1] and "val_bpb_et" in m[1] and m[1]["val_bpb_et"] > 0
    for key in ("tokens_seen", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gb"):
        assert key in m[0]
    assert (single / "model" / "config.json").exists() and (single / "model" / "tokenizer.model").exists()
    assert (single / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:07d}"
    assert not (single / "checkpoints" / ".tmp").exists()  # no empty temporary folders left behind
    assert all(0 < r["mfu"] <= 1 for r in m), [r["mfu"] for r in m]  # a share of this CPU's measured matmul peak
    state = json.loads((single / "model" / "training_state.json").read_text())
    assert state["step"] == STEPS and state["val_loss"] == pytest.approx(m[-1]["val_loss"])
    readme = (single / "README.md").read_text()
    assert "metrics.jsonl" in readme and "--resume" in readme and "evaluate.py" in readme


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_two_ranks_match_single_process(world, single, tmp_path, zero_stage):
    """Same global batch (2 ranks x 2 rows x 2 accumulation == 1 process x 4 rows x 2): same loss curve."""
    run(world, tmp_path, "--micro-batch-size", "2", "--grad-accum", "2", "--zero-stage", str(zero_stage),
        nproc=2)
    ref, got = metrics(single), metrics(tmp_path)
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5), (zero_stage, r["step"])
        assert g["tokens_seen"] == r["tokens_seen"]
    assert got[-1]["val_loss_et"] == pytest.approx(ref[-1]["val_loss_et"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--compile"], ["--activation-checkpointing", "selective"]],
                         ids=["compile", "checkpointing-selective"])
def test_compile_and_selective_checkpointing_under_zero3_match_single_process(world, single, tmp_path, args):
    """ZeRO-3 gathers each block's weights through module hooks, which then run around compiled code
    (--compile) or are replayed when a block is recomputed (selective checkpointing). Same global batch
    as the single process, 2 ranks: same loss curve."""
    run(world, tmp_path, "--micro-batch-size", "2", "--grad-accum", "2", "--zero-stage", "3", *args, nproc=2)
    assert [g["loss"] for g in metrics(tmp_path)] == pytest.approx([r["loss"] for r in metrics(single)], rel=1e-4)


@pytest.mark.parametrize("args", [["--attn", "math"], ["--attn", "sdpa"], ["--activation-checkpointing", "full"],
                                  ["--activation-checkpointing", "selective"]],
                         ids=["attn-math", "attn-sdpa", "checkpointing-full", "checkpointing-selective"])
def test_backends_and_checkpointing_give_the_same_loss_curve(world, single, tmp_path, args):
    """The reference run uses the automatic attention choice (sdpa on CPU); math attention and
    activation checkpointing change how, not what, is computed. (--compile: the ZeRO-3 test above.)"""
    run(world, tmp_path, "--micro-batch-size", "4", "--grad-accum", "2", *args)
    for r, g in zip(metrics(single), metrics(tmp_path)):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4), r["step"]


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(world, tmp_path):
    steps = "40"
    full = tmp_path / "full"
    run(world, full, "--max-steps", steps, "--micro-batch-size", "2", "--save-interval", "1000")
    part = tmp_path / "part"
    proc = run(world, part, "--max-steps", steps, "--micro-batch-size", "2", "--save-interval", "1000",
               popen=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # preempt once a few steps are logged
        if (part / "metrics.jsonl").exists() and len(metrics(part)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    stopped = len(metrics(part))
    assert stopped < int(steps), "the run finished before SIGTERM arrived"
    assert "SIGTERM" in output
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert not (part / "model").exists()  # no export from an interrupted run
    run(world, part, "--max-steps", steps, "--micro-batch-size", "2", "--save-interval", "1000", "--resume")
    resumed, ref = metrics(part), metrics(full)
    assert [r["step"] for r in resumed] == list(range(1, int(steps) + 1))
    for r, g in zip(ref, resumed):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7), r["step"]
        assert g["lr"] == r["lr"]


def test_continue_from_hf_directory_starts_at_its_loss(world, single, tmp_path):
    """--init-from an exported model: step 1's loss is that model's loss on the first batch."""
    from minillm.hf import load_pretrained
    from minillm.pretrain_data import PackedLoader, parse_sources

    run(world, tmp_path, "--init-from", str(single / "model"), "--tokenizer", "", "--micro-batch-size", "4",
        "--max-steps", "1", "--valid-data", "")
    model = load_pretrained(single / "model").eval()
    loader = PackedLoader(parse_sources(f"et={world / 'et_train'},en={world / 'en_train'}"),
                          {"et": 0.75, "en": 0.25}, seq_len=32, batch_size=4, seed=1337)
    batch = loader.next_batch()
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    expected = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), batch["labels"].flatten(),
                                                 ignore_index=-100).item()
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "100000"], "larger than the model's context"),
    (["--mixture", "et=-1,en=1"], "et=-1"),
    (["--mixture", "fr=1"], "fr"),
    (["--max-stepz", "3"], "unknown option --max-stepz"),
    (["--activation-checkpointing", "some"], "--activation-checkpointing 'some': choose one of none, selective, full"),
    (["--compile", "--zero-stage", "2"], "--compile gives wrong gradients with --zero-stage 2"),
    (["--embedding-lr", "-1"], "--embedding-lr -1.0: must be >= 0 (0 = --lr)"),
    (["--trainable", "head"], "--trainable 'head'"),
])
def test_bad_options_fail_with_one_clear_line(world, tmp_path, args, message):
    proc = run(world, tmp_path, *args, check=False)
    assert proc.returncode != 0
    assert message in (proc.stdout + proc.stderr)


def test_tokenizer_larger_than_the_model_fails_naming_both_sizes(world, single, tmp_path):
    from minillm.tokenizer import SentencePieceTokenizer

    rng = random.Random(1)
    lines = [" ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8))) for _ in range(20))
             for _ in range(2000)]
    big = SentencePieceTokenizer.train(iter(lines), tmp_path / "big", 900)
    big.save_pretrained(tmp_path / "bigtok")
    proc = run(world, tmp_path / "out", "--init-from", str(single / "model"), "--tokenizer", str(tmp_path / "bigtok"),
               check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "900" in last and "400" in last, last


@pytest.mark.slow
def test_validation_scores_every_token_once_whatever_the_split(world, tmp_path):
    """The validation before the first step (same weights): micro-batch 3, 4 and 16, one process or two
    ranks, the whole held-out set or a token budget: val_loss_et is the mean NLL over the scored tokens,
    equal to a direct float64 computation (rows of seq_len + 1 stream tokens cut into their documents,
    each document scored alone by the plain model, the first token of a document never a target)."""
    from minillm.hf import load_pretrained
    from minillm.pretrain_data import TokenShards

    run(world, tmp_path / "ref", "--micro-batch-size", "4", "--max-steps", "1", "--eval-tokens", "0")
    model = load_pretrained(tmp_path / "ref" / "model")  # any fixed weights will do: use them as init for all
    shards = TokenShards(world / "et_valid")
    stream = [int(t) for i in range(len(shards)) for t in shards.doc(i)]
    bos = int(stream[0])

    def oracle(budget):
        total = len(stream) if budget == 0 else min(len(stream), budget + 1)
        nll, count = 0.0, 0
        m = model.double().eval()
        with torch.no_grad():
            for start in range(0, total - 1, 32):
                row = stream[start:min(start + 33, total)]
                cuts = [0] + [i for i in range(1, len(row)) if row[i] == bos] + [len(row)]
                for a, b in zip(cuts, cuts[1:]):
                    seg = row[a:b]
                    if len(seg) > 1:
                        logp = torch.log_softmax(m(torch.tensor([seg]))[0, :-1], -1)
                        nll -= float(logp.gather(1, torch.tensor(seg[1:])[:, None]).sum())
                        count += len(seg) - 1
        return nll / count, count

    for budget, splits in ((0, (("mb3", 3, 1), ("mb16", 16, 1), ("two", 3, 2))), (100, (("mb4", 4, 1), ("two", 3, 2)))):
        want, count = oracle(budget)
        for name, mb, nproc in splits:
            out = tmp_path / f"{name}_{budget}"
            run(world, out, "--init-from", tmp_path / "ref" / "model", "--tokenizer", "", "--max-steps", "1",
                "--micro-batch-size", mb, "--eval-tokens", budget, "--valid-data", f"et={world / 'et_valid'}",
                *(["--zero-stage", "3"] if nproc > 1 else []), nproc=nproc)
            start = metrics(out, with_start=True)[0]
            assert start["step"] == 0 and start["val_tokens"] == count, (name, budget)
            assert start["val_loss_et"] == pytest.approx(want, rel=1e-6), (name, budget)


def continue_single(world, single, out, *args, nproc=1):
    """Continue the `single` run's exported model (every weight already trained a little) for a few steps."""
    return run(world, out, "--init-from", str(single / "model"), "--tokenizer", "", "--valid-data", "", "--max-steps",
               "3", *args, nproc=nproc)


@pytest.fixture(scope="module")
def embeddings_only(world, single, tmp_path_factory):
    out = tmp_path_factory.mktemp("embeddings_only")
    continue_single(world, single, out, "--trainable", "embeddings", "--micro-batch-size", "4", "--grad-accum", "2")
    return out


def test_trainable_embeddings_freezes_every_other_weight(single, embeddings_only):
    """After vocabulary extension the new rows are trained first: every other weight stays bit-identical."""
    assert moved(weights(single), weights(embeddings_only)) == EMBEDDINGS
    losses = [r["loss"] for r in metrics(embeddings_only)]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_trainable_embeddings_under_zero3_on_two_ranks_matches_single_process(world, single, embeddings_only, tmp_path):
    """ZeRO-3 partitions the frozen weights too: they still never change, and the loss curve is the single
    process's (same global batch: 2 ranks x 2 rows x 2 accumulation)."""
    continue_single(world, single, tmp_path, "--trainable", "embeddings", "--micro-batch-size", "2", "--grad-accum",
                    "2", "--zero-stage", "3", nproc=2)
    assert moved(weights(single), weights(tmp_path)) == EMBEDDINGS
    assert [g["loss"] for g in metrics(tmp_path)] == pytest.approx([r["loss"] for r in metrics(embeddings_only)],
                                                                   rel=1e-4)


@pytest.mark.parametrize("trainable", ["all", "embeddings"])
def test_embedding_lr_is_the_rate_of_the_embeddings_and_only_theirs(world, single, tmp_path, trainable):
    """Adam's first update of a weight is lr * g / (|g| + eps): each element moves by at most its group's lr, and
    the element with the largest gradient by that lr. One step, constant schedule, no weight decay: the largest
    move of the embedding and the head is --embedding-lr, of every other tensor --lr (0 when frozen)."""
    lr, embedding_lr = 1e-3, 4e-3
    continue_single(world, single, tmp_path, "--max-steps", "1", "--lr-schedule", "constant", "--warmup-steps", "0",
                    "--lr", str(lr), "--min-lr", str(lr), "--embedding-lr", str(embedding_lr), "--weight-decay", "0",
                    "--micro-batch-size", "4", "--trainable", trainable)
    before, after = weights(single), weights(tmp_path)
    for name in before:
        rate = embedding_lr if name in EMBEDDINGS else lr if trainable == "all" else 0.0
        largest_move = (after[name] - before[name]).abs().max().item()
        assert largest_move == pytest.approx(rate, rel=1e-2), name


def test_optimizer_groups_list_a_tied_matrix_once_and_freeze_the_rest():
    from minillm.engine import optimizer_groups, set_lr
    from minillm.model import Llama, LlamaConfig

    model = Llama(LlamaConfig.from_preset("tiny", tie_embeddings=True))
    groups = optimizer_groups(model, 0.1, "embeddings", embedding_lr_scale=3.0)
    assert [len(g["params"]) for g in groups] == [0, 0, 1] and groups[2]["params"][0] is model.output.weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["tok_embeddings.weight"]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=1.0)
    set_lr(optimizer, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [1.5]


def test_log_to_tensorboard_writes_the_same_scalars(world, tmp_path):
    pytest.importorskip("tensorboard")  # in the test extra: skipped only where it is not installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(world, tmp_path, "--log-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = metrics(tmp_path, with_start=True)  # the step-0 validation too
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "val_loss", "val_loss_et"} <= tags and "best" not in tags
    for tag in tags:
        expected = [(r["step"], r[tag]) for r in records if isinstance(r.get(tag), (int, float))]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag  # float32 in the file


def test_log_to_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from minillm.options import OptionError, parse_options
    from minillm.run_dir import TrainOptions
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(OptionError, match=r"^--log-to tensorboard needs the tensorboard package: "
                                          r"pip install 'minillm\[tensorboard\]'$"):
        parse_options(TrainOptions, ["--log-to", "tensorboard", "--out-dir", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--zero-stage", "2", "--offload", "optimizer"],
                                  ["--zero-stage", "3", "--offload", "optimizer+params"]],
                         ids=["zero2-optimizer", "zero3-optimizer+params"])
def test_offload_on_two_ranks_matches_single_process(world, single, tmp_path, args):
    """ZeRO-Offload keeps AdamW's state (and ZeRO-3's weight partitions) in CPU memory and steps there with the
    same torch AdamW, groups and rates: the same loss curve as one process holding everything."""
    run(world, tmp_path, "--micro-batch-size", "2", "--grad-accum", "2", *args, nproc=2)
    ref, got = metrics(single), metrics(tmp_path)
    assert [g["loss"] for g in got] == pytest.approx([r["loss"] for r in ref], rel=1e-4, abs=1e-5)
    assert got[-1]["val_loss_et"] == pytest.approx(ref[-1]["val_loss_et"], rel=1e-4)
