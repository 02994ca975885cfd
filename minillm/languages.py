"""Language codes and their English names, for prompts and instruction templates; the languages of bitext files
from their names."""
import re
from pathlib import Path

LANGUAGE_NAMES = {
    "en": "English", "et": "Estonian", "pl": "Polish", "fi": "Finnish", "lv": "Latvian", "lt": "Lithuanian",
    "de": "German", "fr": "French", "ru": "Russian", "uk": "Ukrainian", "cs": "Czech", "es": "Spanish",
}


def language_name(code: str) -> str:
    """'et' -> 'Estonian'; an unknown code stands for itself."""
    return LANGUAGE_NAMES.get(code, code)


def _codes_in_name(path, known) -> list[str]:
    """The known language codes among the parts of a file name split at '.', '_' and '-' ('train.pl' -> ['pl'],
    'flores_en-et.tsv' -> ['en', 'et'])."""
    return [part for part in re.split(r"[._-]", Path(path).name.lower()) if part in known]


def bitext_languages(src_lang: str, tgt_lang: str, known, src: str = "", tgt: str = "",
                     pair_file: str = "") -> tuple[str, str, str]:
    """(source code, target code, how they were found) for `instructions translate`: the given codes, else one
    code in each of the --src / --tgt file names (train.en / train.pl), else two in a --tsv / --jsonl name
    (en-et.tsv). A code not in `known` or a name that tells nothing is one ValueError listing the known codes:
    a wrong default would silently write every instruction about another language."""
    found = "given"
    if not (src_lang and tgt_lang):
        if src and tgt:
            sides = [_codes_in_name(src, known), _codes_in_name(tgt, known)]
            names = sides[0][:1] + sides[1][:1] if all(len(side) == 1 for side in sides) else []
        else:
            names = _codes_in_name(pair_file, known) if pair_file else []
            names = names if len(names) == 2 else []
        if not names:
            files = f"{src} / {tgt}" if src and tgt else pair_file or "the input"
            raise ValueError(f"{files}: cannot tell the languages from the file name(s); give --src-lang and "
                             f"--tgt-lang (known: {', '.join(known)})")
        src_lang, tgt_lang = src_lang or names[0], tgt_lang or names[1]
        found = "from the file names"
    for flag, code in (("--src-lang", src_lang), ("--tgt-lang", tgt_lang)):
        if code not in known:
            raise ValueError(f"{flag} {code!r}: no instruction prompts for this language (known: {', '.join(known)})")
    if src_lang == tgt_lang:
        raise ValueError(f"--src-lang and --tgt-lang are both {src_lang!r}")
    return src_lang, tgt_lang, found
