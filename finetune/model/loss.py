"""Causal-LM loss that never holds fp32 logits for the whole batch x sequence x vocabulary at once."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 512


def _chunk_loss_sum(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = output_layer(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    output_layer: nn.Module,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, projecting to the vocabulary chunk by chunk.

    `labels[b, i]` is the target for the logits at position i-1 (the usual shift), -100 means no loss. Only labelled
    positions are projected, and under autograd each chunk is recomputed in the backward pass instead of keeping its
    logits, so peak memory is one chunk of `chunk_tokens x vocab` fp32 logits. The output layer is called as a module
    (not through its weight) so DeepSpeed ZeRO-3 gathering and PEFT adapters on it keep working. `shift_labels`
    (transformers' convention, e.g. for sequence parallelism) are targets already aligned with each position; when
    given they are used as they are and `labels` may be None.
    """
    if shift_labels is not None:
        shifted_hidden = hidden_states
        shifted_labels = shift_labels.to(hidden_states.device)
    else:
        shifted_hidden = hidden_states[:, :-1, :]
        shifted_labels = labels[:, 1:].to(hidden_states.device)
    selected = shifted_labels != IGNORE_INDEX
    hidden = shifted_hidden[selected]
    targets = shifted_labels[selected]
    count = targets.numel()
    if count == 0:
        return hidden_states.sum() * 0.0
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk_tokens):
        chunk_hidden = hidden[start : start + chunk_tokens]
        chunk_targets = targets[start : start + chunk_tokens]
        if recompute:
            total = total + checkpoint(_chunk_loss_sum, output_layer, chunk_hidden, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(output_layer, chunk_hidden, chunk_targets)
    return total / count


def _chunk_token_log_probs(output_layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = output_layer(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_sequence_log_probs(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    output_layer: nn.Module,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (fp32, shape (batch,)) and how many there are.

    Same shift, chunking and recomputation as `chunked_causal_lm_loss`, so no full batch x sequence x vocabulary
    logits are held; preference losses (finetune.preference_loss) need the sum per sequence, not the batch mean.
    """
    shifted_hidden = hidden_states[:, :-1, :]
    shifted_labels = labels[:, 1:].to(hidden_states.device)
    selected = shifted_labels != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=hidden_states.device).unsqueeze(1).expand_as(shifted_labels)[selected]
    hidden = shifted_hidden[selected]
    targets = shifted_labels[selected]
    counts = selected.sum(dim=1)
    sums = hidden_states.new_zeros(labels.shape[0], dtype=torch.float32) + hidden_states.sum() * 0.0
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, targets.numel(), chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        if recompute:
            token_log_probs = checkpoint(
                _chunk_token_log_probs, output_layer, hidden[chunk], targets[chunk], use_reentrant=False
            )
        else:
            token_log_probs = _chunk_token_log_probs(output_layer, hidden[chunk], targets[chunk])
        sums = sums.index_add(0, rows[chunk], token_log_probs)
    return sums, counts
