"""The fused decoding loop (`s2t_hf.generate`, the `custom_generate` folder) against the drop-in processor path and
slow references, on several architectures (sliding-window and hybrid caches included)."""

from __future__ import annotations

import pytest
import torch
from conftest import GREEDY, PAD, left_padded_batch, long_left_padded_batch, tiny_model
from test_processor import generated_rows, reference_s2t
from test_processor_local import BINS, reference_local, trained_like_selector

import s2t_hf
from s2t_hf import S2TLogitsProcessor
from s2t_hf.generation import CUSTOM_GENERATE_PATH, s2t_sample


FUSED_ARCHITECTURES = ["llama", "qwen2", "gpt2", "gemma", "mistral", "gemma3", "qwen2-window"]
SELECTIONS = ["never", "teacher", "takeover", "local-pure", "local-residual", "local-scoring"]


def processor_for(model, selection, teacher=None, **kwargs):
    common = dict(trigger="random", trigger_rate=0.4, seed=0, top_k=4, **kwargs)
    if selection == "never":
        return S2TLogitsProcessor(model, trigger="never")
    if selection in ("teacher", "takeover"):
        return S2TLogitsProcessor(model, teacher=teacher, selection=selection, **common)
    if selection == "local-scoring":
        selector = trained_like_selector(model, seed=2, preserve_cache=True)
        return S2TLogitsProcessor(
            model, selector=selector, selection="local", scoring="residual", adapter_mode="scoring", **common
        )
    scoring = selection.split("-")[1]
    return S2TLogitsProcessor(model, selector=trained_like_selector(model), selection="local", scoring=scoring, **common)


def both_paths(model, processor, batch, **generate_kwargs):
    _, input_ids, attention_mask = batch
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **{**GREEDY, **generate_kwargs})
    with processor:
        plain = model.generate(**kwargs, logits_processor=[processor])
        plain_stats = processor.stats
        fused = s2t_hf.generate(model, processor, **kwargs)
        fused_stats = processor.stats
    return plain, fused, plain_stats, fused_stats


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("arch", FUSED_ARCHITECTURES)
def test_fused_loop_equals_the_processor_path(arch, selection):
    attn = "eager" if arch.startswith("gemma") else "sdpa"
    model = tiny_model(arch, seed=0, attn=attn)
    teacher = tiny_model(arch, seed=1, attn=attn)
    processor = processor_for(model, selection, teacher=teacher)
    batch = long_left_padded_batch() if arch in ("gemma3", "qwen2-window") else left_padded_batch()
    plain, fused, plain_stats, fused_stats = both_paths(model, processor, batch)
    assert torch.equal(plain, fused)
    for name in ("triggers", "flips", "steps", "teacher_hits"):
        assert plain_stats[name] == fused_stats[name], name
    if selection != "never":
        assert fused_stats["triggers"] > 0
    if selection.startswith("local"):
        assert fused_stats["flips"] > 0  # the selector really changes the path
    if selection in ("local-pure", "local-residual"):
        # the candidates were scored inside the decoding forwards: no forward of the processor's own
        assert fused_stats["local_path"] == "fused" and fused_stats["local_calls"] == 0
        assert plain_stats["local_path"] == "cache" and plain_stats["local_calls"] > 0


def test_fused_loop_with_eos_mid_batch():
    model = tiny_model("qwen2", seed=0)
    probe = processor_for(model, "local-pure")
    _, input_ids, attention_mask = left_padded_batch()
    with probe:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[probe], **GREEDY)
    # an end-of-sequence id that row 1 emits at its 5th token while the others go on
    eos = int(out[1, input_ids.shape[1] + 4])
    config = dict(GREEDY, eos_token_id=eos)
    processor = S2TLogitsProcessor(
        model, selector=probe.selector, selection="local", trigger="random", trigger_rate=0.4, seed=0, top_k=4,
        eos_token_id=eos,
    )
    plain, fused, plain_stats, fused_stats = both_paths(model, processor, left_padded_batch(), **config)
    assert torch.equal(plain, fused)
    lengths = [(row[input_ids.shape[1]:] == eos).nonzero() for row in fused]
    assert any(len(hits) and hits[0, 0] < GREEDY["max_new_tokens"] - 1 for hits in lengths)
    assert (fused[:, input_ids.shape[1]:] == PAD).any()  # a finished row is padded while others decode
    assert plain_stats["steps_per_row"] == fused_stats["steps_per_row"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("scoring", ["pure", "residual"])
def test_fused_loop_matches_slow_local_reference(arch, scoring):
    model = tiny_model(arch, seed=0, attn="eager")
    selector = trained_like_selector(model, seed=1)
    prompts, input_ids, attention_mask = long_left_padded_batch()
    with S2TLogitsProcessor(
        model, selector=selector, selection="local", trigger="always", warmup_tokens=0, top_k=4, scoring=scoring
    ) as s2t:
        out = s2t_hf.generate(model, s2t, input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
        assert s2t.stats["flips"] > 0 and s2t.stats["local_path"] == "fused"
    for prompt, row in zip(prompts, generated_rows(out, input_ids.shape[1])):
        assert row == reference_local(model, prompt, GREEDY["max_new_tokens"], 4, BINS, scoring=scoring)


def test_fused_loop_matches_slow_teacher_reference():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    prompts, input_ids, attention_mask = left_padded_batch()
    with S2TLogitsProcessor(
        student, teacher=teacher, selection="teacher", trigger="entropy", trigger_threshold=0.0, top_k=4,
        warmup_tokens=2,
    ) as s2t:
        out = s2t_hf.generate(student, s2t, input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    for prompt, row in zip(prompts, generated_rows(out, input_ids.shape[1])):
        assert row == reference_s2t(student, teacher, prompt, GREEDY["max_new_tokens"], 4, 0.0, 2)


def test_fused_sampling_with_warpers_equals_the_processor_path():
    model = tiny_model("llama", seed=0)
    processor = processor_for(model, "local-pure")
    outputs = []
    for fused in (False, True):
        torch.manual_seed(7)
        kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=12, pad_token_id=PAD)
        _, input_ids, attention_mask = left_padded_batch()
        with processor:
            if fused:
                outputs.append(s2t_hf.generate(model, processor, input_ids=input_ids, attention_mask=attention_mask,
                                               **kwargs))
            else:
                outputs.append(model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                              logits_processor=[processor], **kwargs))
        assert processor.stats["triggers"] > 0
    assert torch.equal(*outputs)


def test_custom_generate_folder_and_the_decoding_method():
    model = tiny_model("qwen2", seed=0)
    processor = processor_for(model, "local-residual")
    _, input_ids, attention_mask = left_padded_batch()
    with processor:
        expected = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[processor],
                                  **GREEDY)
        # transformers' own mechanism: a folder with `custom_generate/generate.py`, as a Hub repository holds it
        folder = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, custom_generate=CUSTOM_GENERATE_PATH,
            trust_remote_code=True, s2t=processor, **GREEDY,
        )
        assert processor.stats["local_path"] == "fused"
        # the decoding method itself, with the processor among the logits processors
        method = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, custom_generate=s2t_sample, s2t=processor,
            logits_processor=[processor], **GREEDY,
        )
        returned = s2t_hf.generate(model, processor, input_ids=input_ids, attention_mask=attention_mask,
                                   return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert torch.equal(expected, folder) and torch.equal(expected, method)
    assert torch.equal(expected, returned.sequences)
    assert len(returned.scores) == GREEDY["max_new_tokens"]


def test_fused_loop_refuses_what_it_cannot_run():
    model = tiny_model("llama", seed=0)
    processor = processor_for(model, "local-pure")
    _, input_ids, attention_mask = left_padded_batch()
    with processor:
        with pytest.raises(ValueError, match="num_beams=1"):
            s2t_hf.generate(model, processor, input_ids=input_ids, attention_mask=attention_mask, num_beams=2,
                            max_new_tokens=4, pad_token_id=PAD)
        with pytest.raises(ValueError, match="use_cache=False"):
            s2t_hf.generate(model, processor, input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **GREEDY)
        with pytest.raises(TypeError, match="S2TLogitsProcessor"):
            s2t_hf.generate(model, "not a processor", input_ids=input_ids, **GREEDY)
        with pytest.raises(ValueError, match="s2t="):
            model.generate(input_ids=input_ids, attention_mask=attention_mask, custom_generate=CUSTOM_GENERATE_PATH,
                           trust_remote_code=True, **GREEDY)
    other = tiny_model("llama", seed=3)
    with processor, pytest.raises(ValueError, match="another model"):
        s2t_hf.generate(other, processor, input_ids=input_ids, attention_mask=attention_mask, **GREEDY)


def test_fused_loop_falls_back_when_the_cache_cannot_be_scored_on():
    model = tiny_model("mistral-window", seed=0, sliding_window=4)  # window too short for K = 4 slots
    processor = processor_for(model, "local-pure")
    plain, fused, plain_stats, fused_stats = both_paths(model, processor, long_left_padded_batch())
    assert torch.equal(plain, fused)
    assert fused_stats["local_path"] == "cache" and fused_stats["local_calls"] > 0


def test_fused_loop_names_what_it_was_given_wrong():
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    first, second = processor_for(model, "teacher", teacher=teacher), processor_for(model, "teacher", teacher=teacher)
    with first, second:
        with pytest.raises(ValueError, match="sets `custom_generate` itself; remove it"):
            s2t_hf.generate(model, first, custom_generate=s2t_sample, **kwargs)
        with pytest.raises(ValueError, match="`stop_strings` need the model's tokenizer: pass `tokenizer=...`"):
            s2t_hf.generate(model, first, stop_strings=["."], **kwargs)
        with pytest.raises(ValueError, match=r"`attention_mask` only; it got \['output_attentions'\]"):
            s2t_hf.generate(model, first, output_attentions=True, return_dict_in_generate=True, **kwargs)
        # the decoding method given to `generate` by hand
        with pytest.raises(ValueError, match="needs exactly one `S2TLogitsProcessor`.*found 0"):
            model.generate(custom_generate=s2t_sample, **kwargs)
        with pytest.raises(ValueError, match="needs exactly one `S2TLogitsProcessor`.*found 2"):
            model.generate(custom_generate=s2t_sample, logits_processor=[first, second], **kwargs)
        with pytest.raises(ValueError, match="`s2t` must also be among the logits processors"):
            model.generate(custom_generate=s2t_sample, s2t=first, **kwargs)
        with pytest.raises(TypeError, match="`s2t` must be an `S2TLogitsProcessor`, got str"):
            model.generate(custom_generate=s2t_sample, s2t="s2t", logits_processor=[first], **kwargs)
