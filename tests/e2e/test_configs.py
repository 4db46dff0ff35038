"""configs/*.yaml are the recipes: each parses with the training entry point's parser, and each launcher runs its
recipe, its knobs' defaults read from it and a knob set in the environment on top (checked on the command a launcher
really builds, `--dry-run`)."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from launcher_helpers import LAUNCHER_KNOBS

from finetune.arguments import parse_arguments, read_config_file
from finetune.preference import parse_preference_arguments

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
# launcher -> (its recipe, the method the recipe selects, {knob set by the test: (argument, value it must become)})
LAUNCHERS = {
    "finetune_pt.sh": ("ptuning_v2.yaml", "ptuning", {"PRE_SEQ_LEN": ("pre_seq_len", 4),
                                                      "PACKING": ("packing", False)}),
    "finetune_pt_multiturn.sh": ("ptuning_v2_multiturn.yaml", "ptuning", {"MAX_SEQ_LEN": ("max_seq_length", 256)}),
    "finetune_lora.sh": ("lora.yaml", "lora", {"LORA_RANK": ("lora_rank", 4), "LR": ("learning_rate", 3e-3)}),
    "finetune_ds.sh": ("sft.yaml", "full", {"MAX_STEP": ("max_steps", 7), "GRAD_ACCUMULARION_STEPS": (
        "gradient_accumulation_steps", 3)}),
    "finetune_ds_multiturn.sh": ("sft_multiturn.yaml", "full", {"SAVE_INTERVAL": ("save_steps", 9)}),
    "finetune_dpo.sh": ("dpo.yaml", "lora", {"PREF_BETA": ("pref_beta", 0.5)}),
}  # fmt: skip
# Arguments every launcher sets from its own knobs whatever the recipe says (the test sets those knobs), and the
# precision it picks for the machine (no CUDA here: fp32 on the CPU).
LAUNCHER_OWNED = {"train_file", "output_dir", "bf16"}
ENTRY_MODULES = ("finetune.train", "finetune.preference")
# The dry runs made at once: each launcher with its test knobs, and the DPO launcher with a method other than its
# recipe's LoRA.
DRY_RUNS = {
    **{launcher: (launcher, {knob: "0" if value is False else str(value) for knob, (_, value) in knobs.items()})
       for launcher, (_, _, knobs) in LAUNCHERS.items()},
    "finetune_dpo.sh-ptuning": ("finetune_dpo.sh", {"METHOD": "ptuning"}),
}  # fmt: skip


def _parse(config: Path | str, argv: list[str] | None = None) -> dict:
    """Every argument a config (then `argv`) resolves to, as one name -> value mapping."""
    argv = [str(config), *(argv or [])]
    if not torch.cuda.is_available() and "--use_cpu" not in argv:  # transformers refuses bf16 without a GPU
        argv += ["--use_cpu", "true"]
    parser = parse_preference_arguments if Path(config).name.startswith(("dpo", "recipe")) else parse_arguments
    values = {}
    for arguments in parser(argv):
        values.update(arguments.to_dict() if hasattr(arguments, "to_dict") else vars(arguments))
    return values


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_config_parses_with_its_entry_point(launcher, monkeypatch, tmp_path):
    monkeypatch.setenv("BASE_MODEL_PATH", str(tmp_path / "chatglm3-6b"))
    name, method, _ = LAUNCHERS[launcher]
    values = _parse(CONFIGS / name)
    assert values["method"] == method
    assert values["model_name_or_path"] == str(tmp_path / "chatglm3-6b")
    assert "\nbf16: true\n" in (CONFIGS / name).read_text(encoding="utf-8")  # as the launchers on a bf16 GPU
    for key, value in read_config_file(CONFIGS / name).items():
        assert values[key] == value, f"{name}: {key}"


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """The `--dry-run` command of every case of DRY_RUNS (all started at once): the recipe path and the arguments
    after it."""
    folder = tmp_path_factory.mktemp("dry_run")
    (folder / "model").mkdir()
    (folder / "model" / "config.json").write_text("{}")  # the launchers only check that config.json is there
    (folder / "data.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCHER_KNOBS}
    environment.update(CUDA_VISIBLE_DEVICES="", BASE_MODEL_PATH=str(folder / "model"), REPORT_TO="none")
    processes = {}
    for case, (launcher, knobs) in DRY_RUNS.items():
        env = dict(environment, DATASET_PATH=str(folder / "data.jsonl"), OUTPUT_DIR=str(folder / case), **knobs)
        processes[case] = subprocess.Popen(
            ["bash", str(REPO_ROOT / "scripts" / launcher), "--dry-run"], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    commands = {}
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{case}: {stderr}"
        words = shlex.split(stdout.strip().splitlines()[-1])
        start = next(index for index, word in enumerate(words) if word in ENTRY_MODULES) + 1
        commands[case] = (Path(words[start]), words[start + 1 :])
    return commands


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launcher_runs_its_recipe_with_the_knobs_set_on_top(launcher, dry_runs, monkeypatch):
    name, method, knobs = LAUNCHERS[launcher]
    monkeypatch.delenv("BASE_MODEL_PATH", raising=False)
    recipe, argv = dry_runs[launcher]
    assert recipe == CONFIGS / name
    resolved = _parse(recipe, argv)
    overridden = {argument: value for argument, value in knobs.values()}
    assert resolved["method"] == method
    for key, value in read_config_file(recipe).items():
        if key in LAUNCHER_OWNED or key in overridden:
            continue
        if key == "deepspeed":  # the launcher passes DS_CONFIG's default as a path from the repository root
            assert Path(resolved[key]) == REPO_ROOT / value
        else:
            assert resolved[key] == value, f"{launcher}: {key} is {resolved[key]!r}, the recipe says {value!r}"
    for argument, value in overridden.items():
        assert resolved[argument] == value, f"{launcher}: the knob for {argument} was not applied"
    assert resolved["use_cpu"] is True and resolved["bf16"] is False


def test_dpo_launcher_drops_the_lora_rank_of_its_recipe_for_other_methods(dry_runs, monkeypatch):
    monkeypatch.delenv("BASE_MODEL_PATH", raising=False)
    recipe, argv = dry_runs["finetune_dpo.sh-ptuning"]
    assert recipe.name == "recipe.yaml" and recipe.parent.name == "finetune_dpo.sh-ptuning"  # in OUTPUT_DIR
    resolved = _parse(recipe, argv)
    assert resolved["method"] == "ptuning" and resolved["lora_rank"] is None
    assert resolved["pre_seq_len"] == read_config_file(CONFIGS / "ptuning_v2.yaml")["pre_seq_len"]
    assert resolved["pref_loss"] == read_config_file(CONFIGS / "dpo.yaml")["pref_loss"]
