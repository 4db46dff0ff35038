"""The one quantization policy: its bitsandbytes settings, what training_record.json says, and reading it back."""

import importlib.util

import pytest
import torch

from finetune.model.configuration import CHATGLM3_6B_FIELDS, ChatGLMConfig
from finetune.quantization import (
    UNQUANTIZED_MODULES,
    check_4bit_layer_widths,
    check_quantization_available,
    inference_quantization,
    quantization_config,
    quantization_record,
    quantized_layer_widths,
    recorded_bits,
)

BITSANDBYTES_INSTALLED = importlib.util.find_spec("bitsandbytes") is not None


def test_quantization_settings():
    config = quantization_config(4)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert {"output_layer", "prefix_encoder"} <= set(config.llm_int8_skip_modules)
    assert quantization_config(8).load_in_8bit
    with pytest.raises(ValueError, match="must be one of"):
        quantization_config(3)


def test_record_says_what_the_config_does_and_reads_back():
    record = quantization_record(4)
    assert record == {
        "bits": 4,
        "skip_modules": UNQUANTIZED_MODULES,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    assert quantization_record(8) == {"bits": 8, "skip_modules": UNQUANTIZED_MODULES}
    assert quantization_record(None) is None
    assert recorded_bits({"method": "qlora", "quantization": record}) == 4
    assert recorded_bits({"method": "qlora", "quantization_bit": 8}) == 8  # records written before `quantization`
    assert recorded_bits({"method": "lora", "quantization": None, "quantization_bit": None}) is None
    assert recorded_bits(None) is None


def test_inference_loads_the_asked_bits_else_the_recorded_ones():
    assert inference_quantization(None, None, "cpu") is None
    assert inference_quantization(0, 4, "cpu") is None  # 0 asks for an unquantized base
    with pytest.raises(ValueError, match=r"^quantization_bit must be one of \(4, 8\), got 3$"):
        inference_quantization(None, 3, "cpu")
    if BITSANDBYTES_INSTALLED:
        assert inference_quantization(None, 4, "cpu") == 4 and inference_quantization(8, 4, "cpu") == 8
        with pytest.raises(RuntimeError, match=r"^quantization_bit=4 does not run on mps; use --device cuda or cpu$"):
            inference_quantization(None, 4, "mps")


@pytest.mark.skipif(BITSANDBYTES_INSTALLED, reason="bitsandbytes is installed here")
def test_missing_bitsandbytes_error():
    with pytest.raises(RuntimeError, match="needs the bitsandbytes package"):
        check_quantization_available(4)


def test_4bit_layer_widths_of_chatglm3_6b_pass_and_an_odd_ffn_width_is_named():
    config = ChatGLMConfig(**CHATGLM3_6B_FIELDS)
    assert quantized_layer_widths(config) == {
        "query_key_value": (4096, 4608),
        "dense": (4096, 4096),
        "dense_h_to_4h": (4096, 27392),
        "dense_4h_to_h": (13696, 4096),
    }
    check_4bit_layer_widths(config)
    with pytest.raises(ValueError, match="its dense_4h_to_h layers are 13728 inputs x 4096 outputs"):
        check_4bit_layer_widths(ChatGLMConfig(**CHATGLM3_6B_FIELDS, ffn_hidden_size=13728))
