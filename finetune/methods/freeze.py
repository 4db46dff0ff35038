"""Freeze tuning: train only the last N GLM blocks (--trainable_layers N), everything else frozen; the checkpoint is
the whole model, saved and loaded like a full fine-tune."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from transformers import PreTrainedModel

from finetune.methods.full import FullFinetuning
from finetune.model.shapes import layer_linear_weights, layer_small_parameters
from finetune.recompute import glm_blocks

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments


@dataclass
class FreezeOptions:
    """Freeze tuning's flag; a part of the training command line (finetune.arguments.ModelArguments)."""

    trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "Freeze tuning: train only the last N GLM blocks (the rest of the model stays frozen); setting "
            "it selects freeze tuning."
        },
    )

    def check_options(self) -> None:
        """A positive number of layers."""
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise ValueError(f"--trainable_layers must be a positive number of layers, got {self.trainable_layers}")


class FreezeTuning(FullFinetuning):
    """Train the last `trainable_layers` blocks in fp32; save the whole model."""

    name = "freeze"
    selecting_option = "trainable_layers"
    options = (FreezeOptions,)
    setting_names = ("trainable_layers",)

    def make_trainable(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Freeze everything, then unfreeze the last `trainable_layers` GLM blocks."""
        blocks = glm_blocks(model)
        if model_args.trainable_layers > len(blocks):
            raise ValueError(
                f"--trainable_layers {model_args.trainable_layers} is more than the model's {len(blocks)} layers; "
                f"pass at most {len(blocks)} (or leave it out for full fine-tuning)"
            )
        model.requires_grad_(False)
        for block in blocks[-model_args.trainable_layers :]:
            block.requires_grad_(True)
        return model

    def record_fields(self, model_args: ModelArguments) -> dict:
        """How many of the last layers trained (checked on resume)."""
        return {"trainable_layers": model_args.trainable_layers}

    def trainable_parameter_count(self, config, options: object) -> int:
        """The parameters of the trained blocks."""
        per_layer = layer_linear_weights(config) + layer_small_parameters(config)
        return self.trained_layer_count(config, options) * per_layer

    def trained_layer_count(self, config, options: object) -> int:
        """The last `trainable_layers` blocks."""
        return min(options.trainable_layers, config.num_layers)
