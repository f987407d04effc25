"""Scoring K candidates on the live KV cache (fast path, sliding windows included) against re-encoding and a slow
reference."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    PAD,
    SLIDING_ARCHITECTURES,
    left_padded_batch,
    long_left_padded_batch,
    tiny_model,
)
from transformers import DynamicCache

from s2t_hf.kv import (
    cache_argument,
    cache_scoring_support,
    candidate_attention_mask,
    positions_from_attention_mask,
    previous_sliding_state,
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
    assert cache_scoring_support(cache, model)[0]
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
    # a window of 2: a query at index q sees indices q - 1 and q; the candidates sit at index 3
    windowed = candidate_attention_mask(prefix_mask, 2, torch.float32, causal_prefix=True, sliding_window=2)
    assert (windowed[1, 0] == 0).tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, True, True, False, False],
        [False, False, True, True, False],
        [False, False, True, False, True],
    ]


def test_scoring_support_names_what_it_cannot_serve():
    model = tiny_model("llama", seed=0, attn="eager")
    ok, reason = cache_scoring_support(None, model)
    assert not ok and "use_cache=False" in reason
    _, input_ids, attention_mask = left_padded_batch()
    cache = prefill(model, input_ids, attention_mask)
    assert cache_scoring_support(cache, model) == (True, "")
    model.config._attn_implementation = "flex_attention"
    ok, reason = cache_scoring_support(cache, model)
    assert not ok and "block mask" in reason and "sdpa" in reason
    model.config._attn_implementation = "flash_attention_2"
    ok, reason = cache_scoring_support(cache, model)
    assert not ok and "4-D mask" in reason
    sliding = tiny_model("mistral-window", seed=0)
    cache = prefill(sliding, *long_left_padded_batch()[1:])
    assert cache_scoring_support(cache, sliding, num_slots=5)[0]
    ok, reason = cache_scoring_support(cache, sliding, num_slots=6)
    assert not ok and "sliding window (6)" in reason


def _reference_logits(model, prompt, candidate=None):
    with torch.no_grad():
        return model(torch.tensor([prompt + ([candidate] if candidate is not None else [])])).logits[0, -1]


@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_window_caches_are_scored_on_and_left_untouched(arch, attn):
    if arch == "gemma2" and attn == "sdpa":
        pytest.skip("Gemma 2 has no sdpa attention in transformers")
    model = tiny_model(arch, seed=0, attn=attn)
    prompts, input_ids, attention_mask = long_left_padded_batch()  # every prompt is longer than the window
    cache = prefill(model, input_ids, attention_mask)
    assert any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    assert cache_scoring_support(cache, model) == (True, "")
    tensors = [(layer.keys, layer.values) for layer in cache.layers]
    candidates = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 23]])
    fast = score_candidates_on_cache(model, cache, attention_mask, attention_mask.sum(-1), candidates)
    for (keys, values), layer in zip(tensors, cache.layers):  # the live cache is never written to
        assert layer.keys is keys and layer.values is values
    for row, prompt in enumerate(prompts):
        for k, candidate in enumerate(candidates[row].tolist()):
            assert (_reference_logits(model, prompt, candidate) - fast[row, k]).abs().max() <= 1e-4
    slow = score_candidates_by_recompute(model, input_ids, attention_mask, candidates, pad_token_id=PAD)
    assert (fast - slow).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2-window"])
def test_only_the_given_rows_are_scored(arch):
    model = tiny_model(arch, seed=0)
    _, input_ids, attention_mask = long_left_padded_batch()
    cache = prefill(model, input_ids, attention_mask)
    candidates = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 23]])
    every = score_candidates_on_cache(model, cache, attention_mask, attention_mask.sum(-1), candidates)
    rows = torch.tensor([0, 2])
    some = score_candidates_on_cache(model, cache, attention_mask, attention_mask.sum(-1), candidates[rows], rows=rows)
    assert some.shape[0] == 2
    assert (some - every[rows]).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", SLIDING_ARCHITECTURES + ["llama"])
def test_last_token_is_encoded_again_on_sliding_layers(arch):
    model = tiny_model(arch, seed=0, attn="eager")
    prompts, input_ids, attention_mask = long_left_padded_batch()
    cache = prefill(model, input_ids[:, :-1], attention_mask[:, :-1])
    previous = previous_sliding_state(cache)  # what the hook keeps before each forward
    with torch.no_grad():
        model(
            input_ids=input_ids[:, -1:],
            attention_mask=attention_mask,
            position_ids=(attention_mask.sum(-1) - 1)[:, None],
            use_cache=True,
            **{cache_argument(model): cache},
        )
    candidates = torch.tensor([[20, 21, 22], [30, 31, 32], [40, 41, 42]])
    logits = score_candidates_on_cache(
        model, cache, attention_mask, attention_mask.sum(-1), candidates, last_token_ids=input_ids[:, -1],
        rows=torch.tensor([0, 1, 2]), previous=previous,
    )
    for row, prompt in enumerate(prompts):
        assert (_reference_logits(model, prompt) - logits[row, 0]).abs().max() <= 1e-4
        for k, candidate in enumerate(candidates[row].tolist()):
            assert (_reference_logits(model, prompt, candidate) - logits[row, 1 + k]).abs().max() <= 1e-4


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
