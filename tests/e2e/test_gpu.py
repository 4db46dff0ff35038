"""GPU-only checks: LoRA bf16 and QLoRA 4-bit training steps on a ChatGLM3-6B-shaped random model.

Skipped without CUDA (CI has none); QLoRA also needs bitsandbytes. Run on a GPU machine with:
    python -m pytest tests/e2e/test_gpu.py -s
Each test prints its peak memory as a JSON line.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def run_benchmark(*arguments: str) -> dict:
    """Run scripts/benchmark.py (a few training steps) and return its JSON result."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark.py"), "--steps", "3", "--warmup", "1", *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(json.dumps(result))
    return result


def test_lora_bf16_steps_on_a_6b_shaped_model():
    result = run_benchmark("--method", "lora", "--batch", "1", "--seq", "1024")
    assert result["dtype"] == "bfloat16" and result["layers"] == 28
    assert result["loss"] == result["loss"] and result["loss"] > 0
    assert result["peak_gib"] is not None


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_4bit_steps_on_a_6b_shaped_model():
    result = run_benchmark("--method", "qlora", "--batch", "1", "--seq", "1024")
    assert result["loss"] == result["loss"] and result["loss"] > 0
    assert result["peak_gib"] is not None


@pytest.mark.parametrize(("method", "batch", "seq", "budget_gib"), [("lora", 4, 768, 15), ("ptuning", 1, 2048, 13)])
def test_recompute_plan_keeps_the_peak_within_the_memory_budget(method, batch, seq, budget_gib):
    """--recompute auto plans from the memory preflight's estimate; the measured peak must respect the budget."""
    result = run_benchmark(
        "--method", method, "--batch", str(batch), "--seq", str(seq), "--memory_budget_gib", str(budget_gib)
    )
    assert result["estimated_gib"] <= budget_gib
    assert result["peak_gib"] <= budget_gib, result
