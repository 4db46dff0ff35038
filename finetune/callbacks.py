"""Trainer callbacks: throughput and GPU memory in the training logs, a loss-curve plot at the end of training,
stopping cleanly (checkpoint saved) on SIGINT/SIGTERM, and the learning rate of a resumed run."""

import logging
import os
import signal
import threading
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
INTERVAL_THROUGHPUT_KEY = "interval_tokens_per_second"


class ThroughputCallback(TrainerCallback):
    """Adds `interval_tokens_per_second` (non-padding input tokens per second since the previous log, all processes;
    transformers' own `train_tokens_per_second` is the average since training started) and
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
        if state.is_world_process_zero:
            logger.info(
                "throughput in the training logs: %s = non-padding tokens per second since the previous log line (all "
                "processes); train_tokens_per_second = the average since training started",
                INTERVAL_THROUGHPUT_KEY,
            )
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
            added[INTERVAL_THROUGHPUT_KEY] = round((tokens - self._last_tokens) / elapsed, 2)
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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A signal repeated within this many seconds counts as the same request: Ctrl-C reaches torchrun and its workers
# both, and torchrun then forwards it to the workers once more.
REPEAT_WINDOW_S = 2.0


class StopOnSignalCallback(TrainerCallback):
    """Turns the first SIGINT/SIGTERM into "finish this optimizer step, save a checkpoint, stop"; a second signal
    (more than REPEAT_WINDOW_S later) ends the process at once with the usual 128 + signal number.

    With several processes the request is shared (all-reduced) at every step end, so all ranks stop at the same step
    and write the checkpoint together. `install()` sets the handlers, `uninstall()` restores the previous ones.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._received_at = 0.0
        self._previous: dict[signal.Signals, object] = {}

    @property
    def stopped(self) -> bool:
        """True when training stopped because of a signal."""
        return self.received is not None

    @property
    def exit_code(self) -> int:
        """The exit status of a process ended by the received signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + int(self.received or 0)

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in this process; does nothing outside the main thread (Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for stop_signal in STOP_SIGNALS:
            self._previous[stop_signal] = signal.signal(stop_signal, self._handle)

    def uninstall(self) -> None:
        """Restore the handlers that were in place before `install()`."""
        for stop_signal, handler in self._previous.items():
            signal.signal(stop_signal, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        """Record the first signal; on a later one, exit at once."""
        now = time.monotonic()
        if self.received is None:
            self.received = signal.Signals(signum)
            self._received_at = now
            logger.warning(
                "%s received: finishing the current optimizer step, then saving a checkpoint (send it again to quit "
                "at once, without saving)",
                self.received.name,
            )
            return
        if now - self._received_at < REPEAT_WINDOW_S:
            return
        logger.warning("%s received again: quitting without saving", signal.Signals(signum).name)
        os._exit(128 + signum)

    def _any_rank_received(self, args: TrainingArguments) -> bool:
        """True when this or any other process has received a stop signal."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.received is not None
        flag = torch.tensor([int(self.received or 0)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = signal.Signals(int(flag.item()))
        return bool(flag.item())

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """After a requested stop: save a checkpoint at this step and end training."""
        if self._any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True


class ResumedScheduleCallback(TrainerCallback):
    """On a resumed run, set the learning rate of the resumed step from this run's schedule: the saved scheduler
    holds the peak rate and the rate the checkpoint's own schedule reached (0 at its last step when the run was
    planned with a smaller --max_steps), which the resumed steps would otherwise use. A --learning_rate changed on
    resume becomes the schedule's peak rate, as a changed --max_steps its length. Trainer calls on_train_begin once
    the checkpoint's optimizer and scheduler state are loaded."""

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Recompute the resumed step's rate (a run that starts at step 0 is left alone)."""
        scheduler, optimizer = kwargs.get("lr_scheduler"), kwargs.get("optimizer")
        if state.global_step == 0 or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        saved_rate = scheduler.get_last_lr()[0]
        saved_peaks = list(scheduler.base_lrs)
        one_peak = bool(saved_peaks) and all(peak == saved_peaks[0] for peak in saved_peaks)
        if one_peak and saved_peaks[0] != args.learning_rate:
            logger.info(
                "learning rate changed on resume: peak %.3g instead of the checkpoint's %.3g",
                args.learning_rate,
                saved_peaks[0],
            )
            scheduler.base_lrs = [args.learning_rate] * len(saved_peaks)
            for group in optimizer.param_groups:
                group["initial_lr"] = args.learning_rate
        # step() advances last_epoch and recomputes every group's rate from the schedule: step back first.
        scheduler.last_epoch -= 1
        scheduler.step()
        resumed_rate = scheduler.get_last_lr()[0]
        if resumed_rate != saved_rate:
            logger.info(
                "resumed learning rate at step %d: %.3g from this run's schedule (max_steps=%d) instead of the saved "
                "%.3g",
                scheduler.last_epoch,
                resumed_rate,
                args.max_steps,
                saved_rate,
            )
