"""Read, check, load and write P-Tuning v2 prefix checkpoints (weights of `transformer.prefix_encoder.*` only)."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from finetune.atomic_files import atomic_path

from ..checkpoint_layout import PREFIX_OFFICIAL_BIN, PREFIX_SAFETENSORS, first_file
from .checkpoint_files import CheckpointError, check_weight_file

PREFIX_KEY_PREFIX = "transformer.prefix_encoder."


def find_prefix_weights(folder: Path) -> Path | None:
    """The prefix weight file of a folder (safetensors preferred), or None."""
    return first_file(folder, (PREFIX_SAFETENSORS, PREFIX_OFFICIAL_BIN))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors or torch weight file on CPU (torch files with weights_only=True)."""
    check_weight_file(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def is_prefix_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when every key belongs to the prefix encoder."""
    return bool(state_dict) and all(key.startswith(PREFIX_KEY_PREFIX) for key in state_dict)


def load_prefix_checkpoint(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a prefix checkpoint folder (ours or the official pytorch_model.bin) into a model built with pre_seq_len."""
    folder = Path(folder)
    path = find_prefix_weights(folder)
    if path is None:
        raise CheckpointError(f"{folder}: no {PREFIX_SAFETENSORS} or {PREFIX_OFFICIAL_BIN} with prefix weights")
    state_dict = read_state_dict(path)
    if not is_prefix_state_dict(state_dict):
        others = sorted(key for key in state_dict if not key.startswith(PREFIX_KEY_PREFIX))[:3]
        raise CheckpointError(f"{path}: not a prefix checkpoint: it holds other weights too, e.g. {others}")
    apply_prefix_state_dict(model, state_dict, source=path)


def apply_prefix_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Copy prefix weights into `model`, explaining pre_seq_len, layer-count and projection mismatches."""
    config = model.config
    encoder = model.transformer.prefix_encoder
    if encoder is None:
        raise CheckpointError(
            f"{source}: this is a P-Tuning v2 prefix checkpoint but the model was built without pre_seq_len; "
            "load the base with pre_seq_len set (e.g. from_pretrained(base, pre_seq_len=N))"
        )
    embedding = state_dict.get(PREFIX_KEY_PREFIX + "embedding.weight")
    if embedding is None:
        raise CheckpointError(f"{source}: missing {PREFIX_KEY_PREFIX}embedding.weight")
    has_projection = any(key.startswith(PREFIX_KEY_PREFIX + "trans.") for key in state_dict)
    if has_projection != bool(config.prefix_projection):
        raise CheckpointError(
            f"{source}: prefix_projection is {has_projection} in the checkpoint but {config.prefix_projection} in the "
            f"model; set prefix_projection={has_projection}"
        )
    if embedding.shape[0] != config.pre_seq_len:
        raise CheckpointError(
            f"{source}: pre_seq_len mismatch: the checkpoint has {embedding.shape[0]} prefix tokens, the model was "
            f"built with pre_seq_len={config.pre_seq_len}; use pre_seq_len={embedding.shape[0]}"
        )
    per_layer = 2 * config.num_key_value_groups * config.kv_channels
    stored_width = embedding.shape[1]
    if stored_width != config.num_layers * per_layer:
        layers = stored_width / per_layer
        raise CheckpointError(
            f"{source}: layer/shape mismatch: the prefix has width {stored_width} (= {layers:g} layers x {per_layer}), "
            f"the model has {config.num_layers} layers x {per_layer} = {config.num_layers * per_layer}; this prefix "
            "was trained for a different base model"
        )
    local = {key[len(PREFIX_KEY_PREFIX) :]: value for key, value in state_dict.items()}
    expected = encoder.state_dict()
    for key, value in local.items():
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected prefix weight {PREFIX_KEY_PREFIX}{key}")
        if expected[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: {PREFIX_KEY_PREFIX}{key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)}; this prefix was trained for a different base model"
            )
    missing = sorted(set(expected) - set(local))
    if missing:
        raise CheckpointError(f"{source}: missing prefix weights {[PREFIX_KEY_PREFIX + key for key in missing]}")
    encoder.load_state_dict(local)


def prefix_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder weights of `model` with official key names, contiguous, on CPU."""
    encoder = model.transformer.prefix_encoder
    return {PREFIX_KEY_PREFIX + key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}


def save_prefix_weights(model: torch.nn.Module, folder: str | Path, official_bin: bool = False) -> None:
    """Write the prefix weights as model.safetensors (and the official pytorch_model.bin when asked), atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = prefix_state_dict(model)
    with atomic_path(folder / PREFIX_SAFETENSORS) as temp_name:
        save_file(state_dict, temp_name, metadata={"format": "pt"})
    if official_bin:
        with atomic_path(folder / PREFIX_OFFICIAL_BIN) as temp_name:
            torch.save(state_dict, temp_name)
