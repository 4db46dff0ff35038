"""Start a real inference/api_server.py process on a free loopback port and talk to it (shared by the server tests)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import openai

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO_ROOT / "inference" / "api_server.py"
STARTUP_SECONDS = 180


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningServer:
    """A server process with its base URL; `stop()` sends SIGTERM and waits; `output()` is what it printed."""

    def __init__(self, models: list[str], *extra: str, api_key: str | None = None, env: dict | None = None):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(SERVER_SCRIPT), "--port", str(self.port), "--log_level", "warning"]
        for model in models:
            command += ["--model", model]
        if api_key:
            command += ["--api_key", api_key]
        self.log = tempfile.NamedTemporaryFile(prefix="api_server_", suffix=".log")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [*command, *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT.parent,
            env={**os.environ, **(env or {})},
        )
        self._wait_until_healthy()

    def output(self) -> str:
        """Everything the server printed so far."""
        return Path(self.log.name).read_text(encoding="utf-8", errors="replace")

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {STARTUP_SECONDS} s")

    def client(self, **kwargs) -> openai.OpenAI:
        """The official OpenAI client pointed at this server."""
        options = {"base_url": f"{self.url}/v1", "api_key": self.api_key or "unused", "max_retries": 0, **kwargs}
        return openai.OpenAI(**options)

    def headers(self) -> dict:
        """Headers that pass the API key check."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        """The /health body."""
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM the process and wait for it; returns its exit status (uvicorn ends by re-raising SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition()` until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
