"""finetune/data/formats/: the registry of data formats. A format added as one module of its own is detected,
validated (errors with file, line and field), encoded, trained on, split for evaluation and bounded by the memory
preflight through the normal paths, with no other file touched (the format: conftest.py's `alpaca_format` here)."""

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_helpers import PROMPTS, RESPONSES, run_arguments, write_jsonl

from finetune.data import formats
from finetune.data.encoding import IGNORE_INDEX, text_ids
from finetune.data.formats.base import EncodingLimits
from finetune.data.loading import load_training_data
from finetune.data.records import DataValidationError
from finetune.evaluate import read_checked_records
from finetune.memory_preflight import longest_row
from finetune.train import main as train_main

REPO_ROOT = Path(__file__).resolve().parents[4]
# Files that may name a data format: the formats themselves and the encoding functions they share.
FORMAT_OWNERS = ("finetune/data/formats/", "finetune/data/encoding.py")
FORMAT_CONSTANTS = ("INPUT_OUTPUT", "CONVERSATIONS")


def alpaca_records(count: int) -> list[dict]:
    """`count` Alpaca records cycling through the fixed texts."""
    return [
        {"instruction": PROMPTS[i % len(PROMPTS)], "input": "", "output": RESPONSES[i % len(RESPONSES)]}
        for i in range(count)
    ]


def test_built_in_formats_are_detected_and_checked_by_the_registry():
    assert formats.format_names() == ("conversations", "input_output")
    assert formats.format_of({"prompt": "a", "response": "b"}).name == "input_output"
    assert formats.format_of({"conversations": []}).name == "conversations"
    assert formats.format_of({"text": "a"}) is None and formats.format_of(["a"]) is None
    with pytest.raises(ValueError, match="unknown data format 'alpaca'; expected one of"):
        formats.format_named("alpaca")


def test_a_format_in_its_own_module_trains_and_evaluates_through_the_normal_path(
    alpaca_format, tiny_model_dir, tiny_tokenizer, tmp_path
):
    limits = EncodingLimits(max_source_length=48, max_target_length=48)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*alpaca_records(2), {"instruction": "x", "output": 3}])
    with pytest.raises(DataValidationError) as error:
        load_training_data(bad, tiny_tokenizer, limits, cache_dir=None)
    assert f"{bad}:3 field 'output': must be a string, got number" in str(error.value)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*alpaca_records(1), {"prompt": "a", "response": "b"}])
    with pytest.raises(DataValidationError, match=r"mixed.jsonl:2: record is in input-output format but the data is Alp"):
        load_training_data(mixed, tiny_tokenizer, limits, cache_dir=None)

    train_file = write_jsonl(tmp_path / "train.jsonl", alpaca_records(4))
    data = load_training_data(train_file, tiny_tokenizer, limits, cache_dir=tmp_path / "cache")
    assert data.data_format == "alpaca" and len(data.dataset) == 4
    first = data.dataset[0]
    learned = [token for token in first["labels"] if token != IGNORE_INDEX]
    assert learned == text_ids(tiny_tokenizer, RESPONSES[0]) + [tiny_tokenizer.eos_token_id]

    argv = run_arguments(tiny_model_dir, train_file, tmp_path / "out", tmp_path / "cache", lora_rank=4, max_steps=1)
    run = train_main(argv)
    assert run.trainer.state.global_step == 1
    record = json.loads((tmp_path / "out" / "training_record.json").read_text(encoding="utf-8"))
    assert record["data_args"]["data_format"] == "alpaca"

    records = read_checked_records(train_file, reference_from_record=True, data_format="alpaca")
    examples = formats.evaluation_examples(records, tiny_tokenizer, max_source_length=48)
    assert [(example.prompt, example.label) for example in examples[:2]] == list(zip(PROMPTS[:2], RESPONSES[:2]))
    assert examples[0].prompt_ids == first["input_ids"][: first["labels"].index(learned[0])]

    bounds = SimpleNamespace(max_source_length=48, max_target_length=16, max_seq_length=32, data_format="alpaca")
    assert longest_row(bounds) == 65


def _names_a_format(node: ast.expr) -> bool:
    """True for a registered format's name (also a key that detects it), a format constant, or a collection of one."""
    if isinstance(node, ast.Constant):
        detecting = {key for name in formats.format_names() for key in formats.format_named(name).detected_by}
        return node.value in {*formats.format_names(), *detecting}
    if isinstance(node, ast.Name):
        return node.id in FORMAT_CONSTANTS
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_format(element) for element in node.elts)
    return False


def format_branches(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """Comparisons with a format's name or detecting key and uses of the format constants in one file, "file:line"."""
    found = []
    relative = path.relative_to(root).as_posix()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare) and any(_names_a_format(item) for item in (node.left, *node.comparators)):
            found.append(f"{relative}:{node.lineno} compares with a data format")
        if isinstance(node, ast.ImportFrom) and any(alias.name in FORMAT_CONSTANTS for alias in node.names):
            found.append(f"{relative}:{node.lineno} imports a format constant")
    return found


def test_nothing_outside_the_formats_branches_on_a_format():
    sources = [REPO_ROOT / "inference.py", *sorted((REPO_ROOT / "scripts").glob("*.py"))]
    for package in ("finetune", "inference", "data_tools"):
        sources += sorted((REPO_ROOT / package).rglob("*.py"))
    checked = [path for path in sources if not path.relative_to(REPO_ROOT).as_posix().startswith(FORMAT_OWNERS)]
    assert len(checked) > 30
    assert [branch for path in checked for branch in format_branches(path)] == []


def test_the_format_branch_finder_sees_a_name_a_key_and_a_constant(tmp_path):
    probe = tmp_path / "pairs.py"
    probe.write_text(
        "from finetune.data.encoding import INPUT_OUTPUT\n"
        'if "conversations" in value or layout == INPUT_OUTPUT or name in ("x", "input_output"):\n    pass\n'
    )
    assert len(format_branches(probe, root=tmp_path)) == 4
