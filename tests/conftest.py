"""Shared test helpers: running the scripts as real subprocesses, reading their metrics, and a small chat
tokenizer (sentencepiece, with the chat markers) for the template and SFT-data tests."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, args: list, nproc: int = 1, check: bool = True, popen: bool = False):
    """`python SCRIPT ARGS` (one process) or `torchrun --standalone --nproc_per_node=N SCRIPT ARGS`."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc > 1 else [sys.executable])
    cmd += [str(ROOT / script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(out_dir, with_start: bool = False) -> list[dict]:
    """The JSON lines a run wrote to OUT_DIR/metrics.jsonl: one per optimizer step (with_start: also the step-0
    record, the validation before the first step)."""
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if with_start or r["step"] > 0]


# Words and a conversation the chat tests render (the tokenizer below is trained on the words).
WORDS = ("the red cat dog Translate to Estonian English punane kass koer Mari elab Kivilas Kus tere maailm "
         "kõik hästi õun äri öö šokolaad žürii Below is an instruction that describes a task Write response "
         "appropriately completes request Instruction Input Response paired with provides further context "
         "And What colour has three cows Maril on kolm lehma").split()

THREE_TURNS = [
    {"role": "system", "content": "Ole abivalmis."},
    {"role": "user", "content": "Translate to Estonian: the red cat"},
    {"role": "assistant", "content": "punane kass"},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "koer"},
    {"role": "user", "content": "Kus elab Mari?"},
    {"role": "assistant", "content": "Mari elab Kivilas."},
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from minillm.tokenizer import Tokenizer
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + rng.choice([".", "?", "!", ":", " ###"])
             for _ in range(3000)]
    return Tokenizer.train(iter(lines), tmp_path_factory.mktemp("tok") / "sp", 400)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small sample world (demo/sample_world.py), a tokenizer trained on it, its token shards, a random tiny
    model in Hugging Face layout and a finished 2-step pretraining run with checkpoints: inputs for the
    fault and bad-input tests."""
    sys.path.insert(0, str(ROOT / "demo"))
    import sample_world

    from minillm.files import iter_texts
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.prepare import prepare
    from minillm.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("tiny_world")
    sample_world.write_sample_world(root / "data", seed=0, scale=0.02)
    texts = list(iter_texts([root / f"data/pretrain/{lang}/train.jsonl" for lang in ("et", "en")]))
    tok = Tokenizer.train(iter(texts), root / "tok" / "tokenizer", 400)
    tok.save_pretrained(root / "tok")
    for lang in ("et", "en"):
        for split in ("train", "valid"):
            prepare([root / f"data/pretrain/{lang}/{split}.jsonl"], root / "tok", root / f"shards/{lang}_{split}",
                    progress=False)
    import torch
    torch.manual_seed(0)
    save_pretrained(Llama(LlamaConfig.from_preset("tiny", vocab_size=tok.vocab_size)), root / "init", tokenizer=tok)
    run_script("train_pretrain.py", pretrain_args(root, root / "run") + ["--max-steps", "2", "--save-interval", "1"])
    return root


def pretrain_args(world, out) -> list:
    """A tiny pretraining run on the tiny world's shards."""
    return ["--preset", "tiny", "--tokenizer", str(world / "tok"), "--data",
            f"et={world / 'shards/et_train'},en={world / 'shards/en_train'}", "--valid-data",
            f"et={world / 'shards/et_valid'}", "--eval-tokens", "64", "--seq-len", "32", "--micro-batch-size", "2",
            "--warmup-steps", "1", "--log-interval", "1", "--out-dir", str(out)]
