"""The on-disk checkpoint layout: every file and folder name a checkpoint uses, and its training record.

A run's output_dir holds `checkpoint-N` folders (each written as `tmp-checkpoint-N` and renamed once complete) and,
at the end, the final model files (staged in `tmp-final`). Every folder holds training_record.json, written last.
What else a folder holds depends on the method that wrote it (finetune/methods/):
  ptuning      config.json (with pre_seq_len/prefix_projection) + model.safetensors holding only
               transformer.prefix_encoder.* + the same as the official pytorch_model.bin (unless --no_save_official_bin)
  lora, qlora  the PEFT adapter: adapter_config.json + adapter_model.safetensors
  full, freeze the whole model (save_pretrained, safetensors) + tokenizer files
A DeepSpeed run also writes `latest`, naming the `global_stepN` folder that holds its own copy of the state.
This module is the only place these names are spelled; the trainer, resume, inference and the server read them here.
"""

import enum
import re
from pathlib import Path

from finetune.model.checkpoint_files import CheckpointError, read_json_file

FORMAT_VERSION = 1
TRAINING_RECORD = "training_record.json"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX_SAFETENSORS = "model.safetensors"
PREFIX_OFFICIAL_BIN = "pytorch_model.bin"
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DEEPSPEED_LATEST_FILE = "latest"
# Written by transformers' just-in-time (SIGTERM) checkpointing while a save is under way.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_DIR_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
STAGING_PREFIX = "tmp-"
FINAL_STAGING_NAME = STAGING_PREFIX + "final"


class CheckpointKind(enum.Enum):
    """How inference loads a checkpoint folder."""

    PREFIX = "ptuning"  # P-Tuning v2 prefix weights on top of a base model
    LORA = "lora"  # a PEFT adapter on top of a base model
    FULL = "full"  # a whole model written by fine-tuning (full or freeze)
    BASE = "base"  # any other whole model: the official chatglm3-6b, an exported model


def checkpoint_folder_name(step: int) -> str:
    """The folder name of the checkpoint saved at `step`: checkpoint-N."""
    return f"{CHECKPOINT_PREFIX}-{step}"


def checkpoint_step(folder: Path) -> int | None:
    """N of a folder named checkpoint-N, else None."""
    match = CHECKPOINT_DIR_PATTERN.match(folder.name)
    return int(match.group(1)) if match else None


def checkpoint_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """The (step, folder) of every checkpoint-N folder in `run_dir`, by step."""
    if not run_dir.is_dir():
        return []
    return sorted(
        (step, child) for child in run_dir.iterdir() if (step := checkpoint_step(child)) is not None and child.is_dir()
    )


def first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` that is a file in `folder`, or None."""
    return next((folder / name for name in names if (folder / name).is_file()), None)


def deepspeed_state_folder(folder: Path) -> Path | None:
    """The global_stepN folder DeepSpeed's `latest` file names in a checkpoint, when both are there."""
    latest = folder / DEEPSPEED_LATEST_FILE
    if not latest.is_file():
        return None
    state = folder / latest.read_text(encoding="utf-8").strip()
    return state if state.is_dir() else None


def read_training_record(folder: str | Path) -> dict | None:
    """The folder's training_record.json, or None when it has none."""
    record_path = Path(folder) / TRAINING_RECORD
    if not record_path.is_file():
        return None
    record = read_json_file(record_path)
    if not isinstance(record, dict) or "method" not in record:
        raise CheckpointError(f"{record_path}: not a training record (expected an object with a 'method' field)")
    return record
