"""DoRA (`method: dora`), the method added through finetune.methods' interface with one module, one registry line and
one config file: trained from configs/dora.yaml with flags on top, saved as a PEFT adapter folder whose config says
use_dora, loaded back by inference to the same logits, counted by the preflight, and an explicit --method checked
against the other methods' flags."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import input_output_records, run_arguments, write_jsonl
from transformers import AutoConfig, AutoTokenizer

from finetune.arguments import ModelArguments
from finetune.methods.base import CheckpointKind
from finetune.checkpoints import load_for_inference
from finetune.memory_preflight import setup_from_arguments
from finetune.methods import method_named, method_of
from finetune.methods.base import count_parameters
from finetune.train import main

REPO_ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def dora_run(tiny_model_dir, tmp_path_factory):
    """Four DoRA steps of the tiny model, started from configs/dora.yaml with the test's flags on top."""
    root = tmp_path_factory.mktemp("dora")
    train_file = write_jsonl(root / "train.jsonl", input_output_records(8))
    flags = run_arguments(tiny_model_dir, train_file, root / "out", root / "cache", lora_rank=4, lora_dropout=0.0)
    outcome = main([str(REPO_ROOT / "configs" / "dora.yaml"), *flags, "--bf16", "False", "--packing", "False"])
    return SimpleNamespace(outcome=outcome, output_dir=root / "out")


def test_config_with_flags_on_top_trains_dora(dora_run):
    record = json.loads((dora_run.output_dir / "training_record.json").read_text())
    assert record["method"] == "dora" and record["dora"]["use_dora"] is True and record["dora"]["rank"] == 4
    adapter_config = json.loads((dora_run.output_dir / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and adapter_config["r"] == 4
    trainer = dora_run.outcome.trainer
    assert trainer.args.max_steps == 4 and trainer.args.learning_rate == 1e-2  # the flags, not the config's 1000 / 2e-4
    magnitudes = [name for name, parameter in trainer.model.named_parameters() if "lora_magnitude_vector" in name]
    assert magnitudes and all(trainer.model.get_parameter(name).requires_grad for name in magnitudes)


def test_inference_loads_the_dora_adapter_to_the_same_logits(dora_run, tiny_model_dir):
    model, _, kind = load_for_inference(dora_run.output_dir, device="cpu", dtype="float32")
    assert kind is CheckpointKind.LORA
    batch = AutoTokenizer.from_pretrained(tiny_model_dir)(["Hello"], return_tensors="pt")
    with torch.no_grad():
        expected = dora_run.outcome.trainer.model.eval()(**batch).logits
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)


def test_preflight_counts_the_adapters_and_magnitudes(dora_run, tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), method="dora", lora_rank=4)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    setup = setup_from_arguments(config, model_args, SimpleNamespace(), SimpleNamespace())
    trainable, _ = count_parameters(dora_run.outcome.trainer.model)
    assert method_named(setup.method).trainable_parameter_count(config, setup.options) == trainable
    lora_only = method_named("lora").trainable_parameter_count(config, setup.options)
    assert trainable > lora_only


def test_explicit_method_is_checked_against_the_flags(tiny_model_dir):
    base = str(tiny_model_dir)
    assert ModelArguments(model_name_or_path=base, lora_rank=4).method == "lora"
    assert ModelArguments(model_name_or_path=base, method="lora", lora_rank=4, quantization_bit=4).method == "qlora"
    with pytest.raises(ValueError, match="method 'dora' needs --lora_rank N"):
        method_of(ModelArguments(model_name_or_path=base, method="dora"))
    with pytest.raises(ValueError, match="--pre_seq_len does not belong to method 'dora'"):
        method_of(ModelArguments(model_name_or_path=base, method="dora", pre_seq_len=4))
    with pytest.raises(ValueError, match="unknown fine-tuning method 'lorra'"):
        method_of(ModelArguments(model_name_or_path=base, method="lorra", lora_rank=4))
