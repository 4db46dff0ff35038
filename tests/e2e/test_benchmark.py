"""scripts/benchmark.py on the CPU shape: one JSON line per run, and the suite's table (GPU figures come from a GPU)."""

import importlib.util
import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from finetune.methods import METHODS

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"


def load_benchmark_module():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*arguments: str) -> dict:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", "--steps", "1", "--warmup", "0", *arguments],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fixed_shape_runs_report_throughput_plan_and_estimate():
    full = run("--method", "lora", "--batch", "2", "--seq", "512", "--recompute", "full")
    plain = run("--method", "lora", "--batch", "2", "--seq", "512", "--recompute", "none")
    assert full["recompute"] == "2 layers full, 0 mlp, 0 none" and plain["recompute"] == "0 layers full, 0 mlp, 2 none"
    assert full["loss"] == plain["loss"]  # recomputation changes no result
    assert full["estimated_gib"] < plain["estimated_gib"]
    assert full["tokens_per_s"] > 0 and full["device"] == "cpu" and full["peak_gib"] is None
    ptuning = run("--method", "ptuning", "--pre_seq_len", "8", "--batch", "1", "--seq", "64")
    assert ptuning["trainable"] == 8 * 2 * 2 * 2 * 32  # pre_seq_len x layers x (key, value) x groups x kv_channels


@pytest.mark.slow
def test_suite_prints_a_row_per_target_and_the_realistic_ratios(monkeypatch, capsys):
    benchmark = load_benchmark_module()
    rows = [benchmark.SuiteRow(name, ("--method", "lora", "--realistic", mode, "--examples", "16"), None)
            for name, mode in (("realistic-packed", "packed"), ("realistic-dynamic", "dynamic"),
                               ("realistic-fixed1153", "fixed"))]
    rows.append(benchmark.SuiteRow("lora-2x64", ("--method", "lora", "--batch", "2", "--seq", "64"), None, 1e9, 15))
    monkeypatch.setattr(benchmark, "SUITE", tuple(rows))
    benchmark.run_suite(Namespace(steps=1, warmup=0, cpu=True, anchor=None))
    output = capsys.readouterr().out
    results = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [result["row"] for result in results] == [row.name for row in rows]
    assert all("samples_per_s" in result for result in results)
    assert "| lora-2x64 |" in output and "peak not measured (no CUDA)" in output
    assert "realistic samples/s: packed" in output and "target >= 4x" in output


@pytest.mark.slow
def test_preference_mode_reports_pairs_per_second_with_the_reference_pass():
    dpo = run("--method", "lora", "--preference", "--batch", "1", "--seq", "64")
    assert dpo["mode"] == "preference" and dpo["pairs_per_s"] > 0 and dpo["samples_per_s"] == dpo["pairs_per_s"]
    # First step: a fresh LoRA adapter (B = 0) equals its reference, the adapter disabled, so the loss is log 2.
    assert dpo["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert dpo["tokens_per_s"] == pytest.approx(2 * 64 * dpo["pairs_per_s"], rel=0.05)


def parsed_arguments(benchmark, monkeypatch, *arguments: str) -> Namespace:
    """The benchmark's options for a command line."""
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *arguments])
    return benchmark.parse_args()


def test_every_registered_method_is_a_choice_sized_and_set_up_by_what_it_says(monkeypatch):
    benchmark = load_benchmark_module()
    sizes = {"lora": {"lora_rank": 8}, "ptuning": {"pre_seq_len": 128}, "qlora": {"lora_rank": 8},
             "dora": {"lora_rank": 8}, "freeze": {"trainable_layers": 2}, "full": {}}  # fmt: skip
    assert set(METHODS) == set(sizes)
    for name, size in sizes.items():
        args = parsed_arguments(benchmark, monkeypatch, "--cpu", "--method", name)
        assert benchmark.method_arguments(args) == size
        setup = benchmark.training_setup(args, torch.float32, None)
        assert setup.method == name and setup.quantization_bit == (4 if name == "qlora" else None)
    args = parsed_arguments(benchmark, monkeypatch, "--cpu", "--method", "ptuning", "--pre_seq_len", "8")
    config = benchmark.model_config(args)
    model = benchmark.build_model(args, config, torch.float32, "cpu")
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    assert config.pre_seq_len == 8 and trainable == 8 * 2 * 2 * 2 * 32  # the prefix the method says it adds


@pytest.mark.slow
def test_a_method_that_trains_the_base_is_compared_with_its_cached_starting_model(monkeypatch, capsys):
    benchmark = load_benchmark_module()
    arguments = ("--cpu", "--method", "freeze", "--trainable_layers", "1", "--preference", "--batch", "1", "--seq",
                 "32", "--steps", "2", "--warmup", "0")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *arguments])
    benchmark.main()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "freeze" and result["mode"] == "preference"
    # The reference is the model before the first step, kept: after one step the loss has left log 2 (a reference
    # recomputed with the trained weights would keep it at log 2).
    assert result["loss"] < 0.69
