"""data_tools/convert.py (`chatglm3-convert FORMAT ...`): the registry runs the named converter with the rest of the
command line, lists the formats, and refuses an unknown one in one line."""

import json

from data_tools.convert import CONVERTERS, main


def test_the_named_converter_runs_with_the_rest_of_the_command_line(tmp_path):
    source = tmp_path / "chats.jsonl"
    record = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    source.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert main(["openai", "--input", str(source), "--output", str(output)]) == 0
    converted = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    turns = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    assert converted == [{"conversations": turns}]


def test_help_lists_every_format_and_an_unknown_one_is_refused(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in CONVERTERS)
    assert main(["openia"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: unknown format 'openia'; choose one of {', '.join(CONVERTERS)}"
    )
    assert main([]) == 2
