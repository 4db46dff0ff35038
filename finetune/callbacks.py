"""Trainer callbacks: throughput and GPU memory in the training logs, and a loss-curve plot at the end of training."""

import logging
import os
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune.atomic_files import atomic_path

logger = logging.getLogger(__name__)

GIB = 1024**3
LOSS_CURVE_FILE = "loss_curve.png"


class ThroughputCallback(TrainerCallback):
    """Adds `tokens_per_second` (non-padding input tokens since the previous log, all processes) and
    `gpu_max_memory_allocated_gib` (peak allocated CUDA memory on this process, when CUDA is available) to each
    training log.

    The token count is the Trainer's own `state.num_input_tokens_seen`, so the Trainer must be built with
    `TrainingArguments(include_num_input_tokens_seen="non_padding")`. The values go into the `logs` dict handed to
    the callbacks that run after this one (progress bar / printer) and into the matching `state.log_history` entry
    (trainer_state.json); reporting integrations registered before this callback do not see them.
    """

    def __init__(self) -> None:
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Fail early when the Trainer does not count input tokens."""
        if args.include_num_input_tokens_seen == "no":
            raise ValueError(
                "ThroughputCallback needs the Trainer to count input tokens: create the TrainingArguments with "
                "include_num_input_tokens_seen='non_padding'"
            )

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Start the first measuring window (also after resuming, where the token count does not start at 0)."""
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        """Add throughput since the previous training log and the CUDA memory peak to a training-loss log."""
        if logs is None or "loss" not in logs or self._last_time is None:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        added: dict[str, float] = {}
        elapsed = now - self._last_time
        if elapsed > 0:
            added["tokens_per_second"] = round((tokens - self._last_tokens) / elapsed, 2)
        if torch.cuda.is_available():
            added["gpu_max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        self._last_time = now
        self._last_tokens = tokens
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)


def _loss_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in the Trainer's log history."""
    entries = [entry for entry in log_history if key in entry and "step" in entry]
    return [entry["step"] for entry in entries], [float(entry[key]) for entry in entries]


def write_loss_curve(log_history: list[dict], path: Path) -> bool:
    """Plot training loss (and eval loss when logged) against the step into the PNG `path`, atomically.

    Returns False, writing nothing, when the history holds no loss at all.
    """
    train_steps, train_losses = _loss_series(log_history, "loss")
    eval_steps, eval_losses = _loss_series(log_history, "eval_loss")
    if not train_steps and not eval_steps:
        return False
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if train_steps:
        axes.plot(train_steps, train_losses, label="training loss", marker="." if len(train_steps) < 50 else None)
    if eval_steps:
        axes.plot(eval_steps, eval_losses, label="eval loss", marker="o")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as temp_name:
        figure.savefig(temp_name, format="png")
    return True


class LossCurveCallback(TrainerCallback):
    """At the end of training, writes `loss_curve.png` (training loss and eval loss vs step) into `output_dir`,
    on the main process only."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Write the plot from the Trainer's log history."""
        if not state.is_world_process_zero:
            return
        path = self.output_dir / LOSS_CURVE_FILE
        if write_loss_curve(state.log_history, path):
            logger.info("Wrote the loss curve to %s", path)
        else:
            logger.warning(
                "No loss was logged during training (logging_steps=%s, %s steps), so %s was not written",
                args.logging_steps,
                state.global_step,
                path,
            )
