"""The AdvertiseGen and ToolAlpaca converters: byte-for-byte equal to the official output, and robust to bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools import format_advertise_gen, format_tool_alpaca

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def advertise_gen_dir(shared_dir: Path) -> Path:
    """The shared AdvertiseGen sample folder."""
    return shared_dir / "data" / "advertise_gen"


@pytest.fixture
def tool_alpaca_dir(shared_dir: Path) -> Path:
    """The shared ToolAlpaca sample folder."""
    return shared_dir / "data" / "toolalpaca"


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """Write raw lines (each followed by a newline) to `path`."""
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Parse a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_advertise_gen_reproduces_official_output_byte_for_byte(advertise_gen_dir: Path, tmp_path: Path):
    output = tmp_path / "out" / "advertise_gen.jsonl"
    status = format_advertise_gen.main(
        ["--train_file", str(advertise_gen_dir / "train.json"), "--output", str(output)]
    )
    assert status == 0
    assert output.read_bytes() == (advertise_gen_dir / "expected_advertise_gen.jsonl").read_bytes()
    assert [path.name for path in output.parent.iterdir()] == ["advertise_gen.jsonl"]


def test_advertise_gen_converts_train_and_dev_in_one_call(advertise_gen_dir: Path, tmp_path: Path):
    source = advertise_gen_dir / "train.json"
    dev_source = write_lines(tmp_path / "dev.json", source.read_bytes().splitlines()[:3])
    output = tmp_path / "advertise_gen.jsonl"
    status = format_advertise_gen.main(
        ["--train_file", str(source), "--dev_file", str(dev_source), "--output", str(output)]
    )
    assert status == 0
    expected_lines = (advertise_gen_dir / "expected_advertise_gen.jsonl").read_bytes().splitlines(keepends=True)
    assert (tmp_path / "advertise_gen_dev.jsonl").read_bytes() == b"".join(expected_lines[:3])
    explicit = tmp_path / "explicit" / "dev.jsonl"
    format_advertise_gen.main(
        ["--train_file", str(source), "--dev_file", str(dev_source), "--output", str(output)]
        + ["--dev_output", str(explicit)]
    )
    assert explicit.read_bytes() == b"".join(expected_lines[:3])


def test_advertise_gen_conversations_format(advertise_gen_dir: Path, tmp_path: Path):
    output = tmp_path / "conversations.jsonl"
    status = format_advertise_gen.main(
        ["--train_file", str(advertise_gen_dir / "train.json"), "--output", str(output), "--format", "conversations"]
    )
    assert status == 0
    expected = read_jsonl(advertise_gen_dir / "expected_advertise_gen.jsonl")
    records = read_jsonl(output)
    assert records == [
        {
            "conversations": [
                {"role": "user", "content": pair["prompt"]},
                {"role": "assistant", "content": pair["response"]},
            ]
        }
        for pair in expected
    ]


def test_advertise_gen_skips_and_reports_bad_lines(tmp_path: Path, capsys: pytest.CaptureFixture):
    source = write_lines(
        tmp_path / "train.json",
        [
            '{"content": "类型#裙", "summary": "好看。"}'.encode(),
            b'{"content": "broken", "summary": ',
            b"",
            b'{"content": "only content"}',
            b'{"content": "x", "summary": 3}',
            b'["content", "summary"]',
            b'{"content": "\xff", "summary": "y"}',
            b'{"content": "last", "summary": "ok"}',
        ],
    )
    output = tmp_path / "out.jsonl"
    status = format_advertise_gen.main(["--train_file", str(source), "--output", str(output)])
    assert status == 0
    assert read_jsonl(output) == [{"prompt": "类型#裙", "response": "好看。"}, {"prompt": "last", "response": "ok"}]
    errors = capsys.readouterr().err
    assert f"skipped {source}:2: invalid JSON" in errors
    assert f"skipped {source}:4: field 'summary' is missing" in errors
    assert f"skipped {source}:5: field 'summary' must be a string, got 3" in errors
    assert f"skipped {source}:6: expected a JSON object" in errors
    assert f"skipped {source}:7: not valid UTF-8" in errors
    assert f"{source}:3" not in errors
    assert "wrote 2 examples, skipped 5" in errors
    assert "Traceback" not in errors


def test_advertise_gen_writes_nothing_when_no_line_converts(tmp_path: Path, capsys: pytest.CaptureFixture):
    source = write_lines(tmp_path / "train.json", [b"not json", b"[]"])
    output = tmp_path / "out.jsonl"
    output.write_text("previous content\n")
    status = format_advertise_gen.main(["--train_file", str(source), "--output", str(output)])
    assert status == 1
    assert output.read_text() == "previous content\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.jsonl", "train.json"]
    assert "no example could be converted" in capsys.readouterr().err


def test_advertise_gen_usage_errors_exit_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as missing:
        format_advertise_gen.main(["--train_file", str(tmp_path / "absent.json")])
    assert missing.value.code == 2
    assert "absent.json does not exist" in capsys.readouterr().err
    source = write_lines(tmp_path / "train.json", [b'{"content": "a", "summary": "b"}'])
    with pytest.raises(SystemExit) as same_file:
        format_advertise_gen.main(["--train_file", str(source), "--output", str(source)])
    assert same_file.value.code == 2


def test_tool_alpaca_reproduces_official_output_byte_for_byte(
    tool_alpaca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    output = tmp_path / "tool_alpaca.jsonl"
    status = format_tool_alpaca.main(
        ["--input", str(tool_alpaca_dir / "train_data_sample.json"), "--output", str(output)]
    )
    assert status == 0
    assert output.read_bytes() == (tool_alpaca_dir / "expected_tool_alpaca.jsonl").read_bytes()
    errors = capsys.readouterr().err
    assert "setting 0 instance 2: intermediate step 0: parameters '{city: Oslo}' are not valid JSON" in errors
    assert "wrote 4 examples, skipped 1" in errors


def tool_alpaca_instance(**overrides) -> dict:
    """A valid ToolAlpaca instance with one step, with fields replaced by `overrides`."""
    instance = {
        "input": "Weather in Rome?",
        "output": "Sunny.",
        "Final Thought": "I know it.",
        "intermediate_steps": [
            [["getWeather", '{"city": "Rome"}', " I should check.\nAction: getWeather\nAction Input: {}"], "sunny"]
        ],
    }
    instance.update(overrides)
    return {key: value for key, value in instance.items() if value is not ...}


def convert_settings(tmp_path: Path, settings: object) -> tuple[format_tool_alpaca.ConversionReport, list[dict]]:
    """Run the ToolAlpaca converter on `settings`; return its report and the records written."""
    source = tmp_path / "train_data.json"
    source.write_text(json.dumps(settings, ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    report = format_tool_alpaca.convert_tool_alpaca_file(source, output)
    return report, read_jsonl(output) if output.exists() else []


def test_tool_alpaca_edge_cases_follow_the_official_converter(tmp_path: Path):
    instances = [
        tool_alpaca_instance(**{"Final Thought": ...}),
        tool_alpaca_instance(**{"Final Thought": None}),
        tool_alpaca_instance(intermediate_steps=[]),
        tool_alpaca_instance(
            intermediate_steps=[[["getWeather", '{"city": "Rome"}', "no action marker "], {"sky": "clear"}]]
        ),
        tool_alpaca_instance(**{"Final Thought": ""}),
        tool_alpaca_instance(intermediate_steps=[[["f", "[1, 2]", "A. Action: f"], "o"]]),
    ]
    report, records = convert_settings(tmp_path, [{"NLDocumentation": "getWeather: weather.", "Instances": instances}])
    assert [item.location.split("train_data.json ")[1] for item in report.skipped] == [
        "setting 0 instance 0",
        "setting 0 instance 1",
    ]
    assert "field 'Final Thought' is missing" in report.skipped[0].reason
    assert "field 'Final Thought' must be a string" in report.skipped[1].reason
    assert report.written == 4
    assert records[0] == {
        "tools": ["getWeather: weather."],
        "conversations": [
            {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": "I know it.\nSunny."},
        ],
    }
    assert records[1]["conversations"][1:3] == [
        {"role": "assistant", "content": "no action marker"},
        {"role": "tool", "name": "getWeather", "parameters": {"city": "Rome"}, "observation": {"sky": "clear"}},
    ]
    assert records[2]["conversations"][-1] == {"role": "assistant", "content": "\nSunny."}
    assert records[3]["conversations"][2]["parameters"] == [1, 2]


@pytest.mark.parametrize(
    ("instance", "reason"),
    [
        ("not an object", "expected an object, got str"),
        (tool_alpaca_instance(input=...), "field 'input' is missing"),
        (tool_alpaca_instance(output=7), "field 'output' must be a string"),
        (tool_alpaca_instance(intermediate_steps="none"), "'intermediate_steps' must be a list"),
        (tool_alpaca_instance(intermediate_steps=[["getWeather", "{}"]]), "intermediate step 0 is not [[tool_name"),
        (tool_alpaca_instance(intermediate_steps=[[["f", "{city: x}", "t"], "o"]]), "are not valid JSON"),
        (tool_alpaca_instance(intermediate_steps=...), "field 'intermediate_steps' is missing"),
        (tool_alpaca_instance(intermediate_steps=[[["f", 5, "t"], "o"]]), "parameters must be a JSON string"),
        (tool_alpaca_instance(intermediate_steps=[[["f", "{}", None], "o"]]), "the ReAct text must be a string"),
        (tool_alpaca_instance(**{"Final Thought": 3}), "'Final Thought' must be a string"),
    ],
)
def test_tool_alpaca_skips_unconvertible_instances_with_their_index(tmp_path: Path, instance: object, reason: str):
    settings = [{"NLDocumentation": "doc", "Instances": [tool_alpaca_instance(), instance]}]
    report, records = convert_settings(tmp_path, settings)
    assert len(records) == 1
    assert len(report.skipped) == 1
    assert report.skipped[0].location.endswith("setting 0 instance 1")
    assert reason in report.skipped[0].reason


def test_tool_alpaca_skips_bad_settings_and_reports_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture):
    settings = [
        "not a setting",
        {"NLDocumentation": "doc"},
        {"Instances": [tool_alpaca_instance()]},
        {"NLDocumentation": "doc", "Instances": [tool_alpaca_instance()]},
    ]
    report, records = convert_settings(tmp_path, settings)
    assert len(records) == 1
    assert [item.location.split("train_data.json ")[1] for item in report.skipped] == [
        "setting 0",
        "setting 1",
        "setting 2 instance 0",
    ]
    assert "'NLDocumentation' is missing" in report.skipped[2].reason
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"Instances": [}\n]')
    assert format_tool_alpaca.main(["--input", str(broken), "--output", str(tmp_path / "x.jsonl")]) == 1
    assert f"{broken}:2:18: invalid JSON" in capsys.readouterr().err
    broken.write_text('{"Instances": []}')
    assert format_tool_alpaca.main(["--input", str(broken), "--output", str(tmp_path / "x.jsonl")]) == 1
    assert "expected a JSON array of settings, got dict" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_converters_run_as_modules_with_help():
    for module in ("data_tools.format_advertise_gen", "data_tools.format_tool_alpaca"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        assert "--output" in result.stdout
