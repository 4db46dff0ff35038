"""Checks of training files before any model is loaded, reporting every problem with file, line and field.

Reading is finetune/data/records.py's; checking asks the record's format (finetune/data/formats/): every record
against the file's format, then, once encoded, that each example still has a learned token after truncation.
Also here: the data summary and the token/label sanity-check printout.
"""

import difflib
import itertools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from finetune.data.encoding import IGNORE_INDEX
from finetune.data.formats import detect_format, format_named, format_of
from finetune.data.formats.base import Problem
from finetune.data.records import DataProblem, SourceRecord, describe_json_type
from finetune.model.tokenization import ChatGLMTokenizer

MISSPELLING_CUTOFF = 0.7  # difflib similarity above which an unknown key is taken for a misspelled known one
FORMAT_ORIGIN = "(the format is taken from the first record unless data_format is given; one file holds one format)"


def detect_file_format(records: Iterable[SourceRecord]) -> str | None:
    """The name of a file's data format, from its first object record some registered format detects."""
    found = detect_format(records)
    return found.name if found else None


def check_record(value: object, data_format: str) -> list[Problem]:
    """Every (field, message) problem of one record in `data_format`; empty when the record is valid."""
    expected = format_named(data_format)
    if not isinstance(value, dict):
        return [(None, f"record must be a JSON object, got {describe_json_type(value)}")]
    found = format_of(value)
    if not expected.detects(value) and found is not None:
        return [(None, f"record is in {found.title} format but the data is {expected.title} {FORMAT_ORIGIN}")]
    return expected.check(value)


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
        keyed = format_named(data_format).misspelling_candidates(record.value)
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
    learned_max: int = 0  # the most tokens of one example that carry a label

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


def summarize_lengths(
    lengths: Sequence[int], truncated: int, skipped: int, learned: Sequence[int] = ()
) -> DataSummary:
    """A DataSummary of encoded example lengths (and of their labelled token counts, `learned`)."""
    if len(lengths) == 0:
        return DataSummary(0, skipped, truncated, 0.0, 0.0, 0.0, 0)
    p50, p90, p99 = np.percentile(np.asarray(lengths), [50, 90, 99])
    return DataSummary(
        len(lengths), skipped, truncated, float(p50), float(p90), float(p99), int(max(lengths)), max(learned, default=0)
    )


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
