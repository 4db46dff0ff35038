"""Full fine-tuning with DeepSpeed ZeRO-2 and ZeRO-3, two CPU processes on gloo, through the DeepSpeed launchers:
both finish and leave checkpoints that load as ordinary models with trained weights.

DeepSpeed's CPU accelerator JIT-compiles its shared-memory communication op with gcc on first use (cached under
~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR); the module fixture builds it once so the runs are timed alone.
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from launcher_helpers import (
    CONVERSATION_RECORDS,
    INPUT_OUTPUT_RECORDS,
    LAUNCHER_KNOBS,
    REPO_ROOT,
    changed_parameters,
    load_trained_model,
    quick_run_flags,
    read_record,
    run_launcher,
    run_until_logging_then_signal,
    stopped_checkpoint_step,
    write_jsonl,
)
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shm_op_build_seconds() -> float:
    """Build (or load from the cache) DeepSpeed's CPU shared-memory communication op; returns the seconds it took."""
    accelerator = get_accelerator()
    start = time.perf_counter()
    accelerator.create_op_builder("ShareMemCommBuilder").load()
    seconds = time.perf_counter() - start
    print(f"DeepSpeed shm op build/load: {seconds:.1f} s")
    return seconds


# Each stage also runs with activation recomputation: ZeRO-3 re-gathers the up-projection's weight for the recompute.
CASES = {
    "zero2": ("finetune_ds.sh", INPUT_OUTPUT_RECORDS, "64", "full"),
    "zero3": ("finetune_ds_multiturn.sh", CONVERSATION_RECORDS, "256", "mlp"),  # the tool conversation has 204 tokens
}


@pytest.mark.parametrize("stage", list(CASES))
def test_two_process_zero_run_leaves_loadable_checkpoints(stage, shm_op_build_seconds, tiny_model_dir, tmp_path):
    script, records, max_seq_len, recompute = CASES[stage]
    output_dir = tmp_path / "run"
    knobs = {
        "BASE_MODEL_PATH": str(tiny_model_dir),
        "DATASET_PATH": str(write_jsonl(tmp_path / "train.jsonl", records, repeat=4)),
        "OUTPUT_DIR": str(output_dir),
        "DS_CONFIG": str(REPO_ROOT / "ds_configs" / f"{stage}.json"),
        "NUM_GPUS": "2",
        "MAX_STEP": "2",
        "SAVE_INTERVAL": "2",
        "DEV_BATCH_SIZE": "1",
        "GRAD_ACCUMULATION_STEPS": "2",
        "LR": "1e-3",
        "MAX_SOURCE_LEN": "32",
        "MAX_TARGET_LEN": "16",
        "MAX_SEQ_LEN": max_seq_len,
    }
    run = run_launcher(script, knobs, *quick_run_flags(tmp_path / "cache"), "--recompute", recompute)
    print(f"{stage} ({script}, 2 processes): {run.seconds:.1f} s")
    assert run.returncode == 0, run.output[-8000:]
    layers = 2  # the tiny model's
    plans = {"full": f"{layers} layers full, 0 mlp, 0 none", "mlp": f"0 layers full, {layers} mlp, 0 none"}
    assert f"activation recomputation: {plans[recompute]}" in run.output

    record = read_record(output_dir / "checkpoint-2")
    assert record["method"] == "full" and record["global_step"] == 2
    arguments = record["training_args"]
    assert Path(arguments["deepspeed"]).name == f"{stage}.json"
    assert (output_dir / "checkpoint-2" / "latest").is_file()  # DeepSpeed's own optimizer/engine state

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for folder in (output_dir / "checkpoint-2", output_dir):
        trained = load_trained_model("full", tiny_model_dir, folder)
        assert all(torch.isfinite(parameter).all() for parameter in trained.parameters())
        changed = changed_parameters(trained, base)
        assert len(changed) > len(dict(base.named_parameters())) // 2, f"{folder}: only {changed} changed"
    log = (output_dir / "train.log").read_text(encoding="utf-8")
    assert f"--deepspeed {knobs['DS_CONFIG']}" in log and "--nproc_per_node 2" in log


def test_sigterm_saves_a_zero2_checkpoint_from_both_processes(shm_op_build_seconds, tiny_model_dir, tmp_path):
    output_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    env.update(
        BASE_MODEL_PATH=str(tiny_model_dir), OUTPUT_DIR=str(output_dir), NUM_GPUS="2", MAX_STEP="100000",
        DATASET_PATH=str(write_jsonl(tmp_path / "train.jsonl", INPUT_OUTPUT_RECORDS, repeat=4)),
        SAVE_INTERVAL="100000", DEV_BATCH_SIZE="1", GRAD_ACCUMULATION_STEPS="1", MAX_SOURCE_LEN="32",
        MAX_TARGET_LEN="16", DS_CONFIG=str(REPO_ROOT / "ds_configs" / "zero2.json"), CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    command = ["bash", "scripts/finetune_ds.sh", *quick_run_flags(tmp_path / "cache")]
    status, output = run_until_logging_then_signal(command, env, signal.SIGTERM)
    assert status != 0, output[-3000:]
    step = stopped_checkpoint_step(output, output_dir)
    assert (output_dir / f"checkpoint-{step}" / "latest").is_file()  # DeepSpeed's engine state, from both ranks
