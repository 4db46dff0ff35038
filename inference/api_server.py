"""OpenAI-compatible API server for any checkpoint kind, with continuous batching and a web chat page.

    python inference/api_server.py --model output/checkpoint-1000                      # one checkpoint
    python inference/api_server.py --model ad=output/lora --model tools=output/pt      # several, one base
    python inference/api_server.py --model CKPT --host 0.0.0.0 --port 8000 --api_key SECRET

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions (streaming as server-sent events or not),
GET /health, and the chat page at /. Binds 127.0.0.1 unless --host says otherwise. With --api_key (or
CHATGLM_API_KEY), /v1/* requests need `Authorization: Bearer KEY`. At most --max_concurrency requests decode together;
--max_queue more wait; beyond that the server answers 429 with Retry-After. A request the engine fails on gets a 500
naming the reason (other requests go on). SIGTERM stops accepting connections and lets running requests finish within
--grace_period seconds; the process then ends by SIGTERM's default action, as uvicorn does (exit status 143).
What requests may hold, and what is refused or ignored: docs/serving.md.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from finetune.checkpoints import ModelLoadError, add_loading_arguments
from finetune.generation import chat_prompt_ids, reply_stop_ids
from finetune.model.checkpoint_files import CheckpointError
from inference.openai_protocol import (
    ChatRequest,
    RequestError,
    assistant_reply,
    chatglm_turns,
    cut_at_stop_strings,
    parse_chat_request,
    streamable_content,
)
from inference.serving_engine import GenerationRequest
from inference.serving_models import LoadOptions, ServedModel, load_served_models

API_KEY_ENV = "CHATGLM_API_KEY"
WEB_PAGE = Path(__file__).resolve().parent / "web" / "index.html"
DISCONNECT_POLL_SECONDS = 0.25
OWNER = "chatglm3-finetune"
CLIENT_CLOSED_REQUEST = 499
RETRY_AFTER_SECONDS = 1
# Test hook for fault tests (see docs/serving.md): a request whose last message contains this variable's value fails in
# the engine once it has two tokens, as a CUDA out-of-memory error or a broken model would.
TEST_FAULT_ENV = "CHATGLM_SERVER_TEST_FAULT"
LOG = logging.getLogger("inference.api_server")


class GenerationError(RuntimeError):
    """The engine could not run a request; the message gives the reason."""


@dataclass
class ServerSettings:
    """Limits and access of a server."""

    api_key: str | None = None
    max_concurrency: int = 16
    max_queue: int = 64
    test_fault_marker: str | None = None


@dataclass
class Completion:
    """One chat completion as it runs: its prompt, the generated ids, the reply so far and how it ended."""

    served: ServedModel
    request: ChatRequest
    prompt_ids: list[int]
    max_new_tokens: int
    reply_prefix: str = ""
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    released: bool = False

    def usage(self) -> dict:
        """OpenAI usage counts."""
        prompt, completion = len(self.prompt_ids), len(self.generated)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        """One server-sent event of a streamed completion."""
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.served.name,
            "choices": [choice],
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def usage_chunk(self) -> str:
        """The last event of a stream asked for with stream_options.include_usage: no choices, the usage."""
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.served.name,
            "choices": [],
            "usage": self.usage(),
        }
        return f"data: {json.dumps(payload)}\n\n"


class EventRelay:
    """Carries engine callbacks (engine thread) to the requests' asyncio queues, one event-loop wake-up per step."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []

    def put(self, target: asyncio.Queue, event: tuple) -> None:
        """Queue an event for `target` (called on the engine thread)."""
        with self._lock:
            self._pending.append((target, event))

    def flush(self) -> None:
        """Deliver the queued events on the event loop (the engines' after_step hook)."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending and self.loop is not None:
            self.loop.call_soon_threadsafe(self._deliver, pending)

    @staticmethod
    def _deliver(pending: list[tuple[asyncio.Queue, tuple]]) -> None:
        for target, event in pending:
            target.put_nowait(event)


def ids_through_stop(ids: list[int], checked: int, decode: Callable[[list[int]], str], stop: list[str]) -> list[int]:
    """`ids` up to the one whose text completes a stop sequence (the first `checked` ids are known to hold none)."""
    for end in range(checked + 1, len(ids) + 1):
        if cut_at_stop_strings(decode(ids[:end]), stop)[1]:
            return ids[:end]
    return ids


def error_response(error: RequestError) -> JSONResponse:
    """The HTTP response of a RequestError (a 429 says when to retry)."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def generation_error(error: GenerationError) -> RequestError:
    """The 500 answer of a request the engine failed on."""
    return RequestError(f"generation failed: {error}", status=500, kind="server_error")


class ChatService:
    """Turns validated requests into engine requests and engine tokens into OpenAI replies."""

    def __init__(self, models: dict[str, ServedModel], settings: ServerSettings):
        self.models = models
        self.settings = settings
        self.in_flight = 0
        self.relay = EventRelay()
        self.engines = list({id(served.engine): served.engine for served in models.values()}.values())
        for engine in self.engines:
            engine.after_step = self.relay.flush

    def prepare(self, request: ChatRequest) -> Completion:
        """Look up the model, build the prompt and check its length; RequestError when it cannot run."""
        served = self.models.get(request.model)
        if served is None:
            raise RequestError(
                f"model {request.model!r} is not served here; served models: {', '.join(self.models)}", field="model"
            )
        history, query, role = chatglm_turns(request)
        prompt_ids = chat_prompt_ids(served.tokenizer, query, history, role)
        reply_prefix = ""
        if request.forced_tool is not None:  # the reply starts as a call of that tool: its name is the metadata line
            reply_prefix = f"{request.forced_tool}\n"
            prompt_ids += served.tokenizer.sp_model.encode(reply_prefix)
        room = served.seq_length - len(prompt_ids)
        if room <= 0:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens, the model's context (seq_length) is {served.seq_length}; "
                "shorten the messages",
                field="messages",
            )
        if request.max_tokens is not None and request.max_tokens > room:
            raise RequestError(
                f"max_tokens {request.max_tokens} + the prompt's {len(prompt_ids)} tokens exceed the model's context "
                f"(seq_length {served.seq_length}); ask for at most {room}",
                field="max_tokens",
            )
        return Completion(served, request, prompt_ids, request.max_tokens or room, reply_prefix)

    def admit(self) -> None:
        """Count a request in, or raise a 429 RequestError when the batch and the queue are full."""
        capacity = self.settings.max_concurrency + self.settings.max_queue
        if self.in_flight >= capacity:
            raise RequestError(
                f"the server is busy: {self.in_flight} requests running or queued (--max_concurrency "
                f"{self.settings.max_concurrency} + --max_queue {self.settings.max_queue}); retry later",
                status=429,
                kind="rate_limit_exceeded",
            )
        self.in_flight += 1

    def release(self, completion: Completion) -> None:
        """Count a request out (once, whichever path ends it first)."""
        if not completion.released:
            completion.released = True
            self.in_flight -= 1

    async def release_after_response(self, completion: Completion) -> None:
        """release() as a response's background task (an async one: starlette runs plain functions in a thread)."""
        self.release(completion)

    async def events(self, completion: Completion) -> AsyncIterator[str]:
        """Run a completion on its engine and yield content pieces as they become final (stream order).

        The first piece, possibly empty, comes once the engine has produced the first token or ended the request;
        GenerationError when the engine failed on it."""
        events: asyncio.Queue = asyncio.Queue()
        request, served = completion.request, completion.served
        stop_ids = frozenset(reply_stop_ids(served.tokenizer))
        marker = self.settings.test_fault_marker
        job = GenerationRequest(
            prompt_ids=completion.prompt_ids,
            max_new_tokens=completion.max_new_tokens,
            stop_ids=stop_ids,
            on_token=lambda token: self.relay.put(events, ("token", token)),
            on_finish=lambda reason: self.relay.put(events, ("finish", reason)),
            variant=served.variant,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            fail_after_tokens=2 if marker and marker in (request.messages[-1]["content"] or "") else None,
        )
        try:
            served.engine.submit(job)
        except RuntimeError as error:
            raise GenerationError(str(error)) from error

        def decode(ids: list[int]) -> str:
            return completion.reply_prefix + served.tokenizer.decode_ids(ids)

        hold_back = max((len(sequence) for sequence in request.stop), default=1) - 1
        sent = ""
        first = True
        try:
            while completion.finish_reason is None:
                arrived = [await events.get()]
                while not events.empty():  # under load, several steps' tokens are handled at once
                    arrived.append(events.get_nowait())
                earlier = len(completion.generated)
                for kind, value in arrived:
                    if kind == "token":
                        completion.generated.append(value)
                    elif value.startswith("error: ") or value == "cancelled":
                        raise GenerationError(value.removeprefix("error: "))
                    else:
                        completion.finish_reason = value
                text = decode(completion.generated)
                completion.text, stopped = cut_at_stop_strings(text, request.stop)
                if stopped:
                    completion.finish_reason = "stop"
                    completion.generated = ids_through_stop(completion.generated, earlier, decode, request.stop)
                if completion.finish_reason is not None:
                    continue
                # Text that may still turn out to start a stop sequence is not sent yet.
                content = streamable_content(text[: len(text) - hold_back], request.tools)
                if len(content) > len(sent) or first:
                    yield content[len(sent) :]
                    sent, first = content, False
            if first:
                yield ""
            content, _ = assistant_reply(completion.text, request.tools)
            if content and content.startswith(sent) and len(content) > len(sent):
                yield content[len(sent) :]
        finally:
            job.cancel()

    def response(self, completion: Completion) -> dict:
        """The non-streamed chat.completion object of a finished completion."""
        content, tool_calls = assistant_reply(completion.text, completion.request.tools)
        message: dict = {"role": "assistant", "content": content}
        finish_reason = completion.finish_reason
        if tool_calls:
            message["tool_calls"] = tool_calls
            finish_reason = "tool_calls"
        return {
            "id": completion.id,
            "object": "chat.completion",
            "created": completion.created,
            "model": completion.served.name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": completion.usage(),
        }

    async def stream(self, completion: Completion, first: str, pieces: AsyncIterator[str]) -> AsyncIterator[str]:
        """Server-sent events of a streamed completion: its `first` piece (see start_stream), then the other `pieces`;
        a client that goes away cancels it (finally below). An engine failure midway ends it with an error event."""
        try:
            yield completion.chunk({"role": "assistant", "content": ""})
            if first:
                yield completion.chunk({"content": first})
            try:
                async for piece in pieces:
                    if piece:
                        yield completion.chunk({"content": piece})
            except GenerationError as error:
                LOG.error("request %s failed midway: %s", completion.id, error)
                yield f"data: {json.dumps(generation_error(error).body(), ensure_ascii=False)}\n\n"
                return
            _, tool_calls = assistant_reply(completion.text, completion.request.tools)
            finish_reason = completion.finish_reason
            closing = []  # sent in one write
            if tool_calls:
                calls = [{"index": index, **call} for index, call in enumerate(tool_calls)]
                closing.append(completion.chunk({"tool_calls": calls}))
                finish_reason = "tool_calls"
            closing.append(completion.chunk({}, finish_reason))
            if completion.request.stream_usage:
                closing.append(completion.usage_chunk())
            closing.append("data: [DONE]\n\n")
            yield "".join(closing)
        finally:
            await pieces.aclose()
            self.release(completion)

    async def start_stream(
        self, completion: Completion, http_request: Request
    ) -> tuple[str, AsyncIterator[str]] | None:
        """Start a streamed completion and wait for its first token, so that a request the engine fails on still gets
        a 500: the first piece and the rest, or None when the client disconnected first. GenerationError on failure."""
        pieces = self.events(completion)
        first = asyncio.ensure_future(anext(pieces))
        if not await self._wait(first, http_request):
            await pieces.aclose()
            return None
        return first.result(), pieces

    async def complete(self, completion: Completion, http_request: Request) -> dict | None:
        """Run a non-streamed completion; None when the client disconnected (its batch slot is freed at once).
        GenerationError when the engine failed on it."""
        try:
            task = asyncio.ensure_future(self._drain(completion))
            if not await self._wait(task, http_request):
                return None
            task.result()
            return self.response(completion)
        finally:
            self.release(completion)

    @staticmethod
    async def _wait(task: asyncio.Future, http_request: Request) -> bool:
        """Wait for `task`; False (and `task` cancelled) when the client disconnects first."""
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return True
            if await http_request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return False

    async def _drain(self, completion: Completion) -> None:
        async for _ in self.events(completion):
            pass


class ApiKeyMiddleware:
    """ASGI middleware: /v1/* requests need `Authorization: Bearer KEY` (a plain ASGI layer, so that handlers still
    see a client disconnect)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    def allows(self, scope: dict) -> bool:
        """True when the request may pass."""
        if self.api_key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        """Answer 401 to a request without the key, else pass it on."""
        if self.allows(scope):
            await self.app(scope, receive, send)
            return
        error = RequestError(
            "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's --api_key",
            status=401,
            kind="invalid_api_key",
        )
        await error_response(error)(scope, receive, send)


def create_app(models: dict[str, ServedModel], settings: ServerSettings) -> FastAPI:
    """The FastAPI application serving `models`."""
    service = ChatService(models, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.relay.loop = asyncio.get_running_loop()
        yield
        for engine in service.engines:
            engine.stop()

    app = FastAPI(title="ChatGLM3 fine-tuned models", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service

    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)

    @app.get("/health")
    async def health() -> dict:
        failures = [engine.failure for engine in service.engines if engine.failure]
        return {
            "status": "error: " + "; ".join(failures) if failures else "ok",
            "models": list(models),
            "in_flight": service.in_flight,
            "running": sum(engine.running for engine in service.engines),
        }

    def model_card(served: ServedModel) -> dict:
        """The OpenAI model object, with the context length (vLLM's max_model_len) and the checkpoint kind."""
        return {
            "id": served.name,
            "object": "model",
            "created": 0,
            "owned_by": OWNER,
            "max_model_len": served.seq_length,
            "checkpoint_kind": served.kind.value,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(served) for served in models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in models:
            error = RequestError(
                f"model {model_id!r} is not served here; served models: {', '.join(models)}", "model", status=404
            )
            return error_response(error)
        return model_card(models[model_id])

    @app.get("/")
    async def web_page() -> FileResponse:
        return FileResponse(WEB_PAGE, media_type="text/html")

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            try:
                body = json.loads(await http_request.body())
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                raise RequestError(f"the request body is not valid JSON: {error}") from error
            try:
                request = parse_chat_request(body)
            except RecursionError as error:
                raise RequestError("the request body is nested too deeply") from error
            if request.ignored_fields:
                ignored = ", ".join(request.ignored_fields)
                LOG.warning("ignored request fields (they cannot change the reply): %s", ignored)
            completion = service.prepare(request)
            service.admit()
        except RequestError as error:
            return error_response(error)
        try:
            if request.stream:
                started = await service.start_stream(completion, http_request)
                if started is None:
                    service.release(completion)
                    return Response(status_code=CLIENT_CLOSED_REQUEST)
                # The background task also counts the request out when the client left before the stream started.
                return StreamingResponse(
                    service.stream(completion, *started),
                    media_type="text/event-stream",
                    background=BackgroundTask(service.release_after_response, completion),
                )
            reply = await service.complete(completion, http_request)
        except GenerationError as error:
            service.release(completion)
            LOG.error("request %s failed: %s", completion.id, error)
            return error_response(generation_error(error))
        if reply is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(reply)

    return app


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the server."""
    parser = argparse.ArgumentParser(description="Serve ChatGLM3 checkpoints behind an OpenAI-compatible API.")
    add_loading_arguments(parser, several_models=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV), help=f"require this key (or ${API_KEY_ENV})")
    parser.add_argument("--max_concurrency", type=int, default=16, help="requests decoded together (batch rows)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting for a slot before 429")
    parser.add_argument("--grace_period", type=float, default=30.0, help="seconds running requests get on SIGTERM")
    parser.add_argument("--log_level", default="info", help="uvicorn log level")
    parser.add_argument(
        "--torch_threads", type=int, help="CPU threads for torch (default: torch's); 1 suits small models on few cores"
    )
    return parser


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable from other machines without an API key (None when there is none to give)."""
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (
        f"warning: --host {host} makes the server reachable from other machines, and without --api_key (or "
        f"${API_KEY_ENV}) anyone who can reach it can use it"
    )


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn (bound before the models load, so a taken port fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


class QuietInterruptServer(uvicorn.Server):
    """uvicorn's server, where Ctrl-C prints one line instead of uvicorn's shutdown messages."""

    def handle_exit(self, sig: int, frame) -> None:
        """Note the signal as uvicorn does; on the first Ctrl-C say so and quiet the shutdown messages."""
        if sig == signal.SIGINT and not self.should_exit:
            print("interrupted (Ctrl-C): the server stops", file=sys.stderr, flush=True)
            logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    """Load the models and serve until SIGTERM/SIGINT; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_concurrency < 1 or args.max_queue < 0:
        parser.error("--max_concurrency must be at least 1 and --max_queue at least 0")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s:     %(name)s: %(message)s")
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(warning, file=sys.stderr)
    try:
        listener = bind_socket(args.host, args.port)
    except OSError as error:
        print(f"error: cannot listen on {args.host}:{args.port}: {error.strerror}; stop what uses it or pick another "
              "--port", file=sys.stderr)
        return 2
    with listener:
        options = LoadOptions(
            args.base, args.tokenizer, args.device, args.dtype, args.quantization_bit, args.allow_other_base
        )
        try:
            models = load_served_models(args.model, options, args.max_concurrency)
        except (CheckpointError, ModelLoadError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C) while loading the models", file=sys.stderr)
            return 130
        for served in models.values():
            print(f"serving {served.name}: {served.kind.value} checkpoint {served.path}", file=sys.stderr)
        settings = ServerSettings(args.api_key, args.max_concurrency, args.max_queue, os.environ.get(TEST_FAULT_ENV))
        config = uvicorn.Config(
            create_app(models, settings),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=args.grace_period,
        )
        try:
            QuietInterruptServer(config).run(sockets=[listener])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, once it has shut down
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
