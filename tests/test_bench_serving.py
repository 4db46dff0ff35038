"""scripts/bench_serving.py plumbing on a tiny load: both modes measured against real server processes."""

import importlib.util
from pathlib import Path

from api_server_helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "bench_serving.py"


def test_serving_benchmark_reports_both_modes(tiny_model_dir: Path, capsys):
    spec = importlib.util.spec_from_file_location("bench_serving_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    port = str(free_port())
    arguments = ["--model", str(tiny_model_dir), "--clients", "3", "--requests", "6", "--sequential_requests", "3"]
    sequential, batched = module.main([*arguments, "--max_tokens", "5", "--port", port])
    assert (sequential["mode"], batched["mode"]) == ("one at a time", "continuous batching")
    assert (sequential["requests"], batched["requests"]) == (3, 6)
    assert 0 < sequential["generated_tokens"] <= 15 and 0 < batched["generated_tokens"] <= 30
    assert batched["tokens_per_s"] > 0 and batched["ttft_p50_s"] <= batched["ttft_p95_s"]
    assert batched["speedup"] == round(batched["tokens_per_s"] / sequential["tokens_per_s"], 2)
    assert "| continuous batching | 3 | 6 |" in capsys.readouterr().out
