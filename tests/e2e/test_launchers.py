"""The P-Tuning v2 and LoRA launchers run end to end on CPU with the tiny model (the DeepSpeed launchers are run by
tests/e2e/test_deepspeed.py), and their knob checks fail with clear messages."""

import json
import os
import re
from pathlib import Path

import pytest
from launcher_helpers import (
    CONVERSATION_RECORDS,
    INPUT_OUTPUT_RECORDS,
    load_trained_model,
    quick_run_flags,
    read_record,
    run_launcher,
    write_jsonl,
)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """Input-output and multi-turn training files of eight records each."""
    folder = tmp_path_factory.mktemp("data")
    return {
        "input_output": write_jsonl(folder / "advertise_gen.jsonl", INPUT_OUTPUT_RECORDS),
        "conversations": write_jsonl(folder / "tool_alpaca.jsonl", CONVERSATION_RECORDS, repeat=4),
    }


def _knobs(tiny_model_dir: Path, dataset: Path, output_dir: Path, **overrides: str) -> dict[str, str]:
    knobs = {
        "BASE_MODEL_PATH": str(tiny_model_dir),
        "DATASET_PATH": str(dataset),
        "OUTPUT_DIR": str(output_dir),
        "MAX_STEP": "2",
        "SAVE_INTERVAL": "2",
        "DEV_BATCH_SIZE": "2",
        "GRAD_ACCUMULATION_STEPS": "1",
        "MAX_SOURCE_LEN": "32",
        "MAX_TARGET_LEN": "16",
        "MAX_SEQ_LEN": "64",
    }
    knobs.update(overrides)
    return knobs


def _check_run(script: str, output_dir: Path, method: str, step: int, tiny_model_dir: Path) -> dict:
    """Check what a launcher run leaves in OUTPUT_DIR: checkpoint-<step> that loads, the final save, log and plot;
    returns the checkpoint's training record."""
    checkpoint = output_dir / f"checkpoint-{step}"
    record = read_record(checkpoint)
    assert record["method"] == method
    assert record["global_step"] == step
    assert Path(record["base_model"]).resolve() == tiny_model_dir.resolve()
    assert record["training_args"]["use_cpu"] is True and record["training_args"]["bf16"] is False
    load_trained_model(method, tiny_model_dir, checkpoint)
    assert read_record(output_dir)["global_step"] == step  # the final save in OUTPUT_DIR
    log = (output_dir / "train.log").read_text(encoding="utf-8")
    assert f"{script} on" in log and f"--max_steps {step}" in log
    assert "train_loss" in log and "tokens_per_second" in log
    assert (output_dir / "loss_curve.png").is_file()
    return record


CASES = {
    "finetune_pt_multiturn.sh": ("conversations", "ptuning", {"PRE_SEQ_LEN": "4", "LR": "1e-2", "MAX_SEQ_LEN": "256"}),
    "finetune_lora.sh": (
        "input_output", "lora", {"LORA_RANK": "4", "LORA_TARGET": "query_key_value,dense", "PACKING": "0"}
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(CASES))
def test_launcher_trains_and_leaves_a_loadable_checkpoint(script, tiny_model_dir, data_files, tmp_path):
    data_format, method, overrides = CASES[script]
    output_dir = tmp_path / "run"
    knobs = _knobs(tiny_model_dir, data_files[data_format], output_dir, **overrides)
    run = run_launcher(script, knobs, *quick_run_flags(tmp_path / "cache"))
    print(f"{script}: {run.seconds:.1f} s")
    assert run.returncode == 0, run.output[-6000:]
    assert "No CUDA device: training on CPU" in run.output
    packed = re.search(r"packed (\d+) examples into (\d+) rows", run.output)
    if overrides.get("PACKING") == "0":
        assert packed is None and "--packing false" in run.output
    else:  # packing is the launchers' default
        assert packed and int(packed.group(1)) > int(packed.group(2)) > 0, run.output[-3000:]
    record = _check_run(script, output_dir, method, 2, tiny_model_dir)
    assert record["training_args"]["per_device_train_batch_size"] == 2
    assert record["training_args"]["gradient_accumulation_steps"] == 1
    if method == "ptuning":
        assert record["ptuning"]["pre_seq_len"] == 4
    else:
        assert record["lora"]["rank"] == 4
        assert sorted(record["lora"]["target_modules"]) == ["dense", "query_key_value"]


@pytest.mark.slow
def test_finetune_pt_trains_then_autoresumes(tiny_model_dir, data_files, tmp_path):
    """finetune_pt.sh with the official misspelled GRAD_ACCUMULARION_STEPS, then AUTORESUME_FROM_CHECKPOINT."""
    output_dir = tmp_path / "resumable"
    knobs = _knobs(
        tiny_model_dir,
        data_files["input_output"],
        output_dir,
        PRE_SEQ_LEN="4",
        GRAD_ACCUMULATION_STEPS="",
        GRAD_ACCUMULARION_STEPS="2",
        DEV_BATCH_SIZE="1",
    )
    first = run_launcher("finetune_pt.sh", knobs, *quick_run_flags(tmp_path / "cache"))
    print(f"finetune_pt.sh: {first.seconds:.1f} s")
    assert first.returncode == 0, first.output[-6000:]
    record = _check_run("finetune_pt.sh", output_dir, "ptuning", 2, tiny_model_dir)
    assert record["ptuning"]["pre_seq_len"] == 4
    assert record["training_args"]["gradient_accumulation_steps"] == 2
    assert record["training_args"]["per_device_train_batch_size"] == 1

    knobs.update(MAX_STEP="3", SAVE_INTERVAL="1", AUTORESUME_FROM_CHECKPOINT="true")
    second = run_launcher("finetune_pt.sh", knobs, *quick_run_flags(tmp_path / "cache"))
    print(f"finetune_pt.sh resumed: {second.seconds:.1f} s")
    assert second.returncode == 0, second.output[-6000:]
    assert "--resume_from_checkpoint auto" in second.output
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text(encoding="utf-8"))
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # steps 1-2 kept
    log = (output_dir / "train.log").read_text(encoding="utf-8")
    assert log.count("===== ") == 2  # both runs appended to the same log


def test_missing_base_model_names_the_knob(tmp_path):
    knobs = {"BASE_MODEL_PATH": str(tmp_path / "absent"), "DATASET_PATH": str(tmp_path / "data.jsonl")}
    run = run_launcher("finetune_lora.sh", knobs)
    assert run.returncode == 2
    assert f"no model at BASE_MODEL_PATH={tmp_path / 'absent'}" in run.output
    assert "python -m finetune.tiny_model" in run.output


def test_unset_base_model_is_refused_with_how_to_set_it(tmp_path):
    run = run_launcher("finetune_pt.sh", {"DATASET_PATH": str(tmp_path / "data.jsonl")})
    assert run.returncode == 2
    assert "error: BASE_MODEL_PATH is not set: set it to your ChatGLM3 model folder" in run.output


def test_misspelled_knob_and_too_many_cpu_processes_are_warned_about(tmp_path):
    cores = os.cpu_count() or 1
    run = run_launcher("finetune_lora.sh", {"MAX_STEPS": "2", "LORA_RANKS": "4", "NUM_GPUS": str(cores + 1)})
    assert "warning: MAX_STEPS is not a launcher knob and is ignored; did you mean MAX_STEP?" in run.output
    assert "warning: LORA_RANKS is not a launcher knob and is ignored; did you mean LORA_RANK?" in run.output
    assert f"warning: NUM_GPUS={cores + 1} but there is no CUDA device" in run.output
    assert run.returncode == 2 and "BASE_MODEL_PATH is not set" in run.output


@pytest.mark.slow
def test_a_data_error_ends_a_launcher_run_with_one_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "hi"}\n', encoding="utf-8")
    output_dir = tmp_path / "run"
    run = run_launcher("finetune_pt.sh", _knobs(tiny_model_dir, data, output_dir), *quick_run_flags(tmp_path / "c"))
    assert run.returncode == 2
    lines = run.output.strip().splitlines()
    assert lines[-2] == f"training exited with status 2; full log: {output_dir / 'train.log'}"
    assert lines[-1] == f"error: a problem in the data: {data}:2 field 'response': is missing"
    assert "Traceback" not in run.output and "torch.distributed.run" not in run.output  # one process: no torchrun
    assert "effective settings:\n  method ptuning, model " in run.output
    assert "batch 2 per device x 1 accumulation x 1 process(es) = 2 rows per optimizer step (packed rows)" in run.output


def test_missing_dataset_and_bad_knobs(tmp_path):
    model_folder = tmp_path / "model"  # the launcher only checks that config.json is there
    model_folder.mkdir()
    (model_folder / "config.json").write_text("{}")
    missing = run_launcher(
        "finetune_pt_multiturn.sh",
        {"BASE_MODEL_PATH": str(model_folder), "DATASET_PATH": str(tmp_path / "none.jsonl")},
    )
    assert missing.returncode == 2 and f"no training data at DATASET_PATH={tmp_path / 'none.jsonl'}" in missing.output

    data = write_jsonl(tmp_path / "d.jsonl", INPUT_OUTPUT_RECORDS)
    common = {"BASE_MODEL_PATH": str(model_folder), "DATASET_PATH": str(data)}
    disagree = run_launcher(
        "finetune_pt.sh", {**common, "GRAD_ACCUMULARION_STEPS": "2", "GRAD_ACCUMULATION_STEPS": "4"}
    )
    assert disagree.returncode == 2 and "disagree" in disagree.output
    bad_batch = run_launcher("finetune_pt.sh", {**common, "DEV_BATCH_SIZE": "two"})
    assert bad_batch.returncode == 2 and "DEV_BATCH_SIZE must be a positive integer, got 'two'" in bad_batch.output
    bad_flag = run_launcher("finetune_pt.sh", {**common, "AUTORESUME_FROM_CHECKPOINT": "maybe"})
    assert bad_flag.returncode == 2 and "AUTORESUME_FROM_CHECKPOINT must be 1/true/yes" in bad_flag.output
    bad_ds = run_launcher("finetune_ds.sh", {**common, "DS_CONFIG": str(tmp_path / "zero9.json")})
    assert bad_ds.returncode == 2 and "no DeepSpeed config at DS_CONFIG=" in bad_ds.output


def test_other_tools_names_for_knobs_and_a_bad_lr_are_one_line_each(tmp_path):
    names = {
        "LEARNING_RATE": "LR", "SAVE_STEPS": "SAVE_INTERVAL", "AUTO_RESUME": "AUTORESUME_FROM_CHECKPOINT",
        "OUTPUT_PATH": "OUTPUT_DIR", "DATASET": "DATASET_PATH",
    }  # fmt: skip
    run = run_launcher("finetune_lora.sh", {**dict.fromkeys(names, "1"), "BATCH_SIZE": "4", "LR": "abc"})
    for name, knob in names.items():
        assert f"warning: {name} is not a launcher knob and is ignored; did you mean {knob}?" in run.output
    assert "warning: BATCH_SIZE is not read by this launcher and is ignored; did you mean DEV_BATCH_SIZE?" in run.output
    assert run.returncode == 2
    assert run.output.strip().splitlines()[-1] == "error: LR must be a number such as 2e-4, got 'abc'"
    assert len(run.output.strip().splitlines()) == len(names) + 2
