"""Shared pieces of the training tests: tiny data files and the argument list of a short CPU run."""

import json
from pathlib import Path

import torch

PROMPTS = [
    "类型#裙*颜色#红色*风格#简约",
    "类型#裤*颜色#黑色*风格#复古*图案#条纹",
    "Please write a short advertisement for this product.",
    "类型#上衣*颜色#白色",
    "类型#外套*颜色#蓝色*风格#休闲*图案#格子*材质#棉",
    "What is the weather like in Beijing today?",
]
RESPONSES = [
    "这款红色连衣裙采用棉面料，宽松的版型穿着舒适透气。",
    "复古的条纹设计，适合周末逛街。",
    "Our new blue jacket is made of soft cotton.",
    "白色上衣很好地修饰身材。",
    "休闲的格子外套，适合上班通勤。",
    "The temperature in Beijing is 20 degrees.",
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records as JSON lines and return the path."""
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def input_output_records(count: int) -> list[dict]:
    """`count` prompt/response records cycling through the fixed texts."""
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "response": RESPONSES[i % len(RESPONSES)]} for i in range(count)]


def conversation_records() -> list[dict]:
    """Two multi-turn conversations, one with a tool call."""
    return [
        {
            "conversations": [
                {"role": "user", "content": PROMPTS[0]},
                {"role": "assistant", "content": RESPONSES[0]},
                {"role": "user", "content": PROMPTS[2]},
                {"role": "assistant", "content": RESPONSES[2]},
            ]
        },
        {
            "tools": [{"name": "get_weather", "parameters": {"city": "string"}}],
            "conversations": [
                {"role": "user", "content": PROMPTS[5]},
                {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": {"t": 20}},
                {"role": "assistant", "content": RESPONSES[5]},
            ],
        },
    ]


def call(name: str, arguments: dict | None) -> dict:
    """A call as a predictions row holds it."""
    return {"name": name, "arguments": arguments}


def run_arguments(model_dir: Path, train_file: Path, output_dir: Path, cache_dir: Path, **overrides) -> list[str]:
    """Command-line arguments of a short, deterministic fp32 CPU training run; overrides replace or add flags."""
    settings = {
        "model_name_or_path": model_dir,
        "train_file": train_file,
        "output_dir": output_dir,
        "data_cache_dir": cache_dir,
        "do_train": True,
        "use_cpu": True,
        "max_steps": 4,
        "save_steps": 2,
        "logging_steps": 1,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "max_source_length": 48,
        "max_target_length": 48,
        "seed": 7,
        "print_first_example": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    argv = []
    for name, value in settings.items():
        if value is None:
            continue
        argv += [f"--{name}", str(value)]
    return argv


def logged_losses(log_history: list[dict]) -> list[tuple[int, float]]:
    """(step, loss) of every training-loss log entry."""
    return [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]


def read_trainer_state(folder: Path) -> dict:
    """The trainer_state.json of a checkpoint folder."""
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    """A left-padded two-row batch for comparing logits of a trained model and its reloaded checkpoint."""
    rows = [tokenizer.encode(PROMPTS[0] + RESPONSES[0]), tokenizer.encode(PROMPTS[3])]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}
