"""finetune/data/tool_calls.py: ChatGLM3 tool-call text read back into a name and arguments."""

import pytest

from finetune.data.tool_calls import ToolCall, parse_tool_call, read_tool_call, split_metadata, strip_code_fence


def test_generated_replies_are_read_as_chatglm3_reads_them():
    assert read_tool_call("get_weather\n```python\ntool_call(city='北京', days=[1, 2])\n```") == ToolCall(
        "get_weather", {"city": "北京", "days": [1, 2]}
    )
    assert read_tool_call("get_weather\ntool_call(city=open('x'))") == ToolCall("get_weather", None)
    assert read_tool_call("\n北京今天晴。") is None
    assert read_tool_call("no newline, so no metadata") is None


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("```python\ntool_call(a=1)\n```", "tool_call(a=1)"),
        ("  ```\ntool_call(a=1)```  ", "tool_call(a=1)"),
        ("tool_call(a=1)", "tool_call(a=1)"),
        ("```tool_call(a=1)```", "tool_call(a=1)"),
    ],
)
def test_strip_code_fence_returns_the_code(text, code):
    assert strip_code_fence(text) == code


def test_parse_tool_call_reads_literals_only():
    assert parse_tool_call("tool_call(city='上海', days=3, flags={'x': None}, hot=True)") == {
        "city": "上海",
        "days": 3,
        "flags": {"x": None},
        "hot": True,
    }
    assert parse_tool_call("tool_call()") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tool_call(city=", "not valid Python"),
        ("print(city='x')", "expected tool_call"),
        ("tool_call('北京')", "keyword arguments only"),
        ("tool_call(**{'a': 1})", "keyword arguments only"),
    ],
)
def test_parse_tool_call_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tool_call(text)


def test_parse_tool_call_does_not_run_code():
    with pytest.raises(ValueError):
        parse_tool_call("tool_call(path=__import__('os').getcwd())")


def test_split_metadata_follows_chatglm3():
    assert split_metadata(" get_weather \n 晴 ") == ("get_weather", "晴")
    assert split_metadata("\n北京今天晴。\n明天雨。") == ("", "北京今天晴。\n明天雨。")
    assert split_metadata(" 只有内容 ") == ("", "只有内容")
