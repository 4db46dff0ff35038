"""OpenAI chat-completions requests and replies <-> ChatGLM3 prompts: validation, tools, tool calls.

A request is checked field by field; a problem raises RequestError naming the field (the server answers 400 with an
OpenAI-style error body). Messages become ChatGLM3 turns: `tools` become the tools system message (as in training),
an assistant message with `tool_calls` becomes an assistant turn with the tool name as metadata and the
`tool_call(...)` text, and a `tool` message becomes an observation.
"""

import json
import math
import uuid
from dataclasses import dataclass

from finetune.data.encoding import format_tool_call, tools_system_message
from finetune.model.chat import REPLACEMENT_CHARACTER, TRAINING_DATE_PLACEHOLDER, split_response

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
ASSISTANT_TOKEN = "<|assistant|>"


class RequestError(ValueError):
    """A request the server cannot serve as sent: `field` names the offending part, `status` the HTTP status."""

    def __init__(self, message: str, field: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.field = field
        self.status = status
        self.kind = kind

    def body(self) -> dict:
        """The OpenAI-style error body."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.field, "code": None}}


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    model: str
    messages: list[dict]
    tools: list[dict] | None
    stream: bool
    stream_usage: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {value!r}", field=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", field=name)
    return float(value)


def _optional_int(body: dict, name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", field=name)
    if value < minimum:
        raise RequestError(f"'{name}' must be at least {minimum}, got {value}", field=name)
    return value


def _stop_sequences(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    sequences = [stop] if isinstance(stop, str) else stop
    if not isinstance(sequences, list) or not all(isinstance(item, str) and item for item in sequences):
        raise RequestError("'stop' must be a non-empty string or a list of non-empty strings", field="stop")
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(sequences)}", field="stop")
    return sequences


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RequestError("'tools' must be a list of {'type': 'function', 'function': {...}}", field="tools")
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise RequestError(f"tools[{index}] must be {{'type': 'function', 'function': {{...}}}}", f"tools[{index}]")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise RequestError(f"tools[{index}].function.name must be a non-empty string", f"tools[{index}].function")
        functions.append(function)
    return functions


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", field="messages")
    seen_other = False
    previous = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", field=where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", f"{where}.role")
        content = message.get("content")
        has_calls = role == "assistant" and bool(message.get("tool_calls"))
        if not isinstance(content, str) and not (content is None and has_calls):
            raise RequestError(f"{where}.content must be a string", field=f"{where}.content")
        if role == "system" and seen_other:
            raise RequestError(f"{where}: system messages go before all other messages", field=where)
        if role == "tool" and previous not in ("assistant_call", "tool"):
            raise RequestError(f"{where}: a tool message must follow an assistant message with tool_calls", where)
        seen_other = seen_other or role != "system"
        previous = "assistant_call" if has_calls else role
    if messages[-1]["role"] not in ("user", "tool"):
        raise RequestError(
            f"messages[{len(messages) - 1}]: the last message must be from the user or a tool, "
            f"got {messages[-1]['role']!r}",
            field=f"messages[{len(messages) - 1}]",
        )
    return messages


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a decoded JSON body of POST /v1/chat/completions."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must name one of the served models (see GET /v1/models)", field="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", field="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object such as {'include_usage': true}", "stream_options")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", field="n")
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    max_tokens = _optional_int(body, "max_tokens", 1) if max_tokens is None else max_tokens
    return ChatRequest(
        model=model,
        messages=_check_messages(body.get("messages")),
        tools=_tools(body),
        stream=stream,
        stream_usage=bool(stream_options.get("include_usage")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 0.0, 1.0, DEFAULT_TOP_P),
        stop=_stop_sequences(body),
        seed=_optional_int(body, "seed", 0),
    )


def tool_call_arguments(call: dict, where: str) -> dict:
    """The arguments object of one OpenAI tool call (a JSON string in the request)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError as error:
        raise RequestError(f"{where}.function.arguments is not valid JSON: {error}", f"{where}.function") from error
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", field=f"{where}.function")
    return arguments


def chatglm_turns(request: ChatRequest) -> tuple[list[dict], str, str]:
    """The ChatGLM3 history, the last message's text and its role ("user" or "observation")."""
    turns: list[dict] = []
    if request.tools:
        turns.append({"role": "system", "content": tools_system_message(request.tools)})
    for index, message in enumerate(request.messages):
        role = message["role"]
        if role == "tool":
            turns.append({"role": "observation", "content": message["content"]})
            continue
        if role == "assistant" and message.get("tool_calls"):
            if message.get("content"):
                turns.append({"role": "assistant", "content": message["content"]})
            for call_index, call in enumerate(message["tool_calls"]):
                where = f"messages[{index}].tool_calls[{call_index}]"
                arguments = tool_call_arguments(call, where)
                name = call["function"]["name"]
                turns.append({"role": "assistant", "metadata": name, "content": format_tool_call(arguments)})
            continue
        turns.append({"role": role, "content": message["content"]})
    last = turns.pop()
    return turns, last["content"], last["role"]


def assistant_reply(text: str, tools: list[dict] | None) -> tuple[str | None, list[dict] | None]:
    """Content and tool_calls of the decoded model output (split_response's reading of ChatGLM3 output)."""
    history = [{"role": "system", "content": "", "tools": tools}] if tools else []
    reply, _ = split_response(text, history)
    if isinstance(reply, str):
        return reply, None
    if "parameters" in reply:
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": reply["name"], "arguments": json.dumps(reply["parameters"], ensure_ascii=False)},
        }
        return None, [call]
    return json.dumps(reply, ensure_ascii=False), None


def streamable_content(text: str) -> str:
    """The start of the reply's content that no later output can change, while `text` is still being generated.

    Nothing until the reply's first line is complete and blank (a non-blank first line names a tool: the reply becomes
    a tool call, or JSON without tools). Held back at the end: replacement characters (a multi-byte character not yet
    complete), the start of the training-date placeholder (replaced once complete) and whitespace (stripped at the end).
    """
    first_line, newline, _ = text.rpartition(ASSISTANT_TOKEN)[2].partition("\n")
    if not newline or first_line.strip():
        return ""
    content, _ = assistant_reply(text.rstrip(REPLACEMENT_CHARACTER), None)
    placeholder = TRAINING_DATE_PLACEHOLDER[0]
    for length in range(min(len(placeholder) - 1, len(content)), 0, -1):
        if content.endswith(placeholder[:length]):
            content = content[:-length]
            break
    return content.rstrip()


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether one was found."""
    cuts = [text.find(sequence) for sequence in stop if sequence in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True
