"""A lane that runs the suite's long commands (the quickstart, the real-size benchmark) one after another in a
background thread while the other tests run, each command in its own process group with its output in log files.
tests/conftest.py starts it; a test module declares its runs in `background_runs(root)`, each named after the fixture
that waits for it."""

import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class BackgroundRun:
    """One command: `folder` is where its outputs go; `before` (if set) is called in the lane right before the command
    with the runs finished so far by name, and its value is kept (to record what the command must leave unchanged);
    `merge_stderr` sends stderr to stdout."""

    name: str
    command: list[str]
    cwd: Path
    folder: Path
    timeout_s: float
    env: dict[str, str] | None = None
    merge_stderr: bool = False
    before: Callable[[dict[str, "FinishedRun"]], Any] | None = None


@dataclass
class FinishedRun:
    """What a background run left: exit status (None when it never started), its output, `before`'s value, and why
    it did not start or was stopped (None when it ran to its end; the log ends with the same words)."""

    run: BackgroundRun
    returncode: int | None
    stdout: str
    stderr: str
    before: Any = None
    error: str | None = None


@dataclass
class _Entry:
    run: BackgroundRun
    stdout_path: Path
    stderr_path: Path
    done: threading.Event = field(default_factory=threading.Event)
    finished: FinishedRun | None = None


class BackgroundLane:
    """Runs the added commands in order, one at a time; `wait(name)` blocks until that one has finished."""

    def __init__(self, log_dir: Path):
        self._log_dir = log_dir
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="background-runs", daemon=True)

    def add(self, run: BackgroundRun) -> None:
        """Queue `run` (before `start`)."""
        base = self._log_dir / run.name
        self._entries[run.name] = _Entry(run, base.with_suffix(".stdout"), base.with_suffix(".stderr"))

    def start(self) -> None:
        """Start working through the queued runs, if there are any."""
        if self._entries:
            self._thread.start()

    def run(self, name: str) -> BackgroundRun:
        """The queued run called `name`."""
        return self._entry(name).run

    def wait(self, name: str) -> FinishedRun:
        """Block until the run called `name` has finished; what it left."""
        entry = self._entry(name)
        entry.done.wait()
        assert entry.finished is not None
        return entry.finished

    def stop(self) -> None:
        """Kill the running command's process group and start no other (idempotent)."""
        with self._lock:
            self._stopped = True
            if self._process is not None and self._process.poll() is None:
                os.killpg(self._process.pid, signal.SIGKILL)

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"background run {name!r} was not started: no selected test asked for it when the session "
                           f"began (tests/conftest.py starts the runs named by the selected tests' fixtures)")
        return self._entries[name]

    def _work(self) -> None:
        for entry in self._entries.values():
            try:
                entry.finished = self._run(entry)
            finally:
                entry.done.set()

    def _run(self, entry: _Entry) -> FinishedRun:
        run = entry.run
        before, returncode, error = None, None, None
        with entry.stdout_path.open("w") as stdout, entry.stderr_path.open("w") as stderr:
            try:
                if run.before is not None:
                    before = run.before({name: done.finished for name, done in self._entries.items() if done.finished})
            except (OSError, KeyError, ValueError) as failure:
                error = f"not started: recording its state before the start failed: {failure!r}"
            with self._lock:
                if error is None and self._stopped:
                    error = "not started: the session was ending"
                if error is None:
                    self._process = subprocess.Popen(
                        run.command, cwd=run.cwd, env=run.env, stdout=stdout,
                        stderr=subprocess.STDOUT if run.merge_stderr else stderr, start_new_session=True,
                    )  # fmt: skip
            if error is None:
                try:
                    returncode = self._process.wait(timeout=run.timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self._process.pid, signal.SIGKILL)
                    returncode = self._process.wait()
                    error = f"killed after {run.timeout_s:.0f} s (its time limit)"
                if self._stopped and error is None and returncode < 0:
                    error = "killed: the session was ending"
        if error is not None:  # the log says why, so a test that shows the log shows it
            with (entry.stdout_path if run.merge_stderr else entry.stderr_path).open("a") as log:
                log.write(f"\n[background run {run.name}: {error}]\n")
        return FinishedRun(
            run, returncode, entry.stdout_path.read_text(encoding="utf-8", errors="replace"),
            entry.stderr_path.read_text(encoding="utf-8", errors="replace"), before, error,
        )  # fmt: skip
