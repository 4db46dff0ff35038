"""The one generation path: ChatGLM3 prompts, generation settings, sampling, batched generation and the stop rule.

Every generating command goes through this module: evaluation during training (FinetuneTrainer), standalone
evaluation (finetune.evaluate), chat (`model.chat` / `model.stream_chat`), batch inference (inference.chat_cli) and
the server (inference.serving_engine keeps its own continuous-batching step loop, with this module's sampling and
stop ids).

Prompt token ids (this module is the only one that builds them):
- a prompt text (input-output records): `[gMASK] sop` + prompt, truncated exactly as the training encoding
  truncates the source;
- chat messages (conversations): the chat turns as in training, then `<|assistant|>`; a prompt longer than
  max_source_length loses its oldest tokens after `[gMASK] sop`;
- chat: the tokenizer's `build_chat_input` (the official ChatGLM3 chat format, tools and observations included).

Which prompts a record gives and what each one's reference is belongs to the record's data format
(finetune/data/formats/: `prompt_example`, `evaluation_examples`): the format splits the record into the prompt (the
text, or the message history) and the reference, and calls the builders here for the ids. Evaluation during training
and `python -m finetune.evaluate` both score exactly the turns the format gives (finetune.data.formats.
evaluation_examples).

The stop rule: a reply ends at its first stop id (`reply_stop_ids`: eos, `<|user|>`, `<|observation|>`);
`cut_at_stop` is the only function that applies it (the serving engine applies it one token at a time).
"""

import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

# The module, not its names: finetune.data.encoding imports finetune.model, whose chat code imports this module.
from finetune.data import encoding
from finetune.data.tool_calls import read_tool_call
from finetune.model.tokenization import reply_stop_ids

# Temperatures at or below this are greedy decoding (the server's temperature 0).
GREEDY_TEMPERATURE = 1e-5
# The official chat code writes this token when a step's scores hold NaN or inf, instead of failing to sample.
INVALID_SCORE_FALLBACK_TOKEN = 5
# model.chat's defaults, as the official chat(): sampling, and a total length limit unless max_new_tokens is given.
CHAT_DEFAULTS = {"do_sample": True, "top_p": 0.8, "temperature": 0.8}
CHAT_MAX_LENGTH = 8192


def cut_at_stop(ids: Sequence[int], stop_ids: Collection[int], keep_stop: bool = False) -> list[int]:
    """Generated ids up to the first stop id (included with `keep_stop`); whatever follows it is dropped."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return list(ids[: position + 1]) if keep_stop else list(ids[:position])
    return list(ids)


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """The official guard of chat(): scores with NaN or inf become a certain pick of the fallback token."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Scores unchanged when finite, else zeros with a large score on the fallback token."""
        if bool(torch.isfinite(scores).all()):
            return scores
        replaced = torch.zeros_like(scores)
        replaced[..., INVALID_SCORE_FALLBACK_TOKEN] = 5e4
        return replaced


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token from 1-D logits: greedy at temperature ~0, else temperature + nucleus (top_p) sampling."""
    if temperature <= GREEDY_TEMPERATURE:
        return int(logits.argmax())
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        outside = sorted_probabilities.cumsum(-1) - sorted_probabilities > top_p
        sorted_probabilities[outside] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(0, order, sorted_probabilities)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


def chat_generation_kwargs(tokenizer: PreTrainedTokenizer, gen_kwargs: dict) -> dict:
    """`generate` keyword arguments of model.chat: the official defaults, the caller's settings, the stop ids and the
    invalid-score guard after the caller's logits processors."""
    defaults = dict(CHAT_DEFAULTS)
    if "max_new_tokens" not in gen_kwargs:
        defaults["max_length"] = CHAT_MAX_LENGTH
    processors = LogitsProcessorList(gen_kwargs.pop("logits_processor", None) or [])
    processors.append(InvalidScoreLogitsProcessor())
    return {
        **defaults,
        **gen_kwargs,
        "logits_processor": processors,
        "eos_token_id": reply_stop_ids(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_generation_config(
    tokenizer: PreTrainedTokenizer,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 0.95,
    top_p: float = 0.7,
    num_beams: int = 1,
) -> GenerationConfig:
    """Generation settings with ChatGLM3's stop ids and the KV cache; sampling knobs only when sampling."""
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=num_beams,
        eos_token_id=reply_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )


# ---- prompts ----------------------------------------------------------------------------------------------------


@dataclass
class PromptExample:
    """One prompt ready for generation: what to show as the prompt, its token ids, and the reference if any.

    `label_call` is the reference tool call (`{"name", "arguments"}`) of a conversation turn that is a call, in
    which case `label` is None; `example_id` is "<record index>" or "<record index>:<message position>".
    """

    prompt: str | list[dict]
    prompt_ids: list[int]
    label: str | None
    reply_has_metadata: bool
    label_call: dict | None = None
    example_id: str = ""


def chat_prompt_ids(tokenizer: PreTrainedTokenizer, query: str, history: list[dict], role: str = "user") -> list[int]:
    """Ids of the official chat prompt: `[gMASK] sop`, the history (tools included), the query, `<|assistant|>`."""
    return tokenizer.build_chat_input(query, history=history, role=role)["input_ids"][0].tolist()


def input_output_prompt_ids(prompt: str, tokenizer: PreTrainedTokenizer, max_source_length: int) -> list[int]:
    """`[gMASK] sop` + prompt ids, truncated exactly as the training encoding truncates the source."""
    encoded = encoding.encode_input_output({"prompt": prompt, "response": ""}, tokenizer, max_source_length, 0)
    source_length = encoded["labels"].count(encoding.IGNORE_INDEX)
    return encoded["input_ids"][:source_length]


def conversation_prompt_ids(
    messages: list[dict], tools: list | None, tokenizer: PreTrainedTokenizer, max_source_length: int
) -> list[int]:
    """Chat turns as in training, then `<|assistant|>`; a long prompt loses its oldest tokens after `[gMASK] sop`."""
    ids, _ = encoding.conversation_tokens({"conversations": messages, "tools": tools}, tokenizer)
    ids = ids[:-1] + [tokenizer.get_command("<|assistant|>")]
    if len(ids) > max_source_length:
        keep = max(max_source_length - 2, 1)
        ids = ids[:2] + ids[-keep:]
    return ids


# ---- generation -------------------------------------------------------------------------------------------------


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length, longest first, so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda index: lengths[index], reverse=True)
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizer,
    prompts: Sequence[list[int]],
    generation_config: GenerationConfig,
    batch_size: int,
    show_progress: bool = False,
    batches: Sequence[Sequence[int]] | None = None,
    on_batch: Callable[[Sequence[int], list[list[int]]], None] | None = None,
    synced_gpus: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, through its stop id, generated in left-padded batches of similar length.

    `batches` (indices into `prompts`) overrides the length batches; prompts in no batch get []. `on_batch` is
    called with each batch's indices and new ids as soon as they are generated. With `show_progress` the speed
    (examples/s, generated tokens/s) is logged at the end. `synced_gpus` keeps every process generating until all
    are done (DeepSpeed ZeRO-3, FSDP).
    """
    stop_ids = generation_config.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    if batches is None:
        batches = length_batches([len(prompt) for prompt in prompts], batch_size)
    results: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    examples = generated_tokens = 0
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not show_progress):
        padded = tokenizer.pad(
            {"input_ids": [prompts[index] for index in batch]}, padding_side="left", return_tensors="pt"
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(
                input_ids=padded["input_ids"],
                attention_mask=padded["attention_mask"],
                generation_config=generation_config,
                **({"synced_gpus": True} if synced_gpus else {}),
            )
        new_tokens = [
            cut_at_stop(ids, stop_ids, keep_stop=True) for ids in output[:, padded["input_ids"].shape[1] :].tolist()
        ]
        for index, ids in zip(batch, new_tokens, strict=True):
            results[index] = ids
        examples += len(batch)
        generated_tokens += sum(len(ids) for ids in new_tokens)
        if on_batch is not None:
            on_batch(batch, new_tokens)
    elapsed = max(time.perf_counter() - started, 1e-9)
    if show_progress and examples:
        print(
            f"generated {examples} examples in {elapsed:.1f} s: {examples / elapsed:.2f} examples/s, "
            f"{generated_tokens / elapsed:.1f} generated tokens/s",
            file=sys.stderr,
        )
    return results


def decode_reply(ids: list[int], tokenizer: PreTrainedTokenizer, has_metadata: bool) -> str:
    """The reply text of generated ids: cut at the first stop id; a chat reply loses its metadata line."""
    text = tokenizer.decode(cut_at_stop(ids, reply_stop_ids(tokenizer)))
    if has_metadata and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.strip()


def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizer,
    examples: Sequence[PromptExample],
    generation_config: GenerationConfig,
    batch_size: int,
    show_progress: bool = False,
) -> list[str]:
    """Reply text for every example, generated in batches."""
    prompts = [example.prompt_ids for example in examples]
    generated = generate_token_ids(model, tokenizer, prompts, generation_config, batch_size, show_progress)
    return [
        decode_reply(ids, tokenizer, example.reply_has_metadata)
        for ids, example in zip(generated, examples, strict=True)
    ]


def prediction_row(example: PromptExample, ids: list[int], tokenizer: PreTrainedTokenizer) -> dict:
    """The predictions-file row of one example: prompt, label, prediction (and tool calls for conversations)."""
    row = {
        "id": example.example_id,
        "prompt": example.prompt,
        "label": example.label,
        "prediction": decode_reply(ids, tokenizer, example.reply_has_metadata),
    }
    if example.reply_has_metadata:
        call = read_tool_call(tokenizer.decode(cut_at_stop(ids, reply_stop_ids(tokenizer))))
        row["label_call"] = example.label_call
        row["predicted_call"] = {"name": call.name, "arguments": call.arguments} if call else None
    return row
