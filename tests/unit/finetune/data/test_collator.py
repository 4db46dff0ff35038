"""Batch collation (right padding) and packing; packed rows must give the same logits and loss as unpacked ones."""

import random
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.trainer_pt_utils import LengthGroupedSampler

import finetune.model  # noqa: F401  (registers ChatGLM3 with the Auto classes)
from finetune.data.collator import RightPaddingCollator, first_fit_bins, pack_examples, packed_attention_stretch
from finetune.data.encoding import IGNORE_INDEX, encode_conversation
from finetune.data.loading import EncodingLimits, load_training_data
from finetune.model.modeling import segment_layout
from finetune.model.tokenization import ChatGLMTokenizer

PAD_ID = 0


def example(length: int, start: int) -> dict:
    """An encoded example of `length` tokens; its labels learn every token after the first two."""
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [IGNORE_INDEX, IGNORE_INDEX] + ids[2:], "length": length}


def naive_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit by scanning every bin: the reference for the tree-based version."""
    bins: list[list[int]] = []
    free: list[int] = []
    for item, length in enumerate(lengths):
        for index, room in enumerate(free):
            if room >= length:
                bins[index].append(item)
                free[index] -= length
                break
        else:
            bins.append([item])
            free.append(capacity - length)
    return bins


def test_collator_pads_right_to_the_longest_row():
    batch = RightPaddingCollator(pad_token_id=PAD_ID)([example(3, 10), example(5, 20)])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["labels"].tolist() == [[-100, -100, 12, -100, -100], [-100, -100, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_pads_to_a_multiple_or_a_fixed_length():
    features = [example(3, 10), example(5, 20)]
    assert RightPaddingCollator(PAD_ID, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)
    assert RightPaddingCollator(PAD_ID, max_length=6)(features)["labels"].shape == (2, 6)
    assert RightPaddingCollator(PAD_ID, pad_to_multiple_of=4, max_length=6)(features)["labels"].shape == (2, 8)
    with pytest.raises(ValueError, match="more than max_length=4"):
        RightPaddingCollator(PAD_ID, max_length=4)(features)


def test_collator_rejects_rows_with_different_fields():
    packed_row = {**example(3, 10), "attention_mask": [1, 1, 1], "position_ids": [0, 1, 2]}
    with pytest.raises(ValueError, match="different fields"):
        RightPaddingCollator(PAD_ID)([packed_row, example(3, 20)])


def test_first_fit_matches_the_scanning_definition():
    assert first_fit_bins([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    generator = random.Random(0)
    for _ in range(20):
        lengths = [generator.randint(1, 64) for _ in range(generator.randint(1, 200))]
        assert first_fit_bins(lengths, 64) == naive_first_fit(lengths, 64)
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the packing length 8"):
        first_fit_bins([3, 9], 8)


def test_packing_concatenates_examples_with_segments_and_restarted_positions():
    features = [example(5, 100), example(4, 200), example(3, 300), example(2, 400), example(6, 500)]
    packed = pack_examples(datasets.Dataset.from_list(features), max_length=8)
    rows = packed[:]
    assert rows["input_ids"] == [
        [100, 101, 102, 103, 104, 300, 301, 302],
        [200, 201, 202, 203, 400, 401],
        [500, 501, 502, 503, 504, 505],
    ]
    assert rows["attention_mask"] == [[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 2, 2], [1] * 6]
    assert rows["position_ids"] == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert rows["labels"][0] == [-100, -100, 102, 103, 104, -100, -100, 302]
    assert rows["length"] == [8, 6, 6]
    assert rows["segments"] == [2, 2, 1] and rows["longest"] == [5, 4, 6]
    batch = RightPaddingCollator(PAD_ID)([packed[index] for index in range(3)])
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 2, 2, 0, 0]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 3, 0, 1, 0, 0]
    assert batch["labels"].tolist()[1][-2:] == [-100, -100]


def test_packing_never_learns_the_first_token_of_an_example():
    features = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    packed = pack_examples(datasets.Dataset.from_list(features), max_length=8)
    assert packed[0]["labels"] == [-100, 2, 3, -100, 5]


def test_encoded_dataset_has_the_length_column_the_trainer_sampler_reads(reference_model_dir: Path, shared_dir: Path):
    tokenizer = ChatGLMTokenizer.from_pretrained(reference_model_dir)
    path = shared_dir / "data" / "advertise_gen" / "expected_advertise_gen.jsonl"
    dataset = load_training_data(path, tokenizer, EncodingLimits(32, 160), cache_dir=None).dataset
    lengths = dataset["length"][:]
    assert lengths == [len(ids) for ids in dataset["input_ids"][:]]
    sampler = LengthGroupedSampler(batch_size=4, lengths=lengths, generator=torch.Generator().manual_seed(0))
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert lengths[order[0]] == max(lengths)


@pytest.fixture(scope="module")
def reference_model(reference_model_dir: Path) -> torch.nn.Module:
    """The reference tiny ChatGLM3 checkpoint, fp32, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir, dtype=torch.float32)
    return model.eval()


def test_packed_batch_gives_the_same_logits_and_loss_as_unpacked(
    reference: dict, reference_model_dir: Path, reference_model: torch.nn.Module
):
    tokenizer = ChatGLMTokenizer.from_pretrained(reference_model_dir)
    encoded = [encode_conversation(item["item"], tokenizer, max_seq_length=None) for item in reference["multi_turn"]]
    encoded.append(encode_conversation(reference["multi_turn"][0]["item"], tokenizer, max_seq_length=20))
    packing_length = max(len(item["input_ids"]) for item in encoded) + 30
    packed = pack_examples(datasets.Dataset.from_list(encoded), max_length=packing_length)
    assert packed.num_rows < len(encoded)
    batch = RightPaddingCollator(pad_token_id=tokenizer.pad_token_id)([packed[row] for row in range(packed.num_rows)])

    with torch.no_grad():
        packed_output = reference_model(**batch)
        unpacked_logits = [
            reference_model(input_ids=torch.tensor([item["input_ids"]])).logits[0] for item in encoded
        ]

    loss_sum, token_count = 0.0, 0
    for item, logits in zip(encoded, unpacked_logits):
        labels = torch.tensor(item["labels"][1:])
        loss_sum += F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        token_count += int((labels != IGNORE_INDEX).sum())
    assert packed_output.loss.item() == pytest.approx(loss_sum / token_count, rel=1e-5)

    segments = batch["attention_mask"]
    members = first_fit_bins([len(item["input_ids"]) for item in encoded], packing_length)
    for row, row_members in enumerate(members):
        for segment, index in enumerate(row_members, start=1):
            positions = (segments[row] == segment).nonzero().flatten()
            torch.testing.assert_close(
                packed_output.logits[row, positions], unpacked_logits[index], rtol=1e-4, atol=1e-5
            )


def test_attention_stretch_bounds_every_batch_of_packed_rows():
    """The stretch the memory estimate uses is at least what segment_layout really allocates for any batch."""
    rng = random.Random(5)
    features = [example(rng.randint(20, 260), 1000 * index) for index in range(200)]
    packed = pack_examples(datasets.Dataset.from_list(features), max_length=1024)
    stretch = packed_attention_stretch(packed)
    collator = RightPaddingCollator(PAD_ID)
    observed = []
    for _ in range(50):
        indices = rng.sample(range(len(packed)), 4)
        mask = collator([packed[index] for index in indices])["attention_mask"]
        observed.append(segment_layout(mask).gather.numel() / mask.numel())
    assert 1.0 < max(observed) <= stretch < 2 * max(observed)
    assert packed_attention_stretch(packed.select([])) == 1.0
