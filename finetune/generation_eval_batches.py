"""Batches for evaluation by generation during training (decoder-only model): prompts split from references.

Each encoded example (input_ids, labels) is split into its prompt - everything before the last run of learned tokens -
and its reference - that run (the response and its eos for input-output data, the final assistant turn for
conversations). Prompts are LEFT-padded so every row's generation starts right after its own last prompt token;
the full example stays in the batch, right-padded, for the evaluation loss.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from finetune.data.collator import RightPaddingCollator
from finetune.data.encoding import IGNORE_INDEX

PROMPT_INPUT_IDS = "prompt_input_ids"
PROMPT_ATTENTION_MASK = "prompt_attention_mask"
REFERENCE_IDS = "reference_ids"
GENERATION_KEYS = (PROMPT_INPUT_IDS, PROMPT_ATTENTION_MASK, REFERENCE_IDS)


def split_prompt_and_reference(input_ids: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
    """The prompt (ids before the last run of learned tokens) and the reference (the labels of that run)."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        raise ValueError("an evaluation example has no learned token, so it has no reference to generate")
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(input_ids[:start]), list(labels[start:end])


@dataclass
class GenerationEvalCollator:
    """Batches for evaluation: the full examples right-padded (input_ids, attention_mask, labels) for the loss,
    plus `prompt_input_ids`/`prompt_attention_mask` (left-padded prompts) and `reference_ids` (-100 padded)."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collate encoded examples into loss and generation tensors."""
        full_rows = [{"input_ids": feature["input_ids"], "labels": feature["labels"]} for feature in features]
        batch = RightPaddingCollator(self.pad_token_id, self.pad_to_multiple_of)(full_rows)
        splits = [split_prompt_and_reference(row["input_ids"], row["labels"]) for row in full_rows]
        prompt_width = max(len(prompt) for prompt, _ in splits)
        reference_width = max(len(reference) for _, reference in splits)
        batch[PROMPT_INPUT_IDS] = torch.tensor(
            [[self.pad_token_id] * (prompt_width - len(prompt)) + prompt for prompt, _ in splits], dtype=torch.long
        )
        batch[PROMPT_ATTENTION_MASK] = torch.tensor(
            [[0] * (prompt_width - len(prompt)) + [1] * len(prompt) for prompt, _ in splits], dtype=torch.long
        )
        batch[REFERENCE_IDS] = torch.tensor(
            [reference + [IGNORE_INDEX] * (reference_width - len(reference)) for _, reference in splits],
            dtype=torch.long,
        )
        return batch


def blank_after_stop(generated: torch.Tensor, stop_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Replace each row's first stop token and everything after it with the pad id."""
    is_stop = torch.isin(generated, torch.tensor(list(stop_ids), device=generated.device))
    after_stop = is_stop.long().cumsum(dim=-1) > 0
    return generated.masked_fill(after_stop, pad_token_id)


def _text_ids(row: Sequence[int], pad_token_id: int | None) -> list[int]:
    """Ids of one row without -100 fill and pad ids."""
    return [int(token) for token in row if int(token) != IGNORE_INDEX and int(token) != pad_token_id]


def prediction_records(
    examples: Sequence[dict],
    predictions: np.ndarray,
    tokenizer: PreTrainedTokenizerBase,
    keep_prompt_special_tokens: bool,
) -> list[dict[str, str]]:
    """One {"prompt", "label", "prediction"} text record per example, in order.

    Prompts keep their role tokens when `keep_prompt_special_tokens` (conversations); labels and predictions are
    decoded without special tokens, as the metrics score them.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} prediction rows; they must correspond")
    special_ids = set(tokenizer.all_special_ids)

    def text_only(ids: Sequence[int]) -> list[int]:
        # ChatGLM3's decode, like the official one, writes command tokens even with skip_special_tokens.
        return [token for token in ids if token not in special_ids]

    records = []
    for example, generated in zip(examples, predictions):
        prompt, reference = split_prompt_and_reference(example["input_ids"], example["labels"])
        records.append(
            {
                "prompt": tokenizer.decode(prompt if keep_prompt_special_tokens else text_only(prompt)),
                "label": tokenizer.decode(text_only(_text_ids(reference, None))),
                "prediction": tokenizer.decode(text_only(_text_ids(generated, tokenizer.pad_token_id))),
            }
        )
    return records
