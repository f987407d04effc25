"""Calibration of a trigger's threshold (`s2t_hf.calibration`), against the signal computed independently."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, PAD, tiny_model

from s2t_hf import S2TLogitsProcessor
from s2t_hf.calibration import SignalRecorder, recording_signals
from s2t_hf.triggers import entropy_signal


@torch.no_grad()
def _entropies(model, prompt: list[int], new_tokens: int, warmup: int) -> list[float]:
    """Greedy decoding without a cache, EOS ruled out (`min_new_tokens`); the entropy signal past the warm-up."""
    sequence, values = torch.tensor([prompt]), []
    for step in range(new_tokens):
        logits = model(sequence).logits[:, -1]
        logits[:, EOS] = float("-inf")
        if step >= warmup:
            values.append(float(entropy_signal(logits, 64)[0]))
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    return values


def test_the_recorder_collects_the_signal_of_every_eligible_step_and_is_removed():
    model = tiny_model(seed=0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with S2TLogitsProcessor(model, trigger="entropy", selection="takeover", teacher=tiny_model(seed=1),
                            warmup_tokens=2) as s2t:
        policy = s2t.trigger_policy
        with recording_signals(s2t) as recorder:
            assert isinstance(s2t.trigger_policy, SignalRecorder)
            for prompt in prompts:
                model.generate(torch.tensor([prompt]), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                               pad_token_id=PAD, logits_processor=[s2t])
                assert s2t.stats["triggers"] == 0  # recording never fires
        assert s2t.trigger_policy is policy
        expected = [value for prompt in prompts for value in _entropies(model, prompt, 7, warmup=2)]
        assert torch.allclose(torch.cat(recorder.signals), torch.tensor(expected), atol=1e-4)
        # the policy comes back even when generation fails inside the block
        with pytest.raises(RuntimeError, match="boom"), recording_signals(s2t):
            raise RuntimeError("boom")
        assert s2t.trigger_policy is policy
