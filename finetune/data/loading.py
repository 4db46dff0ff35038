"""Training files to an encoded `datasets.Dataset`: read, validate, encode with `Dataset.map` (cached, parallel).

All problems are collected before anything is raised, so one error lists every bad record. The returned
dataset has the columns `input_ids`, `labels` and `length` (for the Trainer's group-by-length sampler).
"""

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from finetune.data import encoding
from finetune.data.encoding import IGNORE_INDEX
from finetune.data.formats import default_format, detect_format, format_named
from finetune.data.formats.base import DataFormat, EncodingLimits
from finetune.data.records import DataProblem, DataValidationError, read_source_records
from finetune.data.source_formats import check_not_source_format
from finetune.data.validation import (
    DataSummary,
    check_records,
    misspelled_keys,
    summarize_lengths,
    untrainable_problem,
)
from finetune.model.tokenization import ChatGLMTokenizer

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(datasets.config.HF_DATASETS_CACHE) / "chatglm_finetune_encoded"
RECORD_COLUMN = "record"
OUTPUT_COLUMNS = ["input_ids", "labels", "length"]


@dataclass
class TrainingData:
    """An encoded training set, its format, the problems of the records left out, and its summary."""

    dataset: datasets.Dataset
    data_format: str
    skipped: list[DataProblem]
    summary: DataSummary


def encode_record_batch(
    batch: dict[str, list], tokenizer: ChatGLMTokenizer, data_format: DataFormat, limits: EncodingLimits
) -> dict[str, list]:
    """Dataset.map function: encode a batch of JSON-encoded records of `data_format` into ids, labels and lengths."""
    encoded_batch: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "full_length": [], "learned": []}
    for text in batch[RECORD_COLUMN]:
        encoded = data_format.encode(json.loads(text), tokenizer, limits)
        encoded_batch["input_ids"].append(encoded["input_ids"])
        encoded_batch["labels"].append(encoded["labels"])
        encoded_batch["length"].append(len(encoded["input_ids"]))
        encoded_batch["full_length"].append(encoded["full_length"])
        encoded_batch["learned"].append(len(encoded["labels"]) - encoded["labels"].count(IGNORE_INDEX))
    return encoded_batch


def _cache_file_name(
    cache_dir: Path, records: list[str], tokenizer: ChatGLMTokenizer, data_format: DataFormat, limits: EncodingLimits
) -> str:
    """Cache file for this exact data, tokenizer, format, limits and encoding code (encoding.py and the format's)."""
    code = Path(encoding.__file__).read_bytes() + Path(inspect.getfile(type(data_format))).read_bytes()
    fingerprint = Hasher.hash([records, Hasher.hash(tokenizer), data_format.name, limits, code])
    return str(cache_dir / f"encoded-{data_format.name}-{fingerprint}.arrow")


def _raise_for_problems(path: Path, problems: list[DataProblem], skip_invalid: bool, examples_left: int) -> None:
    """Raise DataValidationError when there are problems and they may not be skipped, or nothing is left."""
    if problems and not skip_invalid:
        raise DataValidationError(problems)
    if examples_left == 0:
        left = DataProblem(str(path), None, None, None, "no valid example left")
        raise DataValidationError(problems + [left], skip_invalid_given=skip_invalid)


def load_training_data(
    path: str | Path,
    tokenizer: ChatGLMTokenizer,
    limits: EncodingLimits,
    data_format: str | None = None,
    skip_invalid: bool = False,
    num_proc: int | None = None,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
) -> TrainingData:
    """Read, validate and encode a training file. Raise DataValidationError listing every problem unless
    `skip_invalid`, which leaves bad records out (they are logged and returned in `skipped`).

    `data_format` names a registered format (finetune/data/formats/); None picks it from the fields of the first
    record.
    `cache_dir=None` disables the encoding cache.
    """
    path = Path(path)
    records, problems = read_source_records(path)
    check_not_source_format(path, records)
    if data_format is None:
        found = detect_format(records) or (default_format() if records else None)
    else:
        found = format_named(data_format)
    if found is None:
        raise DataValidationError(problems)
    limits.check_for(found)
    valid, record_problems = check_records(records, found.name)
    problems += record_problems
    for warning in misspelled_keys(records, found.name):
        logger.warning("%s", warning)
    if not valid:
        _raise_for_problems(path, problems, skip_invalid, examples_left=0)

    record_texts = [record.text for record in valid]
    dataset = datasets.Dataset.from_dict({RECORD_COLUMN: record_texts})
    cache_file_name = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        cache_file_name = _cache_file_name(Path(cache_dir), record_texts, tokenizer, found, limits)
    dataset = dataset.map(
        encode_record_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, "data_format": found, "limits": limits},
        remove_columns=[RECORD_COLUMN],
        num_proc=num_proc if num_proc and num_proc > 1 and len(valid) > 1 else None,
        cache_file_name=cache_file_name,
        desc=f"Encoding {path.name}",
    )

    statistics = dataset.select_columns(["length", "full_length", "learned"])[:]
    lengths, full_lengths, learned = statistics["length"], statistics["full_length"], statistics["learned"]
    keep: list[int] = []
    for row, record in enumerate(valid):
        problem = untrainable_problem(record, learned[row], lengths[row], full_lengths[row])
        if problem is None:
            keep.append(row)
        else:
            problems.append(problem)
    problems.sort(key=lambda problem: (problem.line is not None, problem.line or 0))
    _raise_for_problems(path, problems, skip_invalid, examples_left=len(keep))
    for problem in problems:
        logger.warning("skipped: %s", problem)

    skipped_records = {(problem.line, problem.record_index) for problem in problems if problem.line is not None}
    truncated = sum(full_lengths[row] > lengths[row] for row in keep)
    summary = summarize_lengths(
        [lengths[row] for row in keep], truncated, len(skipped_records), [learned[row] for row in keep]
    )
    if len(keep) < len(valid):
        dataset = dataset.select(keep)
    return TrainingData(dataset.select_columns(OUTPUT_COLUMNS), found.name, problems, summary)
