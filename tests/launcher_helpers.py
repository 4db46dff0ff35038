"""Shared pieces of the launcher and DeepSpeed tests: tiny data files and running a scripts/finetune_*.sh launcher."""

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from finetune.methods.ptuning import load_prefix_checkpoint
from finetune.checkpoint_format import resume_problem

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_TIMEOUT_S = 600
# Every environment knob a launcher reads: runs start from none of the caller's, only the test's own.
LAUNCHER_KNOBS = (
    "PRE_SEQ_LEN", "LR", "NUM_GPUS", "MAX_SOURCE_LEN", "MAX_TARGET_LEN", "MAX_SEQ_LEN", "DEV_BATCH_SIZE",
    "GRAD_ACCUMULARION_STEPS", "GRAD_ACCUMULATION_STEPS", "MAX_STEP", "SAVE_INTERVAL", "AUTORESUME_FROM_CHECKPOINT",
    "RUN_NAME", "BASE_MODEL_PATH", "DATASET_PATH", "OUTPUT_DIR", "LORA_RANK", "LORA_ALPHA", "LORA_DROPOUT",
    "LORA_TARGET", "QUANTIZATION_BIT", "DS_CONFIG", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "STOP_TIMEOUT",
    "METHOD", "PREF_LOSS", "PREF_BETA", "INIT_CHECKPOINT", "TRAINABLE_LAYERS", "PACKING",
)  # fmt: skip

INPUT_OUTPUT_RECORDS = [
    {"prompt": "类型#裙*颜色#红色*风格#简约", "response": "这款红色连衣裙宽松舒适。"},
    {"prompt": "类型#裤*颜色#黑色*图案#条纹", "response": "复古的条纹长裤，适合周末逛街。"},
    {"prompt": "Please write a short advertisement.", "response": "Our new blue jacket is soft."},
    {"prompt": "类型#上衣*颜色#白色", "response": "白色上衣很好地修饰身材。"},
]
CONVERSATION_RECORDS = [
    {
        "conversations": [
            {"role": "user", "content": "What is the weather like in Beijing today?"},
            {"role": "assistant", "content": "Let me check."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You are welcome."},
        ]
    },
    {
        "tools": [{"name": "get_weather", "description": "weather of a city", "parameters": {"city": "string"}}],
        "conversations": [
            {"role": "user", "content": "天气怎么样？北京"},
            {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"temp": 20}},
            {"role": "assistant", "content": "The temperature in Beijing is 20 degrees."},
        ],
    },
]


def write_jsonl(path: Path, records: list[dict], repeat: int = 2) -> Path:
    """Write `records` `repeat` times as JSON lines."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records] * repeat
    path.write_text("".join(lines), encoding="utf-8")
    return path


@dataclass
class LauncherRun:
    """A finished launcher run: its exit status, combined output, and how long it took."""

    returncode: int
    output: str
    seconds: float


def run_launcher(script: str, env_overrides: dict[str, str], *extra_args: str) -> LauncherRun:
    """Run `bash scripts/<script>` with the environment knobs and pass-through flags; never raises on failure."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    env.update(env_overrides)
    env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    completed = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / script), *extra_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=LAUNCHER_TIMEOUT_S,
        check=False,
    )
    return LauncherRun(completed.returncode, completed.stdout, time.perf_counter() - start)


def quick_run_flags(cache_dir: Path) -> list[str]:
    """Pass-through flags that keep a CPU smoke run short and quiet."""
    return [
        "--data_cache_dir",
        str(cache_dir),
        "--print_first_example",
        "False",
        "--dataloader_num_workers",
        "0",
        "--disable_tqdm",
        "True",
        "--seed",
        "3",
    ]


def read_record(folder: Path) -> dict:
    """The training_record.json of a checkpoint folder."""
    return json.loads((folder / "training_record.json").read_text(encoding="utf-8"))


def load_trained_model(method: str, base_model: Path, folder: Path) -> torch.nn.Module:
    """Load a checkpoint folder the way inference does for its method."""
    if method == "ptuning":
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        model = AutoModelForCausalLM.from_pretrained(
            base_model, pre_seq_len=config["pre_seq_len"], prefix_projection=config["prefix_projection"]
        )
        load_prefix_checkpoint(model, folder)
        return model
    if method in ("lora", "qlora"):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), folder)
    return AutoModelForCausalLM.from_pretrained(folder)


def changed_parameters(trained: torch.nn.Module, base: torch.nn.Module) -> list[str]:
    """Names of the base model's parameters whose values differ in the trained model."""
    base_parameters = dict(base.named_parameters())
    return [
        name
        for name, parameter in trained.named_parameters()
        if name in base_parameters
        and not torch.equal(parameter.detach().float(), base_parameters[name].detach().float())
    ]


LOSS_LOGS_BEFORE_SIGNAL = 3


def run_until_logging_then_signal(
    command: list[str], env: dict[str, str], stop_signal: signal.Signals, to_group: bool = True
) -> tuple:
    """Start `command` in its own process group, send `stop_signal` to the group (as Ctrl-C does to a terminal's
    foreground job, and timeout, Slurm and Kubernetes do), or with `to_group=False` to the command's process alone,
    after a few loss logs; returns (exit status, combined output)."""
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env={**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if sum("'loss'" in seen for seen in lines) >= LOSS_LOGS_BEFORE_SIGNAL:
                if to_group:
                    os.killpg(process.pid, stop_signal)
                else:
                    process.send_signal(stop_signal)
                break
        lines += process.stdout.readlines()
        return process.wait(timeout=300), "".join(lines)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stopped_checkpoint_step(output: str, output_dir: Path) -> int:
    """The step of the checkpoint the 'stopped:' line names (checked to be complete)."""
    line = next(line for line in output.splitlines() if line.startswith("stopped: training stopped by"))
    step = int(line.split(" at step ")[1].split(":")[0])
    checkpoint = output_dir / f"checkpoint-{step}"
    assert f"checkpoint saved to {checkpoint}" in line and "--resume_from_checkpoint auto" in line
    assert resume_problem(checkpoint) is None
    assert (output_dir / "loss_curve.png").is_file()
    assert not list(output_dir.glob("tmp-*"))
    return step
