"""Convert GLM-4 fine-tuning records (finetune_demo's `messages` format) to the toolkit's conversation records.

GLM-4 format, one record per line (or a .json array):
  {"messages": [{"role": "system", "content": "", "tools": [{"type": "function", "function": {...}}]},
                {"role": "user", "content": ...},
                {"role": "assistant", "content": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}"},
                {"role": "observation", "content": "{\"temp\": 20}"},
                {"role": "assistant", "content": ...}]}
An assistant message whose content is a JSON object with "name" and "arguments", followed by an observation, becomes
one {"role": "tool", "name", "parameters", "observation"} message; the tools of the system message become the
record's "tools"; an empty system message that only carried the tools is dropped.
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

DEFAULT_OUTPUT = Path("formatted_data/glm4.jsonl")


def _misplaced_observation(messages: list, position: int) -> str:
    """Why the observation at `position` has no call: blame the assistant message before it when there is one."""
    before = messages[position - 1] if position > 0 else None
    if isinstance(before, dict) and before.get("role") == "assistant":
        return (
            f"message {position - 1}: the assistant message before the observation (message {position}) is not a "
            'tool call in GLM-4\'s form, an assistant content that is JSON {"name": ..., "arguments": {...}}; got '
            f"{json.dumps({key: before[key] for key in before if key != 'role'}, ensure_ascii=False)[:120]}"
        )
    return f"message {position}: an observation that does not follow a tool call"


def convert_glm4_record(value: object) -> dict:
    """Convert one GLM-4 record to ours, or raise ValueError saying why it cannot be converted."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' is missing, empty or not a list")
    tools = None
    conversation: list[dict] = []
    position = 0
    while position < len(messages):
        where = f"message {position}"
        message = messages[position]
        if not isinstance(message, dict):
            raise ValueError(f"{where}: expected an object, got {type(message).__name__}")
        role = message.get("role")
        content = require_text(message, "content", where)
        if role == "system":
            if message.get("tools"):
                tools = function_descriptions(message["tools"], where)
            if content:
                conversation.append({"role": "system", "content": content})
        elif role == "user":
            conversation.append({"role": "user", "content": content})
        elif role == "assistant":
            call = call_from_json_text(content, where)
            following = messages[position + 1] if position + 1 < len(messages) else None
            if call is None:
                conversation.append({"role": "assistant", "content": content})
            elif isinstance(following, dict) and following.get("role") == "observation":
                observation = require_text(following, "content", f"message {position + 1}")
                conversation.append(tool_message(call[0], call[1], observation))
                position += 1
            else:
                raise ValueError(f"{where}: tool call {call[0]!r} is not followed by an observation message")
        elif role == "observation":
            raise ValueError(_misplaced_observation(messages, position))
        else:
            raise ValueError(f"{where}: unknown role {role!r}; expected system, user, assistant or observation")
        position += 1
    return finish_record(conversation, tools)


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    parser = build_parser(
        "python -m data_tools.format_glm4",
        "Convert GLM-4 fine-tuning records ({messages} with tools on the system message) to conversation records.",
        DEFAULT_OUTPUT,
    )
    return run_converter(parser, argv, convert_glm4_record)


if __name__ == "__main__":
    sys.exit(main())
