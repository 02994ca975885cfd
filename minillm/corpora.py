"""Corpus readers: text, JSON Lines and Parquet files (gzip'd or zstd'd) streamed as documents in bounded memory.

Used by `minillm.prepare` (token shards) and the tokenizer trainer. Formats:
    text     one document per line (default), or per blank-line-separated paragraph (txt_docs='paragraph',
             the paragraph's lines joined with '\\n'); blank lines are not documents
    jsonl    one JSON object per line, the document is its `text_field` (default "text"); blank lines skipped
    parquet  one document per row, the string column `text_field`; read one ~1 MB record batch at a time,
             only that column (FineWeb-2, CulturaX, MADLAD-400 and HPLT ship Parquet or .jsonl.zst)
text and jsonl may be compressed: .gz (gzip) or .zst/.zstd (zstandard, streamed frame by frame). The format
comes from the name (NAMES) unless given (fmt='text'|'jsonl'|'parquet'), so `train.et` reads with fmt='text'.
Parquet needs pyarrow and .zst needs zstandard: the optional extra `pip install 'minillm[corpora]'`.

Every problem is a ValueError naming the file and, where there is one, the 1-based line (text, JSONL) or the
row index (Parquet, counted from 0 like pyarrow and pandas do) and the field. A null in the text column is an
error, like a JSON null: it means a wrong column or a broken export, and skipping it silently would hide that.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from minillm.files import json_object

FORMATS = ("text", "jsonl", "parquet")
NAMES = {"text": (".txt", ".text"), "jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",)}
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
CHUNK_BYTES = 1 << 20  # text per job of a worker process
EXTRA = "pip install 'minillm[corpora]'"


@dataclass(kw_only=True)
class CorpusOptions:
    """The corpus options of `python -m minillm.prepare` and `python -m minillm.tokenizer train`."""
    input: list[str]  # corpus files, directories and quoted glob patterns ('et/*.parquet', 'hplt/**/*.jsonl.zst'),
        # in the order given; a pattern's matches and a directory's files (recursively) sorted; a directory gives
        # its .txt .text .jsonl .ndjson (+ .gz .zst) and .parquet files (with --format: all its files), never
        # names starting with . or _
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"  # input format; auto = from each file's name
        # (so a text file named train.et needs --format text); compression always from the name (.gz, .zst)
    text_field: str = "text"  # JSONL field / Parquet column holding the document
    txt_docs: Literal["line", "paragraph"] = "line"  # text documents: one per line, or per blank-line paragraph


def _needs(package: str, path, what: str):
    """Import an optional reader package, or say which extra installs it."""
    try:
        if package == "pyarrow":
            import pyarrow
            import pyarrow.parquet
            return pyarrow
        import zstandard
        return zstandard
    except ImportError:
        raise ValueError(f"{path}: reading {what} needs the '{package}' package: {EXTRA}") from None


# ----------------------------------------------------------------------------- names

def corpus_format(path, fmt: str = "auto") -> tuple[str, str]:
    """(format, compression) of a corpus file: format from FORMATS, `fmt` when not 'auto', else from the
    name; compression '' | 'gzip' | 'zstd', always from the name's last suffix."""
    name = str(path).lower()
    suffix = os.path.splitext(name)[1]
    compression = COMPRESSION.get(suffix, "")
    if compression:
        name = name[:-len(suffix)]
    if fmt == "auto":
        fmt = next((f for f, ends in NAMES.items() if name.endswith(ends)), "")
        if not fmt:
            raise ValueError(f"{path}: unknown input format from the file name (expected .txt, .jsonl, "
                             f"optionally .gz/.zst, or .parquet); name it with --format text|jsonl|parquet")
    elif fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r} (text, jsonl or parquet)")
    if fmt == "parquet" and compression:
        raise ValueError(f"{path}: a compressed Parquet file cannot be streamed (Parquet compresses inside "
                         f"the file); decompress it first")
    return fmt, compression


def _is_corpus_name(name: str) -> bool:
    try:
        corpus_format(name)
        return True
    except ValueError:
        return False


def expand_inputs(items, fmt: str = "auto") -> list[Path]:
    """The corpus files `items` name, in order: an existing path as itself; a directory as every corpus file
    inside it, recursively, sorted (with fmt 'auto' the names corpus_format knows, else every file; names
    starting with '.' or '_' never, such as .cache or _SUCCESS); a glob pattern ('*', '?', '[...]', '**'
    for any depth) as its matches, sorted. A pattern without matches, a directory without corpus files and a
    file named twice are errors, and so is anything that is not a regular file."""
    out: list[Path] = []
    for item in map(str, items):
        if os.path.isdir(item):
            found = _corpus_files(Path(item), fmt)
            if not found:
                raise ValueError(f"{item}: no corpus files in this directory "
                                 + ("(names: .txt .text .jsonl .ndjson [.gz .zst], .parquet)"
                                    if fmt == "auto" else "(names starting with . or _ are not read)"))
            out += found
        elif not os.path.exists(item) and glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise ValueError(f"{item}: no files match")
            for m in matches:
                out += _corpus_files(m, fmt) if m.is_dir() else [m]
        else:
            out.append(Path(item))
    seen: dict[str, Path] = {}
    for p in out:
        if p.exists() and not p.is_file():  # a FIFO (or device, socket) would be read forever
            raise ValueError(f"{p}: not a regular file (a FIFO, device or socket); corpora are read from files")
        key = os.path.realpath(p)
        if key in seen:
            raise ValueError(f"{p}: named twice in the inputs (also as {seen[key]}); each file is read once")
        seen[key] = p
    return out


def _corpus_files(directory: Path, fmt: str) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith((".", "_"))]
        for f in files:
            if not f.startswith((".", "_")) and (fmt != "auto" or _is_corpus_name(f)):
                found.append(Path(root) / f)
    return sorted(found)


# ----------------------------------------------------------------------------- opening

def _read_error(path, e: BaseException) -> ValueError:
    detail = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ValueError(f"{path}: cannot read ({detail})")


def _zstd_frames_complete(f) -> bool:
    """Whether a zstd file ends where its last frame does. zstandard's stream reader returns a truncated
    file's bytes without complaint, so the frame and block headers are walked (a few bytes per 128 KB block;
    the decompressor has checked the rest)."""
    size, pos = os.fstat(f.fileno()).st_size, 0
    while pos < size:
        f.seek(pos)
        head = f.read(5)
        magic = int.from_bytes(head[:4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: magic, 4-byte length, payload
            f.seek(pos + 4)
            pos += 8 + int.from_bytes(f.read(4), "little")
            continue
        if magic != 0xFD2FB528 or len(head) < 5:
            return False
        descriptor = head[4]
        single_segment = descriptor >> 5 & 1
        pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] \
            + (single_segment, 2, 4, 8)[descriptor >> 6]
        last = False
        while not last:
            f.seek(pos)
            block = f.read(3)
            if len(block) < 3:
                return False
            header = int.from_bytes(block, "little")
            last, kind = header & 1, header >> 1 & 3
            pos += 3 + (1 if kind == 1 else header >> 3)  # an RLE block holds one byte
        pos += 4 * (descriptor >> 2 & 1)  # content checksum
    return pos == size


class _Lines:
    """A text or JSONL file's lines as bytes, decompressed on the fly; `tell()` is the position in the file
    on disk (compressed bytes), for progress bars."""

    def __init__(self, path, compression: str):
        self.path, self.compression = path, compression
        self.raw = open(path, "rb")
        if compression == "gzip":
            self.stream = gzip.GzipFile(fileobj=self.raw)
        elif compression == "zstd":
            zstd = _needs("zstandard", path, "zstd")
            reader = zstd.ZstdDecompressor().stream_reader(self.raw, read_size=1 << 17, read_across_frames=True,
                                                          closefd=False)
            self.stream = io.BufferedReader(reader, buffer_size=1 << 20)
        else:
            self.stream = self.raw

    def __iter__(self):
        yield from self.stream
        if self.compression == "zstd" and not _zstd_frames_complete(self.raw):
            raise EOFError("truncated zstd file: it ends inside a frame")

    def tell(self) -> int:
        return self.raw.tell()

    def close(self):
        self.stream.close()
        self.raw.close()


def _errors(path):
    """The exceptions a reader raises on a broken or unreadable file (all become 'path: cannot read (...)')."""
    errors = [OSError, EOFError]  # includes gzip.BadGzipFile and truncated .gz files
    for name in ("zstandard", "pyarrow"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.ZstdError if name == "zstandard" else module.ArrowException)
    return tuple(errors)


def _parquet_file(path, text_field: str):
    """An open pyarrow ParquetFile whose `text_field` is a string column."""
    pa = _needs("pyarrow", path, "Parquet")
    # buffer_size: read each column chunk in 1 MB pieces, not whole (a row group can be hundreds of MB)
    pf = pa.parquet.ParquetFile(path, buffer_size=1 << 20)
    schema = pf.schema_arrow
    if schema.get_field_index(text_field) < 0:
        raise ValueError(f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); "
                         f"choose one with --text-field")
    typ = schema.field(text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise ValueError(f"{path}: column '{text_field}' is {typ}, expected strings")
    return pf


def check_readable(path, fmt: str = "auto", text_field: str = "text"):
    """Fail before any work starts when an input cannot be opened, is not what its name says (gzip, zstd,
    Parquet), lacks its reader package, or (Parquet) has no string column `text_field`."""
    fmt, compression = corpus_format(path, fmt)
    try:
        if fmt == "parquet":
            _parquet_file(path, text_field)
            return
        lines = _Lines(path, compression)
        try:
            lines.stream.read(1)
        finally:
            lines.close()
    except _errors(path) as e:
        raise _read_error(path, e) from None


# ----------------------------------------------------------------------------- reading

class Chunk(NamedTuple):
    """About CHUNK_BYTES of one file's records, picklable (a worker process parses it with chunk_texts).
    text/jsonl: records = [(line number, raw line bytes)]; parquet: records = [pyarrow string arrays],
    start = the row index of their first row."""
    path: str
    fmt: str
    text_field: str
    records: list
    start: int = 0


def iter_chunks(path, fmt: str = "auto", text_field: str = "text", txt_docs: str = "line",
                chunk_bytes: int = CHUNK_BYTES):
    """Yield (Chunk, bytes of the file read so far) for one file; the last one (possibly without records)
    reports the whole file. Memory: one chunk plus the decompressor's buffers, whatever the file's size."""
    fmt, compression = corpus_format(path, fmt)
    try:
        if fmt == "parquet":
            yield from _parquet_chunks(path, text_field, chunk_bytes)
            return
        lines = _Lines(path, compression)
        try:
            records, size = [], 0
            for line_no, raw in _line_records(lines, fmt, txt_docs):
                records.append((line_no, raw))
                size += len(raw)
                if size >= chunk_bytes:
                    yield Chunk(str(path), fmt, text_field, records), lines.tell()
                    records, size = [], 0
        finally:
            lines.close()
        yield Chunk(str(path), fmt, text_field, records), os.path.getsize(path)
    except _errors(path) as e:
        raise _read_error(path, e) from None


def _line_records(lines, fmt: str, txt_docs: str):
    """(first line number, raw bytes) of each candidate document: a JSONL record, a text line or paragraph."""
    paragraph, first = [], 0
    for line_no, line in enumerate(lines, 1):
        blank = not line.strip()
        if fmt == "text" and txt_docs == "paragraph":
            if blank:
                if paragraph:
                    yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph)
                paragraph = []
            else:
                first = first if paragraph else line_no
                paragraph.append(line)
        elif not blank:
            yield line_no, line.rstrip(b"\r\n")
    if paragraph:
        yield first, b"\n".join(x.rstrip(b"\r\n") for x in paragraph)


def _parquet_chunks(path, text_field: str, chunk_bytes: int):
    """Record batches of the text column only, each sized to about chunk_bytes of text from the row
    group's metadata (so a corpus of long documents does not make batches of hundreds of MB)."""
    pf = _parquet_file(path, text_field)
    meta = pf.metadata
    column = pf.schema_arrow.get_field_index(text_field)
    file_size, row = os.path.getsize(path), 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        text_bytes = group.column(column).total_uncompressed_size or 1
        batch_rows = max(1, min(65536, chunk_bytes * group.num_rows // text_bytes))
        # use_threads=False: the worker processes have the other cores
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=[text_field],
                                     use_threads=False):
            texts = batch.column(0)
            if texts.null_count:
                first_null = int(texts.is_null().to_numpy(zero_copy_only=False).argmax())
                raise ValueError(f"{path}: row index {row + first_null}: column '{text_field}' is null, "
                                 f"expected a string")
            row += len(texts)
            yield Chunk(str(path), "parquet", text_field, [texts], row - len(texts)), \
                file_size * row // max(meta.num_rows, 1)
    yield Chunk(str(path), "parquet", text_field, [], row), file_size


def chunk_texts(chunk: Chunk) -> list[str]:
    """The document text of every record of a chunk; ValueError 'path:LINE: ...' on bad input."""
    if chunk.fmt == "parquet":
        return _arrow_texts(chunk)
    return [record_text(chunk.path, line_no, raw, chunk.fmt, chunk.text_field) for line_no, raw in chunk.records]


def _arrow_texts(chunk: Chunk) -> list[str]:
    out, row = [], chunk.start
    for texts in chunk.records:
        try:
            out += texts.to_pylist()
        except UnicodeDecodeError:  # pyarrow does not validate a Parquet string column's UTF-8: find the row
            for i in range(len(texts)):
                try:
                    texts[i].as_py()
                except UnicodeDecodeError as e:
                    raise ValueError(f"{chunk.path}: row index {row + i}: column '{chunk.text_field}' is not valid "
                                     f"UTF-8 (byte {e.start})") from None
        row += len(texts)
    return out


def record_text(path, line_no: int, raw: bytes, fmt: str, text_field: str = "text") -> str:
    """The document text of one line record ('text' or 'jsonl'); ValueError 'path:LINE: ...' on bad input."""
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
        kind = "null" if text is None else type(text).__name__
        raise ValueError(f"{path}:{line_no}: field '{text_field}' is {kind}, expected a string")
    return text


def iter_texts(paths, fmt: str = "auto", text_field: str = "text", txt_docs: str = "line"):
    """Every document text of every file, in order (for the tokenizer trainer; `prepare` parallelises)."""
    for path in paths:
        for chunk, _ in iter_chunks(path, fmt, text_field, txt_docs):
            yield from chunk_texts(chunk)
