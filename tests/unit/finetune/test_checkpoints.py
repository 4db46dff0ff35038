"""Checkpoint-kind detection, base resolution and loading for inference, on real checkpoints in the agreed format."""

import importlib.util
import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from checkpoint_builders import (
    load_base,
    make_full_checkpoint,
    make_lora_checkpoint,
    make_other_base,
    make_prefix_checkpoint,
    probe_logits,
    truncate_file,
)
from peft import PeftModel

from finetune.checkpoint_format import open_checkpoint, read_training_record
from finetune.checkpoints import (
    CPU_FP32_MEMORY_SHARE,
    CheckpointKind,
    ModelLoadError,
    check_base_model_folder,
    choose_tokenizer_source,
    folder_parameter_count,
    load_for_inference,
    resolve_base,
    resolve_device,
    resolve_dtype,
)
from finetune.model import ChatGLMTokenizer
from finetune.model.checkpoint_files import CheckpointError
from finetune.model.configuration import ChatGLMConfig
from finetune.model.shapes import base_parameter_count
from finetune.quantization import quantization_record
from finetune.real_size_model import chatglm3_6b_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_model_dir: Path) -> dict:
    """One checkpoint of every kind made from the reference model, and the in-memory models they came from."""
    root = tmp_path_factory.mktemp("checkpoints")
    lora_model = make_lora_checkpoint(reference_model_dir, root / "lora")
    prefix_model = make_prefix_checkpoint(reference_model_dir, root / "prefix", pre_seq_len=4, prefix_projection=True)
    make_full_checkpoint(reference_model_dir, root / "full")
    load_base(reference_model_dir).save_pretrained(root / "exported")
    return {
        "root": root,
        "lora": root / "lora",
        "prefix": root / "prefix",
        "full": root / "full",
        "exported": root / "exported",
        "lora_model": lora_model,
        "prefix_model": prefix_model,
    }


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A private copy of a checkpoint folder, for tests that damage or edit it."""
    shutil.copytree(source, target)
    return target


def test_detects_every_kind(checkpoints: dict, reference_model_dir: Path, reference_dir: Path):
    assert open_checkpoint(checkpoints["lora"]).kind is CheckpointKind.LORA
    assert open_checkpoint(checkpoints["prefix"]).kind is CheckpointKind.PREFIX
    assert open_checkpoint(checkpoints["full"]).kind is CheckpointKind.FULL
    assert open_checkpoint(checkpoints["exported"]).kind is CheckpointKind.BASE
    assert open_checkpoint(reference_model_dir).kind is CheckpointKind.BASE


@pytest.mark.parametrize("name", ["ptuning", "ptuning_proj"])
def test_detects_official_prefix_folders(reference_dir: Path, name: str):
    assert open_checkpoint(reference_dir / name).kind is CheckpointKind.PREFIX
    assert read_training_record(reference_dir / name) is None


def test_prefix_folder_with_official_bin_only_is_prefix(checkpoints: dict, tmp_path: Path):
    folder = copy_checkpoint(checkpoints["prefix"], tmp_path / "prefix_bin")
    state = {key: value for key, value in checkpoints["prefix_model"].state_dict().items() if "prefix_encoder" in key}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert open_checkpoint(folder).kind is CheckpointKind.PREFIX


def test_training_record_is_read(checkpoints: dict, reference_model_dir: Path):
    record = read_training_record(checkpoints["lora"])
    assert record["method"] == "lora"
    assert record["base_model"] == str(reference_model_dir)
    assert read_training_record(checkpoints["exported"]) is None


def test_resolve_base_sources(checkpoints: dict, reference_model_dir: Path, reference_dir: Path, tmp_path: Path):
    assert resolve_base(open_checkpoint(checkpoints["prefix"])) == str(reference_model_dir)
    assert resolve_base(open_checkpoint(checkpoints["prefix"]), "/elsewhere/base") == "/elsewhere/base"
    without_record = copy_checkpoint(checkpoints["lora"], tmp_path / "lora_no_record")
    (without_record / "training_record.json").unlink()
    assert resolve_base(open_checkpoint(without_record)) == str(reference_model_dir)
    with pytest.raises(CheckpointError, match="--base"):
        resolve_base(open_checkpoint(reference_dir / "ptuning"))
    assert resolve_base(open_checkpoint(reference_dir / "ptuning"), str(reference_model_dir)) == str(reference_model_dir)


def test_record_naming_a_missing_base_asks_for_base(checkpoints: dict, tmp_path: Path):
    folder = copy_checkpoint(checkpoints["prefix"], tmp_path / "moved")
    record = json.loads((folder / "training_record.json").read_text())
    record["base_model"] = str(tmp_path / "no_such_base")
    (folder / "training_record.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"does not exist on this machine.*--base"):
        resolve_base(open_checkpoint(folder))


def test_prefix_checkpoint_loads_its_trained_prefix(checkpoints: dict, tokenizer: ChatGLMTokenizer):
    model, loaded_tokenizer, kind = load_for_inference(checkpoints["prefix"], device="cpu")
    assert kind is CheckpointKind.PREFIX
    assert (model.config.pre_seq_len, model.config.prefix_projection) == (4, True)
    assert not model.training
    expected = probe_logits(checkpoints["prefix_model"], tokenizer)
    torch.testing.assert_close(probe_logits(model, loaded_tokenizer), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ptuning", "ptuning_proj"])
def test_official_prefix_reproduces_official_greedy(reference_dir: Path, reference: dict, name: str):
    model, tokenizer, _ = load_for_inference(reference_dir / name, base=str(reference_dir / "model"), device="cpu")
    stop_ids = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    for item in reference["model"][f"{name}_greedy"]:
        input_ids = torch.tensor([item["prompt_ids"]])
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stop_ids,
        )
        assert output[0, input_ids.shape[1] :].tolist() == item["new_ids"]


def test_lora_checkpoint_loads_adapter_and_merges(checkpoints: dict, tokenizer: ChatGLMTokenizer):
    expected = probe_logits(checkpoints["lora_model"], tokenizer)
    model, _, kind = load_for_inference(checkpoints["lora"], device="cpu")
    assert kind is CheckpointKind.LORA and isinstance(model, PeftModel)
    torch.testing.assert_close(probe_logits(model, tokenizer), expected, atol=1e-5, rtol=0)
    merged, _, _ = load_for_inference(checkpoints["lora"], device="cpu", merge_lora=True)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(probe_logits(merged, tokenizer), expected, atol=1e-5, rtol=0)
    base_logits = probe_logits(load_base(Path(read_training_record(checkpoints["lora"])["base_model"])), tokenizer)
    assert (base_logits - expected).abs().max() > 1e-2


def test_full_checkpoint_loads_whole_model(checkpoints: dict, tokenizer: ChatGLMTokenizer):
    model, _, kind = load_for_inference(checkpoints["full"], device="cpu", dtype="float32")
    assert kind is CheckpointKind.FULL
    expected = probe_logits(load_base(checkpoints["full"]), tokenizer)
    torch.testing.assert_close(probe_logits(model, tokenizer), expected, atol=0, rtol=0)


def test_tokenizer_source_order(checkpoints: dict, reference_model_dir: Path):
    base = str(reference_model_dir)
    assert choose_tokenizer_source(checkpoints["full"], base, None) == str(checkpoints["full"])
    assert choose_tokenizer_source(checkpoints["lora"], base, None) == base
    assert choose_tokenizer_source(checkpoints["lora"], base, "/my/tokenizer") == "/my/tokenizer"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallbacks")
def test_device_and_dtype_resolution_without_gpu():
    assert resolve_device("auto") in ("cpu", "mps")
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "mps") is torch.float16
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ModelLoadError, match="not available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")


def test_auto_dtype_on_the_cpu_falls_back_to_bf16_when_fp32_weights_would_not_fit_the_ram(tiny_model_dir):
    chatglm3_6b = base_parameter_count(chatglm3_6b_config())
    ram = psutil.virtual_memory().available
    huge = int(ram / 4 / CPU_FP32_MEMORY_SHARE) + 1  # fp32 copy just over the share of the available RAM
    assert resolve_dtype("auto", "cpu", huge) is torch.bfloat16
    assert resolve_dtype("auto", "cpu", 10**6) is torch.float32
    assert resolve_dtype("float32", "cpu", huge) is torch.float32  # an explicit dtype is kept
    expected = torch.bfloat16 if 4 * chatglm3_6b > CPU_FP32_MEMORY_SHARE * ram else torch.float32
    assert resolve_dtype("auto", "cpu", chatglm3_6b) is expected
    assert folder_parameter_count(str(tiny_model_dir)) == base_parameter_count(
        ChatGLMConfig.from_pretrained(tiny_model_dir)
    )
    assert folder_parameter_count("THUDM/chatglm3-6b") is None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_inference_rebuilds_the_base_quantized_as_the_record_says(checkpoints: dict, tmp_path: Path):
    import bitsandbytes

    folder = tmp_path / "qlora"
    shutil.copytree(checkpoints["lora"], folder)
    record = read_training_record(folder)
    record.update(method="qlora", quantization_bit=4, quantization=quantization_record(4))
    (folder / "training_record.json").write_text(json.dumps(record))
    model, _, kind = load_for_inference(folder, device="cpu")
    assert kind is CheckpointKind.LORA
    assert any(isinstance(module, bitsandbytes.nn.Linear4bit) for module in model.modules())
    plain, _, _ = load_for_inference(folder, device="cpu", quantization_bit=0)
    assert not any(isinstance(module, bitsandbytes.nn.Linear4bit) for module in plain.modules())


def test_missing_checkpoint_folder(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_for_inference(tmp_path / "nope")


def test_folder_that_is_no_checkpoint(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        open_checkpoint(tmp_path).kind


def test_incomplete_lora_checkpoint_is_named(checkpoints: dict, tmp_path: Path):
    folder = copy_checkpoint(checkpoints["lora"], tmp_path / "lora_incomplete")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        open_checkpoint(folder).kind


def test_truncated_adapter_is_reported_before_peft_loads_it(checkpoints: dict, tmp_path: Path):
    folder = copy_checkpoint(checkpoints["lora"], tmp_path / "lora_truncated")
    truncate_file(folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: truncated"):
        load_for_inference(folder, device="cpu")


def test_prefix_for_a_different_base_is_explained(checkpoints: dict, reference_model_dir: Path, tmp_path: Path):
    other = make_other_base(reference_model_dir, tmp_path / "three_layers", num_layers=3)
    with pytest.raises(CheckpointError, match="different base model"):
        load_for_inference(checkpoints["prefix"], base=str(other), device="cpu")


@pytest.mark.parametrize("overrides", [{"hidden_size": 32, "kv_channels": 8}, {"num_layers": 1}])
def test_lora_for_a_different_base_is_explained(
    checkpoints: dict, reference_model_dir: Path, tmp_path: Path, overrides: dict
):
    other = make_other_base(reference_model_dir, tmp_path / "other", **overrides)
    with pytest.raises(CheckpointError, match="different"):
        load_for_inference(checkpoints["lora"], base=str(other), device="cpu")


def test_base_model_check_names_a_checkpoint_passed_as_base(checkpoints: dict, reference_model_dir: Path):
    for kind in ("lora", "prefix"):
        with pytest.raises(
            CheckpointError, match=f"is a {kind if kind == 'lora' else 'ptuning'} fine-tuning checkpoint"
        ):
            check_base_model_folder(checkpoints[kind])
    with pytest.raises(CheckpointError, match=f"pass the base model it was trained on \\({reference_model_dir}"):
        check_base_model_folder(checkpoints["lora"])
    check_base_model_folder(reference_model_dir)
    check_base_model_folder(checkpoints["full"])  # a full fine-tune is a whole model with its tokenizer


def test_base_model_without_tokenizer_or_of_another_architecture_is_refused(
    checkpoints: dict, reference_model_dir: Path, tmp_path: Path
):
    with pytest.raises(CheckpointError, match="tokenizer.model is missing"):
        check_base_model_folder(checkpoints["exported"])  # save_pretrained of the model alone
    llama = copy_checkpoint(checkpoints["full"], tmp_path / "llama")
    config = json.loads((llama / "config.json").read_text(encoding="utf-8"))
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}), encoding="utf-8")
    for check in (check_base_model_folder, load_for_inference):
        with pytest.raises(CheckpointError, match="model_type is 'llama', not 'chatglm'"):
            check(llama)
    with pytest.raises(CheckpointError, match="is a lora fine-tuning checkpoint, not a base model; .* as --base"):
        load_for_inference(checkpoints["prefix"], base=str(checkpoints["lora"]), device="cpu")
