"""Selection policies and their registry (`s2t_hf.selection`): a registered kind against a slow reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from s2t_hf import S2TConfig, S2TLogitsProcessor
from s2t_hf.selection import SELECTIONS, Selection, SelectionPolicy


class SecondCandidate(SelectionPolicy):
    """Every triggered row emits the student's second candidate."""

    def select(self, step, pending):
        return Selection(torch.where(pending.triggered, pending.candidate_ids[:, 1], -1))


def _reference(model, prompt: list[int], new_tokens: int, warmup: int) -> list[int]:
    """Greedy decoding without a cache, the second-best token at every step past the warm-up."""
    sequence = torch.tensor([prompt])
    with torch.no_grad():
        for step in range(new_tokens):
            logits = model(sequence).logits[0, -1]
            token = logits.topk(2).indices[1] if step >= warmup else logits.argmax()
            sequence = torch.cat([sequence, token.view(1, 1)], dim=-1)
    return sequence[0, len(prompt):].tolist()


def test_a_registered_selection_kind_matches_a_slow_reference(monkeypatch):
    with pytest.raises(ValueError, match="`selection` must be one of"):
        S2TConfig(selection="second")
    monkeypatch.setitem(SELECTIONS, "second", SecondCandidate)
    model = tiny_model(seed=0)
    prompt = [5, 6, 7, 8]
    with S2TLogitsProcessor(model, trigger="always", selection="second", top_k=4, warmup_tokens=2) as s2t:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             logits_processor=[s2t])
        assert s2t.stats["triggers"] == 6 and s2t.stats["flips"] == 6
    assert out[0, len(prompt):].tolist() == _reference(model, prompt, 8, warmup=2)
    assert not S2TConfig(trigger="always", selection="second").needs_teacher


def test_teacher_policies_need_a_teacher_and_local_scores_candidates():
    assert SELECTIONS["teacher"].needs_teacher and SELECTIONS["takeover"].needs_teacher
    assert not SELECTIONS["local"].needs_teacher and SELECTIONS["local"].scores_candidates
    assert not SELECTIONS["teacher"].scores_candidates
