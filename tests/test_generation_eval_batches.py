"""finetune/generation_eval_batches.py: prompts split from references, left-padded prompt batches, stop blanking,
prediction records."""

import numpy as np
import pytest
import torch
from train_helpers import conversation_records, input_output_records

from finetune.data.encoding import IGNORE_INDEX, encode_conversation, encode_input_output
from finetune.generation_eval_batches import (
    GenerationEvalCollator,
    blank_after_stop,
    prediction_records,
    split_prompt_and_reference,
)


def test_input_output_example_splits_into_source_and_response(tiny_tokenizer):
    example = {"prompt": "类型#裙*颜色#红色", "response": "这款红色连衣裙"}
    encoded = encode_input_output(example, tiny_tokenizer, max_source_length=64, max_target_length=64)
    prompt, reference = split_prompt_and_reference(encoded["input_ids"], encoded["labels"])
    source_length = encoded["labels"].index(next(label for label in encoded["labels"] if label != IGNORE_INDEX))
    assert prompt == encoded["input_ids"][:source_length]
    assert prompt[:2] == [tiny_tokenizer.get_command("[gMASK]"), tiny_tokenizer.get_command("sop")]
    assert reference == encoded["input_ids"][source_length:]
    assert reference[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(reference) == example["response"]


def test_conversation_splits_before_the_last_assistant_turn(tiny_tokenizer):
    encoded = encode_conversation(conversation_records()[0], tiny_tokenizer, max_seq_length=None)
    prompt, reference = split_prompt_and_reference(encoded["input_ids"], encoded["labels"])
    assert prompt[-1] == tiny_tokenizer.get_command("<|assistant|>")
    assert prompt.count(tiny_tokenizer.get_command("<|assistant|>")) == 2
    assert (
        tiny_tokenizer.decode(tiny_tokenizer.strip_command_ids(reference)).strip()
        == conversation_records()[0]["conversations"][-1]["content"]
    )
    with pytest.raises(ValueError, match="no learned token"):
        split_prompt_and_reference([1, 2, 3], [IGNORE_INDEX] * 3)


def test_eval_collator_left_pads_prompts_and_right_pads_full_rows(tiny_tokenizer):
    rows = [
        encode_input_output(record, tiny_tokenizer, max_source_length=64, max_target_length=64)
        for record in input_output_records(3)
    ]
    batch = GenerationEvalCollator(tiny_tokenizer.pad_token_id)(rows)
    for index, row in enumerate(rows):
        prompt, reference = split_prompt_and_reference(row["input_ids"], row["labels"])
        width = batch["prompt_input_ids"].shape[1]
        assert batch["prompt_input_ids"][index, width - len(prompt) :].tolist() == prompt
        assert batch["prompt_attention_mask"][index].tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        assert batch["reference_ids"][index, : len(reference)].tolist() == reference
        assert batch["input_ids"][index, : len(row["input_ids"])].tolist() == row["input_ids"]
        assert batch["labels"][index, : len(row["labels"])].tolist() == row["labels"]
        assert batch["attention_mask"][index].sum() == len(row["input_ids"])
    assert len({len(row["input_ids"]) for row in rows}) > 1


def test_blank_after_stop_clears_the_stop_token_and_what_follows():
    generated = torch.tensor([[5, 6, 2, 7], [5, 9, 8, 7], [3, 4, 4, 906]])
    assert blank_after_stop(generated, [2, 906], pad_token_id=0).tolist() == [[5, 6, 0, 0], [5, 9, 8, 7], [3, 4, 4, 0]]


def test_prediction_records_decode_prompt_label_and_generation_as_text(tiny_tokenizer):
    records = input_output_records(2)
    examples = [encode_input_output(record, tiny_tokenizer, 64, 64) for record in records]
    generated = [tiny_tokenizer.encode(record["response"], add_special_tokens=False) for record in reversed(records)]
    width = max(len(ids) for ids in generated) + 2
    pad = tiny_tokenizer.pad_token_id
    predictions = np.array([ids + [tiny_tokenizer.eos_token_id] + [pad] * (width - len(ids) - 1) for ids in generated])
    rows = prediction_records(examples, predictions, tiny_tokenizer, keep_prompt_special_tokens=False)
    assert rows == [
        {"prompt": records[0]["prompt"], "label": records[0]["response"], "prediction": records[1]["response"]},
        {"prompt": records[1]["prompt"], "label": records[1]["response"], "prediction": records[0]["response"]},
    ]
    with pytest.raises(ValueError, match="2 examples but 1 prediction rows"):
        prediction_records(examples, predictions[:1], tiny_tokenizer, keep_prompt_special_tokens=False)


def test_conversation_prompts_keep_their_role_tokens_when_asked(tiny_tokenizer):
    example = encode_conversation(conversation_records()[0], tiny_tokenizer, max_seq_length=None)
    empty = np.array([[tiny_tokenizer.pad_token_id]])
    with_roles = prediction_records([example], empty, tiny_tokenizer, keep_prompt_special_tokens=True)[0]
    text_only = prediction_records([example], empty, tiny_tokenizer, keep_prompt_special_tokens=False)[0]
    assert with_roles["prompt"].count("<|assistant|>") == 2 and "<|user|>" in with_roles["prompt"]
    assert "<|assistant|>" not in text_only["prompt"] and "<|user|>" not in text_only["prompt"]
    assert with_roles["label"] == text_only["label"]
    assert with_roles["label"].strip() == conversation_records()[0]["conversations"][-1]["content"]
    assert with_roles["prediction"] == ""
