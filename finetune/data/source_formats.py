"""Files still in a public format (AdvertiseGen as downloaded, OpenAI/ZhipuAI, GLM-4, ShareGPT): which converter of
data_tools/ turns them into the toolkit's records. Training and evaluation both refuse such a file with the command.
"""

from pathlib import Path

from finetune.data.formats import format_of
from finetune.data.records import DataProblem, DataValidationError, SourceRecord
from finetune.data.validation import detect_file_format


def _first_object(records: list[SourceRecord]) -> dict | None:
    """The first record that is a JSON object, or None."""
    return next((record.value for record in records if isinstance(record.value, dict)), None)


def _is_glm4(messages: list) -> bool:
    """Whether `messages` look like GLM-4 finetune_demo data (observation turns or tools on a system message)."""
    return any(
        isinstance(message, dict)
        and (message.get("role") == "observation" or (message.get("role") == "system" and "tools" in message))
        for message in messages
    )


def converter_command(path: Path, records: list[SourceRecord]) -> str | None:
    """What the file is and the converter command that turns it into our records; None for our own formats."""
    first = _first_object(records)
    if first is None:
        return None
    if {"content", "summary"} <= first.keys() and detect_file_format(records) is None:
        return (
            f"this is AdvertiseGen data as downloaded ({{content, summary}} records); convert it first: "
            f"python -m data_tools.format_advertise_gen --train_file {path} --output formatted_data/advertise_gen.jsonl"
        )
    messages = first.get("messages")
    if isinstance(messages, list) and format_of(first) is None:
        if _is_glm4(messages):
            return (
                "this is GLM-4 fine-tuning data ({messages} records); convert it first: "
                f"python -m data_tools.format_glm4 --input {path} --output formatted_data/glm4.jsonl"
            )
        return (
            "this is OpenAI/ZhipuAI chat data ({messages} records); convert it first: "
            f"python -m data_tools.format_openai --input {path} --output formatted_data/openai.jsonl"
        )
    turns = first.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and {"from", "value"} <= turns[0].keys():
        return (
            "this is ShareGPT data (turns with 'from' and 'value'); convert it first: "
            f"python -m data_tools.format_sharegpt --input {path} --output formatted_data/sharegpt.jsonl"
        )
    return None


def check_not_source_format(path: Path, records: list[SourceRecord]) -> None:
    """Raise DataValidationError naming the converter when the file is still in a public source format."""
    command = converter_command(path, records)
    if command is not None:
        raise DataValidationError([DataProblem(str(path), None, None, None, command)])
