"""ChatGLM3 fine-tuning: our ChatGLM3 model and tokenizer (registered with transformers' Auto classes), data
encoding, training, metrics and inference."""

from .model import (
    ChatGLMConfig,
    ChatGLMForConditionalGeneration,
    ChatGLMModel,
    ChatGLMTokenizer,
)

__all__ = ["ChatGLMConfig", "ChatGLMForConditionalGeneration", "ChatGLMModel", "ChatGLMTokenizer"]
