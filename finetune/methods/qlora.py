"""QLoRA: LoRA adapters on a base quantized to 4 or 8 bits (finetune.quantization's policy)."""

import torch

from finetune.methods.lora import LoRA
from finetune.quantization import COMPUTE_DTYPE


class QLoRA(LoRA):
    """LoRA whose base is loaded quantized (--quantization_bit with --lora_rank); saved as a LoRA adapter."""

    name = "qlora"

    def base_dtype(self, training_args) -> torch.dtype:
        """The quantization policy's compute dtype."""
        return COMPUTE_DTYPE

    def quantized_variant(self) -> None:
        """Already quantized."""
        return
