"""inference/export.py: merged LoRA and folded prefix exports load standalone and give the same logits."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_builders import make_lora_checkpoint, make_prefix_checkpoint, probe_logits, truncate_file
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from finetune.checkpoint_format import open_checkpoint
from finetune.checkpoints import CheckpointKind, load_for_inference
from finetune.methods.ptuning import PREFIX_KEY_PREFIX
from inference.export import main

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "inference" / "export.py"



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_model_dir: Path) -> dict[str, Path]:
    """A LoRA and a P-Tuning v2 (with projection) checkpoint of the reference model."""
    root = tmp_path_factory.mktemp("export_checkpoints")
    make_lora_checkpoint(reference_model_dir, root / "lora")
    make_prefix_checkpoint(reference_model_dir, root / "prefix", pre_seq_len=4, prefix_projection=True)
    return {"lora": root / "lora", "prefix": root / "prefix"}


def stored_keys(folder: Path) -> list[str]:
    """Tensor names in an exported folder's model.safetensors."""
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return list(handle.keys())


def test_lora_export_as_a_script_equals_unmerged_adapter(checkpoints: dict, tokenizer, tmp_path: Path):
    output_dir = tmp_path / "merged"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(checkpoints["lora"]), "--output_dir", str(output_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    names = sorted(path.name for path in output_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(names)
    assert not any(name.startswith("adapter") for name in names)
    assert not any("lora" in key for key in stored_keys(output_dir))
    assert open_checkpoint(output_dir).kind is CheckpointKind.BASE
    exported = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    unmerged, _, _ = load_for_inference(checkpoints["lora"], device="cpu", dtype="float32")
    torch.testing.assert_close(probe_logits(exported, tokenizer), probe_logits(unmerged, tokenizer), atol=1e-5, rtol=0)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_prefix_export_loads_as_prefix_model_with_same_logits(checkpoints: dict, tokenizer, tmp_path: Path):
    output_dir = tmp_path / "folded"
    assert main(["--model", str(checkpoints["prefix"]), "--output_dir", str(output_dir)]) == 0
    keys = stored_keys(output_dir)
    assert any(key.startswith(PREFIX_KEY_PREFIX + "trans.") for key in keys)
    assert any(key.startswith("transformer.encoder.layers.") for key in keys)
    exported = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    assert (exported.config.pre_seq_len, exported.config.prefix_projection) == (4, True)
    original, _, _ = load_for_inference(checkpoints["prefix"], device="cpu", dtype="float32")
    torch.testing.assert_close(probe_logits(exported, tokenizer), probe_logits(original, tokenizer), atol=1e-5, rtol=0)


def test_official_prefix_export_with_base(reference_dir: Path, tokenizer, tmp_path: Path):
    output_dir = tmp_path / "official_folded"
    base = str(reference_dir / "model")
    assert main(["--model", str(reference_dir / "ptuning_proj"), "--base", base, "--output_dir", str(output_dir)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    original, _, _ = load_for_inference(reference_dir / "ptuning_proj", base=base, device="cpu", dtype="float32")
    torch.testing.assert_close(probe_logits(exported, tokenizer), probe_logits(original, tokenizer), atol=1e-5, rtol=0)


def test_export_refuses_non_empty_output_unless_overwrite(checkpoints: dict, tmp_path: Path, capsys):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "keep.txt").write_text("mine")
    assert main(["--model", str(checkpoints["prefix"]), "--output_dir", str(output_dir)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert (output_dir / "keep.txt").read_text() == "mine"
    assert main(["--model", str(checkpoints["prefix"]), "--output_dir", str(output_dir), "--overwrite"]) == 0
    assert not (output_dir / "keep.txt").exists() and (output_dir / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_export_of_truncated_adapter_fails_and_writes_nothing(reference_model_dir: Path, tmp_path: Path, capsys):
    folder = tmp_path / "lora"
    make_lora_checkpoint(reference_model_dir, folder)
    truncate_file(folder / "adapter_model.safetensors")
    assert main(["--model", str(folder), "--output_dir", str(tmp_path / "out")]) == 1
    assert "truncated" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["lora"]
