"""`generate_batched` (`s2t_hf.generation.batched`) on tiny models from configs and the built-in task's tokenizer (built
locally): batched generation against one prompt at a time, the fused loop with `s2t=...` against the drop-in processor,
the errors of bad input, and where it is imported from."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import s2t_hf
import s2t_hf.generation as generation
from s2t_hf import S2TLogitsProcessor, S2TSelector
from s2t_hf.generation import generate_batched
from s2t_hf.tasks import build_tokenizer, padded_vocab_size

from conftest import EOS, PAD, tiny_model


TEXTS = ["tom has 5 apples .", "ann has 3 pens and 2 cups .", "bob"]
ID_PROMPTS = [[5, 6, 7], list(range(10, 22)), [30], [40, 41, 42, 43, 44, 45, 46], [50, 51]]  # lengths out of order
NEW = 10


@pytest.fixture
def tokenizer():
    return build_tokenizer()  # fresh per test: some tests change its padding side, template or pad token


@pytest.fixture(scope="module")
def task_model():
    """A tiny Llama over the task tokenizer's vocabulary (padded with spare rows, as the demo's models)."""
    vocab = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=padded_vocab_size(len(vocab)), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, pad_token_id=vocab.pad_token_id,
        eos_token_id=vocab.eos_token_id, bos_token_id=vocab.bos_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


def alone(model, ids: list[int], **kwargs) -> list[int]:
    """Reference: greedy `generate` on one unpadded prompt (it stops at EOS, so no padding follows)."""
    output = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, **kwargs)
    return output[0, len(ids) :].tolist()


def test_batched_greedy_equals_one_prompt_at_a_time():
    model = tiny_model("llama", seed=3)
    # a stop token that the first prompt reaches early, so rows of one batch finish at different steps
    stop = alone(model, ID_PROMPTS[0], eos_token_id=EOS)[2]
    expected = [alone(model, p, eos_token_id=stop) for p in ID_PROMPTS]
    assert len(expected[0]) == 3 and expected[0][-1] == stop
    assert any(len(e) == NEW for e in expected)  # and others run to `max_new_tokens`
    for sort_by_length in (True, False):
        got = generate_batched(
            model, ID_PROMPTS, batch_size=3, decode=False, sort_by_length=sort_by_length, show_progress=False,
            max_new_tokens=NEW, do_sample=False, eos_token_id=stop,
        )  # fmt: skip
        assert got == expected


def test_batched_text_equals_one_prompt_at_a_time(tokenizer, task_model, capsys):
    unused = list(range(len(tokenizer), task_model.config.vocab_size))
    chats = [[{"role": "user", "content": text}] for text in TEXTS]
    expected = []
    for chat in chats:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
        expected.append(tokenizer.decode(alone(task_model, ids, suppress_tokens=unused), skip_special_tokens=True))
    tokenizer.padding_side = "right"
    got = generate_batched(
        task_model, [chats[0], TEXTS[1], chats[2]], tokenizer, batch_size=2, max_new_tokens=NEW, do_sample=False,
        suppress_tokens=unused, desc="prompts-test-bar",
    )  # fmt: skip
    assert got == expected and tokenizer.padding_side == "right"
    assert all(text.split() for text in got)
    assert "prompts-test-bar" in capsys.readouterr().err  # the progress bar


def test_s2t_runs_the_fused_loop_with_the_drop_in_tokens(monkeypatch):
    model = tiny_model("llama", seed=0)
    selector = S2TSelector.create(model, bin_token_ids=list(range(88, 96)))
    calls = []
    fused = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: calls.append(1) or fused(*a, **k))
    common = dict(batch_size=2, decode=False, show_progress=False, max_new_tokens=NEW, do_sample=False)
    with S2TLogitsProcessor(model, selector=selector, selection="local", trigger="always", top_k=4) as s2t:
        drop_in = generate_batched(model, ID_PROMPTS, logits_processor=[s2t], **common)
        assert not calls
        got = generate_batched(model, ID_PROMPTS, s2t=s2t, **common)
        assert len(calls) == 3 and s2t.stats["triggers"] > 0  # one fused call per batch
    assert got == drop_in


def test_generate_batched_errors(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        generate_batched(model, ID_PROMPTS, batch_size=0, decode=False)
    with pytest.raises(ValueError, match="remove `attention_mask`"):
        generate_batched(model, ID_PROMPTS, decode=False, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="repeat it in `prompts`"):
        generate_batched(model, ID_PROMPTS, decode=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="return_dict_in_generate"):
        generate_batched(model, ID_PROMPTS, decode=False, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="`decode=True` needs the `tokenizer`"):
        generate_batched(model, ID_PROMPTS)
    with pytest.raises(TypeError, match="`s2t` must be an `S2TLogitsProcessor`"):
        generate_batched(model, ID_PROMPTS, decode=False, s2t=object())
    with pytest.raises(ValueError, match=r"`prompts\[1\]` holds token id 96, but the model's embedding has 96 rows"):
        generate_batched(model, [[1, 2], [3, 96]], decode=False)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        generate_batched(model, [], decode=False)
    # the pad id falls back to the model's generation config; without any, the error says how to set one
    tokenizer.pad_token = None
    model.generation_config.pad_token_id = None
    with pytest.raises(ValueError, match=r"`tokenizer.pad_token = tokenizer.eos_token`"):
        generate_batched(model, ID_PROMPTS, tokenizer, decode=False, max_new_tokens=2)
    model.generation_config.pad_token_id = PAD
    assert len(generate_batched(model, ID_PROMPTS, tokenizer, decode=False, max_new_tokens=2, show_progress=False)) == 5


def test_public_paths():
    """`generate_batched` lives in `s2t_hf.generation` only: `s2t_hf.prompts` encodes prompts and imports nothing
    above it (no alias was kept: nothing had been released)."""
    import s2t_hf.prompts as prompts

    assert s2t_hf.generate_batched is generate_batched
    assert "generate_batched" in generation.__all__ and "generate_batched" not in prompts.__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from s2t_hf.prompts import encode_prompts

    assert encode_prompts is s2t_hf.encode_prompts
    for name in ("generate_batched", "not_a_name"):
        with pytest.raises(AttributeError, match=f"has no attribute '{name}'"):
            getattr(prompts, name)
