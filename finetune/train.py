"""Training entry point: `python -m finetune.train --model_name_or_path BASE --train_file F --output_dir D ...`
or `python -m finetune.train config.yaml`.

Order: parse and check the arguments, choose the checkpoint to resume from, load the tokenizer, read, validate and
encode the data (so data problems stop the run before the model is loaded), estimate memory, load the model for the
method, then train (saving checkpoints and the final model in the agreed format), evaluate and predict.
"""

import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import SaveStrategy, set_seed

from finetune.atomic_files import write_json_atomically, write_jsonl_atomically
from finetune.arguments import DataArguments, ModelArguments, parse_arguments
from finetune.callbacks import LossCurveCallback, StopOnSignalCallback, ThroughputCallback
from finetune.checkpoint_format import Checkpoint, checkpoint_folder_name, checkpoint_folders, checkpoint_step
from finetune.checkpoints import check_base_model_folder
from finetune.data.collator import RightPaddingCollator, pack_examples, packed_attention_stretch
from finetune.data.formats import evaluation_examples, format_named, format_names
from finetune.data.loading import DEFAULT_CACHE_DIR, EncodingLimits, TrainingData, load_training_data
from finetune.data.validation import print_learned_spans, print_token_labels
from finetune.generation import PromptExample
from finetune.memory_preflight import run_preflight
from finetune.methods import build_model, method_of
from finetune.quantization import check_4bit_layer_widths, check_quantization_available
from finetune.recompute import RECOMPUTE_AUTO, RECOMPUTE_FULL, apply_recompute_plan
from finetune.resume import (
    check_checkpoint_matches,
    check_resumed_data_and_processes,
    resolve_resume_checkpoint,
    resume_requested,
)
from finetune.trainer import FinetuneTrainer

logger = logging.getLogger("finetune.train")  # named, so `python -m finetune.train` logs too

PREDICTIONS_FILE = "generated_predictions.jsonl"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACEBACK_ENV = "FINETUNE_TRACEBACK"
# Exit status of a run stopped by a known error (bad argument, data or checkpoint): the message says what to fix.
KNOWN_ERROR_EXIT_CODE = 2


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; the process should exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainingRun:
    """What a run produced: the trainer (with the trained model) and the metrics of each stage."""

    trainer: FinetuneTrainer
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def configure_logging(training_args: Seq2SeqTrainingArguments) -> None:
    """Log to stdout: our INFO messages on the main process, the libraries at the Trainer's log level."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logging.getLogger("finetune").setLevel(logging.INFO if training_args.should_log else log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)


def apply_implied_settings(data_args: DataArguments, training_args: Seq2SeqTrainingArguments) -> None:
    """Fill in the settings a run implies: training when only --train_file is given, no DDP search for unused
    parameters, and input tokens counted without padding."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict) and data_args.train_file:
        training_args.do_train = True
    if training_args.ddp_find_unused_parameters is None:
        # Every trainable parameter (prefix encoder, LoRA adapters, or all weights) takes part in each forward pass,
        # so DDP need not search the graph for unused ones (it warns every run when asked to and finds none).
        training_args.ddp_find_unused_parameters = False
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"


def check_run_settings(
    model_args: ModelArguments, data_args: DataArguments, training_args: Seq2SeqTrainingArguments
) -> None:
    """Raise ValueError for combinations that cannot work, before any heavy work; changes nothing."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict or data_args.train_file):
        raise ValueError("nothing to do: pass --train_file with --do_train, --do_eval or --do_predict")
    stages = (
        ("do_train", "train_file"),
        ("do_eval", "validation_file"),
        ("do_predict", "test_file"),
    )
    for stage, file_field in stages:
        if getattr(training_args, stage) and not getattr(data_args, file_field):
            raise ValueError(f"--{stage} needs --{file_field}")
    if training_args.eval_strategy != "no" and not data_args.validation_file:
        raise ValueError(f"--eval_strategy {training_args.eval_strategy} needs --validation_file")
    if training_args.do_predict and not training_args.predict_with_generate:
        raise ValueError("--do_predict writes generated answers: pass --predict_with_generate too")
    if data_args.data_format not in (None, *format_names()):
        raise ValueError(f"--data_format must be {' or '.join(format_names())}, got {data_args.data_format!r}")
    method = method_of(model_args)
    if method.zero3_problem and is_deepspeed_zero3_enabled():
        raise ValueError(method.zero3_problem)
    if model_args.quantization_bit:
        check_quantization_available(model_args.quantization_bit)
    if training_args.gradient_checkpointing and model_args.recompute not in (RECOMPUTE_AUTO, RECOMPUTE_FULL):
        raise ValueError(
            f"--gradient_checkpointing recomputes whole layers but --recompute {model_args.recompute} asks for less; "
            "pass only one of them"
        )


def log_effective_settings(
    model_args: ModelArguments, data_args: DataArguments, training_args: Seq2SeqTrainingArguments
) -> None:
    """Log the settings a run actually uses, in one block, before any heavy work."""
    rows_per_step = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    steps = (
        f"{training_args.max_steps} steps"
        if training_args.max_steps > 0
        else f"{training_args.num_train_epochs} epochs"
    )
    saving = (
        f"checkpoint every {training_args.save_steps} steps"
        if training_args.save_strategy == SaveStrategy.STEPS
        else f"save strategy {SaveStrategy(training_args.save_strategy).value}"
    )
    files = {"train": data_args.train_file, "eval": data_args.validation_file, "test": data_args.test_file}
    logger.info(
        "effective settings:\n  method %s, model %s\n  %s, learning rate %g, %s\n"
        "  batch %d per device x %d accumulation x %d process(es) = %d rows per optimizer step%s\n"
        "  lengths: source %d, target %d tokens (input_output), %d per row (conversations)\n  data: %s\n  output: %s",
        model_args.method,
        model_args.model_name_or_path,
        steps,
        training_args.learning_rate,
        saving,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
        training_args.world_size,
        rows_per_step,
        " (packed rows)" if data_args.packing else "",
        data_args.max_source_length,
        data_args.max_target_length,
        data_args.max_seq_length,
        ", ".join(f"{split} {path}" for split, path in files.items() if path),
        Path(training_args.output_dir).resolve(),
    )


def check_output_dir(training_args: Seq2SeqTrainingArguments, resuming: bool) -> None:
    """Refuse to start a fresh training run in an output_dir that already holds checkpoints of another run."""
    output_dir = Path(training_args.output_dir)
    if not training_args.do_train or resuming or not output_dir.is_dir():
        return
    existing = [folder.name for _, folder in checkpoint_folders(output_dir)]
    if existing:
        raise ValueError(
            f"{output_dir} already holds checkpoints ({', '.join(existing)}); continue that run with "
            "--resume_from_checkpoint auto, or pass a new or empty --output_dir"
        )


def encoding_limits(data_args: DataArguments) -> EncodingLimits:
    """Truncation lengths of the data arguments."""
    return EncodingLimits(data_args.max_source_length, data_args.max_target_length, data_args.max_seq_length)


def load_split(
    path: str, limit: int | None, tokenizer: PreTrainedTokenizerBase, data_args: DataArguments
) -> TrainingData:
    """Read, validate and encode one data file, keeping at most `limit` examples."""
    cache_dir = Path(data_args.data_cache_dir) if data_args.data_cache_dir else DEFAULT_CACHE_DIR
    data = load_training_data(
        path,
        tokenizer,
        encoding_limits(data_args),
        data_format=data_args.data_format,
        skip_invalid=data_args.skip_invalid,
        num_proc=data_args.preprocessing_num_workers,
        cache_dir=cache_dir,
    )
    if limit is not None and limit < len(data.dataset):
        data.dataset = data.dataset.select(range(limit))
    logger.info("%s (%s): %s", path, data.data_format, data.summary)
    return data


def packing_length(data_args: DataArguments, data_format: str) -> int:
    """Tokens per packed row: --packing_length, else the longest example the length limits allow."""
    if data_args.packing_length:
        return data_args.packing_length
    return format_named(data_format).longest_row(encoding_limits(data_args))


def training_row_length(data_args: DataArguments, splits: dict[str, TrainingData]) -> int | None:
    """Tokens in the longest training row: the packing length when packing, else the longest encoded example."""
    train = splits.get("train")
    if train is None:
        return None
    if data_args.packing:
        return packing_length(data_args, train.data_format)
    return train.summary.length_max


def training_labelled_length(data_args: DataArguments, splits: dict[str, TrainingData]) -> int | None:
    """The most labelled tokens in one training row (what the chunked loss projects), or None when packing or
    without training data."""
    train = splits.get("train")
    if train is None or data_args.packing:
        return None
    return train.summary.learned_max or None


def warn_rows_beyond_context(row_length: int | None, model_config: PreTrainedConfig) -> str | None:
    """Log and return a warning when training rows (plus the P-Tuning prefix) exceed the model's seq_length."""
    tokens = (row_length or 0) + (getattr(model_config, "pre_seq_len", None) or 0)
    seq_length = getattr(model_config, "seq_length", None)
    if seq_length is None or tokens <= seq_length:
        return None
    message = (
        f"training rows reach {tokens} tokens, longer than the model's seq_length {seq_length} (config.json): the "
        "base was not trained on such lengths; use a long-context base (chatglm3-6b-32k: seq_length 32768) or "
        "lower --max_seq_length / --max_source_length + --max_target_length / --packing_length"
    )
    logger.warning(message)
    return message


def load_data(
    data_args: DataArguments, training_args: Seq2SeqTrainingArguments, tokenizer: PreTrainedTokenizerBase
) -> dict[str, TrainingData]:
    """The encoded train/eval/test data the run needs (main process first, so replicas reuse its cache)."""
    wanted = {
        "train": (training_args.do_train, data_args.train_file, data_args.max_train_samples),
        "eval": (
            training_args.do_eval or training_args.eval_strategy != "no",
            data_args.validation_file,
            data_args.max_eval_samples,
        ),
        "test": (training_args.do_predict, data_args.test_file, data_args.max_predict_samples),
    }
    splits = {}
    with training_args.main_process_first(desc="encoding data"):
        for split, (needed, path, limit) in wanted.items():
            if needed:
                splits[split] = load_split(path, limit, tokenizer, data_args)
    return splits


def record_detected_format(data_args: DataArguments, splits: dict[str, TrainingData]) -> None:
    """Set data_format to the format detected in the data when none was given, so training_record.json names it."""
    if data_args.data_format is None and splits:
        data_args.data_format = next(iter(splits.values())).data_format


def generation_length(data_args: DataArguments) -> int:
    """New tokens generated per example in evaluation and prediction."""
    return data_args.max_new_tokens or data_args.max_target_length


def save_metrics(trainer: FinetuneTrainer, split: str, metrics: dict[str, float]) -> None:
    """Log a stage's metrics and write them to output_dir/{split}_results.json (main process, atomically)."""
    trainer.log_metrics(split, metrics)
    if trainer.is_world_process_zero():
        write_json_atomically(Path(trainer.args.output_dir) / f"{split}_results.json", metrics)


def training_rows(
    splits: dict[str, TrainingData], data_args: DataArguments, training_args: Seq2SeqTrainingArguments
) -> datasets.Dataset | None:
    """The rows the Trainer trains on: the encoded examples, or, with --packing, packed rows (logged)."""
    if "train" not in splits:
        return None
    examples = splits["train"].dataset
    if not data_args.packing:
        return examples
    row_length = packing_length(data_args, splits["train"].data_format)
    rows = pack_examples(examples, row_length)
    examples_per_row = len(examples) / max(1, len(rows))
    rows_per_step = (
        training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * training_args.world_size
    )
    logger.info(
        "packed %d examples into %d rows of up to %d tokens (%.2f examples per row): an optimizer step of %d rows "
        "sees about %.0f examples (--packing False, or PACKING=0 for the launchers: one per row)",
        len(examples),
        len(rows),
        row_length,
        examples_per_row,
        rows_per_step,
        rows_per_step * examples_per_row,
    )
    return rows


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, TrainingData],
    train_dataset: datasets.Dataset | None,
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: Seq2SeqTrainingArguments,
    extra_callbacks: tuple[TrainerCallback, ...],
) -> FinetuneTrainer:
    """The Trainer with its training rows (see `training_rows`), eval/test data, collators, metrics and callbacks."""
    # Official ChatGLM3 configs name no bos token: take the tokenizer's, as the Trainer would with a warning every run.
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
    return FinetuneTrainer(
        model=model,
        args=training_args,
        data_collator=RightPaddingCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of),
        train_dataset=train_dataset,
        eval_dataset=splits["eval"].dataset if "eval" in splits else None,
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(), LossCurveCallback(training_args.output_dir), *extra_callbacks],
        model_args=model_args,
        data_args=data_args,
        generation_examples=generation_examples(data_args, training_args, tokenizer, splits),
        max_new_tokens=generation_length(data_args),
    )


def generation_examples(
    data_args: DataArguments,
    training_args: Seq2SeqTrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, TrainingData],
) -> dict[str, list[PromptExample]]:
    """With predict_with_generate, the evaluation prompts of the eval and test files, keyed by their metric prefix:
    the turns `python -m finetune.evaluate` scores (finetune.generation), from the same records the splits hold."""
    if not training_args.predict_with_generate:
        return {}
    # finetune.evaluate imports this module (through preference tuning): import it when run.
    from finetune.evaluate import read_checked_records

    files = {
        "eval": (data_args.validation_file, data_args.max_eval_samples),
        "predict": (data_args.test_file, data_args.max_predict_samples),
    }
    examples = {}
    for (prefix, (path, limit)), split in zip(files.items(), ("eval", "test")):
        if split in splits:
            records = read_checked_records(path, True, data_args.skip_invalid, splits[split].data_format)
            examples[prefix] = evaluation_examples(records[:limit], tokenizer, data_args.max_source_length)
    return examples


def predict_and_save(trainer: FinetuneTrainer, test: TrainingData) -> dict:
    """Generate answers for the test data; write generated_predictions.jsonl and predict_results.json."""
    prediction = trainer.predict(test.dataset, metric_key_prefix="predict")
    save_metrics(trainer, "predict", prediction.metrics)
    if trainer.is_world_process_zero():
        write_jsonl_atomically(Path(trainer.args.output_dir) / PREDICTIONS_FILE, prediction.predictions)
    return prediction.metrics



def open_run(
    model_args: ModelArguments, training_args: Seq2SeqTrainingArguments
) -> tuple[Checkpoint | None, PreTrainedTokenizerBase]:
    """What every training run (fine-tuning or preference tuning) does before its data: find and check the checkpoint
    to resume, check the output folder, set the seed, check the base folder (and its layer widths for a 4-bit base);
    returns the checkpoint to resume (or None), as read once, and the base's tokenizer."""
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume is not None:
        check_checkpoint_matches(resume, model_args)
    check_output_dir(training_args, resume_requested(training_args.resume_from_checkpoint))
    set_seed(training_args.seed)
    check_base_model_folder(model_args.model_name_or_path)
    if model_args.quantization_bit == 4:
        check_4bit_layer_widths(AutoConfig.from_pretrained(model_args.model_name_or_path))
    return resume, AutoTokenizer.from_pretrained(model_args.model_name_or_path)

def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: Seq2SeqTrainingArguments,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
) -> TrainingRun:
    """Train, evaluate and predict as the arguments say; `extra_callbacks` are added to the Trainer."""
    check_run_settings(model_args, data_args, training_args)
    apply_implied_settings(data_args, training_args)
    if training_args.should_log:
        log_effective_settings(model_args, data_args, training_args)
    resumed, tokenizer = open_run(model_args, training_args)
    resume = resumed.folder if resumed is not None else None
    splits = load_data(data_args, training_args, tokenizer)
    record_detected_format(data_args, splits)
    if resumed is not None and training_args.do_train:
        for notice in check_resumed_data_and_processes(resumed, data_args, training_args, splits["train"].data_format):
            if training_args.should_log:
                logger.warning(notice)
    if "train" in splits and training_args.should_log:
        if data_args.print_first_example:
            print_learned_spans(splits["train"].dataset[0], tokenizer)
        if data_args.print_token_table:
            print_token_labels(splits["train"].dataset[0], tokenizer)

    model_config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        pre_seq_len=model_args.pre_seq_len,
        prefix_projection=model_args.prefix_projection,
    )
    train_dataset = training_rows(splits, data_args, training_args)
    warn_rows_beyond_context(training_row_length(data_args, splits), model_config)
    estimate = run_preflight(
        model_config,
        model_args,
        data_args,
        training_args,
        seq_length=training_row_length(data_args, splits),
        labelled_tokens=training_labelled_length(data_args, splits),
        attention_stretch=(
            packed_attention_stretch(train_dataset, model_args.pre_seq_len or 0)
            if data_args.packing and train_dataset is not None
            else None
        ),
    )
    model = build_model(model_args, training_args)
    if not training_args.gradient_checkpointing:
        apply_recompute_plan(model, estimate.setup.recompute)
        logger.info("activation recomputation: %s", estimate.setup.recompute.describe(model_config.num_layers))
    stop = StopOnSignalCallback()
    trainer = build_trainer(
        model, tokenizer, splits, train_dataset, model_args, data_args, training_args, (*extra_callbacks, stop)
    )
    outcome = TrainingRun(trainer)

    if training_args.do_train and already_finished(resume, training_args):
        logger.info("%s already reached max_steps=%d; nothing left to train", resume, training_args.max_steps)
        trainer.load_checkpoint_weights(resume)
        trainer.save_final_model()
    elif training_args.do_train:
        result = train_until_done_or_signalled(trainer, resume, stop)
        trainer.save_final_model()
        outcome.metrics["train"] = result.metrics
        save_metrics(trainer, "train", result.metrics)
    elif resume is not None:
        trainer.load_checkpoint_weights(resume)
    if training_args.do_eval:
        outcome.metrics["eval"] = trainer.evaluate(metric_key_prefix="eval")
        save_metrics(trainer, "eval", outcome.metrics["eval"])
    if training_args.do_predict:
        outcome.metrics["predict"] = predict_and_save(trainer, splits["test"])
    return outcome


def train_until_done_or_signalled(
    trainer: FinetuneTrainer, resume: Path | None, stop: StopOnSignalCallback
) -> transformers.trainer_utils.TrainOutput:
    """trainer.train() with SIGINT/SIGTERM turned into "save a checkpoint and stop" (then TrainingInterrupted)."""
    if trainer.args.save_strategy != "no":
        trainer.check_free_space()
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    finally:
        stop.uninstall()
    if stop.stopped:
        output_dir = Path(trainer.args.output_dir).resolve()
        checkpoint = output_dir / checkpoint_folder_name(trainer.state.global_step)
        raise TrainingInterrupted(
            f"training stopped by {stop.received.name} at step {trainer.state.global_step}: checkpoint saved to "
            f"{checkpoint}, loss curve in {output_dir}; continue with --resume_from_checkpoint auto and the same "
            f"--output_dir (launchers: AUTORESUME_FROM_CHECKPOINT=1 OUTPUT_DIR={output_dir})",
            stop.exit_code,
        )
    return result


def already_finished(resume: Path | None, training_args: Seq2SeqTrainingArguments) -> bool:
    """True when the checkpoint to resume from is at or past --max_steps (Trainer would run one step too many)."""
    if resume is None or training_args.max_steps <= 0:
        return False
    step = checkpoint_step(resume)
    return step is not None and step >= training_args.max_steps


def main(argv: list[str] | None = None) -> TrainingRun:
    """Parse arguments (or one config file) and run; errors propagate (see `cli` for the command line)."""
    model_args, data_args, training_args = parse_arguments(argv)
    configure_logging(training_args)
    return run(model_args, data_args, training_args)


def is_known_error(error: BaseException) -> bool:
    """True for an error one of the project's own checks raised: its message says what to fix."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PROJECT_ROOT / "finetune")


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point: known errors end the run with one line and exit status 2 (set FINETUNE_TRACEBACK=1
    for the traceback); a run stopped by a signal exits with 128 + the signal number after saving."""
    run_cli(main, argv)


def run_cli(entry: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a training entry point as `cli` describes (also used by finetune.preference)."""
    try:
        entry(argv)
    except TrainingInterrupted as stopped:
        if os.environ.get("RANK", "0") == "0":  # every process stopped at the same step; one says so
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)
    except (ValueError, TypeError, OSError) as error:
        if not is_known_error(error) or os.environ.get(TRACEBACK_ENV, "").lower() in ("1", "true", "yes"):
            raise
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{where}error: {error}", file=sys.stderr, flush=True)
        sys.exit(KNOWN_ERROR_EXIT_CODE)


if __name__ == "__main__":
    cli()
