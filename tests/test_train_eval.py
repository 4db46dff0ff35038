"""Evaluation by generation: prompt/reference split, left-padded prompts, metrics during training, predictions file."""

import json

import datasets
import pytest
import torch
from train_helpers import conversation_records, input_output_records, run_arguments, write_jsonl
from transformers import AutoTokenizer

from finetune.data.encoding import IGNORE_INDEX, encode_conversation, encode_input_output
from finetune.generation_eval_batches import GenerationEvalCollator, blank_after_stop, split_prompt_and_reference
from finetune.metrics import METRIC_NAMES
from finetune.train import PREDICTIONS_FILE, main


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    """The tiny model's tokenizer."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_input_output_example_splits_into_source_and_response(tokenizer):
    example = {"prompt": "类型#裙*颜色#红色", "response": "这款红色连衣裙"}
    encoded = encode_input_output(example, tokenizer, max_source_length=64, max_target_length=64)
    prompt, reference = split_prompt_and_reference(encoded["input_ids"], encoded["labels"])
    source_length = encoded["labels"].index(next(label for label in encoded["labels"] if label != IGNORE_INDEX))
    assert prompt == encoded["input_ids"][:source_length]
    assert prompt[:2] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    assert reference == encoded["input_ids"][source_length:]
    assert reference[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(reference) == example["response"]


def test_conversation_splits_before_the_last_assistant_turn(tokenizer):
    encoded = encode_conversation(conversation_records()[0], tokenizer, max_seq_length=None)
    prompt, reference = split_prompt_and_reference(encoded["input_ids"], encoded["labels"])
    assert prompt[-1] == tokenizer.get_command("<|assistant|>")
    assert prompt.count(tokenizer.get_command("<|assistant|>")) == 2
    assert (
        tokenizer.decode(tokenizer.strip_command_ids(reference)).strip()
        == conversation_records()[0]["conversations"][-1]["content"]
    )
    with pytest.raises(ValueError, match="no learned token"):
        split_prompt_and_reference([1, 2, 3], [IGNORE_INDEX] * 3)


def test_eval_collator_left_pads_prompts_and_right_pads_full_rows(tokenizer):
    rows = [
        encode_input_output(record, tokenizer, max_source_length=64, max_target_length=64)
        for record in input_output_records(3)
    ]
    batch = GenerationEvalCollator(tokenizer.pad_token_id)(rows)
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


def test_eval_during_training_and_predictions_match_per_prompt_generation(tiny_model_dir, tokenizer, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(6))
    test_file = write_jsonl(tmp_path / "test.jsonl", input_output_records(5))
    output_dir = tmp_path / "out"
    argv = run_arguments(
        tiny_model_dir,
        train_file,
        output_dir,
        tmp_path / "cache",
        pre_seq_len=4,
        max_steps=2,
        save_steps=2,
        validation_file=test_file,
        test_file=test_file,
        eval_strategy="steps",
        eval_steps=2,
        do_eval=True,
        do_predict=True,
        predict_with_generate=True,
        per_device_eval_batch_size=3,
        max_new_tokens=6,
    )
    outcome = main(argv)

    eval_logs = [entry for entry in outcome.trainer.state.log_history if "eval_loss" in entry]
    assert eval_logs and eval_logs[0]["step"] == 2
    for name in METRIC_NAMES:
        assert 0.0 <= eval_logs[0][f"eval_{name}"] <= 100.0
    assert set(outcome.metrics["predict"]) >= {f"predict_{name}" for name in METRIC_NAMES} | {"predict_loss"}
    saved_metrics = json.loads((output_dir / "predict_results.json").read_text())
    assert saved_metrics["predict_rouge-1"] == outcome.metrics["predict"]["predict_rouge-1"]
    assert (output_dir / "eval_results.json").is_file()

    records = [json.loads(line) for line in (output_dir / PREDICTIONS_FILE).read_text().splitlines()]
    assert [(record["prompt"], record["label"]) for record in records] == [
        (source["prompt"], source["response"]) for source in input_output_records(5)
    ]

    # Batched generation from left-padded prompts (batches of 3 with different prompt lengths) gives, token for
    # token, what generating each prompt alone gives.
    examples = [encode_input_output(source, tokenizer, 48, 48) for source in input_output_records(5)]
    batched = outcome.trainer.predict(datasets.Dataset.from_list(examples)).predictions
    model = outcome.trainer.model.eval()
    stop_ids = outcome.trainer._stop_token_ids()
    answers = []
    for row, source in zip(batched, input_output_records(5)):
        prompt_ids = tokenizer.encode(source["prompt"])
        with torch.no_grad():
            alone = model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=stop_ids
            )
        answer = blank_after_stop(alone[:, len(prompt_ids) :], stop_ids, tokenizer.pad_token_id)[0].tolist()
        answer = [token for token in answer if token != tokenizer.pad_token_id]
        assert [int(token) for token in row if token not in (IGNORE_INDEX, tokenizer.pad_token_id)] == answer
        answers.append(tuple(answer))
    assert len(set(answers)) > 1, answers
    text_ids = [token for token in answers[0] if token not in tokenizer.all_special_ids]
    assert records[0]["prediction"] == tokenizer.decode(text_ids)

    # Without predict_with_generate, evaluation reports the loss only.
    outcome.trainer.args.predict_with_generate = False
    loss_only = outcome.trainer.evaluate()
    assert loss_only["eval_loss"] == pytest.approx(eval_logs[-1]["eval_loss"], abs=1e-6)
    assert "eval_rouge-1" not in loss_only

    # An evaluation-only run loads the prefix of the checkpoint it is given.
    evaluated = main(
        run_arguments(
            tiny_model_dir,
            None,
            tmp_path / "eval_only",
            tmp_path / "cache",
            pre_seq_len=4,
            do_train=False,
            do_eval=True,
            validation_file=test_file,
            per_device_eval_batch_size=3,
            resume_from_checkpoint=output_dir / "checkpoint-2",
        )
    )
    assert evaluated.metrics["eval"]["eval_loss"] == pytest.approx(eval_logs[-1]["eval_loss"], abs=1e-6)
