"""RMSNorm and SwiGLU as autograd functions that keep less for the backward pass than their plain-torch versions.

Autograd on the plain formulas keeps fp32 copies of a norm's input and intermediate products (about 7 hidden-size
vectors per token per norm in bf16 terms) and silu(gate) beside gate and up. These functions keep only what the
backward needs: a norm keeps its 16-bit input and one fp32 scale per token, SwiGLU keeps its input (gate and up) and
recomputes silu. Forward values and SwiGLU gradients are bit-for-bit those of autograd on the plain formulas (SwiGLU
works in the input dtype, as autograd does); norm gradients are computed in fp32 (or wider).
"""

import torch
import torch.nn.functional as F


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp32 for 16-bit tensors, the tensor's own dtype when it is wider (fp64 in gradient checks)."""
    return torch.promote_types(tensor.dtype, torch.float32)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        variance = hidden_states.to(_compute_dtype(hidden_states)).pow(2).mean(-1, keepdim=True)
        inverse_rms = torch.rsqrt(variance + eps)
        ctx.save_for_backward(hidden_states, weight, inverse_rms)
        return (weight * (hidden_states * inverse_rms)).to(hidden_states.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden_states, weight, inverse_rms = ctx.saved_tensors
        compute_dtype = _compute_dtype(hidden_states)
        normed = hidden_states.to(compute_dtype) * inverse_rms
        grad_output = grad_output.to(compute_dtype)
        grad_normed = grad_output * weight.to(compute_dtype)
        grad_input = None
        if ctx.needs_input_grad[0]:
            projection = (grad_normed * normed).mean(-1, keepdim=True)
            grad_input = ((grad_normed - normed * projection) * inverse_rms).to(hidden_states.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        return grad_input, grad_weight, None


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_and_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_and_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_and_up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (gate_and_up,) = ctx.saved_tensors
        gate, up = gate_and_up.chunk(2, dim=-1)
        grad_gate = torch.ops.aten.silu_backward(grad_output * up, gate)
        return torch.cat((grad_gate, grad_output * F.silu(gate)), dim=-1)


def rms_norm(hidden_states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dimension in fp32 (or wider), cast to x's dtype; keeps x and 1/rms."""
    return _RMSNormFunction.apply(hidden_states, weight, eps)


def swiglu(gate_and_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate and up are the two halves of the last dimension (keeps only the input)."""
    return _SwiGLUFunction.apply(gate_and_up)
