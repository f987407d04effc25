"""Every model-level check on causal-LM families beyond Llama: `ARCHITECTURE_CASES` in conftest says what each covers.

Per architecture, through the public API: `trigger="never"` is plain greedy `generate`; S2T-Local's fast path (scoring on
the live cache) equals the recompute path and the fused loop, or, where the architecture rules the fast path out, the
processor says so at construction and the recompute path equals a slow reference; a selector survives save / load; one
`S2TTrainer` step trains every trainable weight (packed encoding equal to K copies where the model can pack).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHITECTURE_CASES, GREEDY, left_padded_batch, tiny_model
from test_processor_local import BINS, reference_local, rows_until_eos, trained_like_selector
from test_trainer import make_args, make_selector, packed_and_copies, perturb, synthetic_features, trainable_state
from transformers import T5Config, T5ForConditionalGeneration

from s2t_hf import S2TLogitsProcessor, S2TSelector, S2TTrainer, SelectionGroupCollator, generate


NEW_TOKENS = 8
SHORT = {**GREEDY, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(params=sorted(ARCHITECTURE_CASES))
def case(request):
    """`(name, model, tied, fallback)`: a tiny model of the family (seed 0) and its line of `ARCHITECTURE_CASES`."""
    name = request.param
    _, tied, fallback = ARCHITECTURE_CASES[name]
    return name, tiny_model(name, seed=0), tied, fallback


def test_never_trigger_equals_plain_greedy(case):
    name, model, tied, _ = case
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    _, input_ids, attention_mask = left_padded_batch()
    plain = model.generate(input_ids=input_ids, attention_mask=attention_mask, **SHORT)
    with S2TLogitsProcessor(model, trigger="never") as s2t:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **SHORT)
        assert s2t.stats["triggers"] == 0 and s2t.stats["steps"] > 0
    assert torch.equal(out, plain)


def test_local_scoring_paths_agree(case):
    """Fast path == recompute path == fused loop (same tokens, scores within 1e-3); where the fast path cannot serve the
    model, asking for it fails at construction, `auto` recomputes and says why, and equals the slow batch-1 reference."""
    name, model, _, fallback = case
    selector = trained_like_selector(model)
    prompts, input_ids, attention_mask = left_padded_batch()
    settings = dict(selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4,
                    record_triggers=True)
    outputs, records = {}, {}
    for path in ("auto", "recompute") if fallback is None else ("auto",):
        with S2TLogitsProcessor(model, local_path=path, **settings) as s2t:
            outputs[path] = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, logits_processor=[s2t], **SHORT
            )
            records[path] = s2t.records
            taken, reason = s2t.local_scoring_path()
            assert s2t.stats["local_path"] == taken
        if path == "auto":
            assert taken == ("cache" if fallback is None else "recompute"), reason
    assert len(records["auto"]) >= NEW_TOKENS
    if model.config.use_cache:  # the fused loop decodes on a cache (MPT generates without one by default)
        with S2TLogitsProcessor(model, **settings) as s2t:
            fused = generate(model, s2t, input_ids=input_ids, attention_mask=attention_mask, **SHORT)
            assert s2t.stats["local_path"] == ("fused" if fallback is None else "recompute")
        assert torch.equal(fused, outputs["auto"])
    if fallback is None:
        assert torch.equal(outputs["auto"], outputs["recompute"])
        assert len(records["auto"]) == len(records["recompute"])
        for fast, slow in zip(records["auto"], records["recompute"]):
            assert fast["cand_ids"] == slow["cand_ids"]
            # scores lie in [0, 1]; a few of these random models amplify float32 rounding to 1e-4 (Starcoder2; in
            # float64 the two paths agree exactly)
            assert max(abs(a - b) for a, b in zip(fast["local_scores"], slow["local_scores"])) <= 1e-3
        return
    assert fallback in reason
    with pytest.raises(ValueError, match=rf"`local_path='cache'` cannot serve this {type(model).__name__}: .*{fallback}"):
        S2TLogitsProcessor(model, local_path="cache", **settings)
    for prompt, row in zip(prompts, rows_until_eos(outputs["auto"], input_ids.shape[1])):
        assert row == reference_local(model, prompt, NEW_TOKENS, 4, BINS)


def test_selector_round_trip(case, tmp_path):
    name, model, _, _ = case
    selector = trained_like_selector(model, seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    with torch.no_grad():
        expected = selector.model(input_ids=input_ids, attention_mask=attention_mask).logits
        with selector.adapter_disabled():
            base = selector.model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert not torch.allclose(expected, base)  # the round trip below is not the base model's
    selector.save_pretrained(tmp_path)
    loaded = S2TSelector.from_pretrained(tiny_model(name, seed=0), tmp_path)
    assert loaded.bin_token_ids == BINS
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=input_ids, attention_mask=attention_mask).logits, expected)


def test_one_training_step_trains_every_trainable_weight(case, tmp_path):
    name, _, _, fallback = case
    selector = make_selector(name)  # grows 16 bin rows (no tokenizer), LoRA on every projection
    perturb(selector)  # LoRA B starts at 0: give every trainable weight a gradient
    features = synthetic_features(num_groups=3)
    trainer = S2TTrainer(
        selector=selector, train_dataset=features,
        args=make_args(tmp_path, max_steps=1, learning_rate=1e-2, per_device_train_batch_size=3),
    )
    assert trainer._pack == (fallback is None)  # packing places K candidates at one position, as the fast path does
    if trainer._pack:
        (loss_p, logits_p, _), (loss_n, logits_n, _) = packed_and_copies(trainer, SelectionGroupCollator()(features))
        torch.testing.assert_close(loss_p, loss_n, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_p, logits_n, rtol=1e-5, atol=1e-5)
    before = trainable_state(selector)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
    after = trainable_state(selector)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged and len(before) > 2


def test_encoder_decoders_are_refused_at_construction():
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(
        T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    )
    for build in (
        lambda: S2TLogitsProcessor(model, trigger="never"),
        lambda: S2TSelector.create(model, bin_token_ids=BINS),
    ):
        with pytest.raises(ValueError, match=r"`model` is a T5ForConditionalGeneration, an encoder-decoder \('t5'\)"):
            build()
    assert not model._forward_pre_hooks and not hasattr(model, "peft_config")
