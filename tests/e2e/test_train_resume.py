"""Resuming training end to end: the same loss trajectory as an uninterrupted run, atomic checkpoint saves, finished
runs and new schedules (which checkpoint resume picks: tests/unit/finetune/test_resume.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from train_helpers import input_output_records, logged_losses, read_trainer_state, run_arguments, write_jsonl

from finetune.checkpoint_format import resume_problem
from finetune.resume import find_latest_checkpoint, resolve_resume_checkpoint
from finetune.arguments import parse_arguments
from finetune.train import main, run
from finetune.trainer import FinetuneTrainer


class SimulatedCrash(RuntimeError):
    """Raised by a test to stop a training process at a chosen point."""


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """Eight prompt/response records (four batches of two per epoch)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", input_output_records(8))


def crash_when(monkeypatch, method_name: str, global_step: int) -> None:
    """Make FinetuneTrainer.<method_name> raise SimulatedCrash when called at `global_step`."""
    original = getattr(FinetuneTrainer, method_name)

    def crashing(self, *args, **kwargs):
        if self.state.global_step == global_step:
            raise SimulatedCrash(f"simulated crash in {method_name} at step {global_step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FinetuneTrainer, method_name, crashing)


def test_interrupted_and_resumed_run_matches_an_uninterrupted_run(tiny_model_dir, train_file, tmp_path, monkeypatch):
    settings = {"pre_seq_len": 4, "max_steps": 6, "save_steps": 3}
    straight = main(run_arguments(tiny_model_dir, train_file, tmp_path / "a", tmp_path / "cache", **settings))

    with monkeypatch.context() as patch:
        crash_when(patch, "training_step", global_step=3)
        with pytest.raises(SimulatedCrash):
            main(run_arguments(tiny_model_dir, train_file, tmp_path / "b", tmp_path / "cache", **settings))
    assert sorted(path.name for path in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-3"]

    resumed = main(
        run_arguments(
            tiny_model_dir, train_file, tmp_path / "b", tmp_path / "cache", resume_from_checkpoint="auto", **settings
        )
    )
    expected = logged_losses(straight.trainer.state.log_history)
    actual = logged_losses(resumed.trainer.state.log_history)
    assert [step for step, _ in actual] == [1, 2, 3, 4, 5, 6] == [step for step, _ in expected]
    for (_, want), (_, got) in zip(expected, actual):
        assert abs(want - got) < 1e-6, (expected, actual)
    for name, parameter in straight.trainer.model.transformer.prefix_encoder.named_parameters():
        resumed_parameter = dict(resumed.trainer.model.transformer.prefix_encoder.named_parameters())[name]
        assert torch.allclose(parameter, resumed_parameter, atol=1e-6)


@pytest.mark.parametrize(
    ("method_flags", "weights_file"),
    [({"learning_rate": 1e-3}, "model.safetensors"), ({"lora_rank": 4}, "adapter_model.safetensors")],
    ids=["full", "lora"],
)
def test_crash_during_a_save_leaves_only_complete_checkpoints(
    method_flags, weights_file, tiny_model_dir, train_file, tmp_path, monkeypatch
):
    output_dir = tmp_path / "out"
    argv = run_arguments(tiny_model_dir, train_file, output_dir, tmp_path / "cache", max_steps=4, **method_flags)
    with monkeypatch.context() as patch:
        crash_when(patch, "_save_rng_state", global_step=4)
        with pytest.raises(SimulatedCrash):
            main(argv)

    staging = output_dir / "tmp-checkpoint-4"
    assert {weights_file, "optimizer.pt", "training_record.json"} <= {path.name for path in staging.iterdir()}
    assert not (staging / "trainer_state.json").exists()
    assert not (output_dir / "checkpoint-4").exists()
    assert find_latest_checkpoint(output_dir).folder == output_dir / "checkpoint-2"
    assert resolve_resume_checkpoint("auto", output_dir).folder == output_dir / "checkpoint-2"

    resumed = main(argv + ["--resume_from_checkpoint", "auto"])
    assert resumed.trainer.state.global_step == 4
    assert [step for step, _ in logged_losses(resumed.trainer.state.log_history)] == [1, 2, 3, 4]
    assert not staging.exists()
    assert resume_problem(output_dir / "checkpoint-4") is None
    assert read_trainer_state(output_dir / "checkpoint-4")["global_step"] == 4


def test_fresh_run_refuses_an_output_dir_with_checkpoints(finished_run, tiny_model_dir, train_file, tmp_path):
    argv = run_arguments(tiny_model_dir, train_file, finished_run, tmp_path / "cache", pre_seq_len=4)
    with pytest.raises(ValueError, match="already holds checkpoints .*checkpoint-2.*--resume_from_checkpoint auto"):
        main(argv)


def test_resuming_a_finished_run_trains_no_extra_step(finished_run, tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    main(
        run_arguments(
            tiny_model_dir, train_file, output_dir, tmp_path / "cache", pre_seq_len=4, max_steps=2,
            resume_from_checkpoint="auto",
        )
    )
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (output_dir / "model.safetensors").is_file()


def test_resuming_with_a_larger_max_steps_continues_on_the_new_schedule(finished_run, tiny_model_dir, train_file, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    learning_rate = 1e-2  # run_arguments' linear schedule without warm-up: rate(step) = 1e-2 * (1 - step / max_steps)
    resumed = main(
        run_arguments(
            tiny_model_dir, train_file, output_dir, tmp_path / "cache", pre_seq_len=4, max_steps=4,
            resume_from_checkpoint="auto",
        )
    )  # fmt: skip
    rates = {entry["step"]: entry["learning_rate"] for entry in resumed.trainer.state.log_history if "loss" in entry}
    # The old schedule ended at 0 at step 2; the first resumed step (3) uses the new schedule's rate at step 2.
    assert rates[3] == pytest.approx(learning_rate * (1 - 2 / 4))
    assert rates[4] == pytest.approx(learning_rate * (1 - 3 / 4))


class OptimizerRates(TrainerCallback):
    """Records the rate the optimizer holds as each optimizer step begins (the rate that step uses)."""

    def __init__(self) -> None:
        self.rates: dict[int, list[float]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs) -> None:
        self.rates[state.global_step + 1] = [group["lr"] for group in optimizer.param_groups]


def test_a_learning_rate_changed_on_resume_is_the_one_used_logged_and_recorded(
    finished_run, tiny_model_dir, train_file, tmp_path
):
    output_dir = tmp_path / "out"
    shutil.copytree(finished_run, output_dir)
    new_rate = 5e-2  # finished_run trained with 1e-2 for 2 steps; the new linear schedule runs to step 4
    argv = run_arguments(
        tiny_model_dir, train_file, output_dir, tmp_path / "cache", pre_seq_len=4, max_steps=4,
        learning_rate=new_rate, resume_from_checkpoint="auto",
    )  # fmt: skip
    used = OptimizerRates()
    trainer = run(*parse_arguments(argv), extra_callbacks=(used,)).trainer
    expected = {3: new_rate * (1 - 2 / 4), 4: new_rate * (1 - 3 / 4)}
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "loss" in entry}
    for step, rate in expected.items():
        assert used.rates[step] == [pytest.approx(rate)] * len(trainer.optimizer.param_groups)
        assert logged[step] == pytest.approx(rate)
    record = json.loads((output_dir / "checkpoint-4" / "training_record.json").read_text(encoding="utf-8"))
    assert record["training_args"]["learning_rate"] == new_rate
