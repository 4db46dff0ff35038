"""ChatGLM3 configuration: reads the fields of an official chatglm3-6b (-32k, -128k, -base) config.json."""

import json

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

# Where chatglm3-6b's config.json differs from the official class defaults (the other fields are the defaults).
CHATGLM3_6B_FIELDS = {"add_qkv_bias": True, "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 8192}


@strict
class ChatGLMConfig(PreTrainedConfig):
    """Hyper-parameters of a ChatGLM3 model, with the official field names and the official class defaults.

    A field missing from config.json takes the official class default (e.g. no qkv bias, no multi-query attention,
    seq_length 2048), not chatglm3-6b's value: `CHATGLM3_6B_FIELDS` holds the fields where chatglm3-6b differs.
    Numeric fields accept ints (the 32k/128k configs write `"rope_ratio": 50` / `500`); unknown fields are kept.
    `auto_map` (the official remote-code classes) is kept and saved back, so a saved folder still loads with the
    official stack; transformers uses these registered classes for it unless the caller turns trust_remote_code on.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers", "vocab_size": "padded_vocab_size"}

    num_layers: int = 28
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    seq_length: int = 2048
    hidden_dropout: int | float = 0.0
    attention_dropout: int | float = 0.0
    layernorm_epsilon: int | float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    original_rope: bool = True
    rope_ratio: int | float = 1
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True
    fp32_residual_connection: bool = False
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    classifier_dropout: int | float | None = None
    quantization_bit: int = 0
    initializer_range: int | float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("vocab_size", None)
        super().__post_init__(**kwargs)

    def to_json_string(self, use_diff: bool = True) -> str:
        """transformers' JSON (what config.json holds), with the weight dtype also under its 4.x name `torch_dtype`,
        which transformers 4.x and the tools built on it (the official code, vLLM, FastChat) read."""
        values = json.loads(super().to_json_string(use_diff))
        if values.get("dtype") is not None:
            values["torch_dtype"] = values["dtype"]
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    @property
    def num_key_value_groups(self) -> int:
        """Number of K/V heads: the multi-query group count, or one per attention head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.kv_channels
