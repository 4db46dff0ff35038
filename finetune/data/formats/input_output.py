"""The input-output format: `{"prompt": "...", "response": "..."}`, one question and its answer.

Encoded as `[gMASK] sop` + prompt + response + eos, only the response and eos learned
(finetune/data/encoding.py: encode_input_output_with_length); evaluation generates after the prompt and compares
with the response. As a preference pair: `{"prompt": "...", "chosen": REPLY, "rejected": REPLY}`, text replies only.
"""

from finetune.data import encoding
from finetune.data.formats.base import DataFormat, EncodingLimits, Problem, PromptExample, check_string
from finetune.generation import input_output_prompt_ids
from finetune.model.tokenization import ChatGLMTokenizer


class InputOutput(DataFormat):
    """Prompt/response pairs."""

    name = encoding.INPUT_OUTPUT
    title = "input-output"
    detected_by = ("prompt", "response")
    record_keys = ("prompt", "response")
    needed_limits = ("max_source_length", "max_target_length")
    prompt_key = "prompt"

    def check(self, record: dict) -> list[Problem]:
        """The prompt and the response must be strings."""
        return check_string(record, "prompt") + check_string(record, "response")

    def encode(self, record: dict, tokenizer: ChatGLMTokenizer, limits: EncodingLimits) -> dict[str, list[int] | int]:
        """Source within max_source_length, response within max_target_length, then eos."""
        return encoding.encode_input_output_with_length(
            record, tokenizer, limits.max_source_length, limits.max_target_length
        )

    def longest_row(self, limits: EncodingLimits) -> int | None:
        """The source budget, the response budget and eos."""
        if not (limits.max_source_length and limits.max_target_length):
            return None
        return encoding.input_output_row_length(limits.max_source_length, limits.max_target_length)

    def longest_labelled(self, limits: EncodingLimits) -> int | None:
        """The response budget and eos (the prompt is never learned)."""
        return limits.max_target_length + 1 if limits.max_target_length else None

    def with_empty_reply(self, record: dict) -> dict:
        """The record with an empty response unless it has one."""
        return {"response": "", **record}

    def prompt_example(
        self, record: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, reference_from_record: bool
    ) -> PromptExample:
        """The prompt; the response is the label."""
        label = record.get("response") if reference_from_record else None
        prompt_ids = input_output_prompt_ids(record["prompt"], tokenizer, max_source_length)
        return PromptExample(record["prompt"], prompt_ids, label, reply_has_metadata=False)

    def evaluation_examples(
        self, record: dict, index: int, tokenizer: ChatGLMTokenizer, max_source_length: int
    ) -> list[PromptExample]:
        """One example per record."""
        example = self.prompt_example(record, tokenizer, max_source_length, reference_from_record=True)
        example.example_id = str(index)
        return [example]

    def prompt_problems(self, prompt: dict, reply: dict) -> list[Problem]:
        """A non-empty prompt text."""
        if not isinstance(prompt.get("prompt"), str):
            return [("prompt", "is missing or not a string (a pair needs 'conversations', or 'prompt')")]
        return [] if prompt["prompt"].strip() else [("prompt", "is empty")]

    def with_reply(self, prompt: dict, reply: dict) -> dict:
        """The prompt and the reply's text as the response."""
        return {"prompt": prompt["prompt"], "response": reply["content"]}


FORMAT = InputOutput()
