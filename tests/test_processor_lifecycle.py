"""The processor's life over many `generate` calls: bounded state, flat memory, hooks and adapters restored on exit
(also when `generate` raises), and a clear error when it is used with another model's `generate`."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
from conftest import GREEDY, left_padded_batch, tiny_model
from test_processor_local import trained_like_selector

from s2t_hf import S2TLogitsProcessor


SOAK_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "config", ["random-teacher", "kl-teacher", "entropy-local-scoring", "entropy-local-fused", "learned-local-fused"]
)
def test_per_call_state_stays_bounded(config):
    result = load_soak().soak(config, calls=30, warmup=5)
    assert result["triggers"] > 0
    # nothing accumulates across calls: the same sizes after every call
    assert result["state_max"] == result["state_min"]
    assert result["state_max"]["records"] == 0 and result["state_max"]["signals"] == 0
    # the pre-hook that reads the batch's state, and for the learned trigger the hook that reads its row
    assert result["state_max"]["model_hooks"] == (2 if config.startswith("learned") else 1)
    assert result["model_hooks_after_with"] == 0


@pytest.mark.slow
def test_soak_1000_calls_memory_is_flat():
    soak = load_soak()
    for config in soak.CONFIGS:
        result = soak.soak(config, calls=1000)
        assert result["rss_growth_pct"] < 3.0, result
        assert result["gc_objects_growth"] < 100, result
        assert result["state_max"] == result["state_min"], result


def adapter_state(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(layer.merged, layer.disable_adapters) for layer in model.modules() if isinstance(layer, BaseTunerLayer)]


@pytest.mark.parametrize("adapter_mode", ["generate", "scoring"])
def test_hooks_and_adapter_are_restored_when_generate_raises(adapter_mode):
    model = tiny_model("llama", seed=0)
    selector = trained_like_selector(model, preserve_cache=True)
    before = adapter_state(model)
    s2t = S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always", top_k=4,
                             adapter_mode=adapter_mode, scoring="residual" if adapter_mode == "scoring" else "pure")
    s2t.remove_hooks()
    assert adapter_state(model) == before and not model._forward_pre_hooks
    _, input_ids, attention_mask = left_padded_batch()
    with pytest.raises(ValueError, match="num_beams"):
        with s2t:
            assert len(model._forward_pre_hooks) == 1
            model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                           **{**GREEDY, "num_beams": 2})
    assert not model._forward_pre_hooks
    assert adapter_state(model) == before
    # and the processor still works after the failed call
    with s2t:
        model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
        assert s2t.stats["triggers"] > 0
    assert adapter_state(model) == before


def test_processor_of_another_model_is_refused():
    model_a, model_b, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=3), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    s2t = S2TLogitsProcessor(model_a, teacher=teacher, trigger="always", top_k=4)
    with s2t:
        for _ in range(2):  # never used with its own model, then after a call of model A
            with pytest.raises(ValueError, match="another model"):
                model_b.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
            model_a.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
            assert s2t.stats["triggers"] > 0
