"""The conversations format: `{"conversations": [...messages...], "tools"?: [...]}`, ChatGLM3 chat turns.

Messages have a role (system, user, assistant, observation, tool); a `tool` message is one call with its
parameters and the tool's observation. Which tokens are learned is decided in finetune/data/encoding.py
(conversation_tokens): assistant messages and tool calls unless `"loss": false`, an observation only with
`"loss": true`. Evaluation scores every learned assistant turn and tool call, given the reference history before it.
As a preference pair: `{"conversations": [...history...], "tools"?: [...], "chosen": REPLY, "rejected": REPLY}`, the
history ending in a turn the replies answer (HISTORY_END_ROLES), a reply text or a tool call.
"""

from collections.abc import Sequence

from finetune.data import encoding
from finetune.data.formats.base import DataFormat, EncodingLimits, Problem, PromptExample, check_string
from finetune.data.records import describe_json_type
from finetune.data.tool_calls import parse_tool_call
from finetune.generation import conversation_prompt_ids
from finetune.model.tokenization import ChatGLMTokenizer

MESSAGE_KEYS = ("role", "content", "metadata", "loss", "name", "parameters", "observation", "tools")
# The roles a preference pair's history may end with: the turns an assistant reply answers (a tool turn ends with
# its observation).
HISTORY_END_ROLES = ("user", "observation", "tool")


def _check_message(message: object, position: int) -> list[Problem]:
    """Problems of one conversation message at `position`."""
    prefix = f"conversations[{position}]."
    if not isinstance(message, dict):
        return [(f"conversations[{position}]", f"message must be an object, got {describe_json_type(message)}")]
    problems = check_string(message, "role", prefix)
    if problems:
        return problems
    role = message["role"]
    if role not in encoding.MESSAGE_ROLES:
        return [(f"{prefix}role", f"unknown role {role!r}; expected one of {', '.join(encoding.MESSAGE_ROLES)}")]
    if role == "system" and position != 0:
        problems.append((f"{prefix}role", "a system message is only allowed as the first message"))
    if "tools" in message and (role != "system" or not isinstance(message["tools"], list)):
        got = describe_json_type(message["tools"]) if role == "system" else f"a {role} message"
        problems.append((f"{prefix}tools", f"tools belong to the system message, as a list; got {got}"))
    if "loss" in message and not isinstance(message["loss"], bool):
        problems.append((f"{prefix}loss", f"must be true or false, got {describe_json_type(message['loss'])}"))
    if role == "tool":
        name = message.get("name")
        if not isinstance(name, str) or not name:
            problems.append((f"{prefix}name", "a tool message needs the tool name as a non-empty string"))
        if not isinstance(message.get("parameters"), dict):
            got = describe_json_type(message["parameters"]) if "parameters" in message else "nothing"
            problems.append((f"{prefix}parameters", f"a tool message needs parameters as an object, got {got}"))
        if message.get("observation") is None:
            problems.append((f"{prefix}observation", "a tool message needs the tool's observation (not null)"))
        return problems
    problems += check_string(message, "content", prefix)
    metadata = message.get("metadata")
    if metadata is not None and not isinstance(metadata, str):
        problems.append((f"{prefix}metadata", f"must be a string, got {describe_json_type(metadata)}"))
    return problems


def split_reference(messages: list[dict]) -> tuple[list[dict], dict | None]:
    """The messages before the last assistant message, and that message (None when there is none)."""
    for position in range(len(messages) - 1, -1, -1):
        if messages[position].get("role") == "assistant":
            return messages[:position], messages[position]
    return messages, None


def evaluated_positions(messages: list[dict]) -> list[int]:
    """Positions of the turns evaluation scores: learned assistant messages and tool calls (not `"loss": false`)."""
    return [
        position
        for position, message in enumerate(messages)
        if message["role"] not in encoding.ROLES_WITHOUT_LOSS and message.get("loss") is not False
    ]


def reference_call(message: dict) -> dict | None:
    """The tool call a reference message makes (`{"name", "arguments"}`), None for a text reply.

    An assistant message with metadata is a call when its content is a `tool_call(...)`; other metadata messages
    (e.g. code for an interpreter) are scored as text.
    """
    if message["role"] == "tool":
        return {"name": message["name"], "arguments": message["parameters"]}
    if message.get("metadata"):
        try:
            return {"name": message["metadata"], "arguments": parse_tool_call(message["content"])}
        except ValueError:
            return None
    return None


class Conversations(DataFormat):
    """ChatGLM3 chat turns, optionally with tools."""

    name = encoding.CONVERSATIONS
    title = "conversations"
    detected_by = ("conversations",)
    record_keys = ("conversations", "tools")
    reply_has_metadata = True
    prompt_key = "conversations"

    def check(self, record: dict) -> list[Problem]:
        """Tools as a list, every message well formed, and at least one message that carries loss."""
        if "conversations" not in record:
            return [("conversations", "is missing (a record needs 'conversations', or 'prompt' and 'response')")]
        problems: list[Problem] = []
        if "tools" in record and not isinstance(record["tools"], list):
            problems.append(("tools", f"must be a list of tool descriptions, got {describe_json_type(record['tools'])}"))
        conversation = record["conversations"]
        if not isinstance(conversation, list):
            return problems + [("conversations", f"must be a list of messages, got {describe_json_type(conversation)}")]
        if not conversation:
            return problems + [("conversations", "conversation is empty")]
        for position, message in enumerate(conversation):
            problems += _check_message(message, position)
        if problems:
            return problems
        if not any(
            encoding.message_opts_in(message)
            if message["role"] in encoding.ROLES_WITHOUT_LOSS
            else message.get("loss", True) is not False
            for message in conversation
        ):
            return [
                ("conversations", 'no message carries loss: add an assistant or tool message without "loss": false')
            ]
        return []

    def misspelling_candidates(self, record: dict) -> list[tuple[str, str, Sequence[str]]]:
        """The record's keys and, in every message, the message's keys."""
        candidates = super().misspelling_candidates(record)
        if isinstance(record.get("conversations"), list):
            for position, message in enumerate(record["conversations"]):
                if isinstance(message, dict):
                    candidates += [(f"conversations[{position}].", key, MESSAGE_KEYS) for key in message]
        return candidates

    def encode(self, record: dict, tokenizer: ChatGLMTokenizer, limits: EncodingLimits) -> dict[str, list[int] | int]:
        """All turns, truncated to max_seq_length."""
        return encoding.encode_conversation_with_length(record, tokenizer, limits.max_seq_length)

    def longest_row(self, limits: EncodingLimits) -> int | None:
        """max_seq_length."""
        return limits.max_seq_length or None

    def with_empty_reply(self, record: dict) -> dict:
        """The record with an empty assistant reply after its turns."""
        if not isinstance(record.get("conversations"), list):
            return record
        return {**record, "conversations": record["conversations"] + [{"role": "assistant", "content": ""}]}

    def reference_problems(self, record: dict) -> list[Problem]:
        """A learned assistant turn or tool call to compare with."""
        if evaluated_positions(record["conversations"]):
            return []
        return [("conversations", "no learned assistant message or tool call to use as the reference")]

    def prompt_example(
        self, record: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, reference_from_record: bool
    ) -> PromptExample:
        """All turns then `<|assistant|>`; with `reference_from_record`, the last assistant message is the label."""
        messages = record["conversations"]
        label = None
        if reference_from_record:
            messages, reference = split_reference(messages)
            label = reference["content"] if reference else None
        prompt_ids = conversation_prompt_ids(messages, record.get("tools"), tokenizer, max_source_length)
        return PromptExample(messages, prompt_ids, label, reply_has_metadata=True)

    def evaluation_examples(
        self, record: dict, index: int, tokenizer: ChatGLMTokenizer, max_source_length: int
    ) -> list[PromptExample]:
        """One example per learned assistant turn or tool call, given the reference history before it."""
        messages = record["conversations"]
        examples = []
        for position in evaluated_positions(messages):
            message = messages[position]
            history = messages[:position]
            call = reference_call(message)
            examples.append(
                PromptExample(
                    prompt=history,
                    prompt_ids=conversation_prompt_ids(history, record.get("tools"), tokenizer, max_source_length),
                    label=None if call else message["content"],
                    reply_has_metadata=True,
                    label_call=call,
                    example_id=f"{index}:{position}",
                )
            )
        return examples

    def prompt_problems(self, prompt: dict, reply: dict) -> list[Problem]:
        """A non-empty history that, with the reply after it, is a valid conversation and ends with a turn the reply
        answers."""
        history = prompt.get("conversations")
        if not isinstance(history, list) or not history:
            return [("conversations", "must be a non-empty list of messages (the history before the reply)")]
        problems = self.check({**prompt, "conversations": [*history, reply]})
        if problems:
            return problems
        last_role = history[-1]["role"]
        if last_role not in HISTORY_END_ROLES:
            return [
                (
                    f"conversations[{len(history) - 1}].role",
                    f"the history ends with a {last_role} turn; it must end with a user or observation turn, which "
                    "the chosen and rejected replies answer",
                )
            ]
        return []

    def with_reply(self, prompt: dict, reply: dict) -> dict:
        """The history, none of it learned, then the reply."""
        history = [{**message, "loss": False} for message in prompt["conversations"]]
        return {**prompt, "conversations": [*history, reply]}


FORMAT = Conversations()
