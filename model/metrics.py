"""Evaluation metrics, computed the way the MNER and MRE papers report them (training side, no torch).

NER: entity-level micro precision/recall/F1 from seqeval in its default (conlleval-compatible) mode, the
scorer of the Twitter-2015/2017 papers. RE: micro precision/recall/F1 over every relation except "None",
as the MNRE papers' code computes it.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

__all__ = ["ner_scores", "re_scores"]


def _check_same_shape(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted ones")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sequence {index}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")


def ner_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Entity-level scores of predicted tag sequences against gold ones (seqeval default mode).

    Returns ``{"precision", "recall", "f1"}`` (micro, floats in [0, 1]), ``"support"`` (the number of gold
    entities) and ``"per_type": {TYPE: {"precision", "recall", "f1", "support"}}`` for every entity type
    seen in gold or predictions. A score whose denominator is 0 is 0.
    """
    _check_same_shape(gold, pred)
    gold, pred = [list(tags) for tags in gold], [list(tags) for tags in pred]
    with warnings.catch_warnings():
        # With no entity at all seqeval averages an empty list for its "macro avg" row (unused here).
        warnings.simplefilter("ignore", RuntimeWarning)
        report = classification_report(gold, pred, output_dict=True, zero_division=0)
    per_type = {
        name: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in report.items()
        if not name.endswith(" avg")
    }
    return {
        "precision": float(precision_score(gold, pred, zero_division=0)),
        "recall": float(recall_score(gold, pred, zero_division=0)),
        "f1": float(f1_score(gold, pred, zero_division=0)),
        "support": len(get_entities(gold)),
        "per_type": per_type,
    }


def _prf(correct: int, predicted: int, actual: int) -> tuple[float, float, float]:
    """Precision, recall and F1 from counts, 0 where a denominator is 0."""
    precision = correct / predicted if predicted else 0.0
    recall = correct / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def re_scores(gold: list[str], pred: list[str], no_relation: str = "None") -> dict:
    """Micro precision/recall/F1 of relation labels, ignoring ``no_relation`` (MNRE's way).

    A prediction is correct when it equals the gold label and is not ``no_relation``; precision divides by
    the predictions that are not ``no_relation``, recall by the gold labels that are not. Also returns
    ``"per_relation": {name: {"precision", "recall", "f1", "support"}}`` for each relation other than
    ``no_relation`` seen in gold or predictions; ``"support"`` counts gold labels other than ``no_relation``
    (per relation: its gold count).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predicted ones")
    correct = Counter(g for g, p in zip(gold, pred) if g == p and g != no_relation)
    predicted = Counter(p for p in pred if p != no_relation)
    actual = Counter(g for g in gold if g != no_relation)
    precision, recall, f1 = _prf(sum(correct.values()), sum(predicted.values()), sum(actual.values()))
    per_relation = {}
    for name in sorted(set(predicted) | set(actual)):
        p, r, f = _prf(correct[name], predicted[name], actual[name])
        per_relation[name] = {"precision": p, "recall": r, "f1": f, "support": actual[name]}
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": sum(actual.values()),
        "per_relation": per_relation,
    }
