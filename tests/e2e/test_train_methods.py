"""P-Tuning v2, LoRA and full fine-tuning on CPU with a tiny model: checkpoint files, reload, training behaviour (each
method through its interface, without Trainer: tests/unit/finetune/methods/test_methods.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from train_helpers import input_output_records, logged_losses, probe_batch, run_arguments, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

from finetune.arguments import DataArguments, ModelArguments, parse_arguments
from finetune.data.encoding import encode_input_output
from finetune.methods import apply_method
from finetune.methods.base import load_base_model
from finetune.model.checkpoint_files import weight_keys
from finetune.methods.ptuning import load_prefix_checkpoint
from finetune.tiny_model import build_tiny_model
from finetune.train import main, run
from finetune.trainer import FinetuneTrainer

METHOD_FLAGS = {
    "ptuning": {"pre_seq_len": 4, "save_official_bin": False},
    "ptuning_projection": {"pre_seq_len": 4, "prefix_projection": True},
    "lora": {"lora_rank": 4, "lora_target": "all", "learning_rate": 5e-3},
    "full": {"learning_rate": 1e-3},
}
EXPECTED_FILES = {
    "ptuning": {"config.json", "model.safetensors", "training_record.json"},
    "ptuning_projection": {"config.json", "model.safetensors", "pytorch_model.bin", "training_record.json"},
    "lora": {"adapter_config.json", "adapter_model.safetensors", "training_record.json"},
    "full": {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "training_record.json"},
}
RESUME_STATE_FILES = {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """Eight prompt/response records."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", input_output_records(8))


def reload_trained(method: str, tiny_model_dir: Path, folder: Path) -> torch.nn.Module:
    """Load a saved checkpoint folder the way inference does for its method."""
    if method.startswith("ptuning"):
        config = json.loads((folder / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, pre_seq_len=config["pre_seq_len"], prefix_projection=config["prefix_projection"]
        )
        load_prefix_checkpoint(model, folder)
        return model
    if method == "lora":
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_method_saves_agreed_checkpoints_that_reload_to_the_trained_model(method, tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "out"
    outcome = main(run_arguments(tiny_model_dir, train_file, output_dir, tmp_path / "cache", **METHOD_FLAGS[method]))

    for folder in (output_dir / "checkpoint-2", output_dir / "checkpoint-4", output_dir):
        names = {path.name for path in folder.iterdir()}
        assert EXPECTED_FILES[method] <= names, f"{folder}: {sorted(names)}"
        record = json.loads((folder / "training_record.json").read_text())
        assert record["format_version"] == 2
        assert record["method"] == method.split("_")[0]
        assert record["base_model"] == str(tiny_model_dir.resolve())
        assert record["training_args"]["max_steps"] == 4
    assert RESUME_STATE_FILES <= {path.name for path in (output_dir / "checkpoint-2").iterdir()}
    assert json.loads((output_dir / "checkpoint-2" / "training_record.json").read_text())["global_step"] == 2
    assert json.loads((output_dir / "training_record.json").read_text())["global_step"] == 4
    assert not [path.name for path in output_dir.iterdir() if path.name.startswith("tmp-")]

    record = json.loads((output_dir / "training_record.json").read_text())
    if method.startswith("ptuning"):
        keys = set(load_file(output_dir / "model.safetensors"))
        assert keys and all(key.startswith("transformer.prefix_encoder.") for key in keys)
        assert json.loads((output_dir / "config.json").read_text())["pre_seq_len"] == 4
        assert record["ptuning"] == {"pre_seq_len": 4, "prefix_projection": method == "ptuning_projection"}
        assert "lora" not in record and "pre_seq_len" not in record
    if method == "lora":
        adapter = json.loads((output_dir / "adapter_config.json").read_text())
        assert set(adapter["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
        assert record["lora"] == {
            "rank": 4,
            "alpha": 32,
            "dropout": 0.1,
            "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        }

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = probe_batch(tokenizer)
    trained = outcome.trainer.model.eval()
    reloaded = reload_trained(method, tiny_model_dir, output_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        trained_logits = trained(**batch).logits
        reloaded_logits = reloaded(**batch).logits
        base_logits = base(**batch).logits
    mask = batch["attention_mask"].bool()
    assert torch.allclose(trained_logits[mask], reloaded_logits[mask], atol=1e-5)
    assert not torch.allclose(trained_logits[mask], base_logits[mask], atol=1e-3)


def test_loss_falls_on_a_tiny_overfit_set(tiny_model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(2))
    argv = run_arguments(
        tiny_model_dir,
        train_file,
        tmp_path / "out",
        tmp_path / "cache",
        learning_rate=1e-2,
        max_steps=20,
        save_steps=100,
        lr_scheduler_type="constant",
    )
    losses = [loss for _, loss in logged_losses(main(argv).trainer.state.log_history)]
    assert len(losses) == 20
    assert losses[-1] < 0.1 * losses[0], losses


class GradientProbe(TrainerCallback):
    """Records, before each optimizer step, which parameters have gradients and whether checkpointing is on."""

    def __init__(self):
        self.snapshots = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(
            {
                "checkpointing": [layer.gradient_checkpointing for layer in model.transformer.encoder.layers],
                "grads": {
                    name: None if parameter.grad is None else float(parameter.grad.abs().sum())
                    for name, parameter in model.named_parameters()
                },
            }
        )


@pytest.mark.parametrize(
    ("method_flags", "trained_marker"), [({"pre_seq_len": 4}, ".prefix_encoder."), ({"lora_rank": 4}, ".lora_")]
)
def test_gradient_checkpointing_trains_only_the_method_parameters(
    method_flags, trained_marker, tiny_model_dir, train_file, tmp_path
):
    argv = run_arguments(
        tiny_model_dir,
        train_file,
        tmp_path / "out",
        tmp_path / "cache",
        max_steps=2,
        save_steps=100,
        gradient_checkpointing=True,
        **method_flags,
    )
    probe = GradientProbe()
    run(*parse_arguments(argv), extra_callbacks=(probe,))

    assert len(probe.snapshots) == 2
    for snapshot in probe.snapshots:
        assert snapshot["checkpointing"] == [True, True]
        trained = {name: grad for name, grad in snapshot["grads"].items() if trained_marker in name}
        base = {name: grad for name, grad in snapshot["grads"].items() if trained_marker not in name}
        assert trained and all(grad is not None for grad in trained.values()), trained
        assert base and all(grad is None for grad in base.values())
    # LoRA's A matrices get no gradient while B is still zero (step 1); by step 2 every trained tensor has one.
    assert all(grad > 0 for name, grad in probe.snapshots[-1]["grads"].items() if trained_marker in name)


def test_gradient_accumulation_does_not_scale_the_loss(tiny_model_dir, train_file, tmp_path):
    common = {"pre_seq_len": 4, "max_steps": 1, "save_steps": 100, "lr_scheduler_type": "constant"}
    whole = main(run_arguments(tiny_model_dir, train_file, tmp_path / "a", tmp_path / "cache", **common))
    accumulated = main(
        run_arguments(
            tiny_model_dir,
            train_file,
            tmp_path / "b",
            tmp_path / "cache",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=2,
            **common,
        )
    )
    [(_, whole_loss)] = logged_losses(whole.trainer.state.log_history)
    [(_, accumulated_loss)] = logged_losses(accumulated.trainer.state.log_history)
    assert abs(accumulated_loss - whole_loss) < 0.05 * whole_loss


def test_packed_training_counts_real_tokens(tiny_model_dir, train_file, tmp_path):
    argv = run_arguments(
        tiny_model_dir,
        train_file,
        tmp_path / "out",
        tmp_path / "cache",
        pre_seq_len=4,
        packing=True,
        per_device_train_batch_size=16,
        max_steps=1,
        save_steps=100,
    )
    outcome = main(argv)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    total = sum(len(encode_input_output(record, tokenizer, 48, 48)["input_ids"]) for record in input_output_records(8))
    rows = outcome.trainer.train_dataset
    assert len(rows) < 8
    assert outcome.trainer.state.num_input_tokens_seen == total


BITSANDBYTES_INSTALLED = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(BITSANDBYTES_INSTALLED, reason="bitsandbytes is installed here")
def test_quantized_run_fails_before_reading_data(tiny_model_dir, tmp_path):
    argv = run_arguments(
        tiny_model_dir,
        tmp_path / "missing.jsonl",
        tmp_path / "out",
        tmp_path / "cache",
        lora_rank=4,
        quantization_bit=4,
    )
    with pytest.raises(RuntimeError, match="--quantization_bit 4 needs"):
        main(argv)


@pytest.fixture(scope="module")
def tiny_model_4bit_dir(tmp_path_factory) -> Path:
    """A tiny model whose every quantized layer bitsandbytes' 4-bit CPU inference can pack (ffn width 128)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny4bit") / "model", ffn_hidden_size=128)


@pytest.mark.skipif(not BITSANDBYTES_INSTALLED, reason="needs bitsandbytes (requirements-dev.txt installs it)")
def test_4bit_base_whose_layers_cpu_inference_cannot_pack_is_refused_before_reading_data(tiny_model_dir, tmp_path):
    missing = tmp_path / "missing.jsonl"
    argv = run_arguments(tiny_model_dir, missing, tmp_path / "out", tmp_path / "cache", lora_rank=4, quantization_bit=4)
    with pytest.raises(ValueError, match=r"its dense_4h_to_h layers are 160 inputs x 64 outputs") as refused:
        main(argv)
    message = str(refused.value)
    assert "\n" not in message and "--quantization_bit 8" in message and "--ffn_hidden_size 128" in message


@pytest.mark.skipif(not BITSANDBYTES_INSTALLED, reason="needs bitsandbytes (requirements-dev.txt installs it)")
@pytest.mark.parametrize(
    ("method_flags", "trained_marker", "bits"),
    [
        ({"lora_rank": 4, "learning_rate": 5e-3}, ".lora_", 4),
        ({"pre_seq_len": 4}, ".prefix_encoder.", 4),
        ({"lora_rank": 4, "learning_rate": 5e-3}, ".lora_", 8),
    ],
)
def test_quantized_base_trains_and_saves_only_the_adapter(
    method_flags, trained_marker, bits, tiny_model_dir, tiny_model_4bit_dir, tmp_path
):
    import bitsandbytes

    if bits == 4:
        tiny_model_dir = tiny_model_4bit_dir

    quantized_class = bitsandbytes.nn.Linear4bit if bits == 4 else bitsandbytes.nn.Linear8bitLt

    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(8))
    argv = run_arguments(
        tiny_model_dir, train_file, tmp_path / "out", tmp_path / "cache",
        quantization_bit=bits, max_steps=12, save_steps=12, lr_scheduler_type="constant", **method_flags,
    )
    outcome = main(argv)
    model = outcome.trainer.model
    quantized = [module for module in model.modules() if isinstance(module, quantized_class)]
    assert len(quantized) == 2 * 4  # every linear layer of both blocks
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(trained_marker in name and p.dtype == torch.float32 for name, p in trainable.items())
    losses = [loss for _, loss in logged_losses(outcome.trainer.state.log_history)]
    assert len(losses) == 12 and min(losses[-3:]) < losses[0]
    saved = {path.name for path in (tmp_path / "out" / "checkpoint-12").iterdir()}
    assert saved & {"adapter_model.safetensors", "model.safetensors"}
    # No base weights: P-Tuning's official pytorch_model.bin holds the prefix encoder only.
    for name in saved:
        if name.startswith("pytorch_model"):
            keys = weight_keys(tmp_path / "out" / "checkpoint-12" / name)
            assert keys and all(key.startswith("transformer.prefix_encoder.") for key in keys)


def test_trainer_accepts_a_quantized_base_only_with_a_trainable_prefix_encoder(tiny_model_dir, tmp_path):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), pre_seq_len=2)
    model = apply_method(load_base_model(model_args, torch.float32), model_args)
    model.is_quantized = True  # what transformers' quantizer sets on a model loaded with bitsandbytes
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="purely quantized"):
        Seq2SeqTrainer(model=model, args=args)

    def build_trainer() -> FinetuneTrainer:
        return FinetuneTrainer(
            model=model,
            args=args,
            model_args=model_args,
            data_args=DataArguments(),
        )

    build_trainer()
    assert model.is_quantized is True
    model.transformer.prefix_encoder.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable fp32 prefix encoder"):
        build_trainer()
