"""Statistics and trigger records (`s2t_hf.stats`)."""

from __future__ import annotations

import torch

from s2t_hf.selection import PendingSelection
from s2t_hf.stats import CallStats, RunningTotals, TriggerRecord, trigger_records


def test_call_stats_count_per_row_and_running_totals_add_calls():
    stats = CallStats()
    assert not stats.started and stats.as_dict({})["steps_per_row"] == []
    stats.start(3, torch.device("cpu"))
    active, eligible = torch.tensor([True, True, False]), torch.tensor([True, False, False])
    stats.count_step(active, eligible, torch.tensor([True, False, False]))
    stats.count_step(active, eligible)
    candidates = torch.tensor([[4, 5], [6, 7], [8, 9]])
    stats.count_decisions(torch.tensor([True, False, False]), torch.tensor([5, -1, -1]), candidates, torch.tensor([4]))
    call = stats.as_dict({"teacher_calls": 2, "teacher_tokens": 7, "local_calls": 0, "local_path": None})
    assert call["steps_per_row"] == [2, 2, 0] and call["eligible_steps"] == 2 and call["triggers"] == 1
    assert call["flips"] == 1 and call["teacher_hits"] == 1 and call["trigger_rate"] == 0.5
    totals = RunningTotals()
    totals.add(call)
    both = totals.as_dict(current=call)  # the current call is counted in without being added
    assert both["generate_calls"] == 2 and both["steps"] == 8 and both["teacher_tokens"] == 14
    assert totals.as_dict()["generate_calls"] == 1


def test_trigger_records_keep_the_documented_keys():
    input_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    pending = PendingSelection(
        input_ids, mask, torch.tensor([1.5, 0.1]), torch.tensor([True, False]), torch.tensor([[3, 4], [1, 2]]),
        torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5]])), torch.ones(2, 2, dtype=torch.bool),
    )
    records = trigger_records(2, pending, torch.tensor([4, -1]), local_logits=torch.tensor([[0.1, 0.9]]))
    assert len(records) == 1 and isinstance(records[0], TriggerRecord)
    record = records[0].to_dict()
    assert list(record) == [
        "row", "step", "signal", "context_ids", "cand_ids", "student_probs", "chosen_id", "local_scores"
    ]
    assert record["context_ids"] == [5, 6] and record["chosen_id"] == 4 and record["step"] == 2
    assert torch.allclose(torch.tensor(record["student_probs"]), torch.tensor([0.75, 0.25]))
