"""finetune/tool_metrics.py: the tool-call metrics of hand-made predictions rows."""

import pytest
from train_helpers import call

from finetune.tool_metrics import TOOL_METRIC_NAMES, arguments_f1, compute_tool_metrics


def test_tool_metrics_count_decisions_names_arguments_and_parsing():
    rows = [
        {
            "label_call": call("w", {"city": "北京", "days": 2}),
            "predicted_call": call("w", {"city": "北京", "days": 2}),
        },
        {
            "label_call": call("w", {"city": "北京", "days": 2}),
            "predicted_call": call("w", {"city": "上海", "days": 2}),
        },
        {"label_call": call("w", {"city": "北京"}), "predicted_call": call("p", None)},
        {"label_call": call("w", {"city": "北京"}), "predicted_call": None},
        {"label_call": None, "predicted_call": None},
        {"label_call": None, "predicted_call": call("w", {})},
    ]
    metrics = compute_tool_metrics(rows)
    assert list(metrics) == list(TOOL_METRIC_NAMES)
    assert metrics["tool_call_decision_accuracy"] == round(100 * 4 / 6, 4)
    assert metrics["tool_name_accuracy"] == 50.0
    assert metrics["tool_arguments_exact_match"] == 25.0
    assert metrics["tool_arguments_f1"] == round(100 * (1 + 0.5 + 0 + 0) / 4, 4)
    assert metrics["tool_call_parse_rate"] == 75.0
    assert arguments_f1({}, {}) == 1.0
    assert arguments_f1({"a": [1, 2]}, {"a": [1, 2], "b": 1}) == pytest.approx(2 / 3)


def test_argument_values_compare_as_json_whatever_the_key_order():
    assert arguments_f1({"a": {"x": 1, "y": 2}}, {"a": {"y": 2, "x": 1}}) == 1.0
    assert arguments_f1({"a": 1}, {"a": "1"}) == 0.0
    assert arguments_f1(None, {}) == 0.0


def test_no_rows_and_no_calls_give_zero_not_a_division_error():
    assert compute_tool_metrics([]) == dict.fromkeys(TOOL_METRIC_NAMES, 0.0)
    text_only = compute_tool_metrics([{"label_call": None, "predicted_call": None}])
    assert text_only["tool_call_decision_accuracy"] == 100.0
    assert text_only["tool_name_accuracy"] == text_only["tool_call_parse_rate"] == 0.0
