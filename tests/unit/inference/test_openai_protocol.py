"""inference/openai_protocol.py in process: request validation, messages -> ChatGLM3 turns, replies -> content or
tool_calls (the HTTP side, 400 answers included, is tests/unit/inference/test_api_server.py)."""

import json

import pytest

from finetune.data.encoding import format_tool_call, tools_system_message
from inference.openai_protocol import (
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    RequestError,
    assistant_reply,
    chatglm_turns,
    cut_at_stop_strings,
    parse_chat_request,
    streamable_content,
)

WEATHER_TOOL = {"name": "get_weather", "description": "天气", "parameters": {"type": "object"}}
CALL_TEXT = "get_weather\n```python\ntool_call(city='北京')\n```"


def request(**fields) -> dict:
    """A valid request body with `fields` changed."""
    return {"model": "lora", "messages": [{"role": "user", "content": "你好"}], **fields}


def test_a_minimal_request_gets_the_defaults():
    parsed = parse_chat_request(request())
    assert (parsed.model, parsed.tools, parsed.stream, parsed.stream_usage) == ("lora", None, False, False)
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.stop, parsed.seed) == (
        None,
        DEFAULT_TEMPERATURE,
        DEFAULT_TOP_P,
        [],
        None,
    )


def test_request_fields_are_read():
    parsed = parse_chat_request(
        request(
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=5,
            max_completion_tokens=7,
            temperature=0,
            top_p=1,
            stop="。",
            seed=3,
            tools=[{"type": "function", "function": WEATHER_TOOL}],
        )
    )
    assert (parsed.stream, parsed.stream_usage, parsed.max_tokens) == (True, True, 7)
    assert (parsed.temperature, parsed.top_p, parsed.stop, parsed.seed) == (0.0, 1.0, ["。"], 3)
    assert parsed.tools == [WEATHER_TOOL]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (request(model=""), "model"),
        (request(messages=[]), "messages"),
        (request(messages=[{"role": "bot", "content": "x"}]), "messages[0].role"),
        (request(messages=[{"role": "user", "content": 1}]), "messages[0].content"),
        (request(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]), "messages[1]"),
        (request(messages=[{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]), "messages[1]"),
        (request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), "messages[1]"),
        (request(temperature=2.5), "temperature"),
        (request(top_p=True), "top_p"),
        (request(temperature=float("nan")), "temperature"),
        (request(max_tokens=0), "max_tokens"),
        (request(seed=1.5), "seed"),
        (request(stop=["a", ""]), "stop"),
        (request(stop=["a", "b", "c", "d", "e"]), "stop"),
        (request(stream="yes"), "stream"),
        (request(stream_options=[1]), "stream_options"),
        (request(n=2), "n"),
        (request(tools=[{"type": "retrieval"}]), "tools[0]"),
        (request(tools=[{"type": "function", "function": {"name": ""}}]), "tools[0].function"),
    ],
)
def test_bad_fields_raise_a_400_naming_the_field(body, field):
    with pytest.raises(RequestError) as raised:
        parse_chat_request(body)
    assert raised.value.status == 400
    assert raised.value.field == field
    assert raised.value.body()["error"]["param"] == field


def test_a_body_that_is_not_an_object_is_refused():
    with pytest.raises(RequestError, match="JSON object"):
        parse_chat_request([request()])


def test_messages_become_chatglm3_turns_with_tools_calls_and_observations():
    messages = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京天气"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}],
        },
        {"role": "tool", "content": "晴"},
    ]
    parsed = parse_chat_request(request(messages=messages, tools=[{"type": "function", "function": WEATHER_TOOL}]))
    history, query, role = chatglm_turns(parsed)
    assert history == [
        {"role": "system", "content": tools_system_message([WEATHER_TOOL])},
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "metadata": "get_weather", "content": format_tool_call({"city": "北京"})},
    ]
    assert (query, role) == ("晴", "observation")


@pytest.mark.parametrize(
    ("arguments", "message"), [("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object")]
)
def test_bad_tool_call_arguments_name_the_call(arguments, message):
    messages = [
        {"role": "user", "content": "北京天气"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": arguments}}]},
        {"role": "tool", "content": "晴"},
    ]
    with pytest.raises(RequestError, match=message) as raised:
        chatglm_turns(parse_chat_request(request(messages=messages)))
    assert raised.value.field == "messages[1].tool_calls[0].function"


def test_a_reply_naming_a_tool_becomes_a_tool_call_only_when_tools_were_sent():
    content, calls = assistant_reply(CALL_TEXT, [WEATHER_TOOL])
    assert content is None and len(calls) == 1
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京"}
    assert assistant_reply(CALL_TEXT, None) == (CALL_TEXT, None)  # without tools, text is text
    assert assistant_reply(CALL_TEXT.replace("get_weather", "get_time"), [WEATHER_TOOL])[1] is None
    assert assistant_reply("\n 你好 ", None) == ("你好", None)


def test_cut_at_stop_strings_cuts_at_the_earliest_sequence():
    assert cut_at_stop_strings("一二三四", ["三", "二"]) == ("一", True)
    assert cut_at_stop_strings("一二三四", ["五"]) == ("一二三四", False)
    assert cut_at_stop_strings("一二三四", []) == ("一二三四", False)


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
@pytest.mark.parametrize(
    "text",
    [
        "\n 今天是[[训练时间]]，你好",  # the placeholder is replaced once complete
        "\n 你好 \n\n世界  ",  # whitespace is stripped at the end
        "get_weather\n```python\ntool_call(city='北京')\n```",  # a first line that names a tool
        "get_weather\nnot a call",  # names a tool but is no call: content, sent at the end
        "no newline yet, then\nmore",  # a first line that is not blank and names no tool
        "\n 半个字: \u4f60好",
    ],
)
def test_streamable_content_only_grows_into_the_final_content(text, tools):
    final, calls = assistant_reply(text, tools)
    sent = ""
    for end in range(len(text) + 1):
        partial = text[:end]
        if partial.endswith("\u4f60") and end < len(text):
            partial = partial[:-1] + "\ufffd\ufffd"  # decoded while the character's bytes are still arriving
        content = streamable_content(partial, tools)
        assert content.startswith(sent) and (final or "").startswith(content), (partial, content, final)
        sent = content
    assert calls is None or sent == ""


def test_plain_text_streams_at_once_without_tools_and_once_the_first_line_names_no_tool():
    # A reply without ChatGLM3's metadata line (the quickstart and tiny models) used to stream nothing until the end.
    assert streamable_content("你好，我是", None) == "你好，我是"
    assert streamable_content("get_weather\n```py", None) == "get_weather\n```py"
    assert streamable_content("get_wea", [WEATHER_TOOL]) == ""  # may still become a call
    assert streamable_content("get_weather\n```py", [WEATHER_TOOL]) == ""
    assert streamable_content("你好，我是", [WEATHER_TOOL]) == "你好，我是"
    assert streamable_content("\n你好", [WEATHER_TOOL]) == "你好"


def test_what_real_openai_clients_send_is_accepted():
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "你是助手"}]},
        {"role": "user", "content": [{"type": "text", "text": "北京"}, {"type": "text", "text": "天气"}]},
        {
            "role": "assistant",
            "content": [],
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "晴"}]},
    ]
    parsed = parse_chat_request(request(messages=messages, user="u1", metadata={"a": "b"}, n=1, logprobs=False))
    history, query, role = chatglm_turns(parsed)
    assert history == [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "北京\n天气"},
        {"role": "assistant", "metadata": "get_weather", "content": format_tool_call({"city": "北京"})},
    ]
    assert (query, role) == ("晴", "observation")
    assert parsed.ignored_fields == ["metadata", "user"]


def test_tool_choice_is_honoured_or_refused():
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    two = tools + [{"type": "function", "function": {"name": "get_time"}}]
    assert parse_chat_request(request(tools=tools, tool_choice="none")).tools is None
    assert parse_chat_request(request(tools=tools, tool_choice="auto")).forced_tool is None
    assert parse_chat_request(request(tools=tools, tool_choice="required")).forced_tool == "get_weather"
    named = {"type": "function", "function": {"name": "get_time"}}
    assert parse_chat_request(request(tools=two, tool_choice=named)).forced_tool == "get_time"
    for body in (
        request(tools=two, tool_choice="required"),
        request(tools=tools, tool_choice=named),
        request(tool_choice="required"),
        request(tools=tools, tool_choice="sometimes"),
    ):
        with pytest.raises(RequestError) as raised:
            parse_chat_request(body)
        assert raised.value.field == "tool_choice" and raised.value.status == 400


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"seed": 18446744073709551616}, "seed"),
        ({"seed": -1}, "seed"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"presence_penalty": "high"}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"top_k": 5}, "top_k"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "assistant", "tool_calls": 5}, {"role": "tool", "content": "x"}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_unsupported_or_out_of_range_fields_get_a_400_naming_them(fields, field):
    with pytest.raises(RequestError) as raised:
        parse_chat_request(request(**fields))
    assert raised.value.status == 400 and raised.value.field == field, str(raised.value)


def test_fields_at_their_off_value_are_accepted():
    parsed = parse_chat_request(
        request(seed=2**64 - 1, frequency_penalty=0, presence_penalty=0.0, response_format={"type": "text"})
    )
    assert parsed.seed == 2**64 - 1 and parsed.ignored_fields == []
