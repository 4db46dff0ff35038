"""Checks of training files before any model is loaded, reporting every problem with file, line and field.

Reading: a `.jsonl` file holds one JSON object per line; a `.json` file holds a JSON array of objects (or, like
AdvertiseGen's own `train.json`, one object per line). Checking: every record against its format
(`input_output` or `conversations`), then, once encoded, that each example still has a learned token after
truncation. Also here: the data summary and the token/label sanity-check printout.
"""

import difflib
import itertools
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from finetune.data.encoding import (
    CONVERSATIONS,
    DATA_FORMATS,
    IGNORE_INDEX,
    INPUT_OUTPUT,
    MESSAGE_ROLES,
    ROLES_WITHOUT_LOSS,
    message_opts_in,
)
from finetune.model.tokenization import ChatGLMTokenizer

SUPPORTED_SUFFIXES = (".json", ".jsonl")
UTF8_BOM_BYTES = b"\xef\xbb\xbf"
JSON_WHITESPACE = " \t\n\r"
RECORD_KEYS = {INPUT_OUTPUT: ("prompt", "response"), CONVERSATIONS: ("conversations", "tools")}
MESSAGE_KEYS = ("role", "content", "metadata", "loss", "name", "parameters", "observation", "tools")
MISSPELLING_CUTOFF = 0.7  # difflib similarity above which an unknown key is taken for a misspelled known one
FORMAT_ORIGIN = "(the format is taken from the first record unless data_format is given; one file holds one format)"


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


def _describe_json_type(value: object) -> str:
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
                DataProblem(name, line_number, None, None, f"line is not valid UTF-8 (byte {error.start} of the line)")
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
        f"top-level JSON value is {_describe_json_type(document)}; a .json file must hold an array of records "
        "(or use a .jsonl file with one record per line)"
    )
    return [], [DataProblem(name, None, None, None, message)]


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


def detect_file_format(records: Iterable[SourceRecord]) -> str | None:
    """The data format of a file, from its first object record with 'conversations' or 'prompt'/'response'."""
    for record in records:
        if isinstance(record.value, dict):
            if "conversations" in record.value:
                return CONVERSATIONS
            if "prompt" in record.value or "response" in record.value:
                return INPUT_OUTPUT
    return None


def _check_string(container: dict, key: str, prefix: str) -> list[tuple[str, str]]:
    """A problem when container[key] is missing or not a string."""
    field = f"{prefix}{key}"
    if key not in container:
        return [(field, "is missing")]
    if not isinstance(container[key], str):
        return [(field, f"must be a string, got {_describe_json_type(container[key])}")]
    return []


def _check_message(message: object, position: int) -> list[tuple[str, str]]:
    """Problems of one conversation message at `position`."""
    prefix = f"conversations[{position}]."
    if not isinstance(message, dict):
        return [(f"conversations[{position}]", f"message must be an object, got {_describe_json_type(message)}")]
    problems = _check_string(message, "role", prefix)
    if problems:
        return problems
    role = message["role"]
    if role not in MESSAGE_ROLES:
        return [(f"{prefix}role", f"unknown role {role!r}; expected one of {', '.join(MESSAGE_ROLES)}")]
    if role == "system" and position != 0:
        problems.append((f"{prefix}role", "a system message is only allowed as the first message"))
    if "tools" in message and (role != "system" or not isinstance(message["tools"], list)):
        got = _describe_json_type(message["tools"]) if role == "system" else f"a {role} message"
        problems.append((f"{prefix}tools", f"tools belong to the system message, as a list; got {got}"))
    if "loss" in message and not isinstance(message["loss"], bool):
        problems.append((f"{prefix}loss", f"must be true or false, got {_describe_json_type(message['loss'])}"))
    if role == "tool":
        name = message.get("name")
        if not isinstance(name, str) or not name:
            problems.append((f"{prefix}name", "a tool message needs the tool name as a non-empty string"))
        if not isinstance(message.get("parameters"), dict):
            got = _describe_json_type(message["parameters"]) if "parameters" in message else "nothing"
            problems.append((f"{prefix}parameters", f"a tool message needs parameters as an object, got {got}"))
        if message.get("observation") is None:
            problems.append((f"{prefix}observation", "a tool message needs the tool's observation (not null)"))
        return problems
    problems += _check_string(message, "content", prefix)
    metadata = message.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        problems.append((f"{prefix}metadata", f"must be a string, got {_describe_json_type(metadata)}"))
    return problems


def _check_conversation(record: dict) -> list[tuple[str, str]]:
    """Problems of a conversations-format record."""
    problems: list[tuple[str, str]] = []
    if "tools" in record and not isinstance(record["tools"], list):
        problems.append(("tools", f"must be a list of tool descriptions, got {_describe_json_type(record['tools'])}"))
    conversation = record["conversations"]
    if not isinstance(conversation, list):
        return problems + [("conversations", f"must be a list of messages, got {_describe_json_type(conversation)}")]
    if not conversation:
        return problems + [("conversations", "conversation is empty")]
    for position, message in enumerate(conversation):
        problems += _check_message(message, position)
    if problems:
        return problems
    if not any(
        message_opts_in(message) if message["role"] in ROLES_WITHOUT_LOSS else message.get("loss", True) is not False
        for message in conversation
    ):
        return [("conversations", 'no message carries loss: add an assistant or tool message without "loss": false')]
    return []


def check_record(value: object, data_format: str) -> list[tuple[str | None, str]]:
    """Every (field, message) problem of one record in `data_format`; empty when the record is valid."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {DATA_FORMATS}")
    if not isinstance(value, dict):
        return [(None, f"record must be a JSON object, got {_describe_json_type(value)}")]
    if data_format == INPUT_OUTPUT:
        if "conversations" in value and "prompt" not in value:
            return [(None, f"record is in conversations format but the data is input-output {FORMAT_ORIGIN}")]
        return _check_string(value, "prompt", "") + _check_string(value, "response", "")
    if "conversations" not in value:
        if "prompt" in value or "response" in value:
            return [(None, f"record is in input-output format but the data is conversations {FORMAT_ORIGIN}")]
        return [("conversations", "is missing (a record needs 'conversations', or 'prompt' and 'response')")]
    return _check_conversation(value)


def check_records(records: Iterable[SourceRecord], data_format: str) -> tuple[list[SourceRecord], list[DataProblem]]:
    """Split records into valid ones and the problems of the others."""
    valid: list[SourceRecord] = []
    problems: list[DataProblem] = []
    for record in records:
        record_problems = check_record(record.value, data_format)
        if record_problems:
            problems += [record.problem(field, message) for field, message in record_problems]
        else:
            valid.append(record)
    return valid, problems


def _misspelling(key: str, known: Sequence[str]) -> str | None:
    """The known key an unknown `key` looks like a misspelling of, or None."""
    if key in known:
        return None
    close = difflib.get_close_matches(key, known, n=1, cutoff=MISSPELLING_CUTOFF)
    return close[0] if close else None


def misspelled_keys(records: Iterable[SourceRecord], data_format: str) -> list[DataProblem]:
    """Warnings (as problems, with line and field) for keys that look like misspelled known ones ("lose" for
    "loss"): they are ignored, so the record trains differently than its author meant."""
    warnings: list[DataProblem] = []
    for record in records:
        if not isinstance(record.value, dict):
            continue
        keyed = [("", key, RECORD_KEYS[data_format]) for key in record.value]
        if data_format == CONVERSATIONS and isinstance(record.value.get("conversations"), list):
            for position, message in enumerate(record.value["conversations"]):
                if isinstance(message, dict):
                    keyed += [(f"conversations[{position}].", key, MESSAGE_KEYS) for key in message]
        for prefix, key, known in keyed:
            meant = _misspelling(key, known)
            if meant is not None:
                message = f"unknown key {key!r} is ignored; did you mean {meant!r}?"
                warnings.append(record.problem(f"{prefix}{key}", message))
    return warnings


def untrainable_problem(record: SourceRecord, learned: int, length: int, full_length: int) -> DataProblem | None:
    """A problem when an encoded example has no learned token left (`learned` == 0), else None."""
    if learned:
        return None
    return record.problem(
        None,
        f"no learned token left after truncation to {length} tokens (the example has {full_length}); "
        "raise the maximum length or shorten the prompt/history",
    )


@dataclass(frozen=True)
class DataSummary:
    """What was loaded: example and skip counts, truncation rate, token-length percentiles."""

    examples: int
    skipped: int
    truncated: int
    length_p50: float
    length_p90: float
    length_p99: float
    length_max: int

    @property
    def truncation_rate(self) -> float:
        """Share of examples that were truncated."""
        return self.truncated / self.examples if self.examples else 0.0

    def __str__(self) -> str:
        return (
            f"{self.examples} examples ({self.skipped} skipped), {self.truncation_rate:.1%} truncated; "
            f"tokens p50 {self.length_p50:.0f}, p90 {self.length_p90:.0f}, p99 {self.length_p99:.0f}, "
            f"max {self.length_max}"
        )


def summarize_lengths(lengths: Sequence[int], truncated: int, skipped: int) -> DataSummary:
    """A DataSummary of encoded example lengths."""
    if len(lengths) == 0:
        return DataSummary(0, skipped, truncated, 0.0, 0.0, 0.0, 0)
    p50, p90, p99 = np.percentile(np.asarray(lengths), [50, 90, 99])
    return DataSummary(len(lengths), skipped, truncated, float(p50), float(p90), float(p99), int(max(lengths)))


def print_token_labels(example: dict, tokenizer: ChatGLMTokenizer, stream: TextIO | None = None) -> None:
    """Print each token of an encoded example as text, id and label (-100 = not learned): the sanity check."""
    stream = stream or sys.stdout
    print(f"{'token':>24} {'id':>7} {'label':>7}", file=stream)
    for token_id, label in zip(example["input_ids"], example["labels"]):
        print(f"{readable_text([token_id], tokenizer)!r:>24} {token_id:>7} {label:>7}", file=stream)


def readable_text(ids: list[int], tokenizer: ChatGLMTokenizer) -> str:
    """Decoded text of `ids` in which special tokens show their names (eos and bos decode to nothing, as officially)."""
    special_ids = set(tokenizer.all_special_ids)
    parts: list[str] = []
    run: list[int] = []
    for token_id in ids:
        if token_id not in special_ids:
            run.append(token_id)
            continue
        parts += [tokenizer.decode(run), tokenizer.convert_ids_to_tokens(token_id)]
        run = []
    return "".join(parts) + tokenizer.decode(run)


LEARNED_START = ">>>"
LEARNED_END = "<<<"


def print_learned_spans(example: dict, tokenizer: ChatGLMTokenizer, stream: TextIO | None = None) -> None:
    """Print an encoded example as text with the learned spans (labels other than -100) between >>> and <<<."""
    stream = stream or sys.stdout
    pieces = []
    for learned, group in itertools.groupby(
        zip(example["input_ids"], example["labels"]), key=lambda pair: pair[1] != IGNORE_INDEX
    ):
        text = readable_text([token_id for token_id, _ in group], tokenizer)
        pieces.append(f"{LEARNED_START}{text}{LEARNED_END}" if learned else text)
    print(
        f"first training example, {len(example['input_ids'])} tokens; the model learns the text between "
        f"{LEARNED_START} and {LEARNED_END} (--print_token_table True lists every token and label):",
        file=stream,
    )
    print("".join(pieces), file=stream)
