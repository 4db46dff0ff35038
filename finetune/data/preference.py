"""Preference data: pairs of a better (`chosen`) and a worse (`rejected`) reply to the same prompt or history.

A pair is a record of a registered data format (finetune/data/formats/) without its reply, the pair's "prompt part",
plus the two replies; the format that detects the prompt part is the pair's, and one file holds one format. With the
built-in formats:
  conversations  {"conversations": [...history...], "tools"?: [...], "chosen": REPLY, "rejected": REPLY}
                 the shared history in our SFT conversations format (system, user, assistant, tool and observation
                 turns), ending in a user or observation turn (or a tool turn, whose observation ends it);
  input_output   {"prompt": "...", "chosen": "...", "rejected": "..."}.
A REPLY is the assistant's text, or an object: {"content": "..."} for text, {"name": "...", "parameters": {...}} for a
tool call (only in a format whose replies carry metadata, i.e. tool names: conversations).

This module checks the replies; the format checks the prompt part (`DataFormat.prompt_problems`) and builds each side
as one of its SFT records with only the reply learned (`DataFormat.with_reply`), which its `encode` encodes: the
same tokens and labels as our SFT encoding (finetune.data.encoding) of the same turns. Pairs are never truncated (a
cut reply would compare half answers); a pair whose longer side exceeds max_seq_length is dropped and counted.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from finetune.data.collator import RightPaddingCollator
from finetune.data.encoding import format_tool_call
from finetune.data.formats import format_named, format_names, format_of
from finetune.data.formats.base import DataFormat, EncodingLimits, Problem
from finetune.data.records import DataProblem, DataValidationError, SourceRecord, read_source_records
from finetune.model.tokenization import ChatGLMTokenizer

logger = logging.getLogger(__name__)

CHOSEN = "chosen"
REJECTED = "rejected"
SIDES = (CHOSEN, REJECTED)
# Columns of reference log-probabilities cached with the data (full and freeze tuning: no reference on the fly).
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
UNBOUNDED = 1 << 30
NO_TRUNCATION = EncodingLimits(max_source_length=UNBOUNDED, max_target_length=UNBOUNDED, max_seq_length=UNBOUNDED)


def is_preference_record(value: object) -> bool:
    """True for a record with both `chosen` and `rejected`."""
    return isinstance(value, dict) and CHOSEN in value and REJECTED in value


def is_preference_file(records: Sequence[SourceRecord]) -> bool:
    """True when the first object record of a file is a preference pair."""
    first = next((record.value for record in records if isinstance(record.value, dict)), None)
    return is_preference_record(first)


def detect_preference_file(path: str | Path) -> bool:
    """True when the data file at `path` holds preference pairs (read from its first record)."""
    records, _problems = read_source_records(Path(path))
    return is_preference_file(records)


def prompt_part(value: dict) -> dict:
    """A pair without its replies: a record of the pair's format without its reply."""
    return {key: item for key, item in value.items() if key not in SIDES}


def pair_format(value: dict) -> DataFormat:
    """The format of a pair: the registered format that detects its prompt part; a pair none detects is checked as
    the format registered last, the plainest (input-output), whose errors name the keys a pair needs."""
    return format_of(prompt_part(value)) or format_named(format_names()[-1])


def _reply_problems(reply: object, side: str) -> list[Problem]:
    """Problems of one reply: empty text, or an object that is neither text nor a tool call."""
    if isinstance(reply, str):
        return [] if reply.strip() else [(side, "is empty")]
    if not isinstance(reply, dict):
        return [(side, f"must be the reply text or an object, got {type(reply).__name__}")]
    if "name" in reply or "parameters" in reply:
        problems = []
        if not isinstance(reply.get("name"), str) or not reply["name"].strip():
            problems.append((f"{side}.name", "a tool call needs the tool name as a non-empty string"))
        if not isinstance(reply.get("parameters"), dict):
            problems.append((f"{side}.parameters", "a tool call needs its parameters as an object"))
        return problems
    content = reply.get("content")
    if not isinstance(content, str):
        return [(f"{side}.content", "a reply object needs 'content' text, or 'name' and 'parameters' for a tool call")]
    return [] if content.strip() else [(f"{side}.content", "is empty")]


def reply_message(reply: str | dict) -> dict:
    """The assistant message of a reply, as the SFT conversations format writes it (tool calls as code blocks, the
    tool's name as metadata)."""
    if isinstance(reply, str):
        return {"role": "assistant", "content": reply}
    if "parameters" in reply:
        return {"role": "assistant", "metadata": reply["name"], "content": format_tool_call(reply["parameters"])}
    return {"role": "assistant", "content": reply["content"]}


def check_preference_record(value: object) -> list[Problem]:
    """Every (field, message) problem of one preference record; empty when it is valid."""
    if not isinstance(value, dict):
        return [(None, f"record must be a JSON object, got {type(value).__name__}")]
    problems: list[Problem] = []
    for side in SIDES:
        if side not in value:
            problems.append((side, "is missing (a preference record needs both chosen and rejected)"))
        else:
            problems += _reply_problems(value[side], side)
    if problems:
        return problems
    if reply_message(value[CHOSEN]) == reply_message(value[REJECTED]):
        return [(REJECTED, "is identical to chosen: the pair prefers nothing")]
    data_format = pair_format(value)
    problems = data_format.prompt_problems(prompt_part(value), reply_message(value[CHOSEN]))
    if problems or data_format.reply_has_metadata:
        return problems
    return [
        (side, f"is a tool call, which {data_format.title} pairs cannot hold: give the reply as text")
        for side in SIDES
        if "metadata" in reply_message(value[side])
    ]


def encode_side(value: dict, side: str, tokenizer: ChatGLMTokenizer) -> dict[str, list[int] | int]:
    """input_ids, labels and full_length of one side of a valid pair, untruncated: labels only on that reply and its
    eos, as the pair's format encodes its prompt part followed by that reply."""
    data_format = pair_format(value)
    record = data_format.with_reply(prompt_part(value), reply_message(value[side]))
    return data_format.encode(record, tokenizer, NO_TRUNCATION)


def encode_pair(value: dict, tokenizer: ChatGLMTokenizer) -> dict[str, list[int] | int]:
    """Both sides of a pair, as chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels, and `length`
    (the longer side's tokens)."""
    encoded: dict[str, list[int] | int] = {}
    for side in SIDES:
        side_encoding = encode_side(value, side, tokenizer)
        encoded[f"{side}_input_ids"] = side_encoding["input_ids"]
        encoded[f"{side}_labels"] = side_encoding["labels"]
    encoded["length"] = max(len(encoded["chosen_input_ids"]), len(encoded["rejected_input_ids"]))
    return encoded


@dataclass
class PreferenceData:
    """Encoded preference pairs, their layout (the name of the pairs' data format), the problems of records left
    out, and the pairs dropped as too long."""

    dataset: datasets.Dataset
    layout: str
    skipped: list[DataProblem]
    too_long: list[DataProblem]

    @property
    def summary(self) -> str:
        """One line: pairs kept, dropped, and their lengths."""
        lengths = self.dataset["length"]
        return (
            f"{len(lengths)} preference pairs ({self.layout}), longest side {max(lengths)} tokens, mean "
            f"{sum(lengths) / len(lengths):.0f}; {len(self.too_long)} dropped as longer than max_seq_length, "
            f"{len(self.skipped)} invalid left out"
        )


def load_preference_data(
    path: str | Path, tokenizer: ChatGLMTokenizer, max_seq_length: int, skip_invalid: bool = False
) -> PreferenceData:
    """Read, validate and encode a preference file. Invalid records raise DataValidationError listing every problem
    (file:line field: what) unless `skip_invalid`; pairs longer than `max_seq_length` are dropped and counted."""
    path = Path(path)
    records, problems = read_source_records(path)
    valid: list[SourceRecord] = []
    for record in records:
        record_problems = check_preference_record(record.value)
        problems += [record.problem(field, message) for field, message in record_problems]
        if not record_problems:
            valid.append(record)
    first_format = pair_format(valid[0].value) if valid else None
    other = next((record for record in valid if pair_format(record.value) is not first_format), None)
    if other is not None:
        titles = f"{first_format.title} and {pair_format(other.value).title}"
        problems.append(other.problem(None, f"mixes {titles} pairs; one file holds one layout"))
        valid = []
    if problems and not skip_invalid:
        raise DataValidationError(problems)
    rows: dict[str, list] = {key: [] for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                 "rejected_labels", "length")}  # fmt: skip
    too_long: list[DataProblem] = []
    for record in valid:
        encoded = encode_pair(record.value, tokenizer)
        if encoded["length"] > max_seq_length:
            message = f"pair has {encoded['length']} tokens > max_seq_length {max_seq_length}"
            too_long.append(record.problem(None, message))
            continue
        for key, column in rows.items():
            column.append(encoded[key])
    if too_long:
        logger.warning(
            "%s: dropped %d of %d pairs longer than max_seq_length=%d (MAX_SEQ_LEN), e.g. %s",
            path, len(too_long), len(valid), max_seq_length, too_long[0],
        )  # fmt: skip
    if not rows["length"]:
        left = DataProblem(str(path), None, None, None, f"no preference pair left ({len(too_long)} longer than "
                           f"max_seq_length={max_seq_length}, {len(problems)} invalid)")  # fmt: skip
        raise DataValidationError(problems + [left], skip_invalid_given=skip_invalid)
    for problem in problems:
        logger.warning("skipped: %s", problem)
    return PreferenceData(datasets.Dataset.from_dict(rows), first_format.name, problems, too_long)


@dataclass
class PreferenceCollator:
    """Batch pairs as one batch of 2 x pairs rows: every chosen side first, then every rejected side, right-padded
    (RightPaddingCollator); cached reference log-probabilities pass through as fp32 tensors."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate pairs into input_ids/labels/attention_mask of 2 x len(features) rows (+ reference columns)."""
        rows = [
            {"input_ids": feature[f"{side}_input_ids"], "labels": feature[f"{side}_labels"]}
            for side in SIDES
            for feature in features
        ]
        batch = RightPaddingCollator(self.pad_token_id, self.pad_to_multiple_of)(rows)
        for column in REFERENCE_COLUMNS:
            if column in features[0]:
                batch[column] = torch.tensor([feature[column] for feature in features], dtype=torch.float32)
        return batch
