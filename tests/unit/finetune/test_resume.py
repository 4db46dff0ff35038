"""finetune/resume.py: which checkpoint a run resumes from, when a checkpoint is complete, and whether it matches the
run's method (resumed training end to end: tests/e2e/test_train_resume.py)."""

import json
import shutil
from pathlib import Path

import pytest

from transformers import Seq2SeqTrainingArguments

from finetune.arguments import DataArguments, ModelArguments
from finetune.checkpoint_format import (
    DEEPSPEED_LATEST_FILE,
    INCOMPLETE_MARKER,
    TRAINING_RECORD,
    open_checkpoint,
    resume_problem,
)
from finetune.model.checkpoint_files import CheckpointError
from finetune.resume import (
    AUTORESUME_ENV,
    autoresume_from_environment,
    check_checkpoint_matches,
    check_resumed_data_and_processes,
    find_latest_checkpoint,
    resolve_resume_checkpoint,
    resume_requested,
)


def test_auto_resume_skips_staging_and_incomplete_folders(finished_run, tmp_path):
    complete = finished_run / "checkpoint-2"
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    shutil.copytree(complete, output_dir / "checkpoint-5")
    shutil.copytree(complete, output_dir / "tmp-checkpoint-9")
    shutil.copytree(complete, output_dir / "checkpoint-8")
    (output_dir / "checkpoint-8" / INCOMPLETE_MARKER).write_text("in progress")
    shutil.copytree(complete, output_dir / "checkpoint-7")
    (output_dir / "checkpoint-7" / "trainer_state.json").unlink()
    shutil.copytree(complete, output_dir / "checkpoint-6")
    weights = output_dir / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    (output_dir / "checkpoint-10").write_text("a file, not a folder")

    assert "trainer_state.json is missing" in resume_problem(output_dir / "checkpoint-7")
    assert "truncated" in resume_problem(output_dir / "checkpoint-6")
    assert INCOMPLETE_MARKER in resume_problem(output_dir / "checkpoint-8")
    latest = find_latest_checkpoint(output_dir).folder
    assert latest == output_dir / "checkpoint-5"
    assert "\\" not in str(latest)
    with pytest.raises(CheckpointError, match="cannot resume from this checkpoint: trainer_state.json is missing"):
        resolve_resume_checkpoint(str(output_dir / "checkpoint-7"), output_dir)
    assert resolve_resume_checkpoint(str(output_dir / "checkpoint-5"), output_dir).folder == output_dir / "checkpoint-5"


def test_autoresume_environment_variable(finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv(AUTORESUME_ENV, "True")
    assert resolve_resume_checkpoint(None, finished_run).folder == finished_run / "checkpoint-2"
    assert resolve_resume_checkpoint(None, tmp_path / "empty") is None
    monkeypatch.setenv(AUTORESUME_ENV, "false")
    assert resolve_resume_checkpoint(None, finished_run) is None
    monkeypatch.setenv(AUTORESUME_ENV, "maybe")
    with pytest.raises(ValueError, match=AUTORESUME_ENV):
        resolve_resume_checkpoint(None, finished_run)


def test_resume_refuses_a_checkpoint_of_another_method(finished_run, tiny_model_dir):
    checkpoint = resolve_resume_checkpoint(str(finished_run / "checkpoint-2"), finished_run)
    check_checkpoint_matches(checkpoint, ModelArguments(str(tiny_model_dir), pre_seq_len=4))
    with pytest.raises(CheckpointError, match="method='ptuning' but this run has method='lora'"):
        check_checkpoint_matches(checkpoint, ModelArguments(str(tiny_model_dir), lora_rank=4))
    with pytest.raises(CheckpointError, match="pre_seq_len=4 but this run has pre_seq_len=8"):
        check_checkpoint_matches(checkpoint, ModelArguments(str(tiny_model_dir), pre_seq_len=8))


@pytest.mark.parametrize(
    ("value", "environment", "requested"),
    [
        ("auto", "", True),
        (" Auto ", "false", True),
        ("output/checkpoint-4", "", True),
        ("false", "true", False),
        ("None", "", False),
        (None, "", False),
        ("", "ON", True),
        (None, " yes ", True),
        (None, "0", False),
    ],
)
def test_resume_requested_by_value_or_environment(value, environment, requested, monkeypatch):
    monkeypatch.setenv(AUTORESUME_ENV, environment)
    assert resume_requested(value) is requested


def test_autoresume_environment_unset_means_no(monkeypatch):
    monkeypatch.delenv(AUTORESUME_ENV, raising=False)
    assert autoresume_from_environment() is False
    assert resolve_resume_checkpoint("false", "anywhere") is None


def test_checkpoint_problems_name_what_is_missing_or_unknown(finished_run, tmp_path):
    assert resume_problem(tmp_path / "absent") == "no such folder"
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(finished_run / "checkpoint-2", folder)
    (folder / TRAINING_RECORD).unlink()
    assert resume_problem(folder) == f"{TRAINING_RECORD} is missing"
    record = json.loads((finished_run / "checkpoint-2" / TRAINING_RECORD).read_text(encoding="utf-8"))
    (folder / TRAINING_RECORD).write_text(json.dumps({**record, "method": "ia3"}), encoding="utf-8")
    assert "unknown fine-tuning method 'ia3'" in resume_problem(folder)
    (folder / TRAINING_RECORD).write_text("{not json", encoding="utf-8")
    assert TRAINING_RECORD in resume_problem(folder)


def test_deepspeed_state_counts_as_the_weights(finished_run, tmp_path):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(finished_run / "checkpoint-2", folder)
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        weights.unlink()
    assert resume_problem(folder) is not None
    (folder / DEEPSPEED_LATEST_FILE).write_text("global_step2\n", encoding="utf-8")
    assert resume_problem(folder) is not None
    (folder / "global_step2").mkdir()
    assert resume_problem(folder) is None
    assert find_latest_checkpoint(tmp_path).folder == folder


def test_another_format_or_process_count_is_noticed_and_refused_on_deepspeed_state(finished_run, tmp_path):
    checkpoint = shutil.copytree(finished_run / "checkpoint-2", tmp_path / "checkpoint-2")
    record = json.loads((checkpoint / TRAINING_RECORD).read_text(encoding="utf-8"))
    record["world_size"] = 2
    record["data_args"]["data_format"] = "input_output"  # as given with --data_format (or recorded when detected)
    (checkpoint / TRAINING_RECORD).write_text(json.dumps(record), encoding="utf-8")
    data_args = DataArguments(train_file=record["data_args"]["train_file"])
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    notices = check_resumed_data_and_processes(open_checkpoint(checkpoint), data_args, training_args, "conversations")
    assert [notice.split("which was ")[1].split(":")[0] for notice in notices] == [
        "trained on input_output data, now continues on conversations data",
        "trained with 2 process(es), now 1",
    ]
    (checkpoint / DEEPSPEED_LATEST_FILE).write_text("global_step2", encoding="utf-8")
    (checkpoint / "global_step2").mkdir()
    with pytest.raises(CheckpointError, match="DeepSpeed state is split over 2 process.* resume with 2 .NUM_GPUS=2"):
        check_resumed_data_and_processes(open_checkpoint(checkpoint), data_args, training_args, "input_output")


def test_resuming_reads_the_checkpoint_record_once(finished_run, tiny_model_dir, tmp_path, monkeypatch):
    reads = []
    read_text = Path.read_text

    def counted(path: Path, *args, **kwargs) -> str:
        if path.name == TRAINING_RECORD:
            reads.append(path.parent.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    checkpoint = resolve_resume_checkpoint("auto", finished_run)
    check_checkpoint_matches(checkpoint, ModelArguments(str(tiny_model_dir), pre_seq_len=4))
    train_file = checkpoint.record["data_args"]["train_file"]
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert check_resumed_data_and_processes(checkpoint, DataArguments(train_file=train_file), training_args, None) == []
    assert reads == ["checkpoint-2"]
