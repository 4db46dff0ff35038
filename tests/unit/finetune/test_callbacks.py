"""ThroughputCallback and LossCurveCallback, driven by a real (tiny, CPU) Trainer run and real TrainerState objects."""

import time

import pytest
import torch
from PIL import Image
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from finetune import ChatGLMConfig, ChatGLMForConditionalGeneration
from finetune.callbacks import LOSS_CURVE_FILE, LossCurveCallback, ThroughputCallback, write_loss_curve

PAD = 0


def _tiny_model() -> ChatGLMForConditionalGeneration:
    torch.manual_seed(0)
    config = ChatGLMConfig(
        multi_query_attention=True,
        num_layers=1,
        padded_vocab_size=64,
        hidden_size=16,
        ffn_hidden_size=32,
        kv_channels=4,
        num_attention_heads=4,
        multi_query_group_num=2,
        seq_length=32,
    )
    return ChatGLMForConditionalGeneration(config)


def _rows(lengths: list[int], width: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows of the given real lengths."""
    rows = []
    for index, length in enumerate(lengths):
        ids = [3 + (index + position) % 50 for position in range(length)] + [PAD] * (width - length)
        mask = [1] * length + [0] * (width - length)
        labels = ids[:length] + [-100] * (width - length)
        rows.append(
            {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}
        )
    return rows


def _arguments(output_dir, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "per_device_train_batch_size": 2,
        "max_steps": 3,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "save_strategy": "no",
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def test_trainer_run_logs_throughput_and_writes_loss_curve(tmp_path):
    lengths = [5, 9, 3, 12, 7, 4]
    rows = _rows(lengths, width=12)
    trainer = Trainer(
        model=_tiny_model(),
        args=_arguments(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=2),
        train_dataset=rows,
        eval_dataset=rows[:2],
        callbacks=[ThroughputCallback(), LossCurveCallback(tmp_path)],
    )
    trainer.train()

    history = trainer.state.log_history
    training_logs = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in training_logs] == [1, 2, 3]
    for entry in training_logs:
        assert entry["interval_tokens_per_second"] > 0
        assert ("gpu_max_memory_allocated_gib" in entry) == torch.cuda.is_available()
    # 3 steps x 2 rows: all six rows seen once, counted without their padding.
    assert trainer.state.num_input_tokens_seen == sum(lengths)
    assert all("interval_tokens_per_second" not in entry for entry in history if "eval_loss" in entry)

    curve = tmp_path / LOSS_CURVE_FILE
    with Image.open(curve) as image:
        assert image.format == "PNG"
        assert image.size == (800, 500)
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_throughput_callback_requires_token_counting(tmp_path):
    with pytest.raises(ValueError, match="include_num_input_tokens_seen='non_padding'"):
        Trainer(
            model=_tiny_model(),
            args=_arguments(tmp_path, include_num_input_tokens_seen="no"),
            train_dataset=_rows([4, 4], width=4),
            callbacks=[ThroughputCallback()],
        )


def test_throughput_window_uses_tokens_since_previous_log(tmp_path):
    arguments = _arguments(tmp_path)
    state = TrainerState()
    state.num_input_tokens_seen = 1000  # resumed run: tokens of the earlier session do not count
    callback = ThroughputCallback()
    control = TrainerControl()
    callback.on_train_begin(arguments, state, control)
    state.global_step = 10
    state.num_input_tokens_seen = 1600
    state.log_history.append({"loss": 1.0, "step": 10})
    logs = {"loss": 1.0}
    time.sleep(0.05)
    callback.on_log(arguments, state, control, logs=logs)
    assert 0 < logs["interval_tokens_per_second"] <= 600 / 0.05
    assert state.log_history[-1]["interval_tokens_per_second"] == logs["interval_tokens_per_second"]

    eval_logs = {"eval_loss": 2.0}
    callback.on_log(arguments, state, control, logs=eval_logs)
    assert eval_logs == {"eval_loss": 2.0}


def test_loss_curve_only_on_main_process(tmp_path):
    arguments = _arguments(tmp_path)
    state = TrainerState(is_world_process_zero=False)
    state.log_history = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}]
    LossCurveCallback(tmp_path).on_train_end(arguments, state, TrainerControl())
    assert not (tmp_path / LOSS_CURVE_FILE).exists()

    state.is_world_process_zero = True
    LossCurveCallback(tmp_path / "new").on_train_end(arguments, state, TrainerControl())
    assert (tmp_path / "new" / LOSS_CURVE_FILE).stat().st_size > 1000


def test_loss_curve_skipped_without_losses(tmp_path):
    path = tmp_path / LOSS_CURVE_FILE
    assert write_loss_curve([{"train_runtime": 1.0, "step": 2}], path) is False
    assert not path.exists()


def test_loss_curve_plots_eval_loss(tmp_path):
    history = [
        {"loss": 3.0, "step": 1},
        {"loss": 2.0, "step": 2},
        {"eval_loss": 2.5, "step": 2},
        {"train_loss": 2.5, "step": 2},
    ]
    path = tmp_path / LOSS_CURVE_FILE
    assert write_loss_curve(history, path)
    with Image.open(path) as image:
        pixels = image.convert("RGB").getcolors(maxcolors=1 << 20)
    # Two differently coloured lines: matplotlib's default first two colours are both present.
    colors = {color for _count, color in pixels}
    assert (31, 119, 180) in colors and (255, 127, 14) in colors
