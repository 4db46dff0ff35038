"""OpenAI chat-completions requests and replies <-> ChatGLM3 prompts: validation, tools, tool calls.

A request is checked field by field; a problem raises RequestError naming the field (the server answers 400 with an
OpenAI-style error body). Fields that cannot change the reply (REPLY_NEUTRAL_FIELDS) are accepted and listed in
ChatRequest.ignored_fields for the server to log; unsupported features and unknown fields are refused. Messages become
ChatGLM3 turns: `tools` become the tools system message (as in training), an assistant message with `tool_calls`
becomes an assistant turn with the tool name as metadata and the `tool_call(...)` text, and a `tool` message becomes an
observation. docs/serving.md lists what is accepted, ignored and refused.
"""

import json
import math
import uuid
from dataclasses import dataclass, field

from finetune.data.tool_calls import parse_tool_call
from finetune.data.encoding import format_tool_call, tools_system_message
from finetune.model.chat import REPLACEMENT_CHARACTER, TRAINING_DATE_PLACEHOLDER

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
ASSISTANT_TOKEN = "<|assistant|>"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes at most 64 bits
PENALTY_FIELDS = ("frequency_penalty", "presence_penalty")
# Accepted and read (some only in the value that means "off"; see _check_unsupported).
READ_FIELDS = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "n",
        "logprobs",
        "top_logprobs",
        "response_format",
        "logit_bias",
        *PENALTY_FIELDS,
    }
)
# Accepted without effect: bookkeeping for OpenAI's platform that cannot change the reply. The server logs them.
REPLY_NEUTRAL_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})
LEGACY_FIELDS = {"functions": "tools", "function_call": "tool_choice"}


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
    """A validated chat-completions request. `messages` are normalised: role, content (str or None) and, on assistant
    messages, `calls` [(name, arguments dict)]. `tools` is None when tool_choice is "none"; `forced_tool` names the
    function tool_choice asks for."""

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
    forced_tool: str | None = None
    ignored_fields: list[str] = field(default_factory=list)


def _number(body: dict, name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {value!r}", field=name)
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", field=name)
    return float(value)


def _optional_int(body: dict, name: str, minimum: int, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", field=name)
    if value < minimum:
        raise RequestError(f"'{name}' must be at least {minimum}, got {value}", field=name)
    if maximum is not None and value > maximum:
        raise RequestError(f"'{name}' must be at most {maximum}, got {value}", field=name)
    return value


def _check_text(value: object, where: str) -> None:
    """Refuse strings that cannot be UTF-8 encoded (lone surrogates from JSON escapes such as "\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(
                f"{where or 'the body'} holds invalid Unicode (a lone surrogate at character {error.start}); "
                "send valid UTF-8 text",
                field=where or None,
            ) from error
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_text(item, f"{where}[{index}]")


def _check_unsupported(body: dict) -> list[str]:
    """Refuse unknown fields and unsupported features with a 400 naming them; returns the reply-neutral fields sent."""
    for name in body:
        if name in LEGACY_FIELDS:
            raise RequestError(
                f"'{name}' is the deprecated form of '{LEGACY_FIELDS[name]}'; send '{LEGACY_FIELDS[name]}' instead",
                field=name,
            )
        if name not in READ_FIELDS and name not in REPLY_NEUTRAL_FIELDS:
            raise RequestError(f"unknown field '{name}': this server does not support it (see docs/serving.md)", name)
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", field="n")
    for name in PENALTY_FIELDS:
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise RequestError(f"'{name}' is not supported by this server; leave it out or send 0", field=name)
    if body.get("logprobs") not in (None, False):
        raise RequestError("'logprobs' is not supported by this server; leave it out or send false", "logprobs")
    if body.get("top_logprobs") not in (None, 0):
        raise RequestError("'top_logprobs' is not supported by this server (no logprobs)", field="top_logprobs")
    if body.get("logit_bias") not in (None, {}):
        raise RequestError("'logit_bias' is not supported by this server", field="logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise RequestError(
            "only response_format {'type': 'text'} is supported (no JSON mode or JSON schema)", "response_format"
        )
    if not isinstance(body.get("parallel_tool_calls", True), bool):
        raise RequestError("'parallel_tool_calls' must be true or false", field="parallel_tool_calls")
    return sorted(name for name in body if name in REPLY_NEUTRAL_FIELDS)


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


def _forced_tool(body: dict, tools: list[dict] | None) -> tuple[list[dict] | None, str | None]:
    """The tools the model sees and the function it must call, as tool_choice says."""
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    names = [tool["name"] for tool in tools or []]
    if not names:
        raise RequestError("'tool_choice' asks for a tool call but the request has no 'tools'", field="tool_choice")
    if choice == "required":
        if len(names) > 1:
            raise RequestError(
                f"tool_choice 'required' with {len(names)} tools is not supported (ChatGLM3 cannot be made to pick "
                "one); name the function: {'type': 'function', 'function': {'name': ...}}, or use 'auto'",
                field="tool_choice",
            )
        return tools, names[0]
    function = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(function, dict):
        raise RequestError(
            "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
            field="tool_choice",
        )
    if function.get("name") not in names:
        raise RequestError(
            f"tool_choice names {function.get('name')!r}, which is not in 'tools' ({', '.join(names)})",
            field="tool_choice",
        )
    return tools, function["name"]


def _message_text(content: object, where: str) -> str | None:
    """A message's content as text: a string, or a list of {'type': 'text', 'text': ...} parts joined by newlines."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text parts", field=f"{where}.content")
    texts = []
    for index, part in enumerate(content):
        part_where = f"{where}.content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise RequestError(
                f"{part_where}: content parts of type {kind!r} are not supported (the model reads text only); "
                "send {'type': 'text', 'text': ...} parts",
                field=f"{part_where}.type",
            )
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{part_where}.text must be a string", field=f"{part_where}.text")
        texts.append(part["text"])
    return "\n".join(texts)


def tool_call_arguments(call: object, where: str) -> tuple[str, dict]:
    """The function name and arguments object of one OpenAI tool call (arguments as a JSON string or an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise RequestError(f"{where}.function.arguments is not valid JSON: {error}", f"{where}.function") from error
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", field=f"{where}.function")
    return function["name"], arguments


def _check_messages(messages: object) -> list[dict]:
    """Validate the messages and normalise them (see ChatRequest)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", field="messages")
    normalised = []
    seen_other = False
    previous = None
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", field=where)
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}", f"{where}.role")
        role = "system" if role == "developer" else role
        content = _message_text(message.get("content"), where)
        raw_calls = message.get("tool_calls") if role == "assistant" else None
        if raw_calls is not None and not isinstance(raw_calls, list):
            raise RequestError(f"{where}.tool_calls must be a list", field=f"{where}.tool_calls")
        calls = [tool_call_arguments(call, f"{where}.tool_calls[{n}]") for n, call in enumerate(raw_calls or [])]
        if content is None and not calls:
            raise RequestError(f"{where}.content must be a string", field=f"{where}.content")
        if role == "system" and seen_other:
            raise RequestError(f"{where}: system messages go before all other messages", field=where)
        if role == "tool" and previous not in ("assistant_call", "tool"):
            raise RequestError(f"{where}: a tool message must follow an assistant message with tool_calls", where)
        seen_other = seen_other or role != "system"
        previous = "assistant_call" if calls else role
        normalised.append({"role": role, "content": content, "calls": calls})
    if normalised[-1]["role"] not in ("user", "tool"):
        raise RequestError(
            f"messages[{len(messages) - 1}]: the last message must be from the user or a tool, "
            f"got {normalised[-1]['role']!r}",
            field=f"messages[{len(messages) - 1}]",
        )
    return normalised


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a decoded JSON body of POST /v1/chat/completions."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_text(body, "")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must name one of the served models (see GET /v1/models)", field="model")
    ignored = _check_unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", field="stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError("'stream_options' must be an object such as {'include_usage': true}", "stream_options")
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    max_tokens = _optional_int(body, "max_tokens", 1) if max_tokens is None else max_tokens
    tools, forced_tool = _forced_tool(body, _tools(body))
    return ChatRequest(
        model=model,
        messages=_check_messages(body.get("messages")),
        tools=tools,
        stream=stream,
        stream_usage=bool(stream_options.get("include_usage")),
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE),
        top_p=_number(body, "top_p", 0.0, 1.0, DEFAULT_TOP_P),
        stop=_stop_sequences(body),
        seed=_optional_int(body, "seed", 0, MAX_SEED),
        forced_tool=forced_tool,
        ignored_fields=ignored,
    )


def chatglm_turns(request: ChatRequest) -> tuple[list[dict], str, str]:
    """The ChatGLM3 history, the last message's text and its role ("user" or "observation")."""
    turns: list[dict] = []
    if request.tools:
        turns.append({"role": "system", "content": tools_system_message(request.tools)})
    for message in request.messages:
        role = message["role"]
        if role == "tool":
            turns.append({"role": "observation", "content": message["content"]})
            continue
        if message["calls"]:
            if message["content"]:
                turns.append({"role": "assistant", "content": message["content"]})
            for name, arguments in message["calls"]:
                turns.append({"role": "assistant", "metadata": name, "content": format_tool_call(arguments)})
            continue
        turns.append({"role": role, "content": message["content"]})
    last = turns.pop()
    return turns, last["content"], last["role"]


def _plain_content(reply: str) -> str:
    return reply.strip().replace(*TRAINING_DATE_PLACEHOLDER)


def assistant_reply(text: str, tools: list[dict] | None) -> tuple[str | None, list[dict] | None]:
    """Content and tool_calls of the decoded model output.

    The reply is a tool call when its first line names one of `tools` and the rest parses as a `tool_call(...)`;
    otherwise all of it is content (a blank first line, ChatGLM3's empty metadata, disappears with the stripping).
    """
    reply = text.rpartition(ASSISTANT_TOKEN)[2]
    first_line, newline, rest = reply.partition("\n")
    if newline and first_line.strip() in {tool["name"] for tool in tools or []}:
        try:
            arguments = parse_tool_call(rest)
        except ValueError:
            return _plain_content(reply), None
        call = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": first_line.strip(), "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        return None, [call]
    return _plain_content(reply), None


def streamable_content(text: str, tools: list[dict] | None = None) -> str:
    """The start of the reply's content that no later output can change, while `text` is still being generated.

    Without tools, content streams at once. With tools, nothing streams while the first line may still name a tool
    (it is incomplete and starts a tool's name, or it is complete and names one). Held back at the end: replacement
    characters (a multi-byte character not yet complete), the start of the training-date placeholder (replaced once
    complete) and whitespace (stripped at the end).
    """
    reply = text.rpartition(ASSISTANT_TOKEN)[2]
    if tools:
        first_line, newline, _ = reply.partition("\n")
        name = first_line.strip()
        names = [tool["name"] for tool in tools]
        if name in names if newline else any(candidate.startswith(name) for candidate in names):
            return ""
    content = _plain_content(reply.rstrip(REPLACEMENT_CHARACTER))
    placeholder = TRAINING_DATE_PLACEHOLDER[0]
    for length in range(min(len(placeholder) - 1, len(content)), 0, -1):
        if content.endswith(placeholder[:length]):
            content = content[:-length]
            break
    return content.rstrip()


def cut_at_stop_strings(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop sequence, and whether one was found."""
    cuts = [text.find(sequence) for sequence in stop if sequence in text]
    if not cuts:
        return text, False
    return text[: min(cuts)], True
