"""Convert ShareGPT records with tool turns (as LLaMA-Factory uses them) to the toolkit's conversation records.

ShareGPT format, one record per line (or a .json array):
  {"conversations": [{"from": "human", "value": ...},
                     {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {...}}"},
                     {"from": "observation", "value": ...},
                     {"from": "gpt", "value": ...}],
   "system": "...", "tools": "[{\"name\": ..., \"description\": ..., \"parameters\": ...}]"}
human (or user) -> user, gpt (or assistant) -> assistant, system -> system; a function_call followed by its
observation becomes one {"role": "tool", "name", "parameters", "observation"} message. Parallel calls (a function_call
whose value is a JSON list of calls) become one tool message per call, in order; their results come either as one
observation turn per call or as one observation turn holding a JSON list with one result per call.
"tools" may be a JSON string or a list.
"""

import json
import sys
from pathlib import Path

from data_tools.tool_conversations import (
    arguments_object,
    build_parser,
    finish_record,
    function_descriptions,
    require_text,
    run_converter,
    tool_message,
)

DEFAULT_OUTPUT = Path("formatted_data/sharegpt.jsonl")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SPEAKERS = "human, user, gpt, assistant, system, function_call, observation"


def _tools(value: dict) -> list | None:
    """The record's tools: a list, or a JSON string holding one; None when absent or empty."""
    tools = value.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise ValueError(f"field 'tools' is not valid JSON ({error.msg})") from error
    return function_descriptions(tools, "field 'tools'") if tools else None


def _calls(text: str, where: str) -> list[tuple[str, dict]]:
    """The (name, arguments) calls of a function_call value: one JSON call object, or a JSON list of them."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        message = f'{where}: a function_call value must be JSON {{"name", "arguments"}} ({error.msg})'
        raise ValueError(message) from error
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(call, dict) and isinstance(call.get("name"), str) for call in calls):
        raise ValueError(f'{where}: a function_call value must be JSON {{"name", "arguments"}} or a list of them')
    return [(call["name"], arguments_object(call.get("arguments", {}), where)) for call in calls]


def _results(turns: list, start: int, names: list[str], where: str) -> tuple[list[str], int]:
    """The results of the calls to `names` from the observation turns at `start`, and how many turns they took."""
    count = len(names)
    observations = []
    for turn in turns[start : start + count]:
        if not (isinstance(turn, dict) and turn.get("from") == "observation"):
            break
        observations.append(require_text(turn, "value", f"conversations[{start + len(observations)}]"))
    if len(observations) == count:
        return observations, count
    if count == 1:
        raise ValueError(f"{where}: function_call {names[0]!r} is not followed by an observation turn")
    if len(observations) == 1:
        try:
            listed = json.loads(observations[0])
        except json.JSONDecodeError:
            listed = None
        if isinstance(listed, list) and len(listed) == count:
            texts = [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in listed]
            return texts, 1
    raise ValueError(
        f"{where}: {count} parallel calls need {count} observation turns after them, or one observation holding a "
        f"JSON list of {count} results; found {len(observations)} observation turn(s)"
    )


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
            calls = _calls(text, where)
            results, used = _results(turns, position + 1, [name for name, _ in calls], where)
            conversation += [tool_message(name, arguments, result) for (name, arguments), result in zip(calls, results)]
            position += used
        elif speaker == "observation":
            raise ValueError(f"{where}: an observation that does not follow a function_call")
        else:
            raise ValueError(f"{where}: unknown 'from' {speaker!r}; expected one of {SPEAKERS}")
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
