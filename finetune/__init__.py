"""ChatGLM3 fine-tuning: our ChatGLM3 model and tokenizer (registered with transformers' Auto classes), data
encoding, training, metrics and inference."""

import logging

# transformers imports peft, which imports bitsandbytes whenever it is installed; its CPU backend then warns at import
# that an optional kernel package is missing, on every run, quantized or not. Its own fallback kernel is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .model import (
    ChatGLMConfig,
    ChatGLMForConditionalGeneration,
    ChatGLMModel,
    ChatGLMTokenizer,
)

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMTokenizer"]
