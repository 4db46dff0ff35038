"""Batching for training: right padding to the longest row, and optional packing of several examples per row.

Packed rows carry segment ids in `attention_mask` (1 for the first example of the row, 2 for the second, ...,
0 for padding) and `position_ids` restarting at 0 per example; the model treats an attention mask whose maximum
is above 1 as segment ids and lets no token attend across an example boundary.

Length-grouped sampling is the Trainer's own (`train_sampling_strategy="group_by_length"`); the encoded and
packed datasets carry the `length` column it reads.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from finetune.data.encoding import IGNORE_INDEX

PADDING_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0}
PADDED_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


@dataclass
class RightPaddingCollator:
    """Collate encoded examples into tensors, padding on the right: input_ids with the pad id, labels with -100,
    attention_mask with 0 (built as 1/0 when the rows have none), position_ids with 0.

    Rows are padded to the longest row of the batch, or to `max_length` when set, rounded up to a multiple of
    `pad_to_multiple_of`. Keys other than input_ids, labels, attention_mask and position_ids are dropped.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    max_length: int | None = None

    def padded_length(self, longest: int) -> int:
        """Length every row of a batch whose longest row has `longest` tokens is padded to."""
        if self.max_length is not None:
            if longest > self.max_length:
                raise ValueError(f"a row has {longest} tokens, more than max_length={self.max_length}")
            longest = self.max_length
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        return longest

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Pad and stack a list of examples into a batch of tensors."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        keys = [key for key in PADDED_KEYS if key in features[0]]
        for index, feature in enumerate(features):
            present = [key for key in PADDED_KEYS if key in feature]
            if present != keys:
                raise ValueError(f"batch rows have different fields: row 0 has {keys}, row {index} has {present}")
        lengths = [len(feature["input_ids"]) for feature in features]
        target = self.padded_length(max(lengths))
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            fill = self.pad_token_id if key == "input_ids" else PADDING_VALUES[key]
            rows = [list(feature[key]) + [fill] * (target - len(feature[key])) for feature in features]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor(
                [[1] * length + [0] * (target - length) for length in lengths], dtype=torch.long
            )
        return batch


def first_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items, in order, each to the first bin with room (first-fit); return the item indices of each bin.

    A max-tree over the bins' free space finds the leftmost bin with room in O(log n).
    """
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"example {item} has {length} tokens, more than the packing length {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        bin_index = node - size
        if bin_index == len(bins):
            bins.append([])
        bins[bin_index].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_examples(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Concatenate encoded examples into rows of at most `max_length` tokens (first-fit, in dataset order).

    Each row has input_ids, labels (the first token of every example set to -100, so nothing is predicted
    across a boundary), position_ids restarting at 0 per example, attention_mask holding segment ids 1, 2, ...,
    length, and segments (examples in the row) with longest (tokens of its longest example).
    """
    columns = dataset.select_columns(["input_ids", "labels"])[:]
    input_ids, labels = columns["input_ids"], columns["labels"]
    rows: dict[str, list] = {
        "input_ids": [], "labels": [], "position_ids": [], "attention_mask": [], "length": [], "segments": [],
        "longest": [],
    }
    for members in first_fit_bins([len(ids) for ids in input_ids], max_length):
        row_ids, row_labels, row_positions, row_segments = [], [], [], []
        for segment, item in enumerate(members, start=1):
            length = len(input_ids[item])
            row_ids += input_ids[item]
            row_labels += [IGNORE_INDEX] + list(labels[item][1:])
            row_positions += range(length)
            row_segments += [segment] * length
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["position_ids"].append(row_positions)
        rows["attention_mask"].append(row_segments)
        rows["length"].append(len(row_ids))
        rows["segments"].append(len(members))
        rows["longest"].append(max(len(input_ids[item]) for item in members))
    return datasets.Dataset.from_dict(rows)


def packed_attention_stretch(rows: datasets.Dataset, prefix_length: int = 0) -> float:
    """How many times its tokens attention's one-example-per-row layout of a batch of packed rows can hold, at most.

    The model attends packed rows one example per row, each padded to the batch's longest example and led by the
    P-Tuning prefix (finetune/model/modeling.py `segment_layout`), so a batch keeps segments x (prefix + longest)
    query/key/value slots for backward instead of its token count. Bound: the most examples in a row times the
    prefix plus the longest example, over the mean row length.
    """
    if len(rows) == 0:
        return 1.0
    mean_length = sum(rows["length"]) / len(rows)
    return max(1.0, max(rows["segments"]) * (prefix_length + max(rows["longest"])) / mean_length)
