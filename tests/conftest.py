"""Shared test fixtures: where ../shared lives, the reference ChatGLM3 tiny checkpoint and tokenizer, a tiny random
model and its tokenizer, a finished tiny training run, and the lane of background runs.

Background runs: the quickstart and the real-size benchmark are the suite's longest items and mostly keep one core
busy, while the rest of the suite leaves about 0.8 of CI's two cores idle (tests waiting on subprocesses and servers).
So when the session starts, `background_lane` starts the runs the selected tests need (a test module's
`background_runs(root)`, each run named after the fixture that waits for it), one after another on one CPU thread;
their tests run last (`pytest_collection_modifyitems`), by when their runs are done, and assert on them as before.
Every run is killed at session end (also on Ctrl-C, and on SIGTERM)."""

import atexit
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from background_runs import BackgroundLane
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of background runs go last, in their order: the rest of the suite runs while their runs do."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "background_runs"))


@pytest.fixture(scope="session", autouse=True)
def background_lane(request, tmp_path_factory) -> Iterator[BackgroundLane]:
    """The lane of background runs the selected tests ask for, started before the first test (see the docstring at
    the top); killed when the session ends, or at exit if the session is cut short."""
    lane = BackgroundLane(tmp_path_factory.mktemp("background-logs"))
    wanted: dict[object, set[str]] = {}  # module -> names of its runs that selected tests use, in test order
    for item in request.session.items:
        module = getattr(item, "module", None)
        if hasattr(module, "background_runs"):
            wanted.setdefault(module, set()).update(item.fixturenames)
    for module, names in wanted.items():
        for run in module.background_runs(tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1])):
            if run.name in names:
                lane.add(run)
    atexit.register(lane.stop)
    previous = signal.getsignal(signal.SIGTERM)

    def stop_lane_then_terminate(signum: int, frame: object) -> None:
        """SIGTERM (e.g. a CI time limit) ends Python without atexit: stop the runs, then end as SIGTERM does."""
        lane.stop()
        signal.signal(signum, previous)
        os.kill(os.getpid(), signum)

    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop_lane_then_terminate)
    lane.start()
    yield lane
    lane.stop()
    if previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, previous)
