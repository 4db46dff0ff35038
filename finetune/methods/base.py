"""The interface every fine-tuning method implements, and what the methods share: loading the base model (quantized
by finetune.quantization when asked), keeping trainable parameters in fp32, counting parameters.

Whatever the base model's dtype, every trainable parameter is kept in fp32: the base is frozen in bf16/fp16 (from
--bf16/--fp16) while what the method trains is upcast to fp32.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from finetune.quantization import COMPUTE_DTYPE, check_quantization_available, quantization_config

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments


class CheckpointKind(enum.Enum):
    """What a checkpoint folder holds, and so how it loads."""

    PREFIX = "ptuning"  # P-Tuning v2 prefix weights on top of a base model
    LORA = "lora"  # a PEFT adapter on top of a base model
    FULL = "full"  # a whole model written by fine-tuning (full or freeze)
    BASE = "base"  # any other whole model: the official chatglm3-6b, an exported model


@dataclass(frozen=True)
class Attachment:
    """What one served checkpoint adds to a loaded base, row by row: a PEFT adapter's name, a P-Tuning v2 prefix
    encoder, or neither (the model itself)."""

    adapter: str | None = None
    prefix: nn.Module | None = None


@dataclass(frozen=True)
class SaveContext:
    """What a method's `save` may need besides the model: the run's model arguments, its tokenizer, and the state
    dict Trainer gathered (DeepSpeed ZeRO-3, FSDP) when the model's own weights are partitioned."""

    model_args: ModelArguments
    tokenizer: PreTrainedTokenizerBase | None = None
    state_dict: dict | None = None


class FinetuneMethod(abc.ABC):
    """One fine-tuning method: how it trains, saves, recognises, checks and loads its checkpoints, and what the
    memory preflight and training_record.json need to know about it.

    `options` arguments are the run's method options, read duck-typed: ModelArguments, or the method's own options
    (finetune.methods.method_options).
    """

    name: str
    checkpoint_kind: CheckpointKind
    # The method's options dataclasses (its flags; finetune.arguments.ModelArguments composes every method's).
    options: tuple[type, ...] = ()
    # The option this method needs set (its size: prefix length, rank, layers), or None.
    selecting_option: str | None = None
    # True when the method trains weights of the base itself (its checkpoint is a whole model).
    trains_base_weights: bool = False
    # True when the method trains on a base loaded quantized (--quantization_bit), as QLoRA does.
    needs_quantized_base: bool = False
    # Why the method cannot train under DeepSpeed ZeRO-3, or None when it can.
    zero3_problem: str | None = None
    # True when `reference_context` gives the preference reference during training (the trained part switched off);
    # False: the reference log-probabilities are computed once before training and cached with the data.
    reference_on_the_fly: bool = False

    # ---- training -----------------------------------------------------------------------------------------------

    def base_dtype(self, training_args: TrainingArguments) -> torch.dtype:
        """Dtype of the frozen base weights: the run's mixed-precision dtype."""
        return mixed_precision_dtype(training_args)

    @abc.abstractmethod
    def make_trainable(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Freeze or wrap a loaded base so that exactly this method's parameters train; returns the model to train."""

    def prepare(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Make a loaded base (quantized or not) trainable for this method, every trainable parameter in fp32."""
        if model_args.quantization_bit:
            model = prepare_quantized_base(model)
        model = self.make_trainable(model, model_args)
        upcast_trainable_parameters(model)
        return model

    def build_trainable_model(self, model_args: ModelArguments, training_args: TrainingArguments) -> nn.Module:
        """Load the base in this method's dtype and prepare it for training."""
        return self.prepare(load_base_model(model_args, self.base_dtype(training_args)), model_args)

    # The names of this method's settings in training_record.json (record_fields' keys), used to read records of
    # format 1, which kept them at the top level (LoRA's under "lora"); see finetune.checkpoint_format.
    setting_names: tuple[str, ...] = ()

    def record_fields(self, model_args: ModelArguments) -> dict:
        """This method's settings, written under its name in training_record.json (checked again on resume)."""
        return {}

    def settings_mismatch(self, recorded: Mapping, model_args: ModelArguments) -> str | None:
        """How a checkpoint's recorded settings (finetune.checkpoint_format.method_settings) differ from this run's,
        or None when it can resume."""
        for key, value in self.record_fields(model_args).items():
            if recorded.get(key) != value:
                return f"the checkpoint has {key}={recorded.get(key)!r} but this run has {key}={value!r}"
        return None

    @abc.abstractmethod
    def save(self, model: nn.Module, folder: Path, context: SaveContext) -> None:
        """Write this method's model files (not the record) into `folder`."""

    def load_trained_weights(self, model: nn.Module, folder: Path) -> bool:
        """Load a checkpoint's trained weights into the training model when the method does it itself (True), or
        leave it to Trainer (False)."""
        return False

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def recognises(self, folder: Path) -> bool:
        """True when a folder without training_record.json holds a checkpoint of this method."""
        return False

    @abc.abstractmethod
    def weights_problem(self, folder: Path) -> str | None:
        """Why the folder's files for this method are missing or broken, or None when they are complete."""

    @property
    def needs_base(self) -> bool:
        """True when a checkpoint holds only what was trained and loads on top of its base model."""
        return self.checkpoint_kind in (CheckpointKind.PREFIX, CheckpointKind.LORA)

    def named_base(self, folder: Path) -> tuple[str, Path] | None:
        """The base model this method's own files name, and the file that names it (for a folder whose record does
        not), or None."""
        return None

    def load_for_inference(
        self, folder: Path, settings: Mapping, base: str, load_kwargs: dict, merge_lora: bool = False
    ) -> nn.Module:
        """The trained model of `folder` for generation; `settings` are its recorded method settings, `base` its
        base model (unused for whole models)."""
        return AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)

    def attach(self, model: nn.Module, folder: Path, settings: Mapping, slot: str) -> tuple[nn.Module, Attachment]:
        """Add the checkpoint of `folder` to a loaded base that several checkpoints share, under the name `slot`:
        (the model to serve, what the checkpoint's rows run with). A whole model adds nothing: it is the model."""
        return model, Attachment()

    def attachment_of(self, model: nn.Module) -> Attachment:
        """What the rows of a checkpoint loaded on its own (load_for_inference) run with: the model itself."""
        return Attachment()

    # ---- memory preflight ---------------------------------------------------------------------------------------

    def check_options(self, options: object) -> None:
        """Raise ValueError when the options lack the size this method needs (its `selecting_option`)."""
        if self.selecting_option and not getattr(options, self.selecting_option, None):
            raise ValueError(f"method {self.name!r} needs {self.selecting_option} > 0")

    @abc.abstractmethod
    def trainable_parameter_count(self, config, options: object) -> int:
        """Parameters this method trains, for a ChatGLM3-shaped config and the run's options."""

    def trained_layer_count(self, config, options: object) -> int:
        """How many of the last GLM blocks train their linear weights (they keep those layers' inputs)."""
        return config.num_layers if self.trains_base_weights else 0

    def adapted_modules(self, config, options: object) -> tuple[str, ...]:
        """Linear layers that carry a trained adapter in every block (they keep their inputs)."""
        return ()

    def adapter_input_bytes(self, options: object, fan_in: int, element_bytes: int, device_type: str) -> float:
        """Bytes per token an adapted linear layer keeps for its adapter's backward pass on `device_type` (cpu,
        cuda; see adapted_modules)."""
        return 0

    def prefix_tokens(self, options: object) -> int:
        """Virtual tokens the method puts before every row in each layer's attention (their keys/values are kept)."""
        return 0

    def quantized_variant(self) -> "str | None":
        """The method to suggest with a 4-bit base when memory is short (None: quantization does not apply)."""
        return None

    # ---- preference tuning --------------------------------------------------------------------------------------

    def reference_context(self, model: nn.Module) -> "contextlib.AbstractContextManager | None":
        """A context in which the (unwrapped) training model computes as the preference reference, i.e. without
        what this method trains; None when the method changes the base weights themselves, so the reference
        log-probabilities must be computed once before training (finetune.preference caches them with the data)."""
        return None

    def reference_description(self) -> str:
        """How the preference reference is obtained, for training_record.json."""
        return "log-probabilities of the starting model, computed in one pass before training and cached with the data"


def mixed_precision_dtype(training_args: object) -> torch.dtype:
    """bf16 with --bf16, fp16 with --fp16, else fp32 (training arguments read duck-typed)."""
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    if getattr(training_args, "fp16", False):
        return torch.float16
    return torch.float32


def load_base_model(model_args: ModelArguments, dtype: torch.dtype) -> PreTrainedModel:
    """Load the base ChatGLM3 model in `dtype` (quantized when asked), with a prefix encoder for P-Tuning v2."""
    load_kwargs: dict = {
        "dtype": dtype,
        "pre_seq_len": model_args.pre_seq_len,
        "prefix_projection": model_args.prefix_projection,
    }
    if model_args.quantization_bit:
        check_quantization_available(model_args.quantization_bit)
        load_kwargs["quantization_config"] = quantization_config(model_args.quantization_bit)
        load_kwargs["dtype"] = COMPUTE_DTYPE
        device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
        load_kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs)


def upcast_trainable_parameters(model: nn.Module) -> None:
    """Store every trainable parameter in fp32 (the frozen base may stay in bf16/fp16 or be quantized)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def parameter_size(parameter: nn.Parameter) -> int:
    """Elements of a parameter; DeepSpeed ZeRO-3 keeps the full size in `ds_numel` (the local tensor is empty)."""
    return getattr(parameter, "ds_numel", parameter.numel())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(parameter_size(parameter) for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter_size(parameter) for parameter in model.parameters())
    return trainable, total


def prepare_quantized_base(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze a quantized base for training: non-quantized weights in fp32, the embedding and output layer in bf16.

    Activation checkpointing is left to the recompute plan / --gradient_checkpointing (non-reentrant). The frozen
    embedding and output layer go back to 16 bits: in fp32 they would take 2 GiB more for ChatGLM3-6B.
    """
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.get_input_embeddings().to(COMPUTE_DTYPE)
    model.get_output_embeddings().to(COMPUTE_DTYPE)
    return model
