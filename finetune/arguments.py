"""Arguments of the training entry point: model/method, data, and transformers' Seq2SeqTrainingArguments.

They come from the command line (`--name value`), optionally after one `.json` / `.yaml` config file whose keys are
the same names: `python -m finetune.train configs/lora.yaml --learning_rate 1e-4` (flags on top of the file).
"""

import argparse
import dataclasses
import difflib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments

from finetune.methods import METHOD_OPTIONS, METHODS, selected_method_name
from finetune.recompute import RECOMPUTE_AUTO, RECOMPUTE_CHOICES

BASE_MODEL_ENV = "BASE_MODEL_PATH"
CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")
# Token budgets of a run that sets none (a recipe in configs/ sets its own); evaluation and chat truncate prompts to the
# same source budget by default.
DEFAULT_MAX_SOURCE_LENGTH = 1024
DEFAULT_MAX_TARGET_LENGTH = 128
DEFAULT_MAX_SEQ_LENGTH = 2048


@dataclass
class BaseModelChoice:
    """The base model and the method: the first fields of ModelArguments (also by position)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": f"Folder of the base ChatGLM3 model (default: the {BASE_MODEL_ENV} environment variable)."},
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": f"The fine-tuning method (a module of finetune/methods/): {', '.join(METHODS)}. Default: the "
            "method the flags select: --pre_seq_len P-Tuning v2, --lora_rank LoRA (QLoRA with --quantization_bit), "
            "--trainable_layers freeze tuning, none of them full fine-tuning."
        },
    )


@dataclass
class ModelArguments(*reversed(METHOD_OPTIONS), BaseModelChoice):
    """The base model and the fine-tuning method (--method, or the one its own flags select), with every method's
    options (their dataclasses live in the method's module in finetune/methods/)."""

    recompute: str = field(
        default=RECOMPUTE_AUTO,
        metadata={
            "help": "Activation recomputation in the backward pass, per layer: 'none' keeps every activation "
            "(fastest), "
            "'mlp' recomputes each layer's up-projection and SwiGLU (the widest activations), 'full' recomputes whole "
            "layers (leanest, as --gradient_checkpointing), 'auto' picks the least recomputation whose memory "
            "estimate fits the GPU (or --memory_budget_gib); on CPU auto means none. --gradient_checkpointing "
            "overrides it."
        },
    )
    allow_other_base: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint although --model_name_or_path is not the base it was trained on (by "
            "default refused: training_record.json holds a fingerprint of that base)."
        },
    )
    memory_budget_gib: float | None = field(
        default=None,
        metadata={
            "help": "GPU memory in GiB that --recompute auto plans for (default: 90 percent of the GPU's free memory)."
        },
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            self.model_name_or_path = os.environ.get(BASE_MODEL_ENV) or None
        if not self.model_name_or_path:
            raise ValueError(
                f"no base model: pass --model_name_or_path PATH (or model_name_or_path in the config file), or set "
                f"the {BASE_MODEL_ENV} environment variable"
            )
        for options in METHOD_OPTIONS:
            options.check_options(self)
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, got {self.recompute!r}")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ValueError(f"--memory_budget_gib must be a positive number of GiB, got {self.memory_budget_gib}")
        self.method = selected_method_name(self)
        method = METHODS.get(self.method)
        if getattr(method, "needs_quantized_base", False) and not self.quantization_bit:
            raise ValueError(
                f"method {self.method!r} trains on a quantized base: add --quantization_bit 4 (or 8), or choose "
                "--method lora for a bf16/fp16 base"
            )
        trains_base = getattr(method, "trains_base_weights", False)
        if self.quantization_bit and trains_base:
            raise ValueError(
                f"--quantization_bit {self.quantization_bit} cannot be used with {self.method} fine-tuning (quantized "
                "weights are not trainable); add --lora_rank N for QLoRA or --pre_seq_len N for P-Tuning v2"
            )


@dataclass
class DataArguments:
    """Training, validation and test files and how they are encoded and batched."""

    train_file: str | None = field(default=None, metadata={"help": "Training data (.jsonl or .json)."})
    validation_file: str | None = field(default=None, metadata={"help": "Data for --do_eval (.jsonl or .json)."})
    test_file: str | None = field(default=None, metadata={"help": "Data for --do_predict (.jsonl or .json)."})
    data_format: str | None = field(
        default=None,
        metadata={"help": "input_output or conversations (default: detected from the first record)."},
    )
    max_source_length: int = field(
        default=DEFAULT_MAX_SOURCE_LENGTH,
        metadata={"help": "input_output data: token budget of [gMASK] sop + prompt."},
    )
    max_target_length: int = field(
        default=DEFAULT_MAX_TARGET_LENGTH,
        metadata={"help": "input_output data: token budget of the response (eos comes on top)."},
    )
    max_seq_length: int = field(
        default=DEFAULT_MAX_SEQ_LENGTH, metadata={"help": "conversations data: total tokens per example."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for encoding the data (datasets' num_proc)."}
    )
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder for the encoded-data cache (default: the datasets cache)."}
    )
    skip_invalid: bool = field(
        default=False, metadata={"help": "Leave invalid records out (they are logged) instead of stopping."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several training examples into each row (segment-id attention masks)."},
    )
    packing_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed row (default: the longest example the length limits allow)."},
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad batch rows to a multiple of this many tokens (e.g. 8 for tensor cores)."}
    )
    print_first_example: bool = field(
        default=True,
        metadata={"help": "Print the first training example as text with the learned spans marked >>> ... <<<."},
    )
    print_token_table: bool = field(
        default=False, metadata={"help": "Also print the first training example token by token with its labels."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test examples."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens to generate per example in eval/predict (default: max_target_length)."},
    )

    def __post_init__(self) -> None:
        for name in ("max_source_length", "max_target_length", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive number of tokens, got {getattr(self, name)}")
        for name in (
            "preprocessing_num_workers",
            "packing_length",
            "pad_to_multiple_of",
            "max_train_samples",
            "max_eval_samples",
            "max_predict_samples",
            "max_new_tokens",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive number, got {value}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, Seq2SeqTrainingArguments)


def _numeric_type(annotation: object) -> type | None:
    """int or float when a dataclass field annotation is that type (optionally `| None`), else None."""
    if annotation in (int, float):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1 and members[0] in (int, float):
            return members[0]
    return None


def _to_number(text: str, number_type: type) -> int | float:
    """Parse `text` as a float, or as an int (also written like 1e3) when the field is an int."""
    number = float(text)
    if number_type is float:
        return number
    if not number.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


def _coerce_numbers(values: dict, source: Path) -> dict:
    """Convert numbers a config file holds as strings (YAML reads `2e-5` as a string) to the field's type."""
    numeric_fields = {
        name: _numeric_type(annotation)
        for argument_class in ARGUMENT_CLASSES
        for name, annotation in typing.get_type_hints(argument_class).items()
    }
    coerced = dict(values)
    for name, value in values.items():
        number_type = numeric_fields.get(name)
        if number_type is None or not isinstance(value, str):
            continue
        try:
            coerced[name] = _to_number(value, number_type)
        except ValueError as error:
            raise ValueError(f"{source}: {name} must be a {number_type.__name__}, got {value!r}") from error
    return coerced


def read_config_file(path: Path) -> dict:
    """The argument mapping of a .json or .yaml config file, with errors naming the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from error
    else:
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from error
    if not isinstance(values, dict):
        raise TypeError(f"{path}: a config file must hold a mapping of argument names to values")
    return _coerce_numbers(values, path)


# transformers 5 renamed these TrainingArguments (the old names still work but warn on every run); the project keeps
# documenting the familiar names and passes them on under the new ones.
RENAMED_TRAINING_ARGUMENTS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _renamed_flag(argument: str) -> str:
    """`--gradient_checkpointing[=value]` as `--activation_checkpointing[=value]`; other arguments unchanged."""
    name, equals, value = argument.partition("=")
    new_name = RENAMED_TRAINING_ARGUMENTS.get(name.removeprefix("--")) if name.startswith("--") else None
    return f"--{new_name}{equals}{value}" if new_name else argument


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one-line ValueErrors (the entry point prints them, exit status 2), not the
    usage text followed by argparse's message."""

    def error(self, message: str) -> NoReturn:
        """Raise the argparse error as a ValueError with a pointer to --help."""
        raise ValueError(f"{message} (python -m finetune.train --help lists the flags)")

    def check_no_leftovers(self, leftovers: list[str]) -> None:
        """Raise ValueError for the first argument no flag took: an unknown flag (with the closest known one)."""
        if not leftovers:
            return
        first = next((argument for argument in leftovers if argument.startswith("-")), leftovers[0])
        name = first.split("=", 1)[0]
        if not name.startswith("-"):
            self.error(f"unexpected argument {first!r}: flags are written --name value")
        flags = [option for option in self._option_string_actions if option.startswith("--")]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        self.error(f"unknown flag {name}" + (f"; did you mean {close[0]}?" if close else ""))


def parse_arguments(
    argv: list[str] | None = None, argument_classes: tuple[type, ...] = ARGUMENT_CLASSES
) -> tuple:
    """Parse `[CONFIG.yaml|.json] [--flag value ...]` into one object per argument class (ModelArguments,
    DataArguments, Seq2SeqTrainingArguments unless other classes are given): the config file's values replace the
    dataclasses' defaults and the flags go on top of the file."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser(argument_classes)
    if argv and not argv[0].startswith("-") and Path(argv[0]).suffix in CONFIG_FILE_SUFFIXES:
        path = Path(argv.pop(0))
        values = read_config_file(path)
        unknown = sorted(set(values) - {item.name for cls in argument_classes for item in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown argument name(s) {unknown}; see `--help` for the accepted names")
        parser.set_defaults(**{RENAMED_TRAINING_ARGUMENTS.get(key, key): value for key, value in values.items()})
    namespace, leftovers = parser.parse_known_args([_renamed_flag(argument) for argument in argv])
    parser.check_no_leftovers(leftovers)
    fall_back_from_unsupported_precision(namespace)
    values = vars(namespace)
    return tuple(
        argument_class(**{item.name: values[item.name] for item in dataclasses.fields(argument_class) if item.init})
        for argument_class in argument_classes
    )


def fall_back_from_unsupported_precision(namespace: argparse.Namespace) -> None:
    """Turn a mixed-precision request this machine cannot run as asked into what it can, saying so in one line,
    instead of transformers' traceback: bf16 on a GPU without bf16 becomes fp16; without a CUDA GPU the run goes to
    the CPU (bf16 autocast works there; fp16 does not and becomes fp32)."""
    if getattr(namespace, "use_cpu", False) or not (namespace.bf16 or namespace.fp16):
        return
    if torch.cuda.is_available():
        if namespace.bf16 and not torch.cuda.is_bf16_supported():
            print("note: this GPU does not support bf16; training in fp16 instead (--fp16)", file=sys.stderr)
            namespace.bf16, namespace.fp16 = False, True
        return
    if namespace.bf16:
        print("note: --bf16 asked for, but there is no CUDA GPU: training on the CPU with bf16 autocast "
              "(pass --use_cpu to say so and silence this note)", file=sys.stderr)  # fmt: skip
    else:
        print("note: --fp16 needs a CUDA GPU and there is none: training in fp32 on the CPU", file=sys.stderr)
        namespace.fp16 = False
    namespace.use_cpu = True
