"""Convert AdvertiseGen JSON lines ({"content", "summary"}) to the toolkit's training JSONL.

Two output formats:
  input_output   {"prompt": content, "response": summary}            (the official converter's output)
  conversations  {"conversations": [{"role": "user", ...}, {"role": "assistant", ...}]}

A line that cannot be converted (invalid UTF-8, invalid JSON, not an object, content/summary missing or not a
string) is skipped and reported with file:line and the reason; blank lines are ignored.
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools.conversion import ConversionReport, check_paths, finish_report
from finetune.atomic_files import write_jsonl_atomically
from finetune.data.records import read_source_records

DEFAULT_OUTPUT = Path("formatted_data/advertise_gen.jsonl")


def input_output_record(content: str, summary: str) -> dict:
    """The pair as an input-output record."""
    return {"prompt": content, "response": summary}


def conversations_record(content: str, summary: str) -> dict:
    """The pair as a one-exchange conversation."""
    return {"conversations": [{"role": "user", "content": content}, {"role": "assistant", "content": summary}]}


# What each output format writes (records its module of finetune/data/formats/ detects; converters start without torch,
# so they do not import that registry).
RECORD_BUILDERS: dict[str, Callable[[str, str], dict]] = {
    "input_output": input_output_record,
    "conversations": conversations_record,
}
OUTPUT_FORMATS = tuple(RECORD_BUILDERS)


def make_record(content: str, summary: str, output_format: str) -> dict:
    """Build one output record from an AdvertiseGen content/summary pair in `output_format`."""
    if output_format not in RECORD_BUILDERS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {OUTPUT_FORMATS}")
    return RECORD_BUILDERS[output_format](content, summary)


def _content_and_summary(record: object) -> tuple[str, str]:
    """Return (content, summary) from one AdvertiseGen record, or raise ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with 'content' and 'summary', got {type(record).__name__}")
    fields = []
    for name in ("content", "summary"):
        if name not in record:
            raise ValueError(f"field {name!r} is missing")
        if not isinstance(record[name], str):
            raise ValueError(f"field {name!r} must be a string, got {json.dumps(record[name], ensure_ascii=False)}")
        fields.append(record[name])
    return fields[0], fields[1]


def _convert_lines(source: Path, output_format: str, report: ConversionReport) -> Iterator[dict]:
    """Yield one output record per convertible line of `source`, recording skipped lines in `report`."""
    records, problems = read_source_records(source)
    for problem in problems:
        report.skip(str(source) if problem.line is None else f"{source}:{problem.line}", problem.message)
    for record in records:
        try:
            content, summary = _content_and_summary(record.value)
        except ValueError as error:
            report.skip(f"{source}:{record.line}", str(error))
            continue
        yield make_record(content, summary, output_format)


def convert_advertise_gen_file(
    source: Path, destination: Path, output_format: str = "input_output"
) -> ConversionReport:
    """Convert one AdvertiseGen file to JSONL at `destination` (written atomically, only if any line converted)."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {output_format!r}; expected one of {OUTPUT_FORMATS}")
    report = ConversionReport(source=source, destination=destination)
    records = list(_convert_lines(source, output_format, report))
    if records:
        report.written = write_jsonl_atomically(destination, records)
    return report


def default_dev_output(output: Path) -> Path:
    """The dev-set output path next to `output`: `<stem>_dev<suffix>`."""
    return output.with_name(f"{output.stem}_dev{output.suffix}")


def build_argument_parser() -> argparse.ArgumentParser:
    """The command-line interface of this converter."""
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.format_advertise_gen",
        description=(
            "Convert AdvertiseGen JSON lines ({'content', 'summary'}) to training JSONL. "
            "Lines that cannot be converted are skipped and listed with file:line and the reason."
        ),
        epilog=(
            "Example: python -m data_tools.format_advertise_gen --train_file AdvertiseGen/train.json "
            "--dev_file AdvertiseGen/dev.json --output formatted_data/advertise_gen.jsonl  "
            "(writes formatted_data/advertise_gen.jsonl and formatted_data/advertise_gen_dev.jsonl). "
            "Exit status: 0 on success (even with skipped lines), 1 when a file yields no example, "
            "2 on a usage error such as a missing input file."
        ),
    )
    parser.add_argument("--train_file", type=Path, required=True, help="AdvertiseGen training file (train.json)")
    parser.add_argument("--dev_file", type=Path, help="optional AdvertiseGen dev file (dev.json), converted too")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"output JSONL for the training file (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--dev_output",
        type=Path,
        help="output JSONL for the dev file (default: the --output name with '_dev' before the suffix)",
    )
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default="input_output",
        help="input_output: {'prompt','response'} (default, the official format); "
        "conversations: {'conversations': [user, assistant]}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the converter from the command line; return the process exit status."""
    parser = build_argument_parser()
    args = parser.parse_args(argv)
    jobs = [(args.train_file, args.output)]
    if args.dev_file is not None:
        jobs.append((args.dev_file, args.dev_output or default_dev_output(args.output)))
    elif args.dev_output is not None:
        parser.error("--dev_output needs --dev_file")
    for source, destination in jobs:
        check_paths(parser, source, destination, "--output/--dev_output")
    if len(jobs) == 2 and jobs[0][1].resolve() == jobs[1][1].resolve():
        parser.error(f"train and dev outputs are the same file {jobs[0][1]}; pass a distinct --dev_output")
    statuses = [
        finish_report(convert_advertise_gen_file(source, destination, args.format), "example")
        for source, destination in jobs
    ]
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
