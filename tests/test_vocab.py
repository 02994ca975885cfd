"""Vocabulary extension tests, sentencepiece and tokenizer.json (byte-level BPE) bases: merged pieces,
new-row initialisation, unchanged old-vocab logits, CLI.

Run: .venv/bin/python -m pytest -q tests/test_vocab.py
What is guaranteed (and tested): old ids keep their pieces, scores and types (BPE: tokens, and merges keep
their ranks); every new embedding / output row is the mean of the old rows of the pieces the old tokenizer
splits it into (float64 re-derivation); on old-vocabulary inputs the resized model's logits over the old
vocabulary are unchanged; target-language tokens per word drop; the merged tokenizer.json gives
transformers' ids; text made of words the old vocabulary has as single tokens keeps its ids. NOT
guaranteed: that other old text keeps its ids (a new piece may join pieces the base left apart).
"""
import json
import random

import pytest
import torch
import transformers  # test-only oracle

from minillm.hf import load_pretrained, save_pretrained
from minillm.model import Llama, LlamaConfig
from minillm.sentencepiece_model import PIECE_NORMAL, PIECE_USER_DEFINED, read_pieces
from minillm.tokenizer import CHAT_TOKENS, SentencePieceTokenizer, load_tokenizer
from minillm.vocab import (
    extend_bpe_tokenizer, extend_tokenizer, init_rows_from_old, main, new_pieces, new_tokens_and_merges,
    resize_embeddings, tokens_per_word, train_target_bpe, train_target_tokenizer,
)

from conftest import ids_with_markers, write_llama3_tokenizer, write_qwen2_tokenizer  # noqa: E402

ENGLISH = ("the of and to in is that it was for on are with as his they be at one have this from or had by "
           "word but what some we can out other were all there when up use your how said an each she which "
           "do their time if will way about many then them write would like so these her long make thing see "
           "him two has look more day could go come did number sound no most people my over know water than "
           "call first who may down side been now find").split()


def estonian_words(rng: random.Random, n: int) -> list[str]:
    """Made-up words spelled like Estonian: lots of õ ä ö ü š ž that an English vocabulary lacks."""
    onsets = ["k", "t", "p", "s", "m", "l", "r", "j", "v", "h", "n", "š", "ž", ""]
    vowels = ["a", "e", "i", "o", "u", "õ", "ä", "ö", "ü", "aa", "ee", "õi", "äe", "üü"]
    codas = ["", "", "k", "t", "s", "l", "n", "d", "g", "st", "ks"]
    return ["".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.randint(1, 3))) for _ in range(n)]


def lines_from(words: list[str], rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    rng = random.Random(0)
    (root / "en.txt").write_text("\n".join(lines_from(ENGLISH, rng, 2000)) + "\n", encoding="utf-8")
    et_vocab = estonian_words(rng, 300)
    (root / "et.txt").write_text("\n".join(lines_from(et_vocab, rng, 3000)) + "\n", encoding="utf-8")
    (root / "et_eval.txt").write_text("\n".join(lines_from(et_vocab, random.Random(1), 300)) + "\n",
                                      encoding="utf-8")
    base = SentencePieceTokenizer.train(root / "en.txt", root / "base", vocab_size=450, user_defined_symbols=())
    target = train_target_tokenizer(root / "et.txt", 700, root)
    merged = extend_tokenizer(base, new_pieces(base, target), user_defined=list(CHAT_TOKENS))
    return root, base, target, merged


def test_old_pieces_keep_ids_scores_and_types(setup):
    _, base, target, merged = setup
    old, new = read_pieces(base.model_proto), read_pieces(merged.model_proto)
    assert new[:len(old)] == old
    added = new[len(old):]
    assert len(added) > 100
    assert [p for p, _, _ in added[:len(CHAT_TOKENS)]] == list(CHAT_TOKENS)
    assert all(kind == PIECE_USER_DEFINED for _, _, kind in added[:len(CHAT_TOKENS)])
    normal_added = added[len(CHAT_TOKENS):]
    assert all(kind == PIECE_NORMAL for _, _, kind in normal_added)
    # appended below every old score, keeping the target tokenizer's order
    lowest_old = min(s for _, s, kind in old if kind == PIECE_NORMAL)
    scores = [s for _, s, _ in normal_added]
    assert scores[0] < lowest_old and scores == sorted(scores, reverse=True)
    # exactly the target's normal pieces the base lacked, each once
    old_set = {p for p, _, _ in old}
    expected = [p for p, _, kind in read_pieces(target.model_proto) if kind == PIECE_NORMAL and p not in old_set]
    assert [p for p, _, _ in normal_added] == expected
    assert merged.vocab_size == base.vocab_size + len(added)


def test_tokens_per_word_drops_on_target_text(extended):
    root, base, merged = extended
    eval_lines = (root / "et_eval.txt").read_text(encoding="utf-8").splitlines()
    before, after = tokens_per_word(base, eval_lines), tokens_per_word(merged, eval_lines)
    assert after < 0.6 * before, (before, after)
    for line in eval_lines[:100]:
        assert merged.decode(merged.encode(line)) == line


def test_merged_tokenizer_matches_transformers(extended, tmp_path):
    root, _, merged = extended
    merged.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(hf) == merged.vocab_size
    rng = random.Random(5)
    texts = rng.sample((root / "et_eval.txt").read_text(encoding="utf-8").splitlines(), 100)
    texts += rng.sample((root / "en.txt").read_text(encoding="utf-8").splitlines(), 100)
    for text in texts:
        assert hf(text).input_ids == merged.encode(text, bos=True), text
    # the added chat markers: transformers reads them in text as tokens, minillm inserts them by id
    chat = "<|user|>\n" + texts[0] + "<|assistant|>\n" + texts[1]
    assert hf(chat).input_ids == [merged.bos_id] * (merged.bos_id is not None) + ids_with_markers(chat, merged)


def test_old_vocabulary_text_keeps_its_ids(extended):
    root, base, merged = extended
    # Text made of words the old vocabulary has as single tokens encodes exactly as before: all old merges
    # apply before any new one, and a single token has nothing left to merge.
    known = [w for w in ENGLISH if len(base.encode(w)) == 1 and len(base.encode_continuation(" " + w)) == 1]
    assert len(known) > 10
    rng = random.Random(7)
    old_text = [" ".join(rng.choice(known) for _ in range(rng.randint(1, 20))) for _ in range(300)]
    assert merged.encode_batch(old_text) == base.encode_batch(old_text)
    # Other old-language text may change where a new token joins old ones (the target learned "on", say);
    # it still decodes to itself.
    english = (root / "en.txt").read_text(encoding="utf-8").splitlines()[:300]
    assert [merged.decode(ids) for ids in merged.encode_batch(english)] == english


def segment_bytes(tok: SentencePieceTokenizer, ids: list[int]) -> bytes:
    """Independent decoding of a piece sequence: byte pieces are their byte, others their UTF-8 text."""
    out = b""
    for i in ids:
        piece = tok.id_to_piece(i)
        out += bytes([int(piece[3:5], 16)]) if tok.sp.is_byte(i) else piece.replace("\u2581", " ").encode()
    return out


def test_init_rows_are_the_old_segmentation(setup):
    _, base, _, merged = setup
    rows = init_rows_from_old(base, merged)
    assert sorted(rows) == list(range(base.vocab_size, merged.vocab_size))
    word_starts = 0
    for new_id, old_ids in rows.items():
        piece = merged.id_to_piece(new_id)
        assert all(0 <= i < base.vocab_size for i in old_ids)
        assert segment_bytes(base, old_ids) == piece.replace("\u2581", " ").encode()
        if piece.startswith("\u2581") and piece.strip("\u2581"):
            # a word-initial piece is split as the old tokenizer splits that word at the start of a text
            assert old_ids == base.encode(piece[1:]), piece
            word_starts += 1
    assert word_starts > 20


def tiny_model(vocab_size: int, tie: bool) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig.from_preset("tiny", vocab_size=vocab_size, tie_embeddings=tie)
    return Llama(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_resize_embeddings_initialises_means_and_keeps_old_logits(setup, tie):
    _, base, _, merged = setup
    model = tiny_model(base.vocab_size, tie)
    old_emb = model.tok_embeddings.weight.detach().double().clone()
    old_out = model.output.weight.detach().double().clone()
    ids = torch.randint(0, base.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old_logits = model(ids)

    rows = init_rows_from_old(base, merged)
    new_size = ((merged.vocab_size + 63) // 64) * 64  # padded rows beyond the tokenizer too
    resize_embeddings(model, new_size, rows)
    assert model.config.vocab_size == new_size
    assert model.tok_embeddings.weight.shape == model.output.weight.shape == (new_size, old_emb.shape[1])
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    emb, out = model.tok_embeddings.weight.double(), model.output.weight.double()
    assert torch.equal(emb[:base.vocab_size], old_emb) and torch.equal(out[:base.vocab_size], old_out)
    for new_id, old_ids in rows.items():
        torch.testing.assert_close(emb[new_id], old_emb[old_ids].mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[new_id], old_out[old_ids].mean(0), atol=1e-6, rtol=0)
    for pad_row in range(merged.vocab_size, new_size):
        torch.testing.assert_close(emb[pad_row], old_emb.mean(0), atol=1e-6, rtol=0)

    with torch.no_grad():
        new_logits = model(ids)
    assert new_logits.shape[-1] == new_size
    torch.testing.assert_close(new_logits[..., :base.vocab_size], old_logits, atol=1e-5, rtol=1e-5)
    # the resized model trains: gradients reach the new rows
    model.train()
    model(torch.tensor([[merged.vocab_size - 1, 5]]))[0, -1, merged.vocab_size - 1].backward()
    assert model.tok_embeddings.weight.grad[merged.vocab_size - 1].abs().sum() > 0


def test_resize_embeddings_rejects_bad_requests(setup):
    model = tiny_model(300, tie=False)
    with pytest.raises(ValueError, match="200"):
        resize_embeddings(model, 200)
    with pytest.raises(ValueError, match="init_rows"):
        resize_embeddings(model, 310, {305: [300]})  # 300 is not an old id
    with pytest.raises(ValueError, match="init_rows"):
        resize_embeddings(model, 310, {305: []})
    assert model.config.vocab_size == 300 and model.tok_embeddings.weight.shape[0] == 300  # untouched


def extend_with_the_cli(root, base, tmp_path, capsys):
    """`python -m minillm.vocab extend` on a tiny model saved with `base`: (the model before, token ids of
    old text and its logits then, the report, the merged tokenizer, the resized model)."""
    model = tiny_model(base.vocab_size, tie=False)
    save_pretrained(model, tmp_path / "base_model", tokenizer=base)
    ids = torch.tensor([base.encode("the water was long", bos=True)])
    with torch.no_grad():
        old_logits = model(ids)

    main(["extend", "--base", str(tmp_path / "base_model"), "--corpus", str(root / "et.txt"),
          "--new-vocab-size", "700", "--out", str(tmp_path / "tok"), "--add-chat-tokens",
          "--eval-text", str(root / "et_eval.txt"), "--pad-to-multiple-of", "64",
          "--model-in", str(tmp_path / "base_model"), "--model-out", str(tmp_path / "et_model")])
    printed = capsys.readouterr().out
    assert "tokens per word" in printed

    report = json.loads((tmp_path / "tok" / "vocab_extension.json").read_text())
    assert report["tokens_per_word_after"] < 0.6 * report["tokens_per_word_before"]
    assert report["added_chat_tokens"] == list(CHAT_TOKENS)
    merged = load_tokenizer(tmp_path / "tok")
    assert merged.vocab_size == report["merged_vocab_size"] == base.vocab_size + report["added_pieces"]

    resized = load_pretrained(tmp_path / "et_model").eval()
    assert resized.config.vocab_size == report["model_vocab_size"] == ((merged.vocab_size + 63) // 64) * 64
    with torch.no_grad():
        torch.testing.assert_close(resized(ids)[..., :base.vocab_size], old_logits, atol=1e-5, rtol=1e-5)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "et_model"))
    assert hf.get_input_embeddings().weight.shape[0] == resized.config.vocab_size
    return model, merged, resized


def test_cli_extends_tokenizer_and_model(setup, tmp_path, capsys):
    root, base, _, _ = setup
    _, merged, _ = extend_with_the_cli(root, base, tmp_path, capsys)
    assert load_tokenizer(tmp_path / "et_model").model_proto == merged.model_proto


def test_cli_errors_are_one_line(setup, tmp_path, capsys):
    root, base, _, _ = setup
    with pytest.raises(SystemExit) as e:
        main(["extend", "--base", str(tmp_path), "--corpus", str(root / "et.txt"),
              "--new-vocab-size", "700", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "tokenizer.model nor tokenizer.json" in err
    assert err.count("\n") == 1
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit) as e:
        main(["extend", "--base", str(tmp_path / "base"), "--corpus", str(tmp_path / "missing.txt"),
              "--new-vocab-size", "700", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "missing.txt" in err and err.count("\n") == 1



# ----------------------------------------------------------------------------- tokenizer.json (byte-level BPE) bases

@pytest.fixture(scope="module")
def bpe_setups(setup, tmp_path_factory):
    """Per layout: a byte-level BPE base trained on English, a target BPE trained on Estonian, their merge."""
    root = setup[0]
    english = (root / "en.txt").read_text(encoding="utf-8").splitlines()
    estonian = (root / "et.txt").read_text(encoding="utf-8").splitlines()
    out = {}
    for layout, write in (("llama3", write_llama3_tokenizer), ("qwen2", write_qwen2_tokenizer)):
        base = load_tokenizer(write(tmp_path_factory.mktemp(layout), english, vocab_size=450))
        target = train_target_bpe(base, estonian, 700)
        tokens, merges = new_tokens_and_merges(base, target)
        out[layout] = root, base, target, extend_bpe_tokenizer(base, tokens, merges, special=list(CHAT_TOKENS)), \
            tokens, merges
    return out


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def bpe_setup(request, bpe_setups):
    return bpe_setups[request.param]


@pytest.fixture(scope="module", params=["sentencepiece", "llama3", "qwen2"])
def extended(request, setup, bpe_setups):
    """(root, base tokenizer, merged tokenizer) of every kind."""
    if request.param == "sentencepiece":
        return setup[0], setup[1], setup[3]
    root, base, _, merged, _, _ = bpe_setups[request.param]
    return root, base, merged


def test_bpe_old_ids_and_merges_are_kept(bpe_setup):
    _, base, target, merged, tokens, merges = bpe_setup
    assert len(tokens) > 100 and len(merges) >= len(tokens) - 256  # a merge for every new multi-byte token
    assert merged.vocab_size == base.vocab_size + len(tokens) + len(CHAT_TOKENS)
    for i in range(base.vocab_size):
        assert merged.id_to_piece(i) == base.id_to_piece(i)
    old, new = json.loads(base.tokenizer_json), json.loads(merged.tokenizer_json)
    assert new["model"]["merges"][:len(old["model"]["merges"])] == old["model"]["merges"]  # old ranks kept
    assert [m for m in new["model"]["merges"][len(old["model"]["merges"]):]] == [list(m) for m in merges]
    assert (merged.bos_id, merged.eos_id, merged.eos_ids, merged.pad_id) == (base.bos_id, base.eos_id, base.eos_ids,
                                                                            base.pad_id)
    for marker in CHAT_TOKENS:  # the markers are special tokens that text never produces
        assert merged.marker_id(marker) is not None and merged.marker_id(marker) not in merged.encode(marker)


def test_bpe_init_rows_are_the_base_split_of_each_new_token(bpe_setup):
    _, base, _, merged, tokens, _ = bpe_setup
    rows = init_rows_from_old(base, merged)
    assert sorted(rows) == list(range(base.vocab_size, merged.vocab_size))
    for new_id, old_ids in rows.items():
        piece = merged.id_to_piece(new_id)
        assert old_ids and all(0 <= i < base.vocab_size for i in old_ids)
        if piece in CHAT_TOKENS:  # a marker starts as the mean of the pieces of its text
            assert old_ids == base.encode_continuation(piece)
        else:  # the old tokens spell exactly the new one (byte-level spelling)
            assert "".join(base.id_to_piece(i) for i in old_ids) == piece and len(old_ids) >= 2


def test_cli_extends_a_tokenizer_json_base_and_its_model(bpe_setup, tmp_path, capsys):
    root, base, _, _, _, _ = bpe_setup
    model, merged, resized = extend_with_the_cli(root, base, tmp_path, capsys)
    assert (tmp_path / "tok" / "target_tokenizer.json").is_file()
    assert load_tokenizer(tmp_path / "et_model").tokenizer_json == merged.tokenizer_json
    old_emb = model.tok_embeddings.weight.detach().double()
    for new_id, old_ids in list(init_rows_from_old(base, merged).items())[::50]:
        torch.testing.assert_close(resized.tok_embeddings.weight[new_id].double(), old_emb[old_ids].mean(0),
                                   atol=1e-6, rtol=0)
