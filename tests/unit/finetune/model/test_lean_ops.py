"""finetune/model/lean_ops.py: same values as the plain formulas, exact gradients, and less kept for backward."""

import pytest
import torch
import torch.nn.functional as F

from finetune.model.lean_ops import rms_norm, swiglu


def plain_rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
    return (weight * (hidden_states * torch.rsqrt(variance + eps))).to(hidden_states.dtype)


def plain_swiglu(gate_and_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_and_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def saved_bytes(function, *inputs) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of function(*inputs)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_values_are_those_of_the_plain_formulas(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 64, dtype=dtype) * 3
    weight = torch.randn(64, dtype=dtype)
    assert torch.equal(rms_norm(hidden, weight, 1e-5), plain_rms_norm(hidden, weight, 1e-5))
    assert torch.equal(swiglu(hidden), plain_swiglu(hidden))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_autograd_on_the_plain_formulas(dtype):
    torch.manual_seed(1)
    hidden = (torch.randn(2, 5, 64) * 2).to(dtype).requires_grad_()
    weight = torch.randn(64).to(dtype).requires_grad_()
    upstream = torch.randn(2, 5, 64).to(dtype)
    lean = torch.autograd.grad(rms_norm(hidden, weight, 1e-5), (hidden, weight), upstream)
    plain = torch.autograd.grad(plain_rms_norm(hidden, weight, 1e-5), (hidden, weight), upstream)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for ours, reference in zip(lean, plain):
        torch.testing.assert_close(ours.float(), reference.float(), rtol=tolerance, atol=tolerance)
    # SwiGLU's backward works in the input dtype like autograd does: bit for bit the same gradient.
    upstream_half = torch.randn(2, 5, 32).to(dtype)
    (ours,) = torch.autograd.grad(swiglu(hidden), hidden, upstream_half)
    (reference,) = torch.autograd.grad(plain_swiglu(hidden), hidden, upstream_half)
    assert torch.equal(ours, reference)


def test_gradcheck_in_float64():
    torch.manual_seed(2)
    hidden = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (hidden, weight))
    assert torch.autograd.gradcheck(swiglu, (hidden,))


def test_norm_without_a_trainable_weight_returns_no_weight_gradient():
    hidden = torch.randn(4, 16, requires_grad=True)
    weight = torch.ones(16)
    rms_norm(hidden, weight, 1e-5).sum().backward()
    assert hidden.grad is not None and weight.grad is None


def test_they_keep_less_for_backward_than_the_plain_formulas():
    tokens, width = 256, 512
    hidden = torch.randn(1, tokens, width, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(width, dtype=torch.bfloat16)  # frozen: kept by reference, it is a parameter anyway
    weight_bytes = width * 2
    # The norm keeps its 16-bit input and one fp32 scale per token; plain autograd keeps fp32 copies as well.
    assert saved_bytes(lambda x: rms_norm(x, weight, 1e-5), hidden) == tokens * width * 2 + tokens * 4 + weight_bytes
    assert saved_bytes(lambda x: plain_rms_norm(x, weight, 1e-5), hidden) > 3 * tokens * width * 2
    # SwiGLU keeps only its input (gate and up); plain autograd keeps silu(gate) too.
    up_projection = torch.randn(1, tokens, 2 * width, dtype=torch.bfloat16, requires_grad=True)
    assert saved_bytes(swiglu, up_projection) == tokens * 2 * width * 2
    assert saved_bytes(plain_swiglu, up_projection) == tokens * 3 * width * 2
