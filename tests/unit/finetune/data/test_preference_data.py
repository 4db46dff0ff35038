"""finetune/data/preference.py: the preference record format, its validation (file:line field), the encoding of each
side exactly as the SFT encoding of the same turns with labels only on the reply, dropping of long pairs, batching."""

import json
import logging

import pytest
from train_helpers import write_jsonl

from finetune.data.encoding import (
    IGNORE_INDEX,
    encode_conversation,
    encode_input_output,
    text_ids,
)
from finetune.data.formats.base import EncodingLimits
from finetune.data.preference import (
    PreferenceCollator,
    detect_preference_file,
    encode_pair,
    load_preference_data,
)
from finetune.data.records import DataValidationError

HISTORY = [
    {"role": "system", "content": "You are a shop assistant."},
    {"role": "user", "content": "类型#裙*颜色#红色"},
    {"role": "assistant", "content": "这款红色连衣裙宽松舒适。"},
    {"role": "user", "content": "What is the weather like in Beijing today?"},
]
TOOLS = [{"name": "get_weather", "description": "weather of a city", "parameters": {"city": "string"}}]


def learned_text(encoded: dict, tokenizer, side: str) -> str:
    """The text of the labelled tokens of one side."""
    ids = [token for token in encoded[f"{side}_labels"] if token != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_conversation_pair_encodes_each_side_as_sft_with_labels_only_on_the_reply(tiny_tokenizer):
    pair = {"conversations": HISTORY, "tools": TOOLS, "chosen": "The temperature in Beijing is 20 degrees.",
            "rejected": {"name": "get_weather", "parameters": {"city": "北京"}}}  # fmt: skip
    encoded = encode_pair(pair, tiny_tokenizer)
    history_without_loss = [{**message, "loss": False} for message in HISTORY]
    sft_chosen = encode_conversation(
        {"tools": TOOLS, "conversations": [*history_without_loss, {"role": "assistant", "content": pair["chosen"]}]},
        tiny_tokenizer,
        None,
    )
    assert encoded["chosen_input_ids"] == sft_chosen["input_ids"] and encoded["chosen_labels"] == sft_chosen["labels"]
    # The rejected tool call is the assistant half of an SFT tool turn: the same tokens and labels, then eos.
    sft_tool = encode_conversation(
        {"tools": TOOLS, "conversations": [
            *history_without_loss,
            {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "20"},
        ]},
        tiny_tokenizer,
        None,
    )  # fmt: skip
    call_end = len(encoded["rejected_input_ids"]) - 1
    assert encoded["rejected_input_ids"][:call_end] == sft_tool["input_ids"][:call_end]
    assert encoded["rejected_labels"][:call_end] == sft_tool["labels"][:call_end]
    assert encoded["rejected_input_ids"][-1] == encoded["rejected_labels"][-1] == tiny_tokenizer.eos_token_id
    assert "tool_call(city='北京')" in learned_text(encoded, tiny_tokenizer, "rejected")
    # Labels only on the final reply: the history's assistant turn is not learned on either side.
    for side in ("chosen", "rejected"):
        assert "宽松舒适" not in learned_text(encoded, tiny_tokenizer, side)
    assert learned_text(encoded, tiny_tokenizer, "chosen").strip().startswith("The temperature in Beijing")
    # Both sides share the prompt tokens up to the reply.
    prompt_length = encoded["chosen_labels"].index(next(t for t in encoded["chosen_labels"] if t != IGNORE_INDEX))
    assert encoded["chosen_input_ids"][: prompt_length - 1] == encoded["rejected_input_ids"][: prompt_length - 1]


def test_prompt_pair_encodes_each_side_as_the_input_output_encoding(tiny_tokenizer):
    pair = {"prompt": "类型#裙*颜色#红色", "chosen": "这款红色连衣裙宽松舒适。", "rejected": "Our new blue jacket."}
    encoded = encode_pair(pair, tiny_tokenizer)
    for side in ("chosen", "rejected"):
        sft = encode_input_output({"prompt": pair["prompt"], "response": pair[side]}, tiny_tokenizer, 1024, 1024)
        assert encoded[f"{side}_input_ids"] == sft["input_ids"] and encoded[f"{side}_labels"] == sft["labels"]
    assert encoded["length"] == max(len(encoded["chosen_input_ids"]), len(encoded["rejected_input_ids"]))


def test_every_bad_record_is_named_by_file_line_and_field(tiny_tokenizer, tmp_path):
    user = [{"role": "user", "content": "类型#裙"}]
    records = [
        {"conversations": user, "chosen": "好看的裙子。", "rejected": "Bad."},  # line 1: valid
        {"conversations": user, "chosen": "  ", "rejected": "Bad."},
        {"conversations": user, "chosen": "同一个回答。", "rejected": "同一个回答。"},
        {"conversations": [*user, {"role": "assistant", "content": "已经回答了。"}], "chosen": "A", "rejected": "B"},
        {"conversations": user, "chosen": "A"},
        {"conversations": user, "chosen": {"name": "", "parameters": []}, "rejected": "B"},
        {"prompt": "", "chosen": "A", "rejected": "B"},
        {"conversations": [{"role": "robot", "content": "x"}], "chosen": "A", "rejected": "B"},
        {"chosen": "A", "rejected": "B"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DataValidationError) as raised:
        load_preference_data(path, tiny_tokenizer, 128)
    message = str(raised.value)
    expected = [
        "pairs.jsonl:2 field 'chosen': is empty",
        "pairs.jsonl:3 field 'rejected': is identical to chosen",
        "pairs.jsonl:4 field 'conversations[1].role': the history ends with a assistant turn",
        "pairs.jsonl:5 field 'rejected': is missing",
        "pairs.jsonl:6 field 'chosen.name': a tool call needs the tool name",
        "pairs.jsonl:6 field 'chosen.parameters': a tool call needs its parameters as an object",
        "pairs.jsonl:7 field 'prompt': is empty",
        "pairs.jsonl:8 field 'conversations[0].role': unknown role 'robot'",
        "pairs.jsonl:9 field 'prompt': is missing or not a string (a pair needs 'conversations', or 'prompt')",
    ]
    for line in expected:
        assert line in message, message
    assert ":1 " not in message
    kept = load_preference_data(path, tiny_tokenizer, 128, skip_invalid=True)
    assert len(kept.dataset) == 1 and len(kept.skipped) == len(expected)


def test_pairs_longer_than_max_seq_length_are_dropped_and_counted(tiny_tokenizer, tmp_path, caplog):
    short = {"prompt": "类型#裙", "chosen": "好看。", "rejected": "Bad."}
    long = {"prompt": "类型#裙", "chosen": "这款红色连衣裙采用棉面料，宽松的版型穿着舒适透气。" * 8, "rejected": "Bad."}
    path = write_jsonl(tmp_path / "pairs.jsonl", [short, long, short, long, long])
    limit = encode_pair(short, tiny_tokenizer)["length"]
    with caplog.at_level(logging.WARNING):
        data = load_preference_data(path, tiny_tokenizer, limit)
    assert len(data.dataset) == 2 and len(data.too_long) == 3
    assert "dropped 3 of 5 pairs longer than max_seq_length" in caplog.text and "pairs.jsonl:2" in caplog.text
    assert "3 dropped as longer than max_seq_length" in data.summary
    with pytest.raises(DataValidationError, match="no preference pair left"):
        load_preference_data(write_jsonl(tmp_path / "long.jsonl", [long]), tiny_tokenizer, limit)


def test_a_tool_call_reply_to_a_prompt_pair_is_reported_not_a_crash(tiny_tokenizer, tmp_path):
    call = {"name": "get_weather", "parameters": {"city": "北京"}}
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Weather in Beijing?", "chosen": call, "rejected": "No."}])
    with pytest.raises(DataValidationError, match="pairs.jsonl:1 field 'chosen': is a tool call, which input-output"):
        load_preference_data(path, tiny_tokenizer, 128)


def test_a_format_registered_in_its_own_module_holds_preference_pairs(alpaca_format, tiny_tokenizer, tmp_path):
    pairs = [{"instruction": "类型#裙", "input": "颜色#红色", "chosen": "这款红色连衣裙宽松舒适。", "rejected": "Bad."},
             {"instruction": "类型#裤", "chosen": {"content": "复古的条纹长裤。"}, "rejected": "No."}]  # fmt: skip
    data = load_preference_data(write_jsonl(tmp_path / "alpaca.jsonl", pairs), tiny_tokenizer, 128)
    assert data.layout == "alpaca" and len(data.dataset) == 2
    limits = EncodingLimits(max_source_length=128, max_target_length=128)
    for pair, row in zip(pairs, data.dataset, strict=True):
        for side in ("chosen", "rejected"):
            reply = pair[side] if isinstance(pair[side], str) else pair[side]["content"]
            sft = alpaca_format.encode({**pair, "output": reply}, tiny_tokenizer, limits)  # the format's own encoding
            assert row[f"{side}_input_ids"] == sft["input_ids"] and row[f"{side}_labels"] == sft["labels"]
            learned = [token for token in row[f"{side}_labels"] if token != IGNORE_INDEX]
            assert learned == text_ids(tiny_tokenizer, reply) + [tiny_tokenizer.eos_token_id]
    # The format's own checks name the field; the replies' and the one-layout-per-file checks apply as to any format.
    bad = [*pairs, {"instruction": 3, "chosen": "A", "rejected": "B"},
           {"instruction": "类型#裙", "chosen": {"name": "get_weather", "parameters": {}}, "rejected": "B"},
           {"prompt": "类型#裙", "chosen": "A", "rejected": "B"}]  # fmt: skip
    with pytest.raises(DataValidationError) as raised:
        load_preference_data(write_jsonl(tmp_path / "bad.jsonl", bad), tiny_tokenizer, 128)
    message = str(raised.value)
    assert "bad.jsonl:3 field 'instruction': must be a string, got number" in message
    assert "bad.jsonl:4 field 'chosen': is a tool call, which Alpaca pairs cannot hold" in message
    assert "bad.jsonl:5: mixes Alpaca and input-output pairs; one file holds one layout" in message


def test_preference_files_are_detected_from_their_first_record(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "a"}])
    assert detect_preference_file(pairs) and not detect_preference_file(sft)


def test_collator_puts_every_chosen_side_before_every_rejected_side(tiny_tokenizer):
    pairs = [
        encode_pair({"prompt": "类型#裙", "chosen": "好看。", "rejected": "Bad, very bad."}, tiny_tokenizer),
        encode_pair({"prompt": "类型#裤", "chosen": "复古的条纹长裤。", "rejected": "No."}, tiny_tokenizer),
    ]
    pairs[0]["ref_chosen_logps"], pairs[0]["ref_rejected_logps"] = -1.5, -2.5
    pairs[1]["ref_chosen_logps"], pairs[1]["ref_rejected_logps"] = -3.0, -4.0
    batch = PreferenceCollator(tiny_tokenizer.pad_token_id)(pairs)
    assert batch["input_ids"].shape[0] == 4
    order = [pairs[0]["chosen_input_ids"], pairs[1]["chosen_input_ids"], pairs[0]["rejected_input_ids"],
             pairs[1]["rejected_input_ids"]]  # fmt: skip
    for row, ids in zip(batch["input_ids"].tolist(), order, strict=True):
        assert row[: len(ids)] == ids and set(row[len(ids) :]) <= {tiny_tokenizer.pad_token_id}
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.5, -4.0]
    assert json.dumps(batch["attention_mask"].sum(dim=1).tolist()) == json.dumps([len(ids) for ids in order])
