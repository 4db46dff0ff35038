"""finetune/methods/: each fine-tuning method through the FinetuneMethod interface, without Trainer: which
parameters train (and that the memory preflight counts exactly them), its checkpoint saved, recognised, checked and
loaded back to the same model, and its training_record.json fields (training runs: tests/e2e/test_train_methods.py,
freeze tuning end to end: tests/unit/finetune/methods/test_method_freeze.py)."""

import pytest
import torch
from checkpoint_builders import probe_logits
from transformers import AutoConfig

from finetune.arguments import ModelArguments, parse_arguments
from finetune.methods import METHODS, apply_method, method_of, recognise_checkpoint
from finetune.methods.base import SaveContext, count_parameters, load_base_model

METHOD_FLAGS = {
    "ptuning": {"pre_seq_len": 4},
    "lora": {"lora_rank": 4, "lora_dropout": 0.0},
    "dora": {"method": "dora", "lora_rank": 4, "lora_dropout": 0.0},
    "freeze": {"trainable_layers": 1},
    "full": {},
}
TRAINED_NAME = {"ptuning": "prefix_encoder", "lora": "lora_", "dora": "lora_", "full": ""}


def trainable_model(name: str, tiny_model_dir) -> tuple[ModelArguments, torch.nn.Module]:
    """The method's arguments and the tiny base made trainable by it (fp32), its trainable weights moved off their
    initial values as training would."""
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), **METHOD_FLAGS[name])
    model = method_of(model_args).prepare(load_base_model(model_args, torch.float32), model_args)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model_args, model.eval()


def test_every_method_is_covered_here():
    assert sorted(METHOD_FLAGS) == sorted(name for name in METHODS if name != "qlora")


@pytest.mark.parametrize("name", list(METHOD_FLAGS))
def test_the_method_trains_exactly_what_the_preflight_counts(name, tiny_model_dir):
    model_args, model = trainable_model(name, tiny_model_dir)
    method = method_of(model_args)
    assert method.name == name
    trainable, total = count_parameters(model)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert method.trainable_parameter_count(config, model_args) == trainable
    names = [parameter_name for parameter_name, parameter in model.named_parameters() if parameter.requires_grad]
    if name == "freeze":
        last = f"layers.{config.num_layers - 1}."
        assert all(last in parameter_name for parameter_name in names)
        assert 0 < trainable < total
    elif name == "full":
        assert trainable == total
    else:
        assert all(TRAINED_NAME[name] in parameter_name for parameter_name in names)
        assert 0 < trainable < total / 10


@pytest.mark.parametrize("name", list(METHOD_FLAGS))
def test_a_saved_checkpoint_is_recognised_complete_and_loads_to_the_same_model(
    name, tiny_model_dir, tiny_tokenizer, tmp_path
):
    model_args, model = trainable_model(name, tiny_model_dir)
    method = method_of(model_args)
    folder = tmp_path / "checkpoint"
    method.save(model, folder, SaveContext(model_args, tiny_tokenizer))
    assert method.weights_problem(folder) is None
    assert recognise_checkpoint(folder) is (method if method.needs_base else None)
    loaded = method.load_for_inference(folder, {}, str(tiny_model_dir), {"dtype": torch.float32}).eval()
    expected = probe_logits(model, tiny_tokenizer)
    assert torch.allclose(probe_logits(loaded, tiny_tokenizer), expected, atol=1e-5)
    base = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir)), torch.float32).eval()
    assert not torch.allclose(probe_logits(base, tiny_tokenizer), expected, atol=1e-3)
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        weights.unlink()
    assert method.weights_problem(folder) is not None


@pytest.mark.parametrize(
    ("name", "fields", "changed"),
    [
        ("ptuning", {"pre_seq_len": 4, "prefix_projection": False}, {"pre_seq_len": 8}),
        ("lora", {"rank": 4, "alpha": 32, "dropout": 0.0, "target_modules": ["query_key_value"]}, None),
        ("freeze", {"trainable_layers": 1}, {"trainable_layers": 2}),
        ("full", {}, None),
    ],
)
def test_record_fields_and_what_cannot_resume(name, fields, changed, tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), **METHOD_FLAGS[name])
    method = method_of(model_args)
    record = method.record_fields(model_args)
    assert record == fields
    assert method.settings_mismatch(record, model_args) is None
    if changed is not None:
        other = ModelArguments(model_name_or_path=str(tiny_model_dir), **{**METHOD_FLAGS[name], **changed})
        key, value = next(iter(changed.items()))
        assert f"this run has {key}={value}" in method.settings_mismatch(record, other)


def test_lora_refuses_another_rank_but_not_another_dropout(tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), lora_rank=4)
    method = method_of(model_args)
    record = method.record_fields(model_args)
    assert method.settings_mismatch(record, ModelArguments(str(tiny_model_dir), lora_rank=4, lora_dropout=0.3)) is None
    problem = method.settings_mismatch(record, ModelArguments(str(tiny_model_dir), lora_rank=8))
    assert "rank/targets are 4/" in problem and "this run has 8/" in problem


@pytest.mark.parametrize("method_flags", [{"pre_seq_len": 3}, {"lora_rank": 2}])
def test_trainable_parameters_stay_fp32_on_a_bf16_base(method_flags, tiny_model_dir):
    model_args = ModelArguments(model_name_or_path=str(tiny_model_dir), **method_flags)
    model = apply_method(load_base_model(model_args, torch.bfloat16), model_args)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    assert trainable and all(parameter.dtype == torch.float32 for parameter in trainable)
    assert frozen and all(parameter.dtype == torch.bfloat16 for parameter in frozen)


def test_ptuning_writes_the_official_prefix_bin_unless_turned_off(tiny_model_dir, tiny_tokenizer, tmp_path):
    model_args, model = trainable_model("ptuning", tiny_model_dir)
    method = method_of(model_args)
    method.save(model, tmp_path / "default", SaveContext(model_args, tiny_tokenizer))
    official = torch.load(tmp_path / "default" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert sorted(official) == ["transformer.prefix_encoder.embedding.weight"]
    trained = model.transformer.prefix_encoder.embedding.weight
    torch.testing.assert_close(official["transformer.prefix_encoder.embedding.weight"], trained)
    flags = ["--model_name_or_path", str(tiny_model_dir), "--pre_seq_len", "4", "--output_dir", str(tmp_path / "run")]
    turned_off, _, _ = parse_arguments([*flags, "--no_save_official_bin"])
    assert turned_off.save_official_bin is False
    method.save(model, tmp_path / "off", SaveContext(turned_off, tiny_tokenizer))
    assert not (tmp_path / "off" / "pytorch_model.bin").exists() and (tmp_path / "off" / "model.safetensors").is_file()
@pytest.mark.parametrize("name", list(METHOD_FLAGS))
def test_the_preference_reference_is_the_base_without_the_trained_part(name, tiny_model_dir, tiny_tokenizer):
    model_args, model = trainable_model(name, tiny_model_dir)
    method = method_of(model_args)
    if not method.reference_on_the_fly:  # freeze and full change base weights: the reference is cached instead
        assert method.reference_context(model) is None
        return
    base = load_base_model(ModelArguments(model_name_or_path=str(tiny_model_dir)), torch.float32).eval()
    base_logits = probe_logits(base, tiny_tokenizer)
    assert not torch.allclose(probe_logits(model, tiny_tokenizer), base_logits)
    with method.reference_context(model):
        torch.testing.assert_close(probe_logits(model, tiny_tokenizer), base_logits)
    assert not torch.allclose(probe_logits(model, tiny_tokenizer), base_logits)  # the trained part is back afterwards
