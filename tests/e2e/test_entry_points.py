"""Every command-line entry point answers --help with its usage and exit status 0 (a stray % in a help string used to
crash argparse), a known error in training ends with one line and exit status 2, without a traceback, and the
libraries' noise of every run stays out (bitsandbytes' CPU kernel warning, the gradient_checkpointing deprecation)."""

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from launcher_helpers import LAUNCHER_KNOBS

from finetune.arguments import parse_arguments

REPO_ROOT = Path(__file__).resolve().parents[2]
# (module name, or script path) of every Python command; each runs in this process as __main__, sharing imports.
PYTHON_ENTRY_POINTS = [
    "finetune.train",
    "finetune.preference",
    "finetune.evaluate",
    "finetune.tiny_model",
    "inference.py",
    "inference/chat_cli.py",
    "inference/export.py",
    "inference/api_server.py",
    "data_tools.convert",
    "data_tools.format_advertise_gen",
    "data_tools.format_tool_alpaca",
    "data_tools.make_sample_advertise_gen",
    "data_tools/format_preference.py",
    "scripts/benchmark.py",
    "scripts/bench_encoding.py",
]
SHELL_ENTRY_POINTS = [
    "finetune_pt.sh",
    "finetune_pt_multiturn.sh",
    "finetune_lora.sh",
    "finetune_ds.sh",
    "finetune_ds_multiturn.sh",
    "finetune_dpo.sh",
    "quickstart.sh",
]


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    return {**env, "PYTHONPATH": str(REPO_ROOT)}


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy, for modules already imported
@pytest.mark.parametrize("entry", PYTHON_ENTRY_POINTS)
def test_every_python_entry_point_prints_its_help(entry: str, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [entry, "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # script entry points put the repository root on it
    with pytest.raises(SystemExit) as exited:
        if entry.endswith(".py"):
            runpy.run_path(str(REPO_ROOT / entry), run_name="__main__")
        else:
            runpy.run_module(entry, run_name="__main__", alter_sys=True)
    assert exited.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_every_launcher_prints_its_knobs():
    commands = [["bash", f"scripts/{script}", "--help"] for script in SHELL_ENTRY_POINTS]
    processes = [
        subprocess.Popen(command, cwd=REPO_ROOT, env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for command in commands
    ]
    for command, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{' '.join(command)}:\n{stderr.decode()[-2000:]}"
        assert "Knobs" in stdout.decode(), " ".join(command)
        if command[1].startswith("scripts/finetune_"):  # the knobs' defaults, read from the launcher's recipe
            assert "Defaults from the recipe configs/" in stdout.decode() and "\n  LR=" in stdout.decode()


def test_a_bad_argument_ends_training_with_one_line(tiny_model_dir, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "finetune.train", "--model_name_or_path", str(tiny_model_dir), "--train_file",
         str(tmp_path / "absent.jsonl"), "--output_dir", str(tmp_path / "out"), "--pre_seq_len", "0"],
        cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: --pre_seq_len must be a positive number of prefix tokens, got 0"
    )
    assert "Traceback" not in completed.stderr


def test_importing_the_trainer_prints_no_library_noise():
    completed = subprocess.run(
        [sys.executable, "-c", "import finetune.train"],
        cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "gemm_4bit_forward" not in completed.stderr and "pip install kernels" not in completed.stderr


def test_gradient_checkpointing_flag_is_passed_on_without_a_deprecation_warning(tiny_model_dir, tmp_path):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--gradient_checkpointing"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, training_args = parse_arguments(argv)
    assert training_args.gradient_checkpointing and training_args.activation_checkpointing
    assert not [warning for warning in caught if "gradient_checkpointing" in str(warning.message)]
