"""finetune/checkpoint_format.py, the checkpoint contract: checkpoint-N folders, DeepSpeed's `latest`, the training
record (today's format and the one written before), opening a folder once, the base fingerprint (a checkpoint opened
on another base than it was trained on is refused by inference, evaluation, export, the server and resume, unless
--allow_other_base), and that nothing outside the methods and the contract branches on a checkpoint kind or a method
name."""

import ast
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
from checkpoint_builders import make_lora_checkpoint, make_prefix_checkpoint
from train_helpers import input_output_records, run_arguments, write_jsonl
from transformers import AutoModelForCausalLM

from finetune import evaluate
from finetune.arguments import DataArguments, ModelArguments
from finetune.checkpoint_format import (
    FORMAT_VERSION,
    base_fingerprint,
    build_training_record,
    checkpoint_folder_name,
    checkpoint_folders,
    checkpoint_step,
    deepspeed_state_folder,
    method_settings,
    open_checkpoint,
    read_training_record,
)
from finetune.checkpoints import load_for_inference
from finetune.methods import METHODS, method_named
from finetune.methods.base import CheckpointKind
from finetune.model.checkpoint_files import CheckpointError
from finetune.tiny_model import build_tiny_model
from finetune.train import main as train
from inference import chat_cli, export
from inference.serving_models import LoadOptions, load_served_models

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


# The base fingerprint: what tells the bases apart, and the one check every command makes with it.
@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A tiny model with the same config and tokenizer as tiny_model_dir but other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture
def checkpoint(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished P-Tuning run's checkpoint-2 (trained on tiny_model_dir)."""
    return Path(shutil.copytree(finished_run / "checkpoint-2", tmp_path / "checkpoint-2"))


def test_the_fingerprint_tells_bases_apart_but_not_copies(tiny_model_dir, other_base, reference_model_dir, tmp_path):
    tiny = base_fingerprint(tiny_model_dir)
    assert set(tiny) == {"config", "tokenizer", "weights"}
    other = base_fingerprint(other_base)
    assert (other["config"], other["tokenizer"]) == (tiny["config"], tiny["tokenizer"])
    assert other["weights"] != tiny["weights"]
    # The reference model is sharded .bin files; a safetensors copy of it has the same fingerprint.
    copy = tmp_path / "copy"
    AutoModelForCausalLM.from_pretrained(reference_model_dir).save_pretrained(copy)
    shutil.copy(reference_model_dir / "tokenizer.model", copy)
    assert base_fingerprint(copy) == base_fingerprint(reference_model_dir) != tiny
    assert base_fingerprint("THUDM/chatglm3-6b") is None  # a hub name: nothing local to read


def test_inference_evaluation_export_and_server_refuse_another_base(
    checkpoint, other_base, tiny_model_dir, tmp_path, capsys
):
    record = json.loads((checkpoint / "training_record.json").read_text(encoding="utf-8"))
    assert record["base_fingerprint"] == base_fingerprint(tiny_model_dir)
    expected = (
        f"{checkpoint}: was trained on base {tiny_model_dir.resolve()} but {other_base} is another model (its weights "
        "differ); pass the base it was trained on, or --allow_other_base to use this one anyway"
    )
    with pytest.raises(CheckpointError) as refused:
        load_for_inference(checkpoint, base=str(other_base), device="cpu")
    assert str(refused.value) == expected
    with pytest.raises(CheckpointError, match="--allow_other_base"):
        load_served_models([f"a={checkpoint}", f"b={checkpoint}"], LoadOptions(base=str(other_base)), 1)

    data = write_jsonl(tmp_path / "dev.jsonl", input_output_records(2))
    commands = {
        "inference": (chat_cli.main, ["--model", str(checkpoint), "--base", str(other_base), "--prompt", "hi"]),
        "evaluate": (evaluate.main, ["--model", str(checkpoint), "--base", str(other_base), "--data", str(data)]),
        "export": (export.main, ["--model", str(checkpoint), "--base", str(other_base), "--output_dir",
                                 str(tmp_path / "exported")]),
    }  # fmt: skip
    for name, (command, argv) in commands.items():
        capsys.readouterr()
        assert command([*argv, "--device", "cpu"] if name != "export" else argv) == 1, name
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {expected}"], name
    assert not (tmp_path / "exported").exists()

    assert export.main(
        ["--model", str(checkpoint), "--base", str(other_base), "--output_dir", str(tmp_path / "exported"),
         "--allow_other_base"]
    ) == 0  # fmt: skip
    model, _, _ = load_for_inference(checkpoint, base=str(other_base), device="cpu", allow_other_base=True)
    assert model.transformer.prefix_encoder is not None


def test_a_checkpoint_without_a_fingerprint_loads_with_a_notice(checkpoint, other_base, caplog):
    record_path = checkpoint / "training_record.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    del record["base_fingerprint"]
    record_path.write_text(json.dumps(record), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint_format"):
        load_for_inference(checkpoint, base=str(other_base), device="cpu")
    assert f"notice: {record_path} records no fingerprint of its base" in caplog.text


def test_resume_refuses_another_base_and_keeps_the_recorded_one(finished_run, tiny_model_dir, other_base, tmp_path):
    output_dir = Path(shutil.copytree(finished_run, tmp_path / "out"))
    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(8))
    argv = run_arguments(
        other_base, train_file, output_dir, tmp_path / "cache", pre_seq_len=4, max_steps=3,
        resume_from_checkpoint="auto",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match=r"checkpoint-2: was trained on base .* is another model"):
        train(argv)
    assert not (output_dir / "checkpoint-3").exists()
    record = json.loads((output_dir / "training_record.json").read_text(encoding="utf-8"))
    assert record["base_model"] == str(tiny_model_dir.resolve())


def test_resume_on_another_data_file_gives_a_notice(finished_run, tiny_model_dir, tmp_path, caplog):
    output_dir = Path(shutil.copytree(finished_run, tmp_path / "out"))
    other_data = write_jsonl(tmp_path / "other.jsonl", input_output_records(6))
    argv = run_arguments(
        tiny_model_dir, other_data, output_dir, tmp_path / "cache", pre_seq_len=4, max_steps=3,
        resume_from_checkpoint="auto",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="finetune.train"):
        train(argv)
    notices = [record.getMessage() for record in caplog.records if record.getMessage().startswith("notice:")]
    assert len(notices) == 1 and f"now continues on {other_data}" in notices[0]
    assert (output_dir / "checkpoint-3").is_dir()


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
