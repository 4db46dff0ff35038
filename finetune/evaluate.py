"""Evaluate a checkpoint (P-Tuning v2, LoRA, full or base) on a dev set: generate, score, write results.

    python -m finetune.evaluate --model output/checkpoint-1000 --data formatted_data/dev.jsonl
    torchrun --nproc_per_node 2 -m finetune.evaluate ...       # the dev set shared among processes

Prompts, generation and the stop rule come from finetune.generation, as in evaluation during training (which scores
the same turns and gives the same metrics): input-output records as `[gMASK] sop` + prompt (truncated to
max_source_length like the training encoding, taken from the checkpoint's training_record.json unless given); in
conversation records every learned assistant turn and tool call is evaluated, given the reference history before it,
followed by `<|assistant|>`. Generation is batched by prompt length with left padding and the KV cache; a row's output equals
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizer, set_seed

from finetune.arguments import DEFAULT_MAX_SOURCE_LENGTH
from finetune.atomic_files import write_json_atomically
from finetune.checkpoint_format import Checkpoint, open_checkpoint, require_checkpoint_folder
from finetune.checkpoints import ModelLoadError, add_loading_arguments, load_from_arguments
from finetune.data.formats import (
    detect_format,
    evaluation_examples,
    format_named,
    format_names,
    no_format_message,
    prompt_example,
)
from finetune.data.preference import detect_preference_file
from finetune.data.records import DataValidationError, read_source_records
from finetune.data.source_formats import check_not_source_format
from finetune.data.validation import check_record
from finetune.generation import (
    PromptExample,
    build_generation_config,
    generate_token_ids,
    length_batches,
    prediction_row,
)
from finetune.metrics import METRIC_CONVENTIONS, PTUNING, metric_scale, score_rows
from finetune.model.checkpoint_files import CheckpointError
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

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
# The default --output_root: the repository's output/ folder, wherever the command is run from (as the launchers do).
REPOSITORY_OUTPUT = Path(__file__).resolve().parents[1] / "output"


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
        prompt_example(record, tokenizer, max_source_length, reference_from_record)
        for record in records[:max_samples]
    ]
    for index, example in enumerate(examples):
        example.example_id = str(index)
    return examples


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
    parser.add_argument("--max_new_tokens", type=int, default=128, help="longest prediction (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts generated together (default: %(default)s)")
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
