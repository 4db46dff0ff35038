"""Fixtures of the data tests: a third data format written as its own module, outside the package."""

import importlib.util
import sys

import pytest

from finetune.data import formats

# The whole of a new format: Alpaca-style records, the instruction and input as the prompt, the output learned; as a
# preference pair {"instruction", "input"?, "chosen", "rejected"} (DataFormat's default prompt_problems).
ALPACA_MODULE = '''
from finetune.data import encoding
from finetune.data.formats.base import DataFormat, PromptExample, check_string
from finetune.generation import input_output_prompt_ids


def prompt_of(record):
    return record["instruction"] + ("\\n" + record["input"] if record.get("input") else "")


class Alpaca(DataFormat):
    name = "alpaca"
    title = "Alpaca"
    detected_by = ("instruction",)
    record_keys = ("instruction", "input", "output")
    needed_limits = ("max_source_length", "max_target_length")
    prompt_key = "instruction"

    def check(self, record):
        optional_input = check_string(record, "input") if "input" in record else []
        return check_string(record, "instruction") + optional_input + check_string(record, "output")

    def encode(self, record, tokenizer, limits):
        pair = {"prompt": prompt_of(record), "response": record["output"]}
        return encoding.encode_input_output_with_length(
            pair, tokenizer, limits.max_source_length, limits.max_target_length
        )

    def longest_row(self, limits):
        return encoding.input_output_row_length(limits.max_source_length, limits.max_target_length)

    def with_empty_reply(self, record):
        return {"output": "", **record}

    def prompt_example(self, record, tokenizer, max_source_length, reference_from_record):
        label = record["output"] if reference_from_record else None
        prompt_ids = input_output_prompt_ids(prompt_of(record), tokenizer, max_source_length)
        return PromptExample(prompt_of(record), prompt_ids, label, reply_has_metadata=False)

    def evaluation_examples(self, record, index, tokenizer, max_source_length):
        example = self.prompt_example(record, tokenizer, max_source_length, True)
        example.example_id = str(index)
        return [example]

    def with_reply(self, prompt, reply):
        return {**prompt, "output": reply["content"]}


FORMAT = Alpaca()
'''


@pytest.fixture
def alpaca_format(tmp_path):
    """The Alpaca format, written as its own module outside the package and registered for the test."""
    path = tmp_path / "alpaca_format.py"
    path.write_text(ALPACA_MODULE, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("alpaca_format", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["alpaca_format"] = module  # the encoding cache and Dataset.map look the class up by its module
    spec.loader.exec_module(module)
    formats.register_format(module.FORMAT)
    yield module.FORMAT
    formats.unregister_format(module.FORMAT.name)
    del sys.modules["alpaca_format"]
