"""Tests of the collator (`s2t_hf.collator`): selection groups to the trainer's tensors, and malformed groups."""

from __future__ import annotations

import pytest
import torch

import s2t_hf
import s2t_hf.data
from s2t_hf.collator import SelectionGroupCollator


def test_the_collator_lives_in_collator_only():
    assert s2t_hf.SelectionGroupCollator is SelectionGroupCollator
    for name in ("SelectionGroupCollator", "check_selection_columns", "Collator"):
        with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
            getattr(s2t_hf.data, name)


def test_collator_pads_left_truncates_and_pads_candidates():
    features = [
        {"context_ids": [5, 6, 7, 8], "cand_ids": [1, 2, 3], "teacher_probs": [0.1, 0.2, 0.3],
         "student_probs": [0.5, 0.3, 0.1], "prompt_index": 0},
        {"context_ids": [9], "cand_ids": [4, 5], "teacher_probs": [0.6, 0.1], "student_probs": [0.7, 0.2]},
    ]
    batch = SelectionGroupCollator(pad_token_id=0, max_context_length=3, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[0, 6, 7, 8], [0, 0, 0, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["cand_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["cand_mask"].tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(batch["teacher_probs"], torch.tensor([[0.1, 0.2, 0.3], [0.6, 0.1, 0.0]]))
    assert batch["student_probs"].dtype == torch.float32 and set(batch) == {
        "input_ids", "attention_mask", "cand_ids", "cand_mask", "teacher_probs", "student_probs"}
    with pytest.raises(KeyError, match="remove_unused_columns"):
        SelectionGroupCollator()([{"context_ids": [1]}])
    with pytest.raises(ValueError, match="teacher_probs"):
        SelectionGroupCollator()([{"context_ids": [1], "cand_ids": [1, 2], "teacher_probs": [0.5]}])


GOOD_GROUP = {
    "context_ids": [5, 6, 7], "cand_ids": [8, 9, 10], "teacher_probs": [0.5, 0.3, 0.2],
    "student_probs": [0.6, 0.3, 0.1],
}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(context_ids=[]), ValueError, "empty `context_ids`"),
        (dict(cand_ids=[], teacher_probs=[]), ValueError, "has no `cand_ids`"),
        (dict(context_ids=["tom", "has"]), ValueError, "`context_ids` must be a flat list of token ids"),
        (dict(cand_ids=[8, 9.5, 10]), ValueError, "`cand_ids` must be a flat list of token ids"),
        (dict(cand_ids=[8, -1, 10]), ValueError, "`cand_ids` must be a flat list of token ids"),
        (dict(cand_ids=[[8], [9], [10]]), ValueError, "`cand_ids` must be a flat list of token ids"),
        (dict(teacher_probs=[0.5, 0.5]), ValueError, "3 `cand_ids` but 2 `teacher_probs`"),
        (dict(teacher_probs=[[0.5], [0.3], [0.2]]), ValueError, "`teacher_probs` must hold one finite, non-negative"),
        (dict(teacher_probs=[float("nan"), 0.3, 0.2]), ValueError, "`teacher_probs` must hold one finite"),
        (dict(teacher_probs=[-0.5, 0.3, 0.2]), ValueError, "`teacher_probs` must hold one finite"),
        (dict(student_probs=[0.5, 0.5]), ValueError, "3 `cand_ids` but 2 `student_probs`"),
        (dict(teacher_probs=None), KeyError, r"missing \['teacher_probs'\].*remove_unused_columns=False"),
    ],
)
def test_collator_refuses_malformed_groups(change, error, message):
    group = {k: v for k, v in {**GOOD_GROUP, **change}.items() if v is not None}
    with pytest.raises(error, match=message):
        SelectionGroupCollator()([group, GOOD_GROUP])
    with pytest.raises(ValueError, match="`features` is empty"):
        SelectionGroupCollator()([])


def test_collator_arguments_are_checked():
    with pytest.raises(ValueError, match="`max_context_length` must be a positive integer or None, got 0"):
        SelectionGroupCollator(max_context_length=0)
    with pytest.raises(ValueError, match="`pad_to_multiple_of` must be a positive integer or None, got 0"):
        SelectionGroupCollator(pad_to_multiple_of=0)


def test_shared_contexts_put_each_group_in_the_row_of_a_context_it_prefixes():
    """Prefixes share the longest context's row (equal contexts too); a context that is not a prefix gets its own row;
    contexts cut by `max_context_length` share only where they still are prefixes; groups keep the features' order."""
    features = [
        {"context_ids": [5, 6], "cand_ids": [1, 2], "teacher_probs": [0.5, 0.5]},
        {"context_ids": [5, 6, 7, 8], "cand_ids": [3, 4], "teacher_probs": [0.5, 0.5]},
        {"context_ids": [5, 9], "cand_ids": [3, 4], "teacher_probs": [0.5, 0.5]},
        {"context_ids": [5, 6], "cand_ids": [2, 4], "teacher_probs": [0.5, 0.5]},
    ]
    batch = SelectionGroupCollator(share_contexts=True)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 5, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["group_rows"].tolist() == [0, 0, 1, 0]
    assert batch["context_lengths"].tolist() == [2, 4, 2, 2]
    assert batch["cand_ids"].tolist() == [[1, 2], [3, 4], [3, 4], [2, 4]]
    cut = SelectionGroupCollator(share_contexts=True, max_context_length=2)(features)
    assert cut["input_ids"].tolist() == [[5, 6], [7, 8], [5, 9]] and cut["group_rows"].tolist() == [0, 1, 2, 0]
    assert "group_rows" not in SelectionGroupCollator()(features)
