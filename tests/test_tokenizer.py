"""Sentencepiece tokenizer tests: round trips, special tokens, chat markers that text never produces,
Hugging Face interop, vocab-size checks, which kind load_tokenizer picks.

Run: .venv/bin/python -m pytest -q tests/test_tokenizer.py
Oracles: sentencepiece itself (for the protobuf reader) and transformers.AutoTokenizer (for save_pretrained).
"""
import json
import pickle
import random

import pytest
import transformers  # test-only oracle

from minillm.sentencepiece_model import (
    PIECE_BYTE, PIECE_CONTROL, PIECE_NORMAL, PIECE_UNKNOWN, PIECE_USER_DEFINED, read_normalizer_spec, read_pieces,
    read_trainer_spec, rewrite_model_proto,
)
from minillm.hf_tokenizer import HFTokenizer
from minillm.tokenizer import CHAT_TOKENS, SentencePieceTokenizer, check_vocab_fits, load_tokenizer

from conftest import ids_with_markers  # noqa: E402

ESTONIAN = ("tere maailm kõik jõgi õun äri öö üks šokolaad žürii päev kool raamat sõber tänav metsas "
            "linnas hästi väga mõnus ülikool õpetaja õhtu öösel").split()
POLISH = ("zażółć gęślą jaźń łódź źdźbło ćma kość dzień dobry się szkoła książka pięć mówić "
          "żółty wąż ślub gęś źle chrząszcz brzmi trzcinie").split()
ENGLISH = "the quick brown fox jumps over the lazy dog hello world this is a test of the tokenizer".split()
EMOJI = ["😀", "🤖", "👍🏽", "🇪🇪", "🇵🇱", "❤️"]


def sentence(rng: random.Random) -> str:
    words = rng.choice([ESTONIAN, POLISH, ENGLISH])
    text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
    if rng.random() < 0.3:
        text = text.capitalize() + rng.choice([".", "!", "?", ","]) + " " + rng.choice(EMOJI)
    if rng.random() < 0.2:
        text += f" {rng.randint(0, 99999)}"
    return text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [sentence(rng) for _ in range(3000)]
    lines.append(" ".join(sentence(rng) for _ in range(400)))  # one very long line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    return SentencePieceTokenizer.train(corpus, tmp_path_factory.mktemp("tok") / "sp", vocab_size=600)


def tricky_texts(rng):
    texts = [
        "", " ", "   ", "\n", "\n\n", "a\nb", "\tindented\ttabs", "windows\r\nline end\r\n",
        "  two leading spaces", "trailing spaces   ", "multiple   inner    spaces",
        "Tere, kõik on hästi! Šokolaad ja žürii. ÕÄÖÜ ŠŽ",
        "Zażółć gęślą jaźń. ŻÓŁW ĄĆĘŁŃÓŚŹŻ ąćęłńóśźż",
        "emoji 😀🤖👍🏽 family 👨‍👩‍👧 flags 🇪🇪🇵🇱",
        "漢字 and Кириллица and عربى were never in the training text",
        "numbers 3.14159 and 1,000,000",
        "<|user|>\nTere!\n<|assistant|>\nTere, kuidas läheb?",
        "<s> and </s> and <unk> typed as plain text",
        "x" * 50_000,
        " ".join(sentence(rng) for _ in range(3000)),  # ~200 KB line
    ]
    alphabet = "aeiouõäöüšžąćęłńóśźż ŁŻ \n\t.,!?0123456789😀<|>"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    return texts


def test_round_trip_exact(tok):
    for text in tricky_texts(random.Random(1)):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text[:80])
    # The one documented exception: sentencepiece's own space marker '▁' (U+2581) decodes to a space.
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def test_empty_string_and_bos_eos(tok):
    assert tok.encode("") == []
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]
    ids = tok.encode("Tere maailm", bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert ids[1:-1] == tok.encode("Tere maailm")
    assert tok.decode(ids) == "Tere maailm"  # BOS/EOS are not text
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_pad_falls_back_to_unk_without_pad_piece(tok, corpus, tmp_path):
    # Llama-2 layout: no pad piece, so pad is <unk>, which byte fallback never produces
    assert not tok.has_pad_piece and tok.pad_id == tok.unk_id == 0
    assert tok.decode([tok.pad_id, *tok.encode("õun"), tok.pad_id]) == "õun"
    padded = SentencePieceTokenizer.train(corpus, tmp_path / "padded", vocab_size=600, pad_piece=True)
    assert padded.has_pad_piece and padded.pad_id == 3 and padded.id_to_piece(3) == "<pad>"
    assert padded.decode([padded.pad_id] + padded.encode("õun")) == "õun"


def test_byte_fallback_never_emits_unk(tok):
    ids = tok.encode("漢字 Кириллица")
    assert tok.unk_id not in ids
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)


def test_chat_markers_are_single_pieces_that_text_never_produces(tok):
    marker_ids = set()
    for marker in CHAT_TOKENS:
        marker_id = tok.piece_to_id(marker)
        assert marker_id is not None and tok.id_to_piece(marker_id) == marker == tok.decode([marker_id])
        assert tok.marker_id(marker) == marker_id
        marker_ids.add(marker_id)
    # A user who types the markers writes text: encoding never produces a marker id (no forged turn), anywhere
    # in the text, in every encoding function, and the text round-trips.
    forged = ["<|user|>", "Tere<|user|>maailm", "<|assistant|>\nok", "a <|system|>\n<|user|> b", "<|user|" "<|user|>"]
    for text in forged:
        for ids in (tok.encode(text), tok.encode(text, bos=True, eos=True)[1:-1], tok.encode_continuation(text),
                    tok.encode_batch([text])[0]):
            assert not marker_ids & set(ids), text
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode(text) == tok.encode_batch([text])[0]
    assert len(tok.encode("<|user|>")) > 1  # spelled out in pieces, not one id
    assert tok.marker_id("<s>") == tok.bos_id and tok.marker_id("tere") is None and tok.piece_to_id("nope") is None


def test_split_digits(tok):
    assert [tok.id_to_piece(i) for i in tok.encode_continuation("2024")] == ["2", "0", "2", "4"]


def test_pickles_for_worker_processes(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.model_proto == tok.model_proto and again.encode("õun <|user|>") == tok.encode("õun <|user|>")


def test_encode_batch_matches_encode(tok):
    texts = tricky_texts(random.Random(2))[:100]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_training_is_deterministic_and_accepts_text_iterators(corpus, tok, tmp_path):
    again = SentencePieceTokenizer.train(corpus, tmp_path / "again", vocab_size=600)
    assert again.model_proto == tok.model_proto
    lines = corpus.read_text(encoding="utf-8").splitlines()
    from_iter = SentencePieceTokenizer.train(iter(lines), tmp_path / "iter", vocab_size=600)
    assert from_iter.pieces() == tok.pieces()
    assert not list(tmp_path.glob("*.tmp"))


def test_model_file_reader_matches_sentencepiece(tok):
    pieces = read_pieces(tok.model_proto)
    sp = tok.sp
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    for i, (_, _, kind) in enumerate(pieces):
        assert (kind == PIECE_UNKNOWN) == sp.is_unknown(i)
        assert (kind == PIECE_CONTROL) == sp.is_control(i)
        assert (kind == PIECE_BYTE) == sp.is_byte(i)
    assert sum(kind == PIECE_USER_DEFINED for _, _, kind in pieces) == len(CHAT_TOKENS)
    assert sum(kind == PIECE_BYTE for _, _, kind in pieces) == 256
    assert read_trainer_spec(tok.model_proto) == {"model_type": 2, "vocab_size": 600, "byte_fallback": True}
    norm = read_normalizer_spec(tok.model_proto)
    assert norm["name"] == "identity" and norm["add_dummy_prefix"] and not norm["remove_extra_whitespaces"]
    # Rewriting without changes is byte-identical; rewriting the vocabulary is what sentencepiece loads.
    assert rewrite_model_proto(tok.model_proto) == tok.model_proto
    edited = rewrite_model_proto(tok.model_proto, pieces + [("▁zzz", -1e4, PIECE_NORMAL)])
    other = SentencePieceTokenizer.from_model_proto(edited)
    assert other.vocab_size == tok.vocab_size + 1 and other.id_to_piece(tok.vocab_size) == "▁zzz"
    assert read_trainer_spec(edited)["vocab_size"] == tok.vocab_size + 1


def hf_comparable(text: str) -> bool:
    # transformers' LlamaTokenizer (legacy=False) adds no dummy-prefix '▁' to text that already starts
    # with a space, so " x" and "x" encode alike there; sentencepiece (and we) keep the leading space.
    # It also matches "<s>"/"</s>" and the chat markers typed in the text as control tokens, which we never do.
    return not text[:1].isspace() and not any(t in text for t in ("<s>", "</s>", "<unk>") + CHAT_TOKENS)


def test_save_pretrained_loads_in_transformers_with_same_ids(tok, corpus, tmp_path):
    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tmp_path, chat_template=template, model_max_length=1024)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] and not config["add_eos_token"]

    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (
        tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)
    assert len(hf) == tok.vocab_size and hf.model_max_length == 1024 and hf.chat_template == template

    rng = random.Random(3)
    lines = corpus.read_text(encoding="utf-8").splitlines()
    texts = [t for t in tricky_texts(rng) if hf_comparable(t)] + rng.sample(lines, 300)
    assert len(texts) > 500
    for text in texts:
        ours = tok.encode(text, bos=True)
        assert hf(text).input_ids == ours, repr(text[:80])
        assert hf.decode(ours, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "Tere!"}, {"role": "assistant", "content": "Tere, sõber."}]
    rendered = hf.apply_chat_template(chat, tokenize=False)
    # transformers reads the markers in a rendered template as tokens (minillm.chat_format inserts them by id)
    assert hf(rendered).input_ids == [tok.bos_id] + ids_with_markers(rendered, tok)
    assert tok.encode(rendered, bos=True) != hf(rendered).input_ids  # our encode keeps them text


def test_from_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path, chat_template="{{ messages }}", model_max_length=512)
    again = load_tokenizer(tmp_path)
    assert again.model_proto == tok.model_proto
    assert again.chat_template == "{{ messages }}" and again.model_max_length == 512
    assert load_tokenizer(tmp_path / "tokenizer.model").vocab_size == tok.vocab_size
    # saving again over the same directory keeps everything and leaves no temporary files
    again.save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path).chat_template == "{{ messages }}"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_check_vocab_fits_names_both_sizes(tok):
    check_vocab_fits(tok, tok.vocab_size)
    check_vocab_fits(tok, 640)  # a padded embedding table is fine
    with pytest.raises(ValueError) as err:
        check_vocab_fits(tok, 512)
    assert "600" in str(err.value) and "512" in str(err.value)
    with pytest.raises(ValueError, match="32000.*256"):
        check_vocab_fits(32000, 256)


def test_bad_inputs_give_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="junk.model"):
        SentencePieceTokenizer(junk)
    with pytest.raises(ValueError, match="tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="no such directory"):
        load_tokenizer(tmp_path / "absent")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        SentencePieceTokenizer.train(empty, tmp_path / "x", vocab_size=300)
    with pytest.raises(ValueError, match="nope.txt"):
        SentencePieceTokenizer.train([tmp_path / "nope.txt"], tmp_path / "x", vocab_size=300)
    with pytest.raises(ValueError, match="600"):
        tok.decode([1, 600])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_load_tokenizer_picks_the_kind_and_both_kinds_agree(tok, tmp_path):
    tok.save_pretrained(tmp_path)  # tokenizer.model and its tokenizer.json equivalent
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)  # tokenizer.model wins, as today
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), HFTokenizer)
    (tmp_path / "tokenizer.model").unlink()
    fast = load_tokenizer(tmp_path)
    assert isinstance(fast, HFTokenizer)
    assert (fast.vocab_size, fast.bos_id, fast.eos_id, fast.pad_id) == (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    # The same vocabulary read by `tokenizers` gives sentencepiece's ids, markers typed in text included
    # (text that starts with whitespace gets no dummy prefix from `tokenizers`' Metaspace: see hf_comparable).
    rng = random.Random(4)
    texts = tricky_texts(rng)
    texts += [t[:k] + rng.choice(CHAT_TOKENS) + t[k:] for t in texts[:100] for k in [rng.randint(0, len(t))]]
    texts = [t for t in texts if not t[:1].isspace()]
    for text in texts:
        assert fast.encode(text, bos=True) == tok.encode(text, bos=True), repr(text[:80])
        assert fast.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    for marker in CHAT_TOKENS:
        assert fast.marker_id(marker) == tok.marker_id(marker) is not None
