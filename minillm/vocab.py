"""Vocabulary extension: give an English-centric Llama tokenizer the pieces of a new language.

Llama-2's tokenizer splits an Estonian or Polish word into 2-4x as many tokens as an English one, so
every training step and every context window carries less text. The fix used after these papers
(Chinese-LLaMA, Cui et al. 2023, and many language adaptations since):

  1. train a sentencepiece BPE model on target-language text (`train_target_tokenizer`);
  2. append the pieces it has and the base lacks to the base model (`extend_tokenizer`), with scores
     below every existing piece, so the old merges keep priority and old ids never move;
  3. grow the embedding and output matrices (`resize_embeddings`), starting each new row at the mean of
     the rows of the old pieces that the old tokenizer splits the new piece into (`init_rows_from_old`),
     so "kõik" begins where the model's idea of "k"+"õ"+"ik" is, not at noise;
  4. continue pretraining (train_pretrain.py) so the new rows are learned.

Command line (writes the merged tokenizer, and the resized model when given one):

  python -m minillm.vocab extend --base llama2/ --corpus et.txt --new-vocab-size 16000 \\
      --out et-tokenizer/ --model-in llama2/ --model-out llama2-et/

It prints tokens per word on target-language text before and after and writes the same numbers to
OUT/vocab_extension.json.
"""
from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from minillm.files import atomic_write, read_lines, to_json
from minillm.hf import load_pretrained, save_pretrained
from minillm.options import cli, parse_options, require
from minillm.sentencepiece_model import PIECE_NORMAL, PIECE_USER_DEFINED, read_pieces, rewrite_model_proto
from minillm.tokenizer import CHAT_TOKENS, SentencePieceTokenizer, check_vocab_fits, load_tokenizer


def train_target_tokenizer(corpus, vocab_size: int, workdir, **train_options) -> SentencePieceTokenizer:
    """A Llama-style BPE model of the target language alone (no chat markers: those are added, if wanted,
    as user-defined symbols by extend_tokenizer)."""
    return SentencePieceTokenizer.train(corpus, Path(workdir) / "target", vocab_size, user_defined_symbols=(), **train_options)


def new_pieces(base: SentencePieceTokenizer, target: SentencePieceTokenizer) -> list[str]:
    """Normal pieces of `target` that `base` does not have, in the target's priority order."""
    have = set(base.pieces())
    return [p for p, _, kind in read_pieces(target.model_proto) if kind == PIECE_NORMAL and p not in have]


def extend_tokenizer(base: SentencePieceTokenizer, pieces: list[str], user_defined: list[str] = ()) -> SentencePieceTokenizer:
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


def init_rows_from_old(base: SentencePieceTokenizer, merged: SentencePieceTokenizer) -> dict[int, list[int]]:
    """For every piece merged has beyond base: the ids of the old pieces the base tokenizer splits its
    text into ('▁kõik' -> the old segmentation of ' kõik' as a word start; 'mine' -> of 'mine' inside a
    word). These are the rows whose mean initialises the new row."""
    rows = {}
    for new_id in range(base.vocab_size, merged.vocab_size):
        text = merged.id_to_piece(new_id).replace("\u2581", " ")
        rows[new_id] = base.encode_continuation(text)
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
    new_out = nn.Linear(dim, new_vocab_size, bias=False, device=old_out.device, dtype=old_out.dtype)
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


def tokens_per_word(tokenizer: SentencePieceTokenizer, lines: list[str]) -> float:
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
    with tempfile.TemporaryDirectory() as work:
        target = train_target_tokenizer(args.corpus, args.new_vocab_size, work,
                                        character_coverage=args.character_coverage,
                                        input_sentence_size=args.input_sentence_size, seed=args.seed)
        target_proto = target.model_proto
    pieces = new_pieces(base, target)
    if not pieces:
        print("warning: the target tokenizer has no piece the base lacks; nothing to add (try a larger "
              "--new-vocab-size)")
    chat = [t for t in CHAT_TOKENS if base.piece_to_id(t) is None] if args.add_chat_tokens else []
    merged = extend_tokenizer(base, pieces, user_defined=chat)
    merged.save_pretrained(out)
    atomic_write(out / "target.model", target_proto)  # kept for inspection; not needed to use OUT

    eval_lines = [line for f in (args.eval_text or args.corpus) for line in read_lines(f, args.eval_lines)
                  if line.strip()][:args.eval_lines]
    report = {
        "base_vocab_size": base.vocab_size, "target_vocab_size": target.vocab_size,
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
    base: str  # tokenizer directory (with tokenizer.model) or a .model file
    corpus: list[str]  # target-language text files, one document or sentence per line
    new_vocab_size: int  # size of the target-language tokenizer trained on --corpus; its pieces the base lacks are added
    out: str  # directory for the merged tokenizer (Hugging Face layout)
    model_in: str = ""  # Hugging Face Llama directory whose embeddings to resize ('' = tokenizer only)
    model_out: str = ""  # where to write the resized model, with the merged tokenizer
    pad_to_multiple_of: int = 1  # round the model's new vocabulary size up to a multiple of this (64 suits GPUs)
    add_chat_tokens: bool = False  # also add the chat markers <|system|> <|user|> <|assistant|> if the base lacks them
    eval_text: list[str] = field(default_factory=list)  # target-language text for tokens per word ([] = --corpus)
    eval_lines: int = 10000  # lines of eval text to measure
    character_coverage: float = 0.9999  # sentencepiece: share of characters the target tokenizer must cover
    input_sentence_size: int = 2_000_000  # train the target tokenizer on at most this many sampled lines (0 = all)
    seed: int = 0  # sentencepiece's random seed

    def check(self):
        require(self.new_vocab_size >= 1, "new_vocab_size", self.new_vocab_size, "must be at least 1")
        require(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", self.pad_to_multiple_of, "must be at least 1")
        require(self.eval_lines >= 1, "eval_lines", self.eval_lines, "must be at least 1")
        require(0 < self.character_coverage <= 1, "character_coverage", self.character_coverage, "must be in (0, 1]")
        require(self.input_sentence_size >= 0, "input_sentence_size", self.input_sentence_size, "must be >= 0")
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
