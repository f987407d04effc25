"""What S2T decoding counts and records: per-call statistics, their running totals, and one record per trigger.

- [`CallStats`]: the counters of one `generate` call, per row (`processor.stats`);
- [`RunningTotals`]: the counts summed over every `generate` call since a reset (`processor.total_stats`);
- [`TriggerRecord`]: what happened at one trigger of one row (`processor.records`, read by data collection).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


__all__ = ["CallStats", "RunningTotals", "TriggerRecord", "with_rates"]

# counters kept per row during a `generate` call
ROW_COUNTERS = ("steps", "eligible_steps", "triggers", "flips", "teacher_hits", "teacher_unscored")
# counts that add up across `generate` calls
SUMMED_COUNTS = ("steps", "eligible_steps", "triggers", "flips", "teacher_hits", "teacher_unscored", "teacher_calls",
                 "teacher_tokens", "local_calls")


def with_rates(counts: dict[str, Any]) -> dict[str, Any]:
    """`counts` with `trigger_rate`, `teacher_hit_rate` and `flip_rate` added (0 where nothing was counted)."""
    counts["trigger_rate"] = counts["triggers"] / counts["eligible_steps"] if counts["eligible_steps"] else 0.0
    counts["teacher_hit_rate"] = counts["teacher_hits"] / counts["triggers"] if counts["triggers"] else 0.0
    counts["flip_rate"] = counts["flips"] / counts["triggers"] if counts["triggers"] else 0.0
    return counts


class CallStats:
    """
    The counters of one `generate` call: per-row tensors on the scores' device (updated without a host sync) and the
    teacher's and the local scorer's counts, read when the statistics are asked for.
    """

    def __init__(self) -> None:
        self.rows: dict[str, torch.Tensor] = {}

    @property
    def started(self) -> bool:
        """Whether a `generate` call has decoded a step since the last reset."""
        return bool(self.rows)

    def start(self, batch: int, device: torch.device) -> None:
        self.rows = {name: torch.zeros(batch, dtype=torch.long, device=device) for name in ROW_COUNTERS}

    def clear(self) -> None:
        self.rows = {}

    def count_step(self, active: torch.Tensor, eligible: torch.Tensor, triggered: torch.Tensor | None = None) -> None:
        """Counts one decoding step of the `active` rows, the `eligible` ones and those that `triggered`."""
        self.rows["steps"] += active
        self.rows["eligible_steps"] += eligible
        if triggered is not None:
            self.rows["triggers"] += triggered

    def count_decisions(
        self,
        triggered: torch.Tensor,
        chosen: torch.Tensor,
        candidate_ids: torch.Tensor,
        teacher_top1: torch.Tensor | None,
        teacher_unscored: torch.Tensor | None = None,
    ) -> None:
        """
        Counts the flips of a decided step (the chosen token is not the student's top-1), the triggered rows the
        teacher could not score exactly (`teacher_unscored`, one per triggered row) and, where the teacher's top-1
        token is known (`teacher_top1`, one per triggered row), whether it was among the candidates.
        """
        self.rows["flips"] += triggered & (chosen != candidate_ids[:, 0])
        if teacher_unscored is not None:
            self.rows["teacher_unscored"][triggered.nonzero()[:, 0]] += teacher_unscored.long()
        if teacher_top1 is not None:
            rows = triggered.nonzero()[:, 0]
            hit = (candidate_ids[rows] == teacher_top1[:, None]).any(-1)
            self.rows["teacher_hits"][rows] += hit.long()

    def as_dict(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The statistics (`extra` holds the teacher's and the scorer's counts): totals, per-row lists and rates."""
        out: dict[str, Any] = dict(extra)
        for name in ROW_COUNTERS:
            values = self.rows.get(name)
            out[name] = int(values.sum()) if values is not None else 0
            out[f"{name}_per_row"] = values.tolist() if values is not None else []
        return with_rates(out)


class RunningTotals:
    """The counts of [`CallStats`] summed over `generate` calls."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.counts: dict[str, int] = {name: 0 for name in SUMMED_COUNTS}
        self.generate_calls = 0

    def add(self, call: dict[str, Any]) -> None:
        """Adds the statistics of one finished `generate` call."""
        for name in SUMMED_COUNTS:
            self.counts[name] += call[name]
        self.generate_calls += 1

    def as_dict(self, current: dict[str, Any] | None = None) -> dict[str, Any]:
        """The totals, with the `current` call's statistics (not yet added) counted in, and their rates."""
        out: dict[str, Any] = dict(self.counts)
        calls = self.generate_calls
        if current is not None:
            for name in SUMMED_COUNTS:
                out[name] += current[name]
            calls += 1
        out["generate_calls"] = calls
        return with_rates(out)


@dataclasses.dataclass
class TriggerRecord:
    """
    One trigger of one row: its context, the student's candidates and probabilities, the token chosen, and what the
    teacher or the local selector said. [`to_dict`] gives the dictionary `processor.records` holds.

    Args:
        row (`int`): the row of the batch.
        step (`int`): generated tokens before this one.
        signal (`float`, *optional*): the trigger's signal (entropy, KL or learned logit); `None` for signal-free
            triggers.
        context_ids (`list[int]`): the row's tokens so far, padding removed.
        cand_ids (`list[int]`): the student's top-K candidate ids, best first.
        student_probs (`list[float]`): the student's probabilities of the candidates.
        chosen_id (`int`): the token emitted.
        teacher_probs (`list[float]`, *optional*): the teacher's absolute probabilities of the candidates.
        teacher_top1 (`int`, *optional*): the teacher's argmax over its whole vocabulary.
        local_scores (`list[float]`, *optional*): the local selector's candidate logits.
    """

    row: int
    step: int
    signal: float | None
    context_ids: list[int]
    cand_ids: list[int]
    student_probs: list[float]
    chosen_id: int
    teacher_probs: list[float] | None = None
    teacher_top1: int | None = None
    local_scores: list[float] | None = None

    _OPTIONAL = ("teacher_probs", "teacher_top1", "local_scores")

    def to_dict(self) -> dict[str, Any]:
        """The record as a dictionary; the optional keys are present only when known."""
        out = dataclasses.asdict(self)
        for name in self._OPTIONAL:
            if out[name] is None:
                del out[name]
        return out


def trigger_records(
    step: int,
    pending: Any,
    chosen: torch.Tensor,
    teacher_choice: Any = None,
    local_logits: torch.Tensor | None = None,
) -> list[TriggerRecord]:
    """
    The [`TriggerRecord`] of every triggered row of a decided step.

    Args:
        step (`int`): generated tokens before this one.
        pending (`PendingSelection`): the step's rows, triggered rows and candidates.
        chosen (`torch.LongTensor` of shape `(batch,)`): the token each triggered row emits.
        teacher_choice (`TeacherChoice`, *optional*): the teacher's answer, for the triggered rows in order.
        local_logits (`torch.Tensor` of shape `(n, K)`, *optional*): the local selector's candidate logits, likewise.
    """
    records = []
    for index, row in enumerate(pending.triggered.nonzero()[:, 0].tolist()):
        record = TriggerRecord(
            row=row,
            step=step,
            signal=float(pending.signal[row]) if pending.signal is not None else None,
            context_ids=pending.input_ids[row][pending.mask[row].bool()].tolist(),
            cand_ids=pending.candidate_ids[row].tolist(),
            student_probs=pending.candidate_log_probs[row].exp().tolist(),
            chosen_id=int(chosen[row]),
        )
        if teacher_choice is not None:
            if teacher_choice.candidate_log_probs is not None:
                record.teacher_probs = teacher_choice.candidate_log_probs[index].exp().tolist()
            if teacher_choice.top1 is not None:
                record.teacher_top1 = int(teacher_choice.top1[index])
        if local_logits is not None:
            record.local_scores = local_logits[index].tolist()
        records.append(record)
    return records
