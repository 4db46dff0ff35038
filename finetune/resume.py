"""The checkpoint a run resumes from.

`--resume_from_checkpoint auto` (or the environment variable AUTORESUME_FROM_CHECKPOINT=True) picks the newest
COMPLETE `checkpoint-N` folder in output_dir. Checkpoints are written into `tmp-checkpoint-N` and renamed when done,
so staging folders never match; a `checkpoint-N` folder that still lacks its trainer state, training record or
weights (copied in part, or written by another tool) is skipped with a warning.
"""

import logging
import os
import re
from pathlib import Path

from finetune.arguments import METHOD_FULL, METHOD_PTUNING, ModelArguments
from finetune.checkpoints import ADAPTER_CONFIG, TRAINING_RECORD
from finetune.model.checkpoint_files import CheckpointError, check_weight_file, read_json_file, weight_files
from finetune.model.prefix_checkpoint import find_prefix_weights

logger = logging.getLogger(__name__)

AUTORESUME_ENV = "AUTORESUME_FROM_CHECKPOINT"
AUTO = "auto"
TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("", "0", "false", "no", "off", "none")
CHECKPOINT_DIR_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
DEEPSPEED_LATEST_FILE = "latest"
# Written by transformers' just-in-time (SIGTERM) checkpointing while a save is under way.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"


def autoresume_from_environment() -> bool:
    """True when AUTORESUME_FROM_CHECKPOINT is set to a true value (1/true/yes/on, any case)."""
    value = os.environ.get(AUTORESUME_ENV, "").strip().lower()
    if value in TRUE_VALUES:
        return True
    if value in FALSE_VALUES:
        return False
    raise ValueError(f"environment variable {AUTORESUME_ENV}={value!r}: use True or False")


def checkpoint_step(folder: Path) -> int | None:
    """N of a folder named checkpoint-N, else None."""
    match = CHECKPOINT_DIR_PATTERN.match(folder.name)
    return int(match.group(1)) if match else None


def _weights_problem(folder: Path, method: str) -> str | None:
    """Why the folder's model weights for `method` are missing or broken, or None."""
    latest = folder / DEEPSPEED_LATEST_FILE
    if latest.is_file() and (folder / latest.read_text(encoding="utf-8").strip()).is_dir():
        return None
    if method == METHOD_PTUNING:
        path = find_prefix_weights(folder)
        paths = [path] if path else []
    elif method == METHOD_FULL:
        paths = weight_files(folder)
    else:
        if not (folder / ADAPTER_CONFIG).is_file():
            return f"{ADAPTER_CONFIG} is missing"
        paths = [folder / ADAPTER_WEIGHTS_FILE]
    if not paths:
        return f"no model weights for method {method!r}"
    for path in paths:
        check_weight_file(path)
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete training checkpoint, or None when training can resume from it."""
    if not folder.is_dir():
        return "no such folder"
    if (folder / INCOMPLETE_MARKER).exists():
        return f"{INCOMPLETE_MARKER} is present: its save did not finish"
    for name in (TRAINER_STATE_FILE, TRAINING_RECORD):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        read_json_file(folder / TRAINER_STATE_FILE)
        record = read_json_file(folder / TRAINING_RECORD)
        return _weights_problem(folder, str(record.get("method")))
    except CheckpointError as error:
        return str(error)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint-N folder with the highest N in `output_dir`, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = sorted((step, child) for child in output_dir.iterdir() if (step := checkpoint_step(child)) is not None)
    for _, folder in reversed(candidates):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("not resuming from %s: %s", folder, problem)
    return None


def resume_requested(value: str | None) -> bool:
    """True when the run asks to resume: a checkpoint path, `auto`, or AUTORESUME_FROM_CHECKPOINT=True."""
    text = (value or "").strip().lower()
    if not text:
        return autoresume_from_environment()
    return text not in FALSE_VALUES


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: an explicit folder (checked), the newest complete one for `auto`, or None.

    With no value, AUTORESUME_FROM_CHECKPOINT=True means `auto`. `auto` with no complete checkpoint starts afresh.
    """
    if not resume_requested(value):
        return None
    text = (value or "").strip() or AUTO
    if text.lower() in (AUTO, "true"):
        folder = find_latest_checkpoint(output_dir)
        if folder is None:
            logger.info("auto-resume: no complete checkpoint in %s, starting from scratch", output_dir)
        else:
            logger.info("auto-resume: resuming from %s", folder)
        return folder
    folder = Path(text)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(
            f"{folder}: cannot resume from this checkpoint: {problem}; pass a complete checkpoint-N folder or "
            f"--resume_from_checkpoint {AUTO}"
        )
    return folder


def check_checkpoint_matches(folder: Path, model_args: ModelArguments) -> None:
    """Raise CheckpointError when a checkpoint was trained with another method or method settings than this run."""
    record = read_json_file(folder / TRAINING_RECORD)
    expected = {
        "method": model_args.method,
        "pre_seq_len": model_args.pre_seq_len,
        "prefix_projection": model_args.prefix_projection,
    }
    for key, value in expected.items():
        if record.get(key) != value:
            raise CheckpointError(
                f"{folder / TRAINING_RECORD}: the checkpoint has {key}={record.get(key)!r} but this run has "
                f"{key}={value!r}; resume with the checkpoint's settings or use a new output_dir"
            )
    lora = record.get("lora")
    if lora is not None and (lora.get("rank"), lora.get("target_modules")) != (
        model_args.lora_rank,
        model_args.lora_target_modules,
    ):
        raise CheckpointError(
            f"{folder / TRAINING_RECORD}: the checkpoint's LoRA rank/targets are {lora.get('rank')}/"
            f"{lora.get('target_modules')} but this run has {model_args.lora_rank}/{model_args.lora_target_modules}; "
            "resume with the checkpoint's settings or use a new output_dir"
        )
