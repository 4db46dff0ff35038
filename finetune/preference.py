"""Preference tuning (DPO, or the reference-free SimPO) on top of any fine-tuning method:
`python -m finetune.preference --model_name_or_path BASE --train_file PAIRS --output_dir D [method flags]
[--pref_loss dpo|simpo] [--pref_beta 0.1] [--init_checkpoint SFT_CHECKPOINT]` or `python -m finetune.preference
configs/dpo.yaml`; the launcher is scripts/finetune_dpo.sh.

The loss is ours (finetune.preference_loss) inside our Trainer, not TRL's DPOTrainer: TRL 1.16 asks the model for
fused per-token log-probabilities (`fused_lm_head=True`), which ChatGLM3 does not have, and re-tokenizes prompts and
completions its own way, not with our ChatGLM3 encoding (docs/preference.md). The reference needs no second model:
the method's `reference_context` (LoRA: adapter disabled, P-Tuning v2: prefix disabled) runs the same model as the
reference; full and freeze tuning change the base weights, and a run continuing an SFT adapter or prefix starts from
weights that disabling would not give back, so there the reference log-probabilities are computed once before
training and cached with the data. Checkpoints are ordinary checkpoints of their method; training_record.json
adds stage, loss, beta and reference.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import AutoConfig, Seq2SeqTrainingArguments, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from finetune.arguments import DataArguments, ModelArguments, parse_arguments
from finetune.callbacks import LossCurveCallback, StopOnSignalCallback, ThroughputCallback
from finetune.checkpoint_format import base_model_reference, method_settings, open_checkpoint, read_training_record
from finetune.checkpoints import check_base_model_folder, resolve_base
from finetune.data.preference import REFERENCE_COLUMNS, PreferenceCollator, PreferenceData, load_preference_data
from finetune.memory_preflight import run_preflight
from finetune.methods import build_model, method_named, method_of, recognise_checkpoint
from finetune.methods.base import FinetuneMethod
from finetune.preference_loss import (
    DEFAULT_SIMPO_GAMMA,
    DPO,
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    PreferenceLoss,
    dpo_loss,
    simpo_loss,
)
from finetune.recompute import apply_recompute_plan
from finetune.train import (
    TrainingRun,
    already_finished,
    configure_logging,
    open_run,
    run_cli,
    save_metrics,
    train_until_done_or_signalled,
)
from finetune.trainer import FinetuneTrainer

logger = logging.getLogger("finetune.preference")

PREFERENCE_STAGE = "preference"


@dataclass
class PreferenceArguments:
    """The preference loss, its beta, and the SFT checkpoint to start from (which is then the reference)."""

    pref_loss: str = field(
        default=DPO, metadata={"help": f"Preference loss: {' or '.join(PREFERENCE_LOSSES)} (simpo needs no reference)."}
    )
    pref_beta: float = field(
        default=0.1, metadata={"help": "beta: DPO's KL strength / SimPO's reward scale (SimPO papers use 2.0-2.5)."}
    )
    simpo_gamma: float = field(default=DEFAULT_SIMPO_GAMMA, metadata={"help": "SimPO's target reward margin."})
    init_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT checkpoint, which is then the reference: a whole model (full or freeze "
            "tuning, or merged by inference/export.py), or a LoRA/P-Tuning v2 checkpoint of this run's method (its "
            "weights train on). Default: the base model."
        },
    )

    def __post_init__(self) -> None:
        if self.pref_loss not in PREFERENCE_LOSSES:
            raise ValueError(f"--pref_loss must be one of {', '.join(PREFERENCE_LOSSES)}, got {self.pref_loss!r}")
        if self.pref_beta <= 0:
            raise ValueError(f"--pref_beta must be positive, got {self.pref_beta}")

    @property
    def needs_reference(self) -> bool:
        """True for losses that compare with a reference model (DPO)."""
        return self.pref_loss not in REFERENCE_FREE_LOSSES


PREFERENCE_ARGUMENT_CLASSES = (ModelArguments, DataArguments, PreferenceArguments, Seq2SeqTrainingArguments)


def parse_preference_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, PreferenceArguments, Seq2SeqTrainingArguments]:
    """The command line, or one .yaml/.json config file, as the four argument objects of a preference run."""
    return parse_arguments(argv, PREFERENCE_ARGUMENT_CLASSES)


def start_from_checkpoint(model_args: ModelArguments, pref_args: PreferenceArguments) -> Path | None:
    """Apply --init_checkpoint. A whole-model SFT checkpoint becomes the run's base model (None is returned). An
    adapter or prefix checkpoint of the run's own method keeps its base; it is returned, for its weights to be loaded
    before training (they then train on, and the reference log-probabilities are those of the checkpoint, cached)."""
    if not pref_args.init_checkpoint:
        return None
    folder = Path(pref_args.init_checkpoint)
    record = read_training_record(folder) if folder.is_dir() else None
    sft_method = recognise_checkpoint(folder) if record is None else method_of_record(record)
    if sft_method is not None and sft_method.needs_base:
        run_method = method_of(model_args)
        if sft_method.checkpoint_kind != run_method.checkpoint_kind:
            raise ValueError(
                f"--init_checkpoint {folder}: a {sft_method.name} checkpoint holds only what it trained, so it can "
                f"start a {sft_method.name} preference run only (this run is {run_method.name}); or merge it into a "
                f"whole model first (python inference/export.py --model {folder} --output_dir MERGED) and start from "
                "that"
            )
        recorded = method_settings(record, run_method) if record is not None else None
        problem = run_method.settings_mismatch(recorded, model_args) if recorded is not None else None
        if problem:
            raise ValueError(f"--init_checkpoint {folder}: {problem}; use the SFT run's settings")
        model_args.model_name_or_path = resolve_base(open_checkpoint(folder))
        return folder
    check_base_model_folder(str(folder))
    if AutoConfig.from_pretrained(folder).pre_seq_len:
        raise ValueError(
            f"--init_checkpoint {folder}: this model carries a P-Tuning v2 prefix (pre_seq_len in config.json), which "
            "cannot serve as the reference of a preference run; start from a full, freeze or merged LoRA SFT model"
        )
    model_args.model_name_or_path = str(folder)
    return None


def method_of_record(record: dict) -> FinetuneMethod | None:
    """The method a training record names, or None."""
    return method_named(record["method"]) if record.get("method") else None


def reference_description(
    method: FinetuneMethod, pref_args: PreferenceArguments, model_args: ModelArguments, adapter_start: Path | None
) -> str:
    """What the run compares with: nothing (reference-free), or how the starting model is the reference."""
    if not pref_args.needs_reference:
        return f"none ({pref_args.pref_loss} is reference-free)"
    if adapter_start is not None:
        return (
            f"{adapter_start.resolve()}: log-probabilities of this SFT checkpoint, computed in one pass before "
            "training and cached with the data"
        )
    return f"{base_model_reference(model_args.model_name_or_path)}: {method.reference_description()}"


def sequence_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of the labelled tokens of every row, and their counts."""
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        sequence_log_probs=True,
        use_cache=False,
    )
    return output.log_probs, output.label_counts


def cache_reference_log_probs(
    model: nn.Module, dataset: datasets.Dataset, collator: PreferenceCollator, batch_size: int
) -> datasets.Dataset:
    """The dataset with the starting model's summed log-probabilities of each chosen and rejected reply added as
    columns (one pass, no gradients): the reference of full and freeze tuning, which change the base weights."""
    device = next(model.parameters()).device
    chosen: list[float] = []
    rejected: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
            batch = {key: value.to(device) for key, value in collator(rows).items()}
            log_probs, _counts = sequence_log_probs(model, batch)
            pairs = len(rows)
            chosen += log_probs[:pairs].tolist()
            rejected += log_probs[pairs:].tolist()
    model.train(was_training)
    dataset = dataset.remove_columns([column for column in REFERENCE_COLUMNS if column in dataset.column_names])
    return dataset.add_column(REFERENCE_COLUMNS[0], chosen).add_column(REFERENCE_COLUMNS[1], rejected)


class PreferenceTrainer(FinetuneTrainer):
    """Our Trainer with a preference loss: each batch holds the chosen sides, then the rejected sides, of its pairs;
    the reference comes from the method's reference context or from cached columns; rewards are logged per step."""

    def __init__(self, *args, pref_args: PreferenceArguments, reference: str, **kwargs):
        self.pref_args = pref_args
        self.reference = reference
        self._reward_logs: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        super().__init__(*args, **kwargs)

    def stage_record(self) -> dict:
        """stage=preference with the loss, beta and reference of the run."""
        return {
            "stage": PREFERENCE_STAGE,
            "preference": {
                "loss": self.pref_args.pref_loss,
                "beta": self.pref_args.pref_beta,
                "simpo_gamma": self.pref_args.simpo_gamma if self.pref_args.pref_loss != DPO else None,
                "reference": self.reference,
                "init_checkpoint": (
                    str(Path(self.pref_args.init_checkpoint).resolve()) if self.pref_args.init_checkpoint else None
                ),
            },
        }

    def _reference_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed log-probabilities of every row: cached, or the model in the reference context."""
        if REFERENCE_COLUMNS[0] in inputs:
            return torch.cat([inputs[REFERENCE_COLUMNS[0]], inputs[REFERENCE_COLUMNS[1]]])
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        context = self.method.reference_context(unwrapped)
        if context is None:
            raise ValueError(
                f"{self.method.name} tuning needs cached reference log-probabilities ({', '.join(REFERENCE_COLUMNS)})"
            )
        with torch.no_grad(), context:
            log_probs, _counts = sequence_log_probs(model, inputs)
        return log_probs.detach()

    def preference_loss(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> PreferenceLoss:
        """The loss of a batch of pairs (rows: chosen sides, then rejected sides)."""
        reference = self._reference_log_probs(model, inputs) if self.pref_args.needs_reference else None
        log_probs, counts = sequence_log_probs(model, inputs)
        pairs = log_probs.shape[0] // 2
        if reference is None:
            averages = log_probs / counts.clamp(min=1)
            return simpo_loss(averages[:pairs], averages[pairs:], self.pref_args.pref_beta, self.pref_args.simpo_gamma)
        reference = reference.to(log_probs.device)
        return dpo_loss(
            log_probs[:pairs], log_probs[pairs:], reference[:pairs], reference[pairs:], self.pref_args.pref_beta
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean preference loss of the batch's pairs; its rewards are kept for the next log."""
        result = self.preference_loss(model, inputs)
        self._reward_logs["train" if model.training else "eval"].append(result.metrics())
        loss = result.losses.mean()
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean rewards since the last log (rewards/chosen, /rejected, /accuracies, /margins)."""
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        entries = self._reward_logs[split]
        if entries:
            prefix = "eval_" if split == "eval" else ""
            for key in entries[0]:
                logs[prefix + key] = sum(entry[key] for entry in entries) / len(entries)
            entries.clear()
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        """Evaluation: the preference loss of the batch (no generation)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def cache_reference(trainer: "PreferenceTrainer") -> None:
    """Add the starting model's reference log-probabilities to the trainer's train and eval pairs (one pass each)."""
    model, batch_size = trainer.model, trainer.args.per_device_eval_batch_size
    if not getattr(model, "is_quantized", False):
        model.to(trainer.args.device)  # DeepSpeed moves the model only in train(); the pass runs on the device
    pairs = len(trainer.train_dataset)
    logger.info("computing the reference log-probabilities of %d pairs (cached with the data)", pairs)
    trainer.train_dataset = cache_reference_log_probs(model, trainer.train_dataset, trainer.data_collator, batch_size)
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = cache_reference_log_probs(model, trainer.eval_dataset, trainer.data_collator, batch_size)


def check_preference_settings(
    model_args: ModelArguments, data_args: DataArguments, training_args: Seq2SeqTrainingArguments
) -> None:
    """Raise ValueError for settings a preference run cannot use, before any heavy work."""
    if not data_args.train_file:
        raise ValueError("a preference run needs --train_file with chosen/rejected pairs")
    if data_args.packing:
        raise ValueError("--packing does not apply to preference pairs (each pair is two rows); drop it (PACKING=0)")
    if training_args.predict_with_generate or training_args.do_predict:
        raise ValueError("preference runs do not generate; evaluate with python -m finetune.evaluate --data PAIRS")
    method = method_of(model_args)
    if method.zero3_problem and is_deepspeed_zero3_enabled():
        raise ValueError(method.zero3_problem)


def load_pairs(path: str, tokenizer, data_args: DataArguments, limit: int | None) -> PreferenceData:
    """Read, validate and encode one preference file (at most `limit` pairs)."""
    data = load_preference_data(path, tokenizer, data_args.max_seq_length, skip_invalid=data_args.skip_invalid)
    if limit is not None and limit < len(data.dataset):
        data.dataset = data.dataset.select(range(limit))
    logger.info("%s: %s", path, data.summary)
    return data


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    pref_args: PreferenceArguments,
    training_args: Seq2SeqTrainingArguments,
    extra_callbacks: tuple[TrainerCallback, ...] = (),
) -> TrainingRun:
    """Preference-tune as the arguments say: validate the pairs, estimate memory, build the method's model, cache the
    reference when the method needs it, train and save ordinary checkpoints of the method."""
    training_args.do_train = True
    training_args.remove_unused_columns = False
    if training_args.include_num_input_tokens_seen == "no":
        training_args.include_num_input_tokens_seen = "non_padding"
    if training_args.ddp_find_unused_parameters is None:
        training_args.ddp_find_unused_parameters = False
    check_preference_settings(model_args, data_args, training_args)
    adapter_start = start_from_checkpoint(model_args, pref_args)
    resumed, tokenizer = open_run(model_args, training_args)
    resume = resumed.folder if resumed is not None else None
    with training_args.main_process_first(desc="encoding pairs"):
        train = load_pairs(data_args.train_file, tokenizer, data_args, data_args.max_train_samples)
        evaluation = (
            load_pairs(data_args.validation_file, tokenizer, data_args, data_args.max_eval_samples)
            if data_args.validation_file
            else None
        )
    method = method_of(model_args)
    model_config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        pre_seq_len=model_args.pre_seq_len,
        prefix_projection=model_args.prefix_projection,
    )
    estimate = run_preflight(
        model_config,
        model_args,
        data_args,
        training_args,
        seq_length=max(train.dataset["length"]),
        sequences_per_example=2,
        # Without a reference context the reference is cached before training, when nothing else is on the device.
        reference_pass=pref_args.needs_reference and method.reference_on_the_fly,
    )
    model = build_model(model_args, training_args)
    if not training_args.gradient_checkpointing:
        apply_recompute_plan(model, estimate.setup.recompute)
    collator = PreferenceCollator(tokenizer.pad_token_id, data_args.pad_to_multiple_of)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            config.bos_token_id = tokenizer.bos_token_id
    stop = StopOnSignalCallback()
    trainer = PreferenceTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=train.dataset,
        eval_dataset=evaluation.dataset if evaluation is not None else None,
        processing_class=tokenizer,
        callbacks=[ThroughputCallback(), LossCurveCallback(training_args.output_dir), *extra_callbacks, stop],
        model_args=model_args,
        data_args=data_args,
        pref_args=pref_args,
        reference=reference_description(method, pref_args, model_args, adapter_start),
    )
    if adapter_start is not None:
        logger.info("starting from the %s weights of %s", method.name, adapter_start)
        trainer.load_checkpoint_weights(adapter_start)
    if pref_args.needs_reference and (adapter_start is not None or not method.reference_on_the_fly):
        cache_reference(trainer)
    outcome = TrainingRun(trainer)
    if already_finished(resume, training_args):
        logger.info("%s already reached max_steps=%d; nothing left to train", resume, training_args.max_steps)
        trainer.load_checkpoint_weights(resume)
    else:
        result = train_until_done_or_signalled(trainer, resume, stop)
        outcome.metrics["train"] = result.metrics
        save_metrics(trainer, "train", result.metrics)
    trainer.save_final_model()
    if training_args.do_eval and trainer.eval_dataset is not None:
        outcome.metrics["eval"] = trainer.evaluate(metric_key_prefix="eval")
        save_metrics(trainer, "eval", outcome.metrics["eval"])
    return outcome


def main(argv: list[str] | None = None) -> TrainingRun:
    """Parse arguments (or one config file) and run; errors propagate (see `cli`)."""
    model_args, data_args, pref_args, training_args = parse_preference_arguments(argv)
    configure_logging(training_args)
    return run(model_args, data_args, pref_args, training_args)


def cli(argv: list[str] | None = None) -> None:
    """Command-line entry point, with finetune.train's handling of known errors and signals."""
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
