"""The checkpoint a run resumes from.

`--resume_from_checkpoint auto` (or the environment variable AUTORESUME_FROM_CHECKPOINT=True) picks the newest
COMPLETE `checkpoint-N` folder in output_dir (finetune.checkpoint_format.resume_problem says what complete is);
a `checkpoint-N` folder that still lacks its trainer state, training record or weights (copied in part, or written
by another tool) is skipped with a warning. The checkpoint's record must match the run's method, settings and base.
The chosen checkpoint is read once (finetune.checkpoint_format.read_resume_checkpoint) and checked from that read.
"""

import logging
import os
from pathlib import Path

from transformers import TrainingArguments

from finetune.arguments import DataArguments, ModelArguments
from finetune.checkpoint_format import (
    TRAINING_RECORD,
    Checkpoint,
    checkpoint_folders,
    deepspeed_state_folder,
    read_resume_checkpoint,
)
from finetune.methods import method_of
from finetune.model.checkpoint_files import CheckpointError

logger = logging.getLogger(__name__)

AUTORESUME_ENV = "AUTORESUME_FROM_CHECKPOINT"
AUTO = "auto"
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("", "0", "false", "no", "off", "none")


def autoresume_from_environment() -> bool:
    """True when AUTORESUME_FROM_CHECKPOINT is set to a true value (1/true/yes/on, any case)."""
    value = os.environ.get(AUTORESUME_ENV, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {AUTORESUME_ENV}={value!r}: use True or False")


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Checkpoint | None:
    """The complete checkpoint-N folder with the highest N in `output_dir`, read once, or None."""
    for _, folder in reversed(checkpoint_folders(Path(output_dir))):
        checkpoint, problem = read_resume_checkpoint(folder)
        if checkpoint is not None:
            return checkpoint
        logger.warning("not resuming from %s: %s", folder, problem)
    return None


def resume_requested(value: str | None) -> bool:
    """True when the run asks to resume: a checkpoint path, `auto`, or AUTORESUME_FROM_CHECKPOINT=True."""
    text = (value or "").strip().lower()
    if not text:
        return autoresume_from_environment()
    return text not in FALSE_VALUES


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint to resume from, read once: an explicit folder (checked), the newest complete one for `auto`,
    or None.

    With no value, AUTORESUME_FROM_CHECKPOINT=True means `auto`. `auto` with no complete checkpoint starts afresh.
    """
    if not resume_requested(value):
        return None
    text = (value or "").strip() or AUTO
    if text.lower() in (AUTO, "true"):
        checkpoint = find_latest_checkpoint(output_dir)
        if checkpoint is None:
            logger.info("auto-resume: no complete checkpoint in %s, starting from scratch", output_dir)
        else:
            logger.info("auto-resume: resuming from %s", checkpoint.folder)
        return checkpoint
    folder = Path(text)
    checkpoint, problem = read_resume_checkpoint(folder)
    if checkpoint is None:
        raise CheckpointError(
            f"{folder}: cannot resume from this checkpoint: {problem}; pass a complete checkpoint-N folder or "
            f"--resume_from_checkpoint {AUTO}"
        )
    return checkpoint


def check_checkpoint_matches(checkpoint: Checkpoint, model_args: ModelArguments) -> None:
    """Raise CheckpointError when a checkpoint was trained with another method or method settings than this run, or
    on another base than --model_name_or_path (unless --allow_other_base; Checkpoint.check_base)."""
    record = checkpoint.record or {}
    method = method_of(model_args)
    if record.get("method") != method.name:
        problem = f"the checkpoint has method={record.get('method')!r} but this run has method={method.name!r}"
    else:
        problem = method.settings_mismatch(checkpoint.settings, model_args)
    if problem is not None:
        raise CheckpointError(
            f"{checkpoint.folder / TRAINING_RECORD}: {problem}; resume with the checkpoint's settings or use a new "
            "output_dir"
        )
    checkpoint.check_base(model_args.model_name_or_path, model_args.allow_other_base)


def _same_file(recorded: str | None, current: str | None) -> bool:
    """True when two data-file arguments name the same file (or both name none)."""
    if not recorded or not current:
        return recorded == current
    return os.path.realpath(recorded) == os.path.realpath(current)


def check_resumed_data_and_processes(
    checkpoint: Checkpoint, data_args: DataArguments, training_args: TrainingArguments, data_format: str | None
) -> list[str]:
    """Notices for a training file, data format or process count other than the checkpoint's; CheckpointError for
    another process count when the checkpoint holds DeepSpeed's per-process optimizer state."""
    folder, record = checkpoint.folder, checkpoint.record or {}
    recorded_data = record.get("data_args") or {}
    recorded_format = record.get("data_format") or recorded_data.get("data_format")
    processes = record.get("world_size")
    if processes is not None and processes != training_args.world_size and deepspeed_state_folder(folder):
        raise CheckpointError(
            f"{folder}: its DeepSpeed state is split over {processes} process(es) but this run has "
            f"{training_args.world_size}; resume with {processes} (NUM_GPUS={processes}) or use a new output_dir"
        )
    notices = []
    if not _same_file(recorded_data.get("train_file"), data_args.train_file):
        notices.append(f"trained on {recorded_data.get('train_file')}, now continues on {data_args.train_file}")
    if recorded_format and data_format and recorded_format != data_format:
        notices.append(f"trained on {recorded_format} data, now continues on {data_format} data")
    if processes is not None and processes != training_args.world_size:
        notices.append(
            f"trained with {processes} process(es), now {training_args.world_size}: each step sees another number "
            "of rows and the resumed epoch skips rows by the new count"
        )
    return [f"notice: resuming from {folder}, which was {notice}" for notice in notices]
