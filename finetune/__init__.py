"""ChatGLM3 fine-tuning: our ChatGLM3 model and tokenizer (registered with transformers' Auto classes when
`finetune.model` is imported), data encoding, training, metrics and inference.

The package itself imports nothing heavy, so the plain-Python modules the converters share with it
(`finetune.atomic_files`, `finetune.data.records`, `finetune.data.tool_calls`) load without torch; the model
classes named below load on first use.
"""

import importlib
import logging

# transformers imports peft, which imports bitsandbytes whenever it is installed; its CPU backend then warns at import
# that an optional kernel package is missing, on every run, quantized or not. Its own fallback kernel is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMTokenizer"]


def __getattr__(name: str) -> object:
    """The model classes of `finetune.model`, imported (and registered with the Auto classes) on first use."""
    if name in __all__:
        return getattr(importlib.import_module("finetune.model"), name)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
