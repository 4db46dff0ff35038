"""What the tool-data converters (OpenAI, GLM-4, ShareGPT) share: reading the source file, building our
conversation records (tool calls as `tool` messages), and the command line with its skip report.

A source file is `.jsonl` (one record per line) or `.json` (an array of records). Each record is converted on its
own; one that cannot be converted is skipped and listed with its location (file:line or record index) and reason.
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools.conversion import ConversionReport, SourceFileError, check_paths, finish_report
from finetune.atomic_files import write_jsonl_atomically
from finetune.data.records import holds_json_array, read_source_records

LEARNED_ROLES = ("assistant", "tool")


def read_source_file(source: Path, report: ConversionReport) -> Iterator[tuple[str, object]]:
    """Yield (location, record) for every record of a .json array or .jsonl file; bad lines go to `report`.

    Reads with the project's one reader (finetune/data/records.py); a file that cannot be read as a whole (missing,
    empty, a broken array) raises SourceFileError.
    """
    records, problems = read_source_records(source)
    array = source.is_file() and holds_json_array(source)
    if problems and (array or any(problem.line is None for problem in problems)):
        raise SourceFileError(str(problems[0]))
    for problem in problems:
        report.skip(f"{source}:{problem.line}", problem.message)
    for record in records:
        yield (f"{source} record {record.record_index}" if array else f"{source}:{record.line}"), record.value


def require_text(message: dict, key: str, where: str) -> str:
    """message[key] as text: a string, or a list of {"type": "text", "text"} parts joined; else ValueError."""
    value = message.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text" for part in value):
        return "".join(str(part.get("text", "")) for part in value)
    raise ValueError(f"{where}: field {key!r} must be text, got {json.dumps(value, ensure_ascii=False)[:80]}")


def arguments_object(raw: object, where: str) -> dict:
    """Tool-call arguments as a dict: an object as it is, a JSON string parsed; else ValueError."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: arguments {raw[:80]!r} are not valid JSON ({error.msg})") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: arguments must be a JSON object, got {type(raw).__name__}")
    return raw


def call_from_json_text(text: str, where: str) -> tuple[str, dict] | None:
    """(name, arguments) of a `{"name": ..., "arguments": ...}` JSON text, None when the text is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and "arguments" in value):
        return None
    return value["name"], arguments_object(value["arguments"], where)


def tool_message(name: str, arguments: dict, observation: str) -> dict:
    """Our `tool` message: one call with its arguments and the tool's result."""
    return {"role": "tool", "name": name, "parameters": arguments, "observation": observation}


def function_descriptions(tools: object, where: str) -> list:
    """Tool descriptions as ChatGLM3 lists them: `{"type": "function", "function": f}` entries unwrapped to f."""
    if not isinstance(tools, list):
        raise ValueError(f"{where}: tools must be a list, got {type(tools).__name__}")
    return [
        tool["function"] if isinstance(tool, dict) and tool.get("type") == "function" and "function" in tool else tool
        for tool in tools
    ]


def finish_record(conversation: list[dict], tools: list | None) -> dict:
    """Our record from converted messages; ValueError when nothing in it would be learned."""
    if not any(message["role"] in LEARNED_ROLES for message in conversation):
        raise ValueError("no assistant reply or tool call to learn")
    if conversation[0]["role"] == "system" and any(message["role"] == "system" for message in conversation[1:]):
        raise ValueError("a system message is only allowed as the first message")
    return {"tools": tools, "conversations": conversation} if tools else {"conversations": conversation}


def convert_file(source: Path, destination: Path, convert: Callable[[object], dict]) -> ConversionReport:
    """Convert every record of `source` with `convert` and write the results atomically to `destination`."""
    report = ConversionReport(source=source, destination=destination)
    records = []
    for location, value in read_source_file(source, report):
        try:
            records.append(convert(value))
        except ValueError as error:
            report.skip(location, str(error))
    if records:
        report.written = write_jsonl_atomically(destination, records)
    return report


def build_parser(prog: str, description: str, default_output: Path) -> argparse.ArgumentParser:
    """The command line every tool-data converter has: --input and --output."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description + " Records that cannot be converted are skipped and listed with the reason.",
        epilog=(
            "Exit status: 0 on success (even with skipped records), 1 when no record could be converted or the "
            "file is unreadable, 2 on a usage error."
        ),
    )
    parser.add_argument("--input", type=Path, required=True, help="source .jsonl (one record per line) or .json")
    parser.add_argument("--output", type=Path, default=default_output, help=f"output JSONL (default: {default_output})")
    return parser


def run_converter(parser: argparse.ArgumentParser, argv: list[str] | None, convert: Callable[[object], dict]) -> int:
    """Parse the command line, convert --input to --output, print the skip report; return the exit status."""
    args = parser.parse_args(argv)
    check_paths(parser, args.input, args.output)
    try:
        report = convert_file(args.input, args.output, convert)
    except SourceFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return finish_report(report, "record")
