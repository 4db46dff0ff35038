"""ChatGLM3 model: our own implementation with the official parameter names, on torch SDPA and the HF Cache API.

Layout (official names):
  transformer.embedding.word_embeddings
  transformer.encoder.layers.N.{input_layernorm, self_attention.{query_key_value, dense},
                                post_attention_layernorm, mlp.{dense_h_to_4h, dense_4h_to_h}}
  transformer.encoder.final_layernorm
  transformer.output_layer
  transformer.prefix_encoder.{embedding, trans.0, trans.2}   (P-Tuning v2, when config.pre_seq_len is set)

P-Tuning v2 prefix keys/values enter attention in `SelfAttention.forward`, in front of the sequence's own keys and
values (and of the KV cache). Attention masks are decided once per forward in `build_attention_bias`.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .chat import ChatMixin
from .checkpoint_files import check_chatglm_folder
from .configuration import ChatGLMConfig
from .lean_ops import rms_norm, swiglu
from .loss import chunked_causal_lm_loss, chunked_sequence_log_probs
from .prefix_encoder import PrefixEncoder

PrefixKeyValues = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class SequenceLogProbsOutput(ModelOutput):
    """Per row: the summed log-probability of the labelled tokens (fp32) and how many tokens are labelled."""

    log_probs: torch.Tensor | None = None
    label_counts: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 and cast back to the input dtype (see lean_ops.rms_norm)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        return rms_norm(hidden_states, self.weight, self.eps)


def make_norm(config: ChatGLMConfig) -> nn.Module:
    """The layer norm the config asks for: RMSNorm (ChatGLM3) or LayerNorm."""
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """GLM rotary embedding: rotates the first half of each head's channels, in interleaved pairs."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.rotary_dim = config.kv_channels // 2
        self.base = 10000.0 * config.rope_ratio
        # Saved with the weights because the official loader expects `transformer.rotary_pos_emb.inv_freq` (it reads
        # only its dtype); the forward pass recomputes the frequencies in fp32 and never reads this buffer.
        self.register_buffer("inv_freq", self.frequencies(torch.device("cpu")), persistent=True)

    def frequencies(self, device: torch.device) -> torch.Tensor:
        """The rotation frequency of each channel pair, in fp32."""
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.base ** (exponent / self.rotary_dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `position_ids` (batch, seq), each (batch, 1, seq, rotary_dim // 2), in fp32."""
        angles = position_ids.float().unsqueeze(-1) * self.frequencies(position_ids.device)
        return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0,1), (2,3), ... of the first 2 * cos.shape[-1] channels of x (batch, heads, seq, dim)."""
    rot_dim = cos.shape[-1] * 2
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    pairs = rotated.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((out, passed), dim=-1)


@dataclass
class SegmentLayout:
    """Where the examples of packed rows go when attention runs one example per row (varlen by gathering).

    `gather[s, i]` is the flat (row * length + position) index of token i of segment s (slots past a segment's end
    repeat token 0: they sit after every real query, so causal attention never reads them); `slots[t]` is where flat
    token t lands in the (segments x longest) layout.
    """

    gather: torch.Tensor
    slots: torch.Tensor

    def to_segments(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, length, dim) in packed rows -> (segments, heads, longest, dim), one example per row."""
        batch, heads, length, dim = x.shape
        return x.transpose(1, 2).reshape(batch * length, heads, dim)[self.gather].transpose(1, 2)

    def to_rows(self, x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """(segments, heads, longest, dim) -> (batch, length, heads * dim) in the packed rows' order."""
        segments, heads, longest, dim = x.shape
        return x.transpose(1, 2).reshape(segments * longest, heads * dim)[self.slots].view(batch, length, heads * dim)


def segment_layout(segments: torch.Tensor) -> SegmentLayout:
    """The SegmentLayout of packed rows whose attention mask holds segment ids (0 = padding)."""
    batch, length = segments.shape
    flat = segments.reshape(-1)
    tokens = torch.nonzero(flat > 0).squeeze(-1)
    row_keys = tokens // length * (int(flat.max()) + 1) + flat[tokens]
    _, segment_of_token, counts = torch.unique_consecutive(row_keys, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(tokens.numel(), device=flat.device) - starts[segment_of_token]
    longest = int(counts.max())
    gather = torch.zeros(counts.numel(), longest, dtype=torch.long, device=flat.device)
    gather[segment_of_token, position] = tokens
    slots = torch.zeros(batch * length, dtype=torch.long, device=flat.device)
    slots[tokens] = segment_of_token * longest + position
    return SegmentLayout(gather=gather, slots=slots)


@dataclass
class AttentionBias:
    """How attention is masked in one forward: a boolean mask (True = may attend), plain causal, or nothing.

    `leading_queries` > 0 means: put that many zero queries in front, run plain causal attention, and drop their
    outputs. With the P-Tuning prefix as the first keys this is exactly "every query sees the whole prefix, then
    causal", and it keeps the fused (flash) causal kernel with grouped K/V instead of a masked fallback.
    """

    mask: torch.Tensor | None
    is_causal: bool
    leading_queries: int = 0
    segments: SegmentLayout | None = None


def is_right_padding(attention_mask: torch.Tensor) -> bool:
    """True when every row of a 0/1 mask is tokens followed only by padding."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def build_attention_bias(
    attention_mask: torch.Tensor | None,
    query_length: int,
    past_length: int,
    prefix_length: int,
    device: torch.device,
) -> AttentionBias:
    """Decide the attention mask for a forward pass.

    `attention_mask` is 2-D over past + current tokens: 1 = token, 0 = padding, or segment ids 1, 2, ... for packed
    rows (examples never attend to each other). Prefix keys are visible to every query. A left-padded query row with
    nothing to attend (no past, no prefix) attends to every key, as in the official implementation; its output is
    never used. Right padding alone (the training collator's) needs no mask: causal attention never lets a real
    token see the padding after it, so the fused causal kernels serve it; outputs at padded positions are unused.
    """
    context_length = prefix_length + past_length
    packed = attention_mask is not None and bool((attention_mask > 1).any())
    if attention_mask is not None and not packed and (
        bool(attention_mask.all()) or (past_length == 0 and is_right_padding(attention_mask))
    ):
        attention_mask = None
    if attention_mask is None:
        if query_length == 1:
            return AttentionBias(mask=None, is_causal=False)
        if context_length == 0:
            return AttentionBias(mask=None, is_causal=True)
        if past_length == 0:
            return AttentionBias(mask=None, is_causal=True, leading_queries=prefix_length)
    key_length = context_length + query_length
    query_positions = torch.arange(query_length, device=device).unsqueeze(-1) + context_length
    causal = torch.arange(key_length, device=device).unsqueeze(0) <= query_positions
    if attention_mask is None:
        return AttentionBias(mask=causal[None, None], is_causal=False)
    batch_size = attention_mask.shape[0]
    prefix_columns = torch.ones(batch_size, query_length, prefix_length, dtype=torch.bool, device=device)
    if packed and past_length == 0:
        layout = segment_layout(attention_mask)
        return AttentionBias(mask=None, is_causal=True, leading_queries=prefix_length, segments=layout)
    if packed:
        segments = attention_mask[:, -query_length:]
        same_segment = segments.unsqueeze(-1) == segments.unsqueeze(-2)
        sequence_part = same_segment & causal[:, prefix_length:]
        return AttentionBias(mask=torch.cat((prefix_columns, sequence_part), dim=-1).unsqueeze(1), is_causal=False)
    key_valid = attention_mask.bool().unsqueeze(1)
    sequence_part = causal[:, prefix_length:] & key_valid
    if context_length == 0:
        query_is_padding = ~attention_mask[:, -query_length:].bool()
        sequence_part = sequence_part | query_is_padding.unsqueeze(-1)
    return AttentionBias(mask=torch.cat((prefix_columns, sequence_part), dim=-1).unsqueeze(1), is_causal=False)


class SelfAttention(nn.Module):
    """Multi-query attention: 32 query heads share 2 K/V groups (ChatGLM3-6B), fused QKV projection."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_groups
        self.head_dim = config.kv_channels
        self.dropout = config.attention_dropout
        self.per_head_qkv = not config.multi_query_attention
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        bias: AttentionBias,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        """Attend over [prefix keys/values, cached keys/values, current keys/values]; input (batch, seq, hidden)."""
        batch_size, seq_length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)
        if self.per_head_qkv:
            # The official layout without multi-query attention: head by head, its query, key and value channels.
            per_head = qkv.view(batch_size, seq_length, self.num_heads, 3 * self.head_dim)
            query, key, value = (x.transpose(1, 2) for x in per_head.split(self.head_dim, dim=-1))
        else:
            query, key, value = qkv.split(
                [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
                dim=-1,
            )
            query = query.view(batch_size, seq_length, self.num_heads, self.head_dim).transpose(1, 2)
            key = key.view(batch_size, seq_length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            value = value.view(batch_size, seq_length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # A copy of the small value slice: attention keeps it for backward, and a view would keep all of qkv alive.
        value = value.contiguous()
        cos, sin = rotary
        query = apply_rotary(query, cos, sin)
        key = apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if bias.segments is not None:
            query, key, value = (bias.segments.to_segments(x) for x in (query, key, value))
            if prefix is not None:
                row_of_segment = bias.segments.gather[:, 0] // seq_length
                prefix = tuple(x[row_of_segment] for x in prefix)
        if prefix is not None:
            prefix_key, prefix_value = prefix
            key = torch.cat((prefix_key.to(key.dtype), key), dim=2)
            value = torch.cat((prefix_value.to(value.dtype), value), dim=2)
        if bias.leading_queries:
            query = F.pad(query, (0, 0, bias.leading_queries, 0))
        context = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=bias.mask,
            is_causal=bias.is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        context = context[:, :, bias.leading_queries :]
        if bias.segments is not None:
            return self.dense(bias.segments.to_rows(context, batch_size, seq_length))
        context = context.transpose(1, 2).reshape(batch_size, seq_length, self.num_heads * self.head_dim)
        return self.dense(context)


class MLP(nn.Module):
    """SwiGLU feed-forward: one projection to 2 x ffn_hidden_size, silu(gate) * up, projection back."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def activation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of the up-projection: the widest activations of the layer."""
        return swiglu(self.dense_h_to_4h(hidden_states))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply the feed-forward block."""
        return self.dense_4h_to_h(self.activation(hidden_states))


class GLMBlock(GradientCheckpointingLayer):
    """One transformer layer: pre-norm attention and pre-norm MLP, each with a residual connection.

    Activation recomputation, two grains:
    - `gradient_checkpointing` (set by transformers' activation_checkpointing_enable, per layer with every_n_layers):
      the layer keeps only its input and is recomputed whole in the backward pass;
    - `recompute_mlp` (set by finetune.recompute.apply_recompute_plan): only the post-attention norm, the
      up-projection and SwiGLU are recomputed, which drops the widest activations (2 x ffn_hidden_size per token)
      for a third of the layer's forward FLOPs instead of all of them.
    """

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.residual_after_norm = config.apply_residual_connection_post_layernorm
        self.input_layernorm = make_norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.recompute_mlp = False

    def _mlp_activation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.mlp.activation(self.post_attention_layernorm(hidden_states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        bias: AttentionBias,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Run the layer on (batch, seq, hidden)."""
        normed = self.input_layernorm(hidden_states)
        attention_output = self.self_attention(normed, rotary, bias, prefix, cache)
        residual = normed if self.residual_after_norm else hidden_states
        hidden_states = residual + self.hidden_dropout(attention_output)
        if self.residual_after_norm:
            normed = self.post_attention_layernorm(hidden_states)
            return normed + self.hidden_dropout(self.mlp(normed))
        if self.recompute_mlp and self.training and torch.is_grad_enabled():
            activation = checkpoint(self._mlp_activation, hidden_states, use_reentrant=False)
        else:
            activation = self._mlp_activation(hidden_states)
        return hidden_states + self.hidden_dropout(self.mlp.dense_4h_to_h(activation))


class GLMTransformer(nn.Module):
    """The stack of GLM blocks plus the final norm."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = make_norm(config) if config.post_layer_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        bias: AttentionBias,
        prefixes: PrefixKeyValues | None,
        cache: Cache | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run every layer (a checkpointed layer gets no cache: transformers' GradientCheckpointingLayer drops it).

        Returns the final-norm output and, when asked, the num_layers + 1 hidden states as the official code
        collects them: each layer's input, then the last layer's output (before the final norm).
        """
        all_hidden_states: tuple[torch.Tensor, ...] = ()
        for index, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            prefix = prefixes[index] if prefixes is not None else None
            hidden_states = layer(hidden_states, rotary, bias, prefix, cache=cache)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, all_hidden_states if output_hidden_states else None


class Embedding(nn.Module):
    """Token embedding (official name: transformer.embedding.word_embeddings)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids."""
        return self.word_embeddings(input_ids)


class ChatGLMPreTrainedModel(PreTrainedModel):
    """Common settings for ChatGLM3 models."""

    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    # A base checkpoint has no prefix encoder: it is created fresh (or loaded from a prefix checkpoint) on purpose.
    # Folders saved before the rotary buffer was written lack it; it is recomputed (see `_init_weights`).
    _keys_to_ignore_on_load_missing = [r"transformer\.prefix_encoder\.", r"rotary_pos_emb\.inv_freq"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, **kwargs):
        """Load a checkpoint; a local folder is checked first so a wrong folder or a truncated shard is named.

        Returns what transformers returns: the model, or `(model, loading_info)` with `output_loading_info=True`.
        """
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            check_chatglm_folder(pretrained_model_name_or_path)
        with_info = kwargs.get("output_loading_info", False)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if with_info else loaded
        if model.config.pre_seq_len:
            model.train_prefix_only()
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation, and the rotary frequencies for a buffer the checkpoint did not hold."""
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.frequencies(module.inv_freq.device))

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """transformers' save_pretrained with `use_cache: true` in config.json: training turns the KV cache off, the
        saved model is for inference (tools that read config.json, e.g. the official code, follow the field)."""
        training_setting = self.config.use_cache
        self.config.use_cache = True
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.use_cache = training_setting

    def train_prefix_only(self) -> None:
        """As the official ChatGLMModel with pre_seq_len: only the prefix encoder's parameters require grad."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_("prefix_encoder." in name)


class ChatGLMModel(ChatGLMPreTrainedModel):
    """ChatGLM3 transformer with its output layer (the official `transformer` module)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        if config.pre_seq_len:
            self.train_prefix_only()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding."""
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding."""
        self.embedding.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Final hidden states (batch, seq, hidden), the updated KV cache and, when asked, every layer's input.

        `return_dict=False` (or `config.return_dict = False`) gives them as a tuple.
        """
        refuse_attention_weights(output_attentions, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("ChatGLMModel.forward needs exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch_size, seq_length = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = positions_from_mask(
                attention_mask, batch_size, seq_length, past_length, inputs_embeds.device
            )
        prefixes = None
        if self.prefix_encoder is not None:
            prefixes = self.prefix_encoder(batch_size, inputs_embeds.dtype)
        bias = build_attention_bias(
            attention_mask,
            query_length=seq_length,
            past_length=past_length,
            prefix_length=self.config.pre_seq_len or 0,
            device=inputs_embeds.device,
        )
        rotary = self.rotary_pos_emb(position_ids)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states, all_hidden_states = self.encoder(
            inputs_embeds, rotary, bias, prefixes, cache, output_hidden_states=output_hidden_states
        )
        result = BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)
        return result if wants_return_dict(return_dict, self.config) else result.to_tuple()


def wants_return_dict(return_dict: bool | None, config: ChatGLMConfig) -> bool:
    """The `return_dict` argument, else the config's `return_dict` (True by default)."""
    return return_dict if return_dict is not None else config.return_dict


def refuse_attention_weights(output_attentions: bool | None, config: ChatGLMConfig) -> None:
    """Raise when attention weights are asked for: attention runs in torch SDPA, which never materialises them."""
    if output_attentions or (output_attentions is None and config.output_attentions):
        raise ValueError(
            "output_attentions=True is not supported: ChatGLM3 computes attention with torch's scaled_dot_product_"
            "attention, which does not return the attention weights; call the model without output_attentions (and "
            "set config.output_attentions = False)"
        )


def positions_from_mask(
    attention_mask: torch.Tensor | None, batch_size: int, seq_length: int, past_length: int, device: torch.device
) -> torch.LongTensor:
    """Position ids when none are given: counted over real tokens (padding gets 0), restarting per packed segment."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + seq_length, device=device).unsqueeze(0).expand(batch_size, -1)
    if bool((attention_mask > 1).any()):
        segments = attention_mask
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        index = torch.arange(segments.shape[1], device=device).expand_as(segments)
        start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
        positions = index - start_index
        return positions.masked_fill(segments == 0, 0)[:, -seq_length:]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0).masked_fill(attention_mask == 0, 0)[:, -seq_length:]


class ChatGLMForConditionalGeneration(ChatMixin, ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM3 causal LM: logits, chunked loss, generation with the KV cache, chat()."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding."""
        return self.transformer.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the token embedding."""
        self.transformer.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        """The vocabulary projection."""
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Module) -> None:
        """Replace the vocabulary projection."""
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        shift_labels: torch.LongTensor | None = None,
        sequence_log_probs: bool = False,
        **kwargs,
    ) -> "CausalLMOutputWithPast | SequenceLogProbsOutput | tuple":
        """Logits and/or loss. In training mode with labels, only the loss is computed (no full logits).

        `return_dict=False` gives the official tuple: (loss,) logits, cache (and hidden states when asked).
        `shift_labels` are targets already aligned with each position (transformers' convention); they replace
        `labels` for the loss.
        `sequence_log_probs=True` (with labels) returns instead each row's summed log-probability of its labelled
        tokens and their count (SequenceLogProbsOutput), for preference training.
        """
        refuse_attention_weights(output_attentions, self.config)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        output_layer = self.transformer.output_layer
        if sequence_log_probs:
            if labels is None:
                raise ValueError("sequence_log_probs=True needs labels: the tokens whose log-probabilities to sum")
            sums, counts = chunked_sequence_log_probs(hidden_states, labels, output_layer)
            return SequenceLogProbsOutput(log_probs=sums, label_counts=counts)
        loss = None
        logits = None
        has_targets = labels is not None or shift_labels is not None
        if has_targets:
            loss = chunked_causal_lm_loss(hidden_states, labels, output_layer, shift_labels=shift_labels)
        if not has_targets or not self.training:
            kept = hidden_states[:, -logits_to_keep:, :] if logits_to_keep else hidden_states
            logits = output_layer(kept)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return result if wants_return_dict(return_dict, self.config) else result.to_tuple()
