"""NER and RE scores on small examples whose expected values were worked out by hand."""

from __future__ import annotations

import pytest

from model.metrics import ner_scores, re_scores

GOLD_TAGS = [
    ["B-PER", "I-PER", "O", "B-LOC"],
    ["B-ORG", "O", "B-MISC", "I-MISC"],
    ["O", "O"],
]
PRED_TAGS = [
    ["I-PER", "I-PER", "O", "B-ORG"],  # I- at the start still reads as PER(0, 2): seqeval's default mode
    ["B-ORG", "O", "B-MISC", "O"],  # MISC cut short: wrong
    ["B-LOC", "O"],  # spurious
]


def test_ner_scores_by_hand():
    # Gold: PER, LOC, ORG, MISC (4). Predicted: PER ok, ORG wrong, ORG ok, MISC wrong, LOC wrong (5).
    scores = ner_scores(GOLD_TAGS, PRED_TAGS)
    assert scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert scores["support"] == 4
    assert scores["per_type"] == {
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
        "ORG": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
        "MISC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }
    assert all(type(value) is float for key, value in scores.items() if key in ("precision", "recall", "f1"))


def test_ner_scores_perfect_and_empty():
    perfect = ner_scores(GOLD_TAGS, GOLD_TAGS)
    assert (perfect["precision"], perfect["recall"], perfect["f1"], perfect["support"]) == (1.0, 1.0, 1.0, 4)
    nothing = ner_scores([["O", "O"]], [["O", "O"]])
    assert (nothing["precision"], nothing["recall"], nothing["f1"], nothing["support"]) == (0.0, 0.0, 0.0, 0)
    assert nothing["per_type"] == {}


def test_ner_scores_refuse_mismatched_lengths():
    with pytest.raises(ValueError):
        ner_scores([["O", "B-PER"]], [["O"]])
    with pytest.raises(ValueError):
        ner_scores([["O"]], [])


def test_re_scores_by_hand():
    gold = ["A", "A", "B", "None", "None", "B", "None"]
    pred = ["A", "B", "B", "A", "None", "None", "C"]
    # Correct: positions 0 (A) and 2 (B). Predicted relations: 5 (A, B, B, A, C). Gold relations: 4.
    scores = re_scores(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 5)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * 0.4 * 0.5 / 0.9)
    assert scores["support"] == 4
    assert scores["per_relation"] == {
        "A": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "B": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "C": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0},
    }


def test_re_scores_never_count_agreeing_on_no_relation():
    # Matching "None" labels are not correct predictions: nothing was predicted, nothing found.
    scores = re_scores(["None", "None", "A"], ["None", "None", "None"])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.0, 0.0, 0.0)
    assert scores["per_relation"] == {"A": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}}


def test_re_scores_custom_no_relation_label():
    scores = re_scores(["NA", "x", "x"], ["x", "x", "NA"], no_relation="NA")
    # Correct: 1 of 2 predicted, 1 of 2 gold.
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert "NA" not in scores["per_relation"]
    with pytest.raises(ValueError):
        re_scores(["x"], [])
