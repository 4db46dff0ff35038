"""A training process killed (SIGKILL) while it writes a checkpoint resumes from the previous complete one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import input_output_records, read_trainer_state, run_arguments, write_jsonl

from finetune.resume import find_latest_checkpoint
from finetune.tiny_model import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[2]
ATTEMPTS = 5


def kill_during_a_save(argv: list[str], output_dir: Path) -> bool:
    """Start training, SIGKILL it as soon as a staging folder appears after a complete checkpoint; True if killed
    while the staging folder still existed (i.e. mid-save)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune.train", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            staging = list(output_dir.glob("tmp-checkpoint-*"))
            if staging and list(output_dir.glob("checkpoint-*")):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return any(folder.exists() for folder in staging)
            time.sleep(0.002)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_complete_one(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model")
    train_file = write_jsonl(tmp_path / "train.jsonl", input_output_records(8))
    for attempt in range(ATTEMPTS):
        output_dir = tmp_path / f"run{attempt}"
        argv = run_arguments(
            model_dir, train_file, output_dir, tmp_path / "cache", lora_rank=4, max_steps=40, save_steps=1
        )
        if kill_during_a_save(argv, output_dir):
            break
    else:
        pytest.fail(f"could not kill the run during a checkpoint save in {ATTEMPTS} attempts")

    staging = sorted(output_dir.glob("tmp-checkpoint-*"))
    latest = find_latest_checkpoint(output_dir)
    assert staging and latest is not None
    complete = latest.folder
    interrupted_step = int(staging[0].name.rsplit("-", 1)[1])
    assert read_trainer_state(complete)["global_step"] < interrupted_step

    resumed = run_arguments(
        model_dir, train_file, output_dir, tmp_path / "cache", lora_rank=4, max_steps=interrupted_step + 1,
        save_steps=1, resume_from_checkpoint="auto",
    )
    completed = subprocess.run(
        [sys.executable, "-m", "finetune.train", *resumed],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not list(output_dir.glob("tmp-checkpoint-*"))
    final_state = read_trainer_state(output_dir / f"checkpoint-{interrupted_step + 1}")
    assert final_state["global_step"] == interrupted_step + 1
    assert f"auto-resume: resuming from {complete}" in completed.stdout + completed.stderr
    assert (output_dir / "training_record.json").is_file()
