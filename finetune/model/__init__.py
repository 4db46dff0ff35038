"""ChatGLM3 model, config and tokenizer, registered with transformers' Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration import ChatGLMConfig
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel, ChatGLMPreTrainedModel
from .tokenization import ChatGLMTokenizer

AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
AutoModel.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "ChatGLMTokenizer",
]
