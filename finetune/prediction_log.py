"""Predictions kept as they are made: every process appends its rows to its own partial file and flushes after each
batch, so an interrupted or failed run keeps what it generated; a rerun with the same settings continues from those
rows (automatically), and the finished run merges them, in data order, into the final JSONL file atomically.

Files next to the final file `F`: `F.rank<N>.partial` (rows of process N, one JSON object per line, each with an
"id") and `F.settings.json` (the settings the rows were made with; rows made with other settings are discarded).
"""

import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from finetune.atomic_files import write_json_atomically, write_jsonl_atomically

PARTIAL_PATTERN = "{name}.rank{rank}.partial"
SETTINGS_SUFFIX = ".settings.json"


class OutputNotWritableError(OSError):
    """The folder where results go cannot be created or written."""


def check_writable(folder: Path, knob: str) -> None:
    """Create `folder` and write a probe file in it; OutputNotWritableError naming `knob` when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputNotWritableError(
            f"cannot write results to {folder}: {error.strerror or error}. Choose another folder with {knob}, or "
            "fix its permissions or free space, before generating (nothing was generated yet)"
        ) from error


def partial_path(final: Path, rank: int) -> Path:
    """The partial file of process `rank`."""
    return final.with_name(PARTIAL_PATTERN.format(name=final.name, rank=rank))


def partial_files(final: Path) -> list[Path]:
    """All partial files of `final`, of any process."""
    return sorted(final.parent.glob(PARTIAL_PATTERN.format(name=final.name, rank="*")))


def settings_path(final: Path) -> Path:
    """The file that records the settings the partial rows were made with."""
    return final.with_name(final.name + SETTINGS_SUFFIX)


def prepare_resume(final: Path, settings: dict) -> None:
    """Keep partial rows made with the same `settings` (a rerun continues from them); discard others. Rank 0 only."""
    parts = partial_files(final)
    recorded = settings_path(final)
    if parts:
        same = recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) == settings
        if same:
            print(f"continuing the interrupted run in {final.parent}: its predictions are kept", file=sys.stderr)
        else:
            print(f"discarding partial predictions in {final.parent}: made with other settings", file=sys.stderr)
            for part in parts:
                part.unlink()
    write_json_atomically(recorded, settings)


def read_partial_rows(final: Path) -> dict[str, dict]:
    """Rows already made, by id, from every partial file (a line cut short by a crash is ignored)."""
    rows = {}
    for part in partial_files(final):
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    return rows


class PartialWriter:
    """Appends rows to one process's partial file, flushed after every call (a torn last line is cut off first).

    The file is opened at the first write, so a run that fails before its first prediction leaves no empty file.
    """

    def __init__(self, path: Path):
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                os.truncate(path, data.rfind(b"\n") + 1)
            if b"\n" not in data:
                path.unlink()
        self.path = path
        self._handle: TextIO | None = None

    def write(self, rows: Iterable[dict]) -> None:
        """Append rows and flush them to the file; OutputNotWritableError when the disk refuses them."""
        try:
            if self._handle is None:
                self._handle = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - kept open
            for row in rows:
                self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._handle.flush()
        except OSError as error:
            raise OutputNotWritableError(
                f"cannot append predictions to {self.path}: {error.strerror or error}. The predictions written "
                "before are kept; free space (or fix permissions) and rerun the same command to continue"
            ) from error

    def close(self) -> None:
        """Close the file (if a row was written)."""
        if self._handle is not None:
            self._handle.close()


def merge_predictions(final: Path, order: Sequence[str], keep_id: bool = True) -> list[dict]:
    """Write every partial file's rows to `final` in `order` (atomically; without their "id" unless `keep_id`),
    remove the partial files; return the rows."""
    made = read_partial_rows(final)
    missing = [row_id for row_id in order if row_id not in made]
    if missing:
        raise RuntimeError(
            f"{len(missing)} predictions are missing from the partial files of {final} (first: {missing[0]}); "
            "rerun the same command to generate them"
        )
    rows = [made[row_id] for row_id in order]
    write_jsonl_atomically(final, rows if keep_id else ({k: v for k, v in row.items() if k != "id"} for row in rows))
    for part in partial_files(final):
        part.unlink()
    settings_path(final).unlink(missing_ok=True)
    return rows
