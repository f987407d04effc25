"""`generate` features with S2T, in the drop-in path and the fused loop: streamers, `stop_strings`, scores and logits in
the output, `num_return_sequences`, `inputs_embeds`, static caches, `torch.compile`, and the decoding methods S2T
refuses (beam search, assisted and prompt-lookup generation; encoder-decoder models: tests/test_architectures.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import PAD, left_padded_batch, tiny_model
from test_processor_local import trained_like_selector
from tokenizers import ByteLevelBPETokenizer
from transformers import CompileConfig, PreTrainedTokenizerFast
from transformers.generation.streamers import BaseStreamer

import s2t_hf
from s2t_hf import S2TLogitsProcessor


NEW = 8
PATHS = ["processor", "fused"]


def s2t_for(model, selection: str, teacher=None, **kwargs) -> S2TLogitsProcessor:
    common = dict(trigger="random", trigger_rate=0.5, seed=0, top_k=4, warmup_tokens=0, **kwargs)
    if selection == "local":
        return S2TLogitsProcessor(model, selector=trained_like_selector(model), selection="local", **common)
    return S2TLogitsProcessor(model, teacher=teacher, selection=selection, **common)


def run(model, s2t, path: str, **kwargs):
    arguments = {"do_sample": False, "pad_token_id": PAD, "max_new_tokens": NEW, **kwargs}
    if "inputs_embeds" not in arguments and "input_ids" not in arguments:
        _, input_ids, attention_mask = left_padded_batch()
        arguments.update(input_ids=input_ids, attention_mask=attention_mask)
    if path == "fused":
        return s2t_hf.generate(model, s2t, **arguments)
    return model.generate(**arguments, logits_processor=[s2t])


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.chunks.append(value.reshape(value.shape[0], -1).tolist())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("selection", ["teacher", "local"])
def test_streamer_receives_the_generated_tokens(path, selection):
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    prompt = torch.tensor([[5, 6, 7, 8]])
    streamer = RecordingStreamer()
    with s2t_for(model, selection, teacher) as s2t:
        out = run(model, s2t, path, input_ids=prompt, streamer=streamer)
        assert s2t.stats["triggers"] > 0
    assert streamer.chunks[0] == prompt.tolist()
    assert [c[0][0] for c in streamer.chunks[1:]] == out[0, prompt.shape[1]:].tolist()
    assert streamer.ended == 1


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained here (offline), as `stop_strings` expects of real tokenizers."""
    bpe = ByteLevelBPETokenizer()
    text = ["the cat sat on the mat", "a dog ran in the park", "one two three four five six"] * 4
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "<eos>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")


@pytest.mark.parametrize("path", PATHS)
def test_stop_strings_end_generation_as_without_s2t(path):
    tokenizer = byte_level_tokenizer()
    student, teacher = (tiny_model("llama", seed=s, vocab_size=len(tokenizer)) for s in (0, 1))
    prompt = torch.tensor([[5, 6, 7, 8]])
    teacher_plain = teacher.generate(prompt, do_sample=False, pad_token_id=PAD, max_new_tokens=NEW)
    stop = tokenizer.decode(teacher_plain[0, 4 + 3])  # the teacher's 4th token ends the generation
    kwargs = dict(stop_strings=[stop], tokenizer=tokenizer)
    expected = teacher.generate(prompt, do_sample=False, pad_token_id=PAD, max_new_tokens=NEW, **kwargs)
    assert expected.shape[1] < teacher_plain.shape[1]
    with S2TLogitsProcessor(student, teacher=teacher, trigger="always", selection="takeover", warmup_tokens=0) as s2t:
        out = run(student, s2t, path, input_ids=prompt, **kwargs)
    assert out.tolist() == expected.tolist()


@torch.no_grad()
def teacher_forced_logits(model, sequences, attention_mask, prompt_length):
    """The model's own logits at every generated step, from one forward over the finished sequences."""
    mask = torch.cat([attention_mask, torch.ones_like(sequences[:, prompt_length:])], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
    return logits[:, prompt_length - 1 : -1]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("selection", ["teacher", "local"])
def test_output_scores_and_logits_at_forced_steps(path, selection):
    """`scores` at a triggered step are `-inf` but at the selected token; `logits` are the model's own logits."""
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    with s2t_for(model, selection, teacher, record_triggers=True) as s2t:
        out = run(model, s2t, path, return_dict_in_generate=True, output_scores=True, output_logits=True)
        records = s2t.records
    prompt_length = input_ids.shape[1]
    assert len(out.scores) == len(out.logits) == out.sequences.shape[1] - prompt_length
    assert records
    for record in records:
        step_scores = out.scores[record["step"]][record["row"]]
        assert torch.isfinite(step_scores).nonzero()[:, 0].tolist() == [record["chosen_id"]]
        assert int(out.sequences[record["row"], prompt_length + record["step"]]) == record["chosen_id"]
    with s2t:  # the selector's bin rows merged, as during generation
        expected = teacher_forced_logits(model, out.sequences, attention_mask, prompt_length)
    # (cached decoding vs one forward: float32 rounding only)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), expected, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("path", PATHS)
def test_num_return_sequences(path):
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    expected = teacher.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, pad_token_id=PAD,
                                max_new_tokens=NEW)
    with S2TLogitsProcessor(student, teacher=teacher, trigger="always", selection="takeover", warmup_tokens=0) as s2t:
        torch.manual_seed(0)
        out = run(student, s2t, path, do_sample=True, num_return_sequences=2)
        assert len(s2t.stats["triggers_per_row"]) == 6
    # every step is the teacher's (forced), so both samples of a prompt are its greedy continuation
    assert out.tolist() == expected.repeat_interleave(2, dim=0).tolist()


def test_inputs_embeds():
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    _, input_ids, attention_mask = left_padded_batch()
    embeds = model.get_input_embeddings()(input_ids).detach()
    plain = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, do_sample=False, pad_token_id=PAD,
                           max_new_tokens=NEW)
    with S2TLogitsProcessor(model, trigger="never") as s2t:  # nothing to select: the prompt's ids are not needed
        out = run(model, s2t, "processor", inputs_embeds=embeds, attention_mask=attention_mask)
    assert out.tolist() == plain.tolist()
    for path in PATHS:
        with s2t_for(model, "teacher", teacher) as s2t, pytest.raises(ValueError, match="inputs_embeds.*input_ids"):
            run(model, s2t, path, inputs_embeds=embeds, attention_mask=attention_mask)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("selection", ["teacher", "local"])
def test_static_cache_and_compiled_forward_equal_the_dynamic_cache(path, selection):
    """A static cache (its left padding read back from the 4-D mask `generate` prepares), and `generate`'s own
    compilation of the forward (`compile_config`; the `eager` backend keeps the test fast: what is checked is that
    the processor's hook and state survive tracing, not the kernels)."""
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    compiled = CompileConfig(backend="eager")
    compiled._compile_all_devices = True  # on CPU too
    with s2t_for(model, selection, teacher) as s2t:
        dynamic = run(model, s2t, path)
        static = run(model, s2t, path, cache_implementation="static")
        assert s2t.stats["triggers"] > 0
        compiled_out = run(model, s2t, path, cache_implementation="static", compile_config=compiled)
    assert static.tolist() == dynamic.tolist()
    assert compiled_out.tolist() == dynamic.tolist()


def test_torch_compiled_forward():
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    with s2t_for(model, "teacher", teacher) as s2t:
        expected = run(model, s2t, "processor")
        model.forward = torch.compile(model.forward, backend="eager")
        assert run(model, s2t, "processor").tolist() == expected.tolist()


@pytest.mark.parametrize("path", PATHS)
def test_refused_decoding_methods_are_named(path):
    model, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])  # batch 1: transformers' own limit for assisted decoding
    cases = [
        (dict(num_beams=2), "num_beams=1"),
        (dict(assistant_model=tiny_model("llama", seed=2)), "assistant_model"),
        (dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
    ]
    if path == "fused":  # the drop-in path leaves these to transformers (they moved to `custom_generate` repos)
        cases += [(dict(dola_layers="high"), "DoLa.*dola_layers"), (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha")]
    for kwargs, named in cases:
        with s2t_for(model, "teacher", teacher) as s2t, pytest.raises(ValueError, match=named):
            run(model, s2t, path, input_ids=prompt, **kwargs)


def test_static_cache_on_a_sliding_window_model_is_refused_by_name():
    """A static cache of a sliding-window model gets a mask per kind of layer, which hides the batch's padding."""
    model, teacher = tiny_model("mistral-window", seed=0), tiny_model("mistral-window", seed=1)
    with s2t_for(model, "teacher", teacher) as s2t:
        with pytest.raises(ValueError, match="cannot read the batch's left padding.*remove `cache_implementation`"):
            run(model, s2t, "processor", cache_implementation="static")
