"""Tests of `AdapterState`, the one owner of a selector's PEFT state.

`AdapterState.lora` writes PEFT's private `_disable_adapters` flag instead of calling the public `enable_adapters` (the
cost is measured in `benchmarks/adapter_switch.py`). These tests pin that shortcut to PEFT's public behaviour: if PEFT
renames the flag or changes what it means, they fail.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from s2t_hf import S2TSelector
from s2t_hf.adapter_state import AdapterState

from conftest import VOCAB, tiny_config


NUM_BINS = 4
INPUT = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
ARCHS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "gpt2": ("gpt2", {}),  # tied, Conv1D projections
}


def make_selector(arch: str, seed: int = 0, **kwargs) -> S2TSelector:
    """A selector whose LoRA and reserved rows are random, so that switching either one changes the logits."""
    name, overrides = ARCHS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides)).eval()
    selector = S2TSelector.create(model, num_bins=NUM_BINS, lora_r=4, lora_dropout=0.0, learned_trigger=True, **kwargs)
    with torch.no_grad():
        for parameter_name, parameter in selector.model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(std=0.5)
    for row in selector.reserved_token_ids:
        selector.write_reserved_row(row, torch.randn(32))
    return selector


def logits(selector: S2TSelector) -> torch.Tensor:
    with torch.no_grad():
        return selector.model(INPUT).logits


def ordinary(tensor: torch.Tensor, selector: S2TSelector) -> torch.Tensor:
    """The logits of every row but the reserved ones."""
    keep = torch.ones(tensor.shape[-1], dtype=torch.bool)
    keep[selector.reserved_token_ids] = False
    return tensor[..., keep]


def lora_requires_grad(state: AdapterState) -> list[bool]:
    return [p.requires_grad for layer in state.lora_layers for n, p in layer.named_parameters() if "lora_" in n]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_finds_the_layers(arch):
    from peft.tuners.lora import LoraLayer

    selector = make_selector(arch)
    state = selector.adapter_state
    assert selector.adapter_state is state  # built once
    assert state.lora_layers and all(isinstance(layer, LoraLayer) for layer in state.lora_layers)
    assert len(state.token_layers) == 1
    assert state.token_layers[0].token_indices["default"] == selector.reserved_token_ids
    # PEFT wraps the output head only; a tied input embedding shares its weight, not a layer of its own
    assert all(layer.tied_adapter is state.token_layers[0] for layer in state.tied_token_layers)
    assert not state.rows_merged
    assert selector.output_head is selector.base_model.get_output_embeddings()
    assert "lora_layers" in repr(state)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_switch_matches_peft_public_path(arch):
    selector = make_selector(arch)
    state = selector.adapter_state
    adapted = logits(selector)
    trainable = lora_requires_grad(state)

    with state.lora(False):
        assert all(layer.disable_adapters for layer in state.lora_layers)  # PEFT's read-only property sees the flag
        assert not any(layer.disable_adapters for layer in state.token_layers)
        assert lora_requires_grad(state) == trainable  # only the flag: no requires-grad bookkeeping
        flagged = logits(selector)
    assert not any(layer.disable_adapters for layer in state.lora_layers)
    assert torch.equal(logits(selector), adapted)

    # PEFT's public path: `enable_adapters(False)` on every LoRA layer, which also freezes the LoRA weights
    state.set_lora(False)
    assert all(layer.disable_adapters for layer in state.lora_layers)
    public = logits(selector)
    state.set_lora(True)
    assert not any(layer.disable_adapters for layer in state.lora_layers)
    assert torch.equal(flagged, public)
    assert not torch.equal(ordinary(flagged, selector), ordinary(adapted, selector))  # LoRA does change the logits

    # PEFT's `disable_adapter()`: LoRA and the reserved rows off, i.e. the same logits but for the reserved rows
    with selector.model.disable_adapter():
        base = logits(selector)
    assert torch.equal(ordinary(flagged, selector), ordinary(base, selector))
    reserved = selector.reserved_token_ids
    assert not torch.equal(flagged[..., reserved], base[..., reserved])


def test_lora_restores_each_layers_previous_state():
    selector = make_selector("llama")
    state = selector.adapter_state
    first, others = state.lora_layers[0], state.lora_layers[1:]
    first.enable_adapters(False)  # a mixed state, set through PEFT's public API

    with state.lora(True):
        assert not any(layer.disable_adapters for layer in state.lora_layers)
    assert first.disable_adapters and not any(layer.disable_adapters for layer in others)

    with state.lora(False):
        assert all(layer.disable_adapters for layer in state.lora_layers)
    assert first.disable_adapters and not any(layer.disable_adapters for layer in others)

    with pytest.raises(RuntimeError, match="boom"), state.lora(False):
        raise RuntimeError("boom")
    assert first.disable_adapters and not any(layer.disable_adapters for layer in others)

    with selector.lora_disabled():  # the selector's public switch is the same one
        assert all(layer.disable_adapters for layer in state.lora_layers)
    assert not any(layer.disable_adapters for layer in others)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_rows_round_trips_bit_exactly(arch):
    selector = make_selector(arch)
    state = selector.adapter_state
    head = state.token_layers[0].base_layer.weight
    before_head = head.detach().clone()
    before_inputs = selector.base_model.get_input_embeddings().weight.detach().clone()
    before_logits = logits(selector)
    reserved = selector.reserved_token_ids

    state.merge_rows(True)
    assert state.rows_merged and all(layer.merged for layer in state.token_layers + state.tied_token_layers)
    merged_head = state.token_layers[0].base_layer.weight
    delta = state.token_layers[0].trainable_tokens_delta["default"]
    assert torch.equal(merged_head[reserved], delta)
    keep = torch.ones(merged_head.shape[0], dtype=torch.bool)
    keep[reserved] = False
    assert torch.equal(merged_head[keep], before_head[keep])  # only the reserved rows changed
    torch.testing.assert_close(logits(selector), before_logits, rtol=0, atol=1e-5)
    state.merge_rows(True)  # already merged: nothing to do

    state.merge_rows(False)
    assert not state.rows_merged
    assert torch.equal(state.token_layers[0].base_layer.weight, before_head)
    assert torch.equal(selector.base_model.get_input_embeddings().weight, before_inputs)
    assert torch.equal(logits(selector), before_logits)
    state.merge_rows(False)  # already unmerged: nothing to do (and no PEFT warning)


def test_merge_rows_leaves_disabled_layers_alone():
    selector = make_selector("llama")
    state = selector.adapter_state
    with selector.model.disable_adapter():
        state.merge_rows(True)
        assert not state.rows_merged


def test_write_row_writes_only_that_row():
    selector = make_selector("llama")
    state = selector.adapter_state
    delta = state.token_layers[0].trainable_tokens_delta["default"]
    before = delta.detach().clone()
    row = selector.trigger_token_id
    weights = torch.arange(32, dtype=torch.float64)  # cast to the delta's dtype

    state.write_row(row, weights)
    index = selector.reserved_token_ids.index(row)
    assert torch.equal(delta[index], weights.float())
    others = [i for i in range(delta.shape[0]) if i != index]
    assert torch.equal(delta[others], before[others])
    assert not delta.grad_fn  # written without autograd

    with pytest.raises(ValueError, match="trains no row 5"):
        state.write_row(5, weights)
    state.merge_rows(True)
    with pytest.raises(ValueError, match="merged into the output head"):
        selector.write_reserved_row(row, weights)
    state.merge_rows(False)


def test_no_other_module_touches_peft_privates():
    """`AdapterState` is the one place that writes PEFT's adapter flag (see the module's docstring)."""
    package = pathlib.Path(__import__("s2t_hf").__file__).parent
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "adapter_state.py" and "_disable_adapters" in path.read_text(encoding="utf-8")
    ]
    assert offenders == [], f"{offenders} touch PEFT's `_disable_adapters`; go through `s2t_hf.adapter_state`."


def test_rejects_a_non_module():
    with pytest.raises(TypeError, match="`peft_model` must be a `torch.nn.Module`"):
        AdapterState("not a model")


def test_vocab_is_the_conftest_one():
    assert make_selector("llama").bin_token_ids == list(range(VOCAB, VOCAB + NUM_BINS))
