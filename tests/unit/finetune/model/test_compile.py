"""torch.compile (the Trainer's --torch_compile) runs the model, its custom autograd functions and recomputation."""

import pytest
import torch

from finetune.arguments import ModelArguments
from finetune.methods import apply_method
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.recompute import RecomputePlan, apply_recompute_plan

CONFIG = {"multi_query_attention": True, "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "kv_channels": 16,
          "multi_query_group_num": 2, "ffn_hidden_size": 128, "padded_vocab_size": 256, "use_cache": False}


def lora_model() -> torch.nn.Module:
    """A small LoRA model with one layer recomputed whole and one recomputing its MLP."""
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(ChatGLMConfig(**CONFIG))
    model = apply_method(model, ModelArguments(model_name_or_path="random", lora_rank=4, lora_dropout=0.0)).train()
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient to compare
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.05)
    apply_recompute_plan(model, RecomputePlan(full_layers=1, mlp_layers=1))
    return model


@pytest.mark.slow
def test_compiled_training_step_equals_eager():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 250, (2, 32), generator=generator)
    labels = input_ids.clone()
    labels[:, :8] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 28:] = 0
    labels[1, 28:] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    eager = lora_model()
    eager_loss = eager(**batch).loss
    eager_loss.backward()
    compiled_model = lora_model()
    compiled_loss = torch.compile(compiled_model)(**batch).loss
    compiled_loss.backward()

    assert float(compiled_loss.detach()) == pytest.approx(float(eager_loss.detach()), abs=1e-5)
    eager_grads = {name: p.grad for name, p in eager.named_parameters() if p.requires_grad}
    compiled_grads = {name: p.grad for name, p in compiled_model.named_parameters() if p.requires_grad}
    assert eager_grads.keys() == compiled_grads.keys()
    assert all(float(grad.abs().sum()) > 0 for grad in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
