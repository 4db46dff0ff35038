"""The chatglm3-6b preset of finetune.tiny_model: exact config, official tensor names and shard layout (no weights
are written here; tests/e2e/test_real_size.py writes and runs a 2-layer folder at the real width)."""

import json

import pytest
import torch

from finetune.model.configuration import ChatGLMConfig
from finetune.real_size_model import (
    CHATGLM3_6B_SHARDS,
    ROTARY_KEY,
    chatglm3_6b_config,
    random_weight,
    shard_file_name,
    shard_names,
    weight_shapes,
)
from finetune.tiny_model import main

# chatglm3-6b's config.json values for the fields that decide the shape.
CHATGLM3_6B_SHAPE = {
    "num_layers": 28, "hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128,
    "multi_query_attention": True, "multi_query_group_num": 2, "ffn_hidden_size": 13696, "padded_vocab_size": 65024,
    "seq_length": 8192, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True, "layernorm_epsilon": 1e-5,
    "post_layer_norm": True, "apply_residual_connection_post_layernorm": False, "original_rope": True,
    "rope_ratio": 1, "tie_word_embeddings": False,
}
# The bf16 bytes chatglm3-6b's model.safetensors.index.json records as total_size.
CHATGLM3_6B_WEIGHT_BYTES = 12_487_168_064


def test_preset_config_has_chatglm3_6b_fields_and_bf16():
    config = chatglm3_6b_config()
    assert {name: getattr(config, name) for name in CHATGLM3_6B_SHAPE} == CHATGLM3_6B_SHAPE
    assert config.dtype == torch.bfloat16
    assert chatglm3_6b_config(2).num_layers == 2
    with pytest.raises(ValueError, match="--layers must be at least 1"):
        chatglm3_6b_config(0)


def test_tensor_names_are_the_official_ones(reference_model_dir):
    official = json.loads((reference_model_dir / "pytorch_model.bin.index.json").read_text(encoding="utf-8"))
    reference_config = ChatGLMConfig.from_pretrained(reference_model_dir)
    assert set(weight_shapes(chatglm3_6b_config(reference_config.num_layers))) == set(official["weight_map"])


def test_full_shape_has_chatglm3_6b_weight_bytes_in_seven_ordered_shards():
    shapes = weight_shapes(chatglm3_6b_config())
    assert 2 * sum(shape.numel() for shape in shapes.values()) == CHATGLM3_6B_WEIGHT_BYTES
    assert shapes["transformer.encoder.layers.27.self_attention.query_key_value.weight"] == (4608, 4096)
    assert shapes["transformer.output_layer.weight"] == (65024, 4096)
    groups = shard_names(shapes, CHATGLM3_6B_SHARDS)
    assert len(groups) == CHATGLM3_6B_SHARDS
    assert [name for group in groups for name in group] == list(shapes)  # contiguous, in module order
    sizes = [2 * sum(shapes[name].numel() for name in group) for group in groups]
    assert max(sizes) < 2 * 2**30 and min(sizes) > 1.4 * 2**30
    assert shard_file_name(3, 7, "bin") == "pytorch_model-00003-of-00007.bin"
    assert shard_file_name(7, 7, "safetensors") == "model-00007-of-00007.safetensors"


def test_random_weights_are_bf16_with_unit_norms_and_official_rotary_frequencies():
    config = chatglm3_6b_config(1)
    generator = torch.Generator().manual_seed(0)
    norm = random_weight("transformer.encoder.layers.0.input_layernorm.weight", torch.Size([4096]), config, generator)
    dense = random_weight("transformer.encoder.layers.0.self_attention.dense.weight", torch.Size([64, 64]), config,
                          generator)
    rotary = random_weight(ROTARY_KEY, torch.Size([32]), config, generator)
    assert norm.dtype == dense.dtype == rotary.dtype == torch.bfloat16
    assert torch.equal(norm, torch.ones(4096, dtype=torch.bfloat16))
    assert 0.015 < float(dense.float().std()) < 0.025
    assert rotary.shape == (32,) and float(rotary[0]) == 1.0
    assert float(rotary[1]) == pytest.approx(10000 ** (-2 / 64), rel=1e-2)


def test_layers_without_the_preset_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--output_dir", str(tmp_path / "m"), "--layers", "2"])
    assert exit_info.value.code == 2
    assert "--layers goes with --preset" in capsys.readouterr().err
