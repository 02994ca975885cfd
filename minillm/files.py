"""File I/O the whole package shares: the one atomic write, the one JSONL reader, data fingerprints, the run lock.

Atomic writes: the data goes to a temporary file beside the target, is fsync'd, and is renamed over the
target, so a reader (or a crash) sees the old file or the new one, never half of one. Corpora (large
text, JSONL and Parquet files, streamed) are read by minillm/corpora.py.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import tempfile
from pathlib import Path


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

def read_json_object(path, what: str) -> dict:
    """The JSON object in the file `path`; a one-line ValueError naming the file and `what` it should hold when
    it cannot be read, is not JSON, or holds something other than an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable {what}, not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {what} must be a JSON object")
    return value


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


def fingerprints(paths) -> dict[str, dict]:
    """{path: {"size", "mtime", "sha256"}} of each file: what a checkpoint records of the data it was trained on."""
    out = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        stat = os.stat(path)
        out[str(path)] = {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest.hexdigest()}
    return out


def lock_directory(directory) -> str | None:
    """Take DIRECTORY/.lock for this process (created exclusively; it names the pid and host), so two runs never
    write into one run directory. Released when the process exits; a directory this call created is removed
    again then if nothing else was written into it. A lock left by a dead process of this host (kill -9) is
    taken over, and returned as a note to say so. Another live holder, or one on another host (which cannot
    be checked from here), is a ValueError naming it."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock, me = directory / ".lock", {"pid": os.getpid(), "host": socket.gethostname()}
    note = None
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
                pid, host = int(holder["pid"]), str(holder["host"])
            except (OSError, ValueError, KeyError, TypeError):
                pid, host = None, "?"
            if pid is not None and host == me["host"] and not _alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                note = f"{lock}: removed the stale lock of process {pid}, which is no longer running"
                continue
            raise ValueError(f"{directory}: in use by another run (process {pid} on {host}, {lock}); wait for it, "
                             "or delete the lock file if no such run is alive") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        atexit.register(_release, lock, me["pid"], directory if created else None)
        return note
    raise ValueError(f"{lock}: could not be taken")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(lock: Path, pid: int, created: Path | None):
    if os.getpid() != pid:  # a forked child (a data worker) exits too: the lock is the parent's
        return
    lock.unlink(missing_ok=True)
    if created is not None:
        try:
            created.rmdir()  # only if empty: a run that failed before writing anything leaves nothing behind
        except OSError:
            pass
