"""Encoding of training examples: ids and labels equal the official ChatGLM3 preprocessing on the reference items."""

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from finetune.data.encoding import (
    IGNORE_INDEX,
    TOOLS_SYSTEM_PROMPT,
    encode_conversation,
    encode_input_output,
    format_observation,
    format_tool_call,
    text_ids,
)
from finetune.model.tokenization import ChatGLMTokenizer


def test_text_ids_equal_the_tokenizer_encode(reference: dict, shared_dir: Path, tokenizer: ChatGLMTokenizer):
    advertise_gen = shared_dir / "data" / "advertise_gen" / "expected_advertise_gen.jsonl"
    texts = [item["text"] for item in reference["tokenizer"]["encode"]]
    texts += [json.loads(line)["response"] for line in advertise_gen.read_text(encoding="utf-8").splitlines()]
    texts += ["", " leading space", "tabs\tand\nnewlines  ", "<|user|> stays text"]
    for text in texts:
        assert text_ids(tokenizer, text) == tokenizer.encode(text, add_special_tokens=False), text
    for item in reference["tokenizer"]["encode"]:
        assert text_ids(tokenizer, item["text"]) == item["ids"]


def test_input_output_matches_official_unpadded_prefix(reference: dict, tokenizer: ChatGLMTokenizer):
    item = reference["input_output"]
    encoded = encode_input_output(item, tokenizer, item["max_source_length"], item["max_target_length"])
    length = len(encoded["input_ids"])
    assert encoded["input_ids"] == item["input_ids"][:length]
    assert encoded["labels"] == item["labels"][:length]
    assert set(item["input_ids"][length:]) == {0}
    assert set(item["labels"][length:]) == {IGNORE_INDEX}


def test_input_output_truncation_keeps_official_length_bound(tokenizer: ChatGLMTokenizer):
    example = {"prompt": "类型#裙*颜色#红色*风格#简约" * 4, "response": "红色的裙子很显气质。" * 4}
    encoded = encode_input_output(example, tokenizer, max_source_length=10, max_target_length=6)
    prompt_ids = tokenizer.encode(example["prompt"], add_special_tokens=False)
    response_ids = tokenizer.encode(example["response"], add_special_tokens=False)
    prefix = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert encoded["input_ids"] == prefix + prompt_ids[:8] + response_ids[:6] + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * 10 + response_ids[:6] + [tokenizer.eos_token_id]
    assert len(encoded["input_ids"]) == 10 + 6 + 1


@pytest.mark.parametrize("index", [0, 1, 2])
def test_conversation_matches_official_multi_turn(reference: dict, tokenizer: ChatGLMTokenizer, index: int):
    item = reference["multi_turn"][index]
    encoded = encode_conversation(item["item"], tokenizer, max_seq_length=4096)
    assert encoded["input_ids"] == item["input_ids"]
    assert encoded["labels"] == item["labels"]


def test_conversation_matches_official_tensors(reference: dict, reference_dir: Path, tokenizer: ChatGLMTokenizer):
    tensors = load_file(reference_dir / "reference_tensors.safetensors")
    input_ids, labels = tensors["lm_input_ids"][0].tolist(), tensors["lm_labels"][0].tolist()
    matching = [item for item in reference["multi_turn"] if item["input_ids"] == input_ids]
    assert len(matching) == 1
    encoded = encode_conversation(matching[0]["item"], tokenizer, max_seq_length=len(input_ids))
    assert encoded == {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("max_seq_length", [3, 50, 120])
def test_conversation_truncation_cuts_ids_and_labels_together(
    reference: dict, tokenizer: ChatGLMTokenizer, max_seq_length: int
):
    item = reference["multi_turn"][2]
    encoded = encode_conversation(item["item"], tokenizer, max_seq_length=max_seq_length)
    assert encoded["input_ids"] == item["input_ids"][:max_seq_length]
    assert encoded["labels"] == item["labels"][:max_seq_length]


def test_loss_follows_the_official_shift(reference: dict, tokenizer: ChatGLMTokenizer):
    item = reference["multi_turn"][0]
    encoded = encode_conversation(item["item"], tokenizer, max_seq_length=None)
    assistant = encoded["input_ids"].index(tokenizer.get_command("<|assistant|>"))
    assert encoded["labels"][assistant] == IGNORE_INDEX
    assert encoded["labels"][assistant + 1 :] == encoded["input_ids"][assistant + 1 :]
    assert encoded["labels"][-1] == tokenizer.eos_token_id


def test_loss_false_and_roles_without_loss_are_not_learned(tokenizer: ChatGLMTokenizer):
    example = {
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "loss": False},
            {"role": "observation", "content": "done"},
            {"role": "assistant", "content": "Bye"},
        ]
    }
    encoded = encode_conversation(example, tokenizer, max_seq_length=None)
    last_assistant = len(encoded["input_ids"]) - 1 - encoded["input_ids"][::-1].index(
        tokenizer.get_command("<|assistant|>")
    )
    learned = [index for index, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX]
    assert learned == list(range(last_assistant + 1, len(encoded["input_ids"])))


def test_tools_tool_calls_and_observations_render_as_chat_messages(tokenizer: ChatGLMTokenizer):
    tools = [{"name": "天气", "parameters": {"city": "string"}}]
    example = {
        "tools": tools,
        "conversations": [
            {"role": "user", "content": "北京天气？"},
            {"role": "assistant", "metadata": "", "content": "查一下。"},
            {"role": "tool", "name": "天气", "parameters": {"city": "北京", "days": 2}, "observation": {"温度": 21}},
            {"role": "assistant", "content": "21度。"},
        ],
    }
    expected = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    expected += tokenizer.build_single_message(
        "system", "", TOOLS_SYSTEM_PROMPT + json.dumps(tools, indent=4, ensure_ascii=False)
    )
    expected += tokenizer.build_single_message("user", "", "北京天气？")
    expected += tokenizer.build_single_message("assistant", "", "查一下。")
    expected += tokenizer.build_single_message("assistant", "天气", "```python\ntool_call(city='北京', days=2)\n```")
    expected += tokenizer.build_single_message("observation", "", '{"温度": 21}')
    expected += tokenizer.build_single_message("assistant", "", "21度。")
    expected.append(tokenizer.eos_token_id)
    assert encode_conversation(example, tokenizer, max_seq_length=None)["input_ids"] == expected


def test_tool_call_and_observation_text():
    assert format_tool_call({"city": "Beijing", "days": 2, "flags": [True, None]}) == (
        "```python\ntool_call(city='Beijing', days=2, flags=[True, None])\n```"
    )
    assert format_tool_call({}) == "```python\ntool_call()\n```"
    assert format_observation("Status Code: 200") == "Status Code: 200"
    assert format_observation({"城市": "北京", "t": [1, 2]}) == '{"城市": "北京", "t": [1, 2]}'


def test_metadata_of_a_message_is_encoded(tokenizer: ChatGLMTokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "metadata": "m", "content": "x"}]
    example = {"conversations": messages}
    encoded = encode_conversation(example, tokenizer, max_seq_length=None)
    assert encoded["input_ids"][-1 - len(tokenizer.build_single_message("assistant", "m", "x")) : -1] == (
        tokenizer.build_single_message("assistant", "m", "x")
    )


def test_tools_on_a_system_message_render_as_the_official_chat_input(reference: dict, tokenizer: ChatGLMTokenizer):
    chat = reference["tokenizer"]["build_chat_input"]  # history starts with {"role": "system", ..., "tools": [...]}
    history = chat["history"]
    query = {"role": chat["role"], "content": chat["query"]}
    example = {"conversations": [*history, query, {"role": "assistant", "content": "好的。"}]}
    encoded = encode_conversation(example, tokenizer, max_seq_length=None)["input_ids"]
    prompt = chat["input_ids"][:-1]  # build_chat_input ends with <|assistant|>; the training row goes on from there
    assert encoded[: len(prompt)] == prompt
    assert encoded[: len(prompt)] == tokenizer.apply_chat_template([*history, query])["input_ids"]
    tools_json = json.dumps(history[0]["tools"], indent=4, ensure_ascii=False)
    assert tokenizer.decode(encoded).count(tools_json) == 1
