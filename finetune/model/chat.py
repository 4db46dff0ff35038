"""chat() and stream_chat() for ChatGLM3: role-message history, tools, observations, stop on the role tokens."""

import copy
import queue
import threading
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from finetune.data.tool_calls import parse_tool_call

# Imported as a module: finetune.generation imports the model package, which imports this module.
from finetune import generation

REPLACEMENT_CHARACTER = "\ufffd"
# The official response post-processing replaces this placeholder of the training data in plain answers.
TRAINING_DATE_PLACEHOLDER = ("[[训练时间]]", "2023年")


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
            reply = content.replace(*TRAINING_DATE_PLACEHOLDER)
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


class _StopWhenSet(StoppingCriteria):
    """Ends generation once its event is set: the consumer of a stream stopped reading (closed, or Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatMixin:
    """Conversation helpers mixed into ChatGLMForConditionalGeneration (the official chat API)."""

    @torch.inference_mode()
    def chat(
        self, tokenizer, query: str, history: list[dict] | None = None, role: str = "user", **gen_kwargs
    ) -> tuple[str | dict, list[dict]]:
        """One conversation turn: returns the reply and the new history (official ChatGLM3 chat semantics)."""
        history = list(history or [])
        input_ids = torch.tensor([generation.chat_prompt_ids(tokenizer, query, history, role)], device=self.device)
        kwargs = generation.chat_generation_kwargs(tokenizer, dict(gen_kwargs))
        outputs = self.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        new_ids = generation.cut_at_stop(outputs[0, input_ids.shape[1] :].tolist(), kwargs["eos_token_id"])
        history.append({"role": role, "content": query})
        return split_response(tokenizer.decode(new_ids), history)

    def stream_generate(
        self, input_ids: torch.LongTensor, return_past_key_values: bool = False, **kwargs
    ) -> Iterator[torch.LongTensor | tuple[torch.LongTensor, Cache]]:
        """Generate for one row, yielding the ids so far (prompt included) after each new token.

        With `return_past_key_values=True` each item is (ids, cache); the cache is complete once the loop ends (it
        holds every token but the last, as the official stream_generate's). Other kwargs go to `generate`.
        """
        if input_ids.shape[0] != 1:
            raise ValueError(f"stream_generate streams one row; got a batch of {input_ids.shape[0]}")
        cache = kwargs.pop("past_key_values", None) or kwargs.pop("cache", None)
        if return_past_key_values and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            kwargs["cache"] = cache
        streamer = _TokenQueueStreamer(prompt_length=input_ids.shape[1])
        errors: list[BaseException] = []
        stop = threading.Event()
        stopping = [*(kwargs.get("stopping_criteria") or []), _StopWhenSet(stop)]
        kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)

        def run_generate() -> None:
            try:
                with torch.inference_mode():
                    self.generate(input_ids=input_ids, **kwargs, streamer=streamer)
            except BaseException as error:  # re-raised in the consuming thread below
                errors.append(error)
                streamer.end()

        worker = threading.Thread(target=run_generate, daemon=True)
        worker.start()
        ids = input_ids
        try:
            while (new_ids := streamer.queue.get()) is not None:
                ids = torch.cat((ids, torch.tensor([new_ids], dtype=ids.dtype, device=ids.device)), dim=1)
                yield (ids, cache) if return_past_key_values else ids
        finally:
            # Also when the consumer stops early (the generator closed, or KeyboardInterrupt while waiting): end
            # generation at the next token and wait for it, so no thread is left running in torch at exit.
            stop.set()
            worker.join()
        if errors:
            raise errors[0]

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[dict] | None = None,
        role: str = "user",
        past_key_values: Cache | None = None,
        return_past_key_values: bool = False,
        **gen_kwargs,
    ) -> Iterator[tuple]:
        """Like chat(), but yields (partial reply, history) as the reply grows; the last item is the full turn.

        As the official stream_chat: with `past_key_values` (the cache a previous call returned) only the new query
        is encoded and appended to the cached conversation; `return_past_key_values=True` yields
        (reply, history, past_key_values). Items with an empty or unchanged reply are not yielded.
        """
        history = list(history or [])
        kwargs = generation.chat_generation_kwargs(tokenizer, dict(gen_kwargs))
        stop_ids = kwargs["eos_token_id"]
        if past_key_values is None:
            input_ids = torch.tensor([generation.chat_prompt_ids(tokenizer, query, history, role)], device=self.device)
        else:
            # generate() takes the whole sequence and skips the cached part; those positions only need a placeholder.
            new_ids = generation.chat_prompt_ids(tokenizer, query, [], role)
            past_length = past_key_values.get_seq_length()
            input_ids = torch.tensor([[tokenizer.pad_token_id] * past_length + new_ids], device=self.device)
        attention_mask = torch.ones_like(input_ids)
        turn_history = history + [{"role": role, "content": query}]
        prompt_length = input_ids.shape[1]
        last_text = text = ""
        cache = past_key_values
        for item in self.stream_generate(
            input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            return_past_key_values=return_past_key_values,
            **kwargs,
        ):
            ids, cache = item if return_past_key_values else (item, None)
            text = tokenizer.decode(generation.cut_at_stop(ids[0, prompt_length:].tolist(), stop_ids))
            if text and not text.endswith(REPLACEMENT_CHARACTER) and text != last_text:
                last_text = text
                reply, new_history = split_response(text, turn_history)
                yield (reply, new_history, cache) if return_past_key_values else (reply, new_history)
        if text and text != last_text:
            # The whole reply ends inside a multi-byte character (cut by the length limit): still give it, as chat().
            reply, new_history = split_response(text, turn_history)
            yield (reply, new_history, cache) if return_past_key_values else (reply, new_history)
