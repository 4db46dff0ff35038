"""Evaluation runs that must not lose work or mislead: output checked before loading, an interrupted run resumed,
training-record defaults, and two processes (torchrun, gloo) giving exactly the single-process predictions."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_builders import write_training_record
from train_helpers import input_output_records, write_jsonl

from finetune.evaluate import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    build_parser,
    generation_settings,
    main,
    training_defaults,
)
from finetune.prediction_log import partial_path, settings_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory) -> Path:
    """Eight input-output records (prompts of several lengths)."""
    return write_jsonl(tmp_path_factory.mktemp("dev") / "dev.jsonl", input_output_records(8))


def evaluation_argv(model: Path, data: Path, output_dir: Path) -> list[str]:
    """A short greedy CPU evaluation."""
    return [
        "--model", str(model), "--data", str(data), "--output_dir", str(output_dir), "--device", "cpu",
        "--max_new_tokens", "6", "--batch_size", "2",
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_unwritable_output_fails_before_the_model_is_loaded(tiny_model_dir: Path, dev_file: Path, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(evaluation_argv(tiny_model_dir, dev_file, blocker / "eval")) == 1
    err = capsys.readouterr().err
    assert f"cannot write results to {blocker / 'eval'}" in err and "--output_dir (OUTPUT_DIR)" in err
    assert "loaded" not in err
    missing = tmp_path / "missing.jsonl"
    assert main(evaluation_argv(tiny_model_dir, missing, tmp_path / "out")) == 1
    assert f"{missing}: file does not exist" in capsys.readouterr().err


def test_rerun_continues_from_the_predictions_an_interrupted_run_kept(tiny_model_dir: Path, dev_file: Path, tmp_path):
    complete = tmp_path / "complete"
    assert main(evaluation_argv(tiny_model_dir, dev_file, complete)) == 0
    reference = read_rows(complete / PREDICTIONS_FILE)
    assert [row["id"] for row in reference] == [str(index) for index in range(8)]

    interrupted = tmp_path / "interrupted"
    argv = evaluation_argv(tiny_model_dir, dev_file, interrupted)
    interrupted.mkdir()
    settings_path(interrupted / PREDICTIONS_FILE).write_text(
        json.dumps(generation_settings(build_parser().parse_args(argv), 1024))
    )
    kept = [{**row, "prediction": "kept from the first run"} for row in reference[2:5]]
    torn = json.dumps(reference[5])[:20]
    partial_path(interrupted / PREDICTIONS_FILE, 0).write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept) + torn
    )
    assert main(argv) == 0
    rows = read_rows(interrupted / PREDICTIONS_FILE)
    assert rows == reference[:2] + kept + reference[5:]
    assert sorted(path.name for path in interrupted.iterdir()) == sorted([PREDICTIONS_FILE, METRICS_FILE])

    partial_path(interrupted / PREDICTIONS_FILE, 0).write_text(json.dumps(kept[0]) + "\n")
    settings_path(interrupted / PREDICTIONS_FILE).write_text(json.dumps({"max_new_tokens": 99}))
    assert main(argv) == 0
    assert read_rows(interrupted / PREDICTIONS_FILE) == reference


def test_max_source_length_and_data_format_come_from_the_training_record(tiny_model_dir: Path, tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(tiny_model_dir, checkpoint)
    write_training_record(
        checkpoint, "full", tiny_model_dir, data_args={"max_source_length": 8, "data_format": "conversations"}
    )
    assert training_defaults(str(checkpoint)) == (8, "conversations")
    data = write_jsonl(tmp_path / "dev.jsonl", input_output_records(2))
    assert main(evaluation_argv(checkpoint, data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "holds input_output records but the checkpoint was trained on conversations records" in err
    assert "--data_format input_output" in err
    assert main([*evaluation_argv(checkpoint, data, tmp_path / "out"), "--data_format", "input_output"]) == 0
    settings = generation_settings(build_parser().parse_args(evaluation_argv(checkpoint, data, tmp_path)), 8)
    assert settings["max_source_length"] == 8


@pytest.mark.slow
def test_two_processes_give_exactly_the_single_process_results(tiny_model_dir: Path, dev_file: Path, tmp_path):
    checkpoint = tmp_path / f"shard-test-{os.getpid()}"
    shutil.copytree(tiny_model_dir, checkpoint)
    env = {
        **os.environ,
        "CHECKPOINT": str(checkpoint),
        "DATASET_PATH": str(dev_file),
        "BATCH_SIZE": "2",
        "MAX_NEW_TOKENS": "6",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = ["bash", str(REPO_ROOT / "scripts" / "evaluate.sh"), "--device", "cpu"]
    single = subprocess.run(script, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    default_dir = REPO_ROOT / "output" / "evaluation" / checkpoint.name
    try:
        single_rows = (default_dir / PREDICTIONS_FILE).read_bytes()
        single_metrics = (default_dir / METRICS_FILE).read_bytes()
        assert not (tmp_path / "output").exists()
        sharded_dir = tmp_path / "sharded"
        result = subprocess.run(
            script, env={**env, "NUM_GPUS": "2", "OUTPUT_DIR": str(sharded_dir)}, cwd=tmp_path,
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(default_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("generated 4 examples") == 2
    assert "examples/s" in result.stderr and "generated tokens/s" in result.stderr
    assert (sharded_dir / PREDICTIONS_FILE).read_bytes() == single_rows
    assert (sharded_dir / METRICS_FILE).read_bytes() == single_metrics


def test_batch_inference_checks_its_output_first_and_resumes(tiny_model_dir: Path, dev_file: Path, tmp_path, capsys):
    from inference.chat_cli import batch_settings
    from inference.chat_cli import build_parser as inference_parser
    from inference.chat_cli import main as inference_main

    def argv(output: Path) -> list[str]:
        return [
            "--model", str(tiny_model_dir), "--input_file", str(dev_file), "--output_file", str(output),
            "--device", "cpu", "--max_new_tokens", "5", "--batch_size", "3",
        ]  # fmt: skip

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert inference_main(argv(blocker / "replies.jsonl")) == 1
    err = capsys.readouterr().err
    assert f"cannot write results to {blocker}" in err and "--output_file" in err and "loaded" not in err

    assert inference_main(argv(tmp_path / "complete.jsonl")) == 0
    reference = read_rows(tmp_path / "complete.jsonl")
    assert len(reference) == 8 and all(set(row) == {"prompt", "response"} for row in reference)
    resumed = tmp_path / "resumed.jsonl"
    settings_path(resumed).write_text(json.dumps(batch_settings(inference_parser().parse_args(argv(resumed)))))
    partial_path(resumed, 0).write_text(
        json.dumps({"id": "6", "prompt": reference[6]["prompt"], "response": "kept"}) + "\n"
    )
    assert inference_main(argv(resumed)) == 0
    assert read_rows(resumed) == reference[:6] + [{"prompt": reference[6]["prompt"], "response": "kept"}, reference[7]]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("resumed")) == ["resumed.jsonl"]


@pytest.mark.slow
def test_evaluation_benchmark_compares_batched_and_single_generation_on_the_same_model():
    figures = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_evaluation.py"), "--examples", "6", "--batch_size", "6",
         "--max_new_tokens", "4"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    result = json.loads(figures.strip().splitlines()[-1])
    assert result["same_tokens"] is True
    assert result["batched_examples_per_s"] > 0 and result["single_examples_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["batched_examples_per_s"] / result["single_examples_per_s"], 0.05)


@pytest.mark.slow
def test_ctrl_c_keeps_the_predictions_made_and_the_rerun_finishes_them(tiny_model_dir: Path, dev_file: Path, tmp_path):
    argv = [*evaluation_argv(tiny_model_dir, dev_file, tmp_path / "run"), "--batch_size", "1", "--max_new_tokens", "12"]
    partial = partial_path(tmp_path / "run" / PREDICTIONS_FILE, 0)
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune.evaluate", *argv], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not (partial.is_file() and partial.read_text(encoding="utf-8").count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, "no prediction was written"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted: the predictions made so far are kept; rerun the same command to continue" in err
    kept = read_rows(partial)
    assert 1 <= len(kept) < 8 and not (tmp_path / "run" / PREDICTIONS_FILE).exists()

    assert main(argv) == 0
    rows = read_rows(tmp_path / "run" / PREDICTIONS_FILE)
    fresh = [
        *evaluation_argv(tiny_model_dir, dev_file, tmp_path / "fresh"),
        "--batch_size",
        "8",
        "--max_new_tokens",
        "12",
    ]
    assert main(fresh) == 0
    assert rows == read_rows(tmp_path / "fresh" / PREDICTIONS_FILE)
    assert all(row in rows for row in kept)
