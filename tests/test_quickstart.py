"""`bash scripts/quickstart.sh` runs the whole pipeline on the tiny model (build, convert, P-Tuning v2, evaluate,
answer), leaves what its summary lists, and a second run reuses the model and the finished training run."""

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
METRIC_NAMES = {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
# Every knob quickstart.sh or the launchers it calls read: runs see only the test's own values.
KNOBS = (
    "BASE_MODEL_PATH", "TINY_MODEL_DIR", "QUICKSTART_DIR", "ADVERTISE_GEN_DIR", "QUICKSTART_INSTALL", "PRE_SEQ_LEN",
    "LR", "DEV_BATCH_SIZE", "GRAD_ACCUMULATION_STEPS", "GRAD_ACCUMULARION_STEPS", "MAX_STEP", "SAVE_INTERVAL",
    "MAX_SOURCE_LEN", "MAX_TARGET_LEN", "MAX_SEQ_LEN", "NUM_GPUS", "QUANTIZATION_BIT", "EVAL_SAMPLES",
    "EVAL_BATCH_SIZE", "MAX_NEW_TOKENS", "PROMPT", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "OUTPUT_DIR", "DATASET_PATH", "RUN_NAME", "AUTORESUME_FROM_CHECKPOINT", "CHECKPOINT", "BATCH_SIZE", "REPORT_TO",
)  # fmt: skip
SUMMARY_LINE = re.compile(r"^  ([a-z][a-z ]*):\s+(/\S.*)$")


@dataclass
class QuickstartRun:
    """A finished quickstart run: exit status, combined output, and the locations its summary printed."""

    returncode: int
    output: str
    locations: dict[str, Path]


def run_quickstart(root: Path) -> QuickstartRun:
    """Run scripts/quickstart.sh with every output under `root`, small settings and this interpreter's packages."""
    env = {key: value for key, value in os.environ.items() if key not in KNOBS}
    env.update(
        {
            "QUICKSTART_DIR": str(root / "quickstart"),
            "TINY_MODEL_DIR": str(root / "tiny-chatglm3"),
            "QUICKSTART_INSTALL": "0",
            "MAX_STEP": "4",
            "SAVE_INTERVAL": "2",
            "DEV_BATCH_SIZE": "2",
            "EVAL_SAMPLES": "4",
            "MAX_NEW_TOKENS": "8",
            "CUDA_VISIBLE_DEVICES": "",
            "VIRTUAL_ENV": sys.prefix,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    summary = completed.stdout.split("Where everything went:", 1)[-1]
    locations = {
        match.group(1): Path(match.group(2).strip())
        for line in summary.splitlines()
        if (match := SUMMARY_LINE.match(line))
    }
    return QuickstartRun(completed.returncode, completed.stdout, locations)


@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory) -> Path:
    """An empty folder for one module's quickstart outputs."""
    return tmp_path_factory.mktemp("quickstart")


@pytest.fixture(scope="module")
def first_run(quickstart_root: Path) -> QuickstartRun:
    """The quickstart run on a machine where nothing was built yet."""
    return run_quickstart(quickstart_root)


@pytest.mark.slow
def test_quickstart_trains_evaluates_and_answers(first_run, quickstart_root):
    assert first_run.returncode == 0, first_run.output[-4000:]
    places = first_run.locations
    run_dir = quickstart_root / "quickstart" / "run"
    assert places["base model"] == quickstart_root / "tiny-chatglm3"
    assert (places["base model"] / "config.json").is_file() and (places["base model"] / "tokenizer.model").is_file()

    assert places["checkpoint"] == run_dir / "checkpoint-4"
    assert (run_dir / "checkpoint-2").is_dir()
    record = json.loads((places["checkpoint"] / "training_record.json").read_text(encoding="utf-8"))
    assert record["method"] == "ptuning" and record["global_step"] == 4
    assert Path(record["base_model"]).resolve() == places["base model"].resolve()
    assert places["final model"] == run_dir and (run_dir / "model.safetensors").is_file()
    assert "--max_steps 4" in places["training log"].read_text(encoding="utf-8")
    assert places["loss curve"].stat().st_size > 0

    train_lines = places["training data"].read_text(encoding="utf-8").splitlines()
    dev_lines = places["dev data"].read_text(encoding="utf-8").splitlines()
    assert len(train_lines) == 160 and len(dev_lines) == 16
    assert set(json.loads(dev_lines[0])) == {"prompt", "response"}

    metrics = json.loads(places["metrics"].read_text(encoding="utf-8"))
    assert set(metrics) == METRIC_NAMES
    assert all(isinstance(value, float) and 0.0 <= value <= 100.0 for value in metrics.values())
    predictions = [json.loads(line) for line in places["predictions"].read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 4
    assert [row["label"] for row in predictions] == [json.loads(line)["response"] for line in dev_lines[:4]]

    answer = places["answer"].read_text(encoding="utf-8").strip()
    assert answer
    assert answer in first_run.output.split("ChatGLM: ", 1)[1]


@pytest.mark.slow
def test_second_quickstart_run_reuses_model_and_training(first_run, quickstart_root):
    assert first_run.returncode == 0, "the first run failed; see the other test"
    model_file = first_run.locations["base model"] / "model.safetensors"
    built_at = model_file.stat().st_mtime_ns
    first_metrics = first_run.locations["metrics"].read_text(encoding="utf-8")

    second_run = run_quickstart(quickstart_root)

    assert second_run.returncode == 0, second_run.output[-4000:]
    assert "already built; reusing it" in second_run.output
    assert "already trained to step 4" in second_run.output
    assert model_file.stat().st_mtime_ns == built_at
    assert second_run.locations == first_run.locations
    run_dir = quickstart_root / "quickstart" / "run"
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert second_run.locations["metrics"].read_text(encoding="utf-8") == first_metrics
