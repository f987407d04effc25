"""The fused loop's protocol with the processor (`s2t_hf.fused.FusedSession`), driven as the loop drives it."""

from __future__ import annotations

import pytest
import torch
from conftest import GREEDY, tiny_model
from test_processor_local import BINS, trained_like_selector
from transformers import DynamicCache

import s2t_hf
from s2t_hf import S2TLogitsProcessor
from s2t_hf.kv import cache_argument


SIX_TOKENS = {**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6}
FOUR_TOKENS = {**GREEDY, "max_new_tokens": 4, "min_new_tokens": 4}


def test_the_session_decides_once_and_hands_over_pending_selections():
    model = tiny_model(seed=0)
    selector = trained_like_selector(model)
    prompt = torch.tensor([[5, 6, 7, 8]])
    with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always", top_k=4,
                            warmup_tokens=0) as s2t:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():  # a prefill, as the loop runs it: the hook sees a new generation
            prefill = model(input_ids=prompt, use_cache=True, **{cache_argument(model): cache})
        with s2t.fused_session(model, cache) as session:
            assert session.fused  # local selection, adapter on while generating, a dynamic cache
            scores = s2t(prompt, prefill.logits[:, -1])
            pending = session.take_pending()
            assert pending is not None and session.take_pending() is None  # taken once
            # until the loop completes it, the triggered row may emit only its candidates
            assert torch.isfinite(scores[0]).sum() == 4
            assert set(torch.isfinite(scores[0]).nonzero()[:, 0].tolist()) == set(pending.candidate_ids[0].tolist())
            assert s2t.stats["triggers"] == 1 and s2t.stats["flips"] == 0  # not decided yet
            with torch.no_grad():
                logits = torch.stack([
                    model(input_ids=torch.cat([prompt, c.view(1, 1)], -1)).logits[0, -1]
                    for c in pending.candidate_ids[0]
                ])
            chosen, positions = session.complete(pending, logits[None])
            assert chosen[0] == pending.candidate_ids[0, positions[0]]
            assert s2t.stats["local_path"] == "fused"
    with S2TLogitsProcessor(model, teacher=tiny_model(seed=1), trigger="always", top_k=4) as s2t:
        with s2t.fused_session(model, DynamicCache(config=model.config)) as session:
            assert not session.fused  # teacher selection needs no student forward


def test_the_session_refuses_another_model_and_is_closed_after_generate():
    model, other = tiny_model(seed=0), tiny_model(seed=2)
    selector = trained_like_selector(model)
    with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always", top_k=4) as s2t:
        with pytest.raises(ValueError, match="built for another model"):
            with s2t.fused_session(other, DynamicCache(config=other.config)):
                pass
        s2t_hf.generate(model, s2t, input_ids=torch.tensor([[5, 6, 7]]), **SIX_TOKENS)
        assert s2t.stats["local_path"] == "fused" and s2t.stats["triggers"] == 3
        # after the fused call the drop-in path scores candidates in a forward of its own again
        model.generate(torch.tensor([[5, 6, 7]]), logits_processor=[s2t], **SIX_TOKENS)
        assert s2t.stats["local_path"] == "cache" and s2t.stats["local_calls"] == 3


def test_a_new_generate_call_resets_the_processor_at_its_first_step_not_inside_a_forward():
    model = tiny_model(seed=0)
    with S2TLogitsProcessor(model, trigger="always", selection="local", selector=trained_like_selector(model),
                            top_k=4, warmup_tokens=0) as s2t:
        model.generate(torch.tensor([[5, 6, 7]]), logits_processor=[s2t], **FOUR_TOKENS)
        before = s2t.stats
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))  # a forward outside generate leaves the last call's statistics alone
        assert s2t.stats == before and s2t.total_stats["generate_calls"] == 1
        model.generate(torch.tensor([[5, 6, 7]]), logits_processor=[s2t], **FOUR_TOKENS)
        assert s2t.total_stats["generate_calls"] == 2 and s2t.total_stats["triggers"] == 8
