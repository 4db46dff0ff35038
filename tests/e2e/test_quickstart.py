"""`bash scripts/quickstart.sh` runs the whole pipeline on the tiny model (write general text, pre-train the tiny
stand-in for chatglm3-6b on it, convert, score the base, P-Tuning v2, LoRA, full fine-tuning, score again, answer),
leaves what its summary lists, shows that P-Tuning v2 and LoRA teach the pre-trained base the task by a clear margin,
prints the table the README shows, and a second run reuses the pre-trained base, the finished training runs and their
scores.
The general text's generator has its unit tests in tests/unit/data_tools/test_make_general_text.py."""

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from background_runs import BackgroundRun, FinishedRun

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1500
METRIC_NAMES = {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
# Every knob quickstart.sh or the launchers it calls read: runs see only the test's own values.
KNOBS = (
    "BASE_MODEL_PATH", "TINY_MODEL_DIR", "QUICKSTART_DIR", "ADVERTISE_GEN_DIR", "QUICKSTART_INSTALL", "PRE_SEQ_LEN",
    "LR", "DEV_BATCH_SIZE", "GRAD_ACCUMULATION_STEPS", "GRAD_ACCUMULARION_STEPS", "MAX_STEP", "SAVE_INTERVAL",
    "MAX_SOURCE_LEN", "MAX_TARGET_LEN", "MAX_SEQ_LEN", "NUM_GPUS", "QUANTIZATION_BIT", "EVAL_SAMPLES",
    "EVAL_BATCH_SIZE", "MAX_NEW_TOKENS", "PROMPT", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "OUTPUT_DIR", "DATASET_PATH", "RUN_NAME", "AUTORESUME_FROM_CHECKPOINT", "CHECKPOINT", "BATCH_SIZE", "REPORT_TO",
    "FULL_MAX_STEP", "FULL_LR", "FULL_BATCH_SIZE", "QUICKSTART_SEED", "PRETRAIN_MAX_STEP", "PRETRAIN_LR",
    "PRETRAIN_BATCH_SIZE", "GENERAL_TEXT_SIZE", "LORA_RANK", "LORA_LR", "LORA_ALPHA", "LORA_DROPOUT", "LORA_TARGET",
    "PACKING", "STOP_TIMEOUT", "OMP_NUM_THREADS",
)  # fmt: skip
# What P-Tuning v2 and LoRA (default settings) must add to the pre-trained base's dev ROUGE-1, and how far each run's
# training loss (first -> last logged) must fall. Measured over QUICKSTART_SEED 0-4 (docs/quickstart.md):
# ROUGE-1 gain P-Tuning v2 +15.75 +22.88 +17.50 +6.94 +19.19, LoRA +22.05 +22.71 +20.74 +18.24 +28.82;
# loss drop P-Tuning v2 0.79 0.94 0.86 0.75 1.09, LoRA 0.93 1.11 0.99 0.84 1.10, full fine-tuning 0.55 0.52 (seeds 0, 1).
# Each margin sits below the smallest value measured; the ROUGE-1 margins are at least the +5 that issue 22 asks for.
TUNING_MARGINS = {"ptuning": {"rouge-1": 5.0}, "lora": {"rouge-1": 10.0}}
LOSS_DROPS = {"ptuning": 0.5, "lora": 0.5, "full": 0.3}
PRETRAIN_MAX_STEP, TUNING_MAX_STEP, FULL_MAX_STEP = 300, 60, 20
SUMMARY_LINE = re.compile(r"^  ([a-z][a-z ]*):\s+(/\S.*)$")
TABLE_ROW = re.compile(r"^  (pretrained tiny base|P-Tuning v2|LoRA|full fine-tuning) +([0-9. ]+?)(?: +([0-9.]+ -> [0-9.]+))?$")


@dataclass
class QuickstartRun:
    """A finished quickstart run: exit status, combined output, and the locations its summary printed."""

    returncode: int
    output: str
    locations: dict[str, Path]


def quickstart_environment(root: Path) -> dict[str, str]:
    """The environment of a quickstart run with its default settings, every output under `root`, this interpreter's
    packages."""
    env = {key: value for key, value in os.environ.items() if key not in KNOBS}
    env.update(
        {
            "QUICKSTART_DIR": str(root / "quickstart"),
            "TINY_MODEL_DIR": str(root / "tiny-chatglm3"),
            "QUICKSTART_INSTALL": "0",
            "CUDA_VISIBLE_DEVICES": "",
            "VIRTUAL_ENV": sys.prefix,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def quickstart_run(finished: FinishedRun) -> QuickstartRun:
    """A finished background scripts/quickstart.sh run, with the locations its summary printed."""
    summary = finished.stdout.split("Where everything went:", 1)[-1]
    locations = {
        match.group(1): Path(match.group(2).strip())
        for line in summary.splitlines()
        if (match := SUMMARY_LINE.match(line))
    }
    return QuickstartRun(-1 if finished.returncode is None else finished.returncode, finished.stdout, locations)


@dataclass
class FirstRunState:
    """What the first run left that the second must not change: the base's write time, the metrics and their time."""

    built_at: int
    first_metrics: str
    scored_at: int


def background_runs(root: Path) -> list[BackgroundRun]:
    """The first quickstart run (nothing built yet), then the second in the same folder, each with this interpreter's
    packages and the script's default settings (its tiny model runs on one CPU thread); tests/conftest.py starts them
    in the background."""
    command = ["bash", str(REPO_ROOT / "scripts" / "quickstart.sh")]
    env = quickstart_environment(root)
    return [
        BackgroundRun("first_run", command, root, root, TIMEOUT_S, env, merge_stderr=True),
        BackgroundRun("second_run", command, root, root, TIMEOUT_S, env, merge_stderr=True, before=first_run_state),
    ]


def first_run_state(finished: dict[str, FinishedRun]) -> FirstRunState:
    """What the first run left, recorded right before the second run starts."""
    first = quickstart_run(finished["first_run"])
    if first.returncode != 0:
        raise ValueError("the first run failed")
    built_at = (first.locations["base model"] / "model.safetensors").stat().st_mtime_ns
    metrics = first.locations["metrics"]
    return FirstRunState(built_at, metrics.read_text(encoding="utf-8"), metrics.stat().st_mtime_ns)


def table_rows(text: str) -> dict[str, tuple[list[float], str]]:
    """The rows of a before/after table in `text`: label -> (ROUGE-1/2/L and BLEU-4, the loss column)."""
    rows = {}
    for line in text.splitlines():
        if match := TABLE_ROW.match(line):
            rows[match.group(1)] = ([float(value) for value in match.group(2).split()], match.group(3) or "")
    return rows


def logged_losses(checkpoint: Path) -> list[float]:
    """The training losses logged up to `checkpoint`."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def quickstart_root(background_lane) -> Path:
    """The folder of this module's quickstart outputs."""
    return background_lane.run("first_run").folder


@pytest.fixture(scope="module")
def first_run(background_lane) -> QuickstartRun:
    """The quickstart run on a machine where nothing was built yet (run in the background)."""
    return quickstart_run(background_lane.wait("first_run"))


@pytest.fixture(scope="module")
def second_run(background_lane, first_run) -> tuple[QuickstartRun, FirstRunState | None]:
    """The second quickstart run in the same folder (run in the background after the first; its output says why if it
    did not start) and what the first had left right before it started."""
    finished = background_lane.wait("second_run")
    return quickstart_run(finished), finished.before


@pytest.mark.slow
def test_quickstart_pretrains_a_base_tunes_it_evaluates_and_answers(first_run, quickstart_root):
    assert first_run.returncode == 0, first_run.output[-4000:]
    places = first_run.locations
    assert places["base model"] == quickstart_root / "tiny-chatglm3"  # TINY_MODEL_DIR
    assert (places["base model"] / "config.json").is_file() and (places["base model"] / "tokenizer.model").is_file()
    assert "stand-in for the pretrained chatglm3-6b" in first_run.output

    # The base: every weight of a random model trained on the general text, which is not the evaluated task.
    base_record = json.loads((places["base model"] / "training_record.json").read_text(encoding="utf-8"))
    assert base_record["method"] == "full" and base_record["global_step"] == PRETRAIN_MAX_STEP
    general = [json.loads(line) for line in places["general text"].read_text(encoding="utf-8").splitlines()]
    dev_lines = places["dev data"].read_text(encoding="utf-8").splitlines()
    dev = [json.loads(line) for line in dev_lines]
    assert not any("#" in record["prompt"] for record in general)
    assert not {record["response"] for record in general} & {record["response"] for record in dev}
    pretrain_losses = logged_losses(places["base model"] / f"checkpoint-{PRETRAIN_MAX_STEP}")
    assert pretrain_losses[-1] < pretrain_losses[0] - 2.0, pretrain_losses

    run_dir = quickstart_root / "quickstart" / "run"
    assert places["checkpoint"] == run_dir / f"checkpoint-{TUNING_MAX_STEP}"
    for checkpoint, method in ((places["checkpoint"], "ptuning"), (places["lora checkpoint"], "lora")):
        record = json.loads((checkpoint / "training_record.json").read_text(encoding="utf-8"))
        assert record["method"] == method and record["global_step"] == TUNING_MAX_STEP
        assert Path(record["base_model"]).resolve() == places["base model"].resolve()
    assert places["final model"] == run_dir and (run_dir / "model.safetensors").is_file()
    assert f"--max_steps {TUNING_MAX_STEP}" in places["training log"].read_text(encoding="utf-8")
    assert places["loss curve"].stat().st_size > 0

    train_lines = places["training data"].read_text(encoding="utf-8").splitlines()
    assert len(train_lines) == 160 and len(dev_lines) == 16
    assert set(dev[0]) == {"prompt", "response"}

    metrics = json.loads(places["metrics"].read_text(encoding="utf-8"))
    assert metrics["metric_convention"] == "ptuning" and metrics["evaluated_turns"] == 16
    assert all(isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 100.0 for name in METRIC_NAMES)
    predictions = [json.loads(line) for line in places["predictions"].read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 16
    assert [row["label"] for row in predictions] == [record["response"] for record in dev]
    assert list(table_rows(first_run.output)) == ["pretrained tiny base", "P-Tuning v2", "LoRA", "full fine-tuning"]

    answer = places["answer"].read_text(encoding="utf-8").strip()
    assert answer
    assert answer in first_run.output.split("ChatGLM: ", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ptuning", "lora"])
def test_ptuning_and_lora_teach_the_pretrained_base_the_task(first_run, method):
    assert first_run.returncode == 0, "the first run failed; see the other test"
    places = first_run.locations
    before = json.loads(places["base metrics"].read_text(encoding="utf-8"))
    after_file = places["metrics"] if method == "ptuning" else places["lora metrics"]
    after = json.loads(after_file.read_text(encoding="utf-8"))
    for name, margin in TUNING_MARGINS[method].items():
        assert after[name] >= before[name] + margin, f"{method} {name}: {before[name]} -> {after[name]}, needs +{margin}"
    checkpoint = places["checkpoint"] if method == "ptuning" else places["lora checkpoint"]
    losses = logged_losses(checkpoint)
    assert losses[-1] <= losses[0] - LOSS_DROPS[method], losses


@pytest.mark.slow
def test_full_fine_tuning_reference_row_lowers_its_loss(first_run):
    """The reference row: its dev scores are the reference, not asserted; its training loss falls (by 0.55 and 0.52 on
    seeds 0 and 1)."""
    assert first_run.returncode == 0, "the first run failed; see the other test"
    places = first_run.locations
    losses = logged_losses(places["full checkpoint"])
    assert losses[-1] <= losses[0] - LOSS_DROPS["full"], losses
    assert places["full loss curve"].stat().st_size > 0
    assert METRIC_NAMES <= json.loads(places["full metrics"].read_text(encoding="utf-8")).keys()


@pytest.mark.slow
@pytest.mark.parametrize("readme", ["README.md", "README_zh.md"])
def test_readme_table_is_what_the_quickstart_prints(first_run, readme):
    """The README's quickstart table (default settings, QUICKSTART_SEED 0) shows the rows this run printed: same labels,
    loss columns, and scores equal up to last-digit rounding (0.1) where another CPU sums in another order."""
    assert first_run.returncode == 0, "the first run failed; see the other test"
    printed = table_rows(first_run.output)
    shown = table_rows((REPO_ROOT / readme).read_text(encoding="utf-8"))
    assert list(shown) == list(printed)
    for label, (scores, loss) in printed.items():
        shown_scores, shown_loss = shown[label]
        assert shown_scores == pytest.approx(scores, abs=0.1), f"{readme} {label}: {shown_scores} != printed {scores}"
        assert shown_loss == loss, f"{readme} {label}: loss {shown_loss!r} != printed {loss!r}"


@pytest.mark.slow
def test_second_quickstart_run_reuses_the_pretrained_base_training_and_scores(first_run, second_run, quickstart_root):
    assert first_run.returncode == 0, "the first run failed; see the other test"
    model_file = first_run.locations["base model"] / "model.safetensors"
    second_run, first_state = second_run  # the state was recorded right before the second run started

    assert second_run.returncode == 0, second_run.output[-4000:]
    built_at, first_metrics, scored_at = first_state.built_at, first_state.first_metrics, first_state.scored_at
    assert f"already pre-trained to step {PRETRAIN_MAX_STEP} (PRETRAIN_MAX_STEP={PRETRAIN_MAX_STEP})" in second_run.output
    assert second_run.output.count(f"already trained to step {TUNING_MAX_STEP} (MAX_STEP={TUNING_MAX_STEP})") == 2
    assert f"already trained to step {FULL_MAX_STEP} (FULL_MAX_STEP={FULL_MAX_STEP})" in second_run.output
    assert model_file.stat().st_mtime_ns == built_at
    assert second_run.locations == first_run.locations
    run_dir = quickstart_root / "quickstart" / "run"
    assert sorted(path.name for path in run_dir.glob("checkpoint-*")) == [f"checkpoint-{TUNING_MAX_STEP}"]
    assert second_run.output.count("already scored with these settings; reusing") == 4  # base and the three runs
    assert second_run.locations["metrics"].read_text(encoding="utf-8") == first_metrics
    assert second_run.locations["metrics"].stat().st_mtime_ns == scored_at
    assert table_rows(second_run.output) == table_rows(first_run.output)
