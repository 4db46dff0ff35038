"""Preference tuning under DeepSpeed ZeRO-2 with two CPU processes (gloo), through scripts/finetune_dpo.sh: the run
leaves an ordinary LoRA checkpoint with the preference record, and a second launch with AUTORESUME_FROM_CHECKPOINT
resumes from it and finishes. (DeepSpeed's CPU communication op is JIT-built on first use, see test_deepspeed.py.)"""

import json
from pathlib import Path

import pytest
from launcher_helpers import REPO_ROOT, quick_run_flags, read_record, run_launcher
from preference_helpers import training_pairs
from train_helpers import write_jsonl

pytestmark = pytest.mark.slow


def test_zero2_two_process_preference_run_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    knobs = {
        "BASE_MODEL_PATH": str(tiny_model_dir),
        "DATASET_PATH": str(write_jsonl(tmp_path / "pairs.jsonl", training_pairs(8))),
        "OUTPUT_DIR": str(output_dir),
        "DS_CONFIG": str(REPO_ROOT / "ds_configs" / "zero2.json"),
        "NUM_GPUS": "2",
        "MAX_STEP": "2",
        "SAVE_INTERVAL": "2",
        "DEV_BATCH_SIZE": "1",
        "GRAD_ACCUMULATION_STEPS": "1",
        "LR": "1e-2",
        "MAX_SEQ_LEN": "128",
        "LORA_RANK": "4",
    }
    flags = (*quick_run_flags(tmp_path / "cache"), "--lora_dropout", "0")
    first = run_launcher("finetune_dpo.sh", knobs, *flags)
    print(f"ZeRO-2 preference run (2 processes): {first.seconds:.1f} s")
    assert first.returncode == 0, first.output[-8000:]
    record = read_record(output_dir / "checkpoint-2")
    assert record["method"] == "lora" and record["stage"] == "preference" and record["global_step"] == 2
    assert record["preference"]["loss"] == "dpo" and "LoRA adapter disabled" in record["preference"]["reference"]
    assert Path(record["training_args"]["deepspeed"]).name == "zero2.json"
    assert (output_dir / "checkpoint-2" / "latest").is_file()  # DeepSpeed's engine state
    assert (output_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()

    second = run_launcher("finetune_dpo.sh", {**knobs, "MAX_STEP": "3", "SAVE_INTERVAL": "3",
                                              "AUTORESUME_FROM_CHECKPOINT": "1"}, *flags)  # fmt: skip
    assert second.returncode == 0, second.output[-8000:]
    assert f"auto-resume: resuming from {output_dir / 'checkpoint-2'}" in second.output
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text(encoding="utf-8"))
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3]  # steps 1-2 from the first launch, 3 after resuming
    assert "rewards/margins" in state["log_history"][-2]
