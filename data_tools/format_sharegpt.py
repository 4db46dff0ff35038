"""Convert ShareGPT records with tool turns (as LLaMA-Factory uses them) to the toolkit's conversation records.

ShareGPT format, one record per line (or a .json array):
  {"conversations": [{"from": "human", "value": ...},
                     {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {...}}"},
                     {"from": "observation", "value": ...},
                     {"from": "gpt", "value": ...}],
   "system": "...", "tools": "[{\"name\": ..., \"description\": ..., \"parameters\": ...}]"}
human -> user, gpt -> assistant, system -> system; a function_call followed by its observation becomes one
{"role": "tool", "name", "parameters", "observation"} message. "tools" may be a JSON string or a list.
"""

import json
import sys
from pathlib import Path

from data_tools.tool_conversations import (
    build_parser,
    call_from_json_text,
    finish_record,
    function_descriptions,
    require_text,
    run_converter,
    tool_message,
)

DEFAULT_OUTPUT = Path("formatted_data/sharegpt.jsonl")
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _tools(value: dict) -> list | None:
    """The record's tools: a list, or a JSON string holding one; None when absent or empty."""
    tools = value.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise ValueError(f"field 'tools' is not valid JSON ({error.msg})") from error
    return function_descriptions(tools, "field 'tools'") if tools else None


def convert_sharegpt_record(value: object) -> dict:
    """Convert one ShareGPT record to ours, or raise ValueError saying why it cannot be converted."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    turns = value.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' is missing, empty or not a list")
    conversation: list[dict] = []
    if value.get("system"):
        conversation.append({"role": "system", "content": require_text(value, "system", "record")})
    position = 0
    while position < len(turns):
        where = f"conversations[{position}]"
        turn = turns[position]
        if not isinstance(turn, dict):
            raise ValueError(f"{where}: expected an object, got {type(turn).__name__}")
        speaker = turn.get("from")
        text = require_text(turn, "value", where)
        if speaker in ROLES:
            conversation.append({"role": ROLES[speaker], "content": text})
        elif speaker == "function_call":
            call = call_from_json_text(text, where)
            if call is None:
                raise ValueError(f'{where}: a function_call value must be JSON {{"name", "arguments"}}')
            following = turns[position + 1] if position + 1 < len(turns) else None
            if not (isinstance(following, dict) and following.get("from") == "observation"):
                raise ValueError(f"{where}: function_call {call[0]!r} is not followed by an observation turn")
            conversation.append(tool_message(call[0], call[1], require_text(following, "value", where)))
            position += 1
        elif speaker == "observation":
            raise ValueError(f"{where}: an observation that does not follow a function_call")
        else:
            raise ValueError(f"{where}: unknown 'from' {speaker!r}; expected human, gpt, function_call, observation")
        position += 1
    return finish_record(conversation, _tools(value))


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    parser = build_parser(
        "python -m data_tools.format_sharegpt",
        "Convert ShareGPT records with function_call/observation turns (LLaMA-Factory) to conversation records.",
        DEFAULT_OUTPUT,
    )
    return run_converter(parser, argv, convert_sharegpt_record)


if __name__ == "__main__":
    sys.exit(main())
