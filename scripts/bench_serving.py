#!/usr/bin/env python
"""Serving benchmark: N concurrent streaming clients against inference/api_server.py vs one request at a time.

Starts a real server process on loopback (the tiny random model unless --model is given) twice: once serving one
request at a time (--max_concurrency 1, the others wait in its queue) and once with continuous batching
(--max_concurrency = --clients). Both get the same load: --clients threads sending greedy streamed requests. Prints
one JSON line per mode and a Markdown table: aggregate generated tokens/s, time to first token p50/p95, per-token
latency p50 (after the first token), and the speed-up of batching over one-at-a-time serving.

    python scripts/bench_serving.py                            # tiny model, 16 clients
    python scripts/bench_serving.py --model output/checkpoint-1000 --clients 32 --max_tokens 128 --device cuda
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from finetune.tiny_model import build_tiny_model

SERVER_SCRIPT = REPO_ROOT / "inference" / "api_server.py"
PROMPTS = [
    "类型#裙*颜色#红色*风格#简约",
    "类型#上衣*版型#宽松*图案#条纹",
    "hello, how are you?",
    "你好，请介绍一下你自己",
]
STARTUP_SECONDS = 300


def launch_server(models: list[str], port: int, extra: list[str]) -> subprocess.Popen:
    """Start inference/api_server.py serving `models` on 127.0.0.1:`port` and wait until /health answers."""
    command = [sys.executable, str(SERVER_SCRIPT), "--port", str(port), "--log_level", "warning"]
    for model in models:
        command += ["--model", model]
    process = subprocess.Popen([*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"the server did not answer /health within {STARTUP_SECONDS} s")


def timed_request(client: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One greedy streamed completion: seconds to the first content, total seconds, generated tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            # Only the events that matter are parsed, to keep the client's share of the CPU small.
            if first is None and '"content"' in line:
                chunk = json.loads(line[len("data: ") :])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
            if '"usage"' in line:
                tokens = json.loads(line[len("data: ") :])["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return {"ttft": first if first is not None else total, "total": total, "tokens": tokens}


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Send `requests` completions from `clients` threads; aggregate figures."""
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                result = timed_request(client, url, model, PROMPTS[index % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttfts = sorted(result["ttft"] for result in results)
    per_token = [
        (result["total"] - result["ttft"]) / (result["tokens"] - 1) for result in results if result["tokens"] > 1
    ]
    tokens = sum(result["tokens"] for result in results)
    return {
        "clients": clients,
        "requests": len(results),
        "generated_tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
        "per_token_ms_p50": round(1000 * statistics.median(per_token), 1) if per_token else None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint to serve (default: a tiny random model built in a temp folder)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent run")
    parser.add_argument("--requests", type=int, default=64, help="requests in the continuous-batching run")
    parser.add_argument("--sequential_requests", type=int, default=32, help="requests in the one-at-a-time run")
    parser.add_argument("--max_tokens", type=int, default=64, help="tokens generated per request (greedy)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--device", default="auto", help="passed to the server")
    parser.add_argument("--torch_threads", type=int, default=1, help="passed to the server (0: torch's default)")
    return parser.parse_args(argv)


def measure(checkpoint: str, args: argparse.Namespace, max_concurrency: int, requests: int) -> dict:
    """Serve `checkpoint` with `max_concurrency` batch rows and run the load of --clients clients against it."""
    extra = ["--max_concurrency", str(max_concurrency), "--max_queue", str(args.clients), "--device", args.device]
    if args.torch_threads:
        extra += ["--torch_threads", str(args.torch_threads)]
    server = launch_server([f"bench={checkpoint}"], args.port, extra)
    url = f"http://127.0.0.1:{args.port}"
    try:
        run_load(url, "bench", 1, 2, args.max_tokens)
        return run_load(url, "bench", args.clients, requests, args.max_tokens)
    finally:
        server.terminate()
        server.wait(60)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run both modes, print a JSON line each and the table; return the two result dicts."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workspace:
        checkpoint = args.model or str(build_tiny_model(Path(workspace) / "tiny"))
        sequential = {"mode": "one at a time"} | measure(checkpoint, args, 1, args.sequential_requests)
        concurrent = {"mode": "continuous batching"} | measure(checkpoint, args, args.clients, args.requests)
    concurrent["speedup"] = round(concurrent["tokens_per_s"] / sequential["tokens_per_s"], 2)
    rows = [sequential, concurrent]
    for row in rows:
        print(json.dumps(row))
    print("\n| mode | clients | requests | tokens/s | TTFT p50 (s) | TTFT p95 (s) | per-token p50 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['clients']} | {row['requests']} | {row['tokens_per_s']} | {row['ttft_p50_s']} | "
            f"{row['ttft_p95_s']} | {row['per_token_ms_p50']} |"
        )
    print(
        f"\nspeed-up of continuous batching over one request at a time ({args.clients} clients): "
        f"{concurrent['speedup']}x"
    )
    return rows


if __name__ == "__main__":
    main()
