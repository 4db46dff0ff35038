"""Validation and loading of training files: every problem reported with file, line and field, on a malformed corpus."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from train_helpers import write_jsonl

from finetune.data.encoding import encode_input_output
from finetune.data.loading import EncodingLimits, load_training_data
from finetune.data.records import SKIP_INVALID_ADVICE, DataValidationError
from finetune.data.validation import print_learned_spans, print_token_labels
from finetune.model.tokenization import ChatGLMTokenizer

MALFORMED_DIR = Path(__file__).resolve().parents[3] / "data" / "malformed"
INPUT_OUTPUT_LIMITS = EncodingLimits(max_source_length=32, max_target_length=32)
BOTH_LIMITS = EncodingLimits(max_source_length=32, max_target_length=32, max_seq_length=64)
VALID_CORNER_CASES = ["utf8_bom.jsonl"]

# file -> (every expected problem as (line, field, part of the message), examples kept with skip_invalid or None
# when the file as a whole is unusable).
MALFORMED_CASES = {
    "empty_file.jsonl": ([(None, None, "file is empty")], None),
    "blank_lines_only.jsonl": ([(None, None, "file is empty")], None),
    "top_level_object.json": ([(None, None, "top-level JSON value is object")], None),
    "empty_array.json": ([(None, None, "file contains no records")], None),
    "unsupported_extension.csv": ([(None, None, "unsupported file type '.csv'")], None),
    "broken_array.json": ([(4, None, "invalid JSON: Expecting value")], 1),
    "trailing_text.json": ([(4, None, "extra text after the closing ']'")], 1),
    "malformed_json_line.jsonl": ([(2, None, "invalid JSON")], 2),
    "invalid_utf8.jsonl": ([(2, None, "not valid UTF-8")], 1),
    "invalid_utf8_array.json": ([(3, None, "file is not valid UTF-8")], None),
    "non_object_record.jsonl": (
        [(2, None, "record must be a JSON object, got array"), (3, None, "record must be a JSON object, got string")],
        1,
    ),
    "missing_response.jsonl": ([(2, "response", "is missing")], 1),
    "null_field.jsonl": ([(2, "prompt", "must be a string, got null")], 1),
    "non_string_response.jsonl": ([(2, "response", "must be a string, got number")], 1),
    "mixed_formats.jsonl": ([(2, None, "record is in conversations format")], 1),
    "missing_conversations.jsonl": ([(2, "conversations", "is missing")], 1),
    "conversations_not_list.jsonl": ([(2, "conversations", "must be a list of messages, got object")], 1),
    "empty_conversation.jsonl": ([(2, "conversations", "conversation is empty")], 1),
    "message_not_object.jsonl": ([(2, "conversations[1]", "message must be an object, got string")], 1),
    "missing_role.jsonl": ([(2, "conversations[0].role", "is missing")], 1),
    "unknown_role.jsonl": ([(2, "conversations[1].role", "unknown role 'bot'")], 1),
    "system_not_first.jsonl": ([(2, "conversations[1].role", "only allowed as the first message")], 1),
    "repeated_system.jsonl": ([(2, "conversations[1].role", "only allowed as the first message")], 1),
    "non_string_content.jsonl": ([(2, "conversations[1].content", "must be a string, got array")], 1),
    "null_content.jsonl": ([(2, "conversations[0].content", "must be a string, got null")], 1),
    "metadata_not_string.jsonl": ([(2, "conversations[1].metadata", "must be a string, got object")], 1),
    "loss_not_bool.jsonl": ([(2, "conversations[1].loss", "must be true or false, got string")], 1),
    "tool_without_name.jsonl": ([(2, "conversations[1].name", "needs the tool name")], 1),
    "tool_without_parameters.jsonl": ([(2, "conversations[1].parameters", "got nothing")], 1),
    "tool_parameters_not_object.jsonl": ([(2, "conversations[1].parameters", "as an object, got string")], 1),
    "tool_without_observation.jsonl": ([(2, "conversations[1].observation", "needs the tool's observation")], 1),
    "tools_not_list.jsonl": ([(2, "tools", "must be a list of tool descriptions, got string")], 1),
    "no_loss_message.jsonl": ([(2, "conversations", "no message carries loss")], 1),
    "truncated_away.jsonl": ([(2, None, "no learned token left after truncation to 64 tokens")], 1),
    "many_problems.jsonl": (
        [
            (2, None, "invalid JSON"),
            (3, "conversations[1].role", "unknown role 'bot'"),
            (6, "conversations[0].content", "must be a string, got number"),
            (6, "conversations[1].parameters", "as an object, got array"),
            (6, "conversations[1].observation", "needs the tool's observation"),
            (7, None, "record must be a JSON object, got number"),
        ],
        3,
    ),
}


def test_corpus_has_a_case_for_every_file():
    assert sorted(path.name for path in MALFORMED_DIR.iterdir()) == sorted([*MALFORMED_CASES, *VALID_CORNER_CASES])


@pytest.mark.parametrize("name", sorted(MALFORMED_CASES))
def test_every_problem_is_reported_with_line_and_field(name: str, tokenizer: ChatGLMTokenizer):
    expected, _ = MALFORMED_CASES[name]
    path = MALFORMED_DIR / name
    with pytest.raises(DataValidationError) as raised:
        load_training_data(path, tokenizer, BOTH_LIMITS, cache_dir=None)
    problems = raised.value.problems
    assert len(problems) == len(expected), [str(problem) for problem in problems]
    for problem, (line, field, message) in zip(problems, expected):
        assert (problem.file, problem.line, problem.field) == (str(path), line, field)
        assert message in problem.message
        assert str(problem) in str(raised.value)
    # --skip_invalid is suggested where it would help: when some records, not the whole file, are bad
    assert ("--skip_invalid" in str(raised.value)) == any(line is not None for line, _, _ in expected)


@pytest.mark.parametrize("name", sorted(MALFORMED_CASES))
def test_skip_invalid_keeps_the_good_examples(name: str, tokenizer: ChatGLMTokenizer):
    expected, kept = MALFORMED_CASES[name]
    path = MALFORMED_DIR / name
    if kept is None:
        with pytest.raises(DataValidationError):
            load_training_data(path, tokenizer, BOTH_LIMITS, skip_invalid=True, cache_dir=None)
        return
    data = load_training_data(path, tokenizer, BOTH_LIMITS, skip_invalid=True, cache_dir=None)
    assert data.dataset.num_rows == kept == data.summary.examples
    assert len(data.skipped) == len(expected)
    assert data.summary.skipped == len({line for line, _, _ in expected})


def test_error_message_names_file_line_record_and_field(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    records = [
        {"prompt": "a", "response": "b"},
        {"prompt": "c", "response": "d"},
        {"prompt": "e", "response": None},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    with pytest.raises(DataValidationError) as raised:
        load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)
    assert f"{path}:10 (record 2) field 'response': must be a string, got null" in str(raised.value)


def test_utf8_bom_is_accepted(tokenizer: ChatGLMTokenizer):
    data = load_training_data(MALFORMED_DIR / "utf8_bom.jsonl", tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)
    assert data.dataset.num_rows == 1 and data.skipped == []


def test_json_file_with_one_record_per_line_is_read_like_jsonl(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    path = tmp_path / "train.json"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n', encoding="utf-8")
    data = load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)
    assert data.dataset.num_rows == 2 and data.data_format == "input_output"


def test_explicit_format_overrides_detection(tokenizer: ChatGLMTokenizer, shared_dir: Path):
    path = shared_dir / "data" / "toolalpaca" / "expected_tool_alpaca.jsonl"
    with pytest.raises(DataValidationError) as raised:
        load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, data_format="input_output", cache_dir=None)
    assert [problem.line for problem in raised.value.problems] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="input_output data needs max_source_length"):
        load_training_data(path, tokenizer, EncodingLimits(max_seq_length=8), data_format="input_output")


def test_summary_reports_counts_truncation_and_percentiles(shared_dir: Path, tokenizer: ChatGLMTokenizer):
    path = shared_dir / "data" / "advertise_gen" / "expected_advertise_gen.jsonl"
    limits = EncodingLimits(max_source_length=40, max_target_length=150)
    data = load_training_data(path, tokenizer, limits, cache_dir=None)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lengths = [len(encode_input_output(record, tokenizer, 40, 150)["input_ids"]) for record in records]
    truncated = sum(
        len(tokenizer.encode(record["prompt"], add_special_tokens=False)) > 38
        or len(tokenizer.encode(record["response"], add_special_tokens=False)) > 150
        for record in records
    )
    summary = data.summary
    assert (summary.examples, summary.skipped, summary.truncated) == (28, 0, truncated)
    assert 0 < summary.truncation_rate < 1
    assert [summary.length_p50, summary.length_p90, summary.length_p99] == list(np.percentile(lengths, [50, 90, 99]))
    assert summary.length_max == max(lengths)
    labelled = [sum(label != -100 for label in labels) for labels in data.dataset["labels"][:]]
    assert summary.learned_max == max(labelled) <= 150 + 1
    assert data.dataset["length"][:] == lengths
    assert "28 examples (0 skipped)" in str(summary)


def test_conversation_file_loads_with_parallel_map_and_cache(
    shared_dir: Path, tmp_path: Path, tokenizer: ChatGLMTokenizer
):
    path = shared_dir / "data" / "toolalpaca" / "expected_tool_alpaca.jsonl"
    limits = EncodingLimits(max_seq_length=1024)
    plain = load_training_data(path, tokenizer, limits, cache_dir=None)
    parallel = load_training_data(path, tokenizer, limits, num_proc=2, cache_dir=tmp_path)
    assert plain.data_format == "conversations"
    assert parallel.dataset[:] == plain.dataset[:]
    cache_files = sorted(tmp_path.iterdir())
    assert cache_files and all(path.suffix == ".arrow" for path in cache_files)
    cached = load_training_data(path, tokenizer, limits, num_proc=2, cache_dir=tmp_path)
    assert {Path(entry["filename"]) for entry in cached.dataset.cache_files} <= set(cache_files)
    assert sorted(tmp_path.iterdir()) == cache_files
    assert cached.dataset[:] == plain.dataset[:]
    load_training_data(path, tokenizer, EncodingLimits(max_seq_length=1000), cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) > len(cache_files)


def test_sanity_check_prints_token_id_and_label(tokenizer: ChatGLMTokenizer):
    example = encode_input_output({"prompt": "类型#裙", "response": "红色"}, tokenizer, 8, 8)
    stream = io.StringIO()
    print_token_labels(example, tokenizer, stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + len(example["input_ids"])
    assert lines[1].split() == ["'[gMASK]'", "901", "-100"]
    assert lines[-1].split() == ["'</s>'", str(tokenizer.eos_token_id), str(tokenizer.eos_token_id)]


def test_a_long_problem_list_is_capped_with_a_count_per_kind(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    records = [{"prompt": "p"}] * 30 + [{"prompt": "p", "response": 3}] * 5 + [{"prompt": "p", "response": "r"}]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataValidationError) as raised:
        load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)
    message = str(raised.value)
    lines = message.splitlines()
    assert len(raised.value.problems) == 35
    assert lines[0].startswith(f"35 problems in the data (first: {path}:1 field 'response': ")
    assert sum(line.startswith(f"  {path}:") for line in lines) == 20
    assert lines[-2] == (
        "  ... and 15 more: 10 x field 'response': is missing; 5 x field 'response': must be a string, got number"
    )
    assert lines[-1] == SKIP_INVALID_ADVICE


def test_file_problems_and_skip_invalid_runs_do_not_suggest_skip_invalid(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    with pytest.raises(DataValidationError) as missing:
        load_training_data(tmp_path / "absent.jsonl", tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)
    assert str(missing.value) == f"a problem in the data: {tmp_path / 'absent.jsonl'}: file does not exist"
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}, {"prompt": "q"}])
    with pytest.raises(DataValidationError) as skipped:
        load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, skip_invalid=True, cache_dir=None)
    assert "--skip_invalid (where" not in str(skipped.value)
    assert str(skipped.value).endswith(
        "No valid example is left even with --skip_invalid: fix the records listed above."
    )


def test_raw_advertise_gen_data_is_sent_to_the_converter(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    path = write_jsonl(tmp_path / "train.json", [{"content": "类型#裙", "summary": "好看的裙子"}] * 2)  # as downloaded
    with pytest.raises(ValueError, match="convert it first: python -m data_tools.format_advertise_gen --train_file"):
        load_training_data(path, tokenizer, INPUT_OUTPUT_LIMITS, cache_dir=None)


def test_first_example_is_shown_as_text_with_the_learned_span_marked(tokenizer: ChatGLMTokenizer):
    example = encode_input_output({"prompt": "类型#裙", "response": "红色"}, tokenizer, 8, 8)
    stream = io.StringIO()
    print_learned_spans(example, tokenizer, stream)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "--print_token_table True" in lines[0]
    assert lines[1].endswith(">>>红色</s><<<") and "类型#裙" in lines[1].split(">>>")[0]


def test_misspelled_record_keys_are_warned_about_with_their_line(tmp_path: Path, tokenizer: ChatGLMTokenizer, caplog):
    records = [
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "lose": False},
                           {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello"}],
         "tool": [], "id": 7},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "keys.jsonl", records)
    with caplog.at_level("WARNING", logger="finetune.data.loading"):
        data = load_training_data(path, tokenizer, BOTH_LIMITS, cache_dir=None)
    assert len(data.dataset) == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert f"{path}:2 field 'conversations[1].lose': unknown key 'lose' is ignored; did you mean 'loss'?" in warnings
    assert f"{path}:2 field 'tool': unknown key 'tool' is ignored; did you mean 'tools'?" in warnings
    assert len(warnings) == 2  # "id" is no misspelling of a known key


def test_tools_on_a_system_message_must_be_a_list_there(tmp_path: Path, tokenizer: ChatGLMTokenizer):
    records = [
        {"conversations": [{"role": "system", "content": "s", "tools": {"name": "f"}},
                           {"role": "assistant", "content": "x"}]},
        {"conversations": [{"role": "user", "content": "u", "tools": []}, {"role": "assistant", "content": "x"}]},
    ]  # fmt: skip
    with pytest.raises(DataValidationError) as error:
        load_training_data(write_jsonl(tmp_path / "t.jsonl", records), tokenizer, BOTH_LIMITS, cache_dir=None)
    found = [(problem.line, problem.field, problem.message) for problem in error.value.problems]
    assert found == [
        (1, "conversations[0].tools", "tools belong to the system message, as a list; got object"),
        (2, "conversations[0].tools", "tools belong to the system message, as a list; got a user message"),
    ]
