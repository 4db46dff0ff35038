"""What every converter of data_tools/ shares: checking the paths, the report of what was written and skipped, and
the exit status. Output files are written atomically (finetune/atomic_files.py), source files read with the
project's one JSON/JSONL reader (finetune/data/records.py); the tool-data converters also share
data_tools/tool_conversations.py.
"""


import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO


class SourceFileError(ValueError):
    """The source file as a whole cannot be read (not UTF-8, not JSON, not an array or JSON lines)."""


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
