"""The OpenAI (both directions), GLM-4 and ShareGPT converters: records, tool calls, skipped records, round trip."""

import json
from pathlib import Path

import pytest

from data_tools import format_glm4, format_openai, format_sharegpt
from finetune.data.validation import check_record

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_RECORD = {
    "tools": [{"type": "function", "function": WEATHER_TOOL}],
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "北京和上海天气怎么样？"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": '{"temp": 20}'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "上海", "days": [1, 2]}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "b", "content": "25 度"},
        {"role": "assistant", "content": "北京 20 度，上海 25 度。"},
    ],
}
EXPECTED_OURS = {
    "tools": [WEATHER_TOOL],
    "conversations": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "北京和上海天气怎么样？"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": '{"temp": 20}'},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "上海", "days": [1, 2]}, "observation": "25 度"},
        {"role": "assistant", "content": "北京 20 度，上海 25 度。"},
    ],
}


def write_jsonl(path: Path, records: list) -> Path:
    """Write one JSON value per line."""
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Parse a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def without_call_ids(record: dict) -> dict:
    """An OpenAI record with tool-call ids removed and arguments parsed, for comparing calls and arguments."""
    messages = []
    for message in record["messages"]:
        message = {key: value for key, value in message.items() if key != "tool_call_id"}
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
                for call in message["tool_calls"]
            ]
        messages.append(message)
    return {"tools": record["tools"], "messages": messages}


def test_openai_to_ours_and_back_keeps_every_message_call_and_argument(tmp_path: Path, capsys):
    broken = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{not json"}}],
            },
        ]
    }
    unanswered = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
        ]
    }
    source = write_jsonl(tmp_path / "openai.jsonl", [OPENAI_RECORD, broken, unanswered])
    (tmp_path / "openai.jsonl").write_text(source.read_text(encoding="utf-8") + "{oops\n", encoding="utf-8")
    ours = tmp_path / "ours.jsonl"
    assert format_openai.main(["--input", str(source), "--output", str(ours)]) == 0
    report = capsys.readouterr().err
    assert f"skipped {source}:2: message 1 tool_calls[0]: arguments '{{not json' are not valid JSON" in report
    assert f"skipped {source}:3: tool call(s) ['x'] got no tool result" in report
    assert f"skipped {source}:4: invalid JSON" in report
    assert "wrote 1 examples, skipped 3" in report
    converted = read_jsonl(ours)
    assert converted == [EXPECTED_OURS]
    assert check_record(converted[0], "conversations") == []

    back = tmp_path / "back.jsonl"
    assert format_openai.main(["--reverse", "--input", str(ours), "--output", str(back)]) == 0
    assert [without_call_ids(record) for record in read_jsonl(back)] == [without_call_ids(OPENAI_RECORD)]


def test_reverse_reads_chatglm3_tool_call_text(tmp_path: Path):
    record = {
        "conversations": [
            {"role": "user", "content": "天气"},
            {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
            {"role": "observation", "content": "20 度"},
            {"role": "assistant", "content": "20 度。"},
        ]
    }
    converted = format_openai.convert_to_openai(record)
    assert without_call_ids({"tools": None, **converted})["messages"] == [
        {"role": "user", "content": "天气"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
        {"role": "tool", "content": "20 度"},
        {"role": "assistant", "content": "20 度。"},
    ]


def test_glm4_records_with_tools_on_the_system_message(tmp_path: Path, capsys):
    glm4 = {
        "messages": [
            {"role": "system", "content": "", "tools": [{"type": "function", "function": WEATHER_TOOL}]},
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "北京"}}'},
            {"role": "observation", "content": '{"temp": 20}'},
            {"role": "assistant", "content": "20 度。"},
        ]
    }
    dangling = {"messages": [{"role": "user", "content": "x"}, {"role": "observation", "content": "y"}]}
    source = tmp_path / "glm4.json"
    source.write_text(json.dumps([glm4, dangling, "text"], ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    assert format_glm4.main(["--input", str(source), "--output", str(output)]) == 0
    assert read_jsonl(output) == [
        {
            "tools": [WEATHER_TOOL],
            "conversations": [
                {"role": "user", "content": "北京天气？"},
                {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": '{"temp": 20}'},
                {"role": "assistant", "content": "20 度。"},
            ],
        }
    ]
    report = capsys.readouterr().err
    assert f"skipped {source} record 1: message 1: an observation that does not follow a tool call" in report
    assert f"skipped {source} record 2: expected an object, got str" in report


def test_sharegpt_function_call_and_observation_turns(tmp_path: Path, capsys):
    sharegpt = {
        "system": "Be brief.",
        "tools": json.dumps([WEATHER_TOOL]),
        "conversations": [
            {"from": "human", "value": "北京天气？"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"北京\\"}"}'},
            {"from": "observation", "value": "20 度"},
            {"from": "gpt", "value": "20 度。"},
        ],
    }
    no_observation = {
        "conversations": [
            {"from": "human", "value": "x"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
        ]
    }
    only_user = {"conversations": [{"from": "human", "value": "x"}]}
    source = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt, no_observation, only_user])
    output = tmp_path / "out.jsonl"
    assert format_sharegpt.main(["--input", str(source), "--output", str(output)]) == 0
    converted = read_jsonl(output)
    assert converted == [
        {
            "tools": [WEATHER_TOOL],
            "conversations": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "北京天气？"},
                {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "20 度"},
                {"role": "assistant", "content": "20 度。"},
            ],
        }
    ]
    assert check_record(converted[0], "conversations") == []
    report = capsys.readouterr().err
    assert "conversations[1]: function_call 'f' is not followed by an observation turn" in report
    assert f"skipped {source}:3: no assistant reply or tool call to learn" in report
    empty = write_jsonl(tmp_path / "empty.jsonl", [only_user])
    assert format_sharegpt.main(["--input", str(empty), "--output", str(tmp_path / "none.jsonl")]) == 1
    assert not (tmp_path / "none.jsonl").exists()


def test_openai_weight_zero_is_loss_false_and_round_trips(tmp_path: Path):
    record = {
        "tools": [{"type": "function", "function": WEATHER_TOOL}],
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "content": "I cannot know.", "weight": 0},
            {"role": "user", "content": "Try the tool."},
            {
                "role": "assistant",
                "content": "Checking.",
                "weight": 0,
                "tool_calls": [
                    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "20 度"},
            {"role": "assistant", "content": "20 度。", "weight": 1},
        ],
    }
    ours = format_openai.convert_openai_record(record)
    assert ours["conversations"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "I cannot know.", "loss": False},
        {"role": "user", "content": "Try the tool."},
        {"role": "assistant", "content": "Checking.", "loss": False},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "20 度", "loss": False},
        {"role": "assistant", "content": "20 度。"},
    ]
    assert check_record(ours, "conversations") == []
    expected = {**record, "messages": [{"role": "system", "content": "Be brief."}, *record["messages"][1:]]}
    expected["messages"][-1] = {"role": "assistant", "content": "20 度。"}  # weight 1 is the default
    source = write_jsonl(tmp_path / "ours.jsonl", [ours])
    back = tmp_path / "back.jsonl"
    assert format_openai.main(["--reverse", "--input", str(source), "--output", str(back)]) == 0
    assert [without_call_ids(item) for item in read_jsonl(back)] == [without_call_ids(expected)]
    mixed = {
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "unlearned text", "loss": False},
            {"role": "tool", "name": "f", "parameters": {}, "observation": "r"},
        ]
    }
    messages = format_openai.convert_to_openai(mixed)["messages"]
    assert messages[1] == {"role": "assistant", "content": "unlearned text", "weight": 0}
    assert messages[2]["content"] is None and "weight" not in messages[2]
    with pytest.raises(ValueError, match="message 0: weight must be 0 or 1, got 0.5"):
        format_openai.convert_openai_record({"messages": [{"role": "assistant", "content": "x", "weight": 0.5}]})


def test_sharegpt_parallel_calls_and_user_assistant_speakers(tmp_path: Path, capsys):
    calls = json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}, {"name": "get_weather", "arguments": {}}])
    one_observation = {
        "conversations": [
            {"from": "user", "value": "北京和上海？"},
            {"from": "function_call", "value": calls},
            {"from": "observation", "value": json.dumps(["20 度", {"temp": 25}])},
            {"from": "assistant", "value": "好。"},
        ]
    }
    two_observations = {
        "conversations": [
            {"from": "human", "value": "北京和上海？"},
            {"from": "function_call", "value": calls},
            {"from": "observation", "value": "20 度"},
            {"from": "observation", "value": '{"temp": 25}'},
            {"from": "gpt", "value": "好。"},
        ]
    }
    missing = {"conversations": [*two_observations["conversations"][:3], {"from": "gpt", "value": "好。"}]}
    source = write_jsonl(tmp_path / "sharegpt.jsonl", [one_observation, two_observations, missing])
    output = tmp_path / "out.jsonl"
    assert format_sharegpt.main(["--input", str(source), "--output", str(output)]) == 0
    expected = [
        {"role": "user", "content": "北京和上海？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "20 度"},
        {"role": "tool", "name": "get_weather", "parameters": {}, "observation": '{"temp": 25}'},
        {"role": "assistant", "content": "好。"},
    ]
    assert read_jsonl(output) == [{"conversations": expected}, {"conversations": expected}]
    report = capsys.readouterr().err
    assert f"skipped {source}:3: conversations[1]: 2 parallel calls need 2 observation turns" in report


def test_glm4_blames_the_assistant_message_that_is_not_a_call(tmp_path: Path, capsys):
    chatglm3_layout = {
        "messages": [
            {"role": "user", "content": "天气"},
            {"role": "assistant", "metadata": "get_weather", "content": "tool_call(city='北京')"},
            {"role": "observation", "content": "20 度"},
            {"role": "assistant", "content": "20 度。"},
        ]
    }
    source = write_jsonl(tmp_path / "glm4.jsonl", [chatglm3_layout])
    assert format_glm4.main(["--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 1
    report = capsys.readouterr().err
    assert f"skipped {source}:1: message 1: the assistant message before the observation (message 2)" in report
    assert "get_weather" in report
