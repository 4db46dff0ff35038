"""configs/*.yaml parse with the training entry point's parser and match the defaults of the launcher they mirror."""

import re
from pathlib import Path

import pytest
import torch

from finetune.arguments import parse_arguments

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"
# config file -> (launcher, method, {argument name: launcher knob whose default it must equal})
CONFIGS = {
    "ptuning_v2.yaml": ("finetune_pt.sh", "ptuning", {"pre_seq_len": "PRE_SEQ_LEN"}),
    "lora.yaml": ("finetune_lora.sh", "lora", {"lora_rank": "LORA_RANK"}),
    "sft.yaml": ("finetune_ds.sh", "full", {}),
}
COMMON_KNOBS = {
    "learning_rate": "LR",
    "max_source_length": "MAX_SOURCE_LEN",
    "max_target_length": "MAX_TARGET_LEN",
    "per_device_train_batch_size": "DEV_BATCH_SIZE",
    "max_steps": "MAX_STEP",
    "save_steps": "SAVE_INTERVAL",
}


def launcher_defaults(script: str) -> dict[str, str]:
    """Every `KNOB="${KNOB:-default}"` default of a launcher and of scripts/_common.sh."""
    text = (SCRIPTS / script).read_text(encoding="utf-8") + (SCRIPTS / "_common.sh").read_text(encoding="utf-8")
    return dict(re.findall(r'"\$\{(\w+):-([^}]+)\}"', text))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_parses_and_matches_its_launcher(name, monkeypatch, tmp_path):
    monkeypatch.setenv("BASE_MODEL_PATH", str(tmp_path / "chatglm3-6b"))
    monkeypatch.chdir(REPO_ROOT)
    script, method, method_knobs = CONFIGS[name]
    config = REPO_ROOT / "configs" / name
    assert "\nbf16: true\n" in config.read_text(encoding="utf-8")  # as the launchers on a bf16 GPU
    if not torch.cuda.is_available():  # transformers refuses bf16 without a GPU unless the run is on the CPU
        config = tmp_path / name
        config.write_text((REPO_ROOT / "configs" / name).read_text(encoding="utf-8") + "use_cpu: true\n")
    model_args, data_args, training_args = parse_arguments([str(config)])
    defaults = launcher_defaults(script)
    assert model_args.method == method
    assert model_args.model_name_or_path == str(tmp_path / "chatglm3-6b")
    values = {**vars(model_args), **vars(data_args), **training_args.to_dict()}
    for argument, knob in {**COMMON_KNOBS, **method_knobs}.items():
        assert float(values[argument]) == float(defaults[knob]), f"{name}: {argument} vs {script}'s {knob}"
    # GRAD_ACCUMULATION_STEPS falls back to the official misspelled knob, whose default is the launchers' one.
    assert training_args.gradient_accumulation_steps == 16
    assert "${GRAD_ACCUMULARION_STEPS:-16}" in (SCRIPTS / "_common.sh").read_text(encoding="utf-8")
    assert data_args.packing is True and defaults["PACKING"] == "1"
    assert data_args.train_file == defaults["DATASET_PATH"].replace("$_LAUNCHER_REPO_ROOT/", "")
    assert training_args.logging_steps == 1 and training_args.bf16 is True
    if "DS_CONFIG" in defaults:
        assert training_args.deepspeed == defaults["DS_CONFIG"].replace("$_LAUNCHER_REPO_ROOT/", "")
    else:
        assert training_args.deepspeed is None


def test_dpo_config_parses_with_the_preference_parser_and_matches_its_launcher(monkeypatch, tmp_path):
    from finetune.preference import parse_preference_arguments

    monkeypatch.setenv("BASE_MODEL_PATH", str(tmp_path / "chatglm3-6b"))
    monkeypatch.chdir(REPO_ROOT)
    config = tmp_path / "dpo.yaml"
    text = (REPO_ROOT / "configs" / "dpo.yaml").read_text(encoding="utf-8")
    assert "\nbf16: true\n" in text
    config.write_text(text + ("" if torch.cuda.is_available() else "use_cpu: true\n"), encoding="utf-8")
    model_args, data_args, pref_args, training_args = parse_preference_arguments([str(config)])
    defaults = launcher_defaults("finetune_dpo.sh")
    assert model_args.method == defaults["METHOD"] == "lora"
    assert model_args.lora_rank == int(defaults["LORA_RANK"])
    assert pref_args.pref_loss == defaults["PREF_LOSS"] and pref_args.pref_beta == float(defaults["PREF_BETA"])
    assert pref_args.init_checkpoint is None
    knobs = {"learning_rate": "LR", "max_seq_length": "MAX_SEQ_LEN", "per_device_train_batch_size": "DEV_BATCH_SIZE",
             "max_steps": "MAX_STEP", "save_steps": "SAVE_INTERVAL"}  # fmt: skip
    values = {**vars(model_args), **vars(data_args), **training_args.to_dict()}
    for argument, knob in knobs.items():
        assert float(values[argument]) == float(defaults[knob]), f"dpo.yaml: {argument} vs finetune_dpo.sh's {knob}"
    assert training_args.gradient_accumulation_steps == 16
    # The launcher's own PACKING default (0: pairs are not packed) comes before _common.sh reads ${PACKING:-1}.
    assert data_args.packing is False and 'PACKING="${PACKING:-0}"' in (SCRIPTS / "finetune_dpo.sh").read_text()
    assert data_args.train_file == defaults["DATASET_PATH"].replace("$_LAUNCHER_REPO_ROOT/", "")
