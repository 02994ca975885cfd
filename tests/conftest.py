"""Shared test helpers: running the scripts as real subprocesses, reading their metrics, a small chat
tokenizer (sentencepiece, with the chat markers) for the template and SFT-data tests, and corpus files in
every format for the corpus and prepare tests."""
import gzip
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


def read_metrics(out_dir) -> list[dict]:
    """The JSON lines a run wrote to OUT_DIR/metrics.jsonl."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


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


def write_corpus(path, texts, field: str = "text", row_group_size: int = 4, zstd_frames: int = 1, **parquet_options):
    """Write `texts` as the corpus format its name says: .txt (one per line) / .jsonl (records {"id", field}),
    either optionally .gz / .zst (in `zstd_frames` frames), or .parquet (columns id, field; row groups of
    row_group_size rows; more pyarrow.parquet.write_table options). Written with the reference libraries
    (gzip, zstandard, pyarrow)."""
    path = Path(path)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"id": list(range(len(texts))), field: texts}), path, row_group_size=row_group_size,
                       **parquet_options)
        return path
    stem = name.removesuffix(".gz").removesuffix(".zst").removesuffix(".zstd")
    if stem.endswith((".jsonl", ".ndjson")):
        data = "".join(json.dumps({"id": i, field: t}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    else:
        data = "".join(t + "\n" for t in texts)
    data = data.encode("utf-8")
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith((".zst", ".zstd")):
        import zstandard
        step = -(-len(data) // zstd_frames)
        data = b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data), step))
    path.write_bytes(data)
    return path
