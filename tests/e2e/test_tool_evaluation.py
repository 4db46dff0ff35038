"""Tool-call evaluation end to end: a trained tiny checkpoint beating an untrained one, and reference calls read from
both record forms (the metrics themselves: tests/unit/finetune/test_tool_metrics.py)."""

import json
from pathlib import Path

import pytest
from train_helpers import call, run_arguments, write_jsonl

from finetune.evaluate import METRICS_FILE, PREDICTIONS_FILE, main
from finetune.train import main as train_main

TOOLS = [{"name": "get_weather"}, {"name": "get_price"}]
WEATHER_CITIES = ["北京", "上海", "广州"]
PRICE_ITEMS = ["连衣裙", "外套", "衬衫"]


def synthetic_tool_records() -> list[dict]:
    """A small tool set: weather questions call get_weather, price questions call get_price, then a text answer."""
    records = []
    for city in WEATHER_CITIES:
        records.append(
            {
                "tools": TOOLS,
                "conversations": [
                    {"role": "user", "content": f"{city}天气怎么样"},
                    {"role": "tool", "name": "get_weather", "parameters": {"city": city}, "observation": "晴"},
                    {"role": "assistant", "content": f"{city}今天晴。"},
                ],
            }
        )
    for item in PRICE_ITEMS:
        records.append(
            {
                "tools": TOOLS,
                "conversations": [
                    {"role": "user", "content": f"{item}多少钱"},
                    {"role": "tool", "name": "get_price", "parameters": {"item": item}, "observation": "100"},
                    {"role": "assistant", "content": f"{item}100元。"},
                ],
            }
        )
    return records


def evaluate_checkpoint(model: Path, data: Path, output_dir: Path) -> tuple[dict, list[dict]]:
    """Run the evaluation CLI; return its metrics and prediction rows."""
    argv = ["--model", str(model), "--data", str(data), "--output_dir", str(output_dir), "--device", "cpu"]
    assert main([*argv, "--max_new_tokens", "24", "--batch_size", "6", "--max_source_length", "512"]) == 0
    rows = [json.loads(line) for line in (output_dir / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    return json.loads((output_dir / METRICS_FILE).read_text(encoding="utf-8")), rows


@pytest.mark.slow
def test_trained_checkpoint_calls_tools_better_than_the_untrained_one(tiny_model_dir: Path, tmp_path: Path):
    data = write_jsonl(tmp_path / "tools.jsonl", synthetic_tool_records())
    argv = run_arguments(
        tiny_model_dir,
        data,
        tmp_path / "run",
        tmp_path / "cache",
        max_steps=60,
        save_steps=60,
        per_device_train_batch_size=6,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        max_seq_length=256,
    )
    train_main(argv)
    untrained, untrained_rows = evaluate_checkpoint(tiny_model_dir, data, tmp_path / "untrained")
    trained, trained_rows = evaluate_checkpoint(tmp_path / "run" / "checkpoint-60", data, tmp_path / "trained")
    assert len(trained_rows) == 12
    assert [row["label_call"] for row in trained_rows[::2]] == [
        call("get_weather", {"city": city}) for city in WEATHER_CITIES
    ] + [call("get_price", {"item": item}) for item in PRICE_ITEMS]
    assert trained["tool_call_decision_accuracy"] >= untrained["tool_call_decision_accuracy"] + 25
    assert trained["tool_name_accuracy"] >= untrained["tool_name_accuracy"] + 50
    assert trained["tool_call_parse_rate"] > untrained["tool_call_parse_rate"]
    assert trained["tool_arguments_f1"] > untrained["tool_arguments_f1"]


def test_reference_calls_in_both_of_our_forms():
    from finetune.data.formats.conversations import reference_call

    tool = {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "晴"}
    text_form = {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"}
    interpreter = {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(1)\n```"}
    assert reference_call(tool) == reference_call(text_form) == call("get_weather", {"city": "北京"})
    assert reference_call(interpreter) is None
    assert reference_call({"role": "assistant", "content": "晴"}) is None
