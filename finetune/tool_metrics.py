"""Tool-call metrics of an evaluation: did the model call a tool when it should, the right one, with the right
arguments, in text that parses.

Each evaluated turn is a predictions-file row with `label_call` (the reference call, `{"name", "arguments"}`, or
null for a text reply) and `predicted_call` (the call the model made, `{"name", "arguments"}` with arguments null
when its `tool_call(...)` text did not parse, or null when it replied with text). All metrics are percentages
(x 100, 4 decimals):
- tool_call_decision_accuracy: turns where the model called a tool exactly when the reference does, over all turns;
- tool_name_accuracy: reference calls answered by a call of the same tool;
- tool_arguments_exact_match: reference calls answered by the same tool with exactly the same arguments;
- tool_arguments_f1: mean over reference calls of the F1 of (argument name, value) pairs (0 without a parsed call;
  100 when both have no arguments);
- tool_call_parse_rate: predicted calls whose arguments parse, over all predicted calls (0 when there are none).
"""

import json
from collections.abc import Sequence

DECIMALS = 4
TOOL_METRIC_NAMES = (
    "tool_call_decision_accuracy",
    "tool_name_accuracy",
    "tool_arguments_exact_match",
    "tool_arguments_f1",
    "tool_call_parse_rate",
)


def _percent(count: float, total: int) -> float:
    """count / total x 100, rounded; 0 when there is nothing to count."""
    return round(100 * count / total, DECIMALS) if total else 0.0


def _argument_pairs(arguments: dict) -> set[tuple[str, str]]:
    """Arguments as comparable (name, canonical JSON value) pairs."""
    return {(name, json.dumps(value, sort_keys=True, ensure_ascii=False)) for name, value in arguments.items()}


def arguments_f1(predicted: dict | None, reference: dict) -> float:
    """F1 (0-1) of the predicted (name, value) argument pairs against the reference's."""
    if predicted is None:
        return 0.0
    predicted_pairs, reference_pairs = _argument_pairs(predicted), _argument_pairs(reference)
    if not predicted_pairs and not reference_pairs:
        return 1.0
    matched = len(predicted_pairs & reference_pairs)
    return 2 * matched / (len(predicted_pairs) + len(reference_pairs))


def compute_tool_metrics(rows: Sequence[dict]) -> dict[str, float]:
    """The tool-call metrics of evaluated turns (rows with `label_call` and `predicted_call`)."""
    reference_calls = [row for row in rows if row.get("label_call")]
    predicted_calls = [row["predicted_call"] for row in rows if row.get("predicted_call")]
    decisions = sum(bool(row.get("label_call")) == bool(row.get("predicted_call")) for row in rows)
    same_tool = [
        row
        for row in reference_calls
        if row.get("predicted_call") and row["predicted_call"]["name"] == row["label_call"]["name"]
    ]
    exact = sum(row["predicted_call"]["arguments"] == row["label_call"]["arguments"] for row in same_tool)
    f1 = sum(
        arguments_f1((row.get("predicted_call") or {}).get("arguments"), row["label_call"]["arguments"])
        for row in reference_calls
    )
    parsed = sum(call["arguments"] is not None for call in predicted_calls)
    return {
        "tool_call_decision_accuracy": _percent(decisions, len(rows)),
        "tool_name_accuracy": _percent(len(same_tool), len(reference_calls)),
        "tool_arguments_exact_match": _percent(exact, len(reference_calls)),
        "tool_arguments_f1": _percent(f1, len(reference_calls)),
        "tool_call_parse_rate": _percent(parsed, len(predicted_calls)),
    }
