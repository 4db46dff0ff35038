"""The fine-tuning methods, one module each, behind one interface (finetune.methods.base.FinetuneMethod).

Training, resume, evaluation, inference, export and the memory preflight ask the method object for everything
method-specific; to add a method, write one module with a FinetuneMethod subclass and list it in `METHODS`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedModel, TrainingArguments

from finetune.methods.base import FinetuneMethod, count_parameters
from finetune.methods.dora import DoRA
from finetune.methods.freeze import FreezeTuning
from finetune.methods.full import FullFinetuning
from finetune.methods.lora import LoRA
from finetune.methods.ptuning import PTuningV2
from finetune.methods.qlora import QLoRA

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments

logger = logging.getLogger(__name__)

METHODS: dict[str, FinetuneMethod] = {
    method.name: method for method in (PTuningV2(), LoRA(), QLoRA(), DoRA(), FreezeTuning(), FullFinetuning())
}
# Every method's options dataclass, once each: finetune.arguments.ModelArguments is made of them.
METHOD_OPTIONS: tuple[type, ...] = tuple(
    dict.fromkeys(options for method in METHODS.values() for options in method.options)
)


def method_options(name: str, **values: object) -> object:
    """The options of method `name` (its options dataclasses as one object), checked; e.g. for the memory preflight:
    method_options("lora", lora_rank=8)."""
    method = method_named(name)
    options_class = dataclasses.make_dataclass(f"{type(method).__name__}Options", [], bases=method.options[::-1])
    options = options_class(**values)
    for part in method.options:
        part.check_options(options)
    method.check_options(options)
    return options


def selected_method_name(options: object) -> str:
    """The method a run asks for: --method, else the one whose size option is set (QLoRA for LoRA's with
    --quantization_bit), else full fine-tuning; ValueError when size options of two methods are set."""
    selecting = [method for method in METHODS.values() if method.selecting_option and method.options]
    chosen = {method.selecting_option: method for method in reversed(selecting)}
    given = [f"--{name} ({method.name})" for name, method in chosen.items() if getattr(options, name, None)]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(sorted(given))} select different methods; pass only one")
    name = getattr(options, "method", None)
    quantized = bool(getattr(options, "quantization_bit", None))
    if name and not (name == LoRA.name and quantized):
        return name
    for option, method in chosen.items():
        if getattr(options, option, None):
            return QLoRA.name if method.name == LoRA.name and quantized else method.name
    return FullFinetuning.name


def method_named(name: str) -> FinetuneMethod:
    """The method recorded or selected as `name`; ValueError listing the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown fine-tuning method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_of(model_args: ModelArguments) -> FinetuneMethod:
    """The method the run's arguments select, checked to have its own settings and none of another method's."""
    method = method_named(model_args.method)
    foreign = sorted({other.selecting_option for other in METHODS.values()} - {method.selecting_option, None})
    given = [name for name in foreign if getattr(model_args, name, None)]
    if given:
        raise ValueError(f"--{given[0]} does not belong to method {method.name!r}; drop it or choose its method")
    if method.selecting_option and not getattr(model_args, method.selecting_option, None):
        raise ValueError(f"method {method.name!r} needs --{method.selecting_option} N")
    return method


def recognise_checkpoint(folder: Path) -> FinetuneMethod | None:
    """The method whose files a folder without training record holds, or None."""
    return next((method for method in METHODS.values() if method.recognises(folder)), None)


def apply_method(model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
    """Make a loaded base trainable for the run's method (see FinetuneMethod.prepare)."""
    return method_of(model_args).prepare(model, model_args)


def build_model(model_args: ModelArguments, training_args: TrainingArguments) -> nn.Module:
    """Load the base model and make it trainable for the run's method, logging how many parameters train."""
    method = method_of(model_args)
    model = method.build_trainable_model(model_args, training_args)
    trainable, total = count_parameters(model)
    logger.info(
        "method %s: %d trainable of %d parameters (%.4f%%)", method.name, trainable, total, 100 * trainable / total
    )
    return model
