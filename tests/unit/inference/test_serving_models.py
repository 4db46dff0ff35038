"""How the server loads a base shared by several checkpoints: quantized as their training records agree."""

from pathlib import Path

import pytest

from checkpoint_builders import make_lora_checkpoint, make_prefix_checkpoint

from finetune.checkpoint_format import TRAINING_RECORD, Checkpoint
from finetune.methods import method_named
from finetune.model.checkpoint_files import CheckpointError
from finetune.quantization import quantization_record
from inference.serving_models import (
    LoadOptions,
    base_key,
    load_served_models,
    parse_model_specs,
    shared_base_quantization,
)


def checkpoint(folder: Path, bits: int | None) -> Checkpoint:
    """An opened adapter checkpoint whose training record says how its base was quantized."""
    method = "qlora" if bits else "lora"
    record = {"method": method, "quantization_bit": bits, "quantization": quantization_record(bits)}
    return Checkpoint(folder, method_named(method), record, None, None)


def test_shared_base_is_quantized_as_the_records_agree(tmp_path: Path):
    base = Checkpoint(tmp_path / "base", None, None, None, None)  # a base served by name has no record
    members = [checkpoint(tmp_path / "a", 4), checkpoint(tmp_path / "b", 4), base]
    assert shared_base_quantization(members, LoadOptions()) == 4
    assert shared_base_quantization(members, LoadOptions(quantization_bit=8)) == 8
    plain = [checkpoint(tmp_path / "c", None)]
    assert shared_base_quantization(plain, LoadOptions()) == 0


def test_checkpoints_trained_on_differently_quantized_bases_cannot_share_one(tmp_path: Path):
    members = [checkpoint(tmp_path / "a", 4), checkpoint(tmp_path / "c", None)]
    with pytest.raises(CheckpointError, match="differently quantized bases"):
        shared_base_quantization(members, LoadOptions())


def test_model_values_are_split_at_the_first_equals_sign_only_after_a_plain_name(tmp_path: Path):
    folder = tmp_path / "runs" / "lr=1e-4" / "checkpoint-100"
    folder.mkdir(parents=True)
    assert parse_model_specs([str(folder)]) == [("checkpoint-100", str(folder))]
    assert parse_model_specs([f"ad={folder}"]) == [("ad", str(folder))]
    assert parse_model_specs(["ad=path/with=sign"]) == [("ad", "path/with=sign")]
    relative = Path("runs") / "lr=1e-4" / "checkpoint-100"
    assert parse_model_specs([str(relative)]) == [("checkpoint-100", str(relative))]


def test_serving_a_lora_and_a_prefix_on_one_base_reads_each_record_once(tiny_model_dir: Path, tmp_path, monkeypatch):
    make_lora_checkpoint(tiny_model_dir, tmp_path / "lora")
    make_prefix_checkpoint(tiny_model_dir, tmp_path / "prefix")
    reads = []
    read_text = Path.read_text

    def counted(path: Path, *args, **kwargs) -> str:
        if path.name == TRAINING_RECORD:
            reads.append(path.parent.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    specs = [f"lora={tmp_path / 'lora'}", f"prefix={tmp_path / 'prefix'}"]
    served = load_served_models(specs, LoadOptions(device="cpu", dtype="float32"), max_batch_size=2)
    try:
        assert served["lora"].engine is served["prefix"].engine
        assert served["lora"].variant.adapter == "adapter0" and served["prefix"].variant.prefix is not None
    finally:
        served["lora"].engine.stop()
    assert sorted(reads) == ["lora", "prefix"]


def test_a_shared_base_is_one_folder_through_links_and_a_hub_name_stays_a_name(tmp_path: Path, monkeypatch):
    base = tmp_path / "chatglm3-6b"
    base.mkdir()
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    assert base_key(str(tmp_path / "link")) == base_key("chatglm3-6b/") == str(base)
    assert base_key("THUDM/chatglm3-6b") == "THUDM/chatglm3-6b"
