"""Convert ToolAlpaca's train_data.json to the toolkit's multi-turn (conversations with tools) JSONL.

Each instance of each setting becomes one line:
  {"tools": [NLDocumentation],
   "conversations": [{"role": "user", "content": input},
                     per intermediate step:
                       {"role": "assistant", "content": <ReAct text before "Action:", stripped>},
                       {"role": "tool", "name": tool, "parameters": <parsed JSON>, "observation": observation},
                     {"role": "assistant", "content": Final Thought + "\\n" + output}]}

The output equals the official ChatGLM3 converter's. An instance it could not convert (unparsable parameters, a
missing or non-string "Final Thought" or output, a malformed step) is skipped here too, and reported with its
setting and instance index and the reason; the run never stops on one bad instance.
"""

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from data_tools.conversion import ConversionReport, SourceFileError, check_paths, finish_report
from finetune.atomic_files import write_jsonl_atomically

DEFAULT_OUTPUT = Path("formatted_data/tool_alpaca.jsonl")
ACTION_MARKER = "Action:"


def _require_field(container: dict, key: str) -> object:
    """Return container[key], or raise ValueError when the field is missing."""
    if key not in container:
        raise ValueError(f"field {key!r} is missing")
    return container[key]


def _require_string(container: dict, key: str) -> str:
    """Return container[key] when it is a string, else raise ValueError naming the field."""
    value = _require_field(container, key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {json.dumps(value, ensure_ascii=False)[:80]}")
    return value


def _parse_parameters(raw: object, step_index: int) -> object:
    """The tool-call parameters of one step: its JSON string parsed (any JSON value, as the official converter)."""
    if not isinstance(raw, str):
        raise ValueError(f"intermediate step {step_index}: parameters must be a JSON string, got {type(raw).__name__}")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as error:
        message = f"intermediate step {step_index}: parameters {raw!r} are not valid JSON ({error.msg})"
        raise ValueError(message) from error


def _convert_step(step: object, step_index: int) -> list[dict]:
    """Turn one [[tool_name, parameters_json, react_text], observation] step into assistant + tool messages."""
    if not (isinstance(step, list) and len(step) >= 2 and isinstance(step[0], list) and len(step[0]) == 3):
        raise ValueError(
            f"intermediate step {step_index} is not [[tool_name, parameters_json, react_text], observation]"
        )
    tool_name, raw_parameters, react_text = step[0]
    if not isinstance(react_text, str):
        raise ValueError(f"intermediate step {step_index}: the ReAct text must be a string")
    parameters = _parse_parameters(raw_parameters, step_index)
    thought = react_text.split(ACTION_MARKER)[0].strip()
    return [
        {"role": "assistant", "content": thought},
        {"role": "tool", "name": tool_name, "parameters": parameters, "observation": step[1]},
    ]


def convert_instance(instance: object, documentation: object) -> dict:
    """Convert one ToolAlpaca instance to a record, or raise ValueError saying why it cannot be converted.

    The rules are those of the official converter: `input`, `intermediate_steps`, `Final Thought` and `output` must
    all be present, the final answer is `Final Thought + "\n" + output` (both strings), and any instance that does
    not fit is skipped.
    """
    if not isinstance(instance, dict):
        raise ValueError(f"expected an object, got {type(instance).__name__}")
    conversation = [{"role": "user", "content": _require_field(instance, "input")}]
    steps = _require_field(instance, "intermediate_steps")
    if not isinstance(steps, list):
        raise ValueError("field 'intermediate_steps' must be a list")
    for step_index, step in enumerate(steps):
        conversation.extend(_convert_step(step, step_index))
    final_thought = _require_string(instance, "Final Thought")
    output = _require_string(instance, "output")
    conversation.append({"role": "assistant", "content": final_thought + "\n" + output})
    return {"tools": [documentation], "conversations": conversation}


def load_settings(source: Path) -> list:
    """Read the ToolAlpaca file: a JSON array of settings. Raise SourceFileError saying what is wrong."""
    try:
        text = source.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SourceFileError(f"{source} is not valid UTF-8 (byte {error.start})") from error
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceFileError(f"{source}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from error
    if not isinstance(settings, list):
        raise SourceFileError(f"{source}: expected a JSON array of settings, got {type(settings).__name__}")
    return settings


def _convert_settings(settings: list, report: ConversionReport) -> Iterator[dict]:
    """Yield one record per convertible instance, recording skipped ones (setting/instance index) in `report`."""
    for setting_index, setting in enumerate(settings):
        where = f"{report.source} setting {setting_index}"
        if not isinstance(setting, dict):
            report.skip(where, f"expected an object, got {type(setting).__name__}")
            continue
        instances = setting.get("Instances")
        if not isinstance(instances, list):
            report.skip(where, "field 'Instances' is missing or not a list")
            continue
        for instance_index, instance in enumerate(instances):
            location = f"{where} instance {instance_index}"
            if "NLDocumentation" not in setting:
                report.skip(location, "the setting's field 'NLDocumentation' is missing")
                continue
            try:
                yield convert_instance(instance, setting["NLDocumentation"])
            except ValueError as error:
                report.skip(location, str(error))


def convert_tool_alpaca_file(source: Path, destination: Path) -> ConversionReport:
    """Convert a ToolAlpaca file to JSONL at `destination` (written atomically, only if any instance converted)."""
    report = ConversionReport(source=source, destination=destination)
    records = list(_convert_settings(load_settings(source), report))
    if records:
        report.written = write_jsonl_atomically(destination, records)
    return report


def build_argument_parser() -> argparse.ArgumentParser:
    """The command-line interface of this converter."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.format_tool_alpaca",
        description=(
            "Convert ToolAlpaca train_data.json to multi-turn training JSONL with tools. Instances that cannot be "
            "converted are skipped and listed with their setting and instance index and the reason."
        ),
        epilog=(
            "Example: python -m data_tools.format_tool_alpaca --input ToolAlpaca/data/train_data.json "
            "--output formatted_data/tool_alpaca.jsonl. Exit status: 0 on success (even with skipped instances), "
            "1 when no instance could be converted or the file is unreadable, 2 on a usage error."
        ),
    )
    parser.add_argument("--input", type=Path, required=True, help="ToolAlpaca train_data.json")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"output JSONL (default: {DEFAULT_OUTPUT})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    check_paths(parser, args.input, args.output)
    try:
        report = convert_tool_alpaca_file(args.input, args.output)
    except SourceFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return finish_report(report, "instance")


if __name__ == "__main__":
    sys.exit(main())
