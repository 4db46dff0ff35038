"""A checkpoint opened on another base than it was trained on is refused, by inference, evaluation, export, the
server and resume, unless --allow_other_base; the fingerprint in training_record.json is what tells the bases apart."""

import json
import logging
import shutil
from pathlib import Path

import pytest
from train_helpers import input_output_records, run_arguments, write_jsonl
from transformers import AutoModelForCausalLM

from finetune import evaluate
from finetune.base_fingerprint import base_fingerprint
from finetune.checkpoints import load_for_inference
from finetune.model.checkpoint_files import CheckpointError
from finetune.tiny_model import build_tiny_model
from finetune.train import main as train
from inference import chat_cli, export
from inference.serving_models import LoadOptions, load_served_models


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
    with caplog.at_level(logging.WARNING, logger="finetune.base_fingerprint"):
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
