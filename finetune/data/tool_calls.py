"""ChatGLM3 tool calls as text, read back: `tool_call(city='北京', days=3)` in a ```python block -> arguments.

Training writes a tool call as an assistant message whose metadata is the tool name and whose content is
```` ```python\ntool_call(k=v, ...)\n``` ```` with Python `repr` values (finetune/data/encoding.py). This module reads
such text back into an arguments dict, for chat replies (finetune/model/chat.py), the converters' reverse direction
and tool-call evaluation. It only uses the standard library, so the converters start without importing torch.
"""

import ast
from dataclasses import dataclass
from typing import Any

FENCE = "```"
CALL_FUNCTION = "tool_call"


@dataclass(frozen=True)
class ToolCall:
    """One tool call: the tool's name and its arguments (None when the call text could not be parsed)."""

    name: str
    arguments: dict | None


def strip_code_fence(text: str) -> str:
    """The code inside a ```python ... ``` block (the text itself when it is not fenced)."""
    body = text.strip()
    if body.startswith(FENCE):
        first_line_end = body.find("\n")
        body = body[first_line_end + 1 :] if first_line_end >= 0 else body[len(FENCE) :]
        if body.rstrip().endswith(FENCE):
            body = body.rstrip()[: -len(FENCE)]
    return body.strip()


def parse_tool_call(text: str) -> dict[str, Any]:
    """The keyword arguments of a `tool_call(k=v, ...)` text as Python literals, without evaluating code.

    Raises ValueError saying what is wrong when the text is not such a call.
    """
    code = strip_code_fence(text)
    try:
        call = ast.parse(code, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"tool call is not valid Python: {code!r} ({error.msg})") from error
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == CALL_FUNCTION):
        raise ValueError(f"expected tool_call(name=value, ...), got {code!r}")
    if call.args or any(keyword.arg is None for keyword in call.keywords):
        raise ValueError(f"tool_call takes keyword arguments only, got {code!r}")
    return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}


def split_metadata(reply: str) -> tuple[str, str]:
    """A generated ChatGLM3 reply split into its metadata line (the tool name, or empty) and its content.

    As ChatGLM3's own reply parsing does, a reply without a newline has no metadata: it is all content.
    """
    if "\n" not in reply:
        return "", reply.strip()
    metadata, _, content = reply.partition("\n")
    return metadata.strip(), content.strip()


def read_tool_call(reply: str) -> ToolCall | None:
    """The tool call in a generated reply (metadata line + call text), or None for a plain text reply."""
    name, content = split_metadata(reply)
    if not name:
        return None
    try:
        return ToolCall(name, parse_tool_call(content))
    except ValueError:
        return ToolCall(name, None)
