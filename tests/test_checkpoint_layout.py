"""The checkpoint layout: checkpoint-N folders, DeepSpeed's `latest`, the training record."""

import json
from pathlib import Path

import pytest

from finetune.checkpoint_layout import (
    checkpoint_folder_name,
    checkpoint_folders,
    checkpoint_step,
    deepspeed_state_folder,
    read_training_record,
)
from finetune.model.checkpoint_files import CheckpointError


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
