"""Instruction-data builders: translation-task instructions from bitext, and instruction mixtures.

    python -m minillm.instructions translate --src en.txt --tgt et.txt --src-lang en --tgt-lang et \\
        --reverse-share 0.25 --format alpaca --out tr.jsonl --seed 0
    python -m minillm.instructions translate --tsv en-et.tsv ...      (or --jsonl pairs.jsonl)
    python -m minillm.instructions mix --recipe recipe.json --out-dir DIR --valid-share 0.02 --seed 0 \\
        [--tokenizer TOKENIZER_DIR]   (translate and mix take --decontaminate TASK_FILES; minillm.decontaminate)
    python -m minillm.instructions decontaminate --input tr.jsonl --eval data/eval --out tr.clean.jsonl

translate (LLAMMAS' translation-task instructions). Sentence pairs pass OpusFilter-style filters, in this
order; a pair is counted under the first filter that rejects it, and the report lists kept/removed:
  empty           a side is empty or whitespace
  control_chars   a side holds a control character (U+0000-U+001F other than tab and newline, or U+007F)
  identical       the target is a copy of the source (an untranslated line)
  long_word       a "word" longer than --max-word-len characters (URLs, base64, glued text)
  length          a side with fewer than --min-words or more than --max-words words
  length_ratio    the longer side has more than --max-length-ratio times the characters of the shorter
                  (a sentence aligned with a paragraph, or with a fragment)
  alpha           fewer than --min-alpha-share of a side's non-space characters are letters
  terminal_punct  the sentences end differently: '.', '!', '?' or none (after closing quotes/brackets); a
                  missing final period is not a difference ("Unknown media type." = "Tundmatu meedia
                  tüüp"), unless --strict-terminal-punct
  numerals        the numbers differ as numbers: 1.50 = 1,5, 12,500 = 12 500, 0 = the language's word for
                  zero ("division by 0" = "nulliga jagamine"); --strict-numerals compares the digit runs
  duplicate       the same pair (whitespace-normalised) was kept before
Each kept pair becomes one instruction: the template language (English or the pair's other language, each
with several templates) and the template are chosen at random; the source sentence sits either in the
input field or inside the instruction (--inline-share); exactly round(--reverse-share x kept) pairs, chosen
at random, are turned around (LLAMMAS: 25% target -> English). Output: Alpaca or chat records.

mix (PLLuM-style composition). recipe.json:
  {"sources": [{"path": "alpaca_et.jsonl", "type": "organic" | "converted" | "synthetic",
                "language": "et", "weight": 1.0, "cap": 1000, "name": "alpaca_et"}, ...]}
  path      SFT JSONL (Alpaca or chat records), relative to the recipe's directory
  weight    multiplies the number of a source's unique examples (0.5 = a random half, 2 = every example
            twice); default 1
  cap       at most this many examples from the source (after weight); default 1000 for converted
            sources (PLLuM's limit per converted resource), none otherwise; "cap": null = no cap
  name      default: the file name without extension
Exact duplicates are removed across all sources (the first occurrence, in recipe order, is kept); the
validation split (--valid-share of each source's selected unique examples) is taken before upsampling, so no
example is in both splits. Writes DIR/train.jsonl, DIR/valid.jsonl and DIR/composition.json, and prints
the composition table (examples and tokens, or words without --tokenizer, by source, type and language).
Every output file is written atomically; bad input fails before anything is written.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from decimal import Decimal
from pathlib import Path
from typing import Literal

from minillm.chat_format import as_messages, render, resolve_template
from minillm.decontaminate import DecontaminateOptions, decontaminate_command, decontaminate_output
from minillm.files import atomic_write, read_jsonl, read_lines, to_json, write_jsonl
from minillm.languages import LANGUAGE_NAMES, bitext_languages
from minillm.options import cli, parse_options, require_option
from minillm.sft_data import load_sft_jsonl
from minillm.tokenizer import load_tokenizer

# ============================================================================ reading bitext


def read_bitext(src=None, tgt=None, tsv=None, jsonl=None, src_lang="en", tgt_lang="et") -> list[tuple[str, str]]:
    """Sentence pairs from two line-aligned files, a two-column TSV, or JSONL records holding the two
    sides as {src_lang: .., tgt_lang: ..}, {"source": .., "target": ..} or {"translation": {src_lang: ..,
    tgt_lang: ..}}. Misaligned input is an error naming the files (or file and line)."""
    if sum(x is not None for x in ((src or tgt), tsv, jsonl)) != 1:
        raise ValueError("give the bitext as --src and --tgt, or --tsv, or --jsonl (exactly one)")
    if src is not None or tgt is not None:
        if src is None or tgt is None:
            raise ValueError("--src and --tgt go together")
        a, b = read_lines(src), read_lines(tgt)
        if len(a) != len(b):
            shorter = src if len(a) < len(b) else tgt
            raise ValueError(f"misaligned bitext: {src} has {len(a)} lines but {tgt} has {len(b)} lines "
                             f"({shorter} ends after line {min(len(a), len(b))}); the files must hold one "
                             f"sentence pair per line")
        return list(zip(a, b))
    if tsv is not None:
        pairs = []
        for line_no, line in enumerate(read_lines(tsv), 1):
            cols = line.split("\t") if line else ["", ""]
            if len(cols) != 2:
                raise ValueError(f"{tsv}:{line_no}: expected 2 tab-separated columns (source, target), "
                                 f"got {len(cols)}")
            pairs.append((cols[0], cols[1]))
        return pairs
    pairs = []
    for line_no, record in read_jsonl(jsonl):
        if not isinstance(record, dict):
            raise ValueError(f"{jsonl}:{line_no}: expected a JSON object, got {type(record).__name__}")
        holder = record.get("translation", record)
        for keys in ((src_lang, tgt_lang), ("source", "target")):
            if isinstance(holder, dict) and all(k in holder for k in keys):
                s, t = holder[keys[0]], holder[keys[1]]
                break
        else:
            raise ValueError(f"{jsonl}:{line_no}: missing fields '{src_lang}' and '{tgt_lang}' "
                             f"(or 'source' and 'target')")
        if not isinstance(s, str) or not isinstance(t, str):
            raise ValueError(f"{jsonl}:{line_no}: both sides must be strings")
        pairs.append((s, t))
    return pairs


# ============================================================================ filters (OpusFilter-style)

@dataclass
class FilterConfig:
    max_word_len: int = 40      # OpusFilter LongWordFilter default
    min_words: int = 1
    max_words: int = 100        # OpusFilter LengthFilter (unit word) default
    max_length_ratio: float = 3.0  # OpusFilter LengthRatioFilter default (here on characters)
    min_alpha_share: float = 0.5
    strict_terminal_punct: bool = False  # a missing final period counts as a difference too
    strict_numerals: bool = False  # digit runs must be equal as strings; no number words


TERMINAL = {".": ".", "!": "!", "?": "?", "…": ".", "。": ".", "！": "!", "？": "?"}
CLOSERS = "\"'”’»)]}"
_SEPARATOR_BETWEEN_DIGITS = re.compile(r"(?<=\d)[.,\s\u00a0\u202f'’](?=\d)")
_DIGIT_RUN = re.compile(r"\d+")
_NUMBER = re.compile(r"\d+(?:[.,\s\u00a0\u202f'’]\d+)*")
_THOUSANDS = re.compile(r"[.,\s\u00a0\u202f'’](?=\d{3}(?!\d))")  # 12,500 / 12 500 / 12.500
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
# The words for zero with their inflected forms (nulli, nulliga; zera, zerem); lists exist for these languages
# only. Other number words are left alone: "one" and "üks" are pronouns as often as numerals.
ZERO_WORDS = {"en": re.compile(r"zeros?|zeroes|noughts?"), "et": re.compile(r"null\w*"),
              "pl": re.compile(r"zer(o|a|u|em|ze|ami|ach|om)?")}


def terminal_punctuation(text: str) -> str:
    """'.', '!', '?' or '' for how a sentence ends, looking past closing quotes and brackets."""
    text = text.rstrip().rstrip(CLOSERS).rstrip()
    return TERMINAL.get(text[-1:], "")


def digit_runs(text: str) -> list[str]:
    """The numbers of a text as sorted digit strings, thousands and decimal separators removed (strict)."""
    return sorted(_DIGIT_RUN.findall(_SEPARATOR_BETWEEN_DIGITS.sub("", text)))


def numbers(text: str, lang: str, not_numbers=frozenset()) -> list[Decimal]:
    """The numbers of a text as values, sorted: a separator before exactly three digits groups thousands
    (12,500 = 12 500 = 12500), another one is the decimal point (1,50 = 1.5), and the language's words for
    zero count as 0, except the spellings in `not_numbers` (words both sides of a pair share verbatim are
    identifiers, like NULL, not Estonian's "null" = zero)."""
    values = []
    for token in _NUMBER.findall(text):
        plain = _THOUSANDS.sub("", token)
        plain = re.sub(r"[,\s\u00a0\u202f'’]", ".", plain)
        if plain.count(".") > 1:  # not one number (a date, a list): compare its digit groups
            values += [Decimal(part) for part in plain.split(".")]
        else:
            values.append(Decimal(plain).normalize())
    zero = ZERO_WORDS.get(lang)
    values += [Decimal(0) for word in re.findall(r"\w+", text)
               if zero and zero.fullmatch(word.lower()) and word not in not_numbers]
    return sorted(values)


def alpha_share(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / len(chars) if chars else 0.0


def whitespace_normalised(text: str) -> str:
    return " ".join(text.split())


FILTERS = ("empty", "control_chars", "identical", "long_word", "length", "length_ratio", "alpha", "terminal_punct",
           "numerals", "duplicate")


def first_failing_filter(src: str, tgt: str, cfg: FilterConfig, src_lang: str = "en", tgt_lang: str = "et"
                         ) -> str | None:
    """Name of the first filter that rejects the pair, or None (duplicates are checked by the caller)."""
    s, t = src.strip(), tgt.strip()
    if not s or not t:
        return "empty"
    if _CONTROL.search(s) or _CONTROL.search(t):
        return "control_chars"
    if whitespace_normalised(s).casefold() == whitespace_normalised(t).casefold():
        return "identical"
    sw, tw = s.split(), t.split()
    if max(len(w) for w in sw + tw) > cfg.max_word_len:
        return "long_word"
    if not all(cfg.min_words <= len(w) <= cfg.max_words for w in (sw, tw)):
        return "length"
    if max(len(s), len(t)) > cfg.max_length_ratio * min(len(s), len(t)):
        return "length_ratio"
    if min(alpha_share(s), alpha_share(t)) < cfg.min_alpha_share:
        return "alpha"
    ends = {terminal_punctuation(s), terminal_punctuation(t)}
    if len(ends) > 1 and (cfg.strict_terminal_punct or ends != {".", ""}):
        return "terminal_punct"
    if cfg.strict_numerals:
        if digit_runs(s) != digit_runs(t):
            return "numerals"
    else:
        shared = set(re.findall(r"\w+", s)) & set(re.findall(r"\w+", t))  # identifiers, names: not number words
        if numbers(s, src_lang, shared) != numbers(t, tgt_lang, shared):
            return "numerals"
    return None


def filter_pairs(pairs: list[tuple[str, str]], cfg: FilterConfig | None = None, src_lang: str = "en",
                 tgt_lang: str = "et"):
    """(kept pairs with their 1-based line numbers, report {filter: removed count, 'kept', 'total', 'examples':
    {filter: the first two removed pairs as [line, source, target]}})."""
    cfg = cfg or FilterConfig()
    removed, examples = Counter(), {}
    seen, kept = set(), []
    for line_no, (src, tgt) in enumerate(pairs, 1):
        reason = first_failing_filter(src, tgt, cfg, src_lang, tgt_lang)
        if reason is None:
            key = (whitespace_normalised(src), whitespace_normalised(tgt))
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason:
            removed[reason] += 1
            if removed[reason] <= 2:
                examples.setdefault(reason, []).append([line_no, src.strip(), tgt.strip()])
        else:
            kept.append((line_no, src.strip(), tgt.strip()))
    report = {name: removed[name] for name in FILTERS}
    report.update(kept=len(kept), total=len(pairs), examples=examples)
    return kept, report


def format_filter_report(report: dict) -> str:
    total = max(report["total"], 1)
    lines = [f"{'filter':<16}{'removed':>9}{'share':>8}"]
    for name in FILTERS:
        lines.append(f"{name:<16}{report[name]:>9}{100 * report[name] / total:>7.1f}%")
    lines.append(f"{'kept':<16}{report['kept']:>9}{100 * report['kept'] / total:>7.1f}%  of {report['total']} pairs")
    for name, pairs in report.get("examples", {}).items():  # what each filter removed, to check it is right
        for line_no, src, tgt in pairs:
            lines.append(f"  {name} (line {line_no}): {_clip(src)!r} | {_clip(tgt)!r}")
    return "\n".join(lines)


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# ============================================================================ instruction templates

# Language names in the forms each template language needs (English: the plain names).
LANGUAGE_FORMS = {
    "en": {code: {"name": LANGUAGE_NAMES[code]} for code in ("en", "et", "pl")},
    # illative (into), elative (from), inessive (in)
    "et": {"en": {"ill": "inglise keelde", "ela": "inglise keelest", "ine": "inglise keeles"},
           "et": {"ill": "eesti keelde", "ela": "eesti keelest", "ine": "eesti keeles"},
           "pl": {"ill": "poola keelde", "ela": "poola keelest", "ine": "poola keeles"}},
    # "na język X" (accusative), "z języka X" (genitive), "po X-u" (adverb)
    "pl": {"en": {"acc": "angielski", "gen": "angielskiego", "adv": "po angielsku"},
           "et": {"acc": "estoński", "gen": "estońskiego", "adv": "po estońsku"},
           "pl": {"acc": "polski", "gen": "polskiego", "adv": "po polsku"}},
}

# "input": the source sentence goes in the Alpaca input field; "inline": it is part of the instruction.
TEMPLATES = {
    "en": {
        "input": ["Translate the following text from {src[name]} to {tgt[name]}.",
                  "Translate this sentence into {tgt[name]}.",
                  "Please translate the {src[name]} text below into {tgt[name]}.",
                  "Provide the {tgt[name]} translation of the following sentence."],
        "inline": ["Translate to {tgt[name]}: {text}",
                   "Translate the following {src[name]} sentence into {tgt[name]}: {text}",
                   "How do you say \"{text}\" in {tgt[name]}?",
                   "What is the {tgt[name]} translation of \"{text}\"?"],
    },
    "et": {
        "input": ["Tõlgi järgmine tekst {tgt[ill]}.",
                  "Tõlgi see lause {src[ela]} {tgt[ill]}.",
                  "Palun tõlgi allolev tekst {tgt[ill]}."],
        "inline": ["Tõlgi {tgt[ill]}: {text}",
                   "Tõlgi {src[ela]} {tgt[ill]}: {text}",
                   "Kuidas on {tgt[ine]} \"{text}\"?"],
    },
    "pl": {
        "input": ["Przetłumacz poniższy tekst na język {tgt[acc]}.",
                  "Przetłumacz to zdanie z języka {src[gen]} na język {tgt[acc]}."],
        "inline": ["Przetłumacz na język {tgt[acc]}: {text}",
                   "Jak powiedzieć \"{text}\" {tgt[adv]}?"],
    },
}


def translation_record(text: str, translation: str, src_lang: str, tgt_lang: str, template_lang: str,
                       template: str, inline: bool, fmt: str) -> dict:
    """One instruction: translate `text` (in src_lang) to tgt_lang, answer `translation`."""
    names = LANGUAGE_FORMS[template_lang]
    instruction = template.format(src=names[src_lang], tgt=names[tgt_lang], text=text)
    record = {"instruction": instruction, "input": "" if inline else text, "output": translation}
    return record if fmt == "alpaca" else {"messages": as_messages(record)}


def build_translation_instructions(pairs, src_lang: str, tgt_lang: str, reverse_share: float = 0.25,
                                   fmt: str = "alpaca", seed: int = 0, inline_share: float = 0.5,
                                   template_langs=None) -> list[dict]:
    """Instruction records for filtered (src, tgt) pairs: exactly round(reverse_share * len(pairs)) of them,
    chosen at random, ask for tgt -> src; template language, template and placement are drawn at random."""
    for lang in (src_lang, tgt_lang):
        if lang not in LANGUAGE_FORMS["en"]:
            raise ValueError(f"no language names for {lang!r} (known: {', '.join(LANGUAGE_FORMS['en'])})")
    if src_lang == tgt_lang:
        raise ValueError(f"source and target language are both {src_lang!r}")
    if not 0.0 <= reverse_share <= 1.0 or not 0.0 <= inline_share <= 1.0:
        raise ValueError("--reverse-share and --inline-share must be between 0 and 1")
    if fmt not in ("alpaca", "chat"):
        raise ValueError(f"unknown format {fmt!r} (alpaca or chat)")
    if template_langs is None:  # English and the other language(s) of the pair that have templates
        template_langs = ["en"] + [x for x in (src_lang, tgt_lang) if x != "en" and x in TEMPLATES]
    for lang in template_langs:
        if lang not in TEMPLATES:
            raise ValueError(f"no instruction templates in {lang!r} (known: {', '.join(TEMPLATES)})")
    rng = random.Random(seed)
    reverse = set(rng.sample(range(len(pairs)), round(reverse_share * len(pairs))))
    records = []
    for i, (src, tgt) in enumerate(pairs):
        text, translation, a, b = (tgt, src, tgt_lang, src_lang) if i in reverse else (src, tgt, src_lang, tgt_lang)
        template_lang = rng.choice(template_langs)
        inline = rng.random() < inline_share
        template = rng.choice(TEMPLATES[template_lang]["inline" if inline else "input"])
        records.append(translation_record(text, translation, a, b, template_lang, template, inline, fmt))
    return records


def translate_command(args) -> dict:
    src_lang, tgt_lang, found = bitext_languages(args.src_lang, args.tgt_lang, LANGUAGE_FORMS["en"],
                                                 args.src, args.tgt, args.tsv or args.jsonl)
    print(f"languages: {src_lang} -> {tgt_lang} ({found})")
    pairs = read_bitext(args.src or None, args.tgt or None, args.tsv or None, args.jsonl or None, src_lang,
                        tgt_lang)
    cfg = FilterConfig(**{f.name: getattr(args, f.name) for f in fields(FilterConfig)})  # same-named options
    kept, report = filter_pairs(pairs, cfg, src_lang, tgt_lang)
    if not kept:
        raise ValueError(f"{args.src or args.tsv or args.jsonl}: no sentence pair passed the filters\n"
                         + format_filter_report(report))
    template_langs = args.template_langs.split(",") if args.template_langs else None
    records = build_translation_instructions([(s, t) for _, s, t in kept], src_lang, tgt_lang,
                                             args.reverse_share, args.format, args.seed, args.inline_share,
                                             template_langs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    records = decontaminate_output(records, args.decontaminate, args.out) if args.decontaminate else records
    write_jsonl(args.out, records)
    report["reversed"] = round(args.reverse_share * len(kept))
    if args.report:
        atomic_write(args.report, to_json(report))
    print(format_filter_report(report))
    print(f"{len(records)} instructions ({report['reversed']} reversed, {tgt_lang}->{src_lang}) "
          f"-> {args.out}")
    return report


# ============================================================================ mixtures

SOURCE_TYPES = ("organic", "converted", "synthetic")
DEFAULT_CONVERTED_CAP = 1000  # PLLuM: at most 1,000 examples per converted resource
SOURCE_KEYS = {"path", "type", "language", "weight", "cap", "name"}


@dataclass
class Source:
    name: str
    path: str
    type: str
    language: str
    weight: float = 1.0
    cap: int | None = None


def read_recipe(path) -> list[Source]:
    """The recipe's sources, validated; ValueError names the recipe and the source."""
    path = Path(path)
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{path}{where}: not a valid JSON recipe ({e})") from None
    entries = recipe.get("sources") if isinstance(recipe, dict) else recipe
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected {{\"sources\": [...]}} with at least one source")
    sources, names = [], set()
    for i, s in enumerate(entries):
        where = f"{path}: sources[{i}]"
        if not isinstance(s, dict):
            raise ValueError(f"{where}: expected an object")
        unknown = set(s) - SOURCE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)} (expected {sorted(SOURCE_KEYS)})")
        for key in ("path", "type", "language"):
            if not isinstance(s.get(key), str) or not s[key]:
                raise ValueError(f"{where}: missing field '{key}'")
        if s["type"] not in SOURCE_TYPES:
            raise ValueError(f"{where}: unknown type {s['type']!r} (expected {', '.join(SOURCE_TYPES)})")
        weight = s.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or math.isinf(weight):
            raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
        cap = s.get("cap", DEFAULT_CONVERTED_CAP if s["type"] == "converted" else None)
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{where}: cap must be a positive integer or null, got {cap!r}")
        file = Path(s["path"]) if Path(s["path"]).is_absolute() else path.parent / s["path"]
        name = s.get("name") or Path(s["path"]).name.split(".")[0]
        if name in names:
            raise ValueError(f"{where}: duplicate source name {name!r} (set 'name')")
        names.add(name)
        sources.append(Source(name, str(file), s["type"], s["language"], float(weight), cap))
    return sources


def dedup_key(record) -> str:
    """Records are duplicates when they render to the same conversation (formats aside)."""
    return json.dumps([(m["role"], m["content"]) for m in as_messages(record)], ensure_ascii=False)


def record_size(record, tokenizer, template: str = "auto") -> int:
    """Tokens of the training example rendered with `template` (with a tokenizer), else whitespace-separated
    words."""
    if tokenizer is not None:
        return len(render(record, tokenizer, template=template)[0])
    return sum(len(m["content"].split()) for m in as_messages(record))


def upsample(examples: list, n: int, rng: random.Random) -> list:
    """n examples: whole copies of `examples`, then a random subset for the remainder."""
    if not examples:
        return []
    copies, rest = divmod(n, len(examples))
    return examples * copies + rng.sample(examples, rest)


def build_mixture(sources: list[Source], valid_share: float = 0.02, seed: int = 0, tokenizer=None,
                  template: str = "auto"):
    """(train records, valid records, composition) for the recipe's sources (see the module docstring);
    with a tokenizer, sizes are tokens of the examples rendered with chat_format's `template`."""
    if not 0.0 <= valid_share < 1.0:
        raise ValueError(f"--valid-share must be in [0, 1), got {valid_share}")
    if tokenizer is not None:
        template = resolve_template(template, tokenizer)
    loaded = [load_sft_jsonl(s.path) for s in sources]  # every file validated before any work
    seen, train, valid, rows = set(), [], [], []
    for source, records in zip(sources, loaded):
        unique = []
        for r in records:
            key = dedup_key(r)
            if key not in seen:
                seen.add(key)
                unique.append(r)
        rng = random.Random(f"{seed}:{source.name}")
        rng.shuffle(unique)
        size = round(len(unique) * source.weight)
        if source.cap is not None:
            size = min(size, source.cap)
        n_valid = round(valid_share * min(size, len(unique)))
        source_valid = unique[:n_valid]
        source_train = upsample(unique[n_valid:min(size, len(unique))], size - n_valid, rng)
        train += source_train
        valid += source_valid
        rows.append({"source": source.name, "type": source.type, "language": source.language,
                     "path": source.path, "records": len(records), "duplicates": len(records) - len(unique),
                     "weight": source.weight, "cap": source.cap,
                     "train_examples": len(source_train), "valid_examples": len(source_valid),
                     "train_size": sum(record_size(r, tokenizer, template) for r in source_train)})
    if not train:
        raise ValueError("the recipe selects no training examples")
    random.Random(f"{seed}:train").shuffle(train)
    random.Random(f"{seed}:valid").shuffle(valid)
    composition = {"unit": "tokens" if tokenizer is not None else "words", "sources": rows,
                   "by_type": group_totals(rows, "type"), "by_language": group_totals(rows, "language"),
                   "train_examples": len(train), "valid_examples": len(valid),
                   "train_size": sum(r["train_size"] for r in rows)}
    return train, valid, composition


def group_totals(rows: list[dict], key: str) -> dict:
    out = {}
    for r in rows:
        g = out.setdefault(r[key], {"train_examples": 0, "valid_examples": 0, "train_size": 0})
        for k in g:
            g[k] += r[k]
    return out


def format_composition(c: dict) -> str:
    unit = c["unit"]
    n_all, size_all = max(c["train_examples"], 1), max(c["train_size"], 1)

    def line(label, kind, lang, g):
        return (f"{label:<24}{kind:<11}{lang:<6}{g['train_examples']:>9}{100 * g['train_examples'] / n_all:>7.1f}%"
                f"{g['train_size']:>12}{100 * g['train_size'] / size_all:>7.1f}%{g['valid_examples']:>7}")

    head = f"{'':<24}{'type':<11}{'lang':<6}{'examples':>9}{'':>8}{unit:>12}{'':>8}{'valid':>7}"
    out = [head, "by source"]
    for r in c["sources"]:
        out.append(line("  " + r["source"], r["type"], r["language"], r)
                   + f"   ({r['records']} records, {r['duplicates']} duplicates"
                   + (f", cap {r['cap']}" if r["cap"] is not None else "")
                   + (f", weight {r['weight']:g}" if r["weight"] != 1 else "") + ")")
    out.append("by type")
    for t, g in c["by_type"].items():
        out.append(line("  " + t, "", "", g))
    out.append("by language")
    for lang, g in c["by_language"].items():
        out.append(line("  " + lang, "", "", g))
    out.append(line("total", "", "", {"train_examples": c["train_examples"], "train_size": c["train_size"],
                                      "valid_examples": c["valid_examples"]}))
    return "\n".join(out)


def mix_command(args) -> dict:
    sources = read_recipe(args.recipe)
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    train, valid, composition = build_mixture(sources, args.valid_share, args.seed, tokenizer, args.template)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = decontaminate_output(train, args.decontaminate, out / "train.jsonl") if args.decontaminate else train
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    atomic_write(out / "composition.json", to_json(composition))
    print(format_composition(composition))
    print(f"{len(train)} train / {len(valid)} valid examples -> {out}")
    return composition


# ============================================================================ CLI

@dataclass(kw_only=True)
class TranslateOptions:
    """Translation-task instructions from bitext, after OpusFilter-style filters."""
    src: str = ""  # source-language text file, one sentence per line (with --tgt)
    tgt: str = ""  # target-language text file, line-aligned with --src
    tsv: str = ""  # or: one 'source<TAB>target' pair per line
    jsonl: str = ""  # or: JSONL with {SRC_LANG: .., TGT_LANG: ..}, {source, target} or {translation: {..}}
    src_lang: str = ""  # language code of the source side; '' = from the file names (train.en, en-et.tsv), said
    tgt_lang: str = ""  # language code of the target side; '' = from the file names (train.pl, en-pl.tsv), said
    reverse_share: float = 0.25  # share of pairs asked target -> source (LLAMMAS: 25%)
    inline_share: float = 0.5  # share with the sentence inside the instruction (else in the input field)
    template_langs: str = ""  # comma-separated template languages ('' = English and the other language)
    format: Literal["alpaca", "chat"] = "alpaca"  # record format written
    out: str  # output JSONL file
    report: str = ""  # also write the filter report as JSON here
    decontaminate: list[str] = field(default_factory=list)  # task files / directories: drop instructions overlapping them (minillm.decontaminate)
    seed: int = 0  # seed of every random choice
    max_word_len: int = FilterConfig.max_word_len  # long_word filter: longest allowed word (characters)
    min_words: int = FilterConfig.min_words  # length filter: fewest words per side
    max_words: int = FilterConfig.max_words  # length filter: most words per side
    max_length_ratio: float = FilterConfig.max_length_ratio  # length_ratio filter: longer / shorter side, in characters
    min_alpha_share: float = FilterConfig.min_alpha_share  # alpha filter: least share of letters per side
    strict_terminal_punct: bool = FilterConfig.strict_terminal_punct  # terminal_punct filter: a missing final period is a difference too
    strict_numerals: bool = FilterConfig.strict_numerals  # numerals filter: digit runs equal as strings, no words for zero

    def check(self):
        for name in ("reverse_share", "inline_share", "min_alpha_share"):
            require_option(0 <= getattr(self, name) <= 1, name, getattr(self, name), "must be between 0 and 1")
        require_option(self.max_length_ratio >= 1, "max_length_ratio", self.max_length_ratio, "must be at least 1")
        for name in ("max_word_len", "min_words", "max_words"):
            require_option(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")


@dataclass(kw_only=True)
class MixOptions:
    """An SFT mixture (train/valid split, caps, weights, dedup) from a recipe of sources."""
    recipe: str  # the recipe JSON (see the module docstring)
    out_dir: str  # where train.jsonl, valid.jsonl and composition.json go
    valid_share: float = 0.02  # share of each source's selected unique examples held out for validation
    tokenizer: str = ""  # count tokens with this tokenizer ('' = count words)
    template: Literal["auto", "tulu", "llama3", "chatml", "mistral", "alpaca"] = "auto"  # with --tokenizer: the layout examples are counted in (train_sft.py's --template)
    seed: int = 0  # seed of sampling and shuffling
    decontaminate: list[str] = field(default_factory=list)  # task files / directories: drop train examples overlapping them (minillm.decontaminate)

    def check(self):
        require_option(0 <= self.valid_share < 1, "valid_share", self.valid_share, "must be in [0, 1)")


@cli
def main(argv=None):
    commands = {"translate": (TranslateOptions, translate_command), "mix": (MixOptions, mix_command),
                "decontaminate": (DecontaminateOptions, decontaminate_command)}
    command, cfg = parse_options({name: c[0] for name, c in commands.items()}, argv,
                                 prog="python -m minillm.instructions", description=__doc__.split("\n\n")[0])
    return commands[command][1](cfg)


if __name__ == "__main__":
    main()
