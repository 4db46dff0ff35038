"""Evaluation runs that must not lose work or mislead: output checked before loading, an interrupted run resumed,
training-record defaults, and two processes (torchrun, gloo) giving exactly the single-process predictions."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_builders import write_training_record
from train_helpers import conversation_records, input_output_records, write_jsonl

from finetune.checkpoint_format import open_checkpoint, read_training_record
from finetune.evaluate import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    build_parser,
    generation_settings,
    main,
    training_defaults,
)
from finetune.prediction_log import partial_path, settings_path

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_standalone_evaluation_reads_the_training_record_once(
    tiny_model_dir: Path, dev_file: Path, tmp_path, monkeypatch
):
    checkpoint = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(tiny_model_dir, checkpoint)
    write_training_record(checkpoint, "full", tiny_model_dir)
    reads = []
    read_text = Path.read_text

    def counted(path: Path, *args, **kwargs) -> str:
        if path.name == "training_record.json":
            reads.append(path.parent.name)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    assert main(evaluation_argv(checkpoint, dev_file, tmp_path / "out") + ["--max_samples", "2"]) == 0
    assert reads == ["checkpoint-10"]


def test_max_source_length_and_data_format_come_from_the_training_record(tiny_model_dir: Path, tmp_path, capsys):
    checkpoint = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(tiny_model_dir, checkpoint)
    write_training_record(
        checkpoint, "full", tiny_model_dir, data_args={"max_source_length": 8, "data_format": "conversations"}
    )
    assert training_defaults(open_checkpoint(checkpoint)) == (8, "conversations")
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


def test_metrics_file_says_how_it_was_made_and_each_convention_keeps_its_own(
    tiny_model_dir: Path, dev_file: Path, tmp_path, capsys
):
    output = tmp_path / "eval"
    argv = [*evaluation_argv(tiny_model_dir, dev_file, output), "--max_samples", "3"]
    assert main([*argv, "--max_samples", "0"]) == 2
    assert "error: --max_samples must be >= 1 (got 0)" in capsys.readouterr().err
    assert not output.exists()

    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((output / METRICS_FILE).read_text(encoding="utf-8"))
    assert report["metric_convention"] == "ptuning" and report["evaluated_turns"] == 3
    assert report["checkpoint"] == str(tiny_model_dir.resolve()) and report["data"] == str(dev_file.resolve())
    assert "metric convention: ptuning" in printed
    assert all(re.search(rf"^{name}\s+\d+\.\d{{4}}\s+0-100$", printed, re.M) for name in ("rouge-1", "bleu-4"))
    first = (output / METRICS_FILE).read_bytes()

    assert main([*argv, "--metric_convention", "finetune_demo"]) == 0
    printed = capsys.readouterr().out
    assert (output / METRICS_FILE).read_bytes() == first
    other = json.loads((output / "metrics.finetune_demo.json").read_text(encoding="utf-8"))
    assert other["metric_convention"] == "finetune_demo" and other["evaluated_turns"] == 3
    assert re.search(r"^bleu-4\s+\d+\.\d{4}\s+0-1$", printed, re.M) and "metric convention: finetune_demo" in printed


def test_detected_data_format_is_recorded_so_a_dev_set_in_the_other_format_is_refused(
    finished_run: Path, tmp_path, capsys
):
    checkpoint = finished_run / "checkpoint-2"
    assert read_training_record(checkpoint)["data_args"]["data_format"] == "input_output"
    data = write_jsonl(tmp_path / "chat.jsonl", conversation_records())
    assert main(evaluation_argv(checkpoint, data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "holds conversations records but the checkpoint was trained on input_output records" in err


def test_a_conversation_that_ends_in_a_tool_call_is_scored_as_a_call_turn(tiny_model_dir: Path, tmp_path):
    call = {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 20}}
    records = [
        {"tools": [{"name": "get_weather"}], "conversations": [{"role": "user", "content": "北京天气？"}, call]},
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    data = write_jsonl(tmp_path / "tools.jsonl", records)
    assert main(evaluation_argv(tiny_model_dir, data, tmp_path / "out")) == 0
    rows = read_rows(tmp_path / "out" / PREDICTIONS_FILE)
    assert [row["id"] for row in rows] == ["0:1", "1:1"]
    assert rows[0]["label"] is None and rows[0]["label_call"] == {"name": "get_weather", "arguments": {"city": "北京"}}
    report = json.loads((tmp_path / "out" / METRICS_FILE).read_text(encoding="utf-8"))
    assert report["evaluated_turns"] == 2 and report["tool_call_turns"] == 1
    assert "tool_name_accuracy" in report


def test_a_failure_before_the_first_prediction_leaves_no_file(tiny_model_dir: Path, dev_file: Path, tmp_path):
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="temperature"):  # transformers refuses it when generation starts
        main([*evaluation_argv(tiny_model_dir, dev_file, output), "--do_sample", "--temperature", "0"])
    assert list(output.iterdir()) == []


def test_raw_public_formats_are_sent_to_their_converter(tiny_model_dir: Path, tmp_path, capsys):
    files = {
        "advertise_gen.json": ({"content": "类型#裙", "summary": "好看"}, "data_tools.format_advertise_gen"),
        "openai.jsonl": (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            "data_tools.format_openai --input",
        ),
        "sharegpt.jsonl": (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            "data_tools.format_sharegpt --input",
        ),
    }
    for name, (record, command) in files.items():
        data = write_jsonl(tmp_path / name, [record, record])
        assert main(evaluation_argv(tiny_model_dir, data, tmp_path / "out")) == 1
        err = capsys.readouterr().err
        assert f"convert it first: python -m {command}" in err and str(data) in err and "on cpu" not in err


def test_default_output_is_under_the_repository_whatever_the_current_folder(
    tiny_model_dir: Path, dev_file: Path, tmp_path, monkeypatch
):
    checkpoint = tmp_path / f"cwd-test-{os.getpid()}" / "checkpoint-3"
    shutil.copytree(tiny_model_dir, checkpoint)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    expected = REPO_ROOT / "output" / "evaluation" / f"{checkpoint.parent.name}-checkpoint-3"
    argv = ["--model", str(checkpoint), "--data", str(dev_file), "--device", "cpu", "--max_new_tokens", "2"]
    try:
        assert main([*argv, "--max_samples", "2"]) == 0
        assert (expected / METRICS_FILE).is_file() and not (elsewhere / "output").exists()
    finally:
        shutil.rmtree(expected, ignore_errors=True)


def test_evaluate_script_help_lists_its_knobs():
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "evaluate.sh"), "--help"],
        env={key: value for key, value in os.environ.items() if key != "CHECKPOINT"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for knob in ("CHECKPOINT", "DATASET_PATH", "OUTPUT_DIR", "NUM_GPUS", "BATCH_SIZE", "MAX_NEW_TOKENS"):
        assert re.search(rf"^ *{knob}\b", result.stdout, re.M), knob
    assert "python -m finetune.evaluate --help" in result.stdout


@pytest.mark.slow
def test_interrupted_two_process_evaluation_says_last_that_a_rerun_continues(
    tiny_model_dir: Path, dev_file: Path, tmp_path
):
    output = tmp_path / "sharded"
    env = {
        **os.environ,
        "CHECKPOINT": str(tiny_model_dir),
        "DATASET_PATH": str(dev_file),
        "OUTPUT_DIR": str(output),
        "NUM_GPUS": "2",
        "BATCH_SIZE": "1",
        "MAX_NEW_TOKENS": "24",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    process = subprocess.Popen(
        ["bash", str(REPO_ROOT / "scripts" / "evaluate.sh"), "--device", "cpu"],
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(path.stat().st_size for path in output.glob("*.partial")):
        assert process.poll() is None and time.monotonic() < deadline, "no prediction was written"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    last_line = err.strip().splitlines()[-1]
    assert last_line == "interrupted: the predictions made so far are kept; rerun the same command to continue"
