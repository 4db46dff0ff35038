"""The one bitsandbytes quantization policy, used to train (QLoRA, quantized P-Tuning v2) and to load for inference.

4 bits: NF4 with double quantization and bf16 compute; 8 bits: LLM.int8(). The output layer and the prefix encoder
are never quantized. A run records its settings in training_record.json (`quantization_record`), and inference
rebuilds the base from that record unless told otherwise (`inference_quantization`), so an adapter is always
evaluated on the base it was trained on.
"""

import importlib.metadata
import importlib.util

import torch
from packaging.version import Version
from transformers import BitsAndBytesConfig, PretrainedConfig

QUANTIZATION_BITS = (4, 8)
# The first bitsandbytes release whose 4/8-bit layers run (slowly) on the CPU, which is how the tests train QLoRA.
BITSANDBYTES_CPU_VERSION = Version("0.50")
# Never quantized: the vocabulary projection (quality) and the prefix encoder (it is what P-Tuning trains).
UNQUANTIZED_MODULES = ["output_layer", "prefix_encoder"]
COMPUTE_DTYPE = torch.bfloat16
NF4 = "nf4"
# bitsandbytes quantizes 4-bit weights in blocks of 64 values; its fused CPU inference path (CPUs with AVX512-BF16)
# repacks every weight into rows of whole blocks and tiles of 32 output rows, and fails on any other layer shape.
BLOCK_SIZE_4BIT = 64
CPU_OUTPUT_TILE_4BIT = 32


def check_quantization_available(bits: int, device: str | None = None) -> None:
    """Raise RuntimeError, saying what to do, when bitsandbytes is missing, or too old to quantize off CUDA."""
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"--quantization_bit must be one of {QUANTIZATION_BITS}, got {bits}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(
            f"--quantization_bit {bits} needs the bitsandbytes package, which is not installed: "
            "`pip install -r requirements-gpu.txt` (or `pip install bitsandbytes`), or leave out --quantization_bit"
        )
    on_cuda = device == "cuda" if device is not None else torch.cuda.is_available()
    installed = Version(importlib.metadata.version("bitsandbytes"))
    if not on_cuda and installed < BITSANDBYTES_CPU_VERSION:
        raise RuntimeError(
            f"--quantization_bit {bits} without a CUDA GPU needs bitsandbytes>={BITSANDBYTES_CPU_VERSION} (its CPU "
            f"backend), but {installed} is installed: `pip install -U bitsandbytes`, run on a GPU machine, or leave "
            "out --quantization_bit"
        )


def inference_quantization(asked: int | None, recorded: int | None, device: str) -> int | None:
    """The bits to load a base with for inference: the asked ones (0: none), else the ones its checkpoint's training
    record names (`recorded`); ValueError or RuntimeError, saying what to do, when they cannot run on `device`."""
    bits = recorded if asked is None else asked
    if not bits:
        return None
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"quantization_bit must be one of {QUANTIZATION_BITS}, got {bits}")
    check_quantization_available(bits, device)
    if device == "mps":
        raise RuntimeError(f"quantization_bit={bits} does not run on mps; use --device cuda or cpu")
    return bits


def quantization_config(bits: int) -> BitsAndBytesConfig:
    """bitsandbytes settings: 4-bit NF4 with double quantization and bf16 compute, or LLM.int8() 8-bit."""
    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=NF4,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=COMPUTE_DTYPE,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    raise ValueError(f"--quantization_bit must be one of {QUANTIZATION_BITS}, got {bits}")


def quantization_record(bits: int | None) -> dict | None:
    """What training_record.json says about the base's quantization (None: not quantized)."""
    if not bits:
        return None
    config = quantization_config(bits)
    record = {"bits": bits, "skip_modules": list(UNQUANTIZED_MODULES)}
    if bits == 4:
        record.update(
            quant_type=config.bnb_4bit_quant_type,
            double_quant=config.bnb_4bit_use_double_quant,
            compute_dtype=str(COMPUTE_DTYPE).removeprefix("torch."),
        )
    return record


def recorded_bits(record: dict | None) -> int | None:
    """The quantization bits a training record's base was loaded with, or None."""
    if not record:
        return None
    quantization = record.get("quantization")
    if isinstance(quantization, dict) and quantization.get("bits"):
        return int(quantization["bits"])
    return record.get("quantization_bit") or None


def quantized_layer_widths(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(input width, output width) of each linear layer a ChatGLM3 block quantizes, from the model config."""
    projection = config.num_attention_heads * config.kv_channels
    return {
        "query_key_value": (config.hidden_size, projection + 2 * config.num_key_value_groups * config.kv_channels),
        "dense": (projection, config.hidden_size),
        "dense_h_to_4h": (config.hidden_size, 2 * config.ffn_hidden_size),
        "dense_4h_to_h": (config.ffn_hidden_size, config.hidden_size),
    }


def check_4bit_layer_widths(config: PretrainedConfig) -> None:
    """ValueError (one line: the layer, its width, what to do) when a 4-bit checkpoint of this model could not run
    CPU inference: every quantized layer must take a multiple of 64 inputs and give a multiple of 32 outputs."""
    for layer, (inputs, outputs) in quantized_layer_widths(config).items():
        if inputs % BLOCK_SIZE_4BIT or outputs % CPU_OUTPUT_TILE_4BIT:
            raise ValueError(
                f"--quantization_bit 4 cannot be used with this model: its {layer} layers are {inputs} inputs x "
                f"{outputs} outputs, but bitsandbytes' 4-bit CPU inference needs inputs in multiples of "
                f"{BLOCK_SIZE_4BIT} and outputs in multiples of {CPU_OUTPUT_TILE_4BIT}, so the checkpoint would fail "
                "in inference and evaluation on the CPU; use --quantization_bit 8, or a model with such widths (a "
                "tiny one: python -m finetune.tiny_model --ffn_hidden_size 128)"
            )
