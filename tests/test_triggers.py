"""Trigger signals' threshold for a target rate (`s2t_hf.triggers.threshold_for_rate`)."""

from __future__ import annotations

import pytest
import torch

from s2t_hf.triggers import threshold_for_rate


def test_threshold_for_rate_leaves_the_rate_above_it_and_names_bad_input():
    signals = torch.arange(1000, dtype=torch.float32).flip(0)  # 1000 distinct values, in no sorted order
    threshold = threshold_for_rate(signals, 0.05)
    assert int((signals > threshold).sum()) == 50
    with pytest.raises(ValueError, match=r"`target_rate` must lie in \(0, 1\), got 1.0"):
        threshold_for_rate(signals, 1.0)
    with pytest.raises(ValueError, match="No signal values were collected: .* no eligible step"):
        threshold_for_rate(torch.zeros(0), 0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Trigger policies and their registry


def test_policies_from_the_registry_fire_as_documented():
    from s2t_hf.config import S2TConfig
    from s2t_hf.triggers import TRIGGERS

    eligible = torch.tensor([True, True, False, True])
    signal = torch.tensor([0.5, 2.0, 3.0, float("nan")])
    entropy = TRIGGERS["entropy"](S2TConfig(trigger="entropy", trigger_threshold=1.0))
    # above the threshold and eligible; a NaN signal never fires
    assert entropy.fire(signal, eligible).tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="The `entropy` trigger needs a threshold"):
        TRIGGERS["entropy"](S2TConfig(trigger="entropy")).fire(signal, eligible)
    assert TRIGGERS["always"](S2TConfig(trigger="always")).fire(None, eligible).tolist() == eligible.tolist()
    assert not TRIGGERS["never"](S2TConfig(trigger="never")).fire(None, eligible).any()
    random = TRIGGERS["random"](S2TConfig(trigger="random", trigger_rate=0.5, seed=3))
    random.reset()
    first = random.fire(None, torch.ones(64, dtype=torch.bool))
    random.reset()  # a new generate call draws the same triggers again
    assert torch.equal(first, random.fire(None, torch.ones(64, dtype=torch.bool)))
    assert 10 < int(first.sum()) < 54
    assert [name for name, policy in TRIGGERS.items() if policy.has_threshold] == ["entropy", "kl", "learned"]


def test_a_registered_trigger_kind_drives_generate(monkeypatch):
    """One class plus one registration line: the config accepts the kind and the processor fires where it says."""
    from conftest import tiny_model

    from s2t_hf import S2TConfig, S2TLogitsProcessor
    from s2t_hf.triggers import TRIGGERS, TriggerPolicy

    class EveryOtherStep(TriggerPolicy):
        """Triggers every eligible row at every second step."""

        def reset(self):
            self.steps = 0

        def fire(self, signal, eligible):
            self.steps += 1
            return eligible & (self.steps % 2 == 0)

    with pytest.raises(ValueError, match="`trigger` must be one of"):
        S2TConfig(trigger="every_other")
    monkeypatch.setitem(TRIGGERS, "every_other", EveryOtherStep)
    model, teacher = tiny_model(seed=0), tiny_model(seed=1)
    with S2TLogitsProcessor(
        model, teacher=teacher, trigger="every_other", selection="teacher", top_k=4, warmup_tokens=0
    ) as s2t:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=9, min_new_tokens=9, do_sample=False,
                       logits_processor=[s2t])
        assert s2t.stats["steps"] == 9 and s2t.stats["triggers"] == 4
        assert s2t.config.needs_teacher
