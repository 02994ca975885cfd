"""Token shards -> mixture -> packed rows (minillm/pretrain_data.py): mixture sampling, data-parallel slicing,
resumable loading, packing and document masking, validation batches.

Run: .venv/bin/python -m pytest -q tests/test_pretrain_data.py

Oracles: hand-computed packed rows, binomial bounds for the mixture, a single-process loader for the
data-parallel slices, and the model's logits for document masking (a packed document must give the
logits it gives alone in its own row).
"""
import json
import random

import numpy as np
import pytest
import torch

from minillm.model import Llama, LlamaConfig
from minillm.prepare import FORMAT, FORMAT_VERSION, ShardWriter, commit_shards, prepare
from minillm.pretrain_data import (PackedLoader, TokenShards, block_to_row, parse_mixture, parse_sources, stack_rows,
                                   token_dtype, validation_batches)
from minillm.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    words = "tere maailm kass koer maja suur väike the cat dog house big small".split()
    (d / "train.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(300)) + "\n",
                                 encoding="utf-8")
    SentencePieceTokenizer.train(d / "train.txt", d / "tok", vocab_size=300)
    return d / "tok.model"


def write_shards(out_dir, docs, vocab_size: int) -> None:
    """Already-tokenized documents (int sequences) as a shard directory, as `minillm.prepare` writes one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    writer = ShardWriter(out_dir, dtype, vocab_size)
    for d in docs:
        writer.add(np.asarray(d, dtype=np.int64), np.array([len(d)]))
    commit_shards(out_dir, writer.close(), {"format": FORMAT, "version": FORMAT_VERSION, "name": out_dir.name,
                                            "dtype": dtype.name, "vocab_size": vocab_size, "tokenizer": None,
                                            "num_docs": len(docs), "num_tokens": sum(map(len, docs))})


def pack_documents(docs, seq_len: int, mode: str = "document", pad_id: int = 0) -> dict[str, torch.Tensor]:
    """All of `docs` (token sequences, in order) concatenated and cut into rows of seq_len targets: row r covers
    stream tokens [r*seq_len, r*seq_len + seq_len + 1); the last row is padded. PackedLoader's row construction
    (block_to_row) for a fixed list of documents."""
    docs = [np.asarray(d, dtype=np.int64) for d in docs if len(d)]
    tokens = np.concatenate(docs)
    starts = np.zeros(len(tokens), dtype=bool)
    starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    rows = [block_to_row(tokens[off:off + seq_len + 1], starts[off:off + seq_len + 1], seq_len, mode, pad_id)
            for off in range(0, max(len(tokens) - 1, 1), seq_len)]
    return stack_rows(rows)


# ----------------------------------------------------------------------------- mixture and loader

BOS, EOS = 1, 2


def synthetic_source(path, lo, hi, n_docs, seed, vocab_size=512):
    """Documents BOS + ids in [lo, hi) + EOS, so every token tells which source it came from."""
    rng = np.random.default_rng(seed)
    docs = [[BOS] + rng.integers(lo, hi, rng.integers(3, 40)).tolist() + [EOS] for _ in range(n_docs)]
    write_shards(path, docs, vocab_size)
    return docs


@pytest.fixture
def sources(tmp_path):
    synthetic_source(tmp_path / "et", 10, 100, 60, seed=0)
    synthetic_source(tmp_path / "en", 100, 200, 50, seed=1)
    synthetic_source(tmp_path / "pl", 200, 300, 20, seed=2)
    return {n: tmp_path / n for n in ("et", "en", "pl")}


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("spec,names,pattern", [
    ("et=0.75,en=-0.25", None, r"weight of 'en' must be a finite number >= 0, got -0.25"),
    ("et=0.5,de=0.5", ["et", "en"], r"'de' names no data source \(sources: et, en\)"),
    ("et=0,en=0", None, r"weights sum to zero"),
    ("et=0.5", ["et", "en"], r"no weight for source\(s\) en"),
    ("et=abc", None, r"weight of 'et' is not a number"),
    ("et0.5", None, r"expected name=value pairs"),
    ("et=0.5,et=0.5", None, r"'et' given twice"),
    ("et=nan", None, r"must be a finite number"),
])
def test_parse_mixture_errors(spec, names, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse_mixture(spec, names)


def test_parse_mixture_and_sources():
    warnings = []
    assert parse_mixture("et=3, en=1", warn=warnings.append) == {"et": 0.75, "en": 0.25}
    assert warnings == ["warning: mixture 'et=3, en=1' sums to 4; renormalised to et=0.75,en=0.25"]
    assert parse_mixture("et=0.75,en=0.25", warn=warnings.append) and len(warnings) == 1  # sums to 1: silent
    assert parse_mixture("", ["a", "b"]) == {"a": 0.5, "b": 0.5}
    assert parse_sources("et=tok/et,en=/x/en") == {"et": "tok/et", "en": "/x/en"}
    with pytest.raises(ValueError, match="given twice"):
        parse_sources("et=a,et=b")


def row_sources(batch):
    """Source of each row from its token ids (each row must come from exactly one source)."""
    ids = batch["input_ids"]
    out = []
    for row in ids:
        text = row[row > EOS]
        kinds = {int(k) for k in torch.unique(text // 100)}
        assert len(kinds) == 1, "a row mixes sources"
        out.append(["et", "en", "pl"][kinds.pop()])
    return out


def test_mixture_hits_its_token_weights(sources):
    weights = parse_mixture("et=0.75,en=0.25,pl=0", list(sources))
    loader = PackedLoader(sources, weights, seq_len=16, batch_size=100, seed=3, mode="concat")
    batches = take(loader, 30)
    picks = [s for b in batches for s in row_sources(b)]
    assert all((b["labels"] != -100).all() for b in batches)  # every row is seq_len real targets
    n = len(picks)
    share = picks.count("et") / n  # rows are equal-sized, so this is also the share of tokens
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5  # 4 sigma of the binomial
    assert "pl" not in picks
    assert loader.epochs()["et"] > 5 and loader.epochs()["pl"] == 0  # several passes over the data


def test_loader_is_deterministic_from_its_seed(sources):
    weights = parse_mixture("et=0.5,en=0.3,pl=0.2")
    a = take(PackedLoader(sources, weights, 24, 4, seed=7), 6)
    b = take(PackedLoader(sources, weights, 24, 4, seed=7), 6)
    c = take(PackedLoader(sources, weights, 24, 4, seed=8), 6)
    assert_batches_equal(a, b)
    assert not torch.equal(cat(a)["input_ids"], cat(c)["input_ids"])


def test_one_source_stream_is_the_shuffled_documents_epoch_after_epoch(tmp_path):
    docs = synthetic_source(tmp_path / "s", 10, 100, 30, seed=4)
    shards = TokenShards(tmp_path / "s")
    seq_len = 8
    loader = PackedLoader({"s": shards}, {"s": 1.0}, seq_len, 1, seed=0, mode="concat")
    n_rows = 3 * shards.num_tokens // seq_len
    rows = [loader.next_batch() for _ in range(n_rows)]
    stream = torch.cat([r["input_ids"][0] for r in rows]).tolist() + [int(rows[-1]["labels"][0, -1])]
    for r, nxt in zip(rows, rows[1:]):  # consecutive rows overlap by one token: every token is a target once
        assert r["labels"][0, -1] == nxt["input_ids"][0, 0]
        assert torch.equal(r["labels"][0, :-1], r["input_ids"][0, 1:])
    epochs = [stream[e * shards.num_tokens:(e + 1) * shards.num_tokens] for e in range(2)]
    for epoch in epochs:  # each epoch: all documents, each once, in some order
        split, cur = [], []
        for t in epoch:
            cur.append(t)
            if t == EOS:
                split.append(cur)
                cur = []
        assert sorted(split) == sorted(docs)
    assert epochs[0] != epochs[1] and epochs[0] != sum(docs, [])  # reshuffled each epoch


@pytest.mark.parametrize("mode", ["concat", "document"])
def test_ranks_together_see_the_single_process_global_batch(sources, mode):
    weights = parse_mixture("et=0.6,en=0.3,pl=0.1")
    single = PackedLoader(sources, weights, 20, 6, seed=5, mode=mode)
    ranks = [PackedLoader(sources, weights, 20, 3, rank=r, world_size=2, seed=5, mode=mode) for r in range(2)]
    for _ in range(5):
        assert_batches_equal([single.next_batch()], [cat([ranks[0].next_batch(), ranks[1].next_batch()])])
    # one process with half the rows per call (gradient accumulation 2x) reads the same rows in the same order
    small = PackedLoader(sources, weights, 20, 3, seed=5, mode=mode)
    three = [PackedLoader(sources, weights, 20, 2, rank=r, world_size=3, seed=5, mode=mode) for r in range(3)]
    assert_batches_equal([cat(take(small, 4))], [cat([cat([l.next_batch() for l in three]) for _ in range(2)])])


def test_state_dict_resumes_the_same_batches(sources):
    weights = parse_mixture("et=0.6,en=0.4,pl=0")
    loader = PackedLoader(sources, weights, 32, 4, rank=1, world_size=2, seed=9)
    take(loader, 7)
    state = json.loads(json.dumps(loader.state_dict()))  # what the checkpoint stores
    expected = take(loader, 12)  # crosses epoch boundaries of every source
    resumed = PackedLoader(sources, weights, 32, 4, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    assert_batches_equal(take(resumed, 12), expected)
    other = PackedLoader(sources, weights, 16, 4, rank=1, world_size=2, seed=9)
    with pytest.raises(ValueError, match="seq_len was 32, now 16"):
        other.load_state_dict(state)


def test_loader_errors(sources, tmp_path, tok_file):
    with pytest.raises(ValueError, match=r"tokens come from a 512-piece tokenizer but the model has 256"):
        PackedLoader(sources, {"et": 1.0}, 8, 1, vocab_size=256)
    (tmp_path / "x.txt").write_text("tere maailm\n")
    prepare([tmp_path / "x.txt"], tok_file, tmp_path / "real", progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        PackedLoader({"et": sources["et"], "real": tmp_path / "real"}, {"et": 1.0, "real": 1.0}, 8, 1)
    with pytest.raises(ValueError, match="not a prepared token directory"):
        PackedLoader({"et": tmp_path / "nothing"}, {"et": 1.0}, 8, 1)


# ----------------------------------------------------------------------------- packing

def test_packing_by_hand():
    docs = [[1, 5, 6, 2], [1, 7, 2], [1, 8, 9, 2]]  # stream 1 5 6 2 | 1 7 2 | 1 8 9 2: 10 targets, 3 rows of 4
    concat = pack_documents(docs, seq_len=4, mode="concat")
    assert concat["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 2, 0]]  # the final EOS is input, no target
    assert concat["labels"].tolist() == [[5, 6, 2, 1], [7, 2, 1, 8], [9, 2, -100, -100]]
    assert concat["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]]
    assert concat["doc_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]  # padding: its own doc
    doc = pack_documents(docs, seq_len=4, mode="document")
    assert doc["input_ids"].tolist() == concat["input_ids"].tolist()
    assert doc["labels"].tolist() == [[5, 6, 2, -100], [7, 2, -100, 8], [9, 2, -100, -100]]
    assert doc["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]]
    assert doc["doc_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_document_mode_labels_never_cross_a_boundary(sources):
    loader = PackedLoader(sources, parse_mixture("et=1,en=1,pl=1"), 48, 8, seed=1, mode="document")
    for b in take(loader, 5):
        lab, ids, doc = b["labels"], b["input_ids"], b["doc_ids"]
        assert not (lab == BOS).any()  # the first token of a document is never a target
        keep = lab[:, :-1] != -100
        assert torch.equal(lab[:, :-1][keep], ids[:, 1:][keep])
        assert (doc[:, 1:][keep] == doc[:, :-1][keep]).all()
        starts = ids == BOS
        assert (b["position_ids"][starts] == 0).all() and (b["position_ids"][:, 0] == 0).all()
        assert (lab[:, :-1][starts[:, 1:]] == -100).all()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Llama(LlamaConfig.from_preset("tiny")).eval()


@torch.no_grad()
def test_document_masking_on_logits(tiny_model):
    g = torch.Generator().manual_seed(0)
    docs = [[BOS] + torch.randint(3, 500, (n,), generator=g).tolist() + [EOS] for n in (9, 14, 6)]
    seq_len = sum(map(len, docs)) - 1
    row = pack_documents(docs, seq_len, mode="document")
    assert row["input_ids"].shape == (1, seq_len)
    logits = tiny_model(row["input_ids"], position_ids=row["position_ids"], doc_ids=row["doc_ids"])
    # each packed document gives exactly the logits it gives alone
    at = 0
    for d in docs:
        n = min(len(d), seq_len - at)
        alone = tiny_model(torch.tensor([d[:n]]))
        torch.testing.assert_close(logits[0, at:at + n], alone[0], atol=1e-5, rtol=1e-5)
        at += n
    # perturbing document A changes A's logits only
    perturbed = row["input_ids"].clone()
    perturbed[0, 1:len(docs[0])] = torch.randint(3, 500, (len(docs[0]) - 1,), generator=g)
    logits2 = tiny_model(perturbed, position_ids=row["position_ids"], doc_ids=row["doc_ids"])
    a = len(docs[0])
    assert (logits2[0, 1:a] - logits[0, 1:a]).abs().max() > 1e-2
    torch.testing.assert_close(logits2[0, a:], logits[0, a:], atol=1e-6, rtol=0)
    # control: in concat mode (no document ids) the same perturbation does reach document B
    plain = pack_documents(docs, seq_len, mode="concat")
    l1 = tiny_model(plain["input_ids"], position_ids=plain["position_ids"], doc_ids=plain["doc_ids"])
    l2 = tiny_model(perturbed, position_ids=plain["position_ids"], doc_ids=plain["doc_ids"])
    assert (l2[0, a:] - l1[0, a:]).abs().max() > 1e-3



def test_validation_batches_cover_the_set_once_on_every_rank(tmp_path):
    docs = synthetic_source(tmp_path / "v", 10, 100, 7, seed=6)
    total = sum(map(len, docs))
    per_rank = [validation_batches(tmp_path / "v", 16, 2, rank=r, world_size=2, mode="concat") for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) >= 1  # equal counts: collective forwards under ZeRO-3
    targets = [b["labels"][b["labels"] != -100] for batches in zip(*per_rank) for b in batches]
    assert torch.cat(targets).tolist() == sum(docs, [])[1:]  # every token after the first, once, in order
    assert sum(int((b["labels"] != -100).sum()) for r in per_rank for b in r) == total - 1


@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (3, 1), (2, 2), (1, 3), (4, 2)])
def test_validation_targets_do_not_depend_on_the_split(tmp_path, batch_size, world_size):
    """A token budget (max_tokens) scores the same first tokens, each once, for any micro-batch size and
    number of ranks: only padding rows differ."""
    docs = synthetic_source(tmp_path / "v", 10, 100, 9, seed=7)
    stream = sum(docs, [])
    per_rank = [validation_batches(tmp_path / "v", 16, batch_size, rank=r, world_size=world_size,
                                   max_tokens=40, mode="concat")
                for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1
    targets = [b["labels"][b["labels"] != -100] for batches in zip(*per_rank) for b in batches]
    assert torch.cat(targets).tolist() == stream[1:41]


def test_meta_json_shard_names_never_leave_the_directory(tmp_path):
    synthetic_source(tmp_path / "s", 10, 100, 30, seed=4)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["shards"][0]["bin"] = "../outside/tokens_00000.bin"
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json: shard bin '\.\./outside/tokens_00000\.bin' is not a file name"):
        TokenShards(tmp_path / "s")
