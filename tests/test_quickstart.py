"""`bash scripts/quickstart.sh` runs the whole pipeline on the tiny model (build, convert, score the untrained model,
P-Tuning v2, full fine-tuning, score again, answer), leaves what its summary lists, shows that fine-tuning improves the
dev metrics by a clear margin, and a second run reuses the model and the finished training runs."""

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
    "FULL_MAX_STEP", "FULL_LR", "FULL_BATCH_SIZE",
)  # fmt: skip
# What the default full fine-tuning (80 steps) of the tiny model must add to the untrained model's dev scores. Measured
# (2 CPU cores): ROUGE-1 16.72 -> 32.27, ROUGE-L 8.06 -> 30.02, BLEU-4 3.79 -> 16.43, training loss 6.13 -> 1.39.
LEARNING_MARGINS = {"rouge-1": 10.0, "rouge-l": 15.0, "bleu-4": 8.0}
LOSS_DROP = 3.0
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
    assert places["base model"] == quickstart_root / "tiny-chatglm3"  # TINY_MODEL_DIR
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
    assert metrics["metric_convention"] == "ptuning" and metrics["evaluated_turns"] == 16
    assert all(isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 100.0 for name in METRIC_NAMES)
    predictions = [json.loads(line) for line in places["predictions"].read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 16
    assert [row["label"] for row in predictions] == [json.loads(line)["response"] for line in dev_lines]
    assert "Before and after fine-tuning" in first_run.output

    answer = places["answer"].read_text(encoding="utf-8").strip()
    assert answer
    assert answer in first_run.output.split("ChatGLM: ", 1)[1]


@pytest.mark.slow
def test_full_fine_tuning_of_the_tiny_model_clearly_improves_the_dev_scores(first_run):
    assert first_run.returncode == 0, "the first run failed; see the other test"
    places = first_run.locations
    before = json.loads(places["base metrics"].read_text(encoding="utf-8"))
    after = json.loads(places["full metrics"].read_text(encoding="utf-8"))
    for name, margin in LEARNING_MARGINS.items():
        assert after[name] >= before[name] + margin, f"{name}: {before[name]} -> {after[name]}, needs +{margin}"
    state = json.loads((places["full checkpoint"] / "trainer_state.json").read_text(encoding="utf-8"))
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] <= losses[0] - LOSS_DROP, losses
    assert places["full loss curve"].stat().st_size > 0
    answer = places["answer"].read_text(encoding="utf-8")
    assert "这款" in answer or "设计" in answer  # the style of the training answers, not gibberish


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
    assert "already trained to step 80 (FULL_MAX_STEP=80)" in second_run.output
    assert model_file.stat().st_mtime_ns == built_at
    assert second_run.locations == first_run.locations
    run_dir = quickstart_root / "quickstart" / "run"
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert second_run.locations["metrics"].read_text(encoding="utf-8") == first_metrics
