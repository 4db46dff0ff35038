"""Freeze tuning: train only the last N GLM blocks (--trainable_layers N), everything else frozen; the checkpoint is
the whole model, saved and loaded like a full fine-tune."""

from torch import nn
from transformers import PreTrainedModel

from finetune.arguments import ModelArguments
from finetune.methods.full import FullFinetuning
from finetune.model.shapes import layer_linear_weights, layer_small_parameters
from finetune.recompute import glm_blocks


class FreezeTuning(FullFinetuning):
    """Train the last `trainable_layers` blocks in fp32; save the whole model."""

    name = "freeze"
    selecting_option = "trainable_layers"
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

    def check_setup(self, setup: object) -> None:
        """Freeze tuning needs the number of trained layers."""
        if not getattr(setup, "trainable_layers", None):
            raise ValueError("TrainingSetup.method 'freeze' needs trainable_layers > 0")

    def trainable_parameter_count(self, config, setup: object) -> int:
        """The parameters of the trained blocks."""
        return self.trained_layer_count(config, setup) * (layer_linear_weights(config) + layer_small_parameters(config))

    def trained_layer_count(self, config, setup: object) -> int:
        """The last `trainable_layers` blocks."""
        return min(setup.trainable_layers, config.num_layers)
