"""Arguments from the command line or a YAML/JSON file, their checks, and data errors before the model loads."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import input_output_records, write_jsonl

from finetune import train
from finetune.arguments import BASE_MODEL_ENV, ModelArguments, parse_arguments
from finetune.data.records import DataValidationError
from finetune.methods.lora import parse_lora_target
from finetune.train import main

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    """Four prompt/response records."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", input_output_records(4))


def test_yaml_config_file_runs_training(tiny_model_dir, train_file, tmp_path):
    config = tmp_path / "ptuning.yaml"
    config.write_text(
        f"""# P-Tuning v2 on the tiny model
model_name_or_path: {tiny_model_dir}
train_file: {train_file}
output_dir: {tmp_path / "out"}
data_cache_dir: {tmp_path / "cache"}
pre_seq_len: 4
prefix_projection: true
do_train: true
use_cpu: true
max_steps: 2
save_steps: 2
logging_steps: 1
per_device_train_batch_size: 2
learning_rate: 2e-2
max_source_length: 48
max_target_length: 48
print_first_example: false
""",
        encoding="utf-8",
    )
    model_args, data_args, training_args = parse_arguments([str(config)])
    assert training_args.learning_rate == pytest.approx(0.02)
    assert (model_args.method, model_args.prefix_projection, data_args.max_source_length) == ("ptuning", True, 48)

    outcome = main([str(config)])
    assert outcome.trainer.state.global_step == 2
    record = json.loads((tmp_path / "out" / "checkpoint-2" / "training_record.json").read_text())
    assert record["method"] == "ptuning" and record["ptuning"]["prefix_projection"] is True
    assert record["training_args"]["learning_rate"] == pytest.approx(0.02)


def test_json_config_file_is_parsed(tiny_model_dir, tmp_path):
    config = tmp_path / "lora.json"
    config.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tiny_model_dir),
                "output_dir": str(tmp_path / "out"),
                "lora_rank": 8,
                "lora_target": "all",
                "quantization_bit": 0,
                "max_steps": "10",
                "use_cpu": True,
            }
        )
    )
    model_args, _, training_args = parse_arguments([str(config)])
    assert model_args.method == "lora" and model_args.quantization_bit is None
    assert model_args.lora_target_modules == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    assert training_args.max_steps == 10


def test_config_file_errors_name_the_file(tiny_model_dir, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"model_name_or_path: {tiny_model_dir}\noutput_dir: out\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown.yaml: unknown argument name\(s\) \['learning_rat'\]"):
        parse_arguments([str(unknown)])
    bad_number = tmp_path / "bad.yaml"
    bad_number.write_text(f"model_name_or_path: {tiny_model_dir}\noutput_dir: out\nlearning_rate: fast\n")
    with pytest.raises(ValueError, match="bad.yaml: learning_rate must be a float, got 'fast'"):
        parse_arguments([str(bad_number)])
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_name_or_path": "x",\n "output_dir": }')
    with pytest.raises(ValueError, match=r"broken.json:2:\d+: invalid JSON"):
        parse_arguments([str(broken)])
    with pytest.raises(FileNotFoundError, match="missing.yaml: config file not found"):
        parse_arguments([str(tmp_path / "missing.yaml")])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"pre_seq_len": 4, "lora_rank": 8}, "select different methods"),
        ({"quantization_bit": 4}, "cannot be used with full fine-tuning"),
        ({"method": "qlora", "lora_rank": 8}, "trains on a quantized base: add --quantization_bit 4"),
        ({"lora_rank": 8, "quantization_bit": 3}, "must be 4 or 8"),
        ({"prefix_projection": True}, "pass --pre_seq_len too"),
        ({"lora_rank": 8, "lora_target": "query,value"}, "unknown module name"),
        ({"pre_seq_len": 0}, "positive number of prefix tokens"),
    ],
)
def test_model_argument_checks(flags, message):
    with pytest.raises(ValueError, match=message):
        ModelArguments(model_name_or_path="base", **flags)


def test_base_model_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(BASE_MODEL_ENV, raising=False)
    with pytest.raises(ValueError, match=f"--model_name_or_path PATH .* {BASE_MODEL_ENV}"):
        ModelArguments()
    monkeypatch.setenv(BASE_MODEL_ENV, "/models/chatglm3-6b")
    assert ModelArguments().model_name_or_path == "/models/chatglm3-6b"
    assert ModelArguments(model_name_or_path="other").model_name_or_path == "other"
    assert parse_lora_target(" dense , query_key_value ") == ["dense", "query_key_value"]


def test_stage_without_its_data_file_is_refused(tiny_model_dir, tmp_path):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--do_eval", "--use_cpu"]
    with pytest.raises(ValueError, match="--do_eval needs --validation_file"):
        main(argv)


def test_data_problems_stop_the_run_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "类型#裙", "response": "红色"}\n{"prompt": "类型#裤", "response": 3}\nnot json\n',
        encoding="utf-8",
    )

    def model_must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    monkeypatch.setattr(train, "build_model", model_must_not_load)
    argv = [
        "--model_name_or_path",
        str(tiny_model_dir),
        "--train_file",
        str(bad),
        "--output_dir",
        str(tmp_path / "out"),
        "--data_cache_dir",
        str(tmp_path / "cache"),
        "--use_cpu",
        "--pre_seq_len",
        "4",
    ]
    with pytest.raises(DataValidationError) as error:
        main(argv)
    message = str(error.value)
    assert f"{bad}:2 field 'response': must be a string, got number" in message
    assert f"{bad}:3: invalid JSON" in message
    assert "--skip_invalid" in message


@pytest.mark.slow
def test_finetune_script_runs_as_a_file_path(tiny_model_dir, train_file, tmp_path):
    command = [
        sys.executable,
        str(REPO_ROOT / "finetune" / "train.py"),  # as a file, from another folder, without PYTHONPATH (installed)
        "--model_name_or_path",
        str(tiny_model_dir),
        "--train_file",
        str(train_file),
        "--output_dir",
        str(tmp_path / "out"),
        "--data_cache_dir",
        str(tmp_path / "cache"),
        "--pre_seq_len",
        "4",
        "--max_steps",
        "1",
        "--save_steps",
        "1",
        "--use_cpu",
        "--disable_tqdm",
        "true",
        "--max_source_length",
        "48",
        "--max_target_length",
        "48",
        "--print_first_example",
        "false",
    ]
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        command, check=False, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "checkpoint-1" / "training_record.json").is_file()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_check_run_settings_changes_nothing_and_implied_settings_are_applied_apart(tmp_path):
    model_args, data_args, training_args = parse_arguments(
        ["--model_name_or_path", "chatglm3-6b", "--train_file", "t.jsonl", "--output_dir", str(tmp_path), "--use_cpu"]
    )
    before = training_args.to_dict()
    train.check_run_settings(model_args, data_args, training_args)
    assert training_args.to_dict() == before
    train.apply_implied_settings(data_args, training_args)
    assert training_args.do_train is True and training_args.ddp_find_unused_parameters is False
    assert training_args.include_num_input_tokens_seen == "non_padding"


def test_argument_parsing_does_not_import_the_model_code():
    """arguments.py and what it imports from the project name no finetune.model module (the layering the parser
    keeps: recompute.py finds GLM blocks by their recompute switch, not by importing the class); the parser takes the
    methods' options from the methods' registry, finetune.methods, and nothing else of theirs."""
    for module in ("arguments", "recompute", "quantization"):
        tree = ast.parse((Path(train.__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
        imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        project = [name for name in imported if name and name.startswith("finetune")]
        assert all(not name.startswith("finetune.model") for name in project), (module, project)
        assert set(project) <= {"finetune.recompute", "finetune.quantization", "finetune.methods"}, (module, project)


def test_a_misspelled_flag_or_a_bad_value_ends_with_one_line_and_status_2(tmp_path):
    command = [sys.executable, "-m", "finetune.train", "--model_name_or_path", str(tmp_path), "--learnig_rate", "1"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown flag --learnig_rate; did you mean --learning_rate? (python -m finetune.train --help lists "
        "the flags)"
    ]
    with pytest.raises(ValueError, match=r"^argument --learning_rate/--learning-rate: invalid float value: 'abc' \("):
        parse_arguments(["--model_name_or_path", str(tmp_path), "--learning_rate", "abc"])
    with pytest.raises(ValueError, match=r"^unexpected argument 'stray': flags are written --name value"):
        parse_arguments(["--model_name_or_path", str(tmp_path), "stray"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for a machine without a CUDA GPU")
def test_a_config_asking_for_bf16_runs_on_the_cpu_with_one_note(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("BASE_MODEL_PATH", str(tmp_path / "chatglm3-6b"))
    config = REPO_ROOT / "configs" / "lora.yaml"
    model_args, _, training_args = parse_arguments([str(config), "--output_dir", str(tmp_path), "--max_steps", "7"])
    assert training_args.bf16 is True and training_args.use_cpu is True
    assert training_args.max_steps == 7 and training_args.learning_rate == 2e-4  # the flag on top, the file's rate
    assert model_args.method == "lora" and model_args.lora_rank == 8
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: --bf16 asked for, but there is no CUDA GPU")
    _, _, fp16_args = parse_arguments([str(config), "--output_dir", str(tmp_path), "--bf16", "false", "--fp16"])
    assert fp16_args.fp16 is False and fp16_args.use_cpu is True
    assert capsys.readouterr().err.startswith("note: --fp16 needs a CUDA GPU")
