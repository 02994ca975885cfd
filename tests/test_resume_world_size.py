"""Resuming on another number of ranks, and multi-node runs: a checkpoint written by N ranks resumed by M
gives the losses and final weights of the uninterrupted run (ZeRO 0-3, pretraining and SFT); every refusal
on the way is one line naming the checkpoint; two simulated nodes equal one node with two ranks.

An interrupted run is made from an uninterrupted one: its copy with `latest` naming the step-6 checkpoint
and the later ones removed is exactly what a run preempted after step 6 leaves behind (the same files, the
same LR schedule over 12 steps).

    .venv/bin/python -m pytest -q tests/test_resume_world_size.py
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import build_pretrain_world, ROOT, read_metrics, run_script

STEPS, STOP = 12, 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer and token shards for two "languages" (conftest.build_pretrain_world)."""
    return build_pretrain_world(tmp_path_factory.mktemp("pretrain"))


def pretrain_args(world, out, *args) -> list:
    return ["--preset", "tiny", "--tokenizer", world / "tokenizer", "--data",
            f"et={world / 'et_train'},en={world / 'en_train'}", "--mixture", "et=0.75,en=0.25", "--valid-data", "",
            "--seq-len", "32", "--max-steps", STEPS, "--save-interval", STOP, "--warmup-steps", "2", "--lr", "1e-2",
            "--min-lr", "1e-3", "--weight-decay", "0.1", "--log-interval", "1", "--out-dir", out, *args]


def pretrain(world, out, *args, nproc=1, check=True):
    return run_script("train_pretrain.py", pretrain_args(world, out, *args), nproc=nproc, check=check)


def batch(ranks: int, micro: int, accum: int, zero: int) -> list:
    return ["--micro-batch-size", micro, "--grad-accum", accum, "--zero-stage", zero]


def interrupted_copy(run_dir, dest, step: int = STOP):
    """`run_dir` as a run preempted right after saving `step` leaves it: `latest` names step_N, no later
    checkpoint, no exported model."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "model")
    for later in (dest / "checkpoints").glob("step_*"):
        if int(later.name.removeprefix("step_")) > step:
            shutil.rmtree(later)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:07d}")
    return dest


def weights(run_dir) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_run(ref, got):
    """Per-step losses to the distributed tests' tolerance, and the final weights."""
    r, g = read_metrics(ref), read_metrics(got)
    assert [x["step"] for x in g] == list(range(1, STEPS + 1))
    for a, b in zip(r, g):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), a["step"]
        assert b.get("tokens_seen") == a.get("tokens_seen")
    w_ref, w_got = weights(ref), weights(got)
    assert w_ref.keys() == w_got.keys()
    for name in w_ref:
        torch.testing.assert_close(w_got[name], w_ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.fixture(scope="module")
def two_ranks_zero2(world, tmp_path_factory):
    """The reference: 12 steps on 2 ranks x micro-batch 2 x grad-accum 2, ZeRO-2, checkpoints at 6 and 12."""
    out = tmp_path_factory.mktemp("two_ranks_zero2") / "run"
    pretrain(world, out, *batch(2, 2, 2, 2), nproc=2)
    return out


def test_two_ranks_resumed_on_one_equals_uninterrupted(world, two_ranks_zero2, tmp_path):
    """ZeRO-2, 2 -> 1 rank with --grad-accum 4 (the same 8 rows per step): the shards are converted once
    into step_N/universal, `latest` still names step_N, the shards stay."""
    part = interrupted_copy(two_ranks_zero2, tmp_path / "part")
    proc = pretrain(world, part, *batch(1, 2, 4, 2), "--resume")
    assert "converting it to DeepSpeed's universal format" in proc.stdout
    assert_same_run(two_ranks_zero2, part)
    step6 = part / "checkpoints" / "step_0000006"
    assert (step6 / "universal" / "zero").is_dir() and not (step6 / ".universal.tmp").exists()
    assert (step6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()  # the original shards are kept
    assert json.loads((part / "checkpoints" / "step_0000012" / "trainer_state.json").read_text())["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, ranks, resumed_on, args", [
    (1, 1, 2, ["--trainable", "embeddings", "--init-from", "{trained}"]), (0, 2, 1, []),
    (3, 2, 1, ["--embedding-lr", "2e-2"])],
    ids=["zero1-1to2-frozen", "zero0-2to1", "zero3-2to1-embedding-lr"])
def test_resume_on_another_number_of_ranks_equals_uninterrupted(world, tmp_path, request, zero_stage, ranks,
                                                                 resumed_on, args):
    """1 -> 2 (ZeRO-1, every weight but the embeddings of an already trained model frozen), 2 -> 1 (ZeRO-0: its
    checkpoint is whole, nothing to convert; ZeRO-3, whose universal load needs minillm's repairs of DeepSpeed's
    reader: the embeddings' group has its own learning rate); 8 rows per step throughout."""
    if "{trained}" in args:  # the reference run's model: --trainable embeddings continues a trained model
        trained = request.getfixturevalue("two_ranks_zero2") / "model"
        args = [str(trained) if a == "{trained}" else a for a in args]
    full = tmp_path / "full"
    pretrain(world, full, *batch(ranks, 2, 4 // ranks, zero_stage), *args, nproc=ranks)
    part = interrupted_copy(full, tmp_path / "part")
    pretrain(world, part, *batch(resumed_on, 2, 4 // resumed_on, zero_stage), *args, "--resume", nproc=resumed_on)
    assert_same_run(full, part)
    assert (part / "checkpoints" / "step_0000006" / "universal").is_dir() == (zero_stage > 0)


@pytest.mark.slow
def test_zero3_two_ranks_resumed_on_four_with_universal_checkpoints_at_save(world, tmp_path):
    """2 -> 4 ranks under ZeRO-3 (micro-batch 2 -> 1: 4 rows per step); --universal-checkpoints converted at
    save, so the resume converts nothing."""
    full = tmp_path / "full"
    pretrain(world, full, *batch(2, 2, 1, 3), "--universal-checkpoints", nproc=2)
    assert (full / "checkpoints" / "step_0000006" / "universal" / "zero").is_dir()
    part = interrupted_copy(full, tmp_path / "part")
    proc = pretrain(world, part, *batch(4, 1, 1, 3), "--resume", nproc=4)
    assert "converting" not in proc.stdout
    assert_same_run(full, part)


# ----------------------------------------------------------------------------- refusals, one line each

def last_line(proc) -> str:
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


def test_another_global_batch_is_refused_naming_the_three_numbers(world, two_ranks_zero2, tmp_path):
    part = interrupted_copy(two_ranks_zero2, tmp_path / "part")
    line = last_line(pretrain(world, part, *batch(1, 2, 2, 2), "--resume", check=False))
    assert line == ("error: checkpoint step_0000006 was written by 2 ranks x micro-batch 2 x grad-accum 2 = 8 rows "
                    "per step; 1 rank x 2 x 2 = 4: use --grad-accum 4 to keep the global batch"), line
    assert not (part / "checkpoints" / "step_0000006" / "universal").exists()


def test_another_zero_stage_and_a_missing_rank_shard_are_refused(world, two_ranks_zero2, tmp_path):
    part = interrupted_copy(two_ranks_zero2, tmp_path / "part")
    step6 = part / "checkpoints" / "step_0000006"
    line = last_line(pretrain(world, part, *batch(1, 2, 4, 3), "--resume", check=False))
    assert line == (f"error: checkpoint {step6}: written with --zero-stage 2, this run uses --zero-stage 3; resume "
                    "with --zero-stage 2"), line
    (step6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    line = last_line(pretrain(world, part, *batch(1, 2, 4, 2), "--resume", check=False))
    assert line == (f"error: checkpoint {step6}: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing (the checkpoint "
                    "was written by 2 ranks; every rank's shard is needed)"), line


def test_an_interrupted_conversion_is_never_used_and_a_failed_one_leaves_the_checkpoint_as_it_was(
        world, two_ranks_zero2, tmp_path):
    """A conversion killed half-way leaves step_N/.universal.tmp: the next resume starts it afresh. A
    conversion that fails (a damaged shard) is one line; no universal copy appears, `latest` and the shards
    stay as they were."""
    part = interrupted_copy(two_ranks_zero2, tmp_path / "part")
    step6 = part / "checkpoints" / "step_0000006"
    shard = step6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    line = last_line(pretrain(world, part, *batch(1, 2, 4, 2), "--resume", check=False))
    assert line.startswith(f"error: checkpoint {step6}: cannot convert it to the universal format for 1 rank ("), line
    assert line.endswith("); the checkpoint itself is unchanged"), line
    assert not (step6 / "universal").exists() and not (step6 / ".universal.tmp").exists()
    assert (part / "checkpoints" / "latest").read_text() == "step_0000006"

    shard.write_bytes(good)
    (step6 / ".universal.tmp" / "universal" / "zero" / "norm.weight").mkdir(parents=True)  # a half-written copy
    (step6 / ".universal.tmp" / "universal" / "zero" / "norm.weight" / "fp32.pt").write_bytes(b"half")
    pretrain(world, part, *batch(1, 2, 4, 2), "--resume")
    assert_same_run(two_ranks_zero2, part)
    assert not (step6 / ".universal.tmp").exists()


# ----------------------------------------------------------------------------- SFT

@pytest.mark.slow
def test_sft_two_ranks_resumed_on_one_equals_uninterrupted(tmp_path):
    """SFT's steps are numbered slices of each epoch's seeded order; a step's rows depend only on the global
    batch, so 2 ranks x 2 x 2 and 1 rank x 2 x 4 train the same rows at every step. ZeRO-3, 2 epochs of 6 steps."""
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    rng = random.Random(0)
    colours, animals = ["red", "blue", "green", "black"], ["cat", "dog", "cow", "bird"]
    records = [{"instruction": "Translate to Estonian.", "input": f"the {rng.choice(colours)} {rng.choice(animals)}",
                "output": " ".join(rng.choice(["punane", "sinine", "kass", "koer", "lehm"]) for _ in range(3))}
               for _ in range(48)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = SentencePieceTokenizer.train(iter(json.dumps(r) for r in records * 4), tmp_path / "tok", 300)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)),
                    tmp_path / "init", tokenizer=tok)

    def sft(out, ranks, *args, check=True):
        return run_script("train_sft.py", [
            "--init-from", tmp_path / "init", "--train-data", tmp_path / "train.jsonl", "--valid-data", "",
            "--seq-len", "64", "--pack", "false", "--epochs", "2", "--warmup-steps", "1", "--lr", "3e-3",
            "--save-interval", STOP, "--log-interval", "1", "--out-dir", out, *batch(ranks, 2, 4 // ranks, 3),
            *args], nproc=ranks, check=check)

    full = tmp_path / "full"
    sft(full, 2)
    part = interrupted_copy(full, tmp_path / "part")
    sft(part, 1, "--resume")
    assert_same_run(full, part)


@pytest.mark.slow
def test_orpo_two_ranks_resumed_on_one_equals_uninterrupted(tmp_path):
    """ORPO's steps are slices of each epoch's seeded order of whole global batches of pairs: 2 ranks x 2 x 2
    and 1 rank x 2 x 4 take the same 8 pairs at every step. ZeRO-1, 2 epochs of 6 steps."""
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    rng = random.Random(0)
    colours = {"red": "punane", "blue": "sinine", "green": "roheline", "black": "must"}
    animals = {"cat": "kass", "dog": "koer", "cow": "lehm", "bird": "lind"}
    records = []
    for _ in range(48):
        c, a = rng.choice(list(colours)), rng.choice(list(animals))
        wrong = rng.choice([x for x in colours if x != c])
        records.append({"prompt": f"Translate to Estonian: the {c} {a}", "chosen": f"{colours[c]} {animals[a]}",
                        "rejected": f"{colours[wrong]} {animals[a]}"})
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = SentencePieceTokenizer.train(iter(json.dumps(r) for r in records * 4), tmp_path / "tok", 300)
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=64)),
                    tmp_path / "init", tokenizer=tok)

    def orpo(out, ranks, *args):
        return run_script("train_orpo.py", [
            "--init-from", tmp_path / "init", "--train-data", tmp_path / "prefs.jsonl", "--valid-data", "",
            "--seq-len", "64", "--epochs", "2", "--warmup-steps", "1", "--save-interval", STOP, "--log-interval", "1",
            "--out-dir", out, *batch(ranks, 2, 4 // ranks, 1), *args], nproc=ranks)

    full = tmp_path / "full"
    orpo(full, 2)
    part = interrupted_copy(full, tmp_path / "part")
    orpo(part, 1, "--resume")
    assert_same_run(full, part)


# ----------------------------------------------------------------------------- multi-node

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(world, tmp_path, node: int, port: int, out, *args):
    """Node `node` of two: a torchrun launcher of one process at a localhost c10d rendezvous, with its own
    environment and working directory (tmp_path/nodeK)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node-rank={node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=minillm-test",
           str(ROOT / "train_pretrain.py"), *map(str, pretrain_args(world, out, *batch(2, 2, 2, 2), *args))]
    home = tmp_path / f"node{node}"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_two_ranks(world, two_ranks_zero2, tmp_path):
    """Two torchrun launchers of one process each, meeting at a localhost c10d rendezvous, as two nodes do
    (each its own environment and working directory; the run directory is shared, as on a cluster's shared
    filesystem): the same run as `--standalone --nproc_per_node=2`. The checkpoint has both ranks' shards and
    RNG states and one trainer_state.json (global rank 0 writes it)."""
    out, port = tmp_path / "run", free_port()
    nodes = [launch_node(world, tmp_path, node, port, out) for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert_same_run(two_ranks_zero2, out)
    step6 = out / "checkpoints" / "step_0000006"
    assert sorted(p.name for p in step6.iterdir()) == sorted(p.name for p in (two_ranks_zero2 / "checkpoints" /
                                                                             "step_0000006").iterdir())
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_state_rank0.safetensors", "rng_state_rank1.safetensors", "trainer_state.json"} <= {
        p.name for p in step6.iterdir()}
    assert json.loads((step6 / "trainer_state.json").read_text())["world_size"] == 2


def test_zero3_decays_the_matrices_as_zero0_does(world, tmp_path):
    """Under ZeRO-3 the parameters are born partitioned (empty 1-d tensors until gathered): AdamW's groups
    must still be sorted by the real shapes, or no matrix is decayed and universal checkpoints restore the
    wrong settings. Two steps with a large weight decay: ZeRO-3's weights are ZeRO-0's."""
    for zero in (0, 3):
        pretrain(world, tmp_path / f"zero{zero}", "--max-steps", "2", "--weight-decay", "1.0",
                 *batch(1, 2, 1, zero))
    w0, w3 = weights(tmp_path / "zero0"), weights(tmp_path / "zero3")
    for name in w0:
        torch.testing.assert_close(w3[name], w0[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_two_nodes_without_a_shared_run_directory_fail_at_the_first_save(world, tmp_path):
    """Each node's --out-dir its own directory (a relative path from different working directories, as two
    nodes' local disks): rank 0 cannot see rank 1's shard, so the save fails with one line saying what the
    run directory must be, and no checkpoint is left."""
    port = free_port()
    nodes = [launch_node(world, tmp_path, node, port, "run", "--max-steps", "1") for node in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    assert "is --out-dir on a filesystem that every node shares?" in outputs[0], outputs[0][-3000:]
    assert not (tmp_path / "node0" / "run" / "checkpoints" / "step_0000001").exists()
