"""Convert OpenAI / ZhipuAI chat records to the toolkit's conversation records, or back with --reverse.

OpenAI (and ZhipuAI's identical) format, one record per line:
  {"tools": [{"type": "function", "function": {"name", "description", "parameters"}}],
   "messages": [{"role": "system"|"developer"|"user", "content"},
                {"role": "assistant", "content": text or null, "weight": 0 or 1 (optional),
                 "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": JSON string}}]},
                {"role": "tool", "tool_call_id", "content": result}, ...]}
becomes
  {"tools": [function descriptions], "conversations": [...]} where an assistant text goes as an assistant message and
  each tool call, with its result, as one {"role": "tool", "name", "parameters", "observation"} message. A
  `developer` message (OpenAI's newer name for system) becomes the system message. An assistant message with
  `"weight": 0` (OpenAI: not trained on) gives messages with `"loss": false`.

--reverse writes our records as OpenAI records: a tool message becomes an assistant message with one tool call (the
assistant text just before it, if any and learned alike, as its content) followed by the tool result; an assistant
message with a tool name as metadata and ChatGLM3's `tool_call(...)` text, followed by an observation, is read back
the same way; `"loss": false` becomes `"weight": 0`. ChatGLM3 makes one call per turn, so parallel calls come back
one per assistant message, in the same order; everything else round-trips unchanged.
"""

import json
import sys
from pathlib import Path

from finetune.data.tool_calls import parse_tool_call
from data_tools.tool_conversations import (
    arguments_object,
    build_parser,
    finish_record,
    function_descriptions,
    require_text,
    run_converter,
    tool_message,
)

DEFAULT_OUTPUT = Path("formatted_data/openai.jsonl")
DEFAULT_REVERSE_OUTPUT = Path("formatted_data/openai_messages.jsonl")


def _require_object(value: object, where: str) -> dict:
    """`value` when it is a JSON object, else ValueError."""
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _read_call(call: object, where: str) -> tuple[str, dict, object]:
    """(name, arguments, id) of one OpenAI tool call."""
    function = _require_object(_require_object(call, where).get("function"), f"{where} function")
    if not isinstance(function.get("name"), str):
        raise ValueError(f"{where}: the function has no name")
    return function["name"], arguments_object(function.get("arguments", "{}"), where), call.get("id")


def _assistant_loss(message: dict, where: str) -> dict:
    """`{"loss": False}` for an assistant message with OpenAI's `"weight": 0`, `{}` without weight or with weight 1."""
    weight = message.get("weight", 1)
    if weight not in (0, 1):
        raise ValueError(f"{where}: weight must be 0 or 1, got {json.dumps(weight)}")
    return {"loss": False} if weight == 0 else {}


def convert_openai_record(value: object) -> dict:
    """Convert one OpenAI chat record to ours, or raise ValueError saying why it cannot be converted."""
    record = _require_object(value, "record")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' is missing, empty or not a list")
    tools = function_descriptions(record["tools"], "record") if record.get("tools") else None
    conversation: list[dict] = []
    waiting: dict[object, dict] = {}  # call id -> its tool message, until the tool's result arrives
    for position, raw in enumerate(messages):
        where = f"message {position}"
        message = _require_object(raw, where)
        role = message.get("role")
        if role in ("system", "developer", "user"):
            content = require_text(message, "content", where)
            conversation.append({"role": "user" if role == "user" else "system", "content": content})
        elif role == "assistant":
            if waiting:
                raise ValueError(f"{where}: tool call(s) {sorted(map(str, waiting))} got no tool result before it")
            calls = message.get("tool_calls") or []
            loss = _assistant_loss(message, where)
            if message.get("content") or not calls:
                conversation.append({"role": "assistant", "content": require_text(message, "content", where), **loss})
            for index, call in enumerate(calls):
                name, arguments, call_id = _read_call(call, f"{where} tool_calls[{index}]")
                conversation.append({**tool_message(name, arguments, ""), **loss})
                waiting[call_id if call_id is not None else index] = conversation[-1]
        elif role == "tool":
            call_id = message.get("tool_call_id")
            key = call_id if call_id in waiting else next(iter(waiting), None) if call_id is None else None
            if key is None:
                raise ValueError(f"{where}: tool result for call {call_id!r}, which no assistant message made")
            waiting.pop(key)["observation"] = require_text(message, "content", where)
        else:
            raise ValueError(f"{where}: unknown role {role!r}; expected system, developer, user, assistant or tool")
    if waiting:
        raise ValueError(f"tool call(s) {sorted(map(str, waiting))} got no tool result")
    return finish_record(conversation, tools)


def _observation_text(observation: object) -> str:
    """A tool result as OpenAI carries it: strings as they are, anything else as JSON."""
    return observation if isinstance(observation, str) else json.dumps(observation, ensure_ascii=False)


def _openai_call(number: int, name: str, arguments: dict) -> dict:
    """One OpenAI tool call with a generated id."""
    return {
        "id": f"call_{number}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def _weight(message: dict) -> dict:
    """OpenAI's `{"weight": 0}` for a message of ours with `"loss": false`, else `{}`."""
    return {"weight": 0} if message.get("loss") is False else {}


def _call_of(message: dict, following: dict | None, where: str) -> tuple[str, dict, object] | None:
    """(name, arguments, result) when `message` is a tool call in either of our two forms, else None."""
    if message["role"] == "tool":
        return message["name"], message["parameters"], message["observation"]
    if message["role"] == "assistant" and message.get("metadata"):
        try:
            arguments = parse_tool_call(message.get("content", ""))
        except ValueError as error:
            raise ValueError(f"{where}: assistant message with metadata {message['metadata']!r}: {error}") from error
        if not following or following.get("role") != "observation":
            raise ValueError(f"{where}: the tool call is not followed by an observation message")
        return message["metadata"], arguments, following["content"]
    return None


def convert_to_openai(value: object) -> dict:
    """Convert one of our conversation records to an OpenAI chat record, or raise ValueError saying why not."""
    record = _require_object(value, "record")
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("field 'conversations' is missing, empty or not a list")
    messages: list[dict] = []
    position = 0
    while position < len(conversation):
        where = f"conversations[{position}]"
        message = _require_object(conversation[position], where)
        following = conversation[position + 1] if position + 1 < len(conversation) else None
        call = _call_of(message, following, where)
        text = None
        same_loss = isinstance(following, dict) and _weight(following) == _weight(message)
        if call is None and message.get("role") == "assistant" and same_loss:
            call = _call_of(following, conversation[position + 2] if position + 2 < len(conversation) else None, where)
            if call is not None:
                text, position = message["content"], position + 1
        if call is not None:
            name, arguments, observation = call
            number = sum(1 for item in messages if item["role"] == "tool")
            messages.append(
                {
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [_openai_call(number, name, arguments)],
                    **_weight(conversation[position]),
                }
            )
            messages.append(
                {"role": "tool", "tool_call_id": f"call_{number}", "content": _observation_text(observation)}
            )
            position += 2 if conversation[position]["role"] == "assistant" else 1
            continue
        if message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: a {message.get('role')!r} message that does not follow a tool call")
        weight = _weight(message) if message["role"] == "assistant" else {}
        messages.append({"role": message["role"], "content": require_text(message, "content", where), **weight})
        position += 1
    result = {"messages": messages}
    if record.get("tools"):
        result["tools"] = [
            tool
            if isinstance(tool, dict) and tool.get("type") == "function"
            else {"type": "function", "function": tool}
            for tool in record["tools"]
        ]
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    reverse = "--reverse" in (sys.argv[1:] if argv is None else argv)
    parser = build_parser(
        "python -m data_tools.format_openai",
        "Convert OpenAI/ZhipuAI chat records ({messages, tools}) to conversation records with tools; with "
        "--reverse, our conversation records to OpenAI records.",
        DEFAULT_REVERSE_OUTPUT if reverse else DEFAULT_OUTPUT,
    )
    parser.add_argument("--reverse", action="store_true", help="convert our records to OpenAI records instead")
    return run_converter(parser, argv, convert_to_openai if reverse else convert_openai_record)


if __name__ == "__main__":
    sys.exit(main())
