"""ZeRO-3 at scale, on a small model: the partitioned start (the model is born split over the ranks and filled one
tensor at a time) gives the same logits as a plain start, the streamed export writes the same bytes as a ZeRO-0
export, and no rank's resident memory rises by the whole model at the start or at the export. Each run is a real
torchrun of tests/zero3_probe.py on 2 ranks.

    .venv/bin/python -m pytest -q tests/test_zero3_start_export.py
"""
import json
from pathlib import Path

import pytest
import torch
from conftest import run_script
from safetensors.torch import load_file

# Many small tensors (the largest ~2.8 MB) and 200 MB in all: half of it (a rank's partition) is far from the
# whole, and one tensor is small beside both, so the memory assertions have a wide margin over allocator noise.
SHAPE = dict(vocab_size=512, dim=512, n_layers=16, n_heads=8, n_kv_heads=8, hidden_dim=1376, max_seq_len=64)
SHARD = "20MB"
# At real sizes every weight is far above glibc's largest mmap threshold (32 MB): each is its own mapping, returned
# to the system when freed. These small tensors would instead be kept in the heap by glibc's dynamic threshold, and
# the resident set would measure the allocator rather than the program; a fixed threshold makes them behave alike.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same Hugging Face directory started and exported under ZeRO-0 and under ZeRO-3, 2 ranks each."""
    from minillm.hf import save_pretrained
    from minillm.model import Llama, LlamaConfig
    from minillm.tokenizer import SentencePieceTokenizer

    root = tmp_path_factory.mktemp("zero3")
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**SHAPE))
    tok = SentencePieceTokenizer.train(iter(["tere maailm kass koer maja"] * 50 + ["the cat and the dog"] * 50),
                                       root / "tok", 300)
    save_pretrained(model, root / "hf", max_shard_size="50MB", tokenizer=tok)
    out = {}
    for stage in (0, 3):
        out[stage] = root / f"zero{stage}"
        run_script("tests/zero3_probe.py", [root / "hf", out[stage], stage, SHARD], nproc=2, env=ALLOCATOR)
    return root, out, sum(p.numel() * 4 for p in model.parameters()) / 2**20


def memory(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"memory_rank{r}.json").read_text()) for r in range(2)]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model*.safetensors*"))}


def test_partitioned_start_gives_the_plain_start_logits(runs):
    from minillm.hf import load_pretrained

    root, out, _ = runs
    zero0, zero3 = (load_file(str(out[s] / "logits.safetensors"))["logits"] for s in (0, 3))
    plain = load_pretrained(root / "hf").eval()
    with torch.no_grad():
        expected = plain(torch.arange(12).view(1, 12) % SHAPE["vocab_size"])
    # Equal to fp32 rounding: under ZeRO-3 the attention's output already differs from the plain forward's in
    # the last bits (9e-7 on these logits, measured), which the projections after it carry on; ZeRO-0 is exact.
    torch.testing.assert_close(zero3, zero0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero3, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(zero0, expected)
    # Each rank really held half of the weights, not a replica.
    total = sum(p.numel() for p in plain.parameters())
    assert [m["partition_numel"] for m in memory(out[3])] == [pytest.approx(total / 2, rel=0.01)] * 2
    assert [m["partition_numel"] for m in memory(out[0])] == [total] * 2


def test_streamed_export_is_byte_identical_to_a_zero0_export(runs):
    root, out, _ = runs
    for name in ("export", "shards"):
        plain, streamed = files(out[0] / name), files(out[3] / name)
        assert streamed == plain, name
    assert len(files(out[3] / "shards")) > 5  # several shards (and the index) at 20 MB each
    exported = load_file(str(out[3] / "export" / "model.safetensors"))
    source = {}  # (the source directory is sharded at 50 MB: its tensors, not its bytes)
    for f in (root / "hf").glob("model-*.safetensors"):
        source.update(load_file(str(f)))
    assert exported.keys() == source.keys() and all(torch.equal(exported[k], source[k]) for k in source)
    assert json.loads((out[3] / "export" / "training_state.json").read_text()) == {"step": 0}
    assert (out[3] / "export" / "tokenizer.model").is_file()


def test_no_rank_holds_the_whole_model_at_start_or_export(runs):
    _, out, model_mb = runs
    plain, zero3 = memory(out[0]), memory(out[3])
    # Control: a plain start fills the whole model on every rank (so the measurement sees it).
    assert all(m["start_mb"] > 0.9 * model_mb for m in plain), (plain, model_mb)
    for rank, m in enumerate(zero3):
        assert m["start_mb"] < 0.7 * model_mb, (rank, m, model_mb)  # its half plus one tensor, not the whole
        assert m["shards_mb"] < 0.25 * model_mb, (rank, m, model_mb)  # one 20 MB shard plus one tensor
    # The default export (one 5 GB shard) collects the copies on rank 0 only; rank 1 only gathers.
    assert zero3[1]["export_mb"] < 0.25 * model_mb, (zero3, model_mb)
