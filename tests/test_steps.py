"""The processor's step guard (`s2t_hf.steps.StepTracker`) on the hook of a real model."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from s2t_hf.state_hook import GenerationStateHook
from s2t_hf.steps import StepTracker


def test_the_tracker_sees_new_generations_through_the_hook_and_tracks_finished_rows():
    model = tiny_model(seed=0)
    hook = GenerationStateHook(model)
    try:
        tracker = StepTracker(hook, eos_token_ids=torch.tensor([1]), warmup_tokens=1)
        prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
        with pytest.raises(ValueError, match="without a new forward of its `model`"):
            tracker.starts_generation(prompt)
        with torch.no_grad():
            scores = model(prompt).logits[:, -1]  # a forward on an empty cache: a new generation
        assert hook.generations == 1 and tracker.starts_generation(prompt)
        index, active = tracker.begin(prompt, scores, refuse_inputs_embeds=True)
        assert index == 0 and active.all() and not tracker.eligible(index, active).any()  # the warm-up
        step = torch.cat([prompt, torch.tensor([[1], [4]])], dim=-1)  # row 0 emitted EOS
        hook.note(1, None, None, None)
        assert not tracker.starts_generation(step)
        index, active = tracker.begin(step, scores, refuse_inputs_embeds=True)
        assert index == 1 and active.tolist() == [False, True]
        assert tracker.eligible(index, active).tolist() == [False, True]
        hook.note(1, None, None, None)
        with pytest.raises(ValueError, match="normalised log-probabilities, as beam search"):
            tracker.clear()
            tracker.begin(step, torch.log_softmax(scores, -1), refuse_inputs_embeds=True)
    finally:
        hook.remove()
