"""The scoring forward of S2T-Local (`s2t_hf.local_scoring`): both paths against an independent recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_batch, tiny_model
from test_processor_local import trained_like_selector
from transformers import DynamicCache

from s2t_hf import S2TConfig, S2TLogitsProcessor
from s2t_hf.kv import cache_argument, positions_from_attention_mask
from s2t_hf.local_scoring import check_cache_path


def test_both_paths_give_the_logits_of_prefix_plus_candidate():
    model = tiny_model(seed=0)
    selector = trained_like_selector(model)
    _, input_ids, attention_mask = left_padded_batch()
    candidates = torch.tensor([[20, 21, 22], [23, 24, 25]])
    triggered = torch.tensor([True, False, True])
    logits = {}
    for path in ("cache", "recompute"):
        with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="never", local_path=path) as s2t:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():  # the prefill the scorer reads its cache from, as in `generate`
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                      position_ids=positions_from_attention_mask(attention_mask), **{cache_argument(model): cache})
            logits[path] = s2t.scorer.score(input_ids, attention_mask, candidates, triggered)
            assert s2t.scorer.path() == (path, "the live cache can be scored on" if path == "cache" else "requested")
            assert s2t.scorer.calls == 1 and s2t.scorer.last_path == path
    with torch.no_grad():
        for n, row in enumerate(triggered.nonzero()[:, 0].tolist()):
            context = input_ids[row][attention_mask[row].bool()]
            for k, candidate in enumerate(candidates[n]):
                expected = model(torch.cat([context, candidate.view(1)])[None]).logits[0, -1]
                for path in logits:
                    assert torch.allclose(logits[path][n, k], expected, atol=1e-4), (path, row, k)


def test_asking_for_the_cache_path_where_the_adapter_changes_the_cache_is_refused():
    model = tiny_model(seed=0)
    config = S2TConfig(selection="local", adapter_mode="scoring", local_path="cache")
    with pytest.raises(ValueError, match="preserve_cache=True"):
        check_cache_path(model, config, preserves_cache=False)
    check_cache_path(model, config, preserves_cache=True)  # a cache-preserving adapter may
