"""Parameter shapes of a ChatGLM3 config, computed without building the model (for the memory preflight)."""

from .configuration import ChatGLMConfig


def linear_shapes(config: ChatGLMConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer inside one GLM block, by module name."""
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_groups) * config.kv_channels
    attention_width = config.num_attention_heads * config.kv_channels
    return {
        "query_key_value": (config.hidden_size, qkv_out),
        "dense": (attention_width, config.hidden_size),
        "dense_h_to_4h": (config.hidden_size, 2 * config.ffn_hidden_size),
        "dense_4h_to_h": (config.ffn_hidden_size, config.hidden_size),
    }


def layer_linear_weights(config: ChatGLMConfig) -> int:
    """Weight-matrix parameters of one GLM block (the quantizable part)."""
    return sum(fan_in * fan_out for fan_in, fan_out in linear_shapes(config).values())


def layer_small_parameters(config: ChatGLMConfig) -> int:
    """Biases and norm weights of one GLM block (never quantized)."""
    shapes = linear_shapes(config)
    biases = shapes["query_key_value"][1] if (config.add_qkv_bias or config.add_bias_linear) else 0
    if config.add_bias_linear:
        biases += sum(fan_out for name, (_fan_in, fan_out) in shapes.items() if name != "query_key_value")
    return biases + 2 * config.hidden_size


def base_parameter_count(config: ChatGLMConfig) -> int:
    """Parameters of the base model: embedding, GLM blocks, final norm, output layer."""
    per_layer = layer_linear_weights(config) + layer_small_parameters(config)
    final_norm = config.hidden_size if config.post_layer_norm else 0
    return 2 * config.padded_vocab_size * config.hidden_size + config.num_layers * per_layer + final_norm


def prefix_parameter_count(config: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool) -> int:
    """Parameters of the P-Tuning v2 prefix encoder."""
    kv_size = config.num_layers * 2 * config.num_key_value_groups * config.kv_channels
    count = pre_seq_len * kv_size
    if prefix_projection:
        count += (kv_size * config.hidden_size + config.hidden_size) + (config.hidden_size * kv_size + kv_size)
    return count
