"""Token ids and labels of training examples: the one module where a token gets its label.

The data formats (finetune/data/formats/) encode their records through these functions. The two built-in formats,
both as in ChatGLM3's official fine-tuning code:
  input_output   {"prompt", "response"}: `[gMASK] sop` + prompt + response + eos; only response and eos learned.
  conversations  {"conversations": [...], "tools"?: [...]}: ChatGLM3 chat turns (a first system message may carry
                 its own "tools" list, as in model.chat and GLM-4 data); a token is learned when the
                 token before it belongs to a loss-bearing message (assistant and tool calls, unless "loss": false;
                 an observation only with "loss": true).
"""

import json

from finetune.model.loss import IGNORE_INDEX
from finetune.model.tokenization import ChatGLMTokenizer

INPUT_OUTPUT = "input_output"
CONVERSATIONS = "conversations"
TOOLS_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:\n"
ROLES_WITHOUT_LOSS = frozenset({"system", "user", "observation"})
MESSAGE_ROLES = ("system", "user", "assistant", "observation", "tool")


def message_opts_in(message: dict) -> bool:
    """Whether a message of a role without loss is learned anyway: an observation with `"loss": true`.

    Unlike the official converters, an observation (a tool's result) is not learned by default: the model never
    generates it at inference time, the tool does.
    """
    return message["role"] == "observation" and message.get("loss") is True


def format_tool_call(parameters: dict) -> str:
    """The assistant text of a tool call: a fenced Python block `tool_call(k='v', ...)` with repr'd values."""
    arguments = ", ".join(f"{name}={value!r}" for name, value in parameters.items())
    return f"```python\ntool_call({arguments})\n```"


def format_observation(observation: object) -> str:
    """Observation text: strings as they are, anything else as JSON (non-ASCII kept)."""
    if isinstance(observation, str):
        return observation
    return json.dumps(observation, ensure_ascii=False)


def tools_system_message(tools: list) -> str:
    """The system message that lists the available tools."""
    return TOOLS_SYSTEM_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)


def system_message_content(message: dict) -> str:
    """A system message's text; with a `tools` list (as model.chat, apply_chat_template and GLM-4 data have it), the
    content, a newline and the tools as indented JSON, as the official build_chat_input renders it."""
    if "tools" not in message:
        return message["content"]
    return message["content"] + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)


def text_ids(tokenizer: ChatGLMTokenizer, text: str) -> list[int]:
    """Ids of plain text without special tokens: `tokenizer.encode(text, add_special_tokens=False)`.

    Calls SentencePiece directly, as `build_single_message` does, instead of transformers' generic encode,
    which converts each piece to its id in Python and is about 20 times slower on long texts.
    """
    return tokenizer.sp_model.encode(text)


def conversation_tokens(example: dict, tokenizer: ChatGLMTokenizer) -> tuple[list[int], list[bool]]:
    """Untruncated ids of a conversation and, per token, whether its message carries loss."""
    input_ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    loss_mask = [False, False]

    def add_message(role: str, metadata: str, content: str, has_loss: bool) -> None:
        message_ids = tokenizer.build_single_message(role, metadata, content)
        input_ids.extend(message_ids)
        loss_mask.extend([has_loss] * len(message_ids))

    if example.get("tools"):
        add_message("system", "", tools_system_message(example["tools"]), False)
    for message in example["conversations"]:
        role = message["role"]
        has_loss = message.get("loss", True) if role not in ROLES_WITHOUT_LOSS else message_opts_in(message)
        if role == "tool":
            add_message("assistant", message["name"], format_tool_call(message["parameters"]), has_loss)
            add_message("observation", "", format_observation(message["observation"]), False)
        elif role == "system":
            add_message(role, message.get("metadata") or "", system_message_content(message), has_loss)
        else:
            add_message(role, message.get("metadata") or "", message["content"], has_loss)
    input_ids.append(tokenizer.eos_token_id)
    loss_mask.append(False)
    return input_ids, loss_mask


def encode_conversation_with_length(
    example: dict, tokenizer: ChatGLMTokenizer, max_seq_length: int | None
) -> dict[str, list[int] | int]:
    """Encode a conversation; also return `full_length`, its token count before truncation."""
    input_ids, loss_mask = conversation_tokens(example, tokenizer)
    learned_after = [False] + loss_mask[:-1]
    labels = [token if learned else IGNORE_INDEX for token, learned in zip(input_ids, learned_after)]
    return {"input_ids": input_ids[:max_seq_length], "labels": labels[:max_seq_length], "full_length": len(input_ids)}


def encode_conversation(example: dict, tokenizer: ChatGLMTokenizer, max_seq_length: int | None) -> dict[str, list[int]]:
    """Ids and labels of a ChatGLM3 conversation (optionally with tools), truncated to `max_seq_length`."""
    encoded = encode_conversation_with_length(example, tokenizer, max_seq_length)
    return {"input_ids": encoded["input_ids"], "labels": encoded["labels"]}


def input_output_row_length(max_source_length: int, max_target_length: int) -> int:
    """The most tokens an input_output row can have: the source budget, the response budget and eos."""
    return max_source_length + max_target_length + 1


def encode_input_output_with_length(
    example: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, max_target_length: int
) -> dict[str, list[int] | int]:
    """Encode a prompt/response pair; also return `full_length`, its token count before truncation.

    As in the official code, `max_source_length` bounds `[gMASK] sop` + prompt, so a row has at most
    `input_output_row_length` tokens.
    """
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    prompt_ids = text_ids(tokenizer, example["prompt"])
    response_ids = text_ids(tokenizer, example["response"])
    source_ids = prefix + prompt_ids[: max(max_source_length - len(prefix), 0)]
    target_ids = response_ids[:max_target_length] + [tokenizer.eos_token_id]
    return {
        "input_ids": source_ids + target_ids,
        "labels": [IGNORE_INDEX] * len(source_ids) + target_ids,
        "full_length": len(prefix) + len(prompt_ids) + len(response_ids) + 1,
    }


def encode_input_output(
    example: dict, tokenizer: ChatGLMTokenizer, max_source_length: int, max_target_length: int
) -> dict[str, list[int]]:
    """Ids and labels of a prompt/response pair: only the (truncated) response and eos are learned."""
    encoded = encode_input_output_with_length(example, tokenizer, max_source_length, max_target_length)
    return {"input_ids": encoded["input_ids"], "labels": encoded["labels"]}
