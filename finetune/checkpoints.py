"""Loading any checkpoint for inference: the folder is opened once (finetune.checkpoint_format.open_checkpoint) and
its method (finetune.methods) loads it; a whole model without a record is a base model (the official chatglm3-6b, an
export). The base of a quantized run is rebuilt with the quantization its record names.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import psutil
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizer

from finetune.checkpoint_format import (
    ALLOW_OTHER_BASE_FLAG,
    TOKENIZER_FILE,
    TRAINING_RECORD,
    Checkpoint,
    open_checkpoint,
    read_training_record,
)
from finetune.methods import method_named, recognise_checkpoint
from finetune.methods.base import CheckpointKind
from finetune.model.checkpoint_files import CheckpointError, check_chatglm_folder
from finetune.model.configuration import ChatGLMConfig
from finetune.model.shapes import base_parameter_count
from finetune.quantization import QUANTIZATION_BITS, inference_quantization, quantization_config

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "mps")
# On the CPU, dtype "auto" loads fp32 unless the fp32 weights would take more than this share of the available RAM.
CPU_FP32_MEMORY_SHARE = 0.8

logger = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The environment cannot load a model as asked (device, dtype or quantization unavailable)."""


def check_tokenizer_folder(path: str | Path, knob: str) -> None:
    """Raise CheckpointError when a local folder the tokenizer is read from lacks tokenizer.model."""
    folder = Path(path)
    if folder.is_dir() and not (folder / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{folder}: {TOKENIZER_FILE} is missing (the SentencePiece tokenizer); copy it from the chatglm3-6b folder "
            f"the model came from, or pass a folder that has it with {knob}"
        )


def check_base_model_folder(path: str | Path, knob: str = "--model_name_or_path") -> None:
    """Raise CheckpointError unless `path` is a whole ChatGLM3 model with its tokenizer (the official chatglm3-6b, an
    export, or a full fine-tune): not a LoRA or P-Tuning v2 checkpoint, not another architecture, nothing missing.

    The one check of a base-model folder before anything is loaded (training, evaluation, inference, export, server).
    """
    folder = Path(path)
    if folder.is_dir():
        record = read_training_record(folder)
        recorded = method_named(str(record["method"])) if record else None
        on_base = recorded if recorded is not None and recorded.needs_base else recognise_checkpoint(folder)
        if on_base is not None:
            trained_on = f" ({record['base_model']})" if record and record.get("base_model") else ""
            raise CheckpointError(
                f"{folder}: is a {on_base.name} fine-tuning checkpoint, not a base model; pass the base model it "
                f"was trained on{trained_on} as {knob} (to continue training it, use --resume_from_checkpoint with its "
                "run's --output_dir)"
            )
    check_chatglm_folder(folder)
    check_tokenizer_folder(folder, knob)


def resolve_base(checkpoint: Checkpoint, override: str | None = None) -> str:
    """Base model of an adapter or prefix checkpoint: --base, else the one its record or adapter_config.json names."""
    if override:
        return override
    if checkpoint.base is None:
        raise CheckpointError(
            f"{checkpoint.folder}: cannot tell which base model this checkpoint was trained on (no {TRAINING_RECORD} "
            "with 'base_model'); pass the base model folder with --base /path/to/chatglm3-6b"
        )
    base = checkpoint.base
    looks_local = os.path.isabs(base) or base.startswith(".")
    if looks_local and not os.path.isdir(base):
        raise CheckpointError(
            f"{checkpoint.base_source}: names base model {base}, which does not exist on this machine; pass its "
            "location with --base"
        )
    return base


def open_base(checkpoint: Checkpoint, override: str | None = None, allow_other_base: bool = False) -> str:
    """The base an adapter or prefix checkpoint loads on (see resolve_base), checked to be the base it was trained on
    (Checkpoint.check_base): the one check inference, evaluation, export and the server make."""
    base = resolve_base(checkpoint, override)
    checkpoint.check_base(base, allow_other_base)
    return base


def resolve_device(device: str) -> str:
    """The torch device for "auto" (cuda, then mps, then cpu); ModelLoadError for an unavailable one."""
    if device not in DEVICES:
        raise ModelLoadError(f"unknown device {device!r}; expected one of {DEVICES}")
    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (device == "cuda" and not cuda) or (device == "mps" and not mps):
        raise ModelLoadError(f"device {device!r} was asked for but is not available here; use --device cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str, parameters: int | None = None) -> torch.dtype:
    """The weight dtype for "auto" (bf16 on CUDA if supported, else fp16; fp16 on MPS; fp32 on CPU) or a name.

    On the CPU, a model of `parameters` weights whose fp32 copy would not fit the available RAM loads in bf16
    (chatglm3-6b in fp32 takes 23 GiB).
    """
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        available = psutil.virtual_memory().available
        if parameters is not None and 4 * parameters > CPU_FP32_MEMORY_SHARE * available:
            logger.warning(
                "dtype auto on the CPU: the fp32 weights (%.1f GiB) would not fit the available RAM (%.1f GiB); "
                "loading in bfloat16 (pass --dtype float32 to insist)", 4 * parameters / 2**30, available / 2**30,
            )
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def folder_parameter_count(folder: str) -> int | None:
    """The base weights of a local model folder's config (None for a hub id or a folder without config.json)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return None
    return base_parameter_count(ChatGLMConfig.from_pretrained(folder))


def choose_tokenizer_source(checkpoint: Path, base: str, tokenizer: str | None) -> str:
    """Where the tokenizer comes from: --tokenizer, else the checkpoint if it holds tokenizer files, else the base."""
    if tokenizer:
        return tokenizer
    if (checkpoint / TOKENIZER_FILE).is_file():
        return str(checkpoint)
    return base


def load_for_inference(
    checkpoint: str | Path | Checkpoint,
    base: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantization_bit: int | None = None,
    merge_lora: bool = False,
    allow_other_base: bool = False,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizer, CheckpointKind]:
    """Load any checkpoint (a folder, or one opened already) ready for generation: (model in eval mode, tokenizer,
    kind). An adapter or prefix checkpoint on another base than it was trained on is refused unless
    `allow_other_base`."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    folder, method = checkpoint.folder, checkpoint.method
    device = resolve_device(device)
    try:
        bits = inference_quantization(quantization_bit, checkpoint.quantization_bit, device)
    except (ValueError, RuntimeError) as error:
        raise ModelLoadError(str(error)) from error
    if checkpoint.needs_base:
        base_path = open_base(checkpoint, base, allow_other_base)
        tokenizer_fallback = base_path
        if Path(base_path).is_dir():
            check_base_model_folder(base_path, knob="--base")
    else:
        base_path = str(folder)
        tokenizer_fallback = base or checkpoint.base or base_path
        check_chatglm_folder(folder)
    check_tokenizer_folder(choose_tokenizer_source(folder, tokenizer_fallback, tokenizer), knob="--tokenizer")
    load_kwargs = {
        "dtype": resolve_dtype(dtype, device, folder_parameter_count(base_path)),
        "device_map": {"": device},
        "quantization_config": quantization_config(bits) if bits else None,
    }
    if method is not None:
        model = method.load_for_inference(folder, checkpoint.settings, base_path, load_kwargs, merge_lora=merge_lora)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
        if model.transformer.prefix_encoder is not None:
            model.transformer.prefix_encoder.float()
    model.eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(choose_tokenizer_source(folder, tokenizer_fallback, tokenizer))
    return model, loaded_tokenizer, checkpoint.kind


def add_loading_arguments(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    """The command-line options that choose and load a checkpoint (shared by evaluate, inference and the server).

    With `several_models`, --model may be repeated (a list) and takes NAME=CKPT as well as CKPT.
    """
    if several_models:
        parser.add_argument(
            "--model",
            required=True,
            action="append",
            help="checkpoint folder (P-Tuning v2, LoRA, full or a base model), or NAME=CKPT; repeat to serve several",
        )
    else:
        parser.add_argument("--model", required=True, help="checkpoint folder: P-Tuning v2, LoRA, full or a base model")
    parser.add_argument("--base", help="base model folder (default: from training_record.json / adapter_config.json)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's, else the base model's)")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--quantization_bit",
        type=int,
        choices=QUANTIZATION_BITS,
        help="load the base in 4/8 bit (bitsandbytes; default: as the checkpoint's training_record.json says)",
    )
    add_allow_other_base_argument(parser)


def add_allow_other_base_argument(parser: argparse.ArgumentParser) -> None:
    """The --allow_other_base option (inference, evaluation, export and the server)."""
    parser.add_argument(
        ALLOW_OTHER_BASE_FLAG,
        action="store_true",
        help="load an adapter or prefix checkpoint on a base other than the one it was trained on (by default "
        "refused: its training_record.json holds a fingerprint of that base)",
    )


def load_from_arguments(
    args: argparse.Namespace, merge_lora: bool = False, checkpoint: Checkpoint | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizer, CheckpointKind]:
    """load_for_inference with the options of add_loading_arguments (--model, unless opened already as
    `checkpoint`), reporting what was loaded on stderr."""
    model, tokenizer, kind = load_for_inference(
        checkpoint if checkpoint is not None else args.model,
        base=args.base,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        quantization_bit=args.quantization_bit,
        merge_lora=merge_lora,
        allow_other_base=args.allow_other_base,
    )
    print(f"loaded {kind.value} checkpoint {args.model} on {model.device}", file=sys.stderr)
    return model, tokenizer, kind
