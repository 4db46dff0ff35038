"""Loading any checkpoint for inference: the one place where a checkpoint's kind is detected.

Kinds (see the checkpoint format in the project notes):
  LORA    a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) on top of a base model
  PREFIX  P-Tuning v2: config.json with pre_seq_len + weights holding only `transformer.prefix_encoder.*`
          (our model.safetensors or the official pytorch_model.bin), on top of a base model
  FULL    a whole model saved by full fine-tuning (training_record.json says method "full")
  BASE    any other whole model folder: the official chatglm3-6b, an exported model
"""

import argparse
import enum
import importlib.util
import os
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizer

from finetune.model.checkpoint_files import (
    CheckpointError,
    check_chatglm_folder,
    check_weight_file,
    read_json_file,
    weight_files,
)
from finetune.model.prefix_checkpoint import PREFIX_KEY_PREFIX, find_prefix_weights, load_prefix_checkpoint

TRAINING_RECORD = "training_record.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DEVICES = ("auto", "cpu", "cuda", "mps")
QUANTIZATION_BITS = (4, 8)


class CheckpointKind(enum.Enum):
    """What a checkpoint folder holds."""

    PREFIX = "ptuning"
    LORA = "lora"
    FULL = "full"
    BASE = "base"


class ModelLoadError(ValueError):
    """The environment cannot load a model as asked (device, dtype or quantization unavailable)."""


def require_checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder as a Path; CheckpointError when it does not exist."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such checkpoint folder; pass the folder written by training or export")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file, not a checkpoint folder; pass the folder that holds it")
    return folder


def read_training_record(path: str | Path) -> dict | None:
    """The folder's training_record.json, or None when it has none."""
    record_path = Path(path) / TRAINING_RECORD
    if not record_path.is_file():
        return None
    record = read_json_file(record_path)
    if not isinstance(record, dict) or "method" not in record:
        raise CheckpointError(f"{record_path}: not a training record (expected an object with a 'method' field)")
    return record


def weight_keys(path: Path) -> list[str]:
    """The tensor names stored in one weight file, read without loading the whole file where possible."""
    check_weight_file(path)
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def holds_only_prefix_weights(folder: Path) -> bool:
    """True when the folder's single weight file holds nothing but `transformer.prefix_encoder.*` tensors."""
    if any((folder / name).is_file() for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")):
        return False
    path = find_prefix_weights(folder)
    if path is None:
        return False
    keys = weight_keys(path)
    return bool(keys) and all(key.startswith(PREFIX_KEY_PREFIX) for key in keys)


def detect_checkpoint_kind(path: str | Path) -> CheckpointKind:
    """Tell whether a folder is a LoRA adapter, a prefix checkpoint, a full fine-tune or a plain model."""
    folder = require_checkpoint_folder(path)
    record = read_training_record(folder)
    method = record["method"] if record else None
    if (folder / ADAPTER_CONFIG).is_file():
        return CheckpointKind.LORA
    if method in ("lora", "qlora"):
        raise CheckpointError(
            f"{folder / TRAINING_RECORD} says method {method!r} but {ADAPTER_CONFIG} is missing; the checkpoint is "
            "incomplete - use another checkpoint folder or re-run the save"
        )
    if holds_only_prefix_weights(folder):
        return CheckpointKind.PREFIX
    if method == "ptuning":
        raise CheckpointError(
            f"{folder / TRAINING_RECORD} says method 'ptuning' but the folder has no weight file holding only "
            f"{PREFIX_KEY_PREFIX}* tensors (model.safetensors or pytorch_model.bin); the checkpoint is incomplete"
        )
    if (folder / "config.json").is_file() and weight_files(folder):
        return CheckpointKind.FULL if method == "full" else CheckpointKind.BASE
    raise CheckpointError(
        f"{folder}: not a checkpoint: expected {ADAPTER_CONFIG} (LoRA), prefix weights with config.json (P-Tuning v2) "
        "or config.json with model weights (a whole model)"
    )


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
        adapter = (folder / ADAPTER_CONFIG).is_file()
        method = record["method"] if record else "lora" if adapter else None
        if adapter or (method is not None and method != "full") or holds_only_prefix_weights(folder):
            trained_on = f" ({record['base_model']})" if record and record.get("base_model") else ""
            raise CheckpointError(
                f"{folder}: is a {method or 'ptuning'} fine-tuning checkpoint, not a base model; pass the base model it "
                f"was trained on{trained_on} as {knob} (to continue training it, use --resume_from_checkpoint with its "
                "run's --output_dir)"
            )
    check_chatglm_folder(folder)
    check_tokenizer_folder(folder, knob)


def resolve_base(path: str | Path, override: str | None = None) -> str:
    """Base model of an adapter or prefix checkpoint: --base, else training_record.json, else adapter_config.json."""
    if override:
        return override
    folder = require_checkpoint_folder(path)
    record = read_training_record(folder)
    if record and record.get("base_model"):
        base = str(record["base_model"])
        source = folder / TRAINING_RECORD
    elif (folder / ADAPTER_CONFIG).is_file() and read_json_file(folder / ADAPTER_CONFIG).get("base_model_name_or_path"):
        base = str(read_json_file(folder / ADAPTER_CONFIG)["base_model_name_or_path"])
        source = folder / ADAPTER_CONFIG
    else:
        raise CheckpointError(
            f"{folder}: cannot tell which base model this checkpoint was trained on (no {TRAINING_RECORD} with "
            "'base_model'); pass the base model folder with --base /path/to/chatglm3-6b"
        )
    looks_local = os.path.isabs(base) or base.startswith(".")
    if looks_local and not os.path.isdir(base):
        raise CheckpointError(
            f"{source}: names base model {base}, which does not exist on this machine; pass its location with --base"
        )
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


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The weight dtype for "auto" (bf16 on CUDA if supported, else fp16; fp16 on MPS; fp32 on CPU) or a name."""
    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def quantization_config(bits: int | None, device: str, compute_dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """A bitsandbytes config for 4- or 8-bit weights (never the output layer or prefix encoder), or None."""
    if bits is None:
        return None
    if bits not in QUANTIZATION_BITS:
        raise ModelLoadError(f"quantization_bit must be one of {QUANTIZATION_BITS}, got {bits}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            f"quantization_bit={bits} needs the bitsandbytes package, which is not installed; "
            "`pip install bitsandbytes` (CUDA GPUs only) or leave out --quantization_bit"
        )
    if device != "cuda":
        raise ModelLoadError(f"quantization_bit={bits} needs a CUDA GPU (device is {device}); leave it out on {device}")
    skip = ["output_layer", "prefix_encoder"]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip
    )


def prefix_settings(folder: Path) -> tuple[int, bool]:
    """pre_seq_len and prefix_projection of a prefix checkpoint, from its config.json (else training_record.json)."""
    config_path = folder / "config.json"
    source = read_json_file(config_path) if config_path.is_file() else read_training_record(folder)
    if not source or not source.get("pre_seq_len"):
        raise CheckpointError(
            f"{folder}: a P-Tuning v2 checkpoint needs config.json (or {TRAINING_RECORD}) with pre_seq_len set"
        )
    return int(source["pre_seq_len"]), bool(source.get("prefix_projection", False))


def adapter_weight_file(folder: Path) -> Path:
    """The adapter weight file of a LoRA folder, checked to be complete."""
    for name in ADAPTER_WEIGHT_NAMES:
        if (folder / name).is_file():
            check_weight_file(folder / name)
            return folder / name
    raise CheckpointError(f"{folder}: {ADAPTER_CONFIG} is there but no {' or '.join(ADAPTER_WEIGHT_NAMES)}")


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


def choose_tokenizer_source(checkpoint: Path, base: str, tokenizer: str | None) -> str:
    """Where the tokenizer comes from: --tokenizer, else the checkpoint if it holds tokenizer files, else the base."""
    if tokenizer:
        return tokenizer
    if (checkpoint / TOKENIZER_FILE).is_file():
        return str(checkpoint)
    return base


def load_for_inference(
    checkpoint: str | Path,
    base: str | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantization_bit: int | None = None,
    merge_lora: bool = False,
) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizer, CheckpointKind]:
    """Load any checkpoint kind ready for generation: (model in eval mode, tokenizer, kind)."""
    folder = require_checkpoint_folder(checkpoint)
    kind = detect_checkpoint_kind(folder)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    load_kwargs = {
        "dtype": torch_dtype,
        "device_map": {"": device},
        "quantization_config": quantization_config(quantization_bit, device, torch_dtype),
    }
    if kind in (CheckpointKind.PREFIX, CheckpointKind.LORA):
        base_path = resolve_base(folder, base)
        tokenizer_fallback = base_path
        if Path(base_path).is_dir():
            check_base_model_folder(base_path, knob="--base")
    else:
        base_path = str(folder)
        record = read_training_record(folder) or {}
        tokenizer_fallback = base or record.get("base_model") or base_path
        check_chatglm_folder(folder)
    check_tokenizer_folder(choose_tokenizer_source(folder, tokenizer_fallback, tokenizer), knob="--tokenizer")
    if kind is CheckpointKind.PREFIX:
        pre_seq_len, prefix_projection = prefix_settings(folder)
        model = AutoModelForCausalLM.from_pretrained(
            base_path, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection, **load_kwargs
        )
        model.transformer.prefix_encoder.float()
        load_prefix_checkpoint(model, folder)
    elif kind is CheckpointKind.LORA:
        model = load_lora_adapter(AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs), folder, base_path)
        if merge_lora:
            model = model.merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
        if model.transformer.prefix_encoder is not None:
            model.transformer.prefix_encoder.float()
    model.eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(choose_tokenizer_source(folder, tokenizer_fallback, tokenizer))
    return model, loaded_tokenizer, kind


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
    parser.add_argument("--quantization_bit", type=int, choices=(4, 8), help="load the base in 4/8 bit (bitsandbytes)")


def load_from_arguments(
    args: argparse.Namespace, merge_lora: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizer, CheckpointKind]:
    """load_for_inference with the options of add_loading_arguments, reporting what was loaded on stderr."""
    model, tokenizer, kind = load_for_inference(
        args.model,
        base=args.base,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        quantization_bit=args.quantization_bit,
        merge_lora=merge_lora,
    )
    print(f"loaded {kind.value} checkpoint {args.model} on {model.device}", file=sys.stderr)
    return model, tokenizer, kind
