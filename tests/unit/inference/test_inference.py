"""inference/chat_cli.py: interactive chat fed through stdin, one-shot replies, batch mode and clear failures."""

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_builders import make_lora_checkpoint, make_other_base, make_prefix_checkpoint, truncate_file

from finetune.checkpoints import load_for_inference
from finetune.evaluate import read_prompt_examples
from finetune.generation import build_generation_config, generate_replies
from inference.chat_cli import main, reply_text

REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "inference.py"  # the command users run: python inference.py
MAX_NEW_TOKENS = 5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, reference_model_dir: Path) -> dict[str, Path]:
    """A LoRA and a P-Tuning v2 checkpoint of the reference model."""
    root = tmp_path_factory.mktemp("inference_checkpoints")
    make_lora_checkpoint(reference_model_dir, root / "lora")
    make_prefix_checkpoint(reference_model_dir, root / "prefix", pre_seq_len=3)
    return {"lora": root / "lora", "prefix": root / "prefix"}


def replies_in(output: str) -> list[str]:
    """The text printed after each "ChatGLM: " label, up to the next "User: " prompt."""
    return [part.split("\n\nUser: ")[0] for part in output.split("ChatGLM: ")[1:]]


def test_interactive_session_through_stdin_as_a_script(checkpoints: dict):
    session = "hello\n/clear\n你好\n/exit\nnot read\n"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(checkpoints["lora"]), "--max_new_tokens", str(MAX_NEW_TOKENS)],
        input=session,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT.parent,
    )
    assert result.returncode == 0, result.stderr
    assert "History cleared." in result.stdout
    replies = replies_in(result.stdout)
    # The random reference model may pick ids of the embedding's padding rows, which decode to "" (as officially).
    assert len(replies) == 2 and any(reply.strip() for reply in replies)
    assert "loaded lora checkpoint" in result.stderr


def test_interactive_session_ends_cleanly_at_end_of_input(checkpoints: dict, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    status = main(["--model", str(checkpoints["prefix"]), "--max_new_tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    assert status == 0
    assert len(replies_in(capsys.readouterr().out)) == 1


def test_history_carries_over_until_clear(checkpoints: dict, monkeypatch, capsys):
    model, tokenizer, _ = load_for_inference(checkpoints["prefix"], device="cpu")
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False}
    first, history = model.chat(tokenizer, "hello", **kwargs)
    second_with_history, _ = model.chat(tokenizer, "again", history=history, **kwargs)
    second_fresh, _ = model.chat(tokenizer, "again", **kwargs)
    assert second_with_history != second_fresh
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/clear\nagain\n"))
    assert main(["--model", str(checkpoints["prefix"]), "--max_new_tokens", str(MAX_NEW_TOKENS)]) == 0
    expected = [reply_text(reply) for reply in (first, second_with_history, second_fresh)]
    assert replies_in(capsys.readouterr().out) == expected


def test_one_shot_prompt_prints_the_greedy_chat_reply(checkpoints: dict, capsys):
    model, tokenizer, _ = load_for_inference(checkpoints["lora"], device="cpu")
    expected, _ = model.chat(tokenizer, "类型#裙*颜色#红色", max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    status = main(
        ["--model", str(checkpoints["lora"]), "--prompt", "类型#裙*颜色#红色", "--max_new_tokens", str(MAX_NEW_TOKENS)]
    )
    assert status == 0
    assert capsys.readouterr().out == reply_text(expected) + "\n"
    assert reply_text(expected).strip()


def test_batch_mode_writes_one_reply_per_record(checkpoints: dict, tmp_path: Path):
    records = [
        {"conversations": [{"role": "user", "content": "hello"}]},
        {
            "conversations": [
                {"role": "user", "content": "北京天气怎么样"},
                {"role": "assistant", "content": "21度"},
                {"role": "user", "content": "上海呢"},
            ]
        },
        {"conversations": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]},
    ]
    input_file = tmp_path / "prompts.jsonl"
    input_file.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    output_file = tmp_path / "out" / "replies.jsonl"
    status = main(
        [
            "--model",
            str(checkpoints["prefix"]),
            "--input_file",
            str(input_file),
            "--output_file",
            str(output_file),
            "--max_new_tokens",
            str(MAX_NEW_TOKENS),
            "--batch_size",
            "3",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in output_file.read_text(encoding="utf-8").splitlines()]
    assert [row["conversations"] for row in rows] == [record["conversations"] for record in records]
    model, tokenizer, _ = load_for_inference(checkpoints["prefix"], device="cpu")
    examples = read_prompt_examples(input_file, tokenizer, 1024, reference_from_record=False)
    one_by_one = generate_replies(model, tokenizer, examples, build_generation_config(tokenizer, MAX_NEW_TOKENS), 1)
    assert [row["response"] for row in rows] == one_by_one
    assert [path.name for path in output_file.parent.iterdir()] == ["replies.jsonl"]


def test_batch_mode_prompt_records_need_no_response(checkpoints: dict, tmp_path: Path):
    input_file = tmp_path / "prompts.jsonl"
    input_file.write_text('{"prompt": "类型#裙*颜色#红色"}\n{"prompt": "hello"}\n', encoding="utf-8")
    output_file = tmp_path / "replies.jsonl"
    status = main(
        [
            "--model",
            str(checkpoints["lora"]),
            "--input_file",
            str(input_file),
            "--output_file",
            str(output_file),
            "--max_new_tokens",
            "3",
        ]
    )
    assert status == 0
    rows = [json.loads(line) for line in output_file.read_text(encoding="utf-8").splitlines()]
    assert [row["prompt"] for row in rows] == ["类型#裙*颜色#红色", "hello"]
    assert all(isinstance(row["response"], str) for row in rows)


def test_missing_checkpoint_exits_non_zero_with_message(tmp_path: Path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert f"error: {tmp_path / 'nope'}: no such checkpoint folder" in capsys.readouterr().err


def test_official_prefix_without_base_asks_for_base(reference_dir: Path, capsys):
    assert main(["--model", str(reference_dir / "ptuning"), "--prompt", "hi"]) == 1
    assert "pass the base model folder with --base" in capsys.readouterr().err


def test_prefix_for_a_different_base_exits_non_zero(checkpoints: dict, reference_model_dir: Path, tmp_path, capsys):
    other = make_other_base(reference_model_dir, tmp_path / "wide", num_layers=4)
    assert main(["--model", str(checkpoints["prefix"]), "--base", str(other), "--prompt", "hi"]) == 1
    assert "trained for a different base model" in capsys.readouterr().err


def test_lora_for_a_different_base_exits_non_zero(checkpoints: dict, reference_model_dir: Path, tmp_path, capsys):
    other = make_other_base(reference_model_dir, tmp_path / "narrow", hidden_size=32, kv_channels=8)
    assert main(["--model", str(checkpoints["lora"]), "--base", str(other), "--prompt", "hi"]) == 1
    error = capsys.readouterr().err
    assert "LoRA adapter was trained for a different base model" in error and "size mismatch" in error


def test_truncated_adapter_exits_non_zero(reference_model_dir: Path, tmp_path: Path, capsys):
    folder = tmp_path / "lora"
    make_lora_checkpoint(reference_model_dir, folder)
    truncate_file(folder / "adapter_model.safetensors", keep_fraction=0.9)
    assert main(["--model", str(folder), "--prompt", "hi"]) == 1
    assert "adapter_model.safetensors: truncated safetensors file" in capsys.readouterr().err


@pytest.mark.parametrize("word", ["exit", "quit", "/exit", "QUIT"])
def test_exit_words_end_the_chat(word: str, checkpoints: dict, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{word}\nnot read\n"))
    status = main(["--model", str(checkpoints["prefix"]), "--max_new_tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    assert status == 0 and replies_in(capsys.readouterr().out) == []


def test_zero_new_tokens_is_refused_before_loading(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--model", "/nonexistent", "--max_new_tokens", "0"])
    assert exited.value.code == 2
    assert "--max_new_tokens must be a positive number, got 0" in capsys.readouterr().err


def test_the_documented_command_works_from_the_repository_root(checkpoints: dict):
    result = subprocess.run(
        [sys.executable, "inference.py", "--model", str(checkpoints["prefix"]), "--prompt", "你好", "--max_new_tokens",
         str(MAX_NEW_TOKENS), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "loaded ptuning checkpoint" in result.stderr


def read_until(stream, marker: bytes, seen: bytearray, deadline: float) -> None:
    """Read `stream` (a pipe) into `seen` until `marker` appears after what `seen` held at the call."""
    start = len(seen)
    while marker not in seen[start:]:
        assert time.monotonic() < deadline, bytes(seen).decode(errors="replace")
        ready, _, _ = select.select([stream], [], [], 1.0)
        if ready:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, bytes(seen).decode(errors="replace")  # the process ended
            seen += chunk


def test_ctrl_c_during_a_streamed_reply_stops_it_and_returns_to_the_prompt(reference_model_dir: Path):
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model", str(reference_model_dir), "--device", "cpu", "--max_new_tokens", "400"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
    )  # fmt: skip
    seen = bytearray()
    deadline = time.monotonic() + 240
    try:
        read_until(process.stdout, b"User: ", seen, deadline)
        process.stdin.write(b"hello\n")
        process.stdin.flush()
        read_until(process.stdout, b"ChatGLM: ", seen, deadline)
        read_until(process.stdout, b"is", seen, deadline)  # the reply is streaming (the tiny model repeats "is")
        process.send_signal(signal.SIGINT)
        read_until(process.stdout, b"User: ", seen, deadline)
        process.stdin.write(b"/exit\n")
        process.stdin.close()
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    errors = process.stderr.read().decode(errors="replace")
    assert status == 0, errors
    assert "terminate called" not in errors and "Traceback" not in errors
    assert "[reply stopped]" in bytes(seen).decode(errors="replace")
