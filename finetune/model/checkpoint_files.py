"""The files of a transformers model folder (config.json, weights, shard index): their names, and cheap structural
checks before loading, so failures name the file and what is wrong. The layout of this project's checkpoints, built
on these, is finetune.checkpoint_format's."""

import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

CONFIG_FILE = "config.json"
SINGLE_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and what to do."""


def first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` that is a file in `folder`, or None."""
    return next((folder / name for name in names if (folder / name).is_file()), None)


def read_json_file(path: Path) -> dict:
    """Parse a JSON file, raising CheckpointError with the file and position on failure."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error


def check_safetensors_file(path: Path) -> None:
    """Raise CheckpointError if `path` is not a complete safetensors file (bad header or truncated data)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(
                f"{path}: file is {size} bytes, too short to be safetensors; re-copy or re-download it"
            )
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise CheckpointError(
                f"{path}: truncated safetensors file (header claims {header_length} bytes, file has {size}); "
                "re-copy or re-download it"
            )
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error}); re-copy or re-download it") from error
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + data_end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + header_length + data_end} bytes, file has "
            f"{size}; re-copy or re-download it"
        )


# How a file written by torch.save(..., _use_new_zipfile_serialization=False) (torch < 1.6, older prefix
# checkpoints) begins: torch's magic number, pickled with protocol 2.
LEGACY_TORCH_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


def check_torch_file(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete torch zip archive or a legacy (pre-zip) torch file.

    A legacy file has no index to check; torch.load (weights_only=True) reports one that is cut short.
    """
    with path.open("rb") as handle:
        if handle.read(len(LEGACY_TORCH_MAGIC)) == LEGACY_TORCH_MAGIC:
            return
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: not a complete PyTorch checkpoint ({error}); the file is truncated or corrupt, re-copy or "
            "re-download it"
        ) from error


def check_weight_file(path: Path) -> None:
    """Check one weight file by its format."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file is missing")
    if path.suffix == ".safetensors":
        check_safetensors_file(path)
    else:
        check_torch_file(path)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder (through the shard index when there is one), safetensors preferred."""
    for index_name in SHARD_INDEX_NAMES:
        index_path = folder / index_name
        if index_path.is_file():
            index = read_json_file(index_path)
            if "weight_map" not in index:
                raise CheckpointError(f"{index_path}: no 'weight_map' field; the shard index is corrupt")
            return [folder / name for name in sorted(set(index["weight_map"].values()))]
    for single_name in SINGLE_WEIGHT_NAMES:
        if (folder / single_name).is_file():
            return [folder / single_name]
    return []


def check_chatglm_folder(folder: str | Path) -> None:
    """Raise CheckpointError unless `folder` holds a loadable ChatGLM3 checkpoint (config and complete weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass the path of a chatglm3-6b folder")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{folder}: not a ChatGLM3 checkpoint: config.json is missing (expected an official chatglm3-6b folder "
            "or one saved by this project)"
        )
    model_type = read_json_file(config_path).get("model_type")
    if model_type != "chatglm":
        raise CheckpointError(
            f"{config_path}: model_type is {model_type!r}, not 'chatglm': this folder is not a ChatGLM3 checkpoint"
        )
    files = weight_files(folder)
    if not files:
        raise CheckpointError(
            f"{folder}: no weights found (expected model.safetensors, pytorch_model.bin or a sharded index)"
        )
    for path in files:
        check_weight_file(path)


def weight_keys(path: Path) -> list[str]:
    """The tensor names stored in one weight file, read without loading the whole file where possible."""
    check_weight_file(path)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors or torch weight file on CPU (torch files with weights_only=True)."""
    check_weight_file(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
