"""The data formats, one module each, and the registry the rest of the toolkit asks about them.

Nothing outside this package branches on a format: loading, validation, training, evaluation, inference and the
memory preflight look a format up here (`format_named`, `detect_format`) and call its methods (base.DataFormat).
The prompts generation needs come from here too: `prompt_example` (one per record, for batch inference) and
`evaluation_examples` (the turns evaluation scores, the same during training and in `python -m finetune.evaluate`),
each as the record's format splits it, with prompt ids built by finetune/generation.py.

To add a format: write `finetune/data/formats/<name>.py` with a `DataFormat` subclass and `FORMAT = <instance>`,
and add the module to `BUILT_IN_MODULES` below (or call `register_format` from your own code).
"""

from collections.abc import Iterable, Sequence

from finetune.data.formats import conversations, input_output
from finetune.data.formats.base import DataFormat, PromptExample
from finetune.data.records import SourceRecord
from finetune.model.tokenization import ChatGLMTokenizer

# In detection order: the first format that detects a record names it (conversations before input-output).
BUILT_IN_MODULES = (conversations, input_output)
FORMATS: dict[str, DataFormat] = {}


def register_format(data_format: DataFormat) -> DataFormat:
    """Add a format to the registry (it detects after the ones already there); return it."""
    if data_format.name in FORMATS and FORMATS[data_format.name] is not data_format:
        raise ValueError(f"a data format named {data_format.name!r} is already registered")
    FORMATS[data_format.name] = data_format
    return data_format


def unregister_format(name: str) -> None:
    """Remove a format added with register_format (a plug-in's or a test's)."""
    FORMATS.pop(name, None)


def format_names() -> tuple[str, ...]:
    """The names of the registered formats, in detection order."""
    return tuple(FORMATS)


def format_named(name: str) -> DataFormat:
    """The registered format called `name`; ValueError naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; expected one of {format_names()}")
    return FORMATS[name]


def default_format() -> DataFormat:
    """The format a file that no format detects is checked as (the first registered), so its errors say what is
    missing."""
    return next(iter(FORMATS.values()))


def format_of(record: object) -> DataFormat | None:
    """The first registered format that detects the record, or None (also for a record that is not an object)."""
    if not isinstance(record, dict):
        return None
    return next((data_format for data_format in FORMATS.values() if data_format.detects(record)), None)


def detect_format(records: Iterable[SourceRecord]) -> DataFormat | None:
    """The format of a file: that of its first object record some format detects, or None."""
    for record in records:
        found = format_of(record.value)
        if found is not None:
            return found
    return None


def no_format_message() -> str:
    """What a record that no format detects lacks: every format's keys."""
    keys = " nor ".join("/".join(repr(key) for key in data_format.detected_by) for data_format in FORMATS.values())
    return f"record has neither {keys}"


def prompt_example(
    record: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, reference_from_record: bool
) -> PromptExample:
    """One prompt for a checked record, as its format builds it; with `reference_from_record` the reference is
    split off as the label."""
    return format_of(record).prompt_example(record, tokenizer, max_source_length, reference_from_record)


def evaluation_examples(
    records: Sequence[dict], tokenizer: ChatGLMTokenizer, max_source_length: int
) -> list[PromptExample]:
    """The prompts evaluation scores in checked records, as each record's format splits it (one per input-output
    record, one per learned turn of a conversation), ids "<record index>[:<message position>]"."""
    examples = []
    for index, record in enumerate(records):
        examples += format_of(record).evaluation_examples(record, index, tokenizer, max_source_length)
    return examples


for _module in BUILT_IN_MODULES:
    register_format(_module.FORMAT)
