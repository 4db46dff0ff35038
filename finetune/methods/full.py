"""Full fine-tuning: every weight of the model trains (in fp32); the checkpoint is the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedModel, TrainingArguments

from finetune.methods.base import CheckpointKind, FinetuneMethod, SaveContext
from finetune.model.checkpoint_files import check_weight_file, weight_files
from finetune.model.remote_code import copy_remote_code_files
from finetune.model.shapes import base_parameter_count

if TYPE_CHECKING:
    from finetune.arguments import ModelArguments


class FullFinetuning(FinetuneMethod):
    """Train every weight; save the whole model with its tokenizer."""

    name = "full"
    checkpoint_kind = CheckpointKind.FULL
    trains_base_weights = True

    def base_dtype(self, training_args: TrainingArguments) -> torch.dtype:
        """The whole model trains, so it is loaded in fp32."""
        return torch.float32

    def make_trainable(self, model: PreTrainedModel, model_args: ModelArguments) -> nn.Module:
        """Every parameter trains."""
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, folder: Path, context: SaveContext) -> None:
        """The whole model (safetensors), its tokenizer and the base's remote-code files."""
        model.save_pretrained(folder, state_dict=context.state_dict)
        if context.tokenizer is not None:
            context.tokenizer.save_pretrained(folder)
        copy_remote_code_files(context.model_args.model_name_or_path, folder)

    def weights_problem(self, folder: Path) -> str | None:
        """Complete model weights must be there."""
        paths = weight_files(folder)
        if not paths:
            return f"no model weights for method {self.name!r}"
        for path in paths:
            check_weight_file(path)
        return None

    def trainable_parameter_count(self, config, options: object) -> int:
        """All of the base's parameters."""
        return base_parameter_count(config)
