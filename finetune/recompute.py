"""Activation recomputation plans: which layers recompute what in the backward pass, and applying a plan to a model.

Three grains per layer, from fastest to leanest. Bytes kept per token per layer for ChatGLM3-6B in bf16 with LoRA
r=8 on query_key_value (finetune/memory_preflight.py `layer_activation_bytes`, whose counts tests/unit/finetune/test_recompute.py
checks against the tensors autograd really keeps):
  none  keep everything the backward pass needs                          98.6 KiB, no extra FLOPs
  mlp   recompute the post-attention norm, up-projection and SwiGLU      45.1 KiB, +55% of the layer's forward FLOPs
  full  keep only the layer input and recompute the whole layer           8.0 KiB, +100% of the layer's forward FLOPs
`auto` (finetune/memory_preflight.py `plan_recompute`) takes the least recomputation whose estimate fits the GPU.
"""

from dataclasses import dataclass

from torch import nn

RECOMPUTE_AUTO = "auto"
RECOMPUTE_NONE = "none"
RECOMPUTE_MLP = "mlp"
RECOMPUTE_FULL = "full"
RECOMPUTE_CHOICES = (RECOMPUTE_AUTO, RECOMPUTE_NONE, RECOMPUTE_MLP, RECOMPUTE_FULL)


@dataclass(frozen=True)
class RecomputePlan:
    """How many layers recompute whole (`full_layers`, the first ones) and how many only their MLP input side."""

    full_layers: int = 0
    mlp_layers: int = 0

    @classmethod
    def uniform(cls, mode: str, num_layers: int) -> "RecomputePlan":
        """Every layer with the same grain: none, mlp or full."""
        if mode == RECOMPUTE_FULL:
            return cls(full_layers=num_layers)
        if mode == RECOMPUTE_MLP:
            return cls(mlp_layers=num_layers)
        if mode == RECOMPUTE_NONE:
            return cls()
        raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_NONE}, {RECOMPUTE_MLP}, {RECOMPUTE_FULL}")

    def describe(self, num_layers: int) -> str:
        """E.g. '4 layers full, 24 mlp, 0 none'."""
        rest = num_layers - self.full_layers - self.mlp_layers
        return f"{self.full_layers} layers full, {self.mlp_layers} mlp, {rest} none"


def glm_blocks(model: nn.Module) -> list[nn.Module]:
    """The GLM blocks of a model, in order (through PEFT wrappers too): the modules with a `recompute_mlp` switch.

    Found by that switch rather than by class, so that parsing the arguments (which name the recompute choices)
    does not import the model code.
    """
    return [module for module in model.modules() if hasattr(module, "recompute_mlp")]


def apply_recompute_plan(model: nn.Module, plan: RecomputePlan) -> None:
    """Set each layer's grain: the first `full_layers` checkpoint whole, the next `mlp_layers` recompute their MLP."""
    blocks = glm_blocks(model)
    if plan.full_layers + plan.mlp_layers > len(blocks):
        raise ValueError(
            f"recompute plan ({plan.describe(len(blocks))}) names more layers than the model's {len(blocks)}"
        )
    if plan.full_layers:
        # transformers sets the checkpoint function (non-reentrant) and makes the embedding output require grad.
        model.activation_checkpointing_enable()
    for index, block in enumerate(blocks):
        block.gradient_checkpointing = index < plan.full_layers
        block.recompute_mlp = plan.full_layers <= index < plan.full_layers + plan.mlp_layers
