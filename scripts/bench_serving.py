#!/usr/bin/env python
"""Serving benchmark: N concurrent streaming clients against inference/api_server.py vs one request at a time.

Starts a real server process on loopback twice: once serving one request at a time (--max_concurrency 1, the others
wait in its queue) and once with continuous batching (--max_concurrency = --clients). Both get the same load: --clients
threads sending greedy streamed requests. Prints one JSON line per mode and a Markdown table: aggregate generated
tokens/s, time to first token p50/p95, per-token latency p50 (after the first token), and the speed-up of batching over
one-at-a-time serving.

Without --model it serves a random model of --shape ("tiny", or "6b": ChatGLM3-6B's shape in bfloat16, GPU only),
whose output layer is first fitted for a few steps so that replies start with ChatGLM3's blank metadata line, as a
fine-tuned checkpoint's do: the server streams such replies token by token (it holds back a first line that may still
name a tool), so the benchmark measures real streaming.

    python scripts/bench_serving.py                            # tiny model, 16 clients
    python scripts/bench_serving.py --shape 6b --clients 32 --max_tokens 128 --torch_threads 0
    python scripts/bench_serving.py --model output/checkpoint-1000 --clients 32 --max_tokens 128 --device cuda
"""

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch

from finetune.data.encoding import encode_conversation
from finetune.model.configuration import CHATGLM3_6B_FIELDS, ChatGLMConfig
from finetune.model.modeling import ChatGLMForConditionalGeneration
from finetune.model.tokenization import ChatGLMTokenizer
from finetune.tiny_model import build_tiny_model, default_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO_ROOT / "inference" / "api_server.py"
PROMPTS = [
    "类型#裙*颜色#红色*风格#简约",
    "类型#上衣*版型#宽松*图案#条纹",
    "hello, how are you?",
    "你好，请介绍一下你自己",
]
STARTUP_SECONDS = 300
# A streamed event with content (the first event, the role, has none) and the end of a chunked HTTP body.
CONTENT_EVENT = b'"delta": {"content": "'
END_OF_CHUNKED_BODY = b"\r\n0\r\n\r\n"
# Random models to serve: the tiny test shape, and ChatGLM3-6B's (the official class defaults plus the fields where
# chatglm3-6b differs; the tokenizer is the tiny one, so the output layer has 960 rows instead of 65,024).
SIX_B_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size")
SHAPES = {
    "tiny": {"dtype": torch.float32, "device": "cpu"},
    "6b": {
        **{name: getattr(ChatGLMConfig(), name) for name in SIX_B_FIELDS},
        **CHATGLM3_6B_FIELDS,
        "dtype": torch.bfloat16,
        "device": "cuda",
    },
}
REPLY_FORMAT_STEPS = 30
REPLY_FORMAT_TOKENS = 16


def build_benchmark_model(folder: Path, shape: dict) -> Path:
    """A random model of `shape` whose replies to PROMPTS start as a fine-tuned ChatGLM3's (see the module doc)."""
    options = {key: value for key, value in shape.items() if key != "add_qkv_bias"}  # always on in tiny models
    return build_tiny_model(folder, prepare=teach_reply_format, **options)


def teach_reply_format(model: ChatGLMForConditionalGeneration, tokenizer: ChatGLMTokenizer) -> None:
    """Fit the output layer for a few steps on PROMPTS answered with the start of product copy, in ChatGLM3's format."""
    replies = [line for line in default_corpus(len(PROMPTS) * 4) if line.startswith("这款")]
    rows = []
    for prompt, reply in zip(PROMPTS, replies[: len(PROMPTS)], strict=True):
        length = len(tokenizer.build_chat_input(prompt)["input_ids"][0]) + REPLY_FORMAT_TOKENS
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        rows.append(encode_conversation({"conversations": conversation}, tokenizer, length))
    width = max(len(row["input_ids"]) for row in rows)
    padding = [width - len(row["input_ids"]) for row in rows]
    device = model.device
    input_ids = torch.tensor(
        [[0] * pad + row["input_ids"] for pad, row in zip(padding, rows, strict=True)], device=device
    )
    labels = torch.tensor([[-100] * pad + row["labels"] for pad, row in zip(padding, rows, strict=True)], device=device)
    mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in padding], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output_layer = model.get_output_embeddings()
    model.requires_grad_(False)
    output_layer.requires_grad_(True)
    optimizer = torch.optim.AdamW(output_layer.parameters(), lr=1e-2)
    model.train()
    for _ in range(REPLY_FORMAT_STEPS):
        model(input_ids=input_ids, attention_mask=mask, position_ids=positions, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


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


class LoopbackClient:
    """One keep-alive HTTP/1.1 connection to the server for streamed completions. It reads the server-sent events as
    they arrive but parses only what the figures need: the load generator shares the machine's cores with the server,
    and a general HTTP client spends more CPU per event than the server does (it would cap both modes alike)."""

    def __init__(self, port: int):
        self.connection = socket.create_connection(("127.0.0.1", port))
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()

    def timed_completion(self, model: str, prompt: str, max_tokens: int) -> dict:
        """One greedy streamed completion: seconds to the first content, total seconds, generated tokens."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payload = json.dumps(body).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        start = time.perf_counter()
        self.connection.sendall(head.encode() + payload)
        received = bytearray()
        first = None
        while not received.endswith(END_OF_CHUNKED_BODY):
            block = self.connection.recv(1 << 16)
            if not block:
                raise ConnectionError(f"the server closed the connection mid-response: {bytes(received[:300])!r}")
            searched_from = max(len(received) - len(CONTENT_EVENT), 0)
            received += block
            if first is None and received.find(CONTENT_EVENT, searched_from) >= 0:
                first = time.perf_counter() - start
            if not received.startswith(b"HTTP/1.1 200") and b"\r\n\r\n" in received:
                raise RuntimeError(f"the server answered {bytes(received[:300])!r}")
        total = time.perf_counter() - start
        usage = next(line for line in received.split(b"\n") if line.startswith(b"data: ") and b'"usage"' in line)
        tokens = json.loads(usage[len(b"data: ") :])["usage"]["completion_tokens"]
        return {"ttft": first if first is not None else total, "total": total, "tokens": tokens}


def run_load(port: int, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Send `requests` completions from `clients` threads; aggregate figures."""
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop() -> None:
        client = LoopbackClient(port)
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                result = client.timed_completion(model, PROMPTS[index % len(PROMPTS)], max_tokens)
                with lock:
                    results.append(result)
        finally:
            client.close()

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
    parser.add_argument("--model", help="checkpoint to serve (default: a random model of --shape, in a temp folder)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="random model shape (6b: GPU only)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent run")
    parser.add_argument("--requests", type=int, default=64, help="requests in the continuous-batching run")
    parser.add_argument("--sequential_requests", type=int, default=32, help="requests in the one-at-a-time run")
    parser.add_argument("--max_tokens", type=int, default=64, help="tokens generated per request (greedy)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--device", default="auto", help="passed to the server")
    parser.add_argument("--torch_threads", type=int, default=1, help="passed to the server (0: torch's default)")
    args = parser.parse_args(argv)
    if args.model is None and SHAPES[args.shape]["device"] == "cuda" and not torch.cuda.is_available():
        parser.error(f"--shape {args.shape} builds its random model on a CUDA GPU and none is available here")
    return args


def measure(checkpoint: str, args: argparse.Namespace, max_concurrency: int, requests: int) -> dict:
    """Serve `checkpoint` with `max_concurrency` batch rows and run the load of --clients clients against it."""
    extra = ["--max_concurrency", str(max_concurrency), "--max_queue", str(args.clients), "--device", args.device]
    if args.torch_threads:
        extra += ["--torch_threads", str(args.torch_threads)]
    server = launch_server([f"bench={checkpoint}"], args.port, extra)
    try:
        run_load(args.port, "bench", 1, 2, args.max_tokens)
        return run_load(args.port, "bench", args.clients, requests, args.max_tokens)
    finally:
        server.terminate()
        server.wait(60)


def main(argv: list[str] | None = None) -> list[dict]:
    """Run both modes, print a JSON line each and the table; return the two result dicts."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as workspace:
        checkpoint = args.model or str(build_benchmark_model(Path(workspace) / args.shape, SHAPES[args.shape]))
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
