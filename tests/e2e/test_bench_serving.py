"""scripts/bench_serving.py plumbing on a tiny load: both modes measured against real server processes."""

import importlib.util
from pathlib import Path

import pytest
import torch
from api_server_helpers import free_port

from finetune.checkpoints import load_for_inference
from inference.openai_protocol import streamable_content

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "bench_serving.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module."""
    spec = importlib.util.spec_from_file_location("bench_serving_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serving_benchmark_reports_both_modes(bench, tiny_model_dir: Path, capsys):
    port = str(free_port())
    arguments = ["--model", str(tiny_model_dir), "--clients", "3", "--requests", "6", "--sequential_requests", "3"]
    sequential, batched = bench.main([*arguments, "--max_tokens", "5", "--port", port])
    assert (sequential["mode"], batched["mode"]) == ("one at a time", "continuous batching")
    assert (sequential["requests"], batched["requests"]) == (3, 6)
    assert 0 < sequential["generated_tokens"] <= 15 and 0 < batched["generated_tokens"] <= 30
    assert batched["tokens_per_s"] > 0 and batched["ttft_p50_s"] <= batched["ttft_p95_s"]
    assert batched["speedup"] == round(batched["tokens_per_s"] / sequential["tokens_per_s"], 2)
    assert "| continuous batching | 3 | 6 |" in capsys.readouterr().out


def test_random_benchmark_model_has_the_shape_and_dtype_and_streams_its_replies(bench, tmp_path):
    """The --shape plumbing at a small shape in bfloat16: replies start with the blank metadata line and stream."""
    shape = {**bench.SHAPES["tiny"], "num_layers": 3, "hidden_size": 96, "dtype": torch.bfloat16}
    folder = bench.build_benchmark_model(tmp_path / "bench", shape)
    model, tokenizer, _ = load_for_inference(folder, device="cpu", dtype="bfloat16")
    assert (model.config.num_layers, model.config.hidden_size, model.dtype) == (3, 96, torch.bfloat16)
    prompt = tokenizer.build_chat_input(bench.PROMPTS[0])["input_ids"]
    output = model.generate(prompt, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(output[0, prompt.shape[1] :].tolist())
    assert text.startswith("\n") and len(streamable_content(text)) > 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a CUDA GPU")
def test_6b_shape_is_refused_without_cuda(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--shape", "6b"])
    assert "--shape 6b builds its random model on a CUDA GPU" in capsys.readouterr().err
