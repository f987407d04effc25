"""Calibration of a trigger's threshold (`s2t_hf.calibration`), against the signal computed independently."""

from __future__ import annotations

import pytest
import torch
from conftest import EOS, PAD, tiny_model

from s2t_hf import S2TLogitsProcessor
from s2t_hf.calibration import SignalRecorder, recording_signals
from s2t_hf.triggers import entropy_signal


@torch.no_grad()
def _entropies(model, prompt: list[int], new_tokens: int, warmup: int) -> list[float]:
    """Greedy decoding without a cache, EOS ruled out (`min_new_tokens`); the entropy signal past the warm-up."""
    sequence, values = torch.tensor([prompt]), []
    for step in range(new_tokens):
        logits = model(sequence).logits[:, -1]
        logits[:, EOS] = float("-inf")
        if step >= warmup:
            values.append(float(entropy_signal(logits, 64)[0]))
        sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=-1)
    return values


def test_the_recorder_collects_the_signal_of_every_eligible_step_and_is_removed():
    model = tiny_model(seed=0)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    with S2TLogitsProcessor(model, trigger="entropy", selection="takeover", teacher=tiny_model(seed=1),
                            warmup_tokens=2) as s2t:
        policy = s2t.trigger_policy
        with recording_signals(s2t) as recorder:
            assert isinstance(s2t.trigger_policy, SignalRecorder)
            for prompt in prompts:
                model.generate(torch.tensor([prompt]), max_new_tokens=7, min_new_tokens=7, do_sample=False,
                               pad_token_id=PAD, logits_processor=[s2t])
                assert s2t.stats["triggers"] == 0  # recording never fires
        assert s2t.trigger_policy is policy
        expected = [value for prompt in prompts for value in _entropies(model, prompt, 7, warmup=2)]
        assert torch.allclose(torch.cat(recorder.signals), torch.tensor(expected), atol=1e-4)
        # the policy comes back even when generation fails inside the block
        with pytest.raises(RuntimeError, match="boom"), recording_signals(s2t):
            raise RuntimeError("boom")
        assert s2t.trigger_policy is policy


def test_calibrate_formats_chat_messages_with_the_chat_template():
    from s2t_hf.prompts import prompt_token_ids
    from s2t_hf.tasks import build_tokenizer

    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    chats = [[{"role": "user", "content": "tim has 3 coins"}], [{"role": "user", "content": "5 + 7"}]]
    settings = dict(target_rate=0.3, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(model.config)
    questions = [chat[0]["content"] for chat in chats]
    with S2TLogitsProcessor(model, trigger="entropy", teacher=teacher, tokenizer=tokenizer) as s2t:
        with pytest.raises(ValueError, match="chat_template"):
            s2t.calibrate(chats, chat_template=False, **settings)
        from_chats = s2t.calibrate(chats, chat_template=True, **settings)
        from_ids = s2t.calibrate(prompt_token_ids(chats, tokenizer, chat_template=True), **settings)
        # by default, as `encode_prompts` and `generate_batched` format prompts: through the template when there is one
        by_default = s2t.calibrate(chats, **settings)
        questions_by_default = s2t.calibrate(questions, **settings)
        as_plain_text = s2t.calibrate(questions, chat_template=False, **settings)
        plain_ids = s2t.calibrate(prompt_token_ids(questions, tokenizer, chat_template=False), **settings)
    assert from_chats == from_ids == by_default == questions_by_default
    assert as_plain_text == plain_ids
    assert prompt_token_ids(questions, tokenizer) != prompt_token_ids(questions, tokenizer, chat_template=False)


def test_every_prompt_helper_defaults_chat_template_alike():
    """`calibrate` formats prompts as the decoding helpers do, so a chat model is calibrated on the prompts it sees."""
    import inspect

    from s2t_hf import collect_selection_data, encode_prompts
    from s2t_hf.calibration import calibrate_threshold
    from s2t_hf.generation import generate_batched
    from s2t_hf.prompts import prompt_token_ids

    helpers = (
        S2TLogitsProcessor.calibrate, calibrate_threshold, encode_prompts, generate_batched, prompt_token_ids,
        collect_selection_data,
    )  # fmt: skip
    defaults = {f.__qualname__: inspect.signature(f).parameters["chat_template"].default for f in helpers}
    assert set(defaults.values()) == {None}, defaults
