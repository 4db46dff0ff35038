"""The one reader of JSON and JSON Lines data files in the project, and how a problem in one is reported.

A `.jsonl` file holds one JSON value per line; a `.json` file holds a JSON array (or, like AdvertiseGen's own
`train.json`, one value per line). Every record keeps its file, line and index, so a problem found in it later
(by a data format's checks, by a converter) names where it is. Problems are collected, not raised one by one:
`DataValidationError` lists them all. Plain Python, so the converters in data_tools/ use it without loading torch.
"""

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SUPPORTED_SUFFIXES = (".json", ".jsonl")
UTF8_BOM_BYTES = b"\xef\xbb\xbf"
JSON_WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class DataProblem:
    """One problem in a training file: where (file, line, record index, field) and what is wrong."""

    file: str
    line: int | None
    record_index: int | None
    field: str | None
    message: str

    @property
    def kind(self) -> str:
        """The problem without its place, for counting problems of the same kind."""
        return f"field {self.field!r}: {self.message}" if self.field is not None else self.message

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.record_index is not None and self.file.endswith(".json"):
            where += f" (record {self.record_index})"
        if self.field is not None:
            where += f" field {self.field!r}"
        return f"{where}: {self.message}"


MAX_LISTED_PROBLEMS = 20
SKIP_INVALID_ADVICE = (
    "Fix the records listed above, or pass --skip_invalid (where the command has it) to leave them out."
)


def describe_problems(problems: Sequence[DataProblem], skip_invalid_given: bool = False) -> str:
    """The message of a DataValidationError: a first line that stands alone, the first MAX_LISTED_PROBLEMS problems,
    a count per kind of the rest, and what to do (--skip_invalid only where it would help and was not given)."""
    if len(problems) == 1:
        lines = [f"a problem in the data: {problems[0]}"]
    else:
        lines = [f"{len(problems)} problems in the data (first: {problems[0]}):"]
        lines += [f"  {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    rest = problems[MAX_LISTED_PROBLEMS:]
    if rest:
        kinds = Counter(problem.kind for problem in rest)
        counts = "; ".join(f"{count} x {kind}" for kind, count in kinds.most_common())
        lines.append(f"  ... and {len(rest)} more: {counts}")
    if any(problem.line is not None for problem in problems):
        if skip_invalid_given:
            lines.append("No valid example is left even with --skip_invalid: fix the records listed above.")
        else:
            lines.append(SKIP_INVALID_ADVICE)
    return "\n".join(lines)


class DataValidationError(ValueError):
    """Training data with problems; `problems` lists every one of them (the message shows the first ones)."""

    def __init__(self, problems: Sequence[DataProblem], skip_invalid_given: bool = False):
        self.problems = list(problems)
        super().__init__(describe_problems(self.problems, skip_invalid_given))


class SourceRecord(NamedTuple):
    """One parsed record of a training file, its JSON text, and where it came from (1-based line, 0-based index)."""

    file: str
    line: int
    record_index: int
    value: object
    text: str

    def problem(self, field: str | None, message: str) -> DataProblem:
        """A problem located at this record."""
        return DataProblem(self.file, self.line, self.record_index, field, message)


def describe_json_type(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _line_of_byte(data: bytes, offset: int) -> int:
    """1-based line number of a byte offset."""
    return data.count(b"\n", 0, offset) + 1


def _skip_whitespace(text: str, position: int) -> int:
    """The first position at or after `position` that is not JSON whitespace."""
    while position < len(text) and text[position] in JSON_WHITESPACE:
        position += 1
    return position


def _read_json_lines(name: str, data: bytes) -> tuple[list[SourceRecord], list[DataProblem]]:
    """Parse one JSON value per non-blank line; report undecodable or malformed lines."""
    records: list[SourceRecord] = []
    problems: list[DataProblem] = []
    for line_number, raw_line in enumerate(data.split(b"\n"), start=1):
        if line_number == 1:
            raw_line = raw_line.removeprefix(UTF8_BOM_BYTES)
        if not raw_line.strip():
            continue
        index = len(records) + len(problems)
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.append(
                DataProblem(name, line_number, None, None, f"not valid UTF-8 (byte {error.start} of the line)")
            )
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(
                DataProblem(name, line_number, None, None, f"invalid JSON: {error.msg} at column {error.colno}")
            )
            continue
        records.append(SourceRecord(name, line_number, index, value, text))
    return records, problems


def _read_json_array(name: str, text: str) -> tuple[list[SourceRecord], list[DataProblem]]:
    """Parse a JSON array element by element, keeping each element's line; report where parsing stops."""
    decoder = json.JSONDecoder()
    records: list[SourceRecord] = []
    position = _skip_whitespace(text, 0) + 1
    line = text.count("\n", 0, position) + 1
    line_counted_to = position
    while True:
        position = _skip_whitespace(text, position)
        if position < len(text) and text[position] == "]" and not records:
            position += 1
            break
        line += text.count("\n", line_counted_to, position)
        line_counted_to = position
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            return records, [DataProblem(name, error.lineno, len(records), None, f"invalid JSON: {error.msg}")]
        records.append(SourceRecord(name, line, len(records), value, text[position:end]))
        position = _skip_whitespace(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
            continue
        if position < len(text) and text[position] == "]":
            position += 1
            break
        found = "the end of the file" if position >= len(text) else repr(text[position])
        problem_line = text.count("\n", 0, position) + 1
        message = f"invalid JSON: expected ',' or ']', found {found}"
        return records, [DataProblem(name, problem_line, None, None, message)]
    position = _skip_whitespace(text, position)
    if position < len(text):
        problem_line = text.count("\n", 0, position) + 1
        return records, [DataProblem(name, problem_line, None, None, "invalid JSON: extra text after the closing ']'")]
    return records, []


def _read_json_document(name: str, data: bytes) -> tuple[list[SourceRecord], list[DataProblem]]:
    """Parse a `.json` file: an array of records, or one record per line (AdvertiseGen's layout)."""
    body = data.removeprefix(UTF8_BOM_BYTES)
    if body.lstrip()[:1] == b"[":
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            line = _line_of_byte(body, error.start)
            return [], [DataProblem(name, line, None, None, f"file is not valid UTF-8 (byte {error.start})")]
        return _read_json_array(name, text)
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return _read_json_lines(name, data)
    message = (
        f"top-level JSON value is {describe_json_type(document)}; a .json file must hold an array of records "
        "(or use a .jsonl file with one record per line)"
    )
    return [], [DataProblem(name, None, None, None, message)]


def holds_json_array(path: Path) -> bool:
    """Whether a `.json` file's first JSON character (after a UTF-8 BOM and whitespace) opens an array."""
    if path.suffix != ".json":
        return False
    with path.open("rb") as stream:
        start = stream.read(4096).removeprefix(UTF8_BOM_BYTES).lstrip()
    return start[:1] == b"["


def read_source_records(path: Path) -> tuple[list[SourceRecord], list[DataProblem]]:
    """Parse a training file into located records; file- and line-level problems are returned, not raised."""
    name = str(path)
    if path.suffix not in SUPPORTED_SUFFIXES:
        message = f"unsupported file type {path.suffix!r}; use .jsonl (one object per line) or .json (an array)"
        return [], [DataProblem(name, None, None, None, message)]
    if not path.is_file():
        return [], [DataProblem(name, None, None, None, "file does not exist")]
    data = path.read_bytes()
    if not data.removeprefix(UTF8_BOM_BYTES).strip():
        return [], [DataProblem(name, None, None, None, "file is empty")]
    if path.suffix == ".jsonl":
        records, problems = _read_json_lines(name, data)
    else:
        records, problems = _read_json_document(name, data)
    if not records and not problems:
        problems.append(DataProblem(name, None, None, None, "file contains no records"))
    return records, problems
