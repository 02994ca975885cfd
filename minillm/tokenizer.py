"""Tokenizers: `load_tokenizer` reads either kind a base model ships, and the sentencepiece kind itself.

Two kinds, one interface (callers never care which they hold):
  tokenizer.model  sentencepiece BPE, Llama-2 / TinyLlama / Mistral-7B: `SentencePieceTokenizer`, below.
  tokenizer.json   Hugging Face `tokenizers` (byte-level BPE), Llama-3.x / Qwen2.5 / Mistral-Nemo:
                   minillm.hf_tokenizer.HFTokenizer.
A directory with tokenizer.model loads the sentencepiece kind (as transformers' slow tokenizer would), one
with only tokenizer.json the other. Both have: vocab_size, bos_id (None when the tokenizer puts no BOS
before a text), eos_id, eos_ids (every end id the model declares: eos_id, then generation_config.json's),
pad_id, chat_template, model_max_length, encode(text, bos=, eos=), encode_continuation, encode_batch,
decode, id_to_piece, piece_to_id (None when absent), marker_id, control_ids (every control token and marker),
byte_lengths, sha256, save_pretrained.

Text is text, for both kinds: the spelling of a control token or a chat marker in the text ("<|user|>"
typed in a message) is encoded as ordinary text, never as that token, so nobody can forge a chat turn;
minillm.chat_format inserts markers by id (`marker_id`).

Llama-2 (and TinyLlama, Mistral-7B) ship `tokenizer.model`, a sentencepiece BPE model with byte fallback:
ids 0/1/2 are <unk>/<s>/</s>, then 256 byte pieces <0x00>..<0xFF> so that *any* text encodes without <unk>,
then the learned pieces. Text is not normalised (normalizer "identity"), a space is written '▁', and a '▁' is
prepended to the whole text ("dummy prefix"), so "Tere" and " Tere" both start a word. `SentencePieceTokenizer.train`
produces a model with the same conventions, plus the chat markers in CHAT_TOKENS as single pieces.
sentencepiece matches user-defined pieces anywhere in a text, so encoding uses a copy of the model in which
the pieces spelled like markers ("<|...|>") are control pieces, which sentencepiece never produces from text.

`save_pretrained(dir)` writes the Hugging Face layout: tokenizer.model, tokenizer.json (what transformers'
fast tokenizer reads; written here so that loading needs neither protobuf nor transformers' converter),
tokenizer_config.json and special_tokens_map.json. `transformers.AutoTokenizer.from_pretrained(dir)` then
gives the same ids as `encode(text, bos=True)`, with two differences that are transformers' own (its
LlamaTokenizer does the same to Meta's Llama-2 tokenizer): text that *starts* with whitespace gets no
dummy prefix there (" x" encodes like "x"), and "<s>" / "</s>" / the chat markers typed in the text become
control tokens.

Round-trip caveat (sentencepiece, not this wrapper): decode(encode(text)) == text for every string that does
not contain the character '▁' (U+2581), which sentencepiece uses internally as its space marker and decodes
to ' '. Empty strings, newlines, tabs, runs of spaces and leading spaces all round-trip (newlines and other
characters the model has no piece for go through byte fallback).

The .model file is a protobuf message, read and edited by minillm/sentencepiece_model.py.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import sentencepiece as spm
import torch

from minillm.corpora import CorpusOptions, check_readable, expand_inputs, iter_texts
from minillm.files import atomic_write, to_json
from minillm.hf_tokenizer import (
    CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_JSON, HFTokenizer, chat_template_and_max_length, declared_eos_ids,
    read_json_file, save_generation_config,
)
from minillm.options import cli, parse_options, require_option
from minillm.sentencepiece_model import (
    PIECE_BYTE, PIECE_CONTROL, PIECE_UNKNOWN, PIECE_USER_DEFINED, bpe_merges, read_normalizer_spec, read_pieces,
    read_trainer_spec, rewrite_model_proto,
)

log = logging.getLogger(__name__)

# Role markers of the Tulu chat layout (SFT / ORPO). Trained tokenizers carry them as "user-defined symbols"
# (single pieces); only minillm.chat_format puts them in a sequence, by id.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

MODEL_FILE = "tokenizer.model"


def load_tokenizer(path: str | os.PathLike) -> "SentencePieceTokenizer | HFTokenizer":
    """The tokenizer of a Hugging Face directory: tokenizer.model (sentencepiece) when it has one, else
    tokenizer.json. A path to a .model or a tokenizer.json file also works."""
    path = Path(path)
    if path.is_file():
        kind = HFTokenizer if path.suffix == ".json" else SentencePieceTokenizer
        return kind.from_pretrained(path)
    if (path / MODEL_FILE).is_file():
        return SentencePieceTokenizer.from_pretrained(path)
    if (path / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_pretrained(path)
    what = "no such directory" if not path.exists() else f"neither {MODEL_FILE} nor {TOKENIZER_JSON} there"
    raise ValueError(f"{path}: no tokenizer ({what})")


def is_marker(piece: str) -> bool:
    """Spelled like a control marker, <|...|> (Tulu's <|user|>, Llama-3's <|eot_id|>, ChatML's <|im_end|>)."""
    return len(piece) > 4 and piece.startswith("<|") and piece.endswith("|>")


class SentencePieceTokenizer:
    """A sentencepiece model with Llama's special-token conventions.

    pad_id: the model's pad piece if it has one. Llama-2's tokenizer has none (pad_id -1 in sentencepiece);
    then pad_id falls back to unk_id, not eos_id: with byte fallback, encode() never emits <unk>, so padding
    with it can never be confused with real text, whereas padding with EOS makes any code that masks pad
    positions also mask the genuine end-of-sequence tokens the model must learn to predict.
    """

    def __init__(self, model_file: str | os.PathLike):
        path = Path(model_file)
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read sentencepiece model ({e.strerror or e})") from None
        self._load(proto, str(path))

    @classmethod
    def from_model_proto(cls, proto: bytes, name: str = "<memory>") -> "SentencePieceTokenizer":
        """Build from the bytes of a .model file (e.g. one edited by minillm.vocab)."""
        tok = cls.__new__(cls)
        tok._load(proto, name)
        return tok

    def _load(self, proto: bytes, name: str):
        self.name = name
        self.model_proto = proto  # kept so save_pretrained writes back exactly what was loaded
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{name}: not a valid sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.has_pad_piece = self.sp.pad_id() >= 0
        self.pad_id = self.sp.pad_id() if self.has_pad_piece else self.unk_id  # see class docstring
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{name}: the model has no BOS or EOS piece (bos_id={self.bos_id}, "
                             f"eos_id={self.eos_id}); minillm needs both")
        self.eos_ids = (self.eos_id,)  # from_pretrained adds generation_config.json's
        self.special_ids = frozenset({self.bos_id, self.eos_id, self.pad_id})
        pieces = read_pieces(proto)
        self._markers = {p: i for i, (p, _, kind) in enumerate(pieces)
                         if kind == PIECE_CONTROL or (kind == PIECE_USER_DEFINED and is_marker(p))}
        self.control_ids = frozenset(self._markers.values())  # what text never produces: never text to show
        # Text is encoded by a copy in which the marker pieces are control pieces (see the module docstring);
        # the other user-defined pieces still match in text, as in sentencepiece and transformers.
        self._text_proto, self._sp_text = proto, self.sp
        if any(pieces[i][2] == PIECE_USER_DEFINED for i in self._markers.values()):
            self._text_proto = rewrite_model_proto(
                proto, [(p, score, PIECE_CONTROL if p in self._markers else kind) for p, score, kind in pieces],
                drop_self_test=True)
            self._sp_text = spm.SentencePieceProcessor()
            self._sp_text.LoadFromSerializedProto(self._text_proto)
        self.user_defined_symbols = tuple(p for p, _, kind in pieces
                                          if kind == PIECE_USER_DEFINED and p not in self._markers)
        self._sp_continuation = None  # the same model without the dummy prefix, built on first use
        # Read from tokenizer_config.json by from_pretrained, written back by save_pretrained.
        self.chat_template: str | None = None
        self.model_max_length: int | None = None

    # Picklable (for multiprocessing): the state is the model file's bytes, not the C++ processor.
    def __getstate__(self):
        return {"proto": self.model_proto, "name": self.name, "chat_template": self.chat_template,
                "model_max_length": self.model_max_length, "eos_ids": self.eos_ids}

    def __setstate__(self, state):
        self._load(state["proto"], state["name"])
        self.chat_template, self.model_max_length = state["chat_template"], state["model_max_length"]
        self.eos_ids = state["eos_ids"]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as sentencepiece (and Meta's Llama code) segments it, except that
        markers in the text stay text (see the module docstring) and that text starting with one of the
        other user-defined pieces gets no dummy-prefix '▁' before it: sentencepiece would emit a stray '▁'
        token there, Hugging Face's Llama tokenizer (and so vLLM, lm-eval) does not."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.user_defined_symbols and text.startswith(self.user_defined_symbols):
            ids = self.encode_continuation(text)
        else:
            ids = self._sp_text.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as a continuation of earlier text: no dummy-prefix '▁' is added at its start, so
        "kool" gives the pieces of a word-internal "kool" and " kool" those of a new word."""
        if self._sp_continuation is None:
            self._sp_continuation = spm.SentencePieceProcessor()
            self._sp_continuation.LoadFromSerializedProto(
                rewrite_model_proto(self._text_proto, add_dummy_prefix=False, drop_self_test=True))
        return self._sp_continuation.encode(text)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """[encode(t, bos, eos) for t in texts], run in sentencepiece's C++ thread pool."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
        out = self._sp_text.encode(texts, num_threads=num_threads)
        if self.user_defined_symbols:  # the rare chat-marker-first texts: see encode()
            out = [self.encode_continuation(t) if t.startswith(self.user_defined_symbols) else ids
                   for t, ids in zip(texts, out)]
        head, tail = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
        return [head + ids + tail for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping BOS, EOS and pad. Accepts lists, tuples, numpy arrays and 1-D tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the tokenizer's vocabulary "
                                 f"({self.vocab_size} pieces, ids 0..{self.vocab_size - 1})")
        return self.sp.decode([i for i in ids if i not in self.special_ids])

    def piece_to_id(self, piece: str) -> int | None:
        """Id of `piece` ('▁the', '<0x0A>', '<|user|>'), or None when the vocabulary has no such piece."""
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def marker_id(self, spelling: str) -> int | None:
        """Id of `spelling` when it is a control piece or a marker piece (one text never produces), else None."""
        return self._markers.get(spelling)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the tokenizer's vocabulary ({self.vocab_size} pieces)")
        return self.sp.id_to_piece(i)

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes each token id stands for (float64 [vocab]), so validation can report bits per byte: a
        measure that does not depend on the tokenizer (an extended vocabulary stays comparable)."""
        lengths = []
        for i, (piece, _, kind) in enumerate(read_pieces(self.model_proto)):
            if kind in (PIECE_CONTROL, PIECE_UNKNOWN, PIECE_USER_DEFINED) or i in self.special_ids:
                lengths.append(0)  # control symbols, <unk> and the chat markers: no text
            elif kind == PIECE_BYTE:
                lengths.append(1)  # a byte-fallback piece <0xNN>
            else:
                lengths.append(len(piece.replace("\u2581", " ").encode("utf-8")))
        return torch.tensor(lengths, dtype=torch.float64)

    def sha256(self) -> str:
        """Identifies what ids this tokenizer gives: the sha256 of its .model file."""
        return hashlib.sha256(self.model_proto).hexdigest()

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, inputs, model_prefix: str | os.PathLike, vocab_size: int, *,
              user_defined_symbols: Iterable[str] = CHAT_TOKENS, pad_piece: bool = False,
              character_coverage: float = 0.9999, max_sentence_length: int = 16384,
              input_sentence_size: int = 0, num_threads: int | None = None, seed: int = 0,
              verbose: bool = False, source: str | None = None, **sp_options) -> "SentencePieceTokenizer":
        """Train a Llama-style BPE tokenizer and write `{model_prefix}.model` (atomically).

        inputs: a text file path, a list of paths, or any other iterable of strings (documents; each line
          becomes one training sentence, as with files).
        Settings copied from Llama-2's tokenizer: BPE, byte_fallback (no <unk> ever), split_digits (numbers
        are spelled digit by digit), identity normalisation (no NFKC: encode/decode round-trips exactly),
        dummy prefix on, extra whitespace kept. user_defined_symbols (default CHAT_TOKENS) become single
        pieces. pad_piece=True adds a '<pad>' piece (id 3); by default there is none, as in Llama-2.
        Lines longer than max_sentence_length bytes are skipped *for training* (encode handles any length).
        input_sentence_size > 0 trains on that many randomly sampled lines (bounds memory on big corpora).
        source: what an iterator's text came from (its files), for error messages.
        Extra keyword arguments go to sentencepiece's trainer unchanged.
        """
        model_prefix = Path(model_prefix)
        options = dict(
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, character_coverage=character_coverage,
            user_defined_symbols=list(user_defined_symbols), unk_id=0, bos_id=1, eos_id=2,
            pad_id=3 if pad_piece else -1, unk_surface=" \u2047 ", max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=0 if verbose else 2,
        )
        options.update(sp_options)
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(f, (str, os.PathLike)) for f in inputs):
            files = [str(f) for f in inputs]
            for f in files:
                if not os.path.isfile(f):
                    raise ValueError(f"{f}: training file does not exist (pass a list of file paths, "
                                     f"or an iterator of text)")
            source = ", ".join(files)
            if all(os.path.getsize(f) == 0 for f in files):
                raise ValueError(f"{source}: empty training corpus")
            options["input"] = files
        else:
            lines = [line for doc in inputs for line in str(doc).splitlines() if line]
            if not lines:
                raise ValueError("SentencePieceTokenizer.train: empty training corpus (the text iterator gave no text)")
            source = source or f"<{len(lines)} lines of text>"  # (what the caller says the text came from)
            options["sentence_iterator"] = iter(lines)

        spm.set_random_generator_seed(seed)
        buffer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(model_writer=buffer, **options)
        except RuntimeError as e:
            # e.g. "Vocabulary size too high (5000). Please set it to a value <= 1234."
            raise ValueError(f"{source}: sentencepiece training failed: {e}") from None
        out = Path(str(model_prefix) + ".model")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, buffer.getvalue())
        return cls(out)

    # ------------------------------------------------------------------ Hugging Face layout
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load DIR/tokenizer.model (a path to a .model file also works). chat_template and
        model_max_length are read from DIR/tokenizer_config.json, extra end ids from
        DIR/generation_config.json, when present."""
        path = Path(path)
        if path.is_file():
            return cls(path)
        if not (path / MODEL_FILE).is_file():
            raise ValueError(f"{path / MODEL_FILE}: no sentencepiece tokenizer.model")
        tok = cls(path / MODEL_FILE)
        config = read_json_file(path / CONFIG_FILE, "tokenizer config")
        tok.chat_template, tok.model_max_length = chat_template_and_max_length(config, path)
        generation = read_json_file(path / GENERATION_CONFIG_FILE, "generation config")
        tok.eos_ids = tuple(dict.fromkeys([tok.eos_id, *declared_eos_ids(generation)]))
        return tok

    def save_pretrained(self, path: str | os.PathLike, chat_template: str | None = None,
                        model_max_length: int | None = None):
        """Write tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json into `path`.

        Each file is written atomically. chat_template / model_max_length default to this tokenizer's
        attributes (set by from_pretrained or by the caller; saving does not change them).
        generation_config.json is written as HFTokenizer.save_pretrained writes it (only with end ids beyond
        EOS, only where there is none)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / MODEL_FILE, self.model_proto)
        fast = self.hf_tokenizer_json()
        if fast is not None:
            atomic_write(path / "tokenizer.json", to_json(fast))
        else:  # let transformers convert tokenizer.model itself (needs the protobuf package)
            (path / "tokenizer.json").unlink(missing_ok=True)
        config = self.hf_tokenizer_config(self.chat_template if chat_template is None else chat_template,
                                          self.model_max_length if model_max_length is None else model_max_length)
        atomic_write(path / "tokenizer_config.json", to_json(config))
        special = {"bos_token": self.sp.id_to_piece(self.bos_id), "eos_token": self.sp.id_to_piece(self.eos_id),
                   "unk_token": self.sp.id_to_piece(self.unk_id), "pad_token": self.sp.id_to_piece(self.pad_id)}
        atomic_write(path / "special_tokens_map.json", to_json(special))
        save_generation_config(path, self.bos_id, self.eos_ids)

    def hf_tokenizer_config(self, chat_template: str | None, model_max_length: int | None) -> dict:
        piece = self.sp.id_to_piece
        normalizer = read_normalizer_spec(self.model_proto)
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            # legacy=False + add_prefix_space: the dummy prefix goes only before the start of the text,
            # as sentencepiece does (the "legacy" Llama behaviour also added one after special tokens).
            "legacy": False,
            "add_prefix_space": normalizer["add_dummy_prefix"],
            "bos_token": piece(self.bos_id),
            "eos_token": piece(self.eos_id),
            "unk_token": piece(self.unk_id),
            "pad_token": piece(self.pad_id),  # <unk> when the model has no pad piece (class docstring)
            "clean_up_tokenization_spaces": False,
            "padding_side": "left",  # what batched generation needs; training code pads by itself
            "added_tokens_decoder": {
                str(i): {"content": p, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False, "special": kind != PIECE_USER_DEFINED or p in self._markers}
                for i, (p, _, kind) in enumerate(read_pieces(self.model_proto))
                if kind in (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)
            },
        }
        if model_max_length is not None:  # absent = no limit, as in transformers
            config["model_max_length"] = model_max_length
        if chat_template is not None:
            config["chat_template"] = chat_template
        return config

    def hf_tokenizer_json(self) -> dict | None:
        """The `tokenizers` (fast tokenizer) equivalent of this BPE model, or None when it has no exact
        equivalent (non-BPE model, or a normaliser other than identity)."""
        trainer = read_trainer_spec(self.model_proto)
        normalizer = read_normalizer_spec(self.model_proto)
        if (trainer["model_type"] != 2 or normalizer["precompiled_charsmap"] or normalizer["remove_extra_whitespaces"]
                or not normalizer["escape_whitespaces"]):
            log.warning("%s: not a Llama-style BPE model with identity normalisation; writing no tokenizer.json "
                        "(transformers will convert tokenizer.model itself, which needs protobuf)", self.name)
            return None
        pieces = read_pieces(self.model_proto)
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        merges = bpe_merges(pieces)
        piece = self.sp.id_to_piece
        added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": kind != PIECE_USER_DEFINED or p in self._markers}
                 for i, (p, _, kind) in enumerate(pieces) if kind in (PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED)]
        bos = piece(self.bos_id)
        prepend = normalizer["add_dummy_prefix"]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581",
                              "prepend_scheme": "first" if prepend else "never", "split": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.bos_id], "tokens": [bos]}},
            },
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prepend else [])},
            "model": {"type": "BPE", "dropout": None, "unk_token": piece(self.unk_id),
                      "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                      "byte_fallback": trainer["byte_fallback"], "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        }



def check_vocab_fits(tokenizer: "SentencePieceTokenizer | HFTokenizer | int", model_vocab_size: int):
    """Raise ValueError (naming both sizes) when token ids could index past the model's embedding table.

    The table may be larger than the tokenizer (padded to a multiple of 64 for fast matmuls, or
    Llama-2's 32000 rows for a smaller tokenizer) but never smaller."""
    tok_size = tokenizer if isinstance(tokenizer, int) else tokenizer.vocab_size
    if tok_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocabulary ({tok_size} pieces) does not fit the model's embedding table "
            f"(vocab_size {model_vocab_size}): ids {model_vocab_size}..{tok_size - 1} have no embedding row; "
            f"use a matching tokenizer or resize the model (python -m minillm.vocab)")



# ---------------------------------------------------------------------- CLI
@dataclass(kw_only=True)
class TokenizerTrainOptions(CorpusOptions):
    """Train a Llama-style BPE tokenizer (byte fallback, split digits, chat markers) on text corpora."""
    vocab_size: int  # pieces in the trained vocabulary
    out: str  # output directory, written in the Hugging Face layout (tokenizer.model, tokenizer.json, ...)
    seed: int = 0  # sentencepiece's random seed (sampling of training lines)

    def check(self):
        require_option(self.vocab_size >= 1, "vocab_size", self.vocab_size, "must be a positive number of pieces")


@cli
def main(argv=None):
    _, cfg = parse_options({"train": TokenizerTrainOptions}, argv, prog="python -m minillm.tokenizer",
                           description="Tokenizer tools.")
    inputs = expand_inputs(cfg.input, cfg.format)
    for path in inputs:
        check_readable(path, cfg.format, cfg.text_field)
    out = Path(cfg.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # (an unwritable --out fails here, before the training)
    try:
        tok = SentencePieceTokenizer.train(iter_texts(inputs, cfg.format, cfg.text_field, cfg.txt_docs),
                                           out / "tokenizer", cfg.vocab_size, seed=cfg.seed,
                                           source=", ".join(map(str, inputs)))
    except BaseException:
        if created:  # a failed training leaves nothing behind
            out.rmdir()
        raise
    tok.save_pretrained(out)
    print(f"trained {tok.vocab_size}-piece tokenizer -> {out}")


if __name__ == "__main__":
    main()
