"""QLoRA: LoRA adapters on a base quantized to 4 or 8 bits (finetune.quantization's policy)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.methods.lora import LoRA, LoRAOptions
from finetune.quantization import COMPUTE_DTYPE, QUANTIZATION_BITS


@dataclass
class QuantizationOptions:
    """The quantized base's flag (QLoRA's, taken by P-Tuning v2 too); a part of the training command line."""

    quantization_bit: int | None = field(
        default=None,
        metadata={
            "help": "Load the frozen base in 4-bit NF4 (QLoRA with --lora_rank) or 8-bit with bitsandbytes, on a CUDA "
            "GPU (bitsandbytes>=0.50 also runs it on the CPU, slowly: for tests). Works with LoRA and P-Tuning v2, "
            "not with full fine-tuning."
        },
    )

    def check_options(self) -> None:
        """0 means no quantization; otherwise 4 or 8 bits."""
        if self.quantization_bit == 0:
            self.quantization_bit = None
        if self.quantization_bit is not None and self.quantization_bit not in QUANTIZATION_BITS:
            raise ValueError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")


class QLoRA(LoRA):
    """LoRA whose base is loaded quantized (--quantization_bit with --lora_rank); saved as a LoRA adapter."""

    name = "qlora"
    options = (LoRAOptions, QuantizationOptions)
    needs_quantized_base = True

    def base_dtype(self, training_args) -> torch.dtype:
        """The quantization policy's compute dtype."""
        return COMPUTE_DTYPE

    def quantized_variant(self) -> None:
        """Already quantized."""
        return
