"""Build the model to train for a method: P-Tuning v2, LoRA, QLoRA (4/8-bit base) or full fine-tuning.

Whatever the base model's dtype, every trainable parameter is kept in fp32: the base is frozen in bf16/fp16 (from
--bf16/--fp16) while the prefix encoder or LoRA adapters train in fp32; full fine-tuning loads the model in fp32.
"""

import importlib.metadata
import importlib.util
import logging
import os
import warnings

import torch
from packaging.version import Version
from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, TrainingArguments

from finetune.arguments import METHOD_FULL, METHOD_LORA, METHOD_PTUNING, METHOD_QLORA, ModelArguments

logger = logging.getLogger(__name__)

PREFIX_ENCODER_MODULE = "transformer.prefix_encoder"
# The first bitsandbytes release whose 4/8-bit layers run (slowly) on the CPU, which is how the tests train QLoRA.
BITSANDBYTES_CPU_VERSION = Version("0.50")
# Never quantized: the vocabulary projection (quality) and the prefix encoder (it is what P-Tuning trains).
UNQUANTIZED_MODULES = ["output_layer", "prefix_encoder"]


def check_quantization_available(bits: int) -> None:
    """Raise RuntimeError, saying what to do, when bitsandbytes is missing, or too old to quantize without CUDA."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"--quantization_bit {bits} needs the bitsandbytes package, which is not installed: "
            "`pip install -r requirements-gpu.txt` (or `pip install bitsandbytes`), or leave out --quantization_bit"
        )
    installed = Version(importlib.metadata.version("bitsandbytes"))
    if not torch.cuda.is_available() and installed < BITSANDBYTES_CPU_VERSION:
        raise RuntimeError(
            f"--quantization_bit {bits} without a CUDA GPU needs bitsandbytes>={BITSANDBYTES_CPU_VERSION} (its CPU "
            f"backend), but {installed} is installed: `pip install -U bitsandbytes`, run on a GPU machine, or leave "
            "out --quantization_bit"
        )


def base_dtype(training_args: TrainingArguments) -> torch.dtype:
    """Dtype of the frozen base weights: bf16 with --bf16, fp16 with --fp16, else fp32."""
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def quantization_config(bits: int) -> BitsAndBytesConfig:
    """bitsandbytes settings: 4-bit NF4 with double quantization and bf16 compute, or LLM.int8() 8-bit."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)


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
        load_kwargs["dtype"] = torch.bfloat16
        device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
        load_kwargs["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **load_kwargs)


def freeze_all_but_prefix_encoder(model: PreTrainedModel) -> None:
    """Make the prefix encoder the only trainable part of a P-Tuning v2 model."""
    encoder = model.transformer.prefix_encoder
    if encoder is None:
        raise ValueError("P-Tuning v2 needs a model built with pre_seq_len; the loaded model has no prefix encoder")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)


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


def apply_method(model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
    """Freeze/wrap a loaded base model for the method; returns the model to hand to the Trainer."""
    method = model_args.method
    if model_args.quantization_bit:
        # Freezes everything and casts the non-quantized weights to fp32; activation checkpointing is left to the
        # recompute plan / --gradient_checkpointing (non-reentrant). The frozen embedding and output layer go back to
        # 16 bits: in fp32 they would take 2 GiB more for ChatGLM3-6B, with nothing trained in them.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model.get_input_embeddings().to(torch.bfloat16)
        model.get_output_embeddings().to(torch.bfloat16)
    if method == METHOD_PTUNING:
        freeze_all_but_prefix_encoder(model)
    elif method in (METHOD_LORA, METHOD_QLORA):
        with warnings.catch_warnings():
            # peft probes the model's deprecated `is_gradient_checkpointing` alias, which warns on every LoRA run.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            model = get_peft_model(model, lora_config(model_args))
    elif method == METHOD_FULL:
        model.requires_grad_(True)
    upcast_trainable_parameters(model)
    return model


def build_model(model_args: ModelArguments, training_args: TrainingArguments) -> nn.Module:
    """Load the base model and prepare it for the method, logging how many parameters train."""
    dtype = torch.float32 if model_args.method == METHOD_FULL else base_dtype(training_args)
    model = apply_method(load_base_model(model_args, dtype), model_args)
    trainable, total = count_parameters(model)
    logger.info(
        "method %s: %d trainable of %d parameters (%.4f%%)",
        model_args.method,
        trainable,
        total,
        100 * trainable / total,
    )
    return model
