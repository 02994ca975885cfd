"""File I/O the whole package shares: the one atomic write, the one JSONL reader, and the corpus readers.

Atomic writes: the data goes to a temporary file beside the target, is fsync'd, and is renamed over the
target, so a reader (or a crash) sees the old file or the new one, never half of one.

Corpus readers turn a text file into candidate documents for `minillm.prepare` and the tokenizer trainer:
    text   one document per line (default), or per blank-line-separated paragraph (txt_docs='paragraph',
           the paragraph's lines joined with '\\n'); whitespace-only documents are skipped
    jsonl  one JSON object per line, the document is its `text_field` (default "text"); blank lines skipped
Either may be gzip'd (.gz). The format comes from the file name (.txt/.text, .jsonl/.ndjson) unless given
explicitly, so `train.et` or `corpus.pl` read as text with fmt='text'. Every problem is a ValueError
naming the file and, where there is one, the 1-based line.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

FORMATS = ("text", "jsonl")


# ----------------------------------------------------------------------------- writing

def atomic_write(path, data: bytes | str):
    """Write `data` (str is UTF-8 encoded) to `path` atomically: temp file, fsync, rename. The file gets
    the usual umask permissions (mkstemp's would be 0600), so others sharing a data directory can read it."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json(obj, indent: int = 2) -> str:
    """The JSON text every minillm file is written with (UTF-8, not ASCII-escaped, final newline)."""
    return json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- JSON Lines

def read_jsonl(path) -> list[tuple[int, object]]:
    """(1-based line number, parsed JSON) for every non-blank line; ValueError 'path:LINE: ...'."""
    path = Path(path)
    try:
        raw_lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    out = []
    for line_no, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start})") from None
        if line_no == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark is not JSON
        if not line.strip():
            continue
        try:
            out.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not out:
        raise ValueError(f"{path}: empty file (no records)")
    return out


def json_object(text: str, path, line_no: int | None = None) -> dict:
    """The JSON object `text` holds; ValueError 'path:LINE: ...' naming the record's line (line_no), or for a
    whole file the line where the JSON breaks."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_no or e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{line_no or 1}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_json_objects(path) -> list[tuple[int, dict]]:
    """read_jsonl, where every record must be a JSON object."""
    records = read_jsonl(path)
    for line_no, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return records


def read_lines(path, limit: int | None = None) -> list[str]:
    """Lines of a UTF-8 text file without their line ends (the first `limit` only, when given); a final
    newline does not start another line. ValueError 'path:LINE: ...' for bytes that are not UTF-8."""
    path = Path(path)
    out = []
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if limit is not None and len(out) >= limit:
                    break
                try:
                    out.append(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if out:
        out[0] = out[0].removeprefix("\ufeff")
    return out


def write_jsonl(path, records):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------- corpora

def corpus_format(path, fmt: str = "auto") -> tuple[str, bool]:
    """('text' | 'jsonl', gzipped?) of a corpus file: `fmt` when given, else from the file name."""
    name = str(path).lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown corpus format {fmt!r} (text or jsonl)")
        return fmt, gz
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl", gz
    if name.endswith((".txt", ".text")):
        return "text", gz
    raise ValueError(f"{path}: unknown input format from the file name (expected .txt or .jsonl, optionally .gz); "
                     f"name it with --format text|jsonl")


def check_readable(path, fmt: str = "auto"):
    """Fail before any work starts when an input cannot be opened (or is not really gzip)."""
    _, gz = corpus_format(path, fmt)
    try:
        with open(path, "rb") as f:
            if gz:
                with gzip.GzipFile(fileobj=f) as g:
                    g.read(1)
            else:
                f.read(1)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def iter_records(path, fmt: str = "auto", txt_docs: str = "line"):
    """Yield (line_no, raw bytes, bytes read so far) for each candidate document of one file.

    JSONL records stay raw bytes here (parsed by `record_text`, in a worker process); text documents
    are the document. line_no is the document's first line; bytes-read counts the file on disk
    (compressed bytes for .gz), for progress bars."""
    fmt, gz = corpus_format(path, fmt)
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            paragraph, first = [], 0
            for line_no, line in enumerate(f, 1):
                blank = not line.strip()
                if fmt == "text" and txt_docs == "paragraph":
                    if blank:
                        if paragraph:
                            yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph), raw.tell()
                        paragraph = []
                    else:
                        first = first if paragraph else line_no
                        paragraph.append(line)
                elif not blank:
                    yield line_no, line.rstrip(b"\r\n"), raw.tell()
            if paragraph:
                yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph), raw.tell()
    except (OSError, EOFError) as e:  # includes gzip.BadGzipFile and truncated .gz files
        raise ValueError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def record_text(path, line_no: int, raw: bytes, fmt: str, text_field: str = "text") -> str:
    """The document text of one record ('text' or 'jsonl'); ValueError 'path:LINE: ...' on bad input."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{line_no}: not valid UTF-8 (byte {e.start})") from None
    if line_no == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark is not text (and not JSON)
    if fmt == "text":
        return line
    record = json_object(line, path, line_no)
    if text_field not in record:
        raise ValueError(f"{path}:{line_no}: missing field '{text_field}'")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{path}:{line_no}: field '{text_field}' is {type(text).__name__}, expected a string")
    return text


def iter_texts(paths, fmt: str = "auto", text_field: str = "text", txt_docs: str = "line"):
    """Every document text of every file, in order (for the tokenizer trainer; `prepare` parallelises)."""
    for path in paths:
        f, _ = corpus_format(path, fmt)
        for line_no, raw, _ in iter_records(path, fmt, txt_docs):
            yield record_text(path, line_no, raw, f, text_field)
