"""Convert public preference data sets to the toolkit's preference records (finetune/data/preference.py):
{"conversations": [shared history], "tools"?: [...], "chosen": REPLY, "rejected": REPLY}, where a REPLY is the
assistant's text or a tool call {"name", "parameters"}.

    python data_tools/format_preference.py --format hh|ultrafeedback|sharegpt INPUT OUTPUT

  hh             Anthropic HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}, two whole
                 transcripts; the turns both share become the history, the last assistant turn of each the reply.
  ultrafeedback  binarized UltraFeedback: {"prompt", "chosen": [OpenAI messages], "rejected": [OpenAI messages],
                 "tools"?}; the messages both lists share are the history (OpenAI tool calls and results become our
                 tool turns), the last assistant message of each the reply (text, or one tool call).
  sharegpt       LLaMA-Factory's pairwise ShareGPT: {"conversations": [{"from", "value"}...], "chosen": {"from": "gpt"
                 or "function_call", "value"}, "rejected": {...}, "system"?, "tools"?}.
A record that cannot be converted (malformed, equal or empty replies, a history that does not end with the user or a
tool result) is skipped and listed with its location and reason.
"""

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from data_tools.conversion import SourceFileError, check_paths, finish_report
from data_tools.format_openai import convert_openai_record
from data_tools.format_sharegpt import convert_sharegpt_record
from data_tools.tool_conversations import arguments_object, call_from_json_text, convert_file, require_text

HISTORY_END_ROLES = ("user", "observation", "tool")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
PLACEHOLDER = "placeholder reply"


def preference_record(history: list[dict], chosen: object, rejected: object, tools: list | None) -> dict:
    """Our preference record, or ValueError when the pair prefers nothing or the history cannot be answered."""
    for side, reply in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(reply, str) and not reply.strip():
            raise ValueError(f"the {side} reply is empty")
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same reply")
    if not history:
        raise ValueError("no shared history before the replies")
    if history[-1]["role"] not in HISTORY_END_ROLES:
        raise ValueError(f"the shared history ends with a {history[-1]['role']} turn, not the user or a tool result")
    record = {"conversations": history, "chosen": chosen, "rejected": rejected}
    return {"tools": tools, **record} if tools else record


# ---- HH-RLHF ------------------------------------------------------------------------------------------------------


def hh_turns(transcript: object, side: str) -> list[dict]:
    """The turns of an HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as our messages."""
    if not isinstance(transcript, str):
        raise ValueError(f"field {side!r} must be a transcript string, got {type(transcript).__name__}")
    pieces = HH_TURN.split(transcript)
    if pieces[0].strip():
        raise ValueError(f"field {side!r} does not start with '\\n\\nHuman:': {pieces[0][:40]!r}")
    turns = [{"role": HH_ROLES[speaker], "content": text.strip()} for speaker, text in zip(pieces[1::2], pieces[2::2])]
    if not turns:
        raise ValueError(f"field {side!r} holds no 'Human:' or 'Assistant:' turn")
    return turns


def convert_hh_record(value: object) -> dict:
    """Convert one HH-RLHF pair of transcripts to our preference record."""
    if not isinstance(value, dict) or "chosen" not in value or "rejected" not in value:
        raise ValueError("expected an object with 'chosen' and 'rejected' transcripts")
    chosen, rejected = hh_turns(value["chosen"], "chosen"), hh_turns(value["rejected"], "rejected")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise ValueError(f"the {side} transcript does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("the transcripts differ before their last Assistant turn: no shared history to split out")
    return preference_record(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"], None)


# ---- UltraFeedback (OpenAI messages) ------------------------------------------------------------------------------


def openai_reply(message: object, side: str) -> str | dict:
    """The reply of a final OpenAI assistant message: its text, or its one tool call as {"name", "parameters"}."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise ValueError(f"the last {side} message is not an assistant message")
    calls = message.get("tool_calls") or []
    if len(calls) > 1:
        raise ValueError(f"the {side} reply makes {len(calls)} tool calls; ChatGLM3 makes one call per turn")
    if calls:
        function = calls[0].get("function") if isinstance(calls[0], dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"the {side} tool call has no function name")
        return {"name": function["name"], "parameters": arguments_object(function.get("arguments", "{}"), side)}
    return require_text(message, "content", f"the {side} reply")


def openai_history(messages: list, tools: object) -> tuple[list[dict], list | None]:
    """Our history turns (and tool descriptions) of OpenAI messages, converted as data_tools.format_openai does."""
    record = {"messages": [*messages, {"role": "assistant", "content": PLACEHOLDER}]}
    if tools:
        record["tools"] = tools
    converted = convert_openai_record(record)
    return converted["conversations"][:-1], converted.get("tools")


def convert_ultrafeedback_record(value: object) -> dict:
    """Convert one binarized UltraFeedback record (OpenAI message lists) to our preference record."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    chosen, rejected = value.get("chosen"), value.get("rejected")
    if not (isinstance(chosen, list) and chosen and isinstance(rejected, list) and rejected):
        raise ValueError("fields 'chosen' and 'rejected' must be non-empty lists of messages")
    shared = chosen[:-1]
    if rejected[:-1] != shared:
        raise ValueError("the chosen and rejected messages differ before their last message: no shared history")
    if not shared and isinstance(value.get("prompt"), str):
        shared = [{"role": "user", "content": value["prompt"]}]
    history, tools = openai_history(shared, value.get("tools"))
    return preference_record(history, openai_reply(chosen[-1], "chosen"), openai_reply(rejected[-1], "rejected"), tools)


# ---- pairwise ShareGPT (LLaMA-Factory) ----------------------------------------------------------------------------


def sharegpt_reply(turn: object, side: str) -> str | dict:
    """The reply of a ShareGPT turn: gpt text, or a function_call as {"name", "parameters"}."""
    if not isinstance(turn, dict):
        raise ValueError(f"field {side!r} must be an object {{from, value}}")
    text = require_text(turn, "value", side)
    if turn.get("from") == "gpt":
        return text
    if turn.get("from") == "function_call":
        call = call_from_json_text(text, side)
        if call is None:
            raise ValueError(f'{side}: a function_call value must be JSON {{"name", "arguments"}}')
        return {"name": call[0], "parameters": call[1]}
    raise ValueError(f"field {side!r} is from {turn.get('from')!r}; expected gpt or function_call")


def convert_sharegpt_pair(value: object) -> dict:
    """Convert one pairwise ShareGPT record to our preference record (history as data_tools.format_sharegpt)."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    chosen, rejected = sharegpt_reply(value.get("chosen"), "chosen"), sharegpt_reply(value.get("rejected"), "rejected")
    turns = value.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' is missing, empty or not a list")
    converted = convert_sharegpt_record({**value, "conversations": [*turns, {"from": "gpt", "value": PLACEHOLDER}]})
    return preference_record(converted["conversations"][:-1], chosen, rejected, converted.get("tools"))


CONVERTERS: dict[str, Callable[[object], dict]] = {
    "hh": convert_hh_record,
    "ultrafeedback": convert_ultrafeedback_record,
    "sharegpt": convert_sharegpt_pair,
}


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python data_tools/format_preference.py",
        description="Convert HH-RLHF, binarized UltraFeedback or pairwise ShareGPT preference data to the toolkit's "
        "preference records. Records that cannot be converted are skipped and listed with the reason.",
        epilog="Exit status: 0 on success (even with skipped records), 1 when no pair could be converted or the file "
        "is unreadable, 2 on a usage error.",
    )
    parser.add_argument("--format", required=True, choices=tuple(CONVERTERS), help="the source layout")
    parser.add_argument("input", type=Path, help="source .jsonl (one record per line) or .json array")
    parser.add_argument("output", type=Path, help="output JSONL of preference records")
    args = parser.parse_args(argv)
    check_paths(parser, args.input, args.output, output_flag="OUTPUT")
    try:
        report = convert_file(args.input, args.output, CONVERTERS[args.format])
    except SourceFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return finish_report(report, "preference pair")


if __name__ == "__main__":
    sys.exit(main())
