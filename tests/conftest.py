"""Shared test fixtures: where ../shared lives, the reference ChatGLM3 tiny checkpoint and tokenizer, a tiny random
model and its tokenizer, and a finished tiny training run."""

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from finetune.model.tokenization import ChatGLMTokenizer
from finetune.tiny_model import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CHATGLM_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require_shared(path: Path) -> Path:
    """Return `path`, or skip the test when the shared fixtures are absent (fail under CI)."""
    if path.exists():
        return path
    message = f"shared fixture {path} not found (set CHATGLM_SHARED_DIR to the shared/ folder)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must run the reference tests")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared/ folder with the official reference fixtures."""
    return _require_shared(SHARED_DIR)


@pytest.fixture(scope="session")
def reference_dir(shared_dir: Path) -> Path:
    """The chatglm3-tiny reference folder produced with the official implementation."""
    return _require_shared(shared_dir / "reference" / "chatglm3-tiny")


@pytest.fixture(scope="session")
def reference(reference_dir: Path) -> dict:
    """The parsed reference.json."""
    return json.loads((reference_dir / "reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def reference_model_dir(reference_dir: Path) -> Path:
    """The official-layout tiny checkpoint folder."""
    return reference_dir / "model"


@pytest.fixture(scope="module")
def tokenizer(reference_model_dir: Path) -> ChatGLMTokenizer:
    """The ChatGLM3 tokenizer of the official-layout reference checkpoint (one per test module: tests may set its
    padding side or other attributes)."""
    return ChatGLMTokenizer.from_pretrained(reference_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random ChatGLM3 checkpoint with its tokenizer (built once; tests only read it)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> ChatGLMTokenizer:
    """The tiny random model's tokenizer, loaded as users load it (one per test module, like `tokenizer`)."""
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir: Path, tmp_path_factory) -> Path:
    """The output_dir of a finished two-step P-Tuning run on eight prompt/response records (checkpoint-2 is complete;
    trained once per session, tests copy it before changing anything)."""
    from train_helpers import input_output_records, run_arguments, write_jsonl

    from finetune.train import main

    root = tmp_path_factory.mktemp("finished")
    train_file = write_jsonl(root / "train.jsonl", input_output_records(8))
    output_dir = root / "out"
    main(run_arguments(tiny_model_dir, train_file, output_dir, root / "cache", pre_seq_len=4, max_steps=2))
    return output_dir
