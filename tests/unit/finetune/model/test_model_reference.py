"""Our ChatGLM3 implementation against outputs of the official remote code (shared/reference/chatglm3-tiny)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import finetune.model  # noqa: F401  (registers the Auto classes)
from finetune.model import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.methods.ptuning import load_prefix_checkpoint

VARIANTS = {"plain": "", "ptuning": "ptuning_", "ptuning_proj": "ptuning_proj_"}


@pytest.fixture(scope="module")
def tensors(reference_dir):
    return load_file(reference_dir / "reference_tensors.safetensors")


def load_variant(reference_dir, variant: str) -> ChatGLMForConditionalGeneration:
    """The reference model through the Auto API, with the official prefix checkpoint for P-Tuning variants."""
    if variant == "plain":
        model = AutoModelForCausalLM.from_pretrained(reference_dir / "model")
    else:
        prefix_config = json.loads((reference_dir / variant / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(
            reference_dir / "model",
            pre_seq_len=prefix_config["pre_seq_len"],
            prefix_projection=prefix_config["prefix_projection"],
        )
        load_prefix_checkpoint(model, reference_dir / variant)
    return model.eval()


def test_auto_classes_resolve_to_ours(reference_model_dir):
    config = AutoConfig.from_pretrained(reference_model_dir)
    assert isinstance(config, ChatGLMConfig)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir)
    assert type(model) is ChatGLMForConditionalGeneration


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batch_logits_match_official(reference_dir, tensors, variant):
    model = load_variant(reference_dir, variant)
    with torch.no_grad():
        logits = model(
            input_ids=tensors["batch_input_ids"],
            attention_mask=tensors["batch_attention_mask"],
            position_ids=tensors["batch_position_ids"],
        ).logits
    expected = tensors[VARIANTS[variant] + "batch_logits"]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-4


def test_batch_logits_without_position_ids(reference_dir, tensors):
    """Position ids derived from the left-padded mask equal the official ones."""
    model = load_variant(reference_dir, "plain")
    with torch.no_grad():
        logits = model(input_ids=tensors["batch_input_ids"], attention_mask=tensors["batch_attention_mask"]).logits
    real = tensors["batch_attention_mask"].bool()
    assert (logits - tensors["batch_logits"]).abs()[real].max().item() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lm_loss_matches_official(reference_dir, reference, tensors, variant):
    model = load_variant(reference_dir, variant)
    with torch.no_grad():
        output = model(input_ids=tensors["lm_input_ids"], labels=tensors["lm_labels"])
    assert abs(output.loss.item() - reference["model"][VARIANTS[variant] + "lm_loss"]) <= 1e-5
    if variant == "plain":
        assert (output.logits - tensors["lm_logits"]).abs().max().item() <= 1e-4


def test_training_mode_loss_equals_eval_loss(reference_dir, reference, tensors):
    """The chunked training loss (no logits kept) equals the official loss."""
    model = load_variant(reference_dir, "plain").train()
    output = model(input_ids=tensors["lm_input_ids"], labels=tensors["lm_labels"])
    assert output.logits is None
    assert abs(output.loss.item() - reference["model"]["lm_loss"]) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_matches_official(reference_dir, reference, variant):
    model = load_variant(reference_dir, variant)
    stop_ids = [2, 906, 908]
    for case in reference["model"][VARIANTS[variant] + "greedy"]:
        prompt = torch.tensor([case["prompt_ids"]])
        output = model.generate(
            prompt, max_new_tokens=len(case["new_ids"]), do_sample=False, eos_token_id=stop_ids, pad_token_id=0
        )
        assert output[0, prompt.shape[1] :].tolist() == case["new_ids"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_left_padded_generation_equals_per_prompt(reference_dir, reference, variant):
    model = load_variant(reference_dir, variant)
    prompts = [case["prompt_ids"] for case in reference["model"]["greedy"]]
    width = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=[2, 906, 908], pad_token_id=0)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
    for row, ids in enumerate(prompts):
        single = model.generate(torch.tensor([ids]), **settings)[0, len(ids) :].tolist()
        produced = batched[row, width:].tolist()[: len(single)]
        assert produced == single
