"""Converters from public datasets (AdvertiseGen, ToolAlpaca) and tool-data formats (OpenAI, GLM-4, ShareGPT) to
the toolkit's JSONL training formats.

This module holds what all converters share: writing JSONL atomically and reporting skipped records.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


def dump_json_line(record: dict) -> str:
    """Serialise one record the way the official converters do: UTF-8 text, default separators, newline."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def _current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_jsonl_atomically(path: Path, records: Iterable[dict]) -> int:
    """Write `records` as JSON lines to `path` via a temp file in the same folder; return how many were written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    written = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            for record in records:
                out.write(dump_json_line(record))
                written += 1
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp_name, 0o666 & ~_current_umask())
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return written


@dataclass
class SkippedRecord:
    """A source record the converter could not convert: where it is and why."""

    location: str
    reason: str


@dataclass
class ConversionReport:
    """What one conversion did: records written, records skipped (with reasons), and notes."""

    source: Path
    destination: Path
    written: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def skip(self, location: str, reason: str) -> None:
        """Record that the source record at `location` was skipped because of `reason`."""
        self.skipped.append(SkippedRecord(location, reason))

    def print_summary(self, stream: TextIO | None = None) -> None:
        """Print every skipped record with its reason, the notes, then a one-line total (to stderr by default)."""
        stream = stream or sys.stderr
        for item in self.skipped:
            print(f"skipped {item.location}: {item.reason}", file=stream)
        for note in self.notes:
            print(f"note: {note}", file=stream)
        print(
            f"{self.source} -> {self.destination}: wrote {self.written} examples, skipped {len(self.skipped)}",
            file=stream,
        )


def check_paths(
    parser: argparse.ArgumentParser, source: Path, destination: Path, output_flag: str = "--output"
) -> None:
    """Stop with a usage error when the input file is missing or the output would overwrite it."""
    if not source.is_file():
        parser.error(f"input file {source} does not exist")
    if destination.resolve() == source.resolve():
        parser.error(f"output {destination} is the input file; choose another {output_flag}")


def finish_report(report: ConversionReport, unit: str) -> int:
    """Print the report; the exit status: 1 (saying so) when no `unit` could be converted, else 0."""
    report.print_summary()
    if report.written == 0:
        print(f"error: no {unit} could be converted from {report.source}; nothing written", file=sys.stderr)
        return 1
    return 0
