"""The one quantization policy: its bitsandbytes settings, what training_record.json says, and reading it back."""

import importlib.util

import pytest
import torch

from finetune.quantization import (
    UNQUANTIZED_MODULES,
    check_quantization_available,
    quantization_config,
    quantization_record,
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


@pytest.mark.skipif(BITSANDBYTES_INSTALLED, reason="bitsandbytes is installed here")
def test_missing_bitsandbytes_error():
    with pytest.raises(RuntimeError, match="needs the bitsandbytes package"):
        check_quantization_available(4)
