"""Tiny random models built from configs (no network) shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)


# Property tests (tests/test_properties.py, tests/test_processor_properties.py): `ci` is the default, reproducible
# (derandomised, no example database) and small enough for the suite; `HYPOTHESIS_PROFILE=thorough` searches deeper.
# The processor's properties run half of `max_examples` (each of their examples is a few `generate` calls).
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VOCAB = 96
PAD, EOS = 0, 1


def tiny_config(arch: str, vocab_size: int = VOCAB, hidden: int = 32, layers: int = 2, **overrides):
    # a wide initialisation makes random tiny models confident enough for greedy paths and triggers to mean something
    common = dict(vocab_size=vocab_size, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2, initializer_range=0.2)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common, **overrides)
    decoder = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**decoder, **overrides)
    if arch == "qwen2":
        return Qwen2Config(**decoder, **overrides)
    if arch == "qwen3":
        return Qwen3Config(**decoder, head_dim=8, **overrides)
    if arch == "mistral":
        return MistralConfig(**decoder, sliding_window=None, **overrides)
    if arch == "gemma":
        return GemmaConfig(**decoder, head_dim=8, **overrides)
    # sliding-window and hybrid caches: windows shorter than `long_left_padded_batch`'s prompts
    window = {"sliding_window": overrides.pop("sliding_window", 6)}
    if arch == "gemma2":  # alternating sliding and full layers, logit soft-capping
        return Gemma2Config(**{**decoder, "num_hidden_layers": max(layers, 2)}, head_dim=8, **window, **overrides)
    if arch == "gemma3":
        overrides.setdefault("layer_types", ["sliding_attention", "full_attention"] * max(1, layers // 2))
        return Gemma3TextConfig(**{**decoder, "num_hidden_layers": max(layers, 2)}, head_dim=8, **window, **overrides)
    if arch == "mistral-window":  # every layer slides
        return MistralConfig(**decoder, **window, **overrides)
    if arch == "qwen2-window":  # sliding layers above `max_window_layers`
        return Qwen2Config(**decoder, use_sliding_window=True, max_window_layers=1, **window, **overrides)
    # the families of `ARCHITECTURE_CASES`, by model type
    gpt_style = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    falcon = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, multi_query=True,
                  parallel_attn=True, new_decoder_architecture=False)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=hidden, shared_expert_intermediate_size=hidden)
    families = {
        "gpt_neox": ("gpt_neox", {k: v for k, v in decoder.items() if k != "num_key_value_heads"}),
        "phi": ("phi", dict(decoder, partial_rotary_factor=0.5)),
        "phi3": ("phi3", decoder),
        "falcon": ("falcon", dict(falcon, alibi=False)),
        "falcon-alibi": ("falcon", dict(falcon, alibi=True)),
        "bloom": ("bloom", dict(hidden_size=hidden, n_layer=layers, n_head=4)),
        "mpt": ("mpt", dict(d_model=hidden, n_heads=4, n_layers=layers, expansion_ratio=2, max_seq_len=256)),
        "gpt_bigcode": ("gpt_bigcode", dict(gpt_style, multi_query=True)),
        "opt": ("opt", dict(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=hidden)),
        "gptj": ("gptj", dict(gpt_style, rotary_dim=4)),
        "cohere": ("cohere", decoder),
        "starcoder2": ("starcoder2", dict(decoder, **window)),
        "gpt_neo": ("gpt_neo", dict(hidden_size=hidden, num_layers=layers, num_heads=4, max_position_embeddings=256,
                                    attention_types=[[["global", "local"], max(1, layers // 2)]], window_size=6)),
        "mixtral": ("mixtral", dict(decoder, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("qwen2_moe", dict(decoder, num_experts=4, **moe)),
        "bamba": ("bamba", dict(decoder, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                                mamba_chunk_size=16, attn_layer_indices=[layers - 1], use_mamba_kernels=False)),
    }
    if arch in families:
        model_type, kwargs = families[arch]
        return AutoConfig.for_model(model_type, **{**kwargs, **common, **overrides})
    raise ValueError(arch)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2"]
SLIDING_ARCHITECTURES = ["gemma2", "gemma3", "mistral-window", "qwen2-window"]

# Causal-LM families that `test_architectures.py` runs through every model-level check:
# name -> (attention implementation, whether the output head is tied to the input embeddings, why S2T-Local's fast path
# cannot serve it: a word of the reason `local_scoring_path()` gives, or None where it scores on the live cache).
ARCHITECTURE_CASES = {
    "gpt_neox": ("sdpa", False, None),  # fused QKV (`query_key_value`), parallel residual, partial rotary
    "phi": ("sdpa", False, None),  # parallel attention and MLP off one layer norm, partial rotary, biased head
    "phi3": ("sdpa", False, None),  # fused `qkv_proj` and `gate_up_proj`
    "falcon": ("sdpa", True, None),  # multi-query attention, fused QKV, parallel attention and MLP
    "falcon-alibi": ("eager", True, "ALiBi"),  # Falcon with ALiBi biases (from the 2-D mask) instead of rotary
    "bloom": ("eager", True, "ALiBi"),  # ALiBi from the 2-D mask, fused QKV, embedding layer norm
    "mpt": ("eager", True, "ALiBi"),  # ALiBi from sequence indices, fused `Wqkv`, boolean masks, generates uncached
    "gpt_bigcode": ("sdpa", True, None),  # multi-query attention, fused `c_attn`, learned absolute positions
    "opt": ("sdpa", True, None),  # learned absolute positions (offset by 2), ReLU MLP
    "gptj": ("eager", False, None),  # parallel attention and MLP, interleaved rotary on part of each head, biased head
    "cohere": ("sdpa", True, None),  # parallel attention and MLP, scaled logits (`logit_scale`)
    "gemma2": ("eager", True, None),  # logit soft-capping (attention and final), alternating sliding / full layers
    "starcoder2": ("sdpa", True, None),  # a sliding window on every layer, biased projections
    "gpt_neo": ("eager", True, "local attention"),  # local layers that apply their window by sequence index
    "mixtral": ("sdpa", False, None),  # mixture of experts (fused expert weights, top-2 routing)
    "qwen2_moe": ("sdpa", False, None),  # mixture of experts with a gated shared expert
    "bamba": ("sdpa", False, "LinearAttentionLayer"),  # hybrid Mamba-2 / attention: state-space layers in the cache
}


def tiny_model(arch: str = "llama", seed: int = 0, attn: str | None = None, dtype=torch.float32, **overrides):
    """A tiny random model of `arch`; `attn` defaults to the case's in `ARCHITECTURE_CASES`, else `sdpa`."""
    attn = attn or ARCHITECTURE_CASES.get(arch, ("sdpa",))[0]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn)
    return model.to(dtype).eval()


def left_padded_batch():
    """Three prompts of different lengths, left padded with PAD."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    length = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return prompts, input_ids, attention_mask


def long_left_padded_batch():
    """Three prompts longer than the sliding windows of `SLIDING_ARCHITECTURES`, left padded with PAD."""
    prompts = [list(range(5, 17)), list(range(20, 27)), list(range(30, 40))]
    length = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return prompts, input_ids, attention_mask


def rows_until_eos(output, prompt_length, eos=EOS):
    """Each row's generated tokens, up to and including its first `eos`."""
    rows = []
    for row in output[:, prompt_length:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def randomize_trainable(selector, seed=0):
    """Random trainable weights for a selector, as if trained (a fresh one scores every candidate 0.5): LoRA
    N(0, 0.5^2), bin rows N(0, 2^2). Returns the selector."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in selector.model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.5 if "lora" in name else 2.0))
    return selector


GREEDY = dict(do_sample=False, pad_token_id=PAD, max_new_tokens=12)


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


def entropy_gap_threshold(scores) -> float:
    """An entropy threshold near the median of the steps' signals (`scores`: `generate`'s `output_scores`), in a clear
    gap between two values: a step whose signal sat on the threshold would trigger or not depending on float rounding
    (batch vs reference, thread count)."""
    values = []
    for step in scores:
        top = torch.softmax(step.float().topk(64).values, dim=-1)
        values.append(-(top * top.log()).sum(-1))
    values = sorted(torch.cat(values).tolist())
    middle = len(values) // 2
    for offset in range(len(values)):
        for i in (middle + offset, middle - offset):
            if 0 <= i < len(values) - 1 and values[i + 1] - values[i] > 1e-3:
                return (values[i] + values[i + 1]) / 2
    raise AssertionError("no gap between the entropy values")


def custom_code_checkpoint(path):
    """A local checkpoint whose config and tokenizer ask for custom code (`auto_map`); the code writes `RAN` into the
    checkpoint when imported. Loaders must refuse it without running it (`trust_remote_code` is never turned on)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    code = (
        "import pathlib\n"
        f"pathlib.Path({str(path / 'RAN')!r}).write_text('custom code ran')\n"  # transformers imports a copy
        "from transformers import PretrainedConfig\n"
        "class ProbeConfig(PretrainedConfig):\n"
        "    model_type = 's2t_custom_probe'\n"
    )
    for module in ("configuration_probe", "modeling_probe", "tokenization_probe"):
        (path / f"{module}.py").write_text(code)
    tokenizer = {"AutoTokenizer": ["tokenization_probe.ProbeTokenizer", None]}
    auto_map = {
        "AutoConfig": "configuration_probe.ProbeConfig", "AutoModelForCausalLM": "modeling_probe.Probe", **tokenizer
    }
    (path / "config.json").write_text(json.dumps({"model_type": "s2t_custom_probe", "auto_map": auto_map}))
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": tokenizer}))
    return path
