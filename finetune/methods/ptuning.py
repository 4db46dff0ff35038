"""P-Tuning v2: a trained prefix encoder (pre_seq_len virtual tokens per layer) on a frozen base model.

Its checkpoint (finetune.checkpoint_format describes the folder): config.json with pre_seq_len/prefix_projection and
model.safetensors holding only `transformer.prefix_encoder.*`, plus the same weights as the official
pytorch_model.bin (unless --no_save_official_bin). This module reads, checks, loads and writes those weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from finetune.atomic_files import atomic_path
from finetune.methods.base import Attachment, CheckpointKind, FinetuneMethod, SaveContext
from finetune.methods.qlora import QuantizationOptions
from finetune.model.checkpoint_files import (
    CONFIG_FILE,
    SHARD_INDEX_NAMES,
    CheckpointError,
    first_file,
    read_json_file,
    read_state_dict,
    weight_keys,
)
from finetune.model.prefix_encoder import PrefixEncoder
from finetune.model.remote_code import copy_remote_code_files
from finetune.model.shapes import prefix_parameter_count

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments

PREFIX_SAFETENSORS = "model.safetensors"
PREFIX_OFFICIAL_BIN = "pytorch_model.bin"
PREFIX_KEY_PREFIX = "transformer.prefix_encoder."


@dataclass
class PTuningOptions:
    """P-Tuning v2's flags; a part of the training command line (finetune.arguments.ModelArguments)."""

    pre_seq_len: int | None = field(
        default=None, metadata={"help": "P-Tuning v2: number of prefix tokens; trains only the prefix encoder."}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "P-Tuning v2: pass the prefix through a two-layer MLP (more parameters)."}
    )
    save_official_bin: bool = field(
        default=True,
        metadata={
            "help": "P-Tuning v2: also write the official pytorch_model.bin (transformer.prefix_encoder.* only, a few "
            "MB) next to model.safetensors, for the official recipe and tools built on it (on by default; "
            "--save_official_bin false or --no_save_official_bin turns it off). Other methods ignore it."
        },
    )

    def check_options(self) -> None:
        """A positive prefix length; the projection only with a prefix."""
        if self.pre_seq_len is not None and self.pre_seq_len < 1:
            raise ValueError(f"--pre_seq_len must be a positive number of prefix tokens, got {self.pre_seq_len}")
        if self.prefix_projection and not self.pre_seq_len:
            raise ValueError("--prefix_projection belongs to P-Tuning v2; pass --pre_seq_len too, or drop it")


def find_prefix_weights(folder: Path) -> Path | None:
    """The prefix weight file of a folder (safetensors preferred), or None."""
    return first_file(folder, (PREFIX_SAFETENSORS, PREFIX_OFFICIAL_BIN))


def is_prefix_state_dict(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when every key belongs to the prefix encoder."""
    return bool(state_dict) and all(key.startswith(PREFIX_KEY_PREFIX) for key in state_dict)


def prefix_weights_of(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The prefix weights of a checkpoint folder (ours or the official pytorch_model.bin) and their file, checked to
    hold nothing else."""
    path = find_prefix_weights(folder)
    if path is None:
        raise CheckpointError(f"{folder}: no {PREFIX_SAFETENSORS} or {PREFIX_OFFICIAL_BIN} with prefix weights")
    state_dict = read_state_dict(path)
    if not is_prefix_state_dict(state_dict):
        others = sorted(key for key in state_dict if not key.startswith(PREFIX_KEY_PREFIX))[:3]
        raise CheckpointError(f"{path}: not a prefix checkpoint: it holds other weights too, e.g. {others}")
    return state_dict, path


def load_prefix_checkpoint(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a prefix checkpoint folder (ours or the official pytorch_model.bin) into a model built with pre_seq_len."""
    apply_prefix_state_dict(model, *prefix_weights_of(Path(folder)))


def apply_prefix_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Copy prefix weights into `model`'s prefix encoder (see apply_prefix_weights)."""
    if model.transformer.prefix_encoder is None:
        raise CheckpointError(
            f"{source}: this is a P-Tuning v2 prefix checkpoint but the model was built without pre_seq_len; "
            "load the base with pre_seq_len set (e.g. from_pretrained(base, pre_seq_len=N))"
        )
    apply_prefix_weights(model.transformer.prefix_encoder, model.config, state_dict, source)


def apply_prefix_weights(encoder: nn.Module, config, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Copy prefix weights into a prefix encoder built for `config`, explaining pre_seq_len, layer-count and
    projection mismatches."""
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


def holds_only_prefix_weights(folder: Path) -> bool:
    """True when the folder's single weight file holds nothing but `transformer.prefix_encoder.*` tensors."""
    if any((folder / name).is_file() for name in SHARD_INDEX_NAMES):
        return False
    path = find_prefix_weights(folder)
    if path is None:
        return False
    keys = weight_keys(path)
    return bool(keys) and all(key.startswith(PREFIX_KEY_PREFIX) for key in keys)


def prefix_settings(folder: Path, recorded: Mapping) -> tuple[int, bool]:
    """pre_seq_len and prefix_projection of a prefix checkpoint, from its config.json (else its recorded settings)."""
    config_path = folder / CONFIG_FILE
    source = read_json_file(config_path) if config_path.is_file() else recorded
    if not source or not source.get("pre_seq_len"):
        raise CheckpointError(
            f"{folder}: a P-Tuning v2 checkpoint needs {CONFIG_FILE} (or a training record) with pre_seq_len set"
        )
    return int(source["pre_seq_len"]), bool(source.get("prefix_projection", False))


def load_prefix_encoder(config, folder: Path, recorded: Mapping) -> PrefixEncoder:
    """A P-Tuning v2 prefix encoder for a base with `config`, with the weights of `folder` (fp32, eval mode)."""
    prefix_config = copy.deepcopy(config)
    prefix_config.pre_seq_len, prefix_config.prefix_projection = prefix_settings(folder, recorded)
    encoder = PrefixEncoder(prefix_config).float().eval()
    apply_prefix_weights(encoder, prefix_config, *prefix_weights_of(folder))
    return encoder


class PTuningV2(FinetuneMethod):
    """Train only the prefix encoder; the checkpoint is config.json + the prefix weights."""

    name = "ptuning"
    checkpoint_kind = CheckpointKind.PREFIX
    options = (PTuningOptions, QuantizationOptions)
    setting_names = ("pre_seq_len", "prefix_projection")
    selecting_option = "pre_seq_len"
    reference_on_the_fly = True
    zero3_problem = (
        "P-Tuning v2 trains only the small prefix encoder and is saved from the model itself, which ZeRO-3 "
        "partitions; use a ZeRO-2 DeepSpeed config (ds_configs/zero2.json) or none"
    )

    def make_trainable(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Make the prefix encoder the only trainable part of the model."""
        encoder = model.transformer.prefix_encoder
        if encoder is None:
            raise ValueError("P-Tuning v2 needs a model built with pre_seq_len; the loaded model has no prefix encoder")
        model.requires_grad_(False)
        encoder.requires_grad_(True)
        return model

    def record_fields(self, model_args: ModelArguments) -> dict:
        """pre_seq_len and prefix_projection."""
        return {"pre_seq_len": model_args.pre_seq_len, "prefix_projection": model_args.prefix_projection}

    def save(self, model: nn.Module, folder: Path, context: SaveContext) -> None:
        """config.json (without quantization settings, use_cache on), the prefix weights (+ the official .bin)."""
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.use_cache = True
        config.save_pretrained(folder)
        save_prefix_weights(model, folder, official_bin=context.model_args.save_official_bin)
        copy_remote_code_files(context.model_args.model_name_or_path, folder)

    def load_trained_weights(self, model: nn.Module, folder: Path) -> bool:
        """Load the prefix weights into the prefix encoder."""
        load_prefix_checkpoint(model, folder)
        return True

    def recognises(self, folder: Path) -> bool:
        """A folder whose single weight file holds only prefix encoder tensors."""
        return holds_only_prefix_weights(folder)

    def weights_problem(self, folder: Path) -> str | None:
        """The prefix weight file must be there, complete, and hold only prefix tensors."""
        if not holds_only_prefix_weights(folder):
            return (
                f"the folder has no weight file holding only {PREFIX_KEY_PREFIX}* tensors (model.safetensors or "
                "pytorch_model.bin)"
            )
        return None

    def load_for_inference(
        self, folder: Path, settings: Mapping, base: str, load_kwargs: dict, merge_lora: bool = False
    ) -> nn.Module:
        """The base built with the checkpoint's prefix settings, its fp32 prefix encoder loaded from `folder`."""
        pre_seq_len, prefix_projection = prefix_settings(folder, settings)
        model = AutoModelForCausalLM.from_pretrained(
            base, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection, **load_kwargs
        )
        model.transformer.prefix_encoder.float()
        load_prefix_checkpoint(model, folder)
        return model

    def attach(self, model: nn.Module, folder: Path, settings: Mapping, slot: str) -> tuple[nn.Module, Attachment]:
        """The base unchanged; the checkpoint's rows run with its own prefix encoder, on the base's device."""
        encoder = load_prefix_encoder(model.config, folder, settings).to(next(model.parameters()).device)
        return model, Attachment(prefix=encoder)

    def attachment_of(self, model: nn.Module) -> Attachment:
        """The model's own prefix encoder."""
        return Attachment(prefix=model.transformer.prefix_encoder)

    def trainable_parameter_count(self, config, options: object) -> int:
        """The prefix encoder's parameters."""
        return prefix_parameter_count(config, options.pre_seq_len, bool(options.prefix_projection))

    def prefix_tokens(self, options: object) -> int:
        """pre_seq_len prefix tokens in every layer."""
        return options.pre_seq_len

    def quantized_variant(self) -> str:
        """P-Tuning v2 itself trains on a 4-bit base."""
        return self.name

    def reference_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The same model with its prefix disabled: no prefix keys/values and no prefix columns in attention."""
        return prefix_disabled(model)

    def reference_description(self) -> str:
        """The base without the prefix."""
        return "the same model with the P-Tuning v2 prefix disabled"


@contextlib.contextmanager
def prefix_disabled(model: nn.Module) -> Iterator[None]:
    """Run a P-Tuning v2 model as its base: the prefix encoder is detached and pre_seq_len set to 0 meanwhile."""
    transformer = model.transformer
    encoder, pre_seq_len = transformer.prefix_encoder, transformer.config.pre_seq_len
    transformer.prefix_encoder, transformer.config.pre_seq_len = None, None
    try:
        yield
    finally:
        transformer.prefix_encoder, transformer.config.pre_seq_len = encoder, pre_seq_len
