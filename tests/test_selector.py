"""Tests of `S2TSelector`: reserved rows, PEFT packaging, save / load (local, Hub cache offline), fingerprint."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from s2t_hf import S2TConfig, S2TSelector
from s2t_hf.bin_rows import (
    FINGERPRINT_TOLERANCE,
    fingerprint_distance,
    input_embedding_weight,
    parse_fingerprint,
)
from s2t_hf.selector import expected_bin_value, vocab_fingerprint


B = 8
HIDDEN = 16
INPUT = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])


def make_config(arch: str, vocab: int, tied: bool):
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, vocab_size=vocab, bos_token_id=1,
                          eos_token_id=2, initializer_range=0.2)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=64, vocab_size=vocab, tie_word_embeddings=tied,
               bos_token_id=1, eos_token_id=2, initializer_range=0.2)


def make_model(arch: str, vocab: int, tied: bool, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)  # a fresh config each time: `resize_token_embeddings` edits the model's config
    return AutoModelForCausalLM.from_config(make_config(arch, vocab, tied)).to(dtype).eval()


def make_tokenizer(num_words: int, num_reserved: int = 0, pad_reserved: bool = False):
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(num_words)]
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(num_reserved)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "<|reserved_special_token_0|>"} if pad_reserved else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


# name: (arch, model vocab, tied, tokenizer factory, expected bin ids, expected added rows)
CASES = {
    # untied Llama, tokenizer with reserved tokens (the first one used as pad): 4 spare rows < B -> reserved tokens
    "llama-untied-reserved": ("llama", 64, False, lambda: make_tokenizer(37, 20, pad_reserved=True),
                              list(range(52, 60)), 0),
    # Qwen-style padded vocabulary (tied, like Qwen2.5-1.5B): 24 spare rows above the tokenizer
    "qwen2-tied-spare": ("qwen2", 64, True, lambda: make_tokenizer(37), list(range(40, 48)), 0),
    # tied Llama whose tokenizer nearly fills the vocabulary (1 spare row < B, no reserved tokens): rows are added
    "llama-tied-grow": ("llama", 41, True, lambda: make_tokenizer(37), list(range(41, 49)), B),
    # GPT-2 (tied, Conv1D projections) without a tokenizer: rows are added
    "gpt2-grow": ("gpt2", 41, True, lambda: None, list(range(41, 49)), B),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


def new_selector(case, seed=0, **kwargs):
    arch, vocab, tied, tokenizer, _, _ = case
    model = make_model(arch, vocab, tied, seed)
    return model, S2TSelector.create(model, tokenizer(), num_bins=B, lora_r=4, **kwargs)


def base_model_for(case, seed=0, dtype=torch.float32):
    arch, vocab, tied, _, _, _ = case
    return make_model(arch, vocab, tied, seed, dtype)


def perturb(selector, scale=0.2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in selector.model.named_parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
                parameter.add_((noise * scale).to(parameter.dtype))


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def test_create_chooses_rows_and_fills_config(case):
    arch, vocab, tied, _, expected_ids, added = case
    model, selector = new_selector(case)
    assert selector.bin_token_ids == expected_ids
    assert selector.config.num_added_rows == added
    assert selector.config.num_bins == B and selector.config.selection == "local"
    assert selector.config.vocab_fingerprint.startswith(f"v2-{vocab}-")
    assert selector.base_model is model and isinstance(selector.model, PeftModel)
    assert selector.model.get_output_embeddings() is not None
    assert selector.bin_values.dtype == torch.float32 and torch.allclose(selector.bin_values, torch.linspace(0, 1, B))
    trainable = selector.trainable_parameter_names()
    assert all("lora_" in n or n.endswith("trainable_tokens_delta.default") for n in trainable)
    assert sum(n.endswith("trainable_tokens_delta.default") for n in trainable) == 1


def test_initial_adapter_is_exactly_the_base_model(case):
    base = logits(base_model_for(case))
    model, selector = new_selector(case)
    out = logits(selector.model)
    vocab = base.shape[-1]
    ordinary = [i for i in range(vocab) if i not in selector.bin_token_ids]
    assert torch.equal(out[..., ordinary], base[..., ordinary])
    # zero-initialised bins: uniform distribution, score = mean of the bin values
    scores = selector.scores_from_logits(out)
    assert torch.allclose(scores, torch.full_like(scores, 0.5))
    with selector.adapter_disabled():
        disabled = logits(selector.model)
    assert torch.equal(disabled[..., :vocab], base)


def test_round_trip_and_stored_tensors(case, tmp_path):
    arch, vocab, tied, _, _, added = case
    _, selector = new_selector(case)
    perturb(selector)
    expected = logits(selector.model)
    selector.save_pretrained(tmp_path, metrics={"gsm_accuracy": 0.5123})
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "s2t_config.json"]
    )

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    head = [k for k in shapes if k.endswith("trainable_tokens_delta")]
    assert head == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    assert shapes[head[0]] == (B, HIDDEN)
    assert all(".lora_A." in k or ".lora_B." in k for k in shapes if k not in head)
    assert all(vocab not in shape and vocab + added not in shape for shape in shapes.values())

    loaded = S2TSelector.from_pretrained(base_model_for(case), tmp_path)
    assert loaded.config == selector.config
    assert not loaded.model.training
    assert torch.equal(logits(loaded.model), expected)
    assert torch.equal(loaded.scores_from_logits(logits(loaded.model)), selector.scores_from_logits(expected))
    trainable = S2TSelector.from_pretrained(base_model_for(case), tmp_path, is_trainable=True)
    assert trainable.trainable_parameter_names() == selector.trainable_parameter_names()


def test_plain_peft_loads_the_adapter(case, tmp_path):
    _, selector = new_selector(case)
    perturb(selector)
    expected = logits(selector.model)
    selector.save_pretrained(tmp_path)
    model = base_model_for(case)
    if selector.config.num_added_rows:
        model.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + selector.config.num_added_rows)
    peft_model = PeftModel.from_pretrained(model, tmp_path)
    assert torch.equal(logits(peft_model), expected)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # PEFT's, for plain `PeftModel` on tied
@pytest.mark.parametrize("name", ["llama-untied-reserved", "qwen2-tied-spare"])
def test_head_only_changes_only_the_bin_rows(name, tmp_path):
    case = CASES[name]
    base = base_model_for(case)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = logits(base)
    _, selector = new_selector(case, use_lora=False)
    assert selector.trainable_parameter_names() == ["base_model.model.lm_head.trainable_tokens_delta.default"]
    perturb(selector)

    # every weight of the base model is untouched; the effective head differs from it on the B rows only
    model = selector.base_model
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "trainable_tokens" not in k}
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    effective = model.lm_head.get_merged_weights(["default"])
    changed = (effective != reference["lm_head.weight"]).any(dim=-1).nonzero().flatten().tolist()
    assert changed == selector.bin_token_ids
    if case[2]:  # tied: the input embeddings are not touched either
        assert torch.equal(model.get_input_embeddings().weight, reference["model.embed_tokens.weight"])

    out = logits(selector.model)
    ordinary = [i for i in range(out.shape[-1]) if i not in selector.bin_token_ids]
    assert torch.equal(out[..., ordinary], base_logits[..., ordinary])
    assert not torch.equal(out[..., selector.bin_token_ids], base_logits[..., selector.bin_token_ids])

    selector.save_pretrained(tmp_path)
    stored = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert stored == {"base_model.model.lm_head.trainable_tokens_delta"}
    assert torch.equal(logits(S2TSelector.from_pretrained(base_model_for(case), tmp_path).model), out)
    assert torch.equal(logits(PeftModel.from_pretrained(base_model_for(case), tmp_path)), out)


def test_gradients_reach_lora_and_bins():
    _, selector = new_selector(CASES["llama-untied-reserved"])
    perturb(selector)  # at initialisation the bins are zero, so only they get a gradient; after a step both do
    selector.model.train()
    selector.scores_from_logits(selector.model(INPUT).logits).sum().backward()
    named = dict(selector.model.named_parameters())
    delta = named["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"]
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if "lora_B" in n)


def test_load_by_repo_id_from_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    case = CASES["qwen2-tied-spare"]
    _, selector = new_selector(case)
    perturb(selector)
    expected = logits(selector.model)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--qwen2-s2t"
    snapshot = repo / "snapshots" / commit
    selector.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    # huggingface_hub reads these environment variables at import time: patch its constants too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = S2TSelector.from_pretrained(base_model_for(case), "org/qwen2-s2t")
    assert torch.equal(logits(loaded.model), expected)
    assert loaded.bin_token_ids == selector.bin_token_ids

    with pytest.raises(OSError, match="s2t_config.json"):
        S2TSelector.from_pretrained(base_model_for(case), "org/not-cached")


def test_mismatched_base_model_is_refused(tmp_path):
    case = CASES["llama-untied-reserved"]
    _, selector = new_selector(case)
    selector.save_pretrained(tmp_path)

    other = base_model_for(case, seed=1)  # same shapes, other weights
    with pytest.raises(ValueError, match="fingerprint.*check_fingerprint=False"):
        S2TSelector.from_pretrained(other, tmp_path)
    assert not any("lora" in n for n, _ in other.named_modules())  # refused before touching the model
    S2TSelector.from_pretrained(other, tmp_path, check_fingerprint=False)

    with pytest.raises(ValueError, match="with 64 vocabulary rows, but `model` has 72"):
        S2TSelector.from_pretrained(make_model("llama", 72, False), tmp_path)

    # the same model in bf16 is accepted
    loaded = S2TSelector.from_pretrained(base_model_for(case, dtype=torch.bfloat16), tmp_path)
    assert loaded.model(INPUT).logits.dtype == torch.bfloat16


def quantised_4bit(weight: torch.Tensor, block: int = 32) -> torch.Tensor:
    """`weight` through a 4-bit round trip in blocks along each row (16 levels between the block's minimum and
    maximum, as GGUF's Q4 formats store them), then rounded to bf16: the error a user's GGUF copy carries."""
    rows, width = weight.shape
    blocks = weight.detach().float().reshape(rows, -1, min(block, width))
    low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-12)
    restored = low + ((blocks - low) / scale).round() * scale
    return restored.reshape(rows, width).to(torch.bfloat16).float()


def test_fingerprint_tolerates_quantisation_and_refuses_another_model(tmp_path):
    case = CASES["llama-untied-reserved"]
    model, selector = new_selector(case)
    saved = selector.config.vocab_fingerprint
    selector.save_pretrained(tmp_path)
    original = input_embedding_weight(base_model_for(case)).detach().clone()
    quantised = quantised_4bit(original)
    error = (quantised - original).norm() / original.norm()
    assert 0.03 < float(error) < 0.2  # a 4-bit copy: visibly different weights
    # the sketch distance tells the two cases apart by a wide margin
    near = fingerprint_distance(saved, quantised, selector.config.reserved_token_ids)
    far = fingerprint_distance(saved, input_embedding_weight(base_model_for(case, seed=1)),
                               selector.config.reserved_token_ids)
    assert near < FINGERPRINT_TOLERANCE < far and far > 4 * FINGERPRINT_TOLERANCE
    assert fingerprint_distance(saved, original, selector.config.reserved_token_ids) < 1e-3

    # through the public API: the quantised copy (same shapes, other bits) loads; a model of the same shape does not
    copy_model = base_model_for(case)
    with torch.no_grad():
        input_embedding_weight(copy_model).copy_(quantised)
    assert vocab_fingerprint(copy_model) != vocab_fingerprint(base_model_for(case))  # the exact hash would refuse it
    S2TSelector.from_pretrained(copy_model, tmp_path)
    with pytest.raises(ValueError, match=r"relative sketch distance \d+\.\d+.*check_fingerprint=False"):
        S2TSelector.from_pretrained(base_model_for(case, seed=1), tmp_path)
    # a selector saved before the sketch (format v1) still checks the exact hash
    v1 = vocab_fingerprint(base_model_for(case), exclude_token_ids=selector.config.reserved_token_ids)
    assert v1.startswith("v1-") and parse_fingerprint(v1) == (64, 64) and fingerprint_distance(v1, quantised) is None


def test_grown_model_refuses_other_base_and_accepts_pregrown(tmp_path):
    case = CASES["llama-tied-grow"]
    _, selector = new_selector(case)
    perturb(selector)
    expected = logits(selector.model)
    selector.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        S2TSelector.from_pretrained(base_model_for(case, seed=3), tmp_path)
    model = base_model_for(case)
    model.resize_token_embeddings(41 + B)  # already grown by the caller: not grown twice
    loaded = S2TSelector.from_pretrained(model, tmp_path)
    assert loaded.base_model.get_output_embeddings().weight.shape[0] == 41 + B
    assert torch.equal(logits(loaded.model), expected)


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    case = CASES["llama-untied-reserved"]
    _, selector = new_selector(case)
    selector.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        S2TSelector.from_pretrained(base_model_for(case), tmp_path)

    weights.write_bytes(data)
    state = load_file(weights)
    dropped = next(k for k in state if "lora_A" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, weights)
    model = base_model_for(case)
    with pytest.raises(ValueError, match="missing 1 tensors"):
        S2TSelector.from_pretrained(model, tmp_path)
    assert type(model.lm_head) is torch.nn.Linear  # the failed load was undone
    assert not any("lora" in n for n, _ in model.named_modules()) and not hasattr(model, "peft_config")
    assert torch.equal(logits(model), logits(base_model_for(case)))

    save_file({k: v for k, v in state.items() if "trainable_tokens" not in k}, weights)
    with pytest.raises(ValueError, match="trainable_tokens_delta"):
        S2TSelector.from_pretrained(base_model_for(case), tmp_path)

    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        S2TSelector.from_pretrained(base_model_for(case), tmp_path)

    save_file(state, weights)
    (tmp_path / "s2t_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="s2t_config.json"):
        S2TSelector.from_pretrained(base_model_for(case), tmp_path)


def test_failed_load_removes_added_rows(tmp_path):
    case = CASES["llama-tied-grow"]
    _, selector = new_selector(case)
    selector.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if "lora_B" not in k}, weights)
    model = base_model_for(case)
    with pytest.raises(ValueError, match="missing"):
        S2TSelector.from_pretrained(model, tmp_path)
    assert model.get_output_embeddings().weight.shape[0] == 41 and model.config.vocab_size == 41
    assert torch.equal(logits(model), logits(base_model_for(case)))


def test_explicit_bin_ids():
    arch, vocab, tied, tokenizer, _, _ = CASES["qwen2-tied-spare"]
    ids = list(range(50, 58))
    selector = S2TSelector.create(make_model(arch, vocab, tied), tokenizer(), num_bins=B, bin_token_ids=ids)
    assert selector.bin_token_ids == ids and selector.config.num_added_rows == 0
    # the count of explicit ids sets num_bins when num_bins is not given
    selector = S2TSelector.create(make_model(arch, vocab, tied), use_lora=False, bin_token_ids=[60, 61, 62])
    assert selector.config.num_bins == 3

    with pytest.raises(ValueError, match=r"`bin_token_ids` \[64, 65\] are out of range.*64 rows"):
        S2TSelector.create(make_model(arch, vocab, tied), num_bins=4, bin_token_ids=[60, 61, 64, 65])
    with pytest.raises(ValueError, match="`bin_token_ids` contains tokens the tokenizer uses: 5 \\('w2'\\)"):
        S2TSelector.create(make_model(arch, vocab, tied), tokenizer(), num_bins=2, bin_token_ids=[5, 50])
    with pytest.raises(ValueError, match="`bin_token_ids` has 3 ids but `num_bins` is 4"):
        S2TSelector.create(make_model(arch, vocab, tied), num_bins=4, bin_token_ids=[50, 51, 52])
    # a reserved token that serves as pad token is not free
    reserved_case = CASES["llama-untied-reserved"]
    with pytest.raises(ValueError, match="reserved_special_token_0"):
        S2TSelector.create(make_model("llama", 64, False), reserved_case[3](), num_bins=1, bin_token_ids=[40])
    # tokenizer larger than the model
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        S2TSelector.create(make_model("llama", 32, False), make_tokenizer(37))


def test_lora_targets_every_projection():
    _, selector = new_selector(CASES["llama-untied-reserved"])
    config = selector.model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 32, 0.05)
    _, selector = new_selector(CASES["gpt2-grow"])
    config = selector.model.peft_config["default"]
    assert set(config.target_modules) == {"c_attn", "c_proj", "c_fc"} and config.fan_in_fan_out


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_lora_stays_on_the_linear_projections_of_a_mixture_of_experts(arch, tmp_path):
    """On fused-expert MoE models the LoRA goes on the Linear projections only (attention, Qwen2-MoE's shared expert
    and gates), never on the routed experts' fused parameters (PEFT 0.22 rewrites bare `gate_proj` / `down_proj` into
    those, and refuses LoRA dropout there); the same holds after save and load."""
    from peft.tuners.lora import LoraLayer

    from conftest import tiny_model

    selector = S2TSelector.create(tiny_model(arch), None, num_bins=B)
    adapted = {name for name, module in selector.model.named_modules() if isinstance(module, LoraLayer)}
    assert adapted and all(type(selector.model.get_submodule(name)).__name__ == "Linear" for name in adapted)
    assert not any(".experts." in name or name.endswith(".experts") for name in adapted)
    assert any("self_attn.q_proj" in name for name in adapted)
    if arch == "qwen2_moe":
        assert any("shared_expert.down_proj" in name for name in adapted)
    assert selector.model.peft_config["default"].lora_dropout == 0.05
    selector.save_pretrained(tmp_path)
    loaded = S2TSelector.from_pretrained(tiny_model(arch), tmp_path)
    assert {n for n, m in loaded.model.named_modules() if isinstance(m, LoraLayer)} == adapted


def test_bf16_model_saves_float32_rows(tmp_path):
    case = CASES["qwen2-tied-spare"]
    selector = S2TSelector.create(base_model_for(case, dtype=torch.bfloat16), case[3](), num_bins=B, lora_r=4)
    perturb(selector)
    expected = logits(selector.model)
    selector.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    loaded = S2TSelector.from_pretrained(base_model_for(case, dtype=torch.bfloat16), tmp_path)
    assert torch.equal(logits(loaded.model), expected)


def test_vocab_fingerprint():
    model = make_model("llama", 64, False)
    fingerprint = vocab_fingerprint(model)
    assert fingerprint == vocab_fingerprint(make_model("llama", 64, False, dtype=torch.bfloat16))
    assert fingerprint != vocab_fingerprint(make_model("llama", 64, False, seed=1))
    assert fingerprint != vocab_fingerprint(make_model("llama", 72, False))
    assert vocab_fingerprint(model, make_tokenizer(37)).startswith("v1-64-40-")
    assert fingerprint == vocab_fingerprint(model, exclude_token_ids=[64, 65])  # rows outside the range: no effect


def test_expected_bin_value_by_hand():
    bin_logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]], dtype=torch.bfloat16)
    values = torch.tensor([0.0, 0.5, 1.0])
    e = torch.exp(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
    expected = (e / e.sum(-1, keepdim=True) * values).sum(-1)
    result = expected_bin_value(bin_logits, values)
    assert result.dtype == torch.float32 and result.shape == (2,)
    assert torch.allclose(result, expected)
    assert torch.allclose(expected_bin_value(torch.zeros(4), torch.linspace(0, 1, 4)), torch.tensor(0.5))
    with pytest.raises(ValueError, match="one logit per bin"):
        expected_bin_value(torch.zeros(2, 3), torch.linspace(0, 1, 4))


def test_model_card_and_config(tmp_path):
    arch, vocab, tied, tokenizer, _, _ = CASES["qwen2-tied-spare"]
    model = make_model(arch, vocab, tied)
    model.config._name_or_path = "org/tiny-base"
    config = S2TConfig(selection="local", scoring="residual")
    selector = S2TSelector.create(model, tokenizer(), num_bins=B, config=config)
    selector.save_pretrained(tmp_path, metrics={"accuracy": 0.456789, "hit@8": 0.98})
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: peft" in header and 'base_model: "org/tiny-base"' in header
    assert "- s2t_hf" in header and "- select-to-think" in header
    assert f'S2TLogitsProcessor.from_pretrained("{tmp_path}", model=model)' in card
    assert "model.generate(**inputs, logits_processor=[processor])" in card
    assert "| accuracy | 0.4568 |" in card and "| hit@8 | 0.98 |" in card
    saved = json.loads((tmp_path / "s2t_config.json").read_text())
    assert saved["scoring"] == "residual" and saved["bin_token_ids"] == list(range(40, 48))
    assert saved["base_model_name_or_path"] == "org/tiny-base"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-base"


def test_push_to_hub_uploads_the_saved_folder(monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), commit_message, kwargs)
        calls["card"] = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
        return f"https://huggingface.co/{repo_id}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _, selector = new_selector(CASES["qwen2-tied-spare"])
    url = selector.push_to_hub("org/s2t-sel", private=True, metrics={"accuracy": 0.5})
    assert url == "https://huggingface.co/org/s2t-sel/commit/abc"
    assert calls["create"] == ("org/s2t-sel", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, files, message, _ = calls["upload"]
    assert repo_id == "org/s2t-sel" and message == "Upload S2T selector"
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "s2t_config.json"]
    assert 'S2TLogitsProcessor.from_pretrained("org/s2t-sel", model=model)' in calls["card"]


def test_wrong_inputs():
    model = make_model("llama", 64, False)
    selector = S2TSelector.create(model, num_bins=2, use_lora=False)
    with pytest.raises(TypeError, match="already holds a PEFT adapter"):
        S2TSelector.create(selector.model)
    with pytest.raises(TypeError, match="must be a `peft.PeftModel`"):
        S2TSelector(make_model("llama", 64, False), selector.config)


@pytest.mark.parametrize("name", ["llama-untied-reserved", "qwen2-tied-spare", "gpt2-grow"])
def test_preserve_cache_leaves_every_key_and_value_as_the_base_models(name):
    case = CASES[name]
    _, selector = new_selector(case, preserve_cache=True)
    perturb(selector, scale=0.5)
    assert selector.preserves_cache
    lora_layers = [n for n, m in selector.model.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_layers and all(".1." in n and "k_proj" not in n and "v_proj" not in n for n in lora_layers)
    assert not any(n.endswith("c_attn") for n in lora_layers)
    with torch.no_grad():
        adapted = selector.model(INPUT, use_cache=True)
        with selector.adapter_disabled():
            plain = selector.model(INPUT, use_cache=True)
    for layer in range(2):
        for part in ("keys", "values"):
            assert torch.equal(
                getattr(adapted.past_key_values.layers[layer], part), getattr(plain.past_key_values.layers[layer], part)
            )
    assert not torch.allclose(adapted.logits, plain.logits)  # the adapter still changes the outputs


def test_preserves_cache_is_false_for_lora_on_keys_values_or_earlier_layers():
    case = CASES["llama-untied-reserved"]
    assert not new_selector(case)[1].preserves_cache
    assert not new_selector(case, target_modules=["q_proj"])[1].preserves_cache  # every layer
    assert new_selector(case, use_lora=False)[1].preserves_cache
    with pytest.raises(ValueError, match=r"cannot put LoRA on \['v_proj'\]"):
        new_selector(case, preserve_cache=True, target_modules=["q_proj", "v_proj"])
    config = new_selector(case, preserve_cache=True)[1].model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.layers_to_transform == [1]


def test_preserve_cache_survives_save_and_load(tmp_path):
    case = CASES["qwen2-tied-spare"]
    _, selector = new_selector(case, preserve_cache=True)
    perturb(selector)
    selector.save_pretrained(tmp_path)
    loaded = S2TSelector.from_pretrained(base_model_for(case), tmp_path)
    assert loaded.preserves_cache
    torch.testing.assert_close(logits(loaded.model), logits(selector.model))


def test_create_refuses_wrong_arguments():
    from transformers import AutoModel

    with pytest.raises(ValueError, match=r"`model` \(LlamaModel\) has no output head.*AutoModelForCausalLM"):
        S2TSelector.create(AutoModel.from_config(make_config("llama", 64, False)), num_bins=2)
    with pytest.raises(ValueError, match="`num_bins` must be a positive integer, got 0"):
        S2TSelector.create(make_model("llama", 64, False), num_bins=0)
    config = S2TConfig(selection="local", num_bins=3, bin_values=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="`config.bin_values` has 3 values but `num_bins` is 2"):
        S2TSelector.create(make_model("llama", 64, False), num_bins=2, config=config)
    with pytest.raises(ValueError, match="`bin_token_ids` must be a list of integers"):
        S2TSelector.create(make_model("llama", 64, False), bin_token_ids=["a", "b"])
    with pytest.raises(ValueError, match=r"`bin_token_ids` must be distinct, got \[60, 60\]"):
        S2TSelector.create(make_model("llama", 64, False), bin_token_ids=[60, 60])
    with pytest.raises(ValueError, match=r"`target_modules=\['qkv'\]` match no module of LlamaForCausalLM.*'q_proj'"):
        S2TSelector.create(make_model("llama", 64, False), num_bins=2, target_modules=["qkv"])
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(make_config("llama", 64, False))
    with pytest.raises(ValueError, match="`meta` device; load its weights first"):
        S2TSelector.create(empty, num_bins=2)


def test_wrapping_a_peft_model_checks_its_config():
    selector = S2TSelector.create(make_model("llama", 64, False), num_bins=2, use_lora=False)
    with pytest.raises(TypeError, match="`config` must be an `S2TConfig`, got dict"):
        S2TSelector(selector.model, selector.config.to_dict())
    with pytest.raises(ValueError, match="`config.bin_token_ids` is not set"):
        S2TSelector(selector.model, S2TConfig(selection="local"))
    with pytest.raises(ValueError, match=r"`config.bin_token_ids` \(and `trigger_token_id`\) go up to 81 but the model's output head has only 66"):
        S2TSelector(selector.model, S2TConfig(selection="local", num_bins=2, bin_token_ids=[80, 81]))


def test_foreign_or_damaged_selector_folders_are_refused(tmp_path, caplog):
    import shutil

    from peft import LoraConfig, get_peft_model

    case = CASES["llama-untied-reserved"]
    _, selector = new_selector(case)
    saved = tmp_path / "saved"
    selector.save_pretrained(saved)

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(saved, folder)
        edit(folder)
        return folder

    def edit_json(file, **changes):
        def edit(folder):
            data = json.loads((folder / file).read_text())
            data.update(changes)
            (folder / file).write_text(json.dumps(data))
        return edit

    load = lambda folder, model=None: S2TSelector.from_pretrained(model or base_model_for(case), folder)  # noqa: E731
    with pytest.raises(TypeError, match="already holds a PEFT adapter"):
        load(saved, selector.model)
    # a plain PEFT LoRA adapter is no S2T selector
    plain = tmp_path / "plain-lora"
    get_peft_model(make_model("llama", 64, False), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(plain)
    with pytest.raises(FileNotFoundError, match="No `s2t_config.json` in .* written by `save_pretrained` of s2t_hf"):
        load(plain)
    # an `s2t_config.json` alone (e.g. written by `s2t-hf calibrate`) is no selector either
    calibrated = tmp_path / "calibrated"
    S2TConfig(trigger_threshold=1.0).save_pretrained(calibrated)
    with pytest.raises(ValueError, match="has no `bin_token_ids`: it was not written by `S2TSelector"):
        load(calibrated)
    with pytest.raises(FileNotFoundError, match="No `adapter_config.json`"):
        load(variant("no-adapter-config", lambda f: (f / "adapter_config.json").unlink()))
    with pytest.raises(ValueError, match="`adapter_config.json` of .* is not a valid PEFT config"):
        load(variant("bad-adapter-config", lambda f: (f / "adapter_config.json").write_text("{not json")))
    with pytest.raises(ValueError, match=r"trains rows \[10, 11\] but `s2t_config.json` names `bin_token_ids`"):
        load(variant("other-rows", edit_json("adapter_config.json", trainable_token_indices={"lm_head": [10, 11]})))
    with pytest.raises(ValueError, match="Unrecognised `vocab_fingerprint` 'abc'.*check_fingerprint=False"):
        load(variant("bad-fingerprint", edit_json("s2t_config.json", vocab_fingerprint="abc")))
    # a pickle under the safetensors name is never unpickled
    pickled = variant("pickled", lambda f: torch.save({"x": torch.zeros(2)}, f / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="is corrupt or truncated"):
        load(pickled)
    wider = make_config("llama", 64, False)
    wider.hidden_size = 2 * HIDDEN  # another model of the family: same vocabulary, wider rows
    with pytest.raises(ValueError, match=r"must hold one `trainable_tokens_delta` tensor of shape \(8, 32\)"):
        load(saved, AutoModelForCausalLM.from_config(wider))
    with pytest.raises(ValueError, match="Could not load the adapter of .* onto GPT2LMHeadModel: Target modules"):
        S2TSelector.from_pretrained(make_model("gpt2", 64, False), saved, check_fingerprint=False)
    # a selector saved without a fingerprint loads unchecked, with a warning in the log
    unchecked = variant("no-fingerprint", edit_json("s2t_config.json", vocab_fingerprint=None))
    with caplog.at_level("WARNING", logger="s2t_hf.selector"):
        loaded = load(unchecked)
    assert loaded.bin_token_ids == selector.bin_token_ids
    assert "records no vocabulary fingerprint" in caplog.text


def test_local_candidate_logits_name_the_scoring_form():
    from s2t_hf.selection import local_candidate_logits

    bins, values = torch.zeros(2, 3, 4), torch.linspace(0, 1, 4)
    with pytest.raises(ValueError, match="`residual` scoring form needs `student_log_probs`"):
        local_candidate_logits(bins, values, scoring="residual")
    with pytest.raises(ValueError, match="`scoring` must be 'pure' or 'residual', got 'mixed'"):
        local_candidate_logits(bins, values, scoring="mixed")


def test_a_save_interrupted_midway_leaves_the_previous_or_the_new_selector(tmp_path, monkeypatch, caplog):
    """A crash while the new files are written leaves the previous selector; one while they are moved into place is
    finished by the next load (the new selector). The other files of the folder are never touched."""
    import shutil

    from s2t_hf import atomic_files

    case = CASES["qwen2-tied-spare"]
    _, selector = new_selector(case)
    selector.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("the tokenizer")
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("{}")
    previous = logits(S2TSelector.from_pretrained(base_model_for(case), tmp_path).model)
    perturb(selector)
    new = logits(selector.model)
    assert not torch.equal(previous, new)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process stops after the adapter, before the config and the card

    monkeypatch.setattr(S2TConfig, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        selector.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert torch.equal(logits(S2TSelector.from_pretrained(base_model_for(case), tmp_path).model), previous)

    moves = []
    original = os.replace

    def crash_after_one_move(source, target):  # the commit point passed, one file moved into place
        if atomic_files.PENDING_DIR in str(source) and not str(target).endswith(atomic_files.PENDING_DIR):
            moves.append(target)
            if len(moves) == 2:
                raise KeyboardInterrupt
        return original(source, target)

    monkeypatch.setattr(atomic_files.os, "replace", crash_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        selector.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / atomic_files.PENDING_DIR).is_dir()  # a mix on disk until the next load finishes the save
    with caplog.at_level("WARNING", logger="s2t_hf.selector"):
        loaded = S2TSelector.from_pretrained(base_model_for(case), tmp_path)
    assert "Finished a save of the selector" in caplog.text
    assert torch.equal(logits(loaded.model), new)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "s2t_config.json", "tokenizer.json",
         "checkpoint-10"]
    )
    assert (tmp_path / "tokenizer.json").read_text() == "the tokenizer"
    assert (tmp_path / "checkpoint-10" / "trainer_state.json").read_text() == "{}"
