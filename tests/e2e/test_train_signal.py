"""Ctrl-C / SIGTERM during training: the current optimizer step finishes, a complete checkpoint and the loss curve are
written, the process says where they are and how to resume, and exits with 128 + the signal number; a second signal
ends the process at once. One process directly, and two processes under torchrun through a launcher."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import LAUNCHER_KNOBS, quick_run_flags, run_until_logging_then_signal, stopped_checkpoint_step
from train_helpers import input_output_records, run_arguments, write_jsonl

from finetune.checkpoint_format import resume_problem

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", input_output_records(8))


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_that_resumes(stop_signal, tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "run"
    argv = run_arguments(
        tiny_model_dir, train_file, output_dir, tmp_path / "cache", lora_rank=4, max_steps=100000, save_steps=100000
    )
    status, output = run_until_logging_then_signal(
        [sys.executable, "-m", "finetune.train", *argv], dict(os.environ), stop_signal
    )
    assert status == 128 + stop_signal, output[-3000:]
    assert f"{stop_signal.name} received: finishing the current optimizer step" in output
    assert "Traceback" not in output
    step = stopped_checkpoint_step(output, output_dir)
    assert step >= 3  # signalled after the third loss log

    resumed = subprocess.run(
        [sys.executable, "-m", "finetune.train", *argv, "--max_steps", str(step + 1), "--resume_from_checkpoint",
         "auto"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resume_problem(output_dir / f"checkpoint-{step + 1}") is None


def test_a_second_signal_quits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from finetune.callbacks import StopOnSignalCallback, REPEAT_WINDOW_S\n"
        "stop = StopOnSignalCallback()\n"
        "stop.install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"  # within the window: the same request (torchrun forwards Ctrl-C)
        "print('still running', stop.received.name, flush=True)\n"
        "time.sleep(REPEAT_WINDOW_S + 0.2)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 128 + signal.SIGTERM
    assert "still running SIGINT" in completed.stdout and "not reached" not in completed.stdout
    assert "SIGTERM received again: quitting without saving" in completed.stderr


@pytest.mark.slow
def test_ctrl_c_under_torchrun_saves_one_checkpoint_from_both_processes(tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    env.update(
        BASE_MODEL_PATH=str(tiny_model_dir), DATASET_PATH=str(train_file), OUTPUT_DIR=str(output_dir), NUM_GPUS="2",
        MAX_STEP="100000", SAVE_INTERVAL="100000", DEV_BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="1", PRE_SEQ_LEN="4",
        MAX_SOURCE_LEN="32", MAX_TARGET_LEN="16", CUDA_VISIBLE_DEVICES="",
    )  # fmt: skip
    command = ["bash", "scripts/finetune_pt.sh", *quick_run_flags(tmp_path / "cache")]
    status, output = run_until_logging_then_signal(command, env, signal.SIGINT)
    assert status != 0 and "torch.distributed.run" in output
    assert output.count("stopped: training stopped by SIGINT") == 2  # rank 0's line, repeated last by the launcher
    assert "find_unused_parameters=True" not in output  # DDP is not asked to search for unused parameters
    assert "PAD/BOS/EOS" not in output  # the config already has the tokenizer's bos id: no Trainer warning
    stopped_checkpoint_step(output, output_dir)
    assert "training exited with status" in output.strip().splitlines()[-2]
    assert output.strip().splitlines()[-1].startswith("stopped: training stopped by SIGINT")


def processes_naming(text: str) -> list[int]:
    """Ids of the running processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [False, True], ids=["launcher-only", "whole-group"])
def test_sigterm_to_a_launcher_waits_for_the_save_and_prints_stopped_last(to_group, tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    env.update(
        BASE_MODEL_PATH=str(tiny_model_dir), DATASET_PATH=str(train_file), OUTPUT_DIR=str(output_dir),
        MAX_STEP="100000", SAVE_INTERVAL="100000", DEV_BATCH_SIZE="2", GRAD_ACCUMULATION_STEPS="1", PRE_SEQ_LEN="4",
        MAX_SOURCE_LEN="32", MAX_TARGET_LEN="16", CUDA_VISIBLE_DEVICES="", STOP_TIMEOUT="120",
    )  # fmt: skip
    command = ["bash", "scripts/finetune_pt.sh", *quick_run_flags(tmp_path / "cache")]
    status, output = run_until_logging_then_signal(command, env, signal.SIGTERM, to_group=to_group)
    assert status == 128 + signal.SIGTERM, output[-3000:]
    assert not processes_naming(str(output_dir))  # the trainer has ended with the launcher, not been orphaned
    stopped_checkpoint_step(output, output_dir)
    lines = output.strip().splitlines()
    assert lines[-1].startswith("stopped: training stopped by SIGTERM at step ")
    assert lines[-2] == f"training exited with status 143; full log: {output_dir / 'train.log'}"
