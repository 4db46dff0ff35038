"""finetune/generation.py: the stop rule, evaluation prompts per learned turn (the data format splits the turns,
generation builds their ids), and evaluation during training equal to standalone evaluation on the same checkpoint
and data (batched generation itself: tests/unit/finetune/test_evaluate.py)."""

import json

from train_helpers import conversation_records, run_arguments, write_jsonl

from finetune.data.encoding import IGNORE_INDEX, encode_conversation
from finetune.data.formats import evaluation_examples
from finetune.evaluate import METRICS_FILE
from finetune.evaluate import PREDICTIONS_FILE as EVALUATION_PREDICTIONS
from finetune.evaluate import main as evaluate_main
from finetune.generation import cut_at_stop
from finetune.metrics import METRIC_NAMES
from finetune.train import PREDICTIONS_FILE as TRAINING_PREDICTIONS
from finetune.train import main as train_main


def test_cut_at_stop_ends_a_reply_at_its_first_stop_id():
    assert cut_at_stop([5, 6, 2, 7, 906], {2, 906}) == [5, 6]
    assert cut_at_stop([5, 6, 2, 7, 906], frozenset({2, 906}), keep_stop=True) == [5, 6, 2]
    assert cut_at_stop((3, 4, 906), [2, 906]) == [3, 4]
    assert cut_at_stop([5, 9, 8], [2, 906]) == [5, 9, 8]
    assert cut_at_stop([], [2]) == []


def learned_run_starts(labels: list[int]) -> list[int]:
    """Positions where a run of learned (not -100) labels starts."""
    return [
        position
        for position, label in enumerate(labels)
        if label != IGNORE_INDEX and (position == 0 or labels[position - 1] == IGNORE_INDEX)
    ]


def test_evaluation_prompts_are_the_training_encoding_before_each_learned_turn(tiny_tokenizer):
    records = conversation_records()
    examples = evaluation_examples(records, tiny_tokenizer, max_source_length=1024)
    assert [example.example_id for example in examples] == ["0:1", "0:3", "1:1", "1:2"]
    assert [example.label for example in examples] == [
        records[0]["conversations"][1]["content"],
        records[0]["conversations"][3]["content"],
        None,
        records[1]["conversations"][2]["content"],
    ]
    assert examples[2].label_call == {"name": "get_weather", "arguments": {"city": "北京"}}
    # Each prompt is what training encodes before that turn's learned tokens (the turn's role token is not learned).
    for index, record in enumerate(records):
        encoded = encode_conversation(record, tiny_tokenizer, max_seq_length=None)
        turns = [example for example in examples if example.example_id.startswith(f"{index}:")]
        starts = learned_run_starts(encoded["labels"])
        assert len(starts) == len(turns)
        for start, example in zip(starts, turns):
            assert example.prompt_ids == encoded["input_ids"][:start]
            assert example.prompt_ids[-1] in (
                tiny_tokenizer.get_command("<|assistant|>"),
                tiny_tokenizer.get_command("<|observation|>"),
            ) or example.label_call


def test_evaluation_during_training_scores_every_turn_as_standalone_evaluation(tiny_model_dir, tmp_path):
    records = conversation_records()
    data = write_jsonl(tmp_path / "dialogues.jsonl", records)
    output_dir = tmp_path / "run"
    argv = run_arguments(
        tiny_model_dir,
        data,
        output_dir,
        tmp_path / "cache",
        pre_seq_len=4,
        max_steps=2,
        save_steps=2,
        max_seq_length=256,
        validation_file=data,
        test_file=data,
        eval_strategy="steps",
        eval_steps=2,
        do_predict=True,
        predict_with_generate=True,
        per_device_eval_batch_size=3,
        max_new_tokens=6,
    )
    outcome = train_main(argv)
    during_training = next(entry for entry in outcome.trainer.state.log_history if "eval_loss" in entry)
    assert during_training["step"] == 2

    evaluated = tmp_path / "evaluated"
    options = ["--max_new_tokens", "6", "--batch_size", "3", "--device", "cpu"]
    checkpoint = output_dir / "checkpoint-2"
    arguments = ["--model", str(checkpoint), "--data", str(data), "--output_dir", str(evaluated), *options]
    assert evaluate_main(arguments) == 0
    standalone = json.loads((evaluated / METRICS_FILE).read_text(encoding="utf-8"))

    assert standalone["evaluated_turns"] == 4
    scored = [name for name in standalone if f"eval_{name}" in during_training]
    assert set(scored) >= {*METRIC_NAMES, "tool_name_accuracy", "tool_arguments_f1"}
    assert {name: during_training[f"eval_{name}"] for name in scored} == {name: standalone[name] for name in scored}
    # The same turns, with the same replies: training's test predictions are standalone evaluation's rows.
    training_rows = [json.loads(line) for line in (output_dir / TRAINING_PREDICTIONS).read_text().splitlines()]
    standalone_rows = [json.loads(line) for line in (evaluated / EVALUATION_PREDICTIONS).read_text().splitlines()]
    assert [row["id"] for row in training_rows] == ["0:1", "0:3", "1:1", "1:2"]
    assert training_rows == standalone_rows
