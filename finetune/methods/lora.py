"""LoRA through PEFT: low-rank adapters on chosen linear layers of every block, the base frozen.

Its checkpoint is PEFT's adapter folder: adapter_config.json + adapter_model.safetensors (finetune.checkpoint_format
describes the folder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from finetune.atomic_files import write_text_atomically
from finetune.methods.base import Attachment, CheckpointKind, FinetuneMethod, SaveContext
from finetune.model.checkpoint_files import CheckpointError, check_weight_file, first_file, read_json_file, weight_keys
from finetune.model.shapes import linear_shapes

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
LORA_LAYER_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
LORA_TARGET_ALL = "all"
# Bytes per input feature LoRA's dropout keeps for its backward pass, by device type (see adapter_input_bytes).
ADAPTER_DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": 4}


def parse_lora_target(value: str) -> list[str]:
    """Module names for `--lora_target`: a comma-separated list of layer Linear names, or `all` for every one."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == [LORA_TARGET_ALL]:
        return list(LORA_LAYER_MODULES)
    unknown = [name for name in names if name not in LORA_LAYER_MODULES]
    if not names or unknown:
        raise ValueError(
            f"--lora_target {value!r}: unknown module name(s) {unknown or [value]}; use a comma-separated list of "
            f"{', '.join(LORA_LAYER_MODULES)}, or '{LORA_TARGET_ALL}'"
        )
    return names


@dataclass
class LoRAOptions:
    """LoRA's (and DoRA's, QLoRA's) flags; a part of the training command line (finetune.arguments.ModelArguments)."""

    lora_rank: int | None = field(default=None, metadata={"help": "LoRA: the adapter rank; setting it selects LoRA."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA: scaling numerator (scale = alpha / rank)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA: dropout on the adapter input."})
    lora_target: str = field(
        default="query_key_value",
        metadata={
            "help": f"LoRA: comma-separated modules to adapt among {', '.join(LORA_LAYER_MODULES)}, or "
            f"'{LORA_TARGET_ALL}' for all of them."
        },
    )

    def check_options(self) -> None:
        """A positive rank, a dropout in [0, 1) and known target modules."""
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be a positive rank, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        parse_lora_target(self.lora_target)

    @property
    def lora_target_modules(self) -> list[str]:
        """The module names LoRA adapts."""
        return parse_lora_target(self.lora_target)


def lora_config(model_args: ModelArguments) -> LoraConfig:
    """The PEFT LoRA settings from --lora_rank/--lora_alpha/--lora_dropout/--lora_target."""
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        bias="none",
    )


# LoraConfig fields that PEFT 0.7 does not know (older PEFT raises TypeError on unknown fields when loading). Written
# only when they are not at their default, i.e. when the adapter really uses the newer feature. `peft_version` (the
# writing PEFT's version, information only) is never written.
FIELDS_NEWER_THAN_PEFT_0_7 = (
    "alora_invocation_tokens",
    "arrow_config",
    "corda_config",
    "ensure_weight_tying",
    "eva_config",
    "exclude_modules",
    "kasa_config",
    "layer_replication",
    "lora_bias",
    "lora_ga_config",
    "monteclora_config",
    "qalora_group_size",
    "target_parameters",
    "trainable_token_indices",
    "use_bdlora",
    "use_dora",
    "use_qalora",
    "use_rslora",
    "velora_config",
)


def lora_config_defaults() -> dict:
    """The default value of every LoraConfig field, as saved in adapter_config.json."""
    defaults = {}
    for field in dataclasses.fields(LoraConfig):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def make_adapter_config_portable(folder: Path) -> None:
    """Rewrite `folder`'s adapter_config.json without the fields older PEFT cannot read, where they are at default."""
    path = folder / ADAPTER_CONFIG
    values = read_json_file(path)
    defaults = lora_config_defaults()
    portable = {
        key: value
        for key, value in values.items()
        if key != "peft_version"
        and (key not in FIELDS_NEWER_THAN_PEFT_0_7 or (key in defaults and value != defaults[key]))
    }
    write_text_atomically(path, json.dumps(portable, indent=2, sort_keys=True) + "\n")


def lora_targets(config, targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """The adapted linear layer names: a comma-separated string or a sequence, `all` for every one (checked)."""
    if isinstance(targets, str):
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    shapes = linear_shapes(config)
    names = tuple(shapes) if tuple(targets) == (LORA_TARGET_ALL,) else tuple(targets)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ValueError(
            f"LoRA target module(s) {', '.join(unknown)} are not ChatGLM3 linear layers; "
            f"use some of {', '.join(shapes)} or {LORA_TARGET_ALL}"
        )
    return names


def lora_parameter_count(config, rank: int, targets: tuple[str, ...] | str) -> int:
    """Parameters of LoRA adapters of `rank` on the named linear layers of every block."""
    shapes = linear_shapes(config)
    return config.num_layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in lora_targets(config, targets))


def adapter_weight_file(folder: Path) -> Path:
    """The adapter weight file of a LoRA folder, checked to be complete."""
    path = first_file(folder, ADAPTER_WEIGHT_NAMES)
    if path is None:
        raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} is there but no {' or '.join(ADAPTER_WEIGHT_NAMES)}")
    check_weight_file(path)
    return path


def load_lora_adapter(
    base_model: PreTrainedModel | PeftModel, folder: Path, base: str, adapter_name: str = "default"
) -> PeftModel:
    """Put the LoRA adapter of `folder` on `base_model` (added under `adapter_name` to a PeftModel), explaining a
    base it was not made for."""
    weights = adapter_weight_file(folder)
    try:
        if isinstance(base_model, PeftModel):
            base_model.load_adapter(str(folder), adapter_name=adapter_name)
            model = base_model
        else:
            model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=adapter_name)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        first_mismatch = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise CheckpointError(
            f"{weights}: this LoRA adapter was trained for a different base model than {base} "
            f"(weight shapes differ: {first_mismatch}); pass the right base with --base"
        ) from error
    stored = [key for key in weight_keys(weights) if "lora_" in key]
    created = [name for name, _ in model.named_parameters() if "lora_" in name and f".{adapter_name}." in name]
    if len(stored) != len(created):
        raise CheckpointError(
            f"{weights}: this LoRA adapter holds {len(stored)} LoRA tensors but base model {base} takes "
            f"{len(created)}: it was trained for a base with a different number of layers; pass the right --base"
        )
    return model


class LoRA(FinetuneMethod):
    """Train PEFT LoRA adapters; the checkpoint is the adapter folder."""

    name = "lora"
    checkpoint_kind = CheckpointKind.LORA
    options = (LoRAOptions,)
    setting_names = ("rank", "alpha", "dropout", "target_modules")
    selecting_option = "lora_rank"
    # DoRA (finetune.methods.dora) is LoRA with PEFT's use_dora; the adapter config says which one a folder holds.
    uses_dora = False
    reference_on_the_fly = True

    def make_trainable(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Wrap the base in a PeftModel with the LoRA settings of the arguments."""
        with warnings.catch_warnings():
            # peft probes the model's deprecated `is_gradient_checkpointing` alias, which warns on every LoRA run.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return get_peft_model(model, self.adapter_config(model_args))

    def adapter_config(self, model_args: ModelArguments) -> LoraConfig:
        """The PEFT settings of this method's adapters."""
        config = lora_config(model_args)
        config.use_dora = self.uses_dora
        return config

    def record_fields(self, model_args: ModelArguments) -> dict:
        """The LoRA settings (rank and targets are checked on resume)."""
        return {
            "rank": model_args.lora_rank,
            "alpha": model_args.lora_alpha,
            "dropout": model_args.lora_dropout,
            "target_modules": model_args.lora_target_modules,
        }

    def settings_mismatch(self, recorded: Mapping, model_args: ModelArguments) -> str | None:
        """A different rank or different target modules cannot resume."""
        stored = recorded
        wanted = self.record_fields(model_args)
        keys = ("rank", "target_modules")
        if tuple(stored.get(key) for key in keys) != tuple(wanted[key] for key in keys):
            return (
                f"the checkpoint's LoRA rank/targets are {stored.get('rank')}/{stored.get('target_modules')} but this "
                f"run has {wanted['rank']}/{wanted['target_modules']}"
            )
        return None

    def save(self, model: nn.Module, folder: Path, context: SaveContext) -> None:
        """The PEFT adapter: adapter_config.json (readable by PEFT 0.7 and later) + adapter_model.safetensors."""
        model.save_pretrained(folder, state_dict=context.state_dict)
        make_adapter_config_portable(folder)

    def recognises(self, folder: Path) -> bool:
        """A folder with adapter_config.json whose use_dora matches this method's."""
        path = folder / ADAPTER_CONFIG
        return path.is_file() and bool(read_json_file(path).get("use_dora", False)) == self.uses_dora

    def weights_problem(self, folder: Path) -> str | None:
        """adapter_config.json and a complete adapter weight file must be there."""
        if not (folder / ADAPTER_CONFIG).is_file():
            return f"{ADAPTER_CONFIG} is missing"
        if first_file(folder, ADAPTER_WEIGHT_NAMES) is None:
            return f"{' or '.join(ADAPTER_WEIGHT_NAMES)} is missing"
        adapter_weight_file(folder)
        return None

    def named_base(self, folder: Path) -> tuple[str, Path] | None:
        """The base_model_name_or_path of adapter_config.json."""
        path = folder / ADAPTER_CONFIG
        base = read_json_file(path).get("base_model_name_or_path") if path.is_file() else None
        return (str(base), path) if base else None

    def load_for_inference(
        self, folder: Path, settings: Mapping, base: str, load_kwargs: dict, merge_lora: bool = False
    ) -> nn.Module:
        """The base with the adapter of `folder` (merged into the base weights with `merge_lora`)."""
        model = load_lora_adapter(AutoModelForCausalLM.from_pretrained(base, **load_kwargs), folder, base)
        return model.merge_and_unload() if merge_lora else model

    def attach(self, model: nn.Module, folder: Path, settings: Mapping, slot: str) -> tuple[nn.Module, Attachment]:
        """The base as a PeftModel holding this adapter under the name `slot`; its rows run with that adapter."""
        return load_lora_adapter(model, folder, str(model.name_or_path), adapter_name=slot), Attachment(adapter=slot)

    def attachment_of(self, model: nn.Module) -> Attachment:
        """The PeftModel's active adapter (none once merged into the base)."""
        return Attachment(adapter=model.active_adapter) if isinstance(model, PeftModel) else Attachment()

    def trainable_parameter_count(self, config, options: object) -> int:
        """The adapters' parameters."""
        return lora_parameter_count(config, options.lora_rank, options.lora_target)

    def adapted_modules(self, config, options: object) -> tuple[str, ...]:
        """The LoRA target modules."""
        return lora_targets(config, options.lora_target)

    def adapter_input_bytes(self, options: object, fan_in: int, element_bytes: int, device_type: str) -> float:
        """A 16-bit copy of the layer's input, its dropout mask and the rank-r product."""
        # PEFT casts the input to the adapter's fp32 before dropout. CUDA's fused dropout keeps a one-byte mask per
        # input feature; on the CPU torch keeps the scaled noise itself, in the input's fp32 (measured at chatglm3-6b's
        # width: tests/unit/finetune/test_recompute.py).
        mask_bytes = ADAPTER_DROPOUT_MASK_BYTES.get(device_type, 1)
        dropout_mask = fan_in * mask_bytes if options.lora_dropout > 0 else 0
        return fan_in * element_bytes + dropout_mask + options.lora_rank * element_bytes

    def quantized_variant(self) -> str:
        """LoRA on a 4-bit base is QLoRA."""
        return "qlora"

    def reference_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """The same model with its adapters disabled (PEFT's disable_adapter)."""
        return model.disable_adapter()

    def reference_description(self) -> str:
        """The base with the adapter disabled."""
        return "the same model with the LoRA adapter disabled"
