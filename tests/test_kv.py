"""Scoring K candidates on the live KV cache (fast path) against re-encoding (fallback) and a slow reference."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, PAD, left_padded_batch, tiny_model
from transformers import DynamicCache

from s2t_hf.kv import (
    cache_argument,
    cache_can_roll_back,
    candidate_attention_mask,
    positions_from_attention_mask,
    score_candidates_by_recompute,
    score_candidates_on_cache,
)


def prefill(model, input_ids, attention_mask):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_attention_mask(attention_mask),
            use_cache=True,
            **{cache_argument(model): cache},
        )
    return cache


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_path_agrees_with_recompute_and_rolls_back(arch, attn):
    model = tiny_model(arch, seed=0, attn=attn)
    prompts, input_ids, attention_mask = left_padded_batch()
    cache = prefill(model, input_ids, attention_mask)
    assert cache_can_roll_back(cache, model)[0]
    keys_before = [layer.keys.clone() for layer in cache.layers]
    candidates = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 23]])
    next_positions = attention_mask.sum(-1)
    fast = score_candidates_on_cache(model, cache, attention_mask, next_positions, candidates)
    # the cache is back to its length and contents
    assert cache.get_seq_length() == input_ids.shape[1]
    for before, layer in zip(keys_before, cache.layers):
        assert torch.equal(before, layer.keys)
    slow = score_candidates_by_recompute(model, input_ids, attention_mask, candidates, pad_token_id=PAD)
    assert (fast - slow).abs().max() <= 1e-4
    # independent reference: each prompt + candidate alone, no padding, no cache
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for k, candidate in enumerate(candidates[row].tolist()):
                logits = model(torch.tensor([prompt + [candidate]])).logits[0, -1]
                assert (logits - fast[row, k]).abs().max() <= 1e-4


def test_recompute_truncates_context():
    model = tiny_model("llama", seed=0)
    _, input_ids, attention_mask = left_padded_batch()
    candidates = torch.tensor([[20, 21], [30, 31], [40, 41]])
    truncated = score_candidates_by_recompute(model, input_ids, attention_mask, candidates, max_context=2)
    with torch.no_grad():
        for row in range(3):
            context = input_ids[row, -2:].tolist()
            logits = model(torch.tensor([context + [int(candidates[row, 0])]])).logits[0, -1]
            assert (logits - truncated[row, 0]).abs().max() <= 1e-4


def test_candidate_mask_shapes_and_visibility():
    prefix_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = candidate_attention_mask(prefix_mask, 2, torch.float32)
    assert mask.shape == (2, 1, 2, 5)
    allowed = mask[:, 0] == 0
    assert allowed[0].tolist() == [[False, True, True, True, False], [False, True, True, False, True]]
    packed = candidate_attention_mask(prefix_mask, 2, torch.float32, causal_prefix=True)
    assert packed.shape == (2, 1, 5, 5)
    allowed = packed[1, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, False, True],
    ]


def test_rollback_refuses_what_it_cannot_crop():
    model = tiny_model("llama", seed=0, attn="eager")
    assert cache_can_roll_back(None, model)[0] is False
    sliding = tiny_model("qwen2", seed=0, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    _, input_ids, attention_mask = left_padded_batch()
    cache = prefill(sliding, input_ids, attention_mask)
    ok, reason = cache_can_roll_back(cache, sliding)
    assert not ok and "sliding" in reason


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_last_token_is_encoded_again_and_restored_bit_for_bit(arch):
    model = tiny_model(arch, seed=0)
    prompts, input_ids, attention_mask = left_padded_batch()
    cache = prefill(model, input_ids, attention_mask)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    candidates = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])
    logits = score_candidates_on_cache(
        model, cache, attention_mask, attention_mask.sum(-1), candidates, last_token_ids=input_ids[:, -1]
    )
    assert logits.shape[:2] == (3, 4)
    assert cache.get_seq_length() == input_ids.shape[1]
    for (keys, values), layer in zip(before, cache.layers):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
    slow = score_candidates_by_recompute(model, input_ids, attention_mask, candidates, pad_token_id=PAD,
                                         with_last_token=True)
    assert (logits - slow).abs().max() <= 1e-4
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            assert (model(torch.tensor([prompt])).logits[0, -1] - logits[row, 0]).abs().max() <= 1e-4
            for k, candidate in enumerate(candidates[row].tolist()):
                expected = model(torch.tensor([prompt + [candidate]])).logits[0, -1]
                assert (expected - logits[row, 1 + k]).abs().max() <= 1e-4
