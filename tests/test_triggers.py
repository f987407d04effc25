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
