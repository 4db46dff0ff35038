"""transformers' own model contract: its common model tests (ModelTesterMixin) run against our ChatGLM3 classes.

The tests come from the sdist of the installed transformers version (`tests/test_modeling_common.py`), fetched with
`pip download --no-deps --no-binary :all: transformers==<installed>` and cached on first use (see
cached_test_dependencies.py). The sdist does not ship `tests/generation/test_utils.py` (GenerationTesterMixin) nor
`tests/exporters/test_export.py` (ExportTesterMixin), so those mixins are empty stand-ins and their tests are not
collected; generation is covered by our own tests (tests/unit/finetune/model/test_model_behaviour.py, tests/e2e/test_official_compat.py).
Every collected common test passes, or is skipped below with the reason it does not apply to ChatGLM3.
"""

import sys
import unittest

import torch
from cached_test_dependencies import transformers_common_tests

from finetune.model import ChatGLMConfig
from finetune.model.modeling import ChatGLMForConditionalGeneration, ChatGLMModel

sys.path.insert(0, str(transformers_common_tests()))
from transformers_common_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    ids_tensor,
)


class ChatGLMModelTester:
    """Builds a tiny ChatGLM3 config and inputs as transformers' GLM tester does: 2 layers, hidden 32, multi-query
    attention with 2 groups."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 2, seq_length: int = 7):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = True
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.head_dim = 8
        self.num_key_value_heads = 2
        self.intermediate_size = 37

    def get_config(self) -> ChatGLMConfig:
        """The tiny config."""
        return ChatGLMConfig(
            num_layers=self.num_hidden_layers,
            padded_vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.intermediate_size,
            kv_channels=self.head_dim,
            num_attention_heads=self.num_attention_heads,
            multi_query_attention=True,
            multi_query_group_num=self.num_key_value_heads,
            add_qkv_bias=True,
            seq_length=512,
            pad_token_id=0,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[ChatGLMConfig, dict[str, torch.Tensor]]:
        """The config and a batch of random ids, left-padded as the ChatGLM3 tokenizer pads (row i has i pad tokens).

        transformers' default random mask has holes in the middle of a row, which no ChatGLM3 input has (padding is
        on the left; packed rows number their segments 1, 2, ...).
        """
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones(self.batch_size, self.seq_length, dtype=torch.long)
        for row in range(self.batch_size):
            attention_mask[row, :row] = 0
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class ChatGLMCommonModelTest(ModelTesterMixin, unittest.TestCase):
    """The common model tests on ChatGLMModel and ChatGLMForConditionalGeneration."""

    all_model_classes = (ChatGLMModel, ChatGLMForConditionalGeneration)
    # Attention runs in torch SDPA, which does not return the weights; output_attentions=True raises a clear error.
    has_attentions = False
    # The prefix encoder's P-Tuning parameters are created only with pre_seq_len; resizing embeddings is supported.
    test_resize_embeddings = True

    def setUp(self) -> None:
        self.model_tester = ChatGLMModelTester(self)

    def _prepare_for_class(self, inputs_dict: dict, model_class: type, return_labels: bool = False) -> dict:
        """The mixin's inputs; with `return_labels` the causal LM gets labels (the mixin adds them only for the causal
        LMs it knows by name, transformers' built-in ones; ours is registered at run time)."""
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is ChatGLMForConditionalGeneration:
            inputs["labels"] = inputs["input_ids"].clone()
        return inputs

    def test_training(self) -> None:
        """The mixin's training test, on the causal LM: ChatGLMModel is the bare transformer, which has no loss (the
        mixin leaves out the bare models it knows by name, transformers' built-in ones)."""
        self.all_model_classes = (ChatGLMForConditionalGeneration,)
        super().test_training()

    def check_training_gradient_checkpointing(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The mixin's gradient-checkpointing training check, on the causal LM (see test_training)."""
        self.all_model_classes = (ChatGLMForConditionalGeneration,)
        super().check_training_gradient_checkpointing(gradient_checkpointing_kwargs)

    @unittest.skip(
        reason="GenerationTesterMixin is not in the transformers sdist (tests/generation/ is not shipped), so the "
        "generate() tests cannot run here; our generation is tested in test_model_behaviour.py and "
        "test_official_compat.py"
    )
    def test_generation_tester_mixin_inheritance(self) -> None:
        """Skipped: see the reason."""

    @unittest.skip(
        reason="ChatGLM3 keeps `past_key_values` as a supported name for the cache (the official code's name, used "
        "by our server and chat()), so passing it does not warn as deprecated"
    )
    def test_bc_cache_name_forward(self) -> None:
        """Skipped: see the reason."""
