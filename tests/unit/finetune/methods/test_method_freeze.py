"""Freeze tuning (--trainable_layers N), the method added through finetune.methods' interface: only the last N
blocks change, the checkpoint is a whole model that inference loads, the preflight counts what trains."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import input_output_records, run_arguments, write_jsonl
from transformers import AutoConfig, AutoTokenizer

from finetune.arguments import ModelArguments
from finetune.methods.base import CheckpointKind
from finetune.checkpoint_format import open_checkpoint
from finetune.checkpoints import load_for_inference
from finetune.memory_preflight import setup_from_arguments
from finetune.methods import method_named
from finetune.methods.base import count_parameters
from finetune.model.checkpoint_files import CheckpointError
from finetune.resume import check_checkpoint_matches
from finetune.train import main


@pytest.fixture(scope="module")
def freeze_run(tiny_model_dir, tmp_path_factory):
    """Four steps of freeze tuning of the tiny model's last block, with the base's weights to compare."""
    root = tmp_path_factory.mktemp("freeze")
    train_file = write_jsonl(root / "train.jsonl", input_output_records(8))
    argv = run_arguments(
        tiny_model_dir, train_file, root / "out", root / "cache", trainable_layers=1, learning_rate=1e-2
    )
    return SimpleNamespace(
        outcome=main(argv), output_dir=root / "out", base=load_file(tiny_model_dir / "model.safetensors")
    )


def test_only_the_last_layers_train(freeze_run):
    saved = load_file(freeze_run.output_dir / "model.safetensors")
    changed = {name for name, value in saved.items() if not torch.equal(value.float(), freeze_run.base[name].float())}
    assert changed and all(name.startswith("transformer.encoder.layers.1.") for name in changed)
    trainable = [p for n, p in freeze_run.outcome.trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all(parameter.dtype == torch.float32 for parameter in trainable)


def test_checkpoint_is_a_whole_model_recorded_as_freeze(freeze_run, tiny_model_dir):
    record = json.loads((freeze_run.output_dir / "training_record.json").read_text())
    assert record["method"] == "freeze" and record["freeze"] == {"trainable_layers": 1}
    model, _, kind = load_for_inference(freeze_run.output_dir, device="cpu", dtype="float32")
    assert kind is CheckpointKind.FULL
    batch = AutoTokenizer.from_pretrained(tiny_model_dir)(["Hello"], return_tensors="pt")
    with torch.no_grad():
        expected = freeze_run.outcome.trainer.model.eval()(**batch).logits
        assert torch.allclose(model(**batch).logits, expected, atol=1e-5)


def test_resume_refuses_another_layer_count(freeze_run, tiny_model_dir):
    checkpoint = open_checkpoint(freeze_run.output_dir / "checkpoint-4")
    check_checkpoint_matches(checkpoint, ModelArguments(model_name_or_path=str(tiny_model_dir), trainable_layers=1))
    with pytest.raises(CheckpointError, match="trainable_layers=1 but this run has trainable_layers=2"):
        check_checkpoint_matches(checkpoint, ModelArguments(model_name_or_path=str(tiny_model_dir), trainable_layers=2))


def test_preflight_counts_the_trained_layers(freeze_run, tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), trainable_layers=1)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    setup = setup_from_arguments(config, model_args, SimpleNamespace(), SimpleNamespace())
    trainable, _ = count_parameters(freeze_run.outcome.trainer.model)
    assert method_named(setup.method).trainable_parameter_count(config, setup.options) == trainable


def test_flags_that_cannot_combine(tiny_model_dir):
    with pytest.raises(ValueError, match="select different methods"):
        ModelArguments(model_name_or_path=str(tiny_model_dir), trainable_layers=1, lora_rank=2)
    with pytest.raises(ValueError, match="cannot be used with freeze"):
        ModelArguments(model_name_or_path=str(tiny_model_dir), trainable_layers=1, quantization_bit=4)
