"""Which base model a checkpoint was trained on: a fingerprint recorded at training time and the one check, made
wherever a checkpoint is opened on a base (inference, evaluation, export, the server, resume), that the base given
now is that base.

The fingerprint holds three digests: the config fields that shape the network, the tokenizer's SentencePiece model,
and a sample of the weights (the first values of a few tensors spread over the checkpoint, read lazily from
safetensors or memory-mapped .bin files, rounded to bfloat16 so that a float16 and a bfloat16 copy of one base
agree). It costs a few megabytes of reading even for a 12 GB base.
"""

import hashlib
import json
import logging
import math
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from finetune.checkpoint_format import BASE_FINGERPRINT_FIELD, TOKENIZER_FILE, TRAINING_RECORD
from finetune.model.checkpoint_files import (
    CONFIG_FILE,
    SHARD_INDEX_NAMES,
    CheckpointError,
    read_json_file,
    weight_files,
    weight_keys,
)
from finetune.model.configuration import ChatGLMConfig

logger = logging.getLogger(__name__)

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
PARTS = ("config", "tokenizer", "weights")


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


def check_base_matches(checkpoint: str | Path, record: Mapping | None, base: str, allow_other_base: bool) -> None:
    """Raise CheckpointError when `base` is not the base the checkpoint's training record fingerprinted.

    With `allow_other_base` a mismatch is only logged; a record without a fingerprint (older checkpoints) or a base
    that is no local folder is loaded with a notice.
    """
    recorded = (record or {}).get(BASE_FINGERPRINT_FIELD)
    trained_on = (record or {}).get("base_model") or "an unrecorded base"
    if not recorded:
        logger.warning(
            "notice: %s records no fingerprint of its base (written before this check existed): cannot confirm "
            "that %s is the base it was trained on (%s)",
            Path(checkpoint) / TRAINING_RECORD,
            base,
            trained_on,
        )
        return
    current = base_fingerprint(base)
    if current is None:
        logger.warning(
            "notice: %s is not a local folder: cannot confirm it is the base %s was trained on", base, checkpoint
        )
        return
    differing = [part for part in PARTS if recorded.get(part) != current[part]]
    if not differing:
        return
    message = (
        f"{checkpoint}: was trained on base {trained_on} but {base} is another model (its {', '.join(differing)} "
        f"differ); pass the base it was trained on, or {ALLOW_OTHER_BASE_FLAG} to use this one anyway"
    )
    if not allow_other_base:
        raise CheckpointError(message)
    logger.warning("%s: going on as %s asks", message.split("; pass")[0], ALLOW_OTHER_BASE_FLAG)
