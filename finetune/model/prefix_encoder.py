"""P-Tuning v2 prefix encoder: learned per-layer key/value prefixes for every attention layer."""

import torch
from torch import nn

from .configuration import ChatGLMConfig

# The official P-Tuning v2 recipe applies dropout 0.1 to the prefix keys/values while training.
PREFIX_DROPOUT = 0.1


class PrefixEncoder(nn.Module):
    """Maps prefix positions 0..pre_seq_len-1 to keys and values for every layer.

    Parameter names follow the official checkpoints: `embedding`, and with `prefix_projection` the two-layer MLP
    `trans.0` / `trans.2` (Linear, Tanh, Linear).
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.pre_seq_len = config.pre_seq_len
        self.num_layers = config.num_layers
        self.num_kv_heads = config.num_key_value_groups
        self.head_dim = config.kv_channels
        kv_size = config.num_layers * 2 * self.num_kv_heads * self.head_dim
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if config.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(kv_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.trans = None
        self.dropout = nn.Dropout(PREFIX_DROPOUT)

    def forward(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (key, value) prefixes, each shaped (batch, kv_heads, pre_seq_len, head_dim).

        As in the official code, dropout draws its mask per batch row (in eval mode the rows share one tensor).
        """
        prefix = self.embedding.weight
        if self.trans is not None:
            prefix = self.trans(prefix)
        prefix = self.dropout(prefix.to(dtype).unsqueeze(0).expand(batch_size, -1, -1))
        # Official layout of the flat vector: (layer, key|value, kv_head, head_dim).
        prefix = prefix.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        prefix = prefix.permute(2, 0, 3, 1, 4)
        return [(prefix[2 * layer], prefix[2 * layer + 1]) for layer in range(self.num_layers)]
