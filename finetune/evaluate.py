"""Evaluate a checkpoint (P-Tuning v2, LoRA, full or base) on a dev set: generate, score, write results.

    python -m finetune.evaluate --model output/checkpoint-1000 --data formatted_data/dev.jsonl
    torchrun --nproc_per_node 2 -m finetune.evaluate ...       # the dev set shared among processes

Prompts are encoded as in training: input-output records as `[gMASK] sop` + prompt (truncated to max_source_length
like the training encoding, taken from the checkpoint's training_record.json unless given); in conversation records
every learned assistant turn and tool call is evaluated, given the reference history before it, followed by
`<|assistant|>`. Generation is batched by prompt length with left padding and the KV cache; a row's output equals
what it would get alone. The data and the output folder are checked before the model is loaded; predictions are
appended to partial files as they are made, a rerun with the same settings continues from them, and the finished run
writes `generated_predictions.jsonl` (per turn: prompt, label, prediction, and for conversations the reference and
predicted tool calls) and the metrics (ROUGE-1/2/L, BLEU-4, and tool-call metrics when the data has tool calls) with
the metric convention, the number of evaluated turns and the checkpoint: `metrics.json` in the default convention,
`metrics.<convention>.json` in another, so a rerun in one convention never overwrites the other's numbers.
Preference data (chosen/rejected pairs) is detected and scored instead by finetune.preference_eval: preference accuracy,
reward margin, chosen and rejected log-probabilities.
"""

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizer, set_seed

from finetune.atomic_files import write_json_atomically
from finetune.checkpoint_format import Checkpoint, open_checkpoint, require_checkpoint_folder
from finetune.checkpoints import ModelLoadError, add_loading_arguments, load_from_arguments
from finetune.data.formats import detect_format, format_named, format_names, format_of, no_format_message
from finetune.data.formats.base import PromptExample
from finetune.data.tool_calls import read_tool_call
from finetune.data.preference import detect_preference_file
from finetune.data.source_formats import check_not_source_format
from finetune.data.records import DataValidationError, read_source_records
from finetune.data.validation import check_record
from finetune.metrics import METRIC_CONVENTIONS, PTUNING, compute_metrics, metric_scale
from finetune.model.checkpoint_files import CheckpointError
from finetune.model.tokenization import reply_stop_ids
from finetune.prediction_log import (
    OutputNotWritableError,
    PartialWriter,
    check_writable,
    merge_predictions,
    partial_files,
    partial_path,
    prepare_resume,
    read_partial_rows,
    settings_path,
)
from finetune.preference_eval import evaluate_preferences
from finetune.tool_metrics import compute_tool_metrics

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
DEFAULT_MAX_SOURCE_LENGTH = 1024
# The default --output_root: the repository's output/ folder, wherever the command is run from (as the launchers do).
REPOSITORY_OUTPUT = Path(__file__).resolve().parents[1] / "output"


def build_prompt_example(
    record: dict, tokenizer: PreTrainedTokenizer, max_source_length: int, reference_from_record: bool
) -> PromptExample:
    """Encode one record as its format does; with `reference_from_record` the reference is split off."""
    return format_of(record).prompt_example(record, tokenizer, max_source_length, reference_from_record)


def record_problems(value: object, data_format: str, reference_from_record: bool) -> list[tuple[str | None, str]]:
    """Problems of one record; without `reference_from_record` no response/assistant reply is required."""
    if not reference_from_record:
        # A prompt for inference has no reply yet: check it as the training format with an empty reply filled in.
        if isinstance(value, dict):
            value = format_named(data_format).with_empty_reply(value)
        return check_record(value, data_format)
    problems = check_record(value, data_format)
    return problems or format_named(data_format).reference_problems(value)


def read_checked_records(
    path: str | Path, reference_from_record: bool, skip_invalid: bool = False, data_format: str | None = None
) -> list[dict]:
    """Read and check a .jsonl/.json file of input-output or conversation records (no model or tokenizer needed).

    `data_format` (e.g. from the checkpoint's training record) must match the file's; DataValidationError lists
    every problem unless `skip_invalid` leaves the invalid records out.
    """
    records, problems = read_source_records(Path(path))
    check_not_source_format(Path(path), records)
    detected = detect_format(records)
    detected = detected.name if detected else None
    if detected is None and records:
        problems.append(records[0].problem(None, no_format_message()))
    if detected and data_format and detected != data_format:
        message = (
            f"the file holds {detected} records but the checkpoint was trained on {data_format} records "
            f"(training_record.json); pass --data_format {detected} to evaluate on them anyway"
        )
        raise DataValidationError([records[0].problem(None, message)])
    usable = []
    for record in records if detected else []:
        found = record_problems(record.value, detected, reference_from_record)
        problems += [record.problem(field, message) for field, message in found]
        if not found:
            usable.append(record)
    if problems and not (skip_invalid and usable):
        raise DataValidationError(problems)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    return [record.value for record in usable]


def read_prompt_examples(
    path: str | Path,
    tokenizer: PreTrainedTokenizer,
    max_source_length: int,
    reference_from_record: bool,
    skip_invalid: bool = False,
    max_samples: int | None = None,
) -> list[PromptExample]:
    """Read, check and encode a file's records, one prompt per record (a conversation's reply follows it all).

    With `reference_from_record` (evaluation) a record's response, or its last assistant message, is the label.
    """
    records = read_checked_records(path, reference_from_record, skip_invalid)
    examples = [
        build_prompt_example(record, tokenizer, max_source_length, reference_from_record)
        for record in records[:max_samples]
    ]
    for index, example in enumerate(examples):
        example.example_id = str(index)
    return examples


def evaluation_examples(
    records: Sequence[dict], tokenizer: PreTrainedTokenizer, max_source_length: int
) -> list[PromptExample]:
    """Evaluation prompts, as each record's format splits it: one per input-output record, one per learned turn of a
    conversation."""
    examples = []
    for index, record in enumerate(records):
        examples += format_of(record).evaluation_examples(record, index, tokenizer, max_source_length)
    return examples


def cut_at_stop(ids: list[int], stop_ids: Sequence[int], keep_stop: bool = False) -> list[int]:
    """Generated ids up to the first stop id (included with `keep_stop`); the padding after it is dropped."""
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[: position + 1] if keep_stop else ids[:position]
    return ids


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
) -> list[list[int]]:
    """New token ids for each prompt, through its stop id, generated in left-padded batches of similar length.

    `batches` (indices into `prompts`) overrides the length batches; prompts in no batch get []. `on_batch` is
    called with each batch's indices and new ids as soon as they are generated. With `show_progress` the speed
    (examples/s, generated tokens/s) is logged at the end.
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
        with torch.inference_mode():
            output = model.generate(
                input_ids=padded["input_ids"],
                attention_mask=padded["attention_mask"],
                generation_config=generation_config,
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


def format_metrics_table(metrics: dict[str, float], convention: str = PTUNING) -> str:
    """A text table of the metrics with each one's scale, under a line naming the metric convention."""
    width = max(len(name) for name in metrics)
    lines = [f"metric convention: {convention}", f"{'metric':<{width}}  score    scale"]
    lines.append(f"{'-' * width}  -------  -----")
    lines += [f"{name:<{width}}  {value:7.4f}  {metric_scale(name, convention)}" for name, value in metrics.items()]
    return "\n".join(lines)


def metrics_file_name(convention: str) -> str:
    """metrics.json for the default convention, metrics.<convention>.json for another (neither overwrites the other)."""
    return METRICS_FILE if convention == PTUNING else f"metrics.{convention}.json"


def metrics_report(metrics: dict[str, float], rows: Sequence[dict], convention: str, args: argparse.Namespace) -> dict:
    """What the metrics file holds: the metrics, then how they were made (convention, turns, checkpoint, data)."""
    return {
        **metrics,
        "metric_convention": convention,
        "evaluated_turns": len(rows),
        "tool_call_turns": sum(1 for row in rows if row.get("label_call")),
        "checkpoint": str(Path(args.model).resolve()),
        "data": str(Path(args.data).resolve()),
    }


def default_output_dir(model: str, output_root: str | Path = REPOSITORY_OUTPUT) -> Path:
    """<output_root>/evaluation/<checkpoint folder name>, with the run folder's name in front of a checkpoint-N."""
    folder = Path(model).resolve()
    name = f"{folder.parent.name}-{folder.name}" if folder.name.startswith("checkpoint-") else folder.name
    return Path(output_root) / "evaluation" / name


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


def score_rows(rows: Sequence[dict], convention: str = PTUNING) -> dict[str, float]:
    """ROUGE/BLEU of the text replies and, when any reference turn is a tool call, the tool-call metrics."""
    text_rows = [row for row in rows if not row.get("label_call")]
    metrics = compute_metrics([row["prediction"] for row in text_rows], [row["label"] for row in text_rows], convention)
    if any(row.get("label_call") for row in rows):
        metrics.update(compute_tool_metrics(rows))
    return metrics


@dataclass
class ProcessGroup:
    """This process's place among the evaluation processes (torchrun sets RANK and WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> "ProcessGroup":
        """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, else gloo)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world_size)

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        if self.world_size > 1:
            dist.destroy_process_group()


def training_defaults(checkpoint: Checkpoint) -> tuple[int | None, str | None]:
    """max_source_length and data_format the checkpoint was trained with (training_record.json), when recorded."""
    data_args = (checkpoint.record or {}).get("data_args") or {}
    return data_args.get("max_source_length"), data_args.get("data_format")


def generation_settings(args: argparse.Namespace, max_source_length: int) -> dict:
    """What decides the predictions: a rerun with the same settings continues an interrupted run."""
    keys = ("model", "base", "data", "max_new_tokens", "do_sample", "temperature", "top_p", "num_beams", "seed")
    settings = {key: getattr(args, key) for key in keys}
    settings.update(
        model=str(Path(args.model).resolve()), data=str(Path(args.data).resolve()), max_source_length=max_source_length
    )
    settings.update(max_samples=args.max_samples, skip_invalid=args.skip_invalid)
    return settings


def evaluate(args: argparse.Namespace) -> dict[str, float] | None:
    """Check data and output, load the checkpoint, generate this process's share of every dev prompt (appending
    rows as they are made), then on rank 0 merge the predictions and write the metrics; return them (None elsewhere).
    """
    set_seed(args.seed)
    require_checkpoint_folder(args.model)
    if detect_preference_file(args.data):
        output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, args.output_root)
        check_writable(output_dir, "--output_dir (OUTPUT_DIR)")
        return evaluate_preferences(args, output_dir)
    checkpoint = open_checkpoint(args.model)
    recorded_length, recorded_format = training_defaults(checkpoint)
    max_source_length = args.max_source_length or recorded_length or DEFAULT_MAX_SOURCE_LENGTH
    records = read_checked_records(args.data, True, args.skip_invalid, args.data_format or recorded_format)
    output_root = args.output_root or REPOSITORY_OUTPUT
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(args.model, output_root)
    check_writable(output_dir, "--output_dir (OUTPUT_DIR)")
    group = ProcessGroup.from_environment()
    try:
        model, tokenizer, _ = load_from_arguments(args, checkpoint=checkpoint)
        examples = evaluation_examples(records[: args.max_samples], tokenizer, max_source_length)
        generation_config = build_generation_config(
            tokenizer, args.max_new_tokens, args.do_sample, args.temperature, args.top_p, args.num_beams
        )
        final = output_dir / PREDICTIONS_FILE
        if group.rank == 0:
            prepare_resume(final, generation_settings(args, max_source_length))
        group.barrier()
        done = read_partial_rows(final)
        pending = [example for example in examples if example.example_id not in done]
        if group.rank == 0 and done:
            print(f"{len(done)} of {len(examples)} predictions were already made; generating the rest", file=sys.stderr)
        writer = PartialWriter(partial_path(final, group.rank))
        finished = False
        try:
            generate_token_ids(
                model,
                tokenizer,
                [example.prompt_ids for example in pending],
                generation_config,
                args.batch_size,
                show_progress=True,
                batches=length_batches([len(example.prompt_ids) for example in pending], args.batch_size)[
                    group.rank :: group.world_size
                ],
                on_batch=lambda batch, new_ids: writer.write(
                    prediction_row(pending[index], ids, tokenizer) for index, ids in zip(batch, new_ids, strict=True)
                ),
            )
            finished = True
        finally:
            writer.close()
            if not finished and group.rank == 0 and not partial_files(final):  # failed before any prediction
                settings_path(final).unlink(missing_ok=True)
        group.barrier()
        if group.rank != 0:
            return None
        rows = merge_predictions(final, [example.example_id for example in examples])
        metrics = score_rows(rows, args.metric_convention)
        metrics_file = output_dir / metrics_file_name(args.metric_convention)
        write_json_atomically(metrics_file, metrics_report(metrics, rows, args.metric_convention, args))
        print(format_metrics_table(metrics, args.metric_convention))
        calls = sum(1 for row in rows if row.get("label_call"))
        turns = f" ({calls} of them tool calls)" if calls else ""
        print(f"{len(rows)} evaluated turns{turns}; predictions in {final}, metrics in {metrics_file}")
        return metrics
    finally:
        group.close()


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the evaluation."""
    parser = argparse.ArgumentParser(
        description=(
            "Generate predictions for a dev set with any checkpoint; score ROUGE-1/2/L and BLEU-4 of text replies "
            "and, on conversations with tool calls, the tool-call metrics. An interrupted run continues where it "
            "stopped when rerun with the same settings."
        )
    )
    add_loading_arguments(parser)
    parser.add_argument("--data", required=True, help="dev set: .jsonl/.json of input-output or conversation records")
    parser.add_argument(
        "--output_dir", help="where to write results (default: <output_root>/evaluation/<run>-<checkpoint name>)"
    )
    parser.add_argument(
        "--output_root",
        help="folder for the default --output_dir (default: the repository's output/, whatever the current folder)",
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
        help=(
            "prompt token budget (default: the training value from the checkpoint's training_record.json, else "
            f"{DEFAULT_MAX_SOURCE_LENGTH}); input-output prompts are truncated as in training"
        ),
    )
    parser.add_argument(
        "--data_format",
        choices=format_names(),
        help="expected format of the dev set (default: the training format from training_record.json, if recorded)",
    )
    parser.add_argument(
        "--metric_convention",
        choices=METRIC_CONVENTIONS,
        default=PTUNING,
        help=(
            "ptuning: ChatGLM-6B P-Tuning v2 (BLEU-4 on characters, x100; the default); finetune_demo: ChatGLM3 "
            "finetune_demo and GLM-4 (BLEU-4 on jieba words, 0-1). Results go to metrics.json for ptuning and "
            "metrics.<convention>.json otherwise"
        ),
    )
    parser.add_argument("--max_samples", type=int, help="evaluate only the first N records (N >= 1)")
    parser.add_argument("--skip_invalid", action="store_true", help="leave out invalid records instead of stopping")
    parser.add_argument("--seed", type=int, default=42)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message on a checkpoint, data or output problem)."""
    args = build_parser().parse_args(argv)
    too_short = args.max_source_length is not None and args.max_source_length < 3
    if args.batch_size < 1 or args.max_new_tokens < 1 or too_short:
        print("error: --batch_size and --max_new_tokens must be >= 1, --max_source_length >= 3", file=sys.stderr)
        return 2
    if args.max_samples is not None and args.max_samples < 1:
        print(
            f"error: --max_samples must be >= 1 (got {args.max_samples}); leave it out to evaluate every record",
            file=sys.stderr,
        )
        return 2
    try:
        evaluate(args)
    except (CheckpointError, ModelLoadError, DataValidationError, OutputNotWritableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the predictions made so far are kept; rerun the same command to continue", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
