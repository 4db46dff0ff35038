"""`scripts/benchmark.py --real_size --layers 2`: a chatglm3-6b-wide folder (vocab 65024, hidden 4096, ffn 13696;
0.94 B parameters) through every stage on the CPU, and the load's peak RSS against the bf16 weight bytes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from bench_real_size import DEFAULT_STAGES, LOAD_BOUNDS  # noqa: E402

TIMEOUT_S = 3600
# Rows of 64 tokens keep the four training stages short in CI; the full 256-token figures are in docs/real_size.md.
TOKENS = 64
# Writing streams shard by shard: the writer never holds the whole model (2 layers: 1.75 GiB of weights).
BUILD_PEAK_OVER_WEIGHTS = 0.75


def start_real_size(work_dir: Path, *options: str) -> subprocess.Popen:
    """Start the benchmark at 2 layers; its output goes to files beside `work_dir`."""
    work_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(SCRIPT), "--real_size", "--layers", "2", "--tokens", str(TOKENS),
               "--work_dir", str(work_dir), *options]  # fmt: skip
    with (work_dir.parent / "stdout.txt").open("w") as stdout, (work_dir.parent / "stderr.txt").open("w") as stderr:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, start_new_session=True)


def finish_real_size(process: subprocess.Popen, work_dir: Path) -> dict[str, dict]:
    """Wait for a started run; its JSON lines by stage (printed, so a CI log keeps the figures)."""
    returncode = process.wait(timeout=TIMEOUT_S)
    stdout = (work_dir.parent / "stdout.txt").read_text(encoding="utf-8")
    assert returncode == 0, (work_dir.parent / "stderr.txt").read_text(encoding="utf-8")[-3000:]
    print(stdout)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {line["stage"]: line for line in lines}


def run_real_size(work_dir: Path, *options: str) -> dict[str, dict]:
    """Run the benchmark at 2 layers; its JSON lines by stage."""
    return finish_real_size(start_real_size(work_dir, *options), work_dir)


@pytest.fixture(scope="module")
def bin_load_run(tmp_path_factory) -> tuple[subprocess.Popen, Path]:
    """The .bin folder's build and load, started in the background by the first test that asks for it, so that it
    runs beside the every-stage run: most of each stage's time is one core's (imports, loading, writing shards), and
    each stage's peak RSS is its own process's. Stopped if still running when the module ends."""
    work_dir = tmp_path_factory.mktemp("real-size-bin") / "work"
    process = start_real_size(work_dir, "--format", "bin", "--stages", "load_train")
    yield process, work_dir
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)  # the run and its stage's process
        process.wait()


@pytest.mark.slow
def test_every_stage_completes_on_a_two_layer_chatglm3_6b_folder_and_loading_stays_near_the_weights(
    tmp_path, bin_load_run
):
    results = run_real_size(tmp_path / "work")
    assert list(results) == ["build", *DEFAULT_STAGES]
    assert not [stage for stage, line in results.items() if "error" in line]
    weights = results["load_train"]["weight_gib"]
    assert weights == pytest.approx(1.752, abs=0.01)
    assert results["build"]["peak_gib"] < BUILD_PEAK_OVER_WEIGHTS * weights
    assert results["build"]["layout"].startswith("7 safetensors file(s)")
    load = results["load_train"]
    assert load["peak_less_imports_over_weights"] <= LOAD_BOUNDS["safetensors"], load
    assert "torch.bfloat16" in load["loaded"]
    for stage, steps in (("lora", 2), ("ptuning", 1), ("qlora", 1), ("resume", 1)):
        line = results[stage]
        assert line["steps"] == steps and line["tokens_per_s"] > 0, line
        assert line["checkpoint"].startswith("1 safetensors file(s)"), line
    assert results["export_merged"]["written"].endswith("1.75 GiB")
    assert results["server"]["completion_tokens"] >= 1
    assert not (tmp_path / "work" / "model").exists() and not (tmp_path / "work" / "merged").exists()


@pytest.mark.slow
def test_bin_shards_load_within_their_bound(bin_load_run):
    results = finish_real_size(*bin_load_run)
    assert results["build"]["layout"].startswith("7 bin file(s)")
    load = results["load_train"]
    assert load["peak_less_imports_over_weights"] <= LOAD_BOUNDS["bin"], load
