"""finetune/checkpoint_format.py, the checkpoint contract: checkpoint-N folders, DeepSpeed's `latest`, the training
record (today's format and the one written before), opening a folder once, and that nothing outside the methods and
the contract branches on a checkpoint kind or a method name."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
from checkpoint_builders import make_lora_checkpoint, make_prefix_checkpoint

from finetune.arguments import DataArguments, ModelArguments
from finetune.checkpoint_format import (
    FORMAT_VERSION,
    build_training_record,
    checkpoint_folder_name,
    checkpoint_folders,
    checkpoint_step,
    deepspeed_state_folder,
    method_settings,
    open_checkpoint,
    read_training_record,
)
from finetune.methods import METHODS, method_named
from finetune.methods.base import CheckpointKind
from finetune.model.checkpoint_files import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_checkpoint_folders_are_found_by_step(tmp_path: Path):
    for name in ("checkpoint-10", "checkpoint-2", "tmp-checkpoint-12", "checkpoint-x", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-7").write_text("a file, not a checkpoint")
    assert checkpoint_folder_name(12) == "checkpoint-12" and checkpoint_step(tmp_path / "checkpoint-12") == 12
    assert checkpoint_step(tmp_path / "tmp-checkpoint-12") is None
    assert checkpoint_folders(tmp_path) == [(2, tmp_path / "checkpoint-2"), (10, tmp_path / "checkpoint-10")]
    assert checkpoint_folders(tmp_path / "absent") == []


def test_deepspeed_state_folder_follows_latest(tmp_path: Path):
    assert deepspeed_state_folder(tmp_path) is None
    (tmp_path / "latest").write_text("global_step4\n")
    assert deepspeed_state_folder(tmp_path) is None  # named but missing
    (tmp_path / "global_step4").mkdir()
    assert deepspeed_state_folder(tmp_path) == tmp_path / "global_step4"


def test_training_record_is_read_and_checked(tmp_path: Path):
    assert read_training_record(tmp_path) is None
    (tmp_path / "training_record.json").write_text(json.dumps({"method": "lora", "global_step": 3}))
    assert read_training_record(tmp_path)["method"] == "lora"
    (tmp_path / "training_record.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a training record"):
        read_training_record(tmp_path)


# What records of format 1 (written before the method's settings moved under its name) hold, and what they mean.
FORMAT_1_RECORDS = {
    "ptuning": ({"pre_seq_len": 8, "prefix_projection": True, "lora": None}, {"pre_seq_len": 8, "prefix_projection": True}),
    "lora": (
        {"pre_seq_len": None, "prefix_projection": False, "lora": {"rank": 4, "alpha": 32, "dropout": 0.1,
                                                                  "target_modules": ["dense"]}},
        {"rank": 4, "alpha": 32, "dropout": 0.1, "target_modules": ["dense"]},
    ),
    "dora": (
        {"lora": {"rank": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["dense"], "use_dora": True}},
        {"rank": 2, "alpha": 8, "dropout": 0.0, "target_modules": ["dense"], "use_dora": True},
    ),
    "freeze": ({"pre_seq_len": None, "lora": None, "trainable_layers": 2}, {"trainable_layers": 2}),
    "full": ({"pre_seq_len": None, "lora": None}, {}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(FORMAT_1_RECORDS))
def test_method_settings_are_read_from_format_1_records(name):
    fields, settings = FORMAT_1_RECORDS[name]
    record = {"format_version": 1, "method": name, "base_model": "/base", **fields}
    assert method_settings(record, method_named(name)) == settings


@pytest.mark.parametrize(
    ("flags", "settings"),
    [
        ({"pre_seq_len": 4}, {"pre_seq_len": 4, "prefix_projection": False}),
        ({"method": "dora", "lora_rank": 2}, {"rank": 2, "alpha": 32, "dropout": 0.1, "use_dora": True}),
        ({"trainable_layers": 1}, {"trainable_layers": 1}),
    ],
)
def test_a_record_keeps_its_method_settings_under_the_method_name(flags, settings, tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), **flags)
    record = build_training_record(model_args, DataArguments(), {}, global_step=3)
    method = record["method"]
    assert record["format_version"] == FORMAT_VERSION == 2
    assert {key: record[method][key] for key in settings} == settings
    assert not {"pre_seq_len", "prefix_projection", "trainable_layers", "lora"} - {method} & set(record)
    assert method_settings(json.loads(json.dumps(record)), method_named(method)) == record[method]


def test_opening_a_checkpoint_reads_it_into_one_read_only_object(tiny_model_dir, tmp_path):
    make_lora_checkpoint(tiny_model_dir, tmp_path / "lora")
    checkpoint = open_checkpoint(tmp_path / "lora")
    assert (checkpoint.kind, checkpoint.method.name, checkpoint.needs_base) == (CheckpointKind.LORA, "lora", True)
    assert checkpoint.base == str(tiny_model_dir) and checkpoint.base_source == tmp_path / "lora" / "training_record.json"
    assert checkpoint.settings == {"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query_key_value"]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        checkpoint.method = None
    with pytest.raises(TypeError):
        checkpoint.record["method"] = "full"
    (tmp_path / "lora" / "training_record.json").unlink()
    without_record = open_checkpoint(tmp_path / "lora")
    assert without_record.method.name == "lora" and without_record.record is None
    assert without_record.base_source == tmp_path / "lora" / "adapter_config.json"
    base = open_checkpoint(tiny_model_dir)
    assert (base.kind, base.method, base.record, base.base, base.settings) == (CheckpointKind.BASE, None, None, None, {})


def test_opening_names_the_file_and_what_is_wrong(tiny_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        open_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="not a checkpoint: expected adapter_config.json"):
        open_checkpoint(tmp_path)
    make_prefix_checkpoint(tiny_model_dir, tmp_path / "prefix")
    (tmp_path / "prefix" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"training_record.json says method 'ptuning' but .* incomplete"):
        open_checkpoint(tmp_path / "prefix")


# Files that may name checkpoint kinds and methods: the methods themselves and the checkpoint contract; and
# scripts/bench_real_size.py, whose stages are named after the method whose training command (with that method's own
# flags, as a user types it) they run.
KIND_AND_METHOD_OWNERS = ("finetune/methods/", "finetune/checkpoint_format.py", "scripts/bench_real_size.py")


def _names_a_method(node: ast.expr) -> bool:
    """True for a method-name string, a METHOD_* constant, or a tuple/list/set holding one."""
    if isinstance(node, ast.Constant):
        return node.value in METHODS
    if isinstance(node, ast.Name):
        return node.id.startswith("METHOD_")
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_method(element) for element in node.elts)
    return False


def kind_or_method_branches(path: Path, root: Path = REPO_ROOT) -> list[str]:
    """`CheckpointKind.X` uses and comparisons with a method name in one source file, as "file:line"."""
    found = []
    relative = path.relative_to(root).as_posix()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        kind_member = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if kind_member and node.value.id == "CheckpointKind":
            found.append(f"{relative}:{node.lineno} CheckpointKind.{node.attr}")
        if isinstance(node, ast.Compare):
            if any(_names_a_method(operand) for operand in (node.left, *node.comparators)):
                found.append(f"{relative}:{node.lineno} compares with a method name")
    return found


def test_nothing_outside_the_methods_and_the_contract_branches_on_a_kind_or_a_method():
    sources = [REPO_ROOT / "inference.py", *sorted((REPO_ROOT / "scripts").glob("*.py"))]
    for package in ("finetune", "inference", "data_tools"):
        sources += sorted((REPO_ROOT / package).rglob("*.py"))
    checked = [path for path in sources if not path.relative_to(REPO_ROOT).as_posix().startswith(KIND_AND_METHOD_OWNERS)]
    assert len(checked) > 30
    assert [branch for path in checked for branch in kind_or_method_branches(path)] == []


def test_the_branch_finder_sees_a_kind_and_a_method_name(tmp_path):
    probe = tmp_path / "server.py"
    probe.write_text('if kind is CheckpointKind.LORA or method.name in ("ptuning", "x") or name != METHOD_FULL:\n    pass\n')
    assert len(kind_or_method_branches(probe, root=tmp_path)) == 3
