"""The Hugging Face kind of tokenizer: a `tokenizer.json` read with the `tokenizers` library (the Rust library
transformers itself uses), with the special tokens its directory's config files declare.

Llama-3.x, Qwen2.5 and Mistral-Nemo ship no sentencepiece model, only `tokenizer.json`: byte-level BPE (every
byte is a token, so any text encodes), a regex pre-tokenizer, and control tokens such as <|begin_of_text|>,
<|eot_id|> or <|im_start|> as "added tokens". `HFTokenizer` has the methods of minillm.tokenizer's
sentencepiece kind, so callers never care which one they hold (minillm.tokenizer.load_tokenizer picks).

Special tokens come from the directory's own files, as transformers reads them:
  bos_id   the token the tokenizer puts before a text: what tokenizer.json's post-processor prepends, as
           in transformers (Llama-3: <|begin_of_text|>); None when it prepends nothing (Qwen2: no BOS), and
           then `encode(text, bos=True)` is `encode(text)`, as transformers' `tokenizer(text)` is.
  eos_id   tokenizer_config.json's eos_token (Llama-3.1-Instruct: <|eot_id|>; Qwen2.5-Instruct: <|im_end|>).
  eos_ids  every end id the directory declares: eos_id, then generation_config.json's eos_token_id (an id or
           a list: Llama-3.1-Instruct stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>).
  pad_id   the config's pad_token; else an added special token that names padding or is reserved
           (<|finetune_right_pad_id|>, <|reserved_special_token_0|>); else eos_id. minillm never finds pad
           positions by their id (labels and document ids mark them), so any id works.
Text is text: `encode` never turns the spelling of a special added token ("<|eot_id|>" typed in a message)
into that token (tokenizers' encode_special_tokens), so a user cannot forge a chat turn. Only
minillm.chat_format inserts such tokens, by id. transformers' own tokenizer does match them in text; ids
equal `AutoTokenizer.from_pretrained(dir)`'s for every text that does not spell a special token.

decode(encode(text)) == text up to the tokenizer's normaliser (Qwen2 applies NFC). `decode` applies none of
transformers' clean-up of spaces (Llama-3's config asks for it), so it is the exact inverse.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer as RustTokenizer

from minillm.files import atomic_write, read_json_object, to_json

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


# ============================================================================ the config files of a directory

def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path` ({} when the file does not exist); one-line ValueError when unreadable."""
    return read_json_object(path, what) if path.is_file() else {}


def chat_template_and_max_length(config: dict, directory: Path | None = None) -> tuple[str | None, int | None]:
    """The chat template (tokenizer_config.json's, else DIR/chat_template.jinja, where transformers >= 4.43
    saves it) and model_max_length (None for transformers' ~1e30 "no limit") of a tokenizer config."""
    template = config.get("chat_template")
    template_file = directory / "chat_template.jinja" if directory is not None else None
    if template is None and template_file is not None and template_file.is_file():
        template = template_file.read_text(encoding="utf-8")
    max_len = config.get("model_max_length")
    return template, int(max_len) if isinstance(max_len, int) and max_len < 2**40 else None


def declared_eos_ids(generation_config: dict) -> list[int]:
    """generation_config.json's eos_token_id as a list (it may be one id, a list, or absent)."""
    value = generation_config.get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [int(v) for v in values]


def token_text(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ============================================================================ the tokenizer

class HFTokenizer:
    """A tokenizer.json (+ tokenizer_config.json, generation_config.json) with minillm's tokenizer methods."""

    def __init__(self, tokenizer_json: str, config: dict | None = None, generation_config: dict | None = None,
                 name: str = "<memory>"):
        self.name = name
        self.tokenizer_json = tokenizer_json  # kept verbatim: save_pretrained writes back what was loaded
        self.config = dict(config or {})
        self.generation_config = dict(generation_config or {})
        try:
            self._tok = RustTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{name}: not a valid tokenizer.json ({e})") from None
        kind = type(self._tok.model).__name__
        if kind not in ("BPE", "Unigram"):  # WordPiece / WordLevel would turn unknown words into one <unk>
            raise ValueError(f"{name}: a {kind} tokenizer.json; minillm supports BPE (Llama-3, Qwen2, Mistral) "
                             "and Unigram models")
        for field in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = self.config.get(field)
            if value is not None and token_text(value) is None:
                raise ValueError(f"{name}: tokenizer_config.json's {field} {value!r} is neither a string nor an "
                                 "AddedToken object with a \"content\" string")
        self._tok.encode_special_tokens = True  # text is text: see the module docstring
        self._continuation = None  # built on first use when the pre-tokenizer adds a prefix space
        self.added = dict(self._tok.get_added_tokens_decoder())  # id -> AddedToken (content, special, ...)
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id = self._find_bos()
        self.unk_id = self._find_unk()
        self._id_of(token_text(self.config.get("bos_token")), "bos_token")  # declared: it must exist
        eos = self._id_of(token_text(self.config.get("eos_token")), "eos_token")
        declared = declared_eos_ids(self.generation_config)
        if eos is None and not declared:
            raise ValueError(f"{name}: no EOS token (neither tokenizer_config.json's eos_token nor "
                             f"generation_config.json's eos_token_id); minillm needs one")
        self.eos_id = eos if eos is not None else declared[0]
        self.eos_ids = tuple(dict.fromkeys([self.eos_id, *declared]))
        self.pad_id = self._find_pad()
        self.special_ids = frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)
        self.control_ids = frozenset(i for i, t in self.added.items() if t.special)  # never text to show
        self.chat_template, self.model_max_length = chat_template_and_max_length(self.config)

    def _find_unk(self) -> int | None:
        """The id the model emits for text it cannot cover: BPE's unk_token, Unigram's unk_id; None for byte-level
        BPE (Llama-3, Qwen2: every text encodes without one)."""
        model = json.loads(self.tokenizer_json).get("model") or {}
        unk = model.get("unk_token") if model.get("type") == "BPE" else model.get("unk_id")
        return self._tok.token_to_id(unk) if isinstance(unk, str) else unk if isinstance(unk, int) else None

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.name}: tokenizer_config.json's {field} {token!r} is not a token of tokenizer.json")
        return i

    def _find_bos(self) -> int | None:
        """What the post-processor puts before a text (see the module docstring)."""
        plain = self._tok.encode("x", add_special_tokens=False).ids
        full = self._tok.encode("x", add_special_tokens=True).ids
        prefix = full[:full.index(plain[0])] if plain and plain[0] in full else []
        if len(prefix) > 1:
            raise ValueError(f"{self.name}: the post-processor puts {len(prefix)} tokens before a text; "
                             "minillm supports one BOS or none")
        return prefix[0] if prefix else None

    def _find_pad(self) -> int:
        pad = self._id_of(token_text(self.config.get("pad_token")), "pad_token")
        if pad is not None:
            return pad
        for word in ("pad", "reserved"):
            for i in sorted(self.added):
                if self.added[i].special and word in self.added[i].content and i not in (self.bos_id, *self.eos_ids):
                    return i
        return self.eos_id

    @functools.cached_property
    def spec(self) -> dict:
        """tokenizer.json parsed (on first use: a Llama-3 file is 9 MB, and most loads never need it)."""
        return json.loads(self.tokenizer_json)

    # Picklable (for worker processes): the state is the files' contents, not the Rust object.
    def __getstate__(self):
        return {"json": self.tokenizer_json, "config": self.config, "generation_config": self.generation_config,
                "name": self.name, "chat_template": self.chat_template, "model_max_length": self.model_max_length}

    def __setstate__(self, state):
        self.__init__(state["json"], state["config"], state["generation_config"], state["name"])
        self.chat_template, self.model_max_length = state["chat_template"], state["model_max_length"]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text` (special-token spellings stay text), with BOS (when the tokenizer has one) and EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of `text` as a continuation of earlier text: without the prefix space some pre-tokenizers add
        at the start of a text (byte-level BPE as in Llama-3 and Qwen2 adds none: there this is encode)."""
        if self._continuation is None:
            spec, changed = _without_prefix_space(self.spec)
            self._continuation = self._tok
            if changed:
                self._continuation = RustTokenizer.from_str(json.dumps(spec))
                self._continuation.encode_special_tokens = True
        return self._continuation.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        """[encode(t, bos, eos) for t in texts], in the `tokenizers` thread pool. num_threads is the
        sentencepiece kind's; here TOKENIZERS_PARALLELISM=false makes the pool one thread."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is {type(t).__name__}, expected str")
        return [self._wrap(e.ids, bos, eos) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping BOS, EOS and pad (other special tokens are written out). Accepts lists,
        tuples, numpy arrays and 1-D tensors."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._tok.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    def _check_id(self, i: int):
        if not 0 <= i < self.vocab_size or self._tok.id_to_token(i) is None:
            raise ValueError(f"token id {i} is outside the tokenizer's vocabulary "
                             f"({self.vocab_size} tokens, ids 0..{self.vocab_size - 1})")

    def piece_to_id(self, piece: str) -> int | None:
        """Id of the token spelled `piece` (byte-level spelling, e.g. 'Ġthe'), or None."""
        return self._tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        self._check_id(i)
        return self._tok.id_to_token(i)

    def split_token(self, token: str) -> list[int]:
        """Ids the model itself (no normaliser, no pre-tokenizer) splits a token's spelling into ('Ġkõik' in
        byte-level spelling): what a token added by vocabulary extension was made of before."""
        return [t.id for t in self._tok.model.tokenize(token)]

    def marker_id(self, spelling: str) -> int | None:
        """Id of `spelling` when it is a special added token (a control token text never produces), else None."""
        i = self._tok.token_to_id(spelling)
        return i if i is not None and i in self.added and self.added[i].special else None

    def byte_lengths(self) -> torch.Tensor:
        """UTF-8 bytes each token id stands for (float64 [vocab]; 0 for special tokens and unused ids)."""
        lengths = torch.zeros(self.vocab_size, dtype=torch.float64)
        byte_level = uses_component(self.spec.get("decoder"), "ByteLevel")
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            if byte_level:
                lengths[i] = len(token)  # one character of the byte-level alphabet per byte
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                lengths[i] = 1  # a byte-fallback token
            else:
                lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        for i, added in self.added.items():
            lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
        return lengths

    def sha256(self) -> str:
        """Identifies what ids this tokenizer gives: tokenizer.json and the special tokens the configs name."""
        specials = json.dumps([self.bos_id, self.eos_id, list(self.eos_ids), self.pad_id])
        return hashlib.sha256(self.tokenizer_json.encode("utf-8") + b"\n" + specials.encode()).hexdigest()

    # ------------------------------------------------------------------ Hugging Face layout
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "HFTokenizer":
        """Load DIR/tokenizer.json (or a tokenizer.json file) with DIR's tokenizer_config.json and
        generation_config.json."""
        path = Path(path)
        file, directory = (path, path.parent) if path.is_file() else (path / TOKENIZER_JSON, path)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: cannot read tokenizer.json ({getattr(e, 'strerror', None) or e})") from None
        config = read_json_file(directory / CONFIG_FILE, "tokenizer config")
        tok = cls(text, config, read_json_file(directory / GENERATION_CONFIG_FILE, "generation config"), str(file))
        tok.chat_template, tok.model_max_length = chat_template_and_max_length(config, directory)
        return tok

    def save_pretrained(self, path: str | os.PathLike, chat_template: str | None = None,
                        model_max_length: int | None = None):
        """Write tokenizer.json and tokenizer_config.json (its added_tokens_decoder listing tokenizer.json's
        added tokens, as transformers' Qwen2Tokenizer reads them from there) into `path`, atomically, and
        generation_config.json (see save_generation_config). chat_template / model_max_length default to this
        tokenizer's attributes (saving does not change them)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        chat_template = self.chat_template if chat_template is None else chat_template
        model_max_length = self.model_max_length if model_max_length is None else model_max_length
        atomic_write(path / TOKENIZER_JSON, self.tokenizer_json)
        config = copy.deepcopy(self.config)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special} for i, t in sorted(self.added.items())}
        for key, value in (("chat_template", chat_template), ("model_max_length", model_max_length)):
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        atomic_write(path / CONFIG_FILE, to_json(config))
        save_generation_config(path, self.bos_id, self.eos_ids)


def save_generation_config(path: Path, bos_id: int | None, eos_ids: tuple[int, ...]):
    """Write DIR/generation_config.json (bos and every end id) for a tokenizer that declares end ids beyond
    its eos_token (which tokenizer_config.json holds), unless DIR has one: a model's own generation config,
    which minillm.hf.save_pretrained writes before the tokenizer, wins."""
    if len(eos_ids) > 1 and not (path / GENERATION_CONFIG_FILE).exists():
        atomic_write(path / GENERATION_CONFIG_FILE, to_json({"bos_token_id": bos_id, "eos_token_id": list(eos_ids)}))


def uses_component(spec, component: str) -> bool:
    """Whether a tokenizer.json component (a dict, possibly a Sequence of them) is or contains `component`."""
    if isinstance(spec, dict):
        return spec.get("type") == component or any(uses_component(v, component) for v in spec.values())
    if isinstance(spec, list):
        return any(uses_component(v, component) for v in spec)
    return False


def _without_prefix_space(spec):
    """A copy of a tokenizer.json spec whose pre-tokenizer and normaliser add no space before the text
    (Metaspace prepend_scheme 'never', ByteLevel add_prefix_space false, no Prepend normaliser), and
    whether anything changed."""
    changed = False

    def walk(node):
        nonlocal changed
        if isinstance(node, list):
            kept = [walk(v) for v in node]
            out = [v for v in kept if not (isinstance(v, dict) and v.get("type") == "Prepend")]
            changed |= len(out) != len(kept)
            return out
        if not isinstance(node, dict):
            return node
        node = {k: walk(v) for k, v in node.items()}
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
            node["prepend_scheme"], changed = "never", True
        if node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            node["add_prefix_space"], changed = False, True
        return node

    out = walk(spec)
    if isinstance(out.get("normalizer"), dict) and out["normalizer"].get("type") == "Prepend":
        out["normalizer"], changed = None, True
    return out, changed
