"""Evaluate a checkpoint (P-Tuning v2, LoRA, full or base) on a dev set: generate, score ROUGE/BLEU, write results.

    python -m finetune.evaluate --model output/checkpoint-1000 --data formatted_data/dev.jsonl

Prompts are encoded as in training: input-output records as `[gMASK] sop` + prompt (truncated to
--max_source_length like the training encoding); conversation records as ChatGLM3 chat turns up to their last
assistant message, which is the reference, followed by `<|assistant|>`. Generation is batched with left padding
and the KV cache; a row's output equals what it would get alone. Results go to OUTPUT_DIR:
`generated_predictions.jsonl` (prompt, label, prediction per record) and `metrics.json` (ROUGE-1/2/L, BLEU-4).
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizer, set_seed

from finetune.atomic_files import write_json_atomically, write_jsonl_atomically
from finetune.checkpoints import ModelLoadError, add_loading_arguments, load_from_arguments
from finetune.data.encoding import (
    CONVERSATIONS,
    IGNORE_INDEX,
    INPUT_OUTPUT,
    conversation_tokens,
    encode_input_output,
)
from finetune.data.validation import DataValidationError, check_record, detect_file_format, read_source_records
from finetune.metrics import compute_metrics
from finetune.model.checkpoint_files import CheckpointError

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
DEFAULT_MAX_SOURCE_LENGTH = 1024


@dataclass
class PromptExample:
    """One record ready for generation: what to show as the prompt, its token ids, and the reference if any."""

    prompt: str | list[dict]
    prompt_ids: list[int]
    label: str | None
    reply_has_metadata: bool


def stop_token_ids(tokenizer: PreTrainedTokenizer) -> list[int]:
    """Ids that end a reply: eos, <|user|> and <|observation|>."""
    return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]


def input_output_prompt_ids(prompt: str, tokenizer: PreTrainedTokenizer, max_source_length: int) -> list[int]:
    """`[gMASK] sop` + prompt ids, truncated exactly as the training encoding truncates the source."""
    encoded = encode_input_output({"prompt": prompt, "response": ""}, tokenizer, max_source_length, 0)
    source_length = encoded["labels"].count(IGNORE_INDEX)
    return encoded["input_ids"][:source_length]


def conversation_prompt_ids(
    messages: list[dict], tools: list | None, tokenizer: PreTrainedTokenizer, max_source_length: int
) -> list[int]:
    """Chat turns as in training, then `<|assistant|>`; a long prompt loses its oldest tokens after `[gMASK] sop`."""
    ids, _ = conversation_tokens({"conversations": messages, "tools": tools}, tokenizer)
    ids = ids[:-1] + [tokenizer.get_command("<|assistant|>")]
    if len(ids) > max_source_length:
        keep = max(max_source_length - 2, 1)
        ids = ids[:2] + ids[-keep:]
    return ids


def split_reference(messages: list[dict]) -> tuple[list[dict], dict | None]:
    """The messages before the last assistant message, and that message (None when there is none)."""
    for position in range(len(messages) - 1, -1, -1):
        if messages[position].get("role") == "assistant":
            return messages[:position], messages[position]
    return messages, None


def build_prompt_example(
    record: dict, tokenizer: PreTrainedTokenizer, max_source_length: int, reference_from_record: bool
) -> PromptExample:
    """Encode one input-output or conversations record; with `reference_from_record` the reference is split off."""
    if "conversations" not in record:
        label = record.get("response") if reference_from_record else None
        prompt_ids = input_output_prompt_ids(record["prompt"], tokenizer, max_source_length)
        return PromptExample(record["prompt"], prompt_ids, label, reply_has_metadata=False)
    messages = record["conversations"]
    label = None
    if reference_from_record:
        messages, reference = split_reference(messages)
        label = reference["content"] if reference else None
    prompt_ids = conversation_prompt_ids(messages, record.get("tools"), tokenizer, max_source_length)
    return PromptExample(messages, prompt_ids, label, reply_has_metadata=True)


def record_problems(value: object, data_format: str, reference_from_record: bool) -> list[tuple[str | None, str]]:
    """Problems of one record; without `reference_from_record` no response/assistant reply is required."""
    if reference_from_record:
        problems = check_record(value, data_format)
        if not problems and data_format == CONVERSATIONS and split_reference(value["conversations"])[1] is None:
            problems = [("conversations", "no assistant message to use as the reference")]
        return problems
    # A prompt for inference has no reply yet: check it as the training format with an empty reply filled in.
    if isinstance(value, dict) and data_format == INPUT_OUTPUT:
        value = {"response": "", **value}
    elif isinstance(value, dict) and isinstance(value.get("conversations"), list):
        value = {**value, "conversations": value["conversations"] + [{"role": "assistant", "content": ""}]}
    return check_record(value, data_format)


def read_prompt_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizer,
    max_source_length: int,
    reference_from_record: bool,
    skip_invalid: bool = False,
    max_samples: int | None = None,
) -> list[PromptExample]:
    """Read and check a .jsonl/.json file of input-output or conversation records and encode their prompts.

    With `reference_from_record` (evaluation) a record's response, or its last assistant message, is the label.
    """
    records, problems = read_source_records(Path(path))
    data_format = detect_file_format(records)
    if data_format is None and records:
        problems.append(records[0].problem(None, "record has neither 'conversations' nor 'prompt'/'response'"))
    usable = []
    for record in records if data_format else []:
        found = record_problems(record.value, data_format, reference_from_record)
        problems += [record.problem(field, message) for field, message in found]
        if not found:
            usable.append(record)
    if problems and not (skip_invalid and usable):
        raise DataValidationError(problems)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return [
        build_prompt_example(record.value, tokenizer, max_source_length, reference_from_record)
        for record in usable[:max_samples]
    ]


def cut_at_stop(ids: list[int], stop_ids: Sequence[int], keep_stop: bool = False) -> list[int]:
    """Generated ids up to the first stop id (included with `keep_stop`); the padding after it is dropped."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1] if keep_stop else ids[:position]
    return ids


def generate_token_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizer,
    prompts: Sequence[list[int]],
    generation_config: GenerationConfig,
    batch_size: int,
    show_progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, through its stop id, generated in left-padded batches of similar length."""
    stop_ids = generation_config.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]), reverse=True)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[list[int]] = [[] for _ in prompts]
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not show_progress):
        padded = tokenizer.pad(
            {"input_ids": [prompts[index] for index in batch]}, padding_side="left", return_tensors="pt"
        ).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=padded["input_ids"],
                attention_mask=padded["attention_mask"],
                generation_config=generation_config,
            )
        new_tokens = output[:, padded["input_ids"].shape[1] :].tolist()
        for index, ids in zip(batch, new_tokens, strict=True):
            results[index] = cut_at_stop(ids, stop_ids, keep_stop=True)
    return results


def decode_reply(ids: list[int], tokenizer: PreTrainedTokenizer, has_metadata: bool) -> str:
    """The reply text of generated ids: cut at the first stop id; a chat reply loses its metadata line."""
    text = tokenizer.decode(cut_at_stop(ids, stop_token_ids(tokenizer)))
    if has_metadata and "\n" in text:
        text = text.split("\n", 1)[1]
    return text.strip()


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
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sampling,
    )


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


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A two-column text table of the metrics."""
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  score", f"{'-' * width}  -------"]
    lines += [f"{name:<{width}}  {value:7.4f}" for name, value in metrics.items()]
    return "\n".join(lines)


def default_output_dir(model: str) -> Path:
    """output/evaluation/<checkpoint folder name>, with the run folder's name in front of a checkpoint-N folder."""
    folder = Path(model).resolve()
    name = f"{folder.parent.name}-{folder.name}" if folder.name.startswith("checkpoint-") else folder.name
    return Path("output") / "evaluation" / name


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Load the checkpoint, generate for every dev record, write predictions and metrics; return the metrics."""
    set_seed(args.seed)
    model, tokenizer, _ = load_from_arguments(args)
    examples = read_prompt_examples(
        args.data, tokenizer, args.max_source_length, True, args.skip_invalid, args.max_samples
    )
    generation_config = build_generation_config(
        tokenizer, args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams
    )
    predictions = generate_replies(model, tokenizer, examples, generation_config, args.batch_size, show_progress=True)
    labels = [example.label for example in examples]
    metrics = compute_metrics(predictions, labels)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model)
    rows = (
        {"prompt": example.prompt, "label": label, "prediction": prediction}
        for example, label, prediction in zip(examples, labels, predictions, strict=True)
    )
    write_jsonl_atomically(output_dir / PREDICTIONS_FILE, rows)
    write_json_atomically(output_dir / METRICS_FILE, metrics)
    print(format_metrics_table(metrics))
    print(f"{len(examples)} examples; predictions and metrics written to {output_dir}")
    return metrics


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the evaluation."""
    parser = argparse.ArgumentParser(
        description="Generate predictions for a dev set with any checkpoint and score ROUGE-1/2/L and BLEU-4."
    )
    add_loading_arguments(parser)
    parser.add_argument("--data", required=True, help="dev set: .jsonl/.json of input-output or conversation records")
    parser.add_argument(
        "--output_dir", help="where to write results (default: output/evaluation/<run>-<checkpoint name>)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy/beam decoding")
    parser.add_argument("--temperature", type=float, default=0.95, help="with --do_sample")
    parser.add_argument("--top_p", type=float, default=0.7, help="with --do_sample")
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument(
        "--max_source_length",
        type=int,
        default=DEFAULT_MAX_SOURCE_LENGTH,
        help="prompt token budget; use the training value (input-output prompts are truncated as in training)",
    )
    parser.add_argument("--max_samples", type=int, help="evaluate only the first N records")
    parser.add_argument("--skip_invalid", action="store_true", help="leave out invalid records instead of stopping")
    parser.add_argument("--seed", type=int, default=42)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message on a checkpoint or data problem)."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_source_length < 3:
        print("error: --batch_size and --max_new_tokens must be >= 1, --max_source_length >= 3", file=sys.stderr)
        return 2
    try:
        evaluate(args)
    except (CheckpointError, ModelLoadError, DataValidationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
