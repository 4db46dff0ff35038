"""P-Tuning v2: a trained prefix encoder (pre_seq_len virtual tokens per layer) on a frozen base model."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from finetune.checkpoint_layout import (
    CONFIG_FILE,
    SHARD_INDEX_NAMES,
    TRAINING_RECORD,
    CheckpointKind,
    read_training_record,
)
from finetune.methods.base import FinetuneMethod, SaveContext
from finetune.model.checkpoint_files import CheckpointError, read_json_file, weight_keys
from finetune.model.prefix_checkpoint import (
    PREFIX_KEY_PREFIX,
    find_prefix_weights,
    load_prefix_checkpoint,
    save_prefix_weights,
)
from finetune.model.remote_code import copy_remote_code_files
from finetune.methods.qlora import QuantizationOptions
from finetune.model.shapes import prefix_parameter_count

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments


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


def holds_only_prefix_weights(folder: Path) -> bool:
    """True when the folder's single weight file holds nothing but `transformer.prefix_encoder.*` tensors."""
    if any((folder / name).is_file() for name in SHARD_INDEX_NAMES):
        return False
    path = find_prefix_weights(folder)
    if path is None:
        return False
    keys = weight_keys(path)
    return bool(keys) and all(key.startswith(PREFIX_KEY_PREFIX) for key in keys)


def prefix_settings(folder: Path) -> tuple[int, bool]:
    """pre_seq_len and prefix_projection of a prefix checkpoint, from its config.json (else training_record.json)."""
    config_path = folder / CONFIG_FILE
    source = read_json_file(config_path) if config_path.is_file() else read_training_record(folder)
    if not source or not source.get("pre_seq_len"):
        raise CheckpointError(
            f"{folder}: a P-Tuning v2 checkpoint needs {CONFIG_FILE} (or {TRAINING_RECORD}) with pre_seq_len set"
        )
    return int(source["pre_seq_len"]), bool(source.get("prefix_projection", False))


class PTuningV2(FinetuneMethod):
    """Train only the prefix encoder; the checkpoint is config.json + the prefix weights."""

    name = "ptuning"
    checkpoint_kind = CheckpointKind.PREFIX
    options = (PTuningOptions, QuantizationOptions)
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

    def load_for_inference(self, folder: Path, base: str, load_kwargs: dict, merge_lora: bool = False) -> nn.Module:
        """The base built with the checkpoint's prefix settings, its fp32 prefix encoder loaded from `folder`."""
        pre_seq_len, prefix_projection = prefix_settings(folder)
        model = AutoModelForCausalLM.from_pretrained(
            base, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection, **load_kwargs
        )
        model.transformer.prefix_encoder.float()
        load_prefix_checkpoint(model, folder)
        return model

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
