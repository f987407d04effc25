"""The forward pre-hook that records what `generate` passes the model (`s2t_hf.state_hook`)."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import GREEDY, left_padded_batch, tiny_model

from s2t_hf.state_hook import GenerationStateHook


def test_the_hook_records_generate_and_counts_generations_without_calling_back():
    model = tiny_model(seed=0)
    _, input_ids, attention_mask = left_padded_batch()
    hook = GenerationStateHook(model)
    try:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, **{**GREEDY, "max_new_tokens": 4,
                                                                               "min_new_tokens": 4})
        assert hook.generations == 1 and hook.forwards == 4  # the prefill and three one-token forwards
        record = hook.last
        assert record.input_length == 1 and record.cache_length_before == input_ids.shape[1] + 2
        assert torch.equal(record.attention_mask[:, : input_ids.shape[1]], attention_mask)  # the left padding
        with hook.pause(), torch.no_grad():
            model(input_ids)  # not counted
        assert hook.forwards == 4 and hook.generations == 1
        gc.collect()
        assert hook.cache is None  # held through a weak reference: the finished call's cache is gone
    finally:
        hook.remove()
    assert not hook.attached and not model._forward_pre_hooks


def test_the_hook_lives_in_state_hook_only():
    import s2t_hf.kv as kv

    for name in ("ForwardRecord", "GenerationStateHook", "padding_mask_from_4d"):
        assert not hasattr(kv, name)
    with pytest.raises(ImportError):
        from s2t_hf.kv import GenerationStateHook  # noqa: F401
