"""What a data format is: the interface every module of finetune/data/formats/ implements.

A format knows its records: whether a record is one of its own (`detects`), every problem of a record with the field
and what to do (`check`), how a record becomes token ids and labels for training (`encode`, through
finetune/data/encoding.py, the one module where a token gets its label), the longest row its length limits allow, and
how a record splits into a prompt and the reference an evaluation compares the generated reply with: which turns
are scored and what each one's prompt (text or message history) and reference are is the format's; the prompt's
token ids come from finetune/generation.py, which builds every generation prompt.

A format also holds preference pairs (finetune/data/preference.py): a pair is a record of the format without its
reply (its "prompt part") plus `chosen` and `rejected` replies; the format says what is wrong with a prompt part
(`prompt_problems`) and how a prompt part followed by one reply becomes one of its records in which only that reply
is learned (`with_reply`), which `encode` then encodes.
"""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from finetune.data.records import describe_json_type
from finetune.generation import PromptExample
from finetune.model.tokenization import ChatGLMTokenizer

Problem = tuple[str | None, str]  # (field or None for the whole record, what is wrong and what to do)


@dataclass(frozen=True)
class EncodingLimits:
    """Truncation lengths: prompt/response budgets for input-output data, a total for conversations."""

    max_source_length: int | None = None
    max_target_length: int | None = None
    max_seq_length: int | None = None

    def check_for(self, data_format: "DataFormat") -> None:
        """Raise ValueError when a length the format needs is missing or not positive."""
        for name in data_format.needed_limits:
            if getattr(self, name) is None:
                raise ValueError(f"{data_format.name} data needs {name}")
        for name in ("max_source_length", "max_target_length", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {value}")


def check_string(container: dict, key: str, prefix: str = "") -> list[Problem]:
    """A problem when container[key] is missing or not a string."""
    field = f"{prefix}{key}"
    if key not in container:
        return [(field, "is missing")]
    if not isinstance(container[key], str):
        return [(field, f"must be a string, got {describe_json_type(container[key])}")]
    return []


class DataFormat(ABC):
    """One training-data format. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # what --data_format and training_record.json call it
    title: ClassVar[str]  # how messages call it ("input-output")
    detected_by: ClassVar[tuple[str, ...]]  # a record with any of these keys is of this format
    record_keys: ClassVar[tuple[str, ...]]  # the keys of a record, for misspelling warnings
    needed_limits: ClassVar[tuple[str, ...]] = ()  # EncodingLimits fields the format cannot encode without
    reply_has_metadata: ClassVar[bool] = False  # a generated reply starts with a metadata line (role tokens kept)
    prompt_key: ClassVar[str]  # the record's key that batch inference writes the prompt under, beside "response"

    def detects(self, record: dict) -> bool:
        """Whether the record has one of this format's `detected_by` keys (the first such record names the file's)."""
        return any(key in record for key in self.detected_by)

    @abstractmethod
    def check(self, record: dict) -> list[Problem]:
        """Every problem of a record of this format; empty when it can be trained on."""

    def misspelling_candidates(self, record: dict) -> list[tuple[str, str, Sequence[str]]]:
        """(field prefix, key, known keys) for every key of the record that could be a misspelling."""
        return [("", key, self.record_keys) for key in record]

    @abstractmethod
    def encode(self, record: dict, tokenizer: ChatGLMTokenizer, limits: EncodingLimits) -> dict[str, list[int] | int]:
        """Truncated `input_ids` and `labels` of a valid record and `full_length`, its token count before truncation."""

    @abstractmethod
    def longest_row(self, limits: EncodingLimits) -> int | None:
        """The most tokens an encoded row can have under `limits`, or None when they bound nothing."""

    def longest_labelled(self, limits: EncodingLimits) -> int | None:
        """The most tokens of an encoded row that carry a label under `limits` (the loss projects only those to the
        vocabulary), or None when any token of the row may."""
        return None

    @abstractmethod
    def with_empty_reply(self, record: dict) -> dict:
        """A prompt for inference (no reply yet) as a record of this format, so `check` applies to it."""

    def reference_problems(self, record: dict) -> list[Problem]:
        """Problems of a valid record used for evaluation beyond `check`: it must hold a reference to compare with."""
        return []

    @abstractmethod
    def prompt_example(
        self, record: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, reference_from_record: bool
    ) -> PromptExample:
        """One prompt for the whole record (the reply follows all of it); with `reference_from_record` the
        reference is split off and becomes the label."""

    @abstractmethod
    def evaluation_examples(
        self, record: dict, index: int, tokenizer: ChatGLMTokenizer, max_source_length: int
    ) -> list[PromptExample]:
        """The prompts evaluation scores in record number `index`, each with its reference."""

    @abstractmethod
    def with_reply(self, prompt: dict, reply: dict) -> dict:
        """A record of this format: the prompt part `prompt` (a record without its reply) followed by `reply`, an
        assistant message ({"role", "content"}, and "metadata" naming the tool of a tool call), the only part learned.
        Called on any object `prompt` when `prompt_problems` is not overridden."""

    def prompt_problems(self, prompt: dict, reply: dict) -> list[Problem]:
        """Every problem of a prompt part that `reply` is to answer; empty when `with_reply(prompt, reply)` can be
        encoded. By default the problems `check` finds in that record."""
        return self.check(self.with_reply(prompt, reply))
