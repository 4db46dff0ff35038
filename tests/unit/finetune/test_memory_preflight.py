"""Memory preflight: estimates for ChatGLM3-6B shapes, advice for a simulated 24 GiB GPU, the tiny model's counts."""

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from transformers import TrainingArguments

from finetune import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.arguments import ModelArguments
from finetune.memory_preflight import (
    GIB,
    TrainingSetup,
    estimate_training_memory,
    longest_labelled,
    longest_row,
    memory_advice,
    run_preflight,
    setup_from_arguments,
)
from finetune.methods.lora import lora_parameter_count
from finetune.model.configuration import CHATGLM3_6B_FIELDS
from finetune.model.loss import DEFAULT_CHUNK_TOKENS, chunked_causal_lm_loss
from finetune.model.shapes import base_parameter_count, prefix_parameter_count

CHATGLM3_6B = ChatGLMConfig(**CHATGLM3_6B_FIELDS)
FULL_ARGUMENTS = ModelArguments(model_name_or_path="chatglm3-6b")
DEVICE_24GIB = 24 * GIB


def _tiny_config(**overrides) -> ChatGLMConfig:
    values = {
        "multi_query_attention": True,
        "num_layers": 2,
        "padded_vocab_size": 96,
        "hidden_size": 32,
        "ffn_hidden_size": 48,
        "kv_channels": 8,
        "num_attention_heads": 4,
        "multi_query_group_num": 2,
        "seq_length": 64,
    }
    values.update(overrides)
    return ChatGLMConfig(**values)


def test_parameter_counts_match_the_real_model():
    config = _tiny_config(pre_seq_len=4, prefix_projection=True)
    model = ChatGLMForConditionalGeneration(config)
    prefix = sum(p.numel() for p in model.transformer.prefix_encoder.parameters())
    base = sum(p.numel() for p in model.parameters()) - prefix
    assert base_parameter_count(config) == base
    assert prefix_parameter_count(config, 4, True) == prefix


def test_lora_count_matches_peft():
    config = _tiny_config()
    model = ChatGLMForConditionalGeneration(config)
    targets = ("query_key_value", "dense_4h_to_h")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert lora_parameter_count(config, 4, targets) == trainable
    with pytest.raises(ValueError, match="not ChatGLM3 linear layers"):
        lora_parameter_count(config, 4, ("q_proj",))


def test_chatglm3_6b_weights_and_trainables():
    assert 6.2e9 < base_parameter_count(CHATGLM3_6B) < 6.3e9
    ptuning = estimate_training_memory(
        CHATGLM3_6B, TrainingSetup("ptuning", batch_size=1, seq_length=1024, options={"pre_seq_len": 128})
    )
    assert 11.4 * GIB < ptuning.weights < 11.8 * GIB  # bf16 base weights plus a 7 MiB prefix
    assert ptuning.trainable_parameters == 128 * 28 * 2 * 2 * 128  # 1.8 M
    lora_setup = TrainingSetup("lora", batch_size=1, seq_length=1024, options={"lora_rank": 8})
    lora = estimate_training_memory(CHATGLM3_6B, lora_setup)
    assert lora.trainable_parameters < 0.001 * lora.total_parameters
    assert lora.gradients + lora.optimizer_states < 0.1 * GIB

    qlora = estimate_training_memory(
        CHATGLM3_6B, TrainingSetup("qlora", batch_size=1, seq_length=1024, options={"lora_rank": 8}, quantization_bit=4)
    )
    # 4-bit blocks (5.7 B parameters: ~3 GiB), bf16 embedding and output layer (0.53 B parameters: ~1 GiB)
    assert 3.5 * GIB < qlora.weights < 4.5 * GIB

    full = estimate_training_memory(CHATGLM3_6B, TrainingSetup("full", batch_size=1, seq_length=1024))
    assert full.gradients == full.weights
    assert full.optimizer_states == full.trainable_parameters * 12  # AdamW fp32 m, v + fp32 master weights
    eight_bit = estimate_training_memory(
        CHATGLM3_6B, TrainingSetup("full", batch_size=1, seq_length=1024, optimizer_8bit=True)
    )
    assert eight_bit.optimizer_states == eight_bit.trainable_parameters * (2 + 4)


def test_activations_scale_and_checkpointing_saves():
    setup = TrainingSetup("ptuning", batch_size=1, seq_length=1024, options={"pre_seq_len": 128})
    plain = estimate_training_memory(CHATGLM3_6B, setup)
    double = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(setup, batch_size=2))
    checkpointed = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(setup, gradient_checkpointing=True))
    assert 2 * GIB < plain.activations < 8 * GIB
    assert double.activations == pytest.approx(2 * plain.activations, rel=0.01)
    assert checkpointed.activations < plain.activations / 5
    # The loss never holds more than one chunk of DEFAULT_CHUNK_TOKENS x 65024 logits.
    long = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(setup, batch_size=8, seq_length=4096))
    assert long.logits == DEFAULT_CHUNK_TOKENS * 65024 * (2 + 4 + 4 + 4)


def test_the_loss_projects_only_the_labelled_tokens_of_a_row():
    setup = TrainingSetup("lora", batch_size=2, seq_length=256, options={"lora_rank": 8})
    every_token = estimate_training_memory(CHATGLM3_6B, setup)
    reply_only = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(setup, labelled_tokens=126))
    assert every_token.logits == 2 * 256 * 65024 * 14
    assert reply_only.logits == 2 * 126 * 65024 * 14
    assert reply_only.total == every_token.total - 2 * 130 * 65024 * 14
    # What the data arguments allow: input-output rows learn the response and eos; conversations and packed rows
    # may learn any token.
    input_output = SimpleNamespace(max_source_length=130, max_target_length=125, data_format="input_output")
    assert longest_labelled(input_output) == 126
    assert longest_labelled(SimpleNamespace(**vars(input_output), packing=True)) is None
    assert longest_labelled(SimpleNamespace(max_seq_length=256, data_format="conversations")) is None


def test_the_backward_peak_counts_the_larger_of_the_logits_chunk_and_one_layers_backward():
    # The loss's backward pass ends before the last layer's begins: short rows peak on the logits chunk, long rows
    # on one layer's activations and their gradients.
    short = estimate_training_memory(CHATGLM3_6B, TrainingSetup("lora", batch_size=1, seq_length=256, options={"lora_rank": 8}))
    long = estimate_training_memory(CHATGLM3_6B, TrainingSetup("lora", batch_size=8, seq_length=4096, options={"lora_rank": 8}))
    for estimate, peak in ((short, short.logits), (long, long.layer_backward)):
        kept = estimate.weights + estimate.gradients + estimate.optimizer_states + estimate.activations
        assert estimate.total == kept + peak == kept + max(estimate.logits, estimate.layer_backward)
    assert short.logits > short.layer_backward and long.layer_backward > long.logits


def _resident_bytes(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_logits_estimate_matches_the_peak_of_the_chunked_loss_at_the_real_vocabulary():
    # One 254-token chunk against chatglm3-6b's 4096 x 65024 output layer in bf16, forward and backward as training
    # runs it; the process's peak RSS growth (reset through clear_refs) is the loss's own memory.
    vocabulary, tokens = 65024, 254
    output_layer = torch.nn.Linear(4096, vocabulary, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(1, tokens + 1, 4096, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocabulary, (1, tokens + 1))
    config = ChatGLMConfig(**CHATGLM3_6B_FIELDS)
    setup = TrainingSetup("lora", batch_size=1, seq_length=tokens, options={"lora_rank": 8})
    estimate = estimate_training_memory(config, setup)
    measured = []
    for _ in range(3):
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")
        before = _resident_bytes("VmRSS")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = chunked_causal_lm_loss(hidden, labels, output_layer)
        loss.backward()
        hidden.grad = None
        measured.append(_resident_bytes("VmHWM") - before)
    assert sorted(measured)[1] == pytest.approx(estimate.logits, rel=0.15)


def test_zero_stages_divide_by_gpus_and_offload_to_cpu():
    base = TrainingSetup("full", batch_size=1, seq_length=512, gradient_checkpointing=True)
    single = estimate_training_memory(CHATGLM3_6B, base)
    zero2 = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(base, zero_stage=2, num_gpus=4))
    zero3 = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(base, zero_stage=3, num_gpus=4))
    offload = estimate_training_memory(
        CHATGLM3_6B, dataclasses.replace(base, zero_stage=3, num_gpus=4, offload_optimizer=True, offload_params=True)
    )
    assert zero2.optimizer_states == single.optimizer_states // 4
    assert zero2.gradients == single.gradients // 4
    assert zero2.weights == single.weights
    assert zero3.weights < single.weights / 3
    assert offload.optimizer_states == 0
    assert offload.total < zero3.total < zero2.total < single.total
    assert offload.cpu_offload > single.optimizer_states / 4
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        dataclasses.replace(base, zero_stage=2, offload_params=True)


def test_advice_for_a_24gib_gpu():
    too_big = TrainingSetup("ptuning", batch_size=8, seq_length=2048, options={"pre_seq_len": 128})
    advice = "\n".join(memory_advice(CHATGLM3_6B, too_big, DEVICE_24GIB))
    assert "--per_device_train_batch_size" in advice and "--gradient_accumulation_steps" in advice
    assert "--gradient_checkpointing" in advice
    assert "--quantization_bit 4" in advice
    assert "fits" in advice

    full = TrainingSetup("full", batch_size=1, seq_length=1024)
    full_advice = "\n".join(memory_advice(CHATGLM3_6B, full, DEVICE_24GIB))
    assert "ds_configs/zero3_offload.json" in full_advice
    assert "QUANTIZATION_BIT" not in full_advice


def _arguments(tmp_path, **overrides) -> TrainingArguments:
    values = {"output_dir": str(tmp_path), "use_cpu": True, "per_device_train_batch_size": 8, "report_to": "none"}
    values.update(overrides)
    return TrainingArguments(**values)


def test_run_preflight_warns_for_simulated_24gib_device(tmp_path, caplog):
    model_args = ModelArguments(model_name_or_path="chatglm3-6b", pre_seq_len=128)
    data_args = SimpleNamespace(
        max_source_length=1024, max_target_length=1023, max_seq_length=4096, data_format="input_output"
    )
    with caplog.at_level(logging.INFO, logger="finetune.memory_preflight"):
        estimate = run_preflight(CHATGLM3_6B, model_args, data_args, _arguments(tmp_path), device_memory=DEVICE_24GIB)
    assert estimate.setup.method == "ptuning"
    assert estimate.setup.seq_length == 2048
    assert estimate.setup.weight_dtype == torch.float32
    assert estimate.fits is False
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--quantization_bit 4" in warnings[0] and "--per_device_train_batch_size" in warnings[0]
    assert "24.0 GiB" in warnings[0]
    assert any("Memory estimate per GPU for ptuning" in record.getMessage() for record in caplog.records)


def test_run_preflight_quiet_when_it_fits_and_on_cpu(tmp_path, caplog):
    model_args = ModelArguments(
        model_name_or_path="chatglm3-6b", lora_rank=8, lora_target="query_key_value,dense", quantization_bit=4
    )
    data_args = SimpleNamespace(max_seq_length=512)
    arguments = _arguments(tmp_path, per_device_train_batch_size=1, gradient_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="finetune.memory_preflight"):
        fitting = run_preflight(CHATGLM3_6B, model_args, data_args, arguments, device_memory=DEVICE_24GIB)
        on_cpu = run_preflight(CHATGLM3_6B, model_args, data_args, arguments)
    assert fitting.setup.method == "qlora" and fitting.setup.options.lora_target_modules == ["query_key_value", "dense"]
    assert fitting.fits is True and fitting.advice == ()
    assert on_cpu.device_memory is None and on_cpu.fits is None
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert sum("Memory estimate per GPU" in record.getMessage() for record in caplog.records) == 2


def test_setup_reads_deepspeed_config(tmp_path):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text(
        json.dumps(
            {
                "zero_optimization": {
                    "stage": 3,
                    "offload_optimizer": {"device": "cpu"},
                    "offload_param": {"device": "cpu"},
                }
            }
        )
    )
    training_args = SimpleNamespace(per_device_train_batch_size=2, bf16=True, deepspeed=str(ds_config), world_size=2)
    setup = setup_from_arguments(CHATGLM3_6B, FULL_ARGUMENTS, SimpleNamespace(max_seq_length=256), training_args)
    assert (setup.method, setup.zero_stage, setup.offload_optimizer, setup.offload_params) == ("full", 3, True, True)
    assert setup.num_gpus == 2 and setup.weight_dtype == torch.bfloat16 and setup.seq_length == 256

    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        setup_from_arguments(CHATGLM3_6B, FULL_ARGUMENTS, SimpleNamespace(), SimpleNamespace(deepspeed=str(broken)))


def test_longest_row_from_data_arguments():
    bounds = {"max_source_length": 100, "max_target_length": 27, "max_seq_length": 512}
    assert longest_row(SimpleNamespace(**bounds, data_format="input_output")) == 128
    assert longest_row(SimpleNamespace(**bounds, data_format="conversations")) == 512
    assert longest_row(SimpleNamespace(**bounds), data_format="input_output") == 128
    assert longest_row(SimpleNamespace(**bounds)) == 512  # format unknown: the larger bound
    assert longest_row(SimpleNamespace(**bounds, packing=True, packing_length=1024)) == 1024
    assert longest_row(SimpleNamespace()) is None
    setup = setup_from_arguments(
        CHATGLM3_6B, ModelArguments(model_name_or_path="chatglm3-6b", pre_seq_len=8), SimpleNamespace(**bounds), SimpleNamespace(), seq_length=77
    )
    assert setup.seq_length == 77 and setup.method == "ptuning"
    assert setup_from_arguments(CHATGLM3_6B, FULL_ARGUMENTS, SimpleNamespace(), SimpleNamespace()).seq_length == 8192


def test_all_lora_targets():
    config = _tiny_config()
    names = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    each = sum(lora_parameter_count(config, 2, (name,)) for name in names)
    assert lora_parameter_count(config, 2, ("all",)) == each


def test_preference_pairs_count_two_rows_and_the_reference_pass():
    sft = TrainingSetup("lora", batch_size=1, seq_length=1024, options={"lora_rank": 8})
    dpo = dataclasses.replace(sft, sequences_per_example=2, reference_pass=True)
    sft_estimate, dpo_estimate = estimate_training_memory(CHATGLM3_6B, sft), estimate_training_memory(CHATGLM3_6B, dpo)
    assert dpo_estimate.activations == pytest.approx(2 * sft_estimate.activations, rel=0.01)
    assert dpo_estimate.weights == sft_estimate.weights and dpo_estimate.optimizer_states == sft_estimate.optimizer_states
    assert 0 < dpo_estimate.reference < dpo_estimate.activations
    assert dpo_estimate.total == (sft_estimate.total + dpo_estimate.activations - sft_estimate.activations
                                  + dpo_estimate.reference)  # fmt: skip
    simpo = estimate_training_memory(CHATGLM3_6B, dataclasses.replace(dpo, reference_pass=False))
    assert simpo.reference == 0 and simpo.total < dpo_estimate.total
    summary = dpo_estimate.summary()
    assert "batch 1 pairs = 2 rows x 1024 tokens" in summary and "reference pass" in summary
    print(summary)
