"""chat() and stream_chat() for ChatGLM3: role-message history, tools, observations, stop on the role tokens."""

import copy
import queue
import threading
from collections.abc import Iterator

import torch
from transformers.generation.streamers import BaseStreamer

from data_tools.tool_calls import parse_tool_call

REPLACEMENT_CHARACTER = "\ufffd"


def split_response(output: str, history: list[dict]) -> tuple[str | dict, list[dict]]:
    """Turn decoded model output into the reply and the history with the assistant turn(s) appended.

    A plain answer becomes a string. An answer with metadata (a tool name) becomes
    {"name", "parameters"} when the conversation declared tools, else {"name", "content"}.
    """
    history = copy.deepcopy(history)
    has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    reply: str | dict = ""
    for segment in output.split("<|assistant|>"):
        metadata, _, content = segment.partition("\n") if "\n" in segment else ("", "", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            reply = content
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        if has_tools:
            try:
                reply = {"name": metadata.strip(), "parameters": parse_tool_call(content)}
            except ValueError:
                reply = {"name": metadata.strip(), "content": content}
        else:
            reply = {"name": metadata.strip(), "content": content}
    return reply, history


class _TokenQueueStreamer(BaseStreamer):
    """Receives generated token ids from generate() and hands them to the consuming thread."""

    def __init__(self, prompt_length: int):
        self.queue: queue.Queue = queue.Queue()
        self.skip = prompt_length

    def put(self, value: torch.Tensor) -> None:
        """Queue new tokens (the prompt, sent first, is skipped)."""
        ids = value.reshape(-1).tolist()
        if self.skip:
            ids = ids[self.skip :]
            self.skip = 0
        if ids:
            self.queue.put(ids)

    def end(self) -> None:
        """Signal the end of generation."""
        self.queue.put(None)


class ChatMixin:
    """Conversation helpers mixed into ChatGLMForConditionalGeneration."""

    def _chat_generation_kwargs(self, tokenizer, gen_kwargs: dict) -> dict:
        stop_ids = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
        defaults = {"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8}
        return {**defaults, **gen_kwargs, "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_token_id}

    @staticmethod
    def _strip_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] in stop_ids else ids

    @torch.inference_mode()
    def chat(
        self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user", **gen_kwargs
    ) -> tuple[str | dict, list[dict]]:
        """One conversation turn: returns the reply and the new history (official ChatGLM3 chat semantics)."""
        history = list(history or [])
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        kwargs = self._chat_generation_kwargs(tokenizer, gen_kwargs)
        outputs = self.generate(**inputs, **kwargs)
        new_ids = self._strip_stop(outputs[0, inputs["input_ids"].shape[1] :].tolist(), kwargs["eos_token_id"])
        history.append({"role": role, "content": query})
        return split_response(tokenizer.decode(new_ids), history)

    def stream_chat(
        self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user", **gen_kwargs
    ) -> Iterator[tuple[str | dict, list[dict]]]:
        """Like chat(), but yields (partial reply, history) as tokens arrive; the last item is the full turn."""
        history = list(history or [])
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        kwargs = self._chat_generation_kwargs(tokenizer, gen_kwargs)
        streamer = _TokenQueueStreamer(prompt_length=inputs["input_ids"].shape[1])
        errors: list[BaseException] = []

        def run_generate() -> None:
            try:
                with torch.inference_mode():
                    self.generate(**inputs, **kwargs, streamer=streamer)
            except BaseException as error:  # re-raised in the consuming thread below
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=run_generate, daemon=True)
        worker.start()
        new_ids: list[int] = []
        turn_history = history + [{"role": role, "content": query}]
        while (ids := streamer.queue.get()) is not None:
            new_ids.extend(ids)
            text = tokenizer.decode(self._strip_stop(new_ids, kwargs["eos_token_id"]))
            if text and not text.endswith(REPLACEMENT_CHARACTER):
                yield split_response(text, turn_history)
        worker.join()
        if errors:
            raise errors[0]
        yield split_response(tokenizer.decode(self._strip_stop(new_ids, kwargs["eos_token_id"])), turn_history)
