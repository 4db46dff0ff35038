"""Evaluation by generation during training: metrics, predictions file, batched equal to per-prompt generation
(equal to standalone evaluation: tests/unit/finetune/test_generation.py)."""

import json

import pytest
import torch
from train_helpers import input_output_records, run_arguments, write_jsonl

from finetune.generation import cut_at_stop
from finetune.metrics import METRIC_NAMES
from finetune.model.tokenization import reply_stop_ids
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
    model = outcome.trainer.model.eval()
    stop_ids = reply_stop_ids(tiny_tokenizer)
    answers = []
    for record, source in zip(records, input_output_records(5)):
        prompt_ids = tiny_tokenizer.encode(source["prompt"])
        with torch.no_grad():
            alone = model.generate(
                input_ids=torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=stop_ids
            )
        answer = cut_at_stop(alone[0, len(prompt_ids) :].tolist(), stop_ids)
        assert record["prediction"] == tiny_tokenizer.decode(answer).strip()
        answers.append(tuple(answer))
    assert len(set(answers)) > 1, answers

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
