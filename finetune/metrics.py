"""ROUGE-1/2/L and BLEU-4 for generated Chinese text, in either of the two conventions published ChatGLM numbers use.

Convention "ptuning" (ChatGLM-6B's P-Tuning v2; the default; checked against shared/reference/metrics_reference.json):
- ROUGE: both texts are cut into words with jieba, joined with spaces and scored with `rouge-chinese`;
  the F-score x 100 is kept.
- BLEU-4: nltk `sentence_bleu` on characters (the reference's characters against the prediction's), smoothing
  method 3, x 100.
- Every per-pair value is rounded to 4 decimals; the corpus value is the mean of the rounded per-pair values,
  rounded to 4 decimals again.
- A pair whose prediction or reference is empty or whitespace-only scores 0 on every metric.

Convention "finetune_demo" (ChatGLM3's finetune_demo and GLM-4's):
- Both texts are stripped and cut into jieba words; ROUGE as above (F-score x 100, each value rounded to 4 decimals).
- BLEU-4: nltk `sentence_bleu` on those jieba words, smoothing method 3, on a 0-1 scale, not rounded.
- The corpus value is the plain mean of the per-pair values, not rounded. A pair whose prediction or reference is
  empty after stripping is left out of the mean (GLM-4 leaves out empty generations; ChatGLM3's demo would stop with
  rouge's "Hypothesis is empty" error).

jieba builds its dictionary on first use (about 1-2 s) and logs while doing so; its logging is silenced here.
Import this module only where metrics are computed, not from `finetune/__init__.py`.
"""

import logging
from collections.abc import Sequence

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from finetune.tool_metrics import compute_tool_metrics

METRIC_NAMES = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
PTUNING = "ptuning"
FINETUNE_DEMO = "finetune_demo"
METRIC_CONVENTIONS = (PTUNING, FINETUNE_DEMO)
DECIMALS = 4
PERCENT_SCALE = "0-100"
UNIT_SCALE = "0-1"

jieba.setLogLevel(logging.WARNING)
_ROUGE = Rouge()
_BLEU_SMOOTHING = SmoothingFunction().method3


def metric_scale(name: str, convention: str) -> str:
    """The scale of a metric in `convention`: "0-1" for finetune_demo's BLEU-4, else "0-100" (tool metrics too)."""
    return UNIT_SCALE if convention == FINETUNE_DEMO and name == "bleu-4" else PERCENT_SCALE


def _zero_scores() -> dict[str, float]:
    """All four metrics at 0.0."""
    return {name: 0.0 for name in METRIC_NAMES}


def _words(text: str) -> str:
    """The jieba words of `text` joined with single spaces, the input format rouge-chinese expects."""
    return " ".join(jieba.cut(text))


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-scores and character BLEU-4 of one prediction against one reference, x100, 4 decimals."""
    prediction_words = _words(prediction)
    reference_words = _words(reference)
    # rouge-chinese raises ValueError on a text with no non-whitespace content; such a pair has no overlap to score.
    if not prediction_words.strip() or not reference_words.strip():
        return _zero_scores()
    rouge = _ROUGE.get_scores(prediction_words, reference_words)[0]
    scores = {name: round(rouge[name]["f"] * 100, DECIMALS) for name in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=_BLEU_SMOOTHING)
    scores["bleu-4"] = float(round(bleu * 100, DECIMALS))
    return scores


def score_pair_finetune_demo(prediction: str, reference: str) -> dict[str, float] | None:
    """ROUGE-1/2/L (x100, 4 decimals) and word BLEU-4 (0-1) as ChatGLM3's finetune_demo; None for an empty text."""
    prediction_words = list(jieba.cut(prediction.strip()))
    reference_words = list(jieba.cut(reference.strip()))
    if not prediction.strip() or not reference.strip():
        return None
    rouge = _ROUGE.get_scores(" ".join(prediction_words), " ".join(reference_words))[0]
    scores = {name: round(rouge[name]["f"] * 100, DECIMALS) for name in ("rouge-1", "rouge-2", "rouge-l")}
    scores["bleu-4"] = float(sentence_bleu([reference_words], prediction_words, smoothing_function=_BLEU_SMOOTHING))
    return scores


def compute_metrics(
    predictions: Sequence[str], references: Sequence[str], convention: str = PTUNING
) -> dict[str, float]:
    """Mean ROUGE-1/2/L and BLEU-4 over aligned (prediction, reference) pairs in `convention`; zeros for no pairs."""
    if len(predictions) != len(references):
        raise ValueError(
            f"compute_metrics got {len(predictions)} predictions but {len(references)} references; "
            "pass one reference per prediction, in the same order"
        )
    if convention not in METRIC_CONVENTIONS:
        raise ValueError(f"unknown metric convention {convention!r}; expected one of {METRIC_CONVENTIONS}")
    pairs = zip(predictions, references, strict=True)
    if convention == FINETUNE_DEMO:
        scored = [score_pair_finetune_demo(prediction, reference) for prediction, reference in pairs]
        kept = [scores for scores in scored if scores is not None]
        if not kept:
            return _zero_scores()
        return {name: float(np.mean([scores[name] for scores in kept])) for name in METRIC_NAMES}
    pair_scores = [score_pair(prediction, reference) for prediction, reference in pairs]
    if not pair_scores:
        return _zero_scores()
    return {name: round(float(np.mean([scores[name] for scores in pair_scores])), DECIMALS) for name in METRIC_NAMES}


def score_rows(rows: Sequence[dict], convention: str = PTUNING) -> dict[str, float]:
    """ROUGE/BLEU of the text replies of prediction rows and, when any reference turn is a tool call, the tool-call
    metrics (the rows of finetune.generation.prediction_row)."""
    text_rows = [row for row in rows if not row.get("label_call")]
    metrics = compute_metrics([row["prediction"] for row in text_rows], [row["label"] for row in text_rows], convention)
    if any(row.get("label_call") for row in rows):
        metrics.update(compute_tool_metrics(rows))
    return metrics
