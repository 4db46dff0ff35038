"""Preference metrics of a checkpoint on chosen/rejected pairs (`python -m finetune.evaluate --model CKPT --data
PAIRS` when the data holds pairs).

For every pair the implicit reward of each reply is beta * (log pi(reply) - log ref(reply)), summed over the reply's
tokens, with the reference of training: a run started from an SFT checkpoint (--init_checkpoint) is compared with that
checkpoint, loaded after the tuned model's pass; other LoRA and P-Tuning v2 checkpoints with the same model with the
adapter or prefix disabled; full and freeze checkpoints with the model they started from (the base_model of their
training_record.json), loaded after the tuned model's pass; a checkpoint without a method (a base model) with itself.
beta is the recorded preference beta (else 0.1). preference_accuracy is the share of pairs whose chosen reward
exceeds the rejected one (a tie counts one half, so a model equal to its reference scores 0.5).
"""

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from finetune.atomic_files import write_json_atomically
from finetune.checkpoint_format import open_checkpoint
from finetune.checkpoints import load_for_inference, load_from_arguments
from finetune.data.preference import PreferenceCollator, load_preference_data
from finetune.preference import sequence_log_probs

DEFAULT_BETA = 0.1
EVALUATION_MAX_LENGTH = 8192
METRICS_FILE = "metrics.json"


def pair_log_probs(model: torch.nn.Module, dataset, collator: PreferenceCollator, batch_size: int,
                   context_factory=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Summed log-probabilities of every chosen and every rejected reply (in the reference context when given)."""
    chosen, rejected = [], []
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).to_list()
        batch = {key: value.to(device) for key, value in collator(rows).items()}
        context = context_factory(model) if context_factory is not None else contextlib.nullcontext()
        with torch.no_grad(), context:
            log_probs, _counts = sequence_log_probs(model, batch)
        chosen.append(log_probs[: len(rows)].float().cpu())
        rejected.append(log_probs[len(rows) :].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> dict[str, float]:
    """preference_accuracy, mean reward_margin, mean chosen/rejected rewards and log-probabilities, and the count."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    margins = chosen_rewards - rejected_rewards
    wins = (margins > 0).float() + 0.5 * (margins == 0).float()
    return {
        "preference_accuracy": wins.mean().item(),
        "reward_margin": margins.mean().item(),
        "reward_chosen": chosen_rewards.mean().item(),
        "reward_rejected": rejected_rewards.mean().item(),
        "chosen_logps": chosen.mean().item(),
        "rejected_logps": rejected.mean().item(),
        "pairs": float(len(margins)),
    }


def evaluate_preferences(args: argparse.Namespace, output_dir: Path) -> dict[str, float]:
    """Load the checkpoint, score every pair of --data against the training reference, write metrics.json."""
    from finetune.evaluate import format_metrics_table  # finetune.evaluate imports this module: import when run

    checkpoint = open_checkpoint(args.model)
    folder, record = checkpoint.folder, checkpoint.record or {}
    beta = float((record.get("preference") or {}).get("beta") or DEFAULT_BETA)
    max_length = int((record.get("data_args") or {}).get("max_seq_length") or EVALUATION_MAX_LENGTH)
    model, tokenizer, _kind = load_from_arguments(args, checkpoint=checkpoint)
    data = load_preference_data(args.data, tokenizer, max_length, skip_invalid=args.skip_invalid)
    dataset = data.dataset
    if args.max_samples is not None and args.max_samples < len(dataset):
        dataset = dataset.select(range(args.max_samples))
    collator = PreferenceCollator(tokenizer.pad_token_id)
    chosen, rejected = pair_log_probs(model, dataset, collator, args.batch_size)
    method = checkpoint.method
    init_checkpoint = (record.get("preference") or {}).get("init_checkpoint")
    if init_checkpoint and Path(init_checkpoint).is_dir():
        del model
        reference_model, _tokenizer, _kind = load_for_inference(init_checkpoint, device=args.device, dtype=args.dtype)
        reference = pair_log_probs(reference_model, dataset, collator, args.batch_size)
        described = f"the SFT checkpoint the run started from, {init_checkpoint}"
    elif method is not None and method.reference_on_the_fly:
        reference = pair_log_probs(model, dataset, collator, args.batch_size, method.reference_context)
        described = method.reference_description()
    elif method is not None and record.get("base_model") and Path(record["base_model"]).resolve() != folder.resolve():
        dtype, device = model.dtype, model.device
        del model
        reference_model = AutoModelForCausalLM.from_pretrained(record["base_model"], dtype=dtype).to(device).eval()
        reference = pair_log_probs(reference_model, dataset, collator, args.batch_size)
        described = f"the starting model {record['base_model']}"
    else:
        reference = (chosen, rejected)
        described = "the model itself (no trained part to compare with)"
    metrics = preference_metrics(chosen, rejected, *reference, beta)
    write_json_atomically(output_dir / METRICS_FILE, metrics)
    print(format_metrics_table(metrics))
    print(
        f"{len(dataset)} preference pairs, beta {beta:g}, reference: {described}; metrics written to {output_dir}",
        file=sys.stderr,
    )
    return metrics
