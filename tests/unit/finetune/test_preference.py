"""Preference tuning end to end on the tiny model (finetune/preference.py): on a pairwise set whose chosen and
rejected replies differ learnably, held-out preference accuracy rises from 0.5 (the untrained model) to at least 0.9
and the reward margin grows, for LoRA and P-Tuning v2 with DPO, for LoRA with the reference-free SimPO, and for
freeze tuning with reference log-probabilities cached before training; checkpoints are ordinary checkpoints of their
method with the preference stage recorded; a run can start from a whole-model SFT checkpoint."""

import json
from pathlib import Path

import pytest
from preference_helpers import held_out_pairs, preference_arguments, training_pairs
from train_helpers import write_jsonl

from finetune.callbacks import LOSS_CURVE_FILE
from finetune.checkpoints import load_for_inference
from finetune.evaluate import main as evaluate_main
from finetune.methods import method_named
from finetune.preference import main as preference_main

pytestmark = pytest.mark.slow

CASES = {
    "lora-dpo": ({}, "lora", "the same model with the LoRA adapter disabled"),
    "ptuning-dpo": ({"lora_rank": None, "pre_seq_len": 4, "learning_rate": 5e-2}, "ptuning", "prefix disabled"),
    "lora-simpo": ({"pref_loss": "simpo", "pref_beta": 2.0}, "lora", "none (simpo is reference-free)"),
    "freeze-dpo": ({"lora_rank": None, "trainable_layers": 1, "learning_rate": 1e-3}, "freeze", "cached with the data"),
}


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    """Training pairs and held-out pairs (prompts the training pairs do not have)."""
    root = tmp_path_factory.mktemp("pairs")
    return write_jsonl(root / "train.jsonl", training_pairs(8)), write_jsonl(root / "held_out.jsonl", held_out_pairs())


def evaluate_pairs(model: Path, data: Path, output_dir: Path) -> dict:
    """metrics.json of `python -m finetune.evaluate --model MODEL --data PAIRS` on the CPU."""
    assert evaluate_main(["--model", str(model), "--data", str(data), "--output_dir", str(output_dir),
                          "--device", "cpu"]) == 0  # fmt: skip
    return json.loads((output_dir / "metrics.json").read_text(encoding="utf-8"))


def test_untrained_model_scores_one_half(tiny_model_dir, pair_files, tmp_path, capsys):
    metrics = evaluate_pairs(tiny_model_dir, pair_files[1], tmp_path / "eval")
    assert metrics["preference_accuracy"] == 0.5 and metrics["reward_margin"] == 0.0 and metrics["pairs"] == 8
    assert metrics["chosen_logps"] < 0 and metrics["rejected_logps"] < 0
    assert "preference_accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(CASES))
def test_preference_tuning_learns_held_out_pairs(case, tiny_model_dir, pair_files, tmp_path):
    overrides, method, reference = CASES[case]
    output_dir = tmp_path / "run"
    arguments = preference_arguments(tiny_model_dir, pair_files[0], output_dir, tmp_path / "cache", **overrides)
    run = preference_main(arguments)
    logs = [entry for entry in run.trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 and all("rewards/chosen" in entry and "rewards/rejected" in entry for entry in logs)
    margins = [entry["rewards/margins"] for entry in logs]
    assert sum(margins[-2:]) > sum(margins[:2]), margins
    assert logs[-1]["rewards/accuracies"] == 1.0
    assert (output_dir / LOSS_CURVE_FILE).is_file()

    metrics = evaluate_pairs(output_dir, pair_files[1], tmp_path / "eval")
    assert metrics["preference_accuracy"] >= 0.9, metrics
    assert metrics["reward_margin"] > 0.01, metrics

    record = json.loads((output_dir / "training_record.json").read_text(encoding="utf-8"))
    assert record["method"] == method and record["stage"] == "preference"
    assert record["preference"]["loss"] == overrides.get("pref_loss", "dpo")
    assert record["preference"]["beta"] == overrides.get("pref_beta", 0.1)
    assert reference in record["preference"]["reference"]
    model, _tokenizer, kind = load_for_inference(output_dir / "checkpoint-6", device="cpu")
    assert kind == method_named(method).checkpoint_kind
    assert model.generate(**_tokenizer("类型#裙", return_tensors="pt"), max_new_tokens=2).shape[1] > 0


def test_a_run_starts_from_an_sft_checkpoint_which_is_its_reference(tiny_model_dir, pair_files, tmp_path):
    # A whole model (freeze tuning's output) becomes the run's base.
    sft = tmp_path / "sft"
    preference_main(preference_arguments(tiny_model_dir, pair_files[0], sft, tmp_path / "cache", lora_rank=None,
                                         trainable_layers=1, max_steps=1, save_steps=1))  # fmt: skip
    output_dir = tmp_path / "run"
    preference_main(preference_arguments(tiny_model_dir, pair_files[0], output_dir, tmp_path / "cache",
                                         init_checkpoint=sft, max_steps=2, save_steps=2))  # fmt: skip
    record = json.loads((output_dir / "training_record.json").read_text(encoding="utf-8"))
    assert record["base_model"] == str(sft.resolve()) and record["preference"]["init_checkpoint"] == str(sft)
    assert record["preference"]["reference"].startswith(str(sft.resolve()))
    # A LoRA checkpoint keeps its base; its adapter trains on, and the reference is that checkpoint (cached): the
    # first step's policy equals it, so the loss is log 2 with zero rewards (adapter-disabled would differ).
    again = tmp_path / "again"
    run = preference_main(preference_arguments(tiny_model_dir, pair_files[0], again, tmp_path / "cache",
                                               init_checkpoint=output_dir, max_steps=2, save_steps=2))  # fmt: skip
    first = next(entry for entry in run.trainer.state.log_history if "loss" in entry)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    record = json.loads((again / "training_record.json").read_text(encoding="utf-8"))
    assert record["base_model"] == str(sft.resolve()) and record["method"] == "lora"
    assert "log-probabilities of this SFT checkpoint" in record["preference"]["reference"]
    metrics = evaluate_pairs(again, pair_files[1], tmp_path / "eval")
    assert 0 <= metrics["preference_accuracy"] <= 1 and metrics["pairs"] == 8
    with pytest.raises(ValueError, match="can start a lora preference run only .this run is ptuning."):
        preference_main(preference_arguments(tiny_model_dir, pair_files[0], tmp_path / "other", tmp_path / "cache",
                                             init_checkpoint=output_dir, lora_rank=None, pre_seq_len=4))  # fmt: skip


def test_known_errors_end_a_preference_run_with_one_line(tiny_model_dir, pair_files, tmp_path):
    import subprocess
    import sys

    from launcher_helpers import REPO_ROOT

    completed = subprocess.run(
        [sys.executable, "-m", "finetune.preference", "--model_name_or_path", str(tiny_model_dir), "--train_file",
         str(pair_files[0]), "--output_dir", str(tmp_path / "out"), "--use_cpu", "--lora_rank", "4", "--pref_loss",
         "ipo"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.strip().splitlines()[-1] == "error: --pref_loss must be one of dpo, simpo, got 'ipo'"
    assert "Traceback" not in completed.stderr
    with pytest.raises(ValueError, match="--packing does not apply to preference pairs"):
        preference_main(preference_arguments(tiny_model_dir, pair_files[0], tmp_path / "out", tmp_path / "cache",
                                             packing=True))  # fmt: skip


def test_ctrl_c_saves_an_ordinary_checkpoint_of_a_preference_run(tiny_model_dir, pair_files, tmp_path):
    import os
    import signal
    import sys

    from launcher_helpers import LAUNCHER_KNOBS, run_until_logging_then_signal, stopped_checkpoint_step

    output_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    arguments = preference_arguments(
        tiny_model_dir, pair_files[0], output_dir, tmp_path / "cache", max_steps=100000, save_steps=100000
    )
    command = [sys.executable, "-m", "finetune.preference", *arguments]
    status, output = run_until_logging_then_signal(command, env, signal.SIGINT)
    assert status == 128 + signal.SIGINT, output[-3000:]
    step = stopped_checkpoint_step(output, output_dir)
    record = json.loads((output_dir / f"checkpoint-{step}" / "training_record.json").read_text(encoding="utf-8"))
    assert record["stage"] == "preference" and record["global_step"] == step


def test_launcher_refuses_an_unknown_method(tiny_model_dir, pair_files, tmp_path):
    from launcher_helpers import run_launcher

    knobs = {"BASE_MODEL_PATH": str(tiny_model_dir), "DATASET_PATH": str(pair_files[0]),
             "OUTPUT_DIR": str(tmp_path / "out")}  # fmt: skip
    unknown = run_launcher("finetune_dpo.sh", {**knobs, "METHOD": "rlhf"})
    assert unknown.returncode == 2
    assert "error: METHOD must be one of lora, qlora, ptuning, freeze or full, got 'rlhf'" in unknown.output
