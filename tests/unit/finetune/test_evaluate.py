"""Evaluation: prompt encoding as in training, batched left-padded generation, predictions and metrics files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_builders import make_lora_checkpoint, make_prefix_checkpoint

from finetune.checkpoints import load_for_inference
from finetune.data.encoding import encode_input_output
from finetune.evaluate import METRICS_FILE, PREDICTIONS_FILE, main, read_prompt_examples
from finetune.generation import (
    build_generation_config,
    conversation_prompt_ids,
    generate_token_ids,
    input_output_prompt_ids,
)
from finetune.metrics import METRIC_NAMES, compute_metrics
from finetune.model import ChatGLMTokenizer

REPO_ROOT = Path(__file__).resolve().parents[3]
DEV_RECORDS = [
    {"prompt": "类型#裙*颜色#红色", "response": "红色的裙子很显气质。"},
    {"prompt": "类型#上衣*版型#宽松*风格#简约*图案#条纹*衣样式#衬衫*衣领型#翻领", "response": "简约的条纹衬衫。"},
    {"prompt": "hi", "response": "hello there"},
    {"prompt": "类型#裤*版型#宽松", "response": "宽松的阔腿裤。"},
]
CONVERSATION_RECORDS = [
    {
        "conversations": [
            {"role": "user", "content": "北京天气怎么样"},
            {"role": "assistant", "content": "北京今天21度。"},
            {"role": "user", "content": "那上海呢？"},
            {"role": "assistant", "content": "上海今天25度。"},
        ]
    },
    {"conversations": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi, how can I help?"}]},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records one per line."""
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_model_dir: Path) -> dict[str, Path]:
    """A LoRA and a P-Tuning v2 checkpoint of the reference model."""
    root = tmp_path_factory.mktemp("eval_checkpoints")
    make_lora_checkpoint(reference_model_dir, root / "lora")
    make_prefix_checkpoint(reference_model_dir, root / "prefix", pre_seq_len=4)
    return {"lora": root / "lora", "prefix": root / "prefix"}


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory) -> Path:
    """An input-output dev set."""
    return write_jsonl(tmp_path_factory.mktemp("dev") / "dev.jsonl", DEV_RECORDS)


def test_input_output_prompt_is_the_training_source(reference: dict, tokenizer: ChatGLMTokenizer):
    item = reference["input_output"]
    prompt_ids = input_output_prompt_ids(item["prompt"], tokenizer, item["max_source_length"])
    source_length = item["labels"].index(next(label for label in item["labels"] if label != -100))
    assert prompt_ids == item["input_ids"][:source_length]
    long_prompt = DEV_RECORDS[1]["prompt"] * 3
    encoded = encode_input_output({"prompt": long_prompt, "response": "x"}, tokenizer, 10, 4)
    assert input_output_prompt_ids(long_prompt, tokenizer, 10) == encoded["input_ids"][:10]


def test_conversation_prompt_is_the_chat_input(reference: dict, tokenizer: ChatGLMTokenizer, tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATION_RECORDS)
    first = read_prompt_examples(path, tokenizer, 4096, reference_from_record=True)[0]
    history = [{"role": message["role"], "content": message["content"]} for message in first.prompt[:2]]
    expected = tokenizer.build_chat_input("那上海呢？", history=history)["input_ids"][0].tolist()
    assert first.prompt_ids == expected
    assert first.label == "上海今天25度。"
    chat = reference["tokenizer"]["build_chat_input"]
    assert conversation_prompt_ids([{"role": "user", "content": chat["query"]}], None, tokenizer, 4096) == (
        tokenizer.build_chat_input(chat["query"])["input_ids"][0].tolist()
    )


def test_official_prefix_batched_generation_matches_official_greedy(reference_dir: Path, reference: dict):
    model, tokenizer, _ = load_for_inference(reference_dir / "ptuning", base=str(reference_dir / "model"), device="cpu")
    items = reference["model"]["ptuning_greedy"]
    config = build_generation_config(tokenizer, max_new_tokens=12)
    generated = generate_token_ids(model, tokenizer, [item["prompt_ids"] for item in items], config, batch_size=3)
    assert generated == [item["new_ids"] for item in items]


@pytest.mark.parametrize("kind", ["prefix", "lora"])
def test_batched_left_padded_greedy_equals_per_prompt(checkpoints: dict, dev_file: Path, kind: str):
    model, tokenizer, _ = load_for_inference(checkpoints[kind], device="cpu")
    prompts = [example.prompt_ids for example in read_prompt_examples(dev_file, tokenizer, 64, True)]
    assert len({len(ids) for ids in prompts}) > 1
    config = build_generation_config(tokenizer, max_new_tokens=8)
    batched = generate_token_ids(model, tokenizer, prompts, config, batch_size=4)
    one_by_one = generate_token_ids(model, tokenizer, prompts, config, batch_size=1)
    assert batched == one_by_one
    assert all(len(ids) > 0 for ids in batched)


def test_rows_that_stop_early_in_a_batch_equal_their_own_generation(checkpoints: dict, dev_file: Path):
    model, tokenizer, _ = load_for_inference(checkpoints["prefix"], device="cpu")
    prompts = [example.prompt_ids for example in read_prompt_examples(dev_file, tokenizer, 64, True)]
    config = build_generation_config(tokenizer, max_new_tokens=8)
    free_run = generate_token_ids(model, tokenizer, prompts[:1], config, batch_size=1)[0]
    config.eos_token_id = config.eos_token_id + [free_run[2]]
    batched = generate_token_ids(model, tokenizer, prompts, config, batch_size=4)
    assert batched == generate_token_ids(model, tokenizer, prompts, config, batch_size=1)
    assert batched[0] == free_run[: free_run.index(free_run[2]) + 1]
    assert max(len(ids) for ids in batched) > len(batched[0])


def test_evaluate_writes_predictions_and_metrics(checkpoints: dict, dev_file: Path, tmp_path: Path, capsys):
    output_dir = tmp_path / "eval"
    status = main(
        [
            "--model",
            str(checkpoints["prefix"]),
            "--data",
            str(dev_file),
            "--output_dir",
            str(output_dir),
            "--max_new_tokens",
            "6",
            "--batch_size",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in (output_dir / PREDICTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == [record["prompt"] for record in DEV_RECORDS]
    assert [row["label"] for row in rows] == [record["response"] for record in DEV_RECORDS]
    report = json.loads((output_dir / METRICS_FILE).read_text())
    metrics = {name: report.pop(name) for name in METRIC_NAMES}
    assert sorted(report) == sorted(["metric_convention", "evaluated_turns", "tool_call_turns", "checkpoint", "data"])
    assert metrics == compute_metrics([row["prediction"] for row in rows], [row["label"] for row in rows])
    printed = capsys.readouterr().out
    assert all(name in printed for name in METRIC_NAMES)
    assert sorted(path.name for path in output_dir.iterdir()) == sorted([PREDICTIONS_FILE, METRICS_FILE])


def test_evaluate_conversations_with_lora(checkpoints: dict, tmp_path: Path):
    data = write_jsonl(tmp_path / "chat_dev.jsonl", CONVERSATION_RECORDS)
    status = main(
        [
            "--model",
            str(checkpoints["lora"]),
            "--data",
            str(data),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / PREDICTIONS_FILE).read_text().splitlines()]
    assert [row["label"] for row in rows] == ["北京今天21度。", "上海今天25度。", "hi, how can I help?"]
    assert [row["id"] for row in rows] == ["0:1", "0:3", "1:1"]
    assert rows[1]["prompt"] == CONVERSATION_RECORDS[0]["conversations"][:3]
    assert all(row["label_call"] is None for row in rows)
    assert set(METRIC_NAMES) <= set(json.loads((tmp_path / "out" / METRICS_FILE).read_text()))


def test_evaluate_missing_checkpoint_fails_clearly(dev_file: Path, tmp_path: Path, capsys):
    status = main(["--model", str(tmp_path / "missing"), "--data", str(dev_file), "--output_dir", str(tmp_path / "o")])
    assert status == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_evaluate_invalid_data_names_file_and_line(checkpoints: dict, tmp_path: Path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(DEV_RECORDS[0]) + "\n" + json.dumps({"prompt": "no response"}) + "\n")
    status = main(
        [
            "--model",
            str(checkpoints["prefix"]),
            "--data",
            str(data),
            "--output_dir",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    assert status == 1
    assert f"{data}:2 field 'response': is missing" in capsys.readouterr().err


def test_evaluate_script_uses_its_environment_knobs(checkpoints: dict, dev_file: Path, tmp_path: Path):
    env = {
        **os.environ,
        "CHECKPOINT": str(checkpoints["lora"]),
        "DATASET_PATH": str(dev_file),
        "OUTPUT_DIR": str(tmp_path / "script_eval"),
        "BATCH_SIZE": "2",
        "MAX_NEW_TOKENS": "3",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "evaluate.sh"), "--device", "cpu"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert set(METRIC_NAMES) <= set(json.loads((tmp_path / "script_eval" / METRICS_FILE).read_text()))
    assert len((tmp_path / "script_eval" / PREDICTIONS_FILE).read_text().splitlines()) == len(DEV_RECORDS)


def test_generation_uses_stop_ids_and_cache(tokenizer: ChatGLMTokenizer):
    config = build_generation_config(tokenizer, max_new_tokens=5)
    assert config.eos_token_id == [2, 906, 908]
    assert tokenizer.convert_ids_to_tokens(config.eos_token_id[1:]) == ["<|user|>", "<|observation|>"]
    assert config.use_cache is True and config.do_sample is False
