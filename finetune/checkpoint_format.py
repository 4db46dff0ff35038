"""The checkpoint contract: what a checkpoint folder holds, how it is written, and how it is opened.

Layout. A run's output_dir holds `checkpoint-N` folders, each written as `tmp-checkpoint-N` and renamed once
complete, and at the end the final model files, staged in `tmp-final` and moved in with training_record.json last.
Every folder a run writes holds:
  training_record.json  the record (below), written last
  trainer_state.json    Trainer's state (checkpoint-N only), with optimizer.pt, scheduler.pt, rng_state*.pth and
                        scaler.pt unless --save_only_model
  latest + global_stepN/  under DeepSpeed: `latest` names the folder holding DeepSpeed's own (per-process) state
and the files of the method that wrote it (each method module names its own files):
  ptuning      config.json (pre_seq_len, prefix_projection) + model.safetensors holding only
               transformer.prefix_encoder.*, and the same as the official pytorch_model.bin (finetune.methods.ptuning)
  lora, qlora, dora  PEFT's adapter_config.json + adapter_model.safetensors (finetune.methods.lora)
  full, freeze the whole model (save_pretrained, safetensors) + tokenizer files
The names of a transformers model folder (config.json, model.safetensors, the shard index) are
finetune.model.checkpoint_files'; `checkpoint-is-incomplete.txt` marks a save transformers left unfinished.

Record (training_record.json, format 2), one JSON object:
  format_version 2; method (a name of finetune.methods.METHODS); base_model (absolute path of a local base, else its
  hub name); base_fingerprint (below); world_size (training processes); quantization_bit and
  quantization (finetune.quantization); METHOD: that method's own settings under its name, e.g.
  "ptuning": {"pre_seq_len", "prefix_projection"}, "lora"/"qlora": {"rank", "alpha", "dropout", "target_modules"},
  "dora": the same + "use_dora", "freeze": {"trainable_layers"}, "full": {}; model_args, data_args, training_args
  (the run's arguments); global_step; and what a training stage adds (preference tuning: "preference").
Format 1 (written before) kept pre_seq_len, prefix_projection and trainable_layers at the top level and LoRA's
settings under "lora"; method_settings reads both.

To add a record field: add it in build_training_record (or, for a method's setting, in that method's record_fields
and setting_names), and read it through a Checkpoint's `record` (or `settings`).

Base fingerprint. base_fingerprint(base) holds three digests of the base a run trains on: the config fields that
shape the network, the tokenizer's SentencePiece model, and a sample of the weights (the first values of a few
tensors spread over the checkpoint, read lazily from safetensors or memory-mapped .bin files, rounded to bfloat16 so
that a float16 and a bfloat16 copy of one base agree); it costs a few megabytes of reading even for a 12 GB base.
Checkpoint.check_base is the one check, made wherever a checkpoint is opened on a base (inference, evaluation,
export, the server, resume), that the base given now is the one fingerprinted.

Opening: open_checkpoint(folder) reads the folder once (its record, which method's files it holds, the base it
names) and returns a Checkpoint that training, evaluation, inference, export and the server use; a run resumes
from the Checkpoint read_resume_checkpoint returns (trainer state and DeepSpeed state checked too).
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from safetensors import safe_open
from torch import nn

from finetune.atomic_files import write_json_atomically
from finetune.arguments import DataArguments, ModelArguments
from finetune.methods import FinetuneMethod, method_named, method_of, recognise_checkpoint
from finetune.methods.base import Attachment, CheckpointKind
from finetune.model.checkpoint_files import (
    CONFIG_FILE,
    SHARD_INDEX_NAMES,
    CheckpointError,
    read_json_file,
    weight_files,
    weight_keys,
)
from finetune.model.configuration import ChatGLMConfig
from finetune.quantization import quantization_record, recorded_bits

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
TRAINING_RECORD = "training_record.json"
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.model"
DEEPSPEED_LATEST_FILE = "latest"
# Written by transformers' just-in-time (SIGTERM) checkpointing while a save is under way.
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_DIR_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
STAGING_PREFIX = "tmp-"
FINAL_STAGING_NAME = STAGING_PREFIX + "final"
BASE_FINGERPRINT_FIELD = "base_fingerprint"
ALLOW_OTHER_BASE_FLAG = "--allow_other_base"
# config.json fields that decide the network's shape and arithmetic (not names, dtypes or method settings).
SHAPE_FIELDS = (
    "hidden_size", "num_layers", "ffn_hidden_size", "kv_channels", "num_attention_heads", "multi_query_attention",
    "multi_query_group_num", "padded_vocab_size", "seq_length", "rope_ratio", "original_rope", "rmsnorm",
    "layernorm_epsilon", "add_qkv_bias", "add_bias_linear", "post_layer_norm",
    "apply_residual_connection_post_layernorm",
)  # fmt: skip
# Buffers the official files hold and this project's saves leave out (they are computed, not trained).
COMPUTED_TENSOR_SUFFIXES = (".inv_freq",)
SAMPLED_TENSORS = 4
SAMPLED_VALUES = 1024
FINGERPRINT_PARTS = ("config", "tokenizer", "weights")


# ---- folders of a run -----------------------------------------------------------------------------------------------


def checkpoint_folder_name(step: int) -> str:
    """The folder name of the checkpoint saved at `step`: checkpoint-N."""
    return f"{CHECKPOINT_PREFIX}-{step}"


def staging_folder(final: Path) -> Path:
    """The folder a checkpoint is written into before it is renamed to `final`: tmp-checkpoint-N beside it."""
    return final.parent / f"{STAGING_PREFIX}{final.name}"


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


def deepspeed_state_folder(folder: Path) -> Path | None:
    """The global_stepN folder DeepSpeed's `latest` file names in a checkpoint, when both are there."""
    latest = folder / DEEPSPEED_LATEST_FILE
    if not latest.is_file():
        return None
    state = folder / latest.read_text(encoding="utf-8").strip()
    return state if state.is_dir() else None


def move_files_into(staging: Path, target: Path, last: str = TRAINING_RECORD) -> None:
    """Move every entry of `staging` into `target` (each move atomic), the entry named `last` at the end."""
    entries = sorted(staging.iterdir(), key=lambda entry: (entry.name == last, entry.name))
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir() and destination.is_dir():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()


# ---- the record -----------------------------------------------------------------------------------------------------


def read_training_record(folder: str | Path) -> dict | None:
    """The folder's training_record.json, or None when it has none: the one place the record is read."""
    record_path = Path(folder) / TRAINING_RECORD
    if not record_path.is_file():
        return None
    record = read_json_file(record_path)
    if not isinstance(record, dict) or "method" not in record:
        raise CheckpointError(f"{record_path}: not a training record (expected an object with a 'method' field)")
    return record


def base_model_reference(model_name_or_path: str) -> str:
    """The base model as recorded: an absolute path for a local folder, else the name as given."""
    path = Path(model_name_or_path)
    return str(path.resolve()) if path.exists() else model_name_or_path


def build_training_record(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args_dict: dict,
    global_step: int,
    base: dict | None = None,
    world_size: int | None = None,
) -> dict:
    """The content of training_record.json for a checkpoint saved at `global_step`; `base` is the base model's
    fingerprint (base_fingerprint), `world_size` the number of training processes."""
    method = method_of(model_args)
    return {
        "format_version": FORMAT_VERSION,
        "method": method.name,
        "base_model": base_model_reference(model_args.model_name_or_path),
        BASE_FINGERPRINT_FIELD: base,
        "world_size": world_size,
        "quantization_bit": model_args.quantization_bit,
        "quantization": quantization_record(model_args.quantization_bit),
        method.name: method.record_fields(model_args),
        "model_args": dataclasses.asdict(model_args),
        "data_args": dataclasses.asdict(data_args),
        "training_args": training_args_dict,
        "global_step": global_step,
    }


def write_training_record(folder: Path, record: dict) -> None:
    """Write training_record.json into `folder`, atomically."""
    write_json_atomically(folder / TRAINING_RECORD, record)


def method_settings(record: Mapping, method: FinetuneMethod) -> dict:
    """The method's own settings in a record: under its name (format 2), else where format 1 kept them."""
    if method.name in record:
        return dict(record[method.name] or {})
    flat = {**record, **(record.get("lora") or {})}
    return {name: flat[name] for name in method.setting_names if name in flat}


# ---- the base fingerprint -------------------------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    """A short hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()[:16]


def _canonical(value: object) -> object:
    """A config value as compared: numbers as floats (a saved 1 and 1.0 agree)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def config_digest(folder: Path) -> str:
    """Digest of the config fields in SHAPE_FIELDS (absent ones take ChatGLMConfig's defaults, as loading does)."""
    config = {**ChatGLMConfig().to_dict(), **read_json_file(folder / CONFIG_FILE)}
    shape = {name: _canonical(config.get(name)) for name in SHAPE_FIELDS}
    return _digest(json.dumps(shape, sort_keys=True).encode())


def tensor_files(folder: Path) -> dict[str, Path]:
    """Every tensor name of a model folder and the weight file that holds it (through the shard index if any)."""
    for index_name in SHARD_INDEX_NAMES:
        if (folder / index_name).is_file():
            weight_map = read_json_file(folder / index_name).get("weight_map", {})
            return {name: folder / file_name for name, file_name in weight_map.items()}
    return {name: path for path in weight_files(folder) for name in weight_keys(path)}


def _first_values(path: Path, names: list[str]) -> dict[str, tuple[list[int], torch.Tensor]]:
    """(shape, first SAMPLED_VALUES values) of each named tensor of one weight file, reading little of it."""
    sample = {}
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            for name in names:
                tensor_slice = handle.get_slice(name)
                shape = list(tensor_slice.get_shape())
                row = max(1, math.prod(shape[1:]))
                rows = min(shape[0], -(-SAMPLED_VALUES // row)) if shape else 0
                values = tensor_slice[:rows] if shape else handle.get_tensor(name)
                sample[name] = (shape, values.flatten()[:SAMPLED_VALUES])
        return sample
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    for name in names:
        sample[name] = (list(state[name].shape), state[name].flatten()[:SAMPLED_VALUES])
    return sample


def weights_digest(folder: Path) -> str:
    """Digest of the names, shapes and first values (as bfloat16) of SAMPLED_TENSORS tensors spread by name."""
    files = tensor_files(folder)
    names = sorted(name for name in files if not name.endswith(COMPUTED_TENSOR_SUFFIXES))
    if not names:
        raise CheckpointError(f"{folder}: no weights to fingerprint")
    count = min(SAMPLED_TENSORS, len(names))
    chosen = sorted({names[round(i * (len(names) - 1) / max(count - 1, 1))] for i in range(count)})
    by_file: dict[Path, list[str]] = {}
    for name in chosen:
        by_file.setdefault(files[name], []).append(name)
    digest = hashlib.sha256()
    for path, file_names in sorted(by_file.items()):
        for name, (shape, values) in sorted(_first_values(path, file_names).items()):
            digest.update(f"{name}{shape}".encode())
            digest.update(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def base_fingerprint(base: str | Path) -> dict | None:
    """The fingerprint of a local base model folder ({config, tokenizer, weights} digests), None for a hub name."""
    folder = Path(base)
    if not folder.is_dir():
        return None
    tokenizer = folder / TOKENIZER_FILE
    return {
        "config": config_digest(folder),
        "tokenizer": _digest(tokenizer.read_bytes()) if tokenizer.is_file() else None,
        "weights": weights_digest(folder),
    }


# ---- opening a checkpoint -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder as read once by open_checkpoint.

    `method` is None for a whole model no run of this project wrote (the official chatglm3-6b, an export); `record`
    is its training_record.json (read-only; None without one); `base` the base model its record or its method's
    files name (None for a whole model or when nothing names one), `base_source` the file that names it.
    """

    folder: Path
    method: FinetuneMethod | None
    record: Mapping | None
    base: str | None
    base_source: Path | None

    @property
    def kind(self) -> CheckpointKind:
        """What the folder holds: the method's checkpoint kind, or BASE for a plain whole model."""
        return self.method.checkpoint_kind if self.method is not None else CheckpointKind.BASE

    @property
    def needs_base(self) -> bool:
        """True when the folder holds only what was trained and loads on a base model."""
        return self.method is not None and self.method.needs_base

    @property
    def settings(self) -> dict:
        """The method's recorded settings ({} without a record or a method)."""
        if self.record is None or self.method is None:
            return {}
        return method_settings(self.record, self.method)

    @property
    def quantization_bit(self) -> int | None:
        """The bits the base was quantized to in training, as recorded (None: not quantized or no record)."""
        return recorded_bits(self.record)

    def check_base(self, base: str, allow_other_base: bool = False) -> None:
        """Raise CheckpointError when `base` is not the base this checkpoint's training record fingerprinted.

        With `allow_other_base` a mismatch is only logged; a record without a fingerprint (older checkpoints) or a
        base that is no local folder is loaded with a notice.
        """
        recorded = (self.record or {}).get(BASE_FINGERPRINT_FIELD)
        trained_on = (self.record or {}).get("base_model") or "an unrecorded base"
        if not recorded:
            logger.warning(
                "notice: %s records no fingerprint of its base (written before this check existed): cannot confirm "
                "that %s is the base it was trained on (%s)",
                self.folder / TRAINING_RECORD,
                base,
                trained_on,
            )
            return
        current = base_fingerprint(base)
        if current is None:
            logger.warning(
                "notice: %s is not a local folder: cannot confirm it is the base %s was trained on", base, self.folder
            )
            return
        differing = [part for part in FINGERPRINT_PARTS if recorded.get(part) != current[part]]
        if not differing:
            return
        message = (
            f"{self.folder}: was trained on base {trained_on} but {base} is another model (its {', '.join(differing)} "
            f"differ); pass the base it was trained on, or {ALLOW_OTHER_BASE_FLAG} to use this one anyway"
        )
        if not allow_other_base:
            raise CheckpointError(message)
        logger.warning("%s: going on as %s asks", message.split("; pass")[0], ALLOW_OTHER_BASE_FLAG)

    def attach(self, model: nn.Module, slot: str) -> tuple[nn.Module, Attachment]:
        """Add this checkpoint to a loaded base shared with others, under `slot` (its method's attach; a plain whole
        model is the base itself): (the model to serve, what this checkpoint's rows run with)."""
        if self.method is None:
            return model, Attachment()
        return self.method.attach(model, self.folder, self.settings, slot)

    def attachment_of(self, model: nn.Module) -> Attachment:
        """What the rows of this checkpoint, loaded on its own by load_for_inference, run with."""
        return self.method.attachment_of(model) if self.method is not None else Attachment()


def require_checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder as a Path; CheckpointError when it does not exist."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass the folder written by training or export")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder; pass the folder that holds it")
    return folder


def _method_of_folder(folder: Path, record: Mapping | None) -> FinetuneMethod | None:
    """The method that wrote a folder (its record, else its files, checked complete), or None for a whole model."""
    if record is not None:
        method = method_named(str(record["method"]))
        problem = method.weights_problem(folder)
        if problem is not None:
            raise CheckpointError(
                f"{folder / TRAINING_RECORD} says method {method.name!r} but {problem}; the checkpoint is incomplete - "
                "use another checkpoint folder or re-run the save"
            )
        return method
    method = recognise_checkpoint(folder)
    if method is not None:
        return method
    if (folder / CONFIG_FILE).is_file() and weight_files(folder):
        return None
    raise CheckpointError(
        f"{folder}: not a checkpoint: expected adapter_config.json (LoRA), prefix weights with config.json (P-Tuning "
        "v2) or config.json with model weights (a whole model)"
    )


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder once: its record, the method whose files it holds (checked complete) and its base."""
    folder = require_checkpoint_folder(path)
    record = read_training_record(folder)
    method = _method_of_folder(folder, record)
    base = base_source = None
    if record is not None and record.get("base_model"):
        base, base_source = str(record["base_model"]), folder / TRAINING_RECORD
    elif method is not None and (named := method.named_base(folder)) is not None:
        base, base_source = named
    frozen = MappingProxyType(record) if record is not None else None
    return Checkpoint(folder, method, frozen, base, base_source)


# ---- resuming -------------------------------------------------------------------------------------------------------


def read_resume_checkpoint(folder: Path) -> tuple[Checkpoint | None, str | None]:
    """(the checkpoint, read once, None) when training can resume from `folder` (trainer state, record and weights
    complete, DeepSpeed's own state counting as weights), else (None, why not)."""
    if not folder.is_dir():
        return None, "no such folder"
    if (folder / INCOMPLETE_MARKER).exists():
        return None, f"{INCOMPLETE_MARKER} is present: its save did not finish"
    for name in (TRAINER_STATE_FILE, TRAINING_RECORD):
        if not (folder / name).is_file():
            return None, f"{name} is missing"
    try:
        read_json_file(folder / TRAINER_STATE_FILE)
        record = read_json_file(folder / TRAINING_RECORD)
        method = method_named(str(record.get("method")))
        problem = method.weights_problem(folder) if deepspeed_state_folder(folder) is None else None
    except ValueError as error:  # a CheckpointError, or a record naming no known method
        return None, str(error)
    if problem is not None:
        return None, problem
    base = str(record["base_model"]) if record.get("base_model") else None
    return Checkpoint(folder, method, MappingProxyType(record), base, folder / TRAINING_RECORD if base else None), None


def resume_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete training checkpoint (see read_resume_checkpoint), or None when training can
    resume from it."""
    return read_resume_checkpoint(folder)[1]
