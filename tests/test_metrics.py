"""The shipped `evaluate` modules load from the package offline and compute what a hand count gives."""

import pytest

from s2t_hf.metrics import load_metric, metric_path


def test_hit_at_k_against_a_hand_count():
    hit = load_metric("hit_at_k")
    predictions = [[5, 3, 9, 1], [1, 2, 4, 8], [7, 6, 5, 4]]
    references = [3, 8, 7]
    result = hit.compute(predictions=predictions, references=references, ks=[1, 2, 4, 8])
    assert result == {"hit@1": 1 / 3, "hit@2": 2 / 3, "hit@4": 1.0}  # K = 8 exceeds the 4 candidates: skipped


def test_answer_accuracy_counts_missing_answers_as_wrong():
    accuracy = load_metric("answer_accuracy")
    result = accuracy.compute(predictions=["12", "", " 7 ", ""], references=["12", "", "7", "3"])
    assert result == {"accuracy": 0.5, "missing": 0.5, "count": 4}


def test_unknown_metric_and_empty_input():
    with pytest.raises(ValueError, match="ships"):
        metric_path("bleu")
    with pytest.raises(ValueError, match="at least one"):
        load_metric("hit_at_k").compute(predictions=[], references=[])


def test_empty_or_mismatched_answers():
    accuracy = load_metric("answer_accuracy")
    with pytest.raises(ValueError, match="answer_accuracy needs at least one prediction"):
        accuracy.compute(predictions=[], references=[])
    for name, predictions, references in (("answer_accuracy", ["1", "2"], ["1"]), ("hit_at_k", [[1, 2], [3, 4]], [1])):
        with pytest.raises(ValueError, match=r"Mismatch in the number of predictions \(2\) and references \(1\)"):
            load_metric(name).compute(predictions=predictions, references=references)
