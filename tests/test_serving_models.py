"""How the server loads a base shared by several checkpoints: quantized as their training records agree."""

import json
from pathlib import Path

import pytest

from finetune.model.checkpoint_files import CheckpointError
from finetune.quantization import quantization_record
from inference.serving_models import LoadOptions, parse_model_specs, shared_base_quantization


def checkpoint(folder: Path, bits: int | None) -> str:
    """A folder with only a training record saying how its base was quantized."""
    folder.mkdir()
    record = {
        "method": "qlora" if bits else "lora",
        "quantization_bit": bits,
        "quantization": quantization_record(bits),
    }
    (folder / "training_record.json").write_text(json.dumps(record))
    return str(folder)


def test_shared_base_is_quantized_as_the_records_agree(tmp_path: Path):
    base = tmp_path / "base"
    base.mkdir()  # a base served by name has no record: it takes the adapters' quantization
    members = [("a", checkpoint(tmp_path / "a", 4)), ("b", checkpoint(tmp_path / "b", 4)), ("base", str(base))]
    assert shared_base_quantization(members, LoadOptions()) == 4
    assert shared_base_quantization(members, LoadOptions(quantization_bit=8)) == 8
    plain = [("c", checkpoint(tmp_path / "c", None))]
    assert shared_base_quantization(plain, LoadOptions()) == 0


def test_checkpoints_trained_on_differently_quantized_bases_cannot_share_one(tmp_path: Path):
    members = [("a", checkpoint(tmp_path / "a", 4)), ("c", checkpoint(tmp_path / "c", None))]
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
