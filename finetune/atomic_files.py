"""Atomic file writes: write a temporary file in the target's folder, then os.replace it into place.

A crash at any point leaves either the old file or the new one, never a half-written file. Plain Python (no torch), so
the converters start fast; the training, evaluation and inference code writes through it too.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name next to `path`; on success it replaces `path`, on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        os.chmod(temp_name, 0o666 & ~_current_umask())
        yield temp_name
        with open(temp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.remove(temp_name)


def write_atomically(path: str | os.PathLike, write: Callable[[IO[str]], None]) -> None:
    """Call `write` with a UTF-8 text handle on a temporary file next to `path`, then move it onto `path`."""
    with atomic_path(path) as temp_name, open(temp_name, "w", encoding="utf-8", newline="\n") as handle:
        write(handle)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomically(path, lambda handle: handle.write(text))


def write_json_atomically(path: str | os.PathLike, value: object) -> None:
    """Write `value` as indented UTF-8 JSON (non-ASCII kept) to `path`, atomically."""
    write_text_atomically(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def dump_json_line(record: dict) -> str:
    """One JSON line as the official converters write it: UTF-8 text (non-ASCII kept), default separators."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl_atomically(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write one JSON object per line to `path`, atomically; return how many were written."""
    written = 0

    def write(handle: IO[str]) -> None:
        nonlocal written
        for record in records:
            handle.write(dump_json_line(record))
            written += 1

    write_atomically(path, write)
    return written


def replace_folder(built: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder `built` to `target`; an existing `target` is renamed aside first, then deleted."""
    built, target = Path(built), Path(target)
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(built, target)
        shutil.rmtree(retired)
        return
    os.replace(built, target)
