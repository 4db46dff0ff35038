"""data_tools/format_preference.py: HH-RLHF transcripts, binarized UltraFeedback (OpenAI messages with tool calls)
and LLaMA-Factory's pairwise ShareGPT become our preference records, which the training loader accepts; malformed
records are skipped with their location and reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import write_jsonl

from data_tools.format_preference import main
from finetune.data.preference import load_preference_data

REPO_ROOT = Path(__file__).resolve().parents[3]

HH_RECORDS = [
    {
        "chosen": "\n\nHuman: What kind of noises did dinosaurs make?\n\nAssistant: Humans and dinosaurs didn't live "
        "at the same time, so it's hard to say.\n\nHuman: yes they did\n\nAssistant: to guess, and that would "
        "probably require lots of reading.",
        "rejected": "\n\nHuman: What kind of noises did dinosaurs make?\n\nAssistant: Humans and dinosaurs didn't "
        "live at the same time, so it's hard to say.\n\nHuman: yes they did\n\nAssistant: You're wrong.",
    },
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!"},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Go away."},
    {"chosen": "Human: no leading blank lines\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: b"},
    {"chosen": "\n\nHuman: Can you help?\n\nAssistant: Sure.", "rejected": "\n\nHuman: Can you help?"},
    {"chosen": "\n\nHuman: 你好\n\nAssistant: 你好！有什么可以帮你？", "rejected": "\n\nHuman: 你好\n\nAssistant: "},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Current weather",
                 "parameters": {"type": "object", "properties": {"city": {}}}},
}  # fmt: skip
ULTRAFEEDBACK_RECORDS = [
    {
        "prompt": "Write a haiku about autumn.",
        "prompt_id": "a1",
        "chosen": [{"role": "user", "content": "Write a haiku about autumn."},
                   {"role": "assistant", "content": "Crisp leaves drift and fall"}],
        "rejected": [{"role": "user", "content": "Write a haiku about autumn."},
                     {"role": "assistant", "content": "Autumn is a season."}],
        "score_chosen": 8.5,
        "score_rejected": 4.0,
    },
    {
        "prompt": "Weather in Paris, then advise.",
        "tools": [WEATHER_TOOL],
        "chosen": [
            {"role": "user", "content": "What's the weather in Paris? Should I take an umbrella?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"rain\": true}"},
            {"role": "assistant", "content": "Yes, it is raining in Paris: take an umbrella."},
        ],
        "rejected": [
            {"role": "user", "content": "What's the weather in Paris? Should I take an umbrella?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "{\"rain\": true}"},
            {"role": "assistant", "content": "No umbrella needed."},
        ],
    },
    {
        "prompt": "Weather in Rome?",
        "tools": [WEATHER_TOOL],
        "chosen": [{"role": "user", "content": "Weather in Rome?"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "c2", "type": "function", "function": {
                       "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}],
        "rejected": [{"role": "user", "content": "Weather in Rome?"},
                     {"role": "assistant", "content": "It is always sunny in Rome."}],
    },
    {"prompt": "tie", "chosen": [{"role": "user", "content": "tie"}, {"role": "assistant", "content": "same"}],
     "rejected": [{"role": "user", "content": "tie"}, {"role": "assistant", "content": "same"}]},
    {"prompt": "x", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]},
    {"prompt": "x", "chosen": "not a list", "rejected": []},
    {"prompt": "x", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "a", "arguments": "{}"}}, {"function": {"name": "b", "arguments": "{}"}}]}],
     "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]},
    {"prompt": "x", "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "a", "arguments": "{not json"}}]}],
     "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]},
]  # fmt: skip

SHAREGPT_RECORDS = [
    {
        "conversations": [{"from": "human", "value": "类型#裙*颜色#红色"}],
        "chosen": {"from": "gpt", "value": "这款红色连衣裙宽松舒适。"},
        "rejected": {"from": "gpt", "value": "Red."},
        "system": "You write advertisements.",
    },
    {
        "conversations": [{"from": "human", "value": "北京天气怎么样？"}],
        "chosen": {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}"},
        "rejected": {"from": "gpt", "value": "我不知道。"},
        "tools": "[{\"name\": \"get_weather\", \"description\": \"天气\", \"parameters\": {}}]",
    },
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
     "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "observation", "value": "a"},
     "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "function_call", "value": "call it"},
     "rejected": {"from": "gpt", "value": "b"}},
]  # fmt: skip


def convert(format_name: str, records: list[dict], tmp_path: Path, capsys) -> tuple[int, list[dict], str]:
    """Run the converter on records; (exit status, written records, stderr)."""
    source = write_jsonl(tmp_path / f"{format_name}.jsonl", records)
    output = tmp_path / f"{format_name}-pairs.jsonl"
    status = main(["--format", format_name, str(source), str(output)])
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()] if output.exists() else []
    return status, written, capsys.readouterr().err


def test_hh_transcripts_split_into_shared_history_and_replies(tmp_path, capsys, tiny_tokenizer):
    status, written, report = convert("hh", HH_RECORDS, tmp_path, capsys)
    assert status == 0 and len(written) == 1
    assert written[0] == {
        "conversations": [
            {"role": "user", "content": "What kind of noises did dinosaurs make?"},
            {"role": "assistant", "content": "Humans and dinosaurs didn't live at the same time, so it's hard to say."},
            {"role": "user", "content": "yes they did"},
        ],
        "chosen": "to guess, and that would probably require lots of reading.",
        "rejected": "You're wrong.",
    }
    assert "hh.jsonl:2: chosen and rejected are the same reply" in report
    assert "hh.jsonl:3: the transcripts differ before their last Assistant turn" in report
    assert "hh.jsonl:4: field 'chosen' does not start with" in report
    assert "hh.jsonl:5: the rejected transcript does not end with an Assistant turn" in report
    assert "hh.jsonl:6: the rejected reply is empty" in report
    assert "wrote 1 examples, skipped 5" in report
    assert len(load_preference_data(tmp_path / "hh-pairs.jsonl", tiny_tokenizer, 512).dataset) == 1


def test_ultrafeedback_messages_with_tool_calls_become_pairs(tmp_path, capsys, tiny_tokenizer):
    status, written, report = convert("ultrafeedback", ULTRAFEEDBACK_RECORDS, tmp_path, capsys)
    assert status == 0 and len(written) == 3
    assert written[0] == {"conversations": [{"role": "user", "content": "Write a haiku about autumn."}],
                          "chosen": "Crisp leaves drift and fall", "rejected": "Autumn is a season."}  # fmt: skip
    assert written[1]["tools"] == [WEATHER_TOOL["function"]]
    assert written[1]["conversations"][1] == {"role": "tool", "name": "get_weather", "parameters": {"city": "Paris"},
                                              "observation": "{\"rain\": true}"}  # fmt: skip
    assert written[1]["chosen"] == "Yes, it is raining in Paris: take an umbrella."
    assert written[2]["chosen"] == {"name": "get_weather", "parameters": {"city": "Rome"}}
    assert written[2]["rejected"] == "It is always sunny in Rome."
    assert "ultrafeedback.jsonl:4: chosen and rejected are the same reply" in report
    assert "ultrafeedback.jsonl:5: the chosen and rejected messages differ before their last message" in report
    assert "ultrafeedback.jsonl:6: fields 'chosen' and 'rejected' must be non-empty lists" in report
    assert "ultrafeedback.jsonl:7: the chosen reply makes 2 tool calls" in report
    assert "ultrafeedback.jsonl:8: chosen: arguments '{not json' are not valid JSON" in report
    data = load_preference_data(tmp_path / "ultrafeedback-pairs.jsonl", tiny_tokenizer, 1024)
    assert len(data.dataset) == 3 and data.layout == "conversations"


def test_pairwise_sharegpt_becomes_pairs_as_file_script(tmp_path, tiny_tokenizer):
    source = write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT_RECORDS)
    output = tmp_path / "pairs.jsonl"
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "data_tools" / "format_preference.py"), "--format", "sharegpt", str(source),
         str(output)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    written = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert written[0] == {"conversations": [{"role": "system", "content": "You write advertisements."},
                                            {"role": "user", "content": "类型#裙*颜色#红色"}],
                          "chosen": "这款红色连衣裙宽松舒适。", "rejected": "Red."}  # fmt: skip
    assert written[1]["chosen"] == {"name": "get_weather", "parameters": {"city": "北京"}}
    assert written[1]["tools"] == [{"name": "get_weather", "description": "天气", "parameters": {}}]
    report = run.stderr
    assert "sharegpt.jsonl:3: the shared history ends with a assistant turn" in report
    assert "sharegpt.jsonl:4: field 'chosen' is from 'observation'" in report
    assert "sharegpt.jsonl:5: field 'conversations' is missing, empty or not a list" in report
    assert "sharegpt.jsonl:6: chosen: a function_call value must be JSON" in report
    assert len(load_preference_data(output, tiny_tokenizer, 1024).dataset) == 2


def test_nothing_convertible_exits_1_and_a_missing_input_is_a_usage_error(tmp_path, capsys):
    status, written, report = convert("hh", [{"prompt": "not hh"}], tmp_path, capsys)
    assert status == 1 and written == [] and "no preference pair could be converted" in report
    with pytest.raises(SystemExit) as exited:
        main(["--format", "hh", str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")])
    assert exited.value.code == 2
    assert "input file" in capsys.readouterr().err
