"""DoRA (weight-decomposed low-rank adaptation) through PEFT: LoRA whose adapted weights also learn a per-output
magnitude; selected with `--method dora --lora_rank N`, saved as a PEFT adapter folder that loads like LoRA's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.methods.lora import LoRA
from finetune.model.shapes import linear_shapes

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments


class DoRA(LoRA):
    """LoRA adapters with PEFT's `use_dora`; the checkpoint is a LoRA adapter folder whose config says use_dora."""

    name = "dora"
    uses_dora = True
    setting_names = (*LoRA.setting_names, "use_dora")

    def record_fields(self, model_args: ModelArguments) -> dict:
        """The LoRA settings, marked as DoRA."""
        return {**super().record_fields(model_args), "use_dora": True}

    def trainable_parameter_count(self, config, options: object) -> int:
        """The low-rank adapters plus one magnitude per output feature of every adapted layer."""
        shapes = linear_shapes(config)
        magnitudes = config.num_layers * sum(shapes[name][1] for name in self.adapted_modules(config, options))
        return super().trainable_parameter_count(config, options) + magnitudes

    def quantized_variant(self) -> None:
        """DoRA on a 4-bit base is not offered (PEFT's DoRA dequantizes every weight on each step)."""
        return
