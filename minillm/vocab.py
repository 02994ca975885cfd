"""Vocabulary extension: give an English-centric Llama tokenizer the pieces of a new language.

Llama-2's tokenizer splits an Estonian or Polish word into 2-4x as many tokens as an English one, so
every training step and every context window carries less text. The fix used after these papers
(Chinese-LLaMA, Cui et al. 2023, and many language adaptations since):

  1. train a tokenizer of the base's kind on target-language text: a sentencepiece BPE model
     (`train_target_tokenizer`) for a tokenizer.model base, a byte-level BPE with the base's normaliser
     and pre-tokenizer (`train_target_bpe`, the `tokenizers` trainer) for a tokenizer.json base;
  2. append what it has and the base lacks, so old ids never move and the old merges keep priority:
     sentencepiece pieces with scores below every existing piece (`extend_tokenizer`); BPE tokens with ids
     after every existing one and their merges ranked after every existing merge (`extend_bpe_tokenizer`);
  3. grow the embedding and output matrices (`resize_embeddings`), starting each new row at the mean of
     the rows of the old pieces that the old tokenizer splits the new piece into (`init_rows_from_old`),
     so "kõik" begins where the model's idea of "k"+"õ"+"ik" is, not at noise;
  4. continue pretraining (train_pretrain.py) so the new rows are learned.

What old text keeps: every old id keeps its piece, and the base's merges all apply before any new one, so
text made of words the old vocabulary has as single tokens encodes exactly as before; other text may change
where a new piece joins pieces the base left apart (mostly target-language words, which is the point).

Command line (writes the merged tokenizer, and the resized model when given one):

  python -m minillm.vocab extend --base llama2/ --corpus et.txt --new-vocab-size 16000 \\
      --out et-tokenizer/ --model-in llama2/ --model-out llama2-et/
  python -m minillm.vocab extend --base llama-3.1-8b/ --corpus et.txt --new-vocab-size 32000 \\
      --out et-tokenizer/ --model-in llama-3.1-8b/ --model-out llama-3.1-8b-et/ --pad-to-multiple-of 64

It prints tokens per word on target-language text before and after and writes the same numbers to
OUT/vocab_extension.json.
"""
from __future__ import annotations

import itertools
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import pre_tokenizers, trainers
from torch import nn

from minillm.corpora import check_readable, iter_texts
from minillm.files import atomic_write, read_lines, to_json
from minillm.hf import load_pretrained, save_pretrained
from minillm.model import OutputHead
from minillm.hf_tokenizer import HFTokenizer, uses_component
from minillm.options import cli, parse_options, require_option
from minillm.sentencepiece_model import PIECE_NORMAL, PIECE_USER_DEFINED, read_pieces, rewrite_model_proto
from minillm.tokenizer import CHAT_TOKENS, SentencePieceTokenizer, check_vocab_fits, load_tokenizer


# ---------------------------------------------------------------------- sentencepiece (tokenizer.model)
def train_target_tokenizer(corpus, vocab_size: int, workdir, **train_options) -> SentencePieceTokenizer:
    """A Llama-style BPE model of the target language alone (no chat markers: those are added, if wanted,
    as user-defined symbols by extend_tokenizer)."""
    return SentencePieceTokenizer.train(corpus, Path(workdir) / "target", vocab_size, user_defined_symbols=(),
                                        **train_options)


def new_pieces(base: SentencePieceTokenizer, target: SentencePieceTokenizer) -> list[str]:
    """Normal pieces of `target` that `base` does not have, in the target's priority order."""
    have = set(base.pieces())
    return [p for p, _, kind in read_pieces(target.model_proto) if kind == PIECE_NORMAL and p not in have]


def extend_tokenizer(base: SentencePieceTokenizer, pieces: list[str], user_defined: list[str] = ()
                     ) -> SentencePieceTokenizer:
    """`base` with `pieces` appended as normal pieces and `user_defined` as user-defined symbols.

    Ids 0..base.vocab_size-1 keep their pieces, scores and types. The appended pieces get scores below the
    lowest existing one, in the order given: sentencepiece's BPE joins the adjacent pair whose joined
    piece scores highest, so every merge the base tokenizer could make still wins over a new one, and the
    new pieces apply where the old vocabulary had nothing better (typically target-language words it spelled
    letter by letter or in bytes)."""
    old = read_pieces(base.model_proto)
    have = {p for p, _, _ in old}
    lowest = min((score for _, score, kind in old if kind == PIECE_NORMAL), default=0.0)
    added = []
    for p in itertools.chain(user_defined, pieces):
        if not p or p in have:
            continue
        have.add(p)
        if p in user_defined:
            added.append((p, 0.0, PIECE_USER_DEFINED))  # matched as a whole; the score is unused
        else:
            lowest -= 1.0
            added.append((p, lowest, PIECE_NORMAL))
    # The base's self-test samples (if any) describe its old segmentations; the merged model would fail them.
    proto = rewrite_model_proto(base.model_proto, old + added, drop_self_test=True)
    merged = SentencePieceTokenizer.from_model_proto(proto, name=f"{base.name}+{len(added)} pieces")
    merged.chat_template, merged.model_max_length = base.chat_template, base.model_max_length
    merged.eos_ids = base.eos_ids
    return merged


# ---------------------------------------------------------------------- byte-level BPE (tokenizer.json)
def train_target_bpe(base: HFTokenizer, texts, vocab_size: int) -> RustTokenizer:
    """A BPE tokenizer of the target language alone, trained with `tokenizers` on the texts, with the base's
    normaliser, pre-tokenizer and BPE settings (so it splits text into the same pre-tokens, and its merges
    mean the same in the base), and for a byte-level base the whole byte alphabet."""
    spec = base.spec
    if spec.get("model", {}).get("type") != "BPE":
        raise ValueError(f"{base.name}: vocabulary extension of a tokenizer.json needs a BPE model, this one is "
                         f"{spec.get('model', {}).get('type')!r}")
    target = RustTokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"), "post_processor": None,
        "decoder": spec.get("decoder"), "model": {**spec["model"], "vocab": {}, "merges": []}}))
    byte_level = uses_component(spec.get("pre_tokenizer"), "ByteLevel")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    target.train_from_iterator(texts, trainer)
    if target.get_vocab_size() == 0:
        raise ValueError("train_target_bpe: empty training corpus (the texts gave no token)")
    return target


def new_tokens_and_merges(base: HFTokenizer, target: RustTokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens of `target` that `base` does not have (in the target's id order) and the target merges that
    make them, in the target's order (merges whose result the base has are left out: the base makes those
    its own way)."""
    old_vocab = base.spec["model"]["vocab"]
    spec = json.loads(target.to_str())
    by_id = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])
    tokens = [t for t, _ in by_id if t not in old_vocab and base.piece_to_id(t) is None]
    known = set(old_vocab) | set(tokens)
    merges = []
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left + right not in old_vocab and left in known and right in known:
            merges.append((left, right))
    return tokens, merges


def extend_bpe_tokenizer(base: HFTokenizer, tokens: list[str], merges: list[tuple[str, str]],
                         special: list[str] = ()) -> HFTokenizer:
    """`base` with `tokens` appended to its BPE vocabulary (ids after every existing id, added tokens
    included), `merges` ranked after all of its merges, and `special` appended as special added tokens
    (chat markers). Every old id keeps its token and every old merge its rank."""
    spec = json.loads(base.tokenizer_json)
    model = spec["model"]
    # `tokenizers` (and transformers) give an added token that is not in the BPE vocabulary the next id after
    # that vocabulary, so the added tokens (Llama-3's 128000..128255) would move once it grows: they are
    # entered in it at their ids. The pre-tokenizer never yields a piece spelled like them (checked below).
    for added in spec["added_tokens"]:
        model["vocab"].setdefault(added["content"], added["id"])
    next_id = base.vocab_size
    for token in tokens:
        model["vocab"][token] = next_id
        next_id += 1
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)  # older tokenizer.json files
    model["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in merges]
    for token in special:
        spec["added_tokens"].append({"id": next_id, "content": token, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        model["vocab"][token] = next_id
        next_id += 1
    merged = HFTokenizer(json.dumps(spec, ensure_ascii=False), base.config, base.generation_config,
                         name=f"{base.name}+{len(tokens) + len(special)} tokens")
    merged.chat_template, merged.model_max_length = base.chat_template, base.model_max_length
    for added in spec["added_tokens"]:
        if merged.piece_to_id(added["content"]) != added["id"] or (
                added["special"] and added["id"] in merged.encode(added["content"])):
            raise ValueError(f"{base.name}: the extended tokenizer cannot keep {added['content']!r} at id "
                             f"{added['id']} as a token text never produces")
    return merged


# ---------------------------------------------------------------------- the model's new rows
def init_rows_from_old(base, merged) -> dict[int, list[int]]:
    """For every token merged has beyond base: the ids of the old tokens the base tokenizer splits it into
    (sentencepiece '▁kõik' -> the old segmentation of ' kõik' as a word start, 'mine' -> of 'mine' inside a
    word; a BPE token -> the base BPE model's split of its spelling; a chat marker -> its text). These are
    the rows whose mean initialises the new row."""
    rows = {}
    for new_id in range(base.vocab_size, merged.vocab_size):
        piece = merged.id_to_piece(new_id)
        if isinstance(base, HFTokenizer) and merged.marker_id(piece) is None:
            rows[new_id] = base.split_token(piece)
        else:
            rows[new_id] = base.encode_continuation(piece.replace("\u2581", " "))
    return rows


@torch.no_grad()
def resize_embeddings(model: nn.Module, new_vocab_size: int, init_rows: dict[int, list[int]] | None = None):
    """Grow model.tok_embeddings and model.output to `new_vocab_size` rows, in place.

    Old rows are copied unchanged, so the model computes exactly what it did on old ids. Row `new_id` of
    both matrices becomes the mean of the old rows `init_rows[new_id]` (each matrix its own rows: the
    output row of a new piece starts as the mean of its parts' output rows). Rows without a recipe (padding
    up to a multiple of 64, say) get the mean of all old rows. A tied head stays tied.
    init_rows may also name ids below the old size: a model whose table was padded beyond its tokenizer
    has unused rows there, and they are overwritten."""
    emb = model.tok_embeddings.weight
    old_vocab, dim = emb.shape
    if new_vocab_size < old_vocab:
        raise ValueError(f"resize_embeddings only grows: new vocab size {new_vocab_size} < current {old_vocab}")
    init_rows = init_rows or {}
    for new_id, old_ids in init_rows.items():
        if not 0 <= new_id < new_vocab_size:
            raise ValueError(f"init_rows: new id {new_id} outside 0..{new_vocab_size - 1}")
        if not old_ids or not all(0 <= i < old_vocab for i in old_ids):
            raise ValueError(f"init_rows[{new_id}] = {old_ids}: needs one or more old ids in 0..{old_vocab - 1}")
    tied = model.output.weight is emb

    new_emb = nn.Embedding(new_vocab_size, dim, device=emb.device, dtype=emb.dtype)
    new_emb.weight.copy_(_grown_rows(emb, new_vocab_size, init_rows))
    new_emb.weight.requires_grad_(emb.requires_grad)
    model.tok_embeddings = new_emb
    old_out = model.output.weight
    new_out = OutputHead(dim, new_vocab_size, bias=False, device=old_out.device, dtype=old_out.dtype)
    if tied:
        new_out.weight = new_emb.weight
    else:
        new_out.weight.copy_(_grown_rows(old_out, new_vocab_size, init_rows))
        new_out.weight.requires_grad_(old_out.requires_grad)
    model.output = new_out
    model.config.vocab_size = new_vocab_size
    return model


def _grown_rows(weight: torch.Tensor, new_rows: int, init_rows: dict[int, list[int]]) -> torch.Tensor:
    old = weight.detach()
    fill = old.float().mean(0)  # means in fp32: bf16 sums of thousands of rows lose digits
    out = torch.empty(new_rows, old.shape[1], dtype=old.dtype, device=old.device)
    out[:old.shape[0]] = old
    out[old.shape[0]:] = fill.to(old.dtype)
    for new_id, old_ids in init_rows.items():
        out[new_id] = old[torch.tensor(old_ids, device=old.device)].float().mean(0).to(old.dtype)
    return out


def tokens_per_word(tokenizer, lines: list[str]) -> float:
    """Tokens per whitespace-separated word (lower = cheaper training and longer effective context)."""
    words = sum(len(line.split()) for line in lines)
    if words == 0:
        raise ValueError("tokens_per_word: the text has no words")
    return sum(len(ids) for ids in tokenizer.encode_batch(lines)) / words


# ---------------------------------------------------------------------- command line
def extend(args) -> dict:
    base = load_tokenizer(args.base)
    model = None
    if args.model_in:
        if not (Path(args.model_in) / "config.json").is_file():
            raise ValueError(f"--model-in {args.model_in}: no config.json there (not a Hugging Face model directory)")
        model = load_pretrained(args.model_in)
        check_vocab_fits(base, model.config.vocab_size)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    for option, target, source, source_option in (("--out", out, args.base, "--base"),
                                                  ("--model-out", args.model_out, args.model_in, "--model-in")):
        if target and source and Path(target).resolve() == Path(source).resolve():
            raise ValueError(f"{option} {target}: is {source_option}, which would be overwritten; write the "
                             "extended one to another directory")
    chat = [t for t in CHAT_TOKENS if base.piece_to_id(t) is None] if args.add_chat_tokens else []
    if isinstance(base, HFTokenizer):
        for path in args.corpus:
            check_readable(path, "text")
        texts = iter_texts(args.corpus, "text")
        target = train_target_bpe(base, itertools.islice(texts, args.input_sentence_size or None),
                                  args.new_vocab_size)
        tokens, merges = new_tokens_and_merges(base, target)
        merged = extend_bpe_tokenizer(base, tokens, merges, special=chat)
        target_size, target_file, target_bytes = target.get_vocab_size(), "target_tokenizer.json", target.to_str()
    else:
        with tempfile.TemporaryDirectory() as work:
            target = train_target_tokenizer(args.corpus, args.new_vocab_size, work,
                                            character_coverage=args.character_coverage,
                                            input_sentence_size=args.input_sentence_size, seed=args.seed)
        tokens = new_pieces(base, target)
        merged = extend_tokenizer(base, tokens, user_defined=chat)
        target_size, target_file, target_bytes = target.vocab_size, "target.model", target.model_proto
    if not tokens:
        print("warning: the target tokenizer has no piece the base lacks; nothing to add (try a larger "
              "--new-vocab-size)")
    merged.save_pretrained(out)
    atomic_write(out / target_file, target_bytes)  # kept for inspection; not needed to use OUT

    eval_lines = [line for f in (args.eval_text or args.corpus) for line in read_lines(f, args.eval_lines)
                  if line.strip()][:args.eval_lines]
    report = {
        "base_vocab_size": base.vocab_size, "target_vocab_size": target_size,
        "added_pieces": merged.vocab_size - base.vocab_size, "added_chat_tokens": chat,
        "merged_vocab_size": merged.vocab_size,
        "eval_lines": len(eval_lines),
        "tokens_per_word_before": round(tokens_per_word(base, eval_lines), 4),
        "tokens_per_word_after": round(tokens_per_word(merged, eval_lines), 4),
    }
    if model is not None:
        rows = max(_round_up(merged.vocab_size, args.pad_to_multiple_of), model.config.vocab_size)
        resize_embeddings(model, rows, init_rows_from_old(base, merged))
        save_pretrained(model, args.model_out, tokenizer=merged)  # weights + the tokenizer that matches them
        report["model_vocab_size"] = rows
    atomic_write(out / "vocab_extension.json", to_json(report))
    return report


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


@dataclass(kw_only=True)
class ExtendOptions:
    """Add target-language pieces to a tokenizer (and resize a model's embeddings to match)."""
    base: str  # tokenizer directory (tokenizer.model: sentencepiece; only tokenizer.json: byte-level BPE), or one of those files
    corpus: list[str]  # target-language text files, one document or sentence per line
    new_vocab_size: int  # size of the target-language tokenizer trained on --corpus; its pieces the base lacks are added
    out: str  # directory for the merged tokenizer (Hugging Face layout)
    model_in: str = ""  # Hugging Face Llama directory whose embeddings to resize ('' = tokenizer only)
    model_out: str = ""  # where to write the resized model, with the merged tokenizer
    pad_to_multiple_of: int = 1  # round the model's new vocabulary size up to a multiple of this (64 suits GPUs)
    add_chat_tokens: bool = False  # also add the chat markers <|system|> <|user|> <|assistant|> if the base lacks them
    eval_text: list[str] = field(default_factory=list)  # target-language text for tokens per word ([] = --corpus)
    eval_lines: int = 10000  # lines of eval text to measure
    character_coverage: float = 0.9999  # sentencepiece bases: share of characters the target tokenizer must cover
    input_sentence_size: int = 2_000_000  # train the target tokenizer on at most this many lines (0 = all): sampled for sentencepiece, the first ones for BPE
    seed: int = 0  # sentencepiece's random seed (the BPE trainer is deterministic)

    def check(self):
        require_option(self.new_vocab_size >= 1, "new_vocab_size", self.new_vocab_size, "must be at least 1")
        require_option(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", self.pad_to_multiple_of, "must be at least 1")
        require_option(self.eval_lines >= 1, "eval_lines", self.eval_lines, "must be at least 1")
        require_option(0 < self.character_coverage <= 1, "character_coverage", self.character_coverage, "must be in (0, 1]")
        require_option(self.input_sentence_size >= 0, "input_sentence_size", self.input_sentence_size, "must be >= 0")
        if bool(self.model_in) != bool(self.model_out):
            raise ValueError("--model-in and --model-out go together")


@cli
def main(argv=None):
    _, cfg = parse_options({"extend": ExtendOptions}, argv, prog="python -m minillm.vocab",
                           description=__doc__.split("\n\n")[0])
    report = extend(cfg)
    before, after = report["tokens_per_word_before"], report["tokens_per_word_after"]
    print(f"base {report['base_vocab_size']} pieces + {report['added_pieces']} new = {report['merged_vocab_size']}"
          f" -> {cfg.out}")
    print(f"tokens per word on {report['eval_lines']} lines: {before:.3f} -> {after:.3f} "
          f"({100 * (after - before) / before:+.1f}%)")
    if cfg.model_out:
        print(f"model resized to {report['model_vocab_size']} rows -> {cfg.model_out}")


if __name__ == "__main__":
    main()
