"""ROUGE/BLEU metrics: the official reference values, hand-computed cases, edge cases, scoring prediction rows."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from finetune.metrics import METRIC_NAMES, compute_metrics, score_pair, score_rows


@pytest.fixture(scope="module")
def metrics_reference(shared_dir: Path) -> dict:
    """The parsed shared/reference/metrics_reference.json."""
    return json.loads((shared_dir / "reference" / "metrics_reference.json").read_text(encoding="utf-8"))


def test_reference_pairs_match_official_values(metrics_reference: dict) -> None:
    for index, pair in enumerate(metrics_reference["pairs"]):
        scores = score_pair(pair["prediction"], pair["reference"])
        expected = {name: pair[name] for name in METRIC_NAMES}
        assert scores == expected, f"pair {index}: {pair['prediction']!r} vs {pair['reference']!r}"


def test_reference_corpus_mean_matches_official_value(metrics_reference: dict) -> None:
    predictions = [pair["prediction"] for pair in metrics_reference["pairs"]]
    references = [pair["reference"] for pair in metrics_reference["pairs"]]
    assert compute_metrics(predictions, references) == metrics_reference["mean"]


def test_identical_multi_word_text_scores_100() -> None:
    text = "这款连衣裙设计简约，夏天穿非常清凉。"
    assert score_pair(text, text) == {name: 100.0 for name in METRIC_NAMES}


def test_disjoint_text_scores_0() -> None:
    assert score_pair("完全不相关的句子", "牛仔外套") == {name: 0.0 for name in METRIC_NAMES}


def test_rouge_counts_words_hand_computed() -> None:
    # Unique words: 3 of 4 predicted unigrams match 3 of 5 reference unigrams; 2 of 3 bigrams match 2 of 4.
    scores = score_pair("alpha beta gamma delta", "alpha beta gamma epsilon zeta")
    rouge_1 = 2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5)
    rouge_2 = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    assert scores["rouge-1"] == pytest.approx(100 * rouge_1, abs=1e-4)
    assert scores["rouge-2"] == pytest.approx(100 * rouge_2, abs=1e-4)
    assert scores["rouge-l"] == pytest.approx(100 * rouge_1, abs=1e-4)  # the LCS is the 3 shared words


def test_bleu_brevity_penalty_hand_computed() -> None:
    # Every character n-gram of "abcd" is in "abcde": precision 1, brevity penalty exp(1 - 5/4).
    assert score_pair("abcd", "abcde")["bleu-4"] == round(100 * math.exp(1 - 5 / 4), 4)


def test_bleu_smoothing_method3_hand_computed() -> None:
    # 1-grams 3/4, 2-grams 1/3; no 3- or 4-gram matches, which method 3 smooths to 1/(2*2) and 1/(4*1).
    expected = (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** (1 / 4)
    assert score_pair("abxd", "abcd")["bleu-4"] == round(100 * expected, 4)


def test_no_character_overlap_gives_float_zero_bleu() -> None:
    bleu = score_pair("甲乙", "丙丁")["bleu-4"]
    assert bleu == 0.0 and isinstance(bleu, float)


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("", "这款连衣裙"),
        ("这款连衣裙", ""),
        ("", ""),
        ("   ", "这款连衣裙"),
        ("这款连衣裙", " \n\t"),
        ("\n", "\n"),
    ],
)
def test_empty_or_whitespace_text_scores_0(prediction: str, reference: str) -> None:
    assert score_pair(prediction, reference) == {name: 0.0 for name in METRIC_NAMES}


def test_punctuation_only_prediction_is_scored() -> None:
    scores = score_pair("。", "这款连衣裙。")
    assert scores["rouge-1"] > 0


def test_empty_prediction_counts_as_zero_in_the_mean() -> None:
    text = "这款连衣裙设计简约，夏天穿非常清凉。"
    assert compute_metrics([text, ""], [text, text]) == {name: 50.0 for name in METRIC_NAMES}


def test_corpus_value_is_mean_of_rounded_pair_values() -> None:
    predictions = ["宽松的阔腿裤，遮肉显瘦。", "abxd", "alpha beta gamma delta"]
    references = ["宽松的阔腿裤这两年真的吸粉不少，遮肉小能手。", "abcd", "alpha beta gamma epsilon zeta"]
    pairs = [score_pair(prediction, reference) for prediction, reference in zip(predictions, references)]
    expected = {name: round(sum(pair[name] for pair in pairs) / len(pairs), 4) for name in METRIC_NAMES}
    assert compute_metrics(predictions, references) == expected


def test_empty_lists_give_zeros() -> None:
    assert compute_metrics([], []) == {name: 0.0 for name in METRIC_NAMES}


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])



def test_score_rows_scores_text_replies_and_adds_tool_metrics_only_with_calls() -> None:
    answers = ["这款连衣裙简约大方，适合夏天穿着。", "这款连衣裙设计简约。"]
    references = ["这款连衣裙设计简约，夏天穿非常清凉。", "这款连衣裙设计简约。"]
    rows = [{"prediction": answer, "label": reference} for answer, reference in zip(answers, references)]
    assert score_rows(rows) == compute_metrics(answers, references)
    assert score_rows(rows)["rouge-1"] == pytest.approx((66.6667 + 100.0) / 2, abs=1e-4)
    call = {"name": "get_weather", "arguments": {"city": "北京"}}
    with_call = rows + [{"prediction": "", "label": None, "label_call": call, "predicted_call": call}]
    scored = score_rows(with_call)
    assert {name: scored[name] for name in METRIC_NAMES} == compute_metrics(answers, references)
    assert set(scored) > set(METRIC_NAMES)


def test_finetune_demo_convention_word_bleu_on_a_0_1_scale_and_unrounded_means(metrics_reference: dict) -> None:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    pairs = [pair for pair in metrics_reference["pairs"] if pair["prediction"].strip() and pair["reference"].strip()]
    predictions = [pair["prediction"] for pair in pairs] + ["   "]
    references = [pair["reference"] for pair in pairs] + ["an empty prediction is left out"]
    metrics = compute_metrics(predictions, references, convention="finetune_demo")
    for name in ("rouge-1", "rouge-2", "rouge-l"):
        # The same jieba-word ROUGE as the P-Tuning convention, averaged without rounding.
        assert metrics[name] == pytest.approx(float(np.mean([pair[name] for pair in pairs])), abs=1e-12)
    word_bleu = [
        sentence_bleu(
            [list(jieba.cut(pair["reference"]))],
            list(jieba.cut(pair["prediction"])),
            smoothing_function=SmoothingFunction().method3,
        )
        for pair in pairs
    ]
    assert metrics["bleu-4"] == pytest.approx(float(np.mean(word_bleu)), abs=1e-12)
    assert 0 < metrics["bleu-4"] < 1
    text = "这款连衣裙设计简约，夏天穿非常清凉。"
    assert compute_metrics([text], [text], "finetune_demo") == {
        "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 1.0,
    }  # fmt: skip
    assert compute_metrics(["  "], ["x"], "finetune_demo") == {name: 0.0 for name in METRIC_NAMES}
    with pytest.raises(ValueError, match="unknown metric convention 'bleu'"):
        compute_metrics([text], [text], "bleu")
