"""The selector's model card: usage, settings, metrics, and what every card must say (intended use, limitations,
licence), for a saved selector and for each adapter mode."""

from __future__ import annotations

import pytest
from peft import LoraConfig, TrainableTokensConfig
from transformers import AutoModelForCausalLM, LlamaConfig

from s2t_hf import S2TConfig, S2TSelector
from s2t_hf.selector_card import MODEL_CARD_NAME, selector_model_card
from s2t_hf.tasks import build_tokenizer, padded_vocab_size


def card(adapter_mode="scoring", threshold=None, peft_config=None, **config):
    config = S2TConfig(
        selection="local", scoring="residual", adapter_mode=adapter_mode, trigger_threshold=threshold,
        bin_token_ids=list(range(100, 116)), base_model_name_or_path="org/base", **config,
    )  # fmt: skip
    peft_config = peft_config or LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "o_proj"])
    return selector_model_card(config, peft_config, "org/selector", metrics={"eval_agreement": 0.5})


def test_every_card_says_its_intended_use_limitations_and_licence():
    text = card()
    for section in ("## Usage", "## Settings", "## Metrics", "## Intended use", "## Limitations", "## Licence"):
        assert section in text
    assert text.index("## Intended use") < text.index("## Limitations") < text.index("## Licence")
    assert "use it under that model's licence" in text and "`org/base`" in text.split("## Licence")[1]
    assert "top-8 candidates" in text and "| adapter_mode | `scoring` |" in text
    assert "every token outside a trigger is the base model's own" in text
    assert "no trigger threshold yet" in text


def test_the_card_follows_the_adapter_mode_and_the_threshold():
    text = card(adapter_mode="generate", threshold=2.2093, top_k=4)
    assert "it changes every token the model writes" in text and "top-4 candidates" in text
    assert "threshold (2.209) fits the prompts it was calibrated on" in text
    head_only = card(peft_config=TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[100]))
    assert "bin rows of the output head only" in head_only and "## Limitations" in head_only


@pytest.mark.parametrize("adapter_mode", ["scoring", "generate"])
def test_a_saved_selector_writes_the_card(tmp_path, adapter_mode):
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=padded_vocab_size(len(tokenizer)), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    config = S2TConfig(selection="local", adapter_mode=adapter_mode)
    selector = S2TSelector.create(model, tokenizer, num_bins=4, preserve_cache=True, config=config)
    selector.save_pretrained(tmp_path)
    text = (tmp_path / MODEL_CARD_NAME).read_text(encoding="utf-8")
    assert "## Intended use" in text and "## Limitations" in text and "## Licence" in text
    assert f"| adapter_mode | `{adapter_mode}` |" in text
