"""Evaluation by generation during training: metrics, predictions file, batched equal to per-prompt generation
(the batches themselves: tests/test_generation_eval_batches.py)."""

import json

import datasets
import pytest
import torch
from train_helpers import input_output_records, run_arguments, write_jsonl

from finetune.data.encoding import IGNORE_INDEX, encode_input_output
from finetune.generation_eval_batches import blank_after_stop
from finetune.metrics import METRIC_NAMES
from finetune.train import PREDICTIONS_FILE, main


def test_eval_during_training_and_predictions_match_per_prompt_generation(tiny_model_dir, tiny_tokenizer, tmp_path):
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
    examples = [encode_input_output(source, tiny_tokenizer, 48, 48) for source in input_output_records(5)]
    batched = outcome.trainer.predict(datasets.Dataset.from_list(examples)).predictions
    model = outcome.trainer.model.eval()
    stop_ids = outcome.trainer._stop_token_ids()
    answers = []
    for row, source in zip(batched, input_output_records(5)):
        prompt_ids = tiny_tokenizer.encode(source["prompt"])
        with torch.no_grad():
            alone = model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=stop_ids
            )
        answer = blank_after_stop(alone[:, len(prompt_ids) :], stop_ids, tiny_tokenizer.pad_token_id)[0].tolist()
        answer = [token for token in answer if token != tiny_tokenizer.pad_token_id]
        assert [int(token) for token in row if token not in (IGNORE_INDEX, tiny_tokenizer.pad_token_id)] == answer
        answers.append(tuple(answer))
    assert len(set(answers)) > 1, answers
    text_ids = [token for token in answers[0] if token not in tiny_tokenizer.all_special_ids]
    assert records[0]["prediction"] == tiny_tokenizer.decode(text_ids)

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
