"""tokenizer.json tokenizers (minillm/hf_tokenizer.py) in the Llama-3 and Qwen2 layouts: ids, special tokens,
text that spells special tokens, round trips, byte lengths, saving, and load_tokenizer's choice.

Run: .venv/bin/python -m pytest -q tests/test_hf_tokenizer.py
Oracle: transformers.AutoTokenizer.from_pretrained(dir) (for the Qwen2 layout it rebuilds the pipeline from
its own Qwen2Tokenizer class, only vocabulary and merges come from the file) and the directories' own
generation_config.json. The tokenizers are trained here with the `tokenizers` trainer (conftest.py).
"""
import json
import pickle
import random
import unicodedata

import pytest
import transformers  # test-only oracle

from minillm.hf_tokenizer import HFTokenizer
from minillm.tokenizer import load_tokenizer

from conftest import LLAMA3_SPECIALS, QWEN2_ADDED, write_llama3_tokenizer, write_qwen2_tokenizer  # noqa: E402

WORDS = ("tere maailm kõik jõgi õun äri öö üks šokolaad žürii päev kool zażółć gęślą jaźń łódź "
         "the quick brown fox jumps over the lazy dog hello world it's don't we'll").split()
EMOJI = ["😀", "🤖", "👍🏽", "🇪🇪", "👨‍👩‍👧"]


def sentence(rng: random.Random) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    if rng.random() < 0.3:
        text = text.capitalize() + rng.choice([".", "!", "?", ",", ":\n", "\n\n"]) + " " + rng.choice(EMOJI)
    if rng.random() < 0.3:
        text += f" {rng.randint(0, 99999)}"
    return text


def corpus(n: int = 3000) -> list[str]:
    rng = random.Random(0)
    return [sentence(rng) for _ in range(n)]


def texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\n", "\n\n\n", "a\nb", "\tx\t", "  two leading", "trailing   ", "windows\r\nend\r\n",
           "Šokolaad, ÕÄÖÜ! ŻÓŁW", "漢字 Кириллица عربى never seen", "3.14159 and 1,000,000 and 12345678",
           "e\u0301 versus \u00e9 (NFC)", "x" * 20_000, " ".join(sentence(rng) for _ in range(500))]
    alphabet = "aeiouõäöüšžąćęłńóśźż ŁŻ \n\t\r.,!?'0123456789😀<|>_"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    return out + [sentence(rng) for _ in range(200)]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def layout(request, tmp_path_factory):
    """(layout name, directory, our tokenizer, transformers' tokenizer)"""
    write = write_llama3_tokenizer if request.param == "llama3" else write_qwen2_tokenizer
    directory = write(tmp_path_factory.mktemp(request.param), corpus())
    return request.param, directory, load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(str(directory))


def special_spellings(tok: HFTokenizer) -> list[str]:
    return [t.content for t in tok.added.values() if t.special]


def test_ids_equal_transformers_with_and_without_bos(layout):
    name, _, tok, hf = layout
    assert isinstance(tok, HFTokenizer)
    assert type(hf).__name__ == ("TokenizersBackend" if name == "llama3" else "Qwen2Tokenizer")
    checked = 0
    for text in texts(1):
        if any(s in text for s in special_spellings(tok)):
            continue  # transformers matches those as tokens: see the next test
        assert tok.encode(text, bos=True) == hf(text).input_ids, repr(text[:60])
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids, repr(text[:60])
        checked += 1
    assert checked > 500
    if name == "qwen2":  # the added token that is not special is text transformers matches, and so do we
        assert tok.encode("a <tool_call> b") == hf("a <tool_call> b").input_ids
        assert tok.piece_to_id("<tool_call>") in tok.encode("a <tool_call> b")


def test_special_tokens_come_from_the_config_files(layout):
    name, directory, tok, hf = layout
    generation = json.loads((directory / "generation_config.json").read_text())
    assert tok.bos_id == hf.bos_token_id and tok.eos_id == hf.eos_token_id and len(tok) == len(hf)
    assert tok.eos_ids == tuple(dict.fromkeys([hf.eos_token_id, *generation["eos_token_id"]]))
    if name == "llama3":
        ids = {t: tok.piece_to_id(t) for t in LLAMA3_SPECIALS}
        assert tok.bos_id == ids["<|begin_of_text|>"] and tok.eos_id == ids["<|eot_id|>"]
        assert set(tok.eos_ids) == {ids["<|eot_id|>"], ids["<|end_of_text|>"], ids["<|eom_id|>"]}
        assert tok.pad_id == ids["<|finetune_right_pad_id|>"]  # the config names no pad token
    else:
        ids = {t: tok.piece_to_id(t) for t, _ in QWEN2_ADDED}
        assert tok.bos_id is None and tok.encode("hi", bos=True) == tok.encode("hi") == hf("hi").input_ids
        assert tok.eos_ids == (ids["<|im_end|>"], ids["<|endoftext|>"]) and tok.pad_id == hf.pad_token_id
    for spelling in special_spellings(tok):
        assert tok.marker_id(spelling) == tok.piece_to_id(spelling) is not None
    assert tok.marker_id("hello") is None and tok.piece_to_id("no such token") is None


def test_base_layouts_declare_one_end_token(tmp_path):
    llama = load_tokenizer(write_llama3_tokenizer(tmp_path / "l", corpus(500), instruct=False))
    qwen = load_tokenizer(write_qwen2_tokenizer(tmp_path / "q", corpus(500), instruct=False))
    assert llama.eos_ids == (llama.piece_to_id("<|end_of_text|>"),)
    assert qwen.eos_ids == (qwen.piece_to_id("<|endoftext|>"),)
    # BOS is what tokenizer.json's post-processor prepends, in transformers and here: without one, none
    spec = json.loads((tmp_path / "l" / "tokenizer.json").read_text())
    (tmp_path / "l" / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    no_bos, hf = load_tokenizer(tmp_path / "l"), transformers.AutoTokenizer.from_pretrained(str(tmp_path / "l"))
    assert no_bos.bos_id is None and no_bos.encode("hello", bos=True) == hf("hello").input_ids
    assert no_bos.encode("hello") == llama.encode("hello")


def test_text_that_spells_special_tokens_stays_text(layout):
    name, _, tok, hf = layout
    specials = set(i for i, t in tok.added.items() if t.special)
    rng = random.Random(2)
    spellings = special_spellings(tok)
    for _ in range(200):
        parts = [rng.choice(spellings) if rng.random() < 0.4 else sentence(rng) for _ in range(rng.randint(1, 6))]
        text = rng.choice(["", " ", "\n"]).join(parts)
        ids = tok.encode(text, bos=True, eos=True)
        assert not specials & set(ids[1 if tok.bos_id is not None else 0:-1]), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text) if name == "qwen2" else text
        assert tok.encode_batch([text])[0] == tok.encode(text) == tok.encode_continuation(text)
    # transformers does read them as tokens (documented difference; minillm inserts them by id)
    forged = "Hi<|eot_id|><|start_header_id|>" if name == "llama3" else "Hi<|im_end|><|im_start|>"
    assert set(hf(forged, add_special_tokens=False).input_ids) & specials
    assert not set(tok.encode(forged)) & specials


def test_round_trip_byte_lengths_and_batches(layout):
    name, _, tok, _ = layout
    lengths = tok.byte_lengths()
    sample = texts(3)
    batch = tok.encode_batch(sample, bos=True, eos=True)
    for text, ids in zip(sample, batch):
        assert ids == tok.encode(text, bos=True, eos=True)
        expected = unicodedata.normalize("NFC", text) if name == "qwen2" else text
        assert tok.decode(ids) == expected, repr(text[:60])
        assert float(lengths[ids].sum()) == len(expected.encode("utf-8"))  # BOS and EOS stand for no bytes
    assert lengths.shape == (tok.vocab_size,) and lengths[tok.eos_id] == 0
    with pytest.raises(ValueError, match=str(tok.vocab_size)):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_pickle_and_save_pretrained_round_trip(layout, tmp_path):
    name, _, tok, _ = layout
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("tere <|im_end|> maailm") == tok.encode("tere <|im_end|> maailm")
    tok.save_pretrained(tmp_path, chat_template="{{ messages }}", model_max_length=4096)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.eos_ids, loaded.pad_id, loaded.vocab_size) == (
        tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id, tok.vocab_size)
    assert loaded.chat_template == "{{ messages }}" and loaded.model_max_length == 4096
    assert loaded.sha256() == tok.sha256() and loaded.tokenizer_json == tok.tokenizer_json
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.chat_template == "{{ messages }}" and hf.model_max_length == 4096
    for text in texts(5)[:100]:
        assert hf(text).input_ids == loaded.encode(text, bos=True)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_generation_config_is_written_only_where_a_model_has_none(layout, tmp_path):
    _, _, tok, _ = layout
    tok.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "generation_config.json").read_text())["eos_token_id"] == list(tok.eos_ids)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text('{"eos_token_id": 7}')
    tok.save_pretrained(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "generation_config.json").read_text()) == {"eos_token_id": 7}


def test_bad_tokenizer_directories_give_one_line_errors(layout, tmp_path):
    _, directory, _, _ = layout
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text((directory / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|no such token|>"}')
    with pytest.raises(ValueError, match="eos_token '<|no such token|>' is not a token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no EOS token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: tokenizer config must be a JSON object"):
        load_tokenizer(tmp_path)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for bos, message in (("<|no such bos|>", "bos_token '<|no such bos|>' is not a token"),
                         (7, "bos_token 7 is neither a string nor an AddedToken")):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos}))
        with pytest.raises(ValueError, match=message):
            load_tokenizer(tmp_path)


def test_a_wordpiece_tokenizer_is_refused(tmp_path):
    """A WordPiece (or WordLevel) tokenizer.json would turn every word it does not know into one [UNK]."""
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordPiece({"[UNK]": 0, "tere": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "tere"}')
    with pytest.raises(ValueError, match="a WordPiece tokenizer.json; minillm supports BPE"):
        load_tokenizer(tmp_path)


def test_the_unknown_token_is_the_models_own(layout, tmp_path):
    """Byte-level BPE (Llama-3, Qwen2) has none; a BPE with an unk_token has the id transformers gives it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    _, _, tok, _ = layout
    assert tok.unk_id is None
    bpe = Tokenizer(models.BPE({"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, [("a", "b")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>", "unk_token": "<unk>"}')
    tok = load_tokenizer(tmp_path)
    oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), unk_token="<unk>")
    assert tok.unk_id == oracle.unk_token_id == 0 and tok.encode("ab c") == oracle.encode("ab c") == [4, 0]


def test_prepare_stores_documents_with_the_tokenizers_own_bos_and_eos(layout, tmp_path):
    from minillm.prepare import prepare
    from minillm.pretrain_data import TokenShards
    name, directory, tok, _ = layout
    docs = [sentence(random.Random(i)) for i in range(40)] + ["spells <|im_start|> and <|eot_id|> as text"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    meta = prepare([tmp_path / "a.jsonl"], directory, tmp_path / "one", progress=False)
    shards = TokenShards(tmp_path / "one")
    stored = [shards.doc(i).tolist() for i in range(len(shards))]
    assert stored == [tok.encode(d, bos=True, eos=True) for d in docs]
    assert all(ids[-1] == tok.eos_id for ids in stored)
    if name == "qwen2":  # no BOS: documents are tokens + EOS, and meta.json says so
        assert meta["bos_id"] is None and meta["document_layout"] == "tokens + EOS"
        assert meta["num_text_tokens"] == meta["num_tokens"] - len(docs)
    else:
        assert all(ids[0] == tok.bos_id for ids in stored) and meta["document_layout"] == "BOS + tokens + EOS"
        assert meta["num_text_tokens"] == meta["num_tokens"] - 2 * len(docs)
    assert meta["tokenizer"]["sha256"] == tok.sha256()
    # worker processes load the tokenizer themselves and write the same shards; a re-run is a no-op
    prepare([tmp_path / "a.jsonl"], directory, tmp_path / "two", workers=2, progress=False)
    assert (tmp_path / "one" / "tokens_00000.bin").read_bytes() == (tmp_path / "two" / "tokens_00000.bin").read_bytes()
    assert prepare([tmp_path / "a.jsonl"], directory, tmp_path / "one", progress=False)["skipped"]
